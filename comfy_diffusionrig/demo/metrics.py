"""Image quality scores against a ground truth: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """[B, C, H, W] pair -> [B] peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = (image.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """[B, C, H, W] pair -> [B] mean SSIM over channels and valid windows.

    Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03 (the paper's constants); the window
    shrinks (odd, at least 3) for images smaller than 11 px.
    """
    if image.shape != reference.shape or image.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(image.shape)} and "
                         f"{tuple(reference.shape)}")
    window = min(window, *image.shape[-2:])
    window -= 1 - window % 2
    if window < 3:
        raise ValueError(f"images of {tuple(image.shape[-2:])} px are too small for SSIM (3 px at least)")
    x, y = image.double(), reference.double()
    channels = x.shape[1]
    g = _gaussian_window(window, sigma * window / 11 if window < 11 else sigma, torch.float64)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731  (valid windows only)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2  # Wang et al. K1, K2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1).float()

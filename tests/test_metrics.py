"""PSNR and SSIM on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from comfy_diffusionrig.demo.metrics import psnr, ssim


def test_psnr_of_a_known_error():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1  # mse 0.01 -> 20 dB
    b[1, :, :4] += 0.5  # mse 0.125 -> 9.03 dB
    assert psnr(b, a).tolist() == pytest.approx([20.0, 10 * math.log10(8)], abs=1e-4)
    assert math.isinf(psnr(a, a)[0])


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01 ** 2
    assert float(ssim(a, b)) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rel=1e-6)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen)
    noisy = [(x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    scores = [float(ssim(n, x)) for n in noisy]
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-9)
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    assert float(ssim(x, 1 - x)) < 0  # anti-correlated structure


def test_ssim_small_images_and_bad_shapes():
    x = torch.rand(1, 3, 5, 5)
    assert float(ssim(x, x)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(x, torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match="too small"):
        ssim(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))


def test_ssim_of_one_window_is_wang_et_al_written_out():
    """An 11x11 pair has one valid window: SSIM is then the paper's formula over one Gaussian-weighted window
    (sigma 1.5, K1 0.01, K2 0.03), written out here directly; a change to any constant moves it."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 11, 11, generator=gen, dtype=torch.float64)
    b = (0.6 * a + 0.4 * torch.rand(1, 1, 11, 11, generator=gen, dtype=torch.float64)) * 0.8
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    p, q = a[0, 0].numpy(), b[0, 0].numpy()
    mp, mq = (w * p).sum(), (w * q).sum()
    vp, vq, cov = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum(), (w * (p - mp) * (q - mq)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
    assert float(ssim(b, a)) == pytest.approx(expected, rel=1e-6)  # ssim returns float32
    assert float(ssim(b, a)) < 0.9  # far from 1: the structure term (K2) and the window's weights matter

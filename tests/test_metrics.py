"""PSNR and SSIM on cases with known answers."""

import math

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

"""DPM-Solver++(2M), the fixed-point DDIM inversion, log-SNR spacing, the sampler registry and feature caching.

Solvers are checked on a known answer: data N(MU, S^2) per pixel, whose exact noise
prediction is closed-form, so the probability-flow ODE maps x_T to x_0 by keeping
z = (x_t - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2) fixed. The feature cache is checked
on the official tiny checkpoint against the plain forward pass with a hook.
"""

import numpy as np
import pytest
import torch

from comfy_diffusionrig.model import diffusion as D
from comfy_diffusionrig.model.feature_cache import FeatureCache
from comfy_diffusionrig.model.sampler_presets import SAMPLING_PRESETS

MU, S = 0.2, 0.5  # data mean and std per pixel: inside [-1, 1] for |z| < 2.4
ABAR = D.base_schedule().alphas_cumprod  # float64 [1000]


def gaussian_denoiser(x, t, buffers, code):
    """Exact E[eps | x_t] for N(MU, S^2) data: sigma (x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    a = torch.from_numpy(ABAR)[t].double()[:, None, None, None]
    return (torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * MU) / (a * S**2 + 1 - a)).float()


def flow(z: torch.Tensor, a: float) -> torch.Tensor:
    """The point of the exact probability-flow trajectory z at abar a (float64)."""
    return np.sqrt(a) * MU + np.sqrt(a * S**2 + 1 - a) * z


def posterior_mean(x: torch.Tensor, a: float) -> torch.Tensor:
    """E[x_0 | x_t] at abar a: what the samplers' last step (to the clean image) returns."""
    return MU + np.sqrt(a) * S**2 * (x - np.sqrt(a) * MU) / (a * S**2 + 1 - a)


def z_field(seed=0, size=8):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cond(size=8):
    return torch.zeros(1, 9, size, size), torch.zeros(1, 4)


def sample_error(sample, steps, spacing=None):
    """Max abs error of `sample` against the exact ODE solution from the same x_T."""
    sched = D.respace(D.base_schedule(), spacing or steps)
    z = z_field()
    a_top, a_last = ABAR[sched.timesteps[-1]], ABAR[sched.timesteps[0]]
    out = sample(gaussian_denoiser, *cond(), flow(z, a_top).float(), steps=spacing or steps, clip=False)
    return (out.double() - posterior_mean(flow(z, a_last), a_last)).abs().max().item()


def test_ddim_is_first_order():
    errors = [sample_error(D.ddim_sample, n) for n in (25, 50, 100, 200)]
    ratios = [e0 / e1 for e0, e1 in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios  # halving the step halves the error


def test_dpmpp_2m_is_second_order_on_logsnr_steps():
    errors = [sample_error(D.dpmpp_2m_sample, n) for n in (20, 40, 80)]
    ratios = [e0 / e1 for e0, e1 in zip(errors, errors[1:])]
    # halving the step quarters the error (measured 3.7, 3.2: integer timesteps near t = 0 cannot
    # keep halving in log-SNR; a first-order slip such as a wrong 1/(2r) gives 2.0-2.7)
    assert all(3.0 < r < 4.6 for r in ratios), ratios
    # and it is far more accurate per UNet call than DDIM on the same timesteps
    assert errors[0] < 0.2 * sample_error(D.ddim_sample, 20, "logsnr20")
    assert errors[0] < 0.2 * sample_error(D.ddim_sample, 20)  # ...and than the official ddim20


def test_dpmpp_2m_first_and_last_steps_are_ddim_steps():
    # with two steps there is no second-order correction: DDIM exactly, noise draws included
    z = z_field(1).float()
    for eta in (0.0, 1.0):
        ours = D.dpmpp_2m_sample(gaussian_denoiser, *cond(), z, steps="ddim2", eta=eta,
                                 generator=torch.Generator().manual_seed(3))
        ddim = D.ddim_sample(gaussian_denoiser, *cond(), z, steps=2, eta=eta,
                             generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, ddim, atol=1e-5, rtol=0)  # float32 round-off of other arithmetic
    three = D.dpmpp_2m_sample(gaussian_denoiser, *cond(), z, steps="ddim3")
    assert not torch.allclose(three, D.ddim_sample(gaussian_denoiser, *cond(), z, steps=3), atol=1e-3)


@pytest.mark.parametrize("sample, steps, spread_tol", [(D.ddim_sample, 200, 0.025), (D.dpmpp_2m_sample, 50, 0.015)])
def test_eta_one_samples_the_data_distribution(sample, steps, spread_tol):
    # an independent route to the noise scale: eta=1 from x_T ~ N(alpha MU, alpha^2 S^2 + sigma^2)
    # ends near N(MU, S^2) whatever x_T; without the noise the spread would be far off. Ancestral
    # steps lose spread at finite step counts (measured std: DDIM 0.447 at 50 steps, 0.484 at 200;
    # DPM++(2M) 0.507 at 50), hence the tolerances.
    sched = D.respace(D.base_schedule(), steps if sample is D.ddim_sample else f"logsnr{steps}")
    x_t = flow(z_field(2, 96), ABAR[sched.timesteps[-1]]).float()

    def run(seed, eta=1.0):
        return sample(gaussian_denoiser, *cond(96), x_t, steps=steps, eta=eta, clip=False,
                      generator=torch.Generator().manual_seed(seed))

    a = run(5)
    assert torch.equal(a, run(5))
    assert not torch.allclose(a, run(6))
    assert abs(a.mean().item() - MU) < 0.01
    assert abs(a.std().item() - S) < spread_tol
    assert (a - run(5, eta=0.0)).abs().mean() > 0.2  # the noise really changes each pixel


def invert_error(invert, steps):
    """Max abs error of x_T against the exact ODE point at the last kept timestep."""
    sched = D.respace(D.base_schedule(), f"logsnr{steps}")
    z = z_field(3)
    a_first, a_top = ABAR[sched.timesteps[0]], ABAR[sched.timesteps[-1]]
    x_t = invert(gaussian_denoiser, flow(z, a_first).float(), *cond(), steps=f"logsnr{steps}", clip=False, order=2)
    return (x_t.double() - flow(z, a_top)).abs().max().item()


def test_dpmpp_2m_inversion_is_second_order():
    errors = [invert_error(D.dpmpp_2m_invert, n) for n in (20, 40, 80)]
    ratios = [e0 / e1 for e0, e1 in zip(errors, errors[1:])]
    assert all(3.5 < r < 4.6 for r in ratios), ratios  # measured 4.0, 4.1


def reconstruction_error(invert, sample, steps, **kw):
    image = flow(z_field(4), ABAR[0]).float().clamp(-1, 1)
    x_t = invert(gaussian_denoiser, image, *cond(), steps=steps, **kw)
    return (sample(gaussian_denoiser, *cond(), x_t, steps=steps) - image).abs().max().item()


def test_inversion_then_sampling_reconstructs():
    # max abs error, images in [-1, 1]; measured: second-order DPM++(2M) 0.028 (10 steps, 19 calls), 0.0013
    # (20 steps, 39 calls); DDIM 20 steps with k fixed-point iterations 0.297, 0.050, 0.0085,
    # 0.0018 for k = 0..3 (39 + 19 k calls): per UNet call the second-order inversion wins
    assert reconstruction_error(D.dpmpp_2m_invert, D.dpmpp_2m_sample, 10, order=2) < 0.04
    assert reconstruction_error(D.dpmpp_2m_invert, D.dpmpp_2m_sample, 20, order=2) < 0.002
    plain = reconstruction_error(D.ddim_invert_fixed_point, D.ddim_sample, 20, iterations=0)
    refined = reconstruction_error(D.ddim_invert_fixed_point, D.ddim_sample, 20, iterations=3)
    assert plain > 0.2  # DDIM's inversion is not DDIM sampling's inverse...
    assert refined < 0.003  # ...but its fixed point is


def test_first_order_dpmpp_2m_inversion_is_ddim_inversion_on_its_timesteps():
    image = flow(z_field(5), ABAR[0]).float()
    ours = D.dpmpp_2m_invert(gaussian_denoiser, image, *cond(), steps=8)
    ddim = D.ddim_invert_fixed_point(gaussian_denoiser, image, *cond(), steps="logsnr8", iterations=0)
    torch.testing.assert_close(ours, ddim, atol=1e-5, rtol=1e-5)  # x_T grows to ~14: float32 round-off
    assert not torch.allclose(ours, D.dpmpp_2m_invert(gaussian_denoiser, image, *cond(), steps=8, order=2), atol=1e-3)
    with pytest.raises(ValueError, match="order"):
        D.dpmpp_2m_invert(gaussian_denoiser, image, *cond(), steps=8, order=3)


def test_fixed_point_inversion_with_no_iterations_is_ddim_inversion():
    # plain DDIM inversion without the official extra step to abar = 0
    image = flow(z_field(5), ABAR[0]).float()
    ours = D.ddim_invert_fixed_point(gaussian_denoiser, image, *cond(), steps=10, iterations=0)
    seen = []
    D.ddim_invert(gaussian_denoiser, image, *cond(), steps=10, callback=lambda s, n, x, x0: seen.append(x))
    torch.testing.assert_close(ours, seen[-2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="iterations"):
        D.ddim_invert_fixed_point(gaussian_denoiser, image, *cond(), steps=10, iterations=-1)


@pytest.mark.parametrize("fn, calls", [(D.ddim_sample, 6), (D.ddim_invert, 6), (D.dpmpp_2m_sample, 6),
                                       (D.dpmpp_2m_invert, 5), (D.ddim_invert_fixed_point, 5)])
def test_callback_once_per_step(fn, calls):
    """The progress protocol (core.progress): done = 1 .. total, total = the steps, one UNet call per step."""
    seen, count = [], []

    def counted(*args):
        count.append(1)
        return gaussian_denoiser(*args)

    x = flow(z_field(6), ABAR[0]).float()
    args = (*cond(), x) if fn in (D.ddim_sample, D.dpmpp_2m_sample) else (x, *cond())
    out = fn(counted, *args, steps=6, callback=lambda done, total, x, x0: seen.append((done, total, x.clone(), x0)))
    assert [(d, n) for d, n, _, _ in seen] == [(i, calls) for i in range(1, calls + 1)]
    assert torch.equal(seen[-1][2], out)
    assert len(count) == (2 * calls if fn is D.ddim_invert_fixed_point else calls)
    if fn is D.dpmpp_2m_sample:
        assert torch.equal(out, seen[-1][3])  # the last step returns the clipped x0 itself
        assert out.abs().max() <= 1


def test_logsnr_timesteps():
    sched = D.base_schedule()
    for n in (2, 6, 10, 20, 40, 200):
        kept = D.logsnr_timesteps(sched, n)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == 950 and kept == sorted(set(kept))
    lam = D._half_log_snr(sched.alphas_cumprod[D.logsnr_timesteps(sched, 10)])
    steps = -np.diff(lam)
    assert steps.max() / steps.min() < 1.3  # nearly equal log-SNR steps (integer timesteps)
    assert D.respace(sched, "logsnr10").timesteps.tolist() == D.logsnr_timesteps(sched, 10)
    assert D.logsnr_timesteps(sched, 1) == [950]
    with pytest.raises(ValueError, match="between 1 and"):
        D.logsnr_timesteps(sched, 0)


def test_registry():
    assert D.sampler_functions("ddim") == (D.ddim_sample, D.ddim_invert)
    assert D.sampler_functions("dpmpp_2m") == (D.dpmpp_2m_sample, D.dpmpp_2m_invert)
    with pytest.raises(ValueError, match="'ddim', 'dpmpp_2m'"):
        D.sampler_functions("euler")
    for name, preset in SAMPLING_PRESETS.items():
        assert set(preset) == {"sampler", "steps", "cache_interval"}, name
        D.sampler_functions(preset["sampler"])
    assert SAMPLING_PRESETS["official"] == {"sampler": "ddim", "steps": 20, "cache_interval": 1}


def test_solver_input_validation(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    buffers, code, noise = ref["physic_cond"], ref["detail_cond"], ref["noise"]
    with pytest.raises(ValueError, match="noise must be"):
        D.dpmpp_2m_sample(tiny_model, buffers, code, noise[..., :32], steps=2)
    with pytest.raises(ValueError, match="image must be"):
        D.dpmpp_2m_invert(tiny_model, noise[..., :32], buffers, code, steps=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        D.dpmpp_2m_sample(FeatureCache(tiny_model, 2), buffers[..., :62], code, noise[..., :62], steps=2)


# ---- feature caching on the official tiny checkpoint -------------------------------------------

def _count_deep(model):
    calls = []
    handle = model.denoisingUNet.middle_block.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("sample", [D.ddim_sample, D.dpmpp_2m_sample])
def test_cache_interval_one_is_no_cache(tiny_model, dr_ref, sample):
    ref = dr_ref("tiny_ddim.pt")
    args = (ref["physic_cond"], ref["detail_cond"], ref["noise"])
    assert torch.equal(sample(FeatureCache(tiny_model, 1), *args, steps=5), sample(tiny_model, *args, steps=5))


def test_cache_skips_the_deep_path_and_stays_close(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    args = (ref["physic_cond"], ref["detail_cond"], ref["noise"])
    # unclipped: this random-weight checkpoint's clipped outputs sit at +-1, where any change flips a sign
    plain = D.ddim_sample(tiny_model, *args, steps=10, clip=False)
    cache = FeatureCache(tiny_model, 3)
    deep, handle = _count_deep(tiny_model)
    try:
        cached = D.ddim_sample(cache, *args, steps=10, clip=False)
    finally:
        handle.remove()
    assert len(deep) == cache.full_calls == 4 and cache.cached_calls == 6  # steps 0, 3, 6, 9 are full
    assert not torch.equal(cached, plain)
    scale = plain.abs().max()
    assert (cached - plain).abs().max() < 0.05 * scale  # measured 0.031 (interval 2: 0.024)


def test_cached_call_is_the_shallow_path_over_stored_deep_features(tiny_model, dr_ref):
    # independent route: the plain forward pass with a hook that swaps in the stored deep features
    ref = dr_ref("tiny_ddim.pt")
    unet = tiny_model.denoisingUNet
    x1, x2 = ref["noise"], ref["noise"] * 0.9 + 0.1
    t1, t2 = torch.full((1,), 900), torch.full((1,), 800)
    buffers, code = ref["physic_cond"], ref["detail_cond"]
    cache = FeatureCache(tiny_model, 2, shallow=2)
    stored = []
    feeder = unet.output_blocks[len(unet.output_blocks) - 3]  # its output enters output block -2
    handle = feeder.register_forward_hook(lambda module, inputs, output: stored.append(output))
    try:
        cache.denoise(x1, t1, buffers, code)
        cached = cache.denoise(x2, t2, buffers, code)
        assert len(stored) == 1  # the cached call did not run the deep path
        handle.remove()
        handle = feeder.register_forward_hook(lambda module, inputs, output: stored[0])
        expected = tiny_model.denoise(x2, t2, buffers, code)
    finally:
        handle.remove()
    torch.testing.assert_close(cached, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(cached, tiny_model.denoise(x2, t2, buffers, code), atol=1e-4)


def test_cache_restarts_when_the_run_turns_or_the_conditioning_changes(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    buffers, code = ref["physic_cond"], ref["detail_cond"]
    cache = FeatureCache(tiny_model, 4)
    x_t = D.ddim_invert(cache, ref["inv_x_start"], buffers, code, steps=6)  # full at calls 0, 4
    assert (cache.full_calls, cache.cached_calls) == (2, 4)
    D.ddim_sample(cache, buffers, code, x_t, steps=6)  # t turns at 950 -> 950: full at 0, 4
    assert (cache.full_calls, cache.cached_calls) == (4, 8)
    D.ddim_sample(cache, buffers.flip(0), code, x_t, steps=2)  # other buffers: a new run
    assert (cache.full_calls, cache.cached_calls) == (5, 9)
    with pytest.raises(ValueError, match="interval"):
        FeatureCache(tiny_model, 0)
    with pytest.raises(TypeError, match="DiffusionRig"):
        FeatureCache(lambda *a: a[0], 2)


def test_forward_split_without_cache_is_the_forward_pass(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    unet, t = tiny_model.denoisingUNet, torch.full((1,), 500)
    args = (ref["noise"], t, ref["physic_cond"], ref["detail_cond"])
    out, deep = unet.forward_split(*args, shallow=1)
    assert torch.equal(out, unet(*args))
    again, _ = unet.forward_split(*args, shallow=1, deep=deep)
    assert torch.equal(again, out)  # same x and t: the shallow path over its own deep features

"""Schedules, DDIM sampling and inversion, and the p2 loss against the official outputs."""

import numpy as np
import pytest
import torch

from comfy_diffusionrig import ddim_invert, ddim_sample, p2_loss
from comfy_diffusionrig.model import diffusion as D

# README tolerances for an independent CPU fp32 implementation (the reference itself moves by
# up to 9e-5 / 3e-4 between 1 and 2 threads on these trajectories):
TRAJ_ATOL = 2e-4  # ddim10 trajectory
INV_ATOL = 2e-3  # inversion + reconstruction
NOCLIP_RTOL = 1e-5  # unclipped runs grow to ~260: relative to the max
LOSS_TOL = 1e-5


def test_base_schedule_is_exact(dr_ref):
    ref = dr_ref("tiny_loss.pt")
    sched = D.base_schedule()
    assert np.array_equal(sched.betas, ref["betas"].numpy())
    assert np.array_equal(sched.alphas_cumprod, ref["alphas_cumprod"].numpy())
    assert np.array_equal(1.0 / (1 - sched.alphas_cumprod) - 1, ref["snr"].numpy())


def test_ddim10_respacing_is_exact(dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    sched = D.respace(D.base_schedule(), "ddim10")
    assert sched.timesteps.tolist() == ref["timestep_map"].tolist()
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next"):
        assert np.array_equal(getattr(sched, name), np.asarray(ref[f"spaced_{name}"])), name


def test_ddim20_samples_950_down_to_0():
    assert D.space_timesteps(1000, 20) == list(range(0, 1000, 50))
    assert D.space_timesteps(1000, "ddim20") == list(range(0, 1000, 50))
    assert D.space_timesteps(10, 3) == [0, 4, 8]  # stride 4
    # no integer stride gives 6 of 10 steps: the official even sections (stride 1.8, rounded)
    assert D.space_timesteps(10, 6) == [0, 2, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="integer stride"):
        D.space_timesteps(10, "ddim6")
    with pytest.raises(ValueError):
        D.space_timesteps(1000, 0)


def _run(model, ref, **kw):
    xs, x0s = [], []
    out = ddim_sample(model, ref["physic_cond"], ref["detail_cond"], ref["noise"], steps=10,
                      callback=lambda step, total, x, x0: (xs.append(x.clone()), x0s.append(x0.clone())), **kw)
    return out, torch.stack(xs), torch.stack(x0s)


def test_ddim10_trajectory_with_clipping(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    out, xs, x0s = _run(tiny_model, ref)
    torch.testing.assert_close(xs, ref["steps_sample"], atol=TRAJ_ATOL, rtol=0)
    torch.testing.assert_close(x0s, ref["steps_pred_xstart"], atol=TRAJ_ATOL, rtol=0)
    torch.testing.assert_close(out, ref["sample"], atol=TRAJ_ATOL, rtol=0)
    # last step has abar_prev = 1: the output is the clamped x0 itself
    assert torch.equal(out, x0s[-1])


def test_ddim10_without_clipping(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    out, _, _ = _run(tiny_model, ref, clip=False)
    scale = ref["sample_noclip"].abs().max().item()
    assert scale > 100  # the unclipped model path really is exercised
    torch.testing.assert_close(out, ref["sample_noclip"], atol=NOCLIP_RTOL * scale, rtol=0)


@pytest.mark.parametrize("clip", [True, False])
def test_inversion_and_reconstruction(tiny_model, dr_ref, clip):
    ref = dr_ref("tiny_ddim.pt")
    steps = []
    x_t = ddim_invert(tiny_model, ref["inv_x_start"], ref["physic_cond"], ref["detail_cond"], steps=10, clip=clip,
                      callback=lambda step, total, x, x0: steps.append(x.clone()))
    recon = ddim_sample(tiny_model, ref["physic_cond"], ref["detail_cond"], x_t, steps=10, clip=clip)
    if clip:
        torch.testing.assert_close(torch.stack(steps), ref["inv_steps_sample"], atol=INV_ATOL, rtol=0)
        torch.testing.assert_close(x_t, ref["inv_x_T"], atol=INV_ATOL, rtol=0)
        torch.testing.assert_close(recon, ref["inv_recon"], atol=INV_ATOL, rtol=0)
    else:
        for ours, theirs in ((x_t, ref["inv_x_T_noclip"]), (recon, ref["inv_recon_noclip"])):
            torch.testing.assert_close(ours, theirs, atol=max(INV_ATOL, NOCLIP_RTOL * theirs.abs().max().item()), rtol=0)
    assert len(steps) == 10


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_p2_loss_matches_official(tiny_model, dr_ref, mode):
    ref = dr_ref("tiny_loss.pt")
    model = tiny_model
    try:
        getattr(model, mode)()  # train mode: the encoder's BatchNorm uses batch statistics
        with torch.no_grad():
            loss = p2_loss(model, ref["x_start"], ref["physic_cond"], ref["t"], ref["noise"])
            code = model.encode(ref["x_start"])
    finally:
        model.load_state_dict(dr_ref("tiny_model.pt"))  # train-mode BN updated running stats
        model.eval()
    torch.testing.assert_close(loss, ref[f"{mode}_loss"], atol=LOSS_TOL, rtol=LOSS_TOL)
    torch.testing.assert_close(code, ref[f"{mode}_detail_cond"], atol=LOSS_TOL, rtol=LOSS_TOL)
    # with k = gamma = 1 the weight is exactly 1 - abar[t]
    weights = D.p2_weights(model)
    np.testing.assert_allclose(weights, 1 - D.base_schedule().alphas_cumprod, rtol=1e-12)
    np.testing.assert_array_equal(weights, ref["p2_weight"].numpy())


def test_p2_loss_has_gradients_only_where_expected(tiny_model, dr_ref):
    ref = dr_ref("tiny_loss.pt")
    code = tiny_model.encode(ref["x_start"]).detach()
    loss = p2_loss(tiny_model, ref["x_start"], ref["physic_cond"], ref["t"], ref["noise"], code=code)
    loss.mean().backward()
    unet_grads = [p.grad for p in tiny_model.denoisingUNet.parameters()]
    assert all(g is not None for g in unet_grads)
    assert all(p.grad is None for p in tiny_model.encoder.parameters())
    tiny_model.zero_grad(set_to_none=True)


def test_shared_noise_broadcasts_and_batch_is_independent(tiny_model, dr_ref):
    ref = dr_ref("tiny_io.pt")
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batched = ddim_sample(tiny_model, ref["physic_cond"], ref["detail_cond"], noise, steps=3)
    single = ddim_sample(tiny_model, ref["physic_cond"][1:], ref["detail_cond"][1:], noise, steps=3)
    assert batched.shape == (2, 3, 64, 64)
    # batch size changes the conv kernels: equal within the trajectory tolerance
    torch.testing.assert_close(batched[1:], single, atol=TRAJ_ATOL, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_eta_uses_the_generator(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    args = (tiny_model, ref["physic_cond"], ref["detail_cond"], ref["noise"])
    a = ddim_sample(*args, steps=4, eta=1.0, clip=False, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(*args, steps=4, eta=1.0, clip=False, generator=torch.Generator().manual_seed(1))
    c = ddim_sample(*args, steps=4, eta=1.0, clip=False, generator=torch.Generator().manual_seed(2))
    d = ddim_sample(*args, steps=4, eta=0.0, clip=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, d)


def test_callback_can_stop_sampling(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    seen = []

    class Stop(Exception):
        pass

    def callback(done, total, x, x0):  # core.progress: done counts the finished steps, 1..total
        seen.append((done, total))
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        ddim_sample(tiny_model, ref["physic_cond"], ref["detail_cond"], ref["noise"], steps=10, callback=callback)
    assert seen == [(1, 10), (2, 10)]


def test_bad_sampler_inputs(tiny_model, dr_ref):
    ref = dr_ref("tiny_ddim.pt")
    buffers, code, noise = ref["physic_cond"], ref["detail_cond"], ref["noise"]
    with pytest.raises(ValueError, match="NaN"):
        ddim_sample(tiny_model, buffers, code, torch.full_like(noise, float("inf")), steps=2)
    with pytest.raises(ValueError, match="NaN"):
        ddim_sample(tiny_model, buffers.clone().fill_(float("nan")), code, noise, steps=2)
    with pytest.raises(ValueError, match="9 channels"):
        ddim_sample(tiny_model, buffers[:, :6], code, noise, steps=2)
    with pytest.raises(ValueError, match="multiples of 4"):
        ddim_sample(tiny_model, buffers[..., :62], code, noise[..., :62], steps=2)
    with pytest.raises(ValueError, match="noise must be"):
        ddim_sample(tiny_model, buffers, code, noise[..., :32], steps=2)
    with pytest.raises(ValueError, match="code must be"):
        ddim_sample(tiny_model, buffers, code[0], noise, steps=2)

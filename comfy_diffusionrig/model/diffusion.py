"""Noise schedule, samplers and inversions (DDIM, DPM-Solver++(2M)), and the p2-weighted training loss.

Samplers are plain functions over a denoiser (anything with `.denoise(x_t, t, buffers, code)`
or a callable with that signature) and report progress through the library's one protocol
(`core.progress`): `callback(done, total, x=x_t, x0=x0)` after each step, done = 1 .. total;
raise in it to stop. Schedule arithmetic follows the official guided-diffusion
code: coefficients are float64 numpy arrays, gathered at a timestep and cast to float32
before they touch float32 tensors, so results match the reference to float32 round-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.progress import Callback, notify
from .sampler_presets import SAMPLER_NAMES


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) diffusion process; arrays are float64 over indices 0..N-1.

    `timesteps[i]` is the original integer timestep the model sees at index i.
    """

    betas: np.ndarray
    timesteps: np.ndarray

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas, axis=0)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def alphas_cumprod_next(self) -> np.ndarray:
        return np.append(self.alphas_cumprod[1:], 0.0)

    def __len__(self) -> int:
        return len(self.betas)


def betas_for(num_steps: int = 1000, kind: str = "linear") -> np.ndarray:
    """Base beta schedule, float64 [num_steps] (official `get_named_beta_schedule`)."""
    if kind == "linear":
        scale = 1000 / num_steps  # official: keeps the linear schedule's endpoints for any step count
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if kind == "cosine":
        def abar(s):
            return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

        steps = np.arange(num_steps, dtype=np.float64)
        return np.minimum(1 - abar((steps + 1) / num_steps) / abar(steps / num_steps), 0.999)
    raise ValueError(f"unknown noise schedule {kind!r}: use 'linear' or 'cosine'")


def base_schedule(num_steps: int = 1000, kind: str = "linear") -> Schedule:
    """The full training schedule. As the official code, even the unrespaced process is a
    SpacedDiffusion keeping every step, so its betas are re-derived from alphas_cumprod
    (differences of ~1e-16 from the linspace betas)."""
    return respace(Schedule(betas_for(num_steps, kind), np.arange(num_steps, dtype=np.int64)), num_steps)


def space_timesteps(num_timesteps: int, spacing: int | str) -> list[int]:
    """Timesteps kept by respacing, ascending.

    "ddimN" (or an int N): the stride-s set range(0, T, s) for the first integer s that gives
    exactly N steps (official DDIM striding: ddim20 keeps 0, 50, ..., 950). An int N with no
    such stride, or "a,b,c" section counts, use the official evenly spaced sections.
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        count = int(spacing[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {count} steps from {num_timesteps} with an integer stride")
    if isinstance(spacing, int):
        if not 1 <= spacing <= num_timesteps:
            raise ValueError(f"steps must be between 1 and {num_timesteps}, got {spacing}")
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == spacing:
                return list(range(0, num_timesteps, stride))
        counts = [spacing]
    else:
        counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def _half_log_snr(abar: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma), float64; +inf where abar = 1 (the clean image)."""
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(abar) - np.log1p(-abar))


def logsnr_timesteps(schedule: Schedule, count: int, top: float = 0.95) -> list[int]:
    """`count` integer timesteps from 0 to round(top * T), evenly spaced in log-SNR, ascending.

    The spacing DPM-Solver++ is analysed in: equal steps in lambda = log(alpha / sigma).
    top 0.95 starts where the official ddim20 starts (t = 950 of 1000). Timesteps that would
    round onto the same integer (near t = 0, where lambda is steep) move up one by one, so
    there are exactly `count`.
    """
    last = round(top * len(schedule))
    if not 1 <= count <= last + 1:
        raise ValueError(f"log-SNR spacing needs between 1 and {last + 1} steps, got {count}")
    if count == 1:
        return [last]
    lam = _half_log_snr(schedule.alphas_cumprod[: last + 1])
    kept: list[int] = []
    for target in np.linspace(lam[0], lam[last], count):
        t = int(np.argmin(np.abs(lam - target)))
        kept.append(t if not kept or t > kept[-1] else kept[-1] + 1)
    if kept[-1] > last:
        raise ValueError(f"cannot place {count} distinct log-SNR steps below t = {last}")
    return kept


def respace(schedule: Schedule, spacing: int | str) -> Schedule:
    """Keep a subset of timesteps; new betas 1 - abar[t_k] / abar[t_(k-1)] (official SpacedDiffusion).

    spacing: as `space_timesteps`, or "logsnrN" for `logsnr_timesteps(schedule, N)`.
    """
    if isinstance(spacing, str) and spacing.startswith("logsnr"):
        keep = logsnr_timesteps(schedule, int(spacing[6:]))
    else:
        keep = space_timesteps(len(schedule), spacing)
    abar = schedule.alphas_cumprod
    betas, last = [], 1.0
    for t in keep:
        betas.append(1.0 - abar[t] / last)
        last = abar[t]
    return Schedule(np.array(betas, dtype=np.float64), schedule.timesteps[keep])


def model_schedule(model) -> Schedule:
    """The 1000-step schedule a model was trained with (from its config when it has one)."""
    cfg = getattr(model, "config", None)
    return base_schedule(getattr(cfg, "diffusion_steps", 1000), getattr(cfg, "noise_schedule", "linear"))


def _f32(value: float, device) -> torch.Tensor:
    """A float64 schedule coefficient as the float32 scalar the official code multiplies with.

    Filled on the device (rounded to nearest, as a float64 -> float32 cast): no copy from the host,
    which on a GPU would wait for the GPU in every sampler step."""
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _gather(arr: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """arr[t] as float32 [B, 1, 1, 1] (official `_extract_into_tensor`)."""
    return torch.from_numpy(arr).to(t.device)[t].float()[:, None, None, None]


def _denoiser(model) -> Callable:
    return getattr(model, "denoise", model)


def _prepare(model, buffers: torch.Tensor, code: torch.Tensor, x: torch.Tensor, x_name: str):
    """Validate sampler inputs and broadcast batch-1 code/x to the buffers' batch."""
    if buffers.ndim != 4:
        raise ValueError(f"buffers must be [B, 9, H, W] (rendered|normal|albedo), got shape {tuple(buffers.shape)}")
    cfg = getattr(model, "config", None)
    want = getattr(cfg, "in_channels", 12) - 3
    if buffers.shape[1] != want:
        raise ValueError(f"buffers must have {want} channels (rendered|normal|albedo), got {buffers.shape[1]}")
    b, _, h, w = buffers.shape
    if hasattr(model, "check_image_size"):
        model.check_image_size(h, w, "buffers")
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (h, w) or x.shape[0] not in (1, b):
        raise ValueError(f"{x_name} must be [B or 1, 3, {h}, {w}] to match the buffers, got shape {tuple(x.shape)}")
    if code.ndim != 2 or code.shape[0] not in (1, b):
        raise ValueError(f"code must be [B or 1, latent_dim], got shape {tuple(code.shape)}")
    for name, tensor in (("buffers", buffers), ("code", code), (x_name, x)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values; re-run the node that produced it")
    device = getattr(model, "device", x.device)
    buffers = buffers.to(device=device, dtype=torch.float32)
    code = code.to(device=device, dtype=torch.float32).expand(b, -1)
    x = x.to(device=device, dtype=torch.float32).expand(b, -1, -1, -1).clone()
    return buffers, code, x


def _predict_x0_eps(denoise, x, t_model, buffers, code, c_recip, c_recipm1, clip):
    """Model call, x0 prediction (clamped when clip) and eps re-derived from that x0."""
    eps = denoise(x, t_model, buffers, code).float()
    x0 = c_recip * x - c_recipm1 * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    return x0, (c_recip * x - x0) / c_recipm1


def _fresh_noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x, from one generator, or one generator per row (a list)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddim_sample(model, buffers: torch.Tensor, code: torch.Tensor, noise: torch.Tensor, steps: int | str = 20,
                eta: float = 0.0, clip: bool = True, callback: Callback | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """DDIM sampling from noise x_T to x_0.

    buffers [B,9,H,W], code [B|1,latent], noise [B|1,3,H,W] -> x0 [B,3,H,W] float32 in [-1,1] (when clip).
    steps=20 is the official "ddim20" (model t = 950, 900, ..., 0). eta>0 adds noise drawn
    from `generator` (or the global RNG; a list of generators gives each row its own stream).
    `callback(done, total, x=, x0=)` after each step (`core.progress`).
    """
    buffers, code, x = _prepare(model, buffers, code, noise, "noise")
    sched = respace(model_schedule(model), steps)
    abar, abar_prev = sched.alphas_cumprod, sched.alphas_cumprod_prev
    denoise, total, dev = _denoiser(model), len(sched), x.device
    for step, i in enumerate(reversed(range(total))):
        t_model = torch.full((x.shape[0],), int(sched.timesteps[i]), dtype=torch.int64, device=dev)
        x0, eps = _predict_x0_eps(denoise, x, t_model, buffers, code, _f32(np.sqrt(1 / abar[i]), dev),
                                  _f32(np.sqrt(1 / abar[i] - 1), dev), clip)
        a, a_prev = _f32(abar[i], dev), _f32(abar_prev[i], dev)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0 and i > 0:
            x = x + sigma * _fresh_noise(x, generator)
        notify(callback, step + 1, total, x=x, x0=x0)
    return x


@torch.no_grad()
def ddim_invert(model, image: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor, steps: int | str = 20,
                clip: bool = True, callback: Callback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of a clean image to x_T (official `ddim_reverse_sample_loop`).

    image [B|1,3,H,W] in [-1,1] -> x_T [B,3,H,W]; sampling from x_T with the same buffers,
    code and steps reconstructs the image. `callback(done, total, x=, x0=)` after each step.
    """
    buffers, code, x = _prepare(model, buffers, code, image, "image")
    sched = respace(model_schedule(model), steps)
    abar, abar_next = sched.alphas_cumprod, sched.alphas_cumprod_next
    denoise, total, dev = _denoiser(model), len(sched), x.device
    for i in range(total):
        t_model = torch.full((x.shape[0],), int(sched.timesteps[i]), dtype=torch.int64, device=dev)
        x0, eps = _predict_x0_eps(denoise, x, t_model, buffers, code, _f32(np.sqrt(1 / abar[i]), dev),
                                  _f32(np.sqrt(1 / abar[i] - 1), dev), clip)
        a_next = _f32(abar_next[i], dev)
        x = x0 * torch.sqrt(a_next) + torch.sqrt(1 - a_next) * eps
        notify(callback, i + 1, total, x=x, x0=x0)
    return x


def _dpm_schedule(model, steps: int | str) -> Schedule:
    """The respaced schedule of the DPM-Solver++ functions: an int N means "logsnrN"."""
    return respace(model_schedule(model), f"logsnr{steps}" if isinstance(steps, int) else steps)


def _data_step(x, x0, x0_prev, a, a_to, lam, lam_to, lam_prev, sigma_noise, dev):
    """One DPM-Solver++(2M) step from abar `a` to `a_to` on the data prediction (x0).

    First order (x0_prev None, or a step to the clean image) it is exactly the DDIM step
    alpha_to * x0 + sqrt(1 - a_to - s^2) * eps, s = sigma_noise. Second order, x0 in the data
    term is extrapolated linearly in lambda from the previous step's x0: x0 + (x0 - x0_prev) * h / (2 h_prev).
    The same formula runs backwards (a_to < a) for the inversion.
    """
    keep = np.sqrt(max(1 - a_to - sigma_noise**2, 0.0))  # how much of the current noise direction survives
    coef_x = keep / np.sqrt(1 - a)
    coef_d = np.sqrt(a_to) - coef_x * np.sqrt(a)
    if x0_prev is not None and np.isfinite(lam_to):
        x0 = x0 + _f32((lam_to - lam) / (2 * (lam - lam_prev)), dev) * (x0 - x0_prev)
    return _f32(coef_x, dev) * x + _f32(coef_d, dev) * x0


@torch.no_grad()
def dpmpp_2m_sample(model, buffers: torch.Tensor, code: torch.Tensor, noise: torch.Tensor, steps: int | str = 10,
                    eta: float = 0.0, clip: bool = True, callback: Callback | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) sampling from noise x_T to x_0: second order, one UNet call per step.

    buffers [B,9,H,W], code [B|1,latent], noise [B|1,3,H,W] -> x0 [B,3,H,W] float32 in [-1,1]
    (when clip), as `ddim_sample`. Each step reuses the previous step's x0 prediction to cancel
    DDIM's first-order error: about half the steps for DDIM's accuracy. An int `steps` takes
    timesteps evenly spaced in log-SNR ("logsnrN", from t = 950 down to 0: integer timesteps the
    model was trained on); any `respace` spacing string works too ("ddim10", the official
    stride, has uneven log-SNR steps: benchmarks/bench_quality.py compares the spacings).
    x0 is clipped as DDIM's `clip`. The first step and the last (to the clean image) are DDIM steps. eta as
    DDIM's (0 deterministic; 1 the DDPM noise level, drawn from `generator`); with eta > 0 the
    correction applies to the data term only (the midpoint SDE form).
    `callback(done, total, x=, x0=)` after each step.
    """
    buffers, code, x = _prepare(model, buffers, code, noise, "noise")
    sched = _dpm_schedule(model, steps)
    abar, abar_prev = sched.alphas_cumprod, sched.alphas_cumprod_prev
    lam, lam_to = _half_log_snr(abar), _half_log_snr(abar_prev)
    denoise, total, dev = _denoiser(model), len(sched), x.device
    x0_prev = None
    for step, i in enumerate(reversed(range(total))):
        t_model = torch.full((x.shape[0],), int(sched.timesteps[i]), dtype=torch.int64, device=dev)
        x0, _ = _predict_x0_eps(denoise, x, t_model, buffers, code, _f32(np.sqrt(1 / abar[i]), dev),
                                _f32(np.sqrt(1 / abar[i] - 1), dev), clip)
        a, a_prev = abar[i], abar_prev[i]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = _data_step(x, x0, x0_prev, a, a_prev, lam[i], lam_to[i],
                       lam[i + 1] if i + 1 < total else None, sigma, dev)
        if eta > 0 and i > 0:
            x = x + _f32(sigma, dev) * _fresh_noise(x, generator)
        x0_prev = x0
        notify(callback, step + 1, total, x=x, x0=x0)
    return x


@torch.no_grad()
def dpmpp_2m_invert(model, image: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor, steps: int | str = 10,
                    clip: bool = True, callback: Callback | None = None, order: int = 1) -> torch.Tensor:
    """The inversion paired with `dpmpp_2m_sample`: a clean image to the x_T that sampling starts from.

    image [B|1,3,H,W] in [-1,1] -> x_T [B,3,H,W]; `steps` as `dpmpp_2m_sample` (use the same
    value for both). It climbs from the image (taken as x at the first kept timestep, as the
    official DDIM inversion does) to the last kept timestep, where sampling starts: steps - 1
    UNet calls (the official DDIM inversion takes one more step, to abar = 0).
    order 1 (default, for edits): DDIM steps. order 2: DPM-Solver++(2M) run backwards, a far
    more exact inverse (reconstruction 43 dB instead of 34 at 10 steps in
    benchmarks/bench_quality.py) that edits worse (about -1 dB against the true photo): an
    exact x_T keeps the source's light and pose, and the edited buffers move it less.
    `callback(done, total, x=, x0=)` after each of the steps - 1 steps.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (DDIM steps, for edits) or 2 (DPM-Solver++(2M)), got {order}")
    buffers, code, x = _prepare(model, buffers, code, image, "image")
    sched = _dpm_schedule(model, steps)
    abar = sched.alphas_cumprod
    lam = _half_log_snr(abar)
    denoise, total, dev = _denoiser(model), len(sched) - 1, x.device
    x0_prev = None
    for i in range(total):
        t_model = torch.full((x.shape[0],), int(sched.timesteps[i]), dtype=torch.int64, device=dev)
        x0, _ = _predict_x0_eps(denoise, x, t_model, buffers, code, _f32(np.sqrt(1 / abar[i]), dev),
                                _f32(np.sqrt(1 / abar[i] - 1), dev), clip)
        x = _data_step(x, x0, x0_prev, abar[i], abar[i + 1], lam[i], lam[i + 1], lam[i - 1] if i else None, 0.0, dev)
        x0_prev = x0 if order == 2 else None
        notify(callback, i + 1, total, x=x, x0=x0)
    return x


@torch.no_grad()
def ddim_invert_fixed_point(model, image: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor,
                            steps: int | str = 10, clip: bool = True, callback: Callback | None = None,
                            iterations: int = 1) -> torch.Tensor:
    """DDIM inversion refined by fixed-point iterations so that DDIM sampling retraces it.

    A DDIM step from x_(i+1) to x_i evaluates the model at x_(i+1); plain inversion uses x_i
    instead. Each iteration re-evaluates the model at the current guess of x_(i+1) and solves
    the sampling step for it: x_(i+1) = alpha_(i+1) * (x_i - sigma_i * eps) / alpha_i + sigma_(i+1) * eps.
    Costs (1 + iterations) UNet calls per step, steps - 1 steps (ends at the last kept timestep,
    where sampling starts). image [B|1,3,H,W] in [-1,1] -> x_T [B,3,H,W].
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    buffers, code, x = _prepare(model, buffers, code, image, "image")
    sched = respace(model_schedule(model), steps)
    abar = sched.alphas_cumprod
    denoise, total, dev = _denoiser(model), len(sched) - 1, x.device

    def predict(x_t, i):
        t_model = torch.full((x_t.shape[0],), int(sched.timesteps[i]), dtype=torch.int64, device=dev)
        return _predict_x0_eps(denoise, x_t, t_model, buffers, code, _f32(np.sqrt(1 / abar[i]), dev),
                               _f32(np.sqrt(1 / abar[i] - 1), dev), clip)

    for i in range(total):
        a, a_next = abar[i], abar[i + 1]
        x0, eps = predict(x, i)
        x_next = _f32(np.sqrt(a_next), dev) * x0 + _f32(np.sqrt(1 - a_next), dev) * eps
        for _ in range(iterations):
            x0, eps = predict(x_next, i + 1)
            x_next = (_f32(np.sqrt(a_next / a), dev) * (x - _f32(np.sqrt(1 - a), dev) * eps)
                      + _f32(np.sqrt(1 - a_next), dev) * eps)
        x = x_next
        notify(callback, i + 1, total, x=x, x0=x0)
    return x


def p2_weights(model) -> np.ndarray:
    """Per-timestep loss weight 1 / (k + snr)^gamma, float64 [T] (P2 weighting, official gamma=k=1)."""
    cfg = getattr(model, "config", None)
    abar = model_schedule(model).alphas_cumprod
    snr = 1.0 / (1 - abar) - 1  # official formula (same as abar / (1 - abar) up to rounding)
    return 1 / (getattr(cfg, "p2_k", 1.0) + snr) ** getattr(cfg, "p2_gamma", 1.0)


def p2_loss(model, x_start: torch.Tensor, buffers: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
            code: torch.Tensor | None = None) -> torch.Tensor:
    """P2-weighted noise-prediction loss per sample.

    x_start [B,3,H,W] in [-1,1], buffers [B,9,H,W], t int64 [B] in 0..999, noise [B,3,H,W]
    -> loss [B]. code None encodes x_start with the model's encoder (in the model's current
    train/eval mode, as the official training does).
    """
    if code is None:  # no NaN check per step (a GPU sync): TrainingData checked the album on the host
        code = model.encode(x_start, check_finite=False)
    abar = model_schedule(model).alphas_cumprod
    x_t = _gather(np.sqrt(abar), t) * x_start + _gather(np.sqrt(1.0 - abar), t) * noise
    eps = _denoiser(model)(x_t, t, buffers, code).float()
    return (_gather(p2_weights(model), t) * (noise - eps) ** 2).mean(dim=(1, 2, 3))


# name -> (sample, invert); the pair shares its timesteps, so an inversion is sampled back by its partner
SAMPLERS: dict[str, tuple[Callable, Callable]] = dict(zip(SAMPLER_NAMES, [
    (ddim_sample, ddim_invert),
    (dpmpp_2m_sample, dpmpp_2m_invert),
]))


def sampler_functions(name: str) -> tuple[Callable, Callable]:
    """(sample_fn, invert_fn) of a sampler name in SAMPLERS.

    "ddim": the official sampler and inversion (first order; 20 steps, 40 UNet calls per
    edit, is the reference). "dpmpp_2m": DPM-Solver++(2M) sampling, second order, on
    log-SNR-spaced timesteps, with DDIM-step inversion on the same timesteps; 8 steps (15 UNet
    calls per edit) edit as well as ddim20 and reconstruct better (see SAMPLING_PRESETS).
    """
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}") from None


def sampler_step_counts(model, name: str, steps: int | str) -> tuple[int, int]:
    """(inversion steps, sampling steps) of sampler `name` at `steps`: how many times each of its functions
    calls back (progress bars count them before the run)."""
    sampler_functions(name)
    if name == "dpmpp_2m":
        kept = len(_dpm_schedule(model, steps))
        return kept - 1, kept
    kept = len(respace(model_schedule(model), steps))
    return kept, kept

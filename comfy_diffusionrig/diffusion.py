"""Noise schedule, DDIM sampling and inversion, and the p2-weighted training loss.

Samplers are plain functions over a denoiser (anything with `.denoise(x_t, t, buffers, code)`
or a callable with that signature) and report progress through
`callback(step, total, x, x0)`. Schedule arithmetic follows the official guided-diffusion
code: coefficients are float64 numpy arrays, gathered at a timestep and cast to float32
before they touch float32 tensors, so results match the reference to float32 round-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


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


def respace(schedule: Schedule, spacing: int | str) -> Schedule:
    """Keep a subset of timesteps; new betas 1 - abar[t_k] / abar[t_(k-1)] (official SpacedDiffusion)."""
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
    """A float64 schedule coefficient as the float32 scalar the official code multiplies with."""
    return torch.tensor(float(value), dtype=torch.float64).to(device=device, dtype=torch.float32)


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
    from `generator` (or the global RNG; a list of generators gives each row its own stream). `callback(step, total, x, x0)` runs after each step.
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
        if callback is not None:
            callback(step, total, x, x0)
    return x


@torch.no_grad()
def ddim_invert(model, image: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor, steps: int | str = 20,
                clip: bool = True, callback: Callback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of a clean image to x_T (official `ddim_reverse_sample_loop`).

    image [B|1,3,H,W] in [-1,1] -> x_T [B,3,H,W]; sampling from x_T with the same buffers,
    code and steps reconstructs the image. `callback(step, total, x, x0)` after each step.
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
        if callback is not None:
            callback(i, total, x, x0)
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
    if code is None:
        code = model.encode(x_start)
    abar = model_schedule(model).alphas_cumprod
    x_t = _gather(np.sqrt(abar), t) * x_start + _gather(np.sqrt(1.0 - abar), t) * noise
    eps = _denoiser(model)(x_t, t, buffers, code).float()
    return (_gather(p2_weights(model), t) * (noise - eps) ** 2).mean(dim=(1, 2, 3))

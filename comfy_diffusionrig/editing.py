"""The DiffusionRig edit: invert each photo under its own buffers, then denoise under the edited ones.

One function, `edit_faces`, used by the Sampler node, the CLI (`pipeline.edit_photo`) and the
demo, so a batch of faces is handled in one place: every face is inverted under its own
buffers and global code, and every frame of a face starts from that face's x_T. A face in a
batch gives what it gives alone (up to batched round-off).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .model.diffusion import SAMPLERS, sampler_functions, sampler_step_counts

# callback(done, total, preview): done/total count face-steps (one UNet row-evaluation each) over
# inversion and sampling together; preview is the current x0 estimate of one face, [3, H, W] in [-1, 1].
EditCallback = Callable[[int, int, torch.Tensor], None]
STARTS = ("inversion", "noise")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def check_edit_settings(start: str, steps, eta, batch_size, sampler: str = "ddim", cache_interval=1) -> None:
    """Validate the sampler settings of an edit (cheap: call it before loading models or fitting faces)."""
    if start not in STARTS:
        raise ValueError(f"start must be 'inversion' or 'noise', got {start!r}")
    _positive_int(steps, "steps")
    _positive_int(batch_size, "batch_size")
    _positive_int(cache_interval, "cache_interval")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "dpmpp_2m" and steps < 2:
        raise ValueError("the dpmpp_2m sampler needs at least 2 steps")
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1, got {eta!r}")


def _rows(tensor: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """A [1, ...] or [n, ...] tensor as [n, ...]."""
    if tensor.shape[0] == n:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])
    raise ValueError(f"{what} has {tensor.shape[0]} rows for {n} faces; give one per face (or one for all)")


@torch.no_grad()
def edit_faces(model, images: torch.Tensor | None, source_buffers: torch.Tensor | None,
               target_buffers: torch.Tensor, codes: torch.Tensor, *, start: str = "inversion", steps: int = 20,
               eta: float = 0.0, seed: int = 0, batch_size: int = 4,
               callback: EditCallback | None = None, sampler: str = "ddim", cache_interval: int = 1) -> torch.Tensor:
    """Edited faces: DDIM from each face's inversion (or from seeded noise) under the target buffers.

    images [N,3,S,S] in [-1,1] and source_buffers [N,9,S,S] (rendered|normal|albedo of the
    unedited fits; both may be None for start = "noise", then N = rows of codes);
    codes [N,64] or [1,64] (shared); target_buffers [N*F,9,S,S], face-major: rows
    i*F .. i*F+F-1 are the F frames of face i. -> [N*F,3,S,S] float32 in [-1,1] on the CPU.

    start "inversion": every face is DDIM-inverted under its own buffers and code (keeps the
    photo's background and details); "noise": one noise from `seed`, the same for every face
    and frame (so frames of a sweep stay consistent). eta > 0 adds per-step noise, also drawn
    from `seed` for each row, so a face's frames share it and a batch equals its faces alone.
    Faces and rows are processed `batch_size` at a time. `callback(done, total, preview)`
    reports inversion and sampling as one count of face-steps.

    sampler: "ddim" (official, the reference) or "dpmpp_2m" (DPM-Solver++(2M) with its matching
    inversion: second order, about half the steps for DDIM's accuracy); cache_interval N > 1
    reuses the UNet's deep features for N - 1 of every N calls (`feature_cache.FeatureCache`:
    faster, drifts a little). `model.sampler_presets.SAMPLING_PRESETS` names measured combinations.
    """
    check_edit_settings(start, steps, eta, batch_size, sampler, cache_interval)
    if target_buffers.ndim != 4 or target_buffers.shape[0] == 0:
        raise ValueError(f"target_buffers must be a non-empty [N*F, 9, H, W] batch, got {tuple(target_buffers.shape)}")
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be [N or 1, latent_dim], got {tuple(codes.shape)}")
    latent = getattr(getattr(model, "config", None), "latent_dim", codes.shape[1])
    if codes.shape[1] != latent:
        raise ValueError(f"the global codes have {codes.shape[1]} values but this model uses {latent}; encode the "
                         "faces with the same model (Encode Global Code)")
    if start == "inversion":
        if images is None or source_buffers is None:
            raise ValueError("start = 'inversion' needs the source images and their buffers")
        n = images.shape[0]
        if n == 0 or source_buffers.shape[0] != n:
            raise ValueError(f"{n} source images but {source_buffers.shape[0]} source buffers; give one buffer "
                             "per face")
    else:
        n = images.shape[0] if images is not None else codes.shape[0]
    rows = target_buffers.shape[0]
    if rows % n:
        raise ValueError(f"{rows} target buffers for {n} faces: give F frames per face, face-major "
                         "(all frames of face 1, then of face 2, ...)")
    frames = rows // n
    codes = _rows(codes, n, "codes")
    size = tuple(target_buffers.shape[-2:])
    sample_fn, invert_fn = sampler_functions(sampler)
    invert_steps, sample_steps = sampler_step_counts(model, sampler, steps)
    total = (n * invert_steps if start == "inversion" else 0) + rows * sample_steps
    done = 0

    def denoiser():  # a fresh feature cache per run: cached features never cross faces or runs
        if cache_interval == 1:
            return model
        from .model.feature_cache import FeatureCache

        return FeatureCache(model, cache_interval)

    def progress(count: int):
        def report(step, steps_total, x, x0):
            nonlocal done
            done += count
            if callback is not None:
                callback(done, total, x0[0])
        return report

    device = getattr(model, "device", target_buffers.device)
    if start == "inversion":
        starts = []
        for first in range(0, n, batch_size):
            part = slice(first, first + batch_size)
            count = len(range(n)[part])
            starts.append(invert_fn(denoiser(), images[part], source_buffers[part], codes[part], steps=steps,
                                    callback=progress(count)))
        x_start = torch.cat(starts)
    else:
        noise = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
        x_start = noise.expand(n, -1, -1, -1)
    face_of_row = torch.arange(rows) // frames
    outputs = []
    for first in range(0, rows, batch_size):
        part = face_of_row[first:first + batch_size]
        generators = [torch.Generator(device).manual_seed(seed) for _ in part] if eta > 0 else None
        outputs.append(sample_fn(denoiser(), target_buffers[first:first + batch_size], codes[part.to(codes.device)],
                                 x_start[part.to(x_start.device)], steps=steps, eta=eta, generator=generators,
                                 callback=progress(len(part))).float().cpu())
    return torch.cat(outputs)

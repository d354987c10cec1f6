"""The DiffusionRig edit: invert each photo under its own buffers, then denoise under the edited ones.

`invert_faces` inverts a batch of faces once; `edit_faces` samples edits from that inverted
start (or inverts first, through `invert_faces`, or starts from seeded noise). The Sampler and
Invert nodes, the CLI (`pipeline.edit_photo`) and the demo all go through these two, so a batch
of faces is handled in one place: every face is inverted under its own buffers and global
code, and every frame of a face starts from that face's x_T. A face in a batch gives what it
gives alone (up to batched round-off), and an edit from a kept inverted start is bit for bit
the edit that inverts first.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .core.progress import Callback, Tally
from .model.diffusion import SAMPLERS, sampler_functions, sampler_step_counts

# The edits' progress (`core.progress`): callback(done, total, preview=...) where done/total count face-steps
# (one face through one sampler step) over inversion and sampling together, and preview is the current x0
# estimate of one face, [3, H, W] in [-1, 1].
EditCallback = Callback
STARTS = ("inversion", "noise")
_FINGERPRINT_VALUES = 64  # values per weight tensor in a model's fingerprint


def model_fingerprint(model) -> str:
    """A digest of what a model computes: its class and config and, per weight tensor, its name, dtype, shape
    and 64 evenly spaced values. Other weights, another precision or another config give another digest;
    the same checkpoint loaded twice, or moved to another device, gives the same. A denoiser that is not a
    torch module is known by its identity."""
    digest = hashlib.sha256(f"{type(model).__qualname__}|{getattr(model, 'config', None)!r}".encode())
    if not isinstance(model, torch.nn.Module):
        digest.update(f"|object {id(model)}".encode())
        return digest.hexdigest()[:16]
    samples = []
    for name, tensor in model.state_dict().items():
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        count = tensor.numel()
        if count:
            k = min(count, _FINGERPRINT_VALUES)
            flat = torch.arange(k, device=tensor.device) * (count - 1) // max(k - 1, 1)
            samples.append(tensor.detach()[torch.unravel_index(flat, tensor.shape)].reshape(-1).to(torch.float64))
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _model_name(model) -> str:
    """A model in words, for messages: class, image size, precision and fingerprint."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    return " ".join(part for part in (type(model).__name__, f"{size} px" if size else "", dtype,
                                      f"weights {model_fingerprint(model)}") if part)


def _settings(sampler: str, steps, cache_interval: int) -> str:
    cache = "no feature cache" if cache_interval == 1 else f"cache_interval {cache_interval}"
    return f"sampler {sampler}, {steps} steps, {cache}"


@dataclass(frozen=True, eq=False)
class InvertedStart:
    """Faces inverted once by `invert_faces`, to sample many edits from (`edit_faces(start=...)`).

    x_t: [N, 3, S, S] float32 on the CPU, face i's x_T in row i. sampler, steps, cache_interval:
    the settings of the inversion; an edit from it must use the same, because sampling retraces
    the inversion's timesteps and the one-call edit inverts with the edit's own settings (eta
    and seed only touch the sampling, so they may change). model: `model_fingerprint` of the
    model it was inverted with, which must also be the edit's (same weights, config and
    precision); model_name says which, in words.
    """

    x_t: torch.Tensor
    sampler: str
    steps: int | str
    cache_interval: int
    model: str
    model_name: str

    @property
    def faces(self) -> int:
        return self.x_t.shape[0]

    def check(self, model, sampler: str, steps, cache_interval: int) -> None:
        """Refuse (ValueError, one line saying what to change) an edit that may not start here."""
        made, asked = _settings(self.sampler, self.steps, self.cache_interval), _settings(sampler, steps,
                                                                                         cache_interval)
        if made != asked:
            raise ValueError(f"the inverted start was made with {made}, but this edit asks for {asked}: give the "
                             "inversion and the edit the same sampler, steps and cache_interval (the same preset), "
                             "or invert again with these")
        if model_fingerprint(model) != self.model:
            raise ValueError(f"the inverted start was made with another model ({self.model_name}) than this edit's "
                             f"({_model_name(model)}): invert the faces again with this model")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def check_edit_settings(start, steps, eta, batch_size, sampler: str = "ddim", cache_interval=1) -> None:
    """Validate the sampler settings of an edit (cheap: call it before loading models or fitting faces).

    start: "inversion", "noise" or an `InvertedStart`."""
    if not isinstance(start, InvertedStart) and start not in STARTS:
        raise ValueError(f"start must be 'inversion', 'noise' or an inverted start from invert_faces, got {start!r}")
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


def _check_codes(model, codes: torch.Tensor) -> None:
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be [N or 1, latent_dim], got {tuple(codes.shape)}")
    latent = getattr(getattr(model, "config", None), "latent_dim", codes.shape[1])
    if codes.shape[1] != latent:
        raise ValueError(f"the global codes have {codes.shape[1]} values but this model uses {latent}; encode the "
                         "faces with the same model (Encode Global Code)")


def _check_sources(images: torch.Tensor | None, source_buffers: torch.Tensor | None) -> int:
    """The number of faces to invert."""
    if images is None or source_buffers is None:
        raise ValueError("start = 'inversion' needs the source images and their buffers")
    n = images.shape[0]
    if n == 0 or source_buffers.shape[0] != n:
        raise ValueError(f"{n} source images but {source_buffers.shape[0]} source buffers; give one buffer per face")
    return n


def _denoiser(model, cache_interval: int):
    """The model, or a fresh feature cache around it: cached features never cross faces or runs."""
    if cache_interval == 1:
        return model
    from .model.feature_cache import FeatureCache

    return FeatureCache(model, cache_interval)


@torch.no_grad()
def encode_faces(model, images: torch.Tensor) -> torch.Tensor:
    """The global codes of aligned faces, the `codes` of `invert_faces` / `edit_faces`: images [N,3,S,S] in
    [-1,1] -> [N, latent_dim] float32 on the CPU (the model's encoder, run where the model is)."""
    return model.encode(images.to(model.device)).float().cpu()


@torch.no_grad()
def invert_faces(model, images: torch.Tensor, source_buffers: torch.Tensor, codes: torch.Tensor, *, steps: int = 20,
                 sampler: str = "ddim", batch_size: int = 4, callback: EditCallback | None = None,
                 cache_interval: int = 1) -> InvertedStart:
    """Each face inverted under its own buffers and global code, once, to sample many edits from.

    images [N,3,S,S] in [-1,1], source_buffers [N,9,S,S] (rendered|normal|albedo of the unedited
    fits), codes [N,64] or [1,64] (shared). sampler, steps, cache_interval as `edit_faces` (the
    edits from it must use the same). Faces are inverted `batch_size` at a time;
    `callback(done, total, preview=)` counts the inversion's face-steps (`core.progress`; raise in it to cancel).
    -> InvertedStart (x_T [N,3,S,S] float32 on the CPU, with the settings and the model's fingerprint).
    """
    check_edit_settings("inversion", steps, 0.0, batch_size, sampler, cache_interval)
    n = _check_sources(images, source_buffers)
    _check_codes(model, codes)
    codes = _rows(codes, n, "codes")
    _, invert_fn = sampler_functions(sampler)
    tally = Tally(callback, n * sampler_step_counts(model, sampler, steps)[0])
    starts = []
    for first in range(0, n, batch_size):
        part = slice(first, first + batch_size)
        starts.append(invert_fn(_denoiser(model, cache_interval), images[part], source_buffers[part], codes[part],
                                steps=steps, callback=tally.steps(len(range(n)[part]))))
    return InvertedStart(torch.cat(starts).float().cpu(), sampler, steps, cache_interval, model_fingerprint(model),
                         _model_name(model))


@torch.no_grad()
def edit_faces(model, images: torch.Tensor | None, source_buffers: torch.Tensor | None,
               target_buffers: torch.Tensor, codes: torch.Tensor, *, start: str | InvertedStart = "inversion",
               steps: int = 20, eta: float = 0.0, seed: int = 0, batch_size: int = 4,
               callback: EditCallback | None = None, sampler: str = "ddim", cache_interval: int = 1) -> torch.Tensor:
    """Edited faces: DDIM from each face's inversion (or from seeded noise) under the target buffers.

    images [N,3,S,S] in [-1,1] and source_buffers [N,9,S,S] (rendered|normal|albedo of the
    unedited fits; both None for start = "noise", then N = rows of codes, and for an inverted
    start, then N = its faces); codes [N,64] or [1,64] (shared); target_buffers [N*F,9,S,S],
    face-major: rows i*F .. i*F+F-1 are the F frames of face i. -> [N*F,3,S,S] float32 in [-1,1]
    on the CPU.

    start "inversion": every face is inverted under its own buffers and code by `invert_faces`
    (keeps the photo's background and details); an `InvertedStart` (from `invert_faces`, made
    with this model and the same sampler, steps and cache_interval, else refused): the same
    edit, bit for bit, without inverting again; "noise": one noise from `seed`, the same for
    every face and frame (so frames of a sweep stay consistent). eta > 0 adds per-step noise,
    also drawn from `seed` for each row, so a face's frames share it and a batch equals its
    faces alone. Faces and rows are processed `batch_size` at a time. `callback(done, total,
    preview=)` reports inversion and sampling as one count of face-steps (`core.progress`).

    sampler: "ddim" (official, the reference) or "dpmpp_2m" (DPM-Solver++(2M) with its matching
    inversion: second order, about half the steps for DDIM's accuracy); cache_interval N > 1
    reuses the UNet's deep features for N - 1 of every N calls (`feature_cache.FeatureCache`:
    faster, drifts a little). `model.sampler_presets.SAMPLING_PRESETS` names measured combinations.
    """
    check_edit_settings(start, steps, eta, batch_size, sampler, cache_interval)
    if target_buffers.ndim != 4 or target_buffers.shape[0] == 0:
        raise ValueError(f"target_buffers must be a non-empty [N*F, 9, H, W] batch, got {tuple(target_buffers.shape)}")
    _check_codes(model, codes)
    size = tuple(target_buffers.shape[-2:])
    if isinstance(start, InvertedStart):
        if images is not None or source_buffers is not None:
            raise ValueError("the edit starts from an inverted start: pass images and source_buffers as None "
                             "(invert_faces has used them)")
        start.check(model, sampler, steps, cache_interval)
        if tuple(start.x_t.shape[-2:]) != size:
            raise ValueError(f"the inverted start is {start.x_t.shape[-1]}x{start.x_t.shape[-2]} px but the target "
                             f"buffers are {size[1]}x{size[0]}: render them at the inverted faces' size")
        n = start.faces
    elif start == "inversion":
        n = _check_sources(images, source_buffers)
    else:
        n = images.shape[0] if images is not None else codes.shape[0]
    rows = target_buffers.shape[0]
    if rows % n:
        raise ValueError(f"{rows} target buffers for {n} faces: give F frames per face, face-major "
                         "(all frames of face 1, then of face 2, ...)")
    frames = rows // n
    codes = _rows(codes, n, "codes")
    sample_fn, _ = sampler_functions(sampler)
    invert_steps, sample_steps = sampler_step_counts(model, sampler, steps)
    inverting = isinstance(start, str) and start == "inversion"
    total = (n * invert_steps if inverting else 0) + rows * sample_steps
    if inverting:
        start = invert_faces(model, images, source_buffers, codes, steps=steps, sampler=sampler, batch_size=batch_size,
                             cache_interval=cache_interval,
                             callback=None if callback is None else (
                                 lambda done, _, **info: callback(done, total, **info)))
    if isinstance(start, InvertedStart):
        x_start = start.x_t
    else:
        noise = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
        x_start = noise.expand(n, -1, -1, -1)
    tally = Tally(callback, total, n * invert_steps if inverting else 0)
    device = getattr(model, "device", target_buffers.device)
    face_of_row = torch.arange(rows) // frames
    outputs = []
    for first in range(0, rows, batch_size):
        part = face_of_row[first:first + batch_size]
        generators = [torch.Generator(device).manual_seed(seed) for _ in part] if eta > 0 else None
        outputs.append(sample_fn(_denoiser(model, cache_interval), target_buffers[first:first + batch_size],
                                 codes[part.to(codes.device)], x_start[part], steps=steps, eta=eta,
                                 generator=generators, callback=tally.steps(len(part))).float().cpu())
    return torch.cat(outputs)

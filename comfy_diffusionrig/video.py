"""Relight a video clip of one person without flicker.

Per-frame edits flicker because every frame is fitted on its own: the fitted shape, pose,
expression and camera jitter from frame to frame, and so do the buffers the UNet is
conditioned on. A clip is edited as one piece instead:

1. track one face through the clip (box overlap with the previous frame, and the dlib identity
   descriptor when the face was lost), not "the largest face of each frame";
2. fit every frame, give every frame the clip's mean shape and texture (as an album does);
3. smooth pose (head and jaw), expression, camera, fitted light and the global code over time
   with a zero-lag One-Euro filter (`smooth_codes`; strength 0 changes nothing), and the landmarks
   the crops are aligned on (`steady_faces`);
4. light every frame with one target light, or a light keyframed from a start to an end light;
5. invert and sample every frame with `edit_faces` (one noise policy for every frame), paste back.

Frames in which the tracked face is not found pass through unchanged and are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .core.imaging import pil_to_tensor, tensor_to_pil
from .core.progress import Callback, in_stage, notify
from .photo.paste import DEFAULT_DETAIL, DEFAULT_DETAIL_RADIUS, DEFAULT_FEATHER

SMOOTH_KEYS = ("pose", "exp", "cam", "light")  # what jitters per fit; shape and tex are shared instead
SPEED = 0.05  # One-Euro beta per frame, in units of a channel's typical jitter: lag shrinks on real motion
DERIVATIVE_CUTOFF = 1.0 / (2 * math.pi)  # One-Euro's d_cutoff (1 Hz at 1 frame/s): the speed estimate's own smoothing
MIN_IOU = 0.3  # a face overlapping the tracked box less than this is another face (or the track is lost)


# ----------------------------------------------------------------------------- smoothing


def _alpha(cutoff: torch.Tensor) -> torch.Tensor:
    """Exponential smoothing factor of a first-order low-pass at `cutoff` cycles per frame (One-Euro)."""
    tau = 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau)


def check_strength(strength) -> None:
    """A smoothing strength is a finite number >= 0 (frames); cheap: call it before loading models."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"smoothing strength must be 0 (off) or more frames, got {strength!r}")


def one_euro(x: torch.Tensor, strength: float, speed: float = SPEED, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal One-Euro filter (Casiez et al., CHI 2012) over time, frames as the time unit.

    x: [T, D]; strength: the filter's time constant at rest, in frames (alpha = 1 / (1 + strength));
    speed: how fast the cutoff opens with the channel's speed, measured in units of `scale`
    ([D], default: each channel's median frame-to-frame change, i.e. its jitter), so the
    filter reads codes of any unit alike. speed = 0 is a plain exponential moving average.
    -> [T, D] float64.
    """
    check_strength(strength)
    x = x.double()
    if strength == 0 or x.shape[0] < 2:
        return x.clone()
    if scale is None:
        scale = (x[1:] - x[:-1]).abs().median(0).values
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    min_cutoff = 1.0 / (2 * math.pi * strength)  # tau = strength frames at rest
    alpha_d = _alpha(torch.tensor(DERIVATIVE_CUTOFF, dtype=torch.float64))
    out = torch.empty_like(x)
    out[0] = x[0]
    speed_hat = torch.zeros_like(x[0])
    for t in range(1, x.shape[0]):
        speed_hat = alpha_d * (x[t] - out[t - 1]) + (1 - alpha_d) * speed_hat
        alpha = _alpha(min_cutoff + speed * speed_hat.abs() / scale)
        out[t] = alpha * x[t] + (1 - alpha) * out[t - 1]
    return out


def frame_runs(frames: Sequence[int]) -> list[slice]:
    """Runs of consecutive frame numbers in `frames` (sorted), as slices of it: [0, 1, 2, 5, 6] -> [0:3, 3:5].
    Smoothing stays within a run, never across frames where the face was not seen (a cut, an occlusion)."""
    runs, start = [], 0
    for k in range(1, len(frames) + 1):
        if k == len(frames) or frames[k] != frames[k - 1] + 1:
            runs.append(slice(start, k))
            start = k
    return runs


def smooth_sequence(x: torch.Tensor, strength: float, speed: float = SPEED,
                    runs: Sequence[slice] | None = None) -> torch.Tensor:
    """Zero-lag smoothing of [T, ...] over T: One-Euro forward, then backward over the result.

    The backward pass cancels the forward pass's lag (a clip is edited offline, so the future is
    known). strength 0 returns x unchanged (bit for bit); the result has x's dtype. runs: slices of
    T (`frame_runs`) smoothed each on its own (None: one run).
    """
    check_strength(strength)
    if runs is not None and len(runs) > 1:
        return torch.cat([smooth_sequence(x[run], strength, speed) for run in runs])
    if x.shape[0] < 2 or strength == 0:
        return x.clone()
    flat = x.reshape(x.shape[0], -1)
    scale = (flat[1:] - flat[:-1]).double().abs().median(0).values
    forward = one_euro(flat, strength, speed, scale)
    both = one_euro(forward.flip(0), strength, speed, scale).flip(0)
    return both.to(x.dtype).reshape(x.shape)


def smooth_codes(codes: dict, strength: float, keys: Sequence[str] = SMOOTH_KEYS, speed: float = SPEED,
                 runs: Sequence[slice] | None = None) -> dict:
    """Per-frame codes ({name: [T, ...]}) with `keys` smoothed over time (`smooth_sequence`, within each of
    `runs`); others as given."""
    return {k: smooth_sequence(v, strength, speed, runs) if k in keys else v for k, v in codes.items()}


def frame_jitter(x: torch.Tensor) -> float:
    """Mean absolute second difference over time of [T, ...]: jitter, blind to steady motion."""
    if x.shape[0] < 3:
        return 0.0
    return float((x[2:] - 2 * x[1:-1] + x[:-2]).abs().mean())


def light_keyframes(start: torch.Tensor, end: torch.Tensor | None, frames: int, ease: bool = False) -> torch.Tensor:
    """[frames, 9, 3] SH lights from `start` at the first frame to `end` at the last (None: `start` throughout).

    The SH coefficients are interpolated linearly: SH light is linear in radiance, so frame k's
    light is the cross-fade (1 - s) start + s end of the two lights, s = k / (frames - 1)
    (eased with a cosine when ease).
    """
    from .face.rig import sweep_values

    start = torch.as_tensor(start, dtype=torch.float32).reshape(9, 3)
    end = start if end is None else torch.as_tensor(end, dtype=torch.float32).reshape(9, 3)
    s = torch.as_tensor(sweep_values(0.0, 1.0, frames, ease), dtype=torch.float32)[:, None, None]
    return (1 - s) * start + s * end


# ----------------------------------------------------------------------------- tracking


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def track_faces(detections: Sequence[Sequence], first: int = 0, describe: Callable | None = None,
                max_distance: float | None = None, min_iou: float = MIN_IOU) -> list[int | None]:
    """Which detected face is the tracked person in each frame (an index into that frame's list, or None).

    detections: per frame, the faces found (`photo.detection.Face`, largest first); first: which face
    of the first frame with a face to follow (0 = its largest). Each next frame takes the face
    overlapping the last tracked box most (IoU >= min_iou), so a larger face entering the clip
    does not steal the track. When none overlaps (the person moved fast, or was hidden), and
    `describe(frame, face) -> descriptor` is given, the face nearest to the tracked person's
    first descriptor within `max_distance` (dlib's same-person threshold by default) is taken.
    """
    from .photo.identity import DLIB_DISTANCE_THRESHOLD

    max_distance = DLIB_DISTANCE_THRESHOLD if max_distance is None else max_distance
    chosen: list[int | None] = [None] * len(detections)
    last_box, reference = None, None
    for t, faces in enumerate(detections):
        if not faces:
            continue
        if last_box is None:
            if first >= len(faces):
                raise ValueError(f"face {first} asked for, but the first frame with a face (frame {t}) has "
                                 f"{len(faces)}")
            pick = first
        else:
            overlaps = [box_iou(last_box, f.box) for f in faces]
            pick = int(np.argmax(overlaps)) if max(overlaps) >= min_iou else None
            if pick is None and describe is not None:
                if reference is None:
                    reference = describe(*_first_tracked(detections, chosen))
                distances = [float(np.linalg.norm(describe(t, f) - reference)) for f in faces]
                best = int(np.argmin(distances))
                pick = best if distances[best] <= max_distance else None
        if pick is not None:
            chosen[t] = pick
            last_box = faces[pick].box
    return chosen


def _first_tracked(detections, chosen) -> tuple[int, object]:
    t = next(i for i, c in enumerate(chosen) if c is not None)
    return t, detections[t][chosen[t]]


# ----------------------------------------------------------------------------- the clip


def steady_faces(faces: Sequence, strength: float, speed: float = SPEED, runs: Sequence[slice] | None = None) -> list:
    """The tracked face of each frame (photo.detection.Face, in frame order) with its 68 landmarks smoothed over
    time (`smooth_sequence`), so the FFHQ crop of a still head stays put: dlib's landmarks jitter by a
    pixel or so from frame to frame, which shakes the crop, the model's input and so its output.
    strength 0 returns the faces as detected; runs: as `smooth_sequence`."""
    from dataclasses import replace

    if strength == 0 or len(faces) < 2:
        return list(faces)
    marks = smooth_sequence(torch.as_tensor(np.stack([f.landmarks for f in faces]), dtype=torch.float64),
                            strength, speed, runs).numpy()
    return [replace(f, landmarks=m) for f, m in zip(faces, marks)]


def clip_rig(rig, strength: float, speed: float = SPEED, runs: Sequence[slice] | None = None):
    """A fitted rig of consecutive frames of one person -> the clip's rig: the mean shape and texture on
    every frame (one person: as the album does), pose, expression, camera and light smoothed over time
    (within each of `runs`, see `frame_runs`)."""
    n = len(rig)
    mean = {k: rig.codes[k].mean(0, keepdim=True).expand(n, -1).clone() for k in ("shape", "tex")}
    return rig.with_codes(**mean, **{k: v for k, v in smooth_codes(rig.codes, strength, SMOOTH_KEYS, speed, runs).items()
                                     if k in SMOOTH_KEYS})


@dataclass
class ClipResult:
    """frames: the clip with the relit face pasted in (frames without the face: the input frame itself);
    masks: [T, H, W] float32 in [0, 1], where the edit was blended in (0 on untouched frames);
    missing: indices of the frames where the tracked face was not found; faces: the relit aligned faces
    of the other frames, in order; rig: their clip rig (smoothed, relit)."""

    frames: list[Image.Image]
    masks: np.ndarray
    missing: list[int] = field(default_factory=list)
    faces: list[Image.Image] = field(default_factory=list)
    rig: object = None

    def report(self) -> str:
        total = len(self.frames)
        if not self.missing:
            return f"relit the face in all {total} frames"
        return (f"relit {total - len(self.missing)} of {total} frames; {len(self.missing)} frame(s) without the "
                f"tracked face passed through unchanged: {', '.join(str(i) for i in self.missing)} (0-based)")




def relight_clip(model, deca, frames: Sequence[Image.Image], light: torch.Tensor, end_light: torch.Tensor | None = None,
                 *, strength: float = 2.0, ease: bool = False, face: int = 0, start: str = "inversion",
                 steps: int = 20, eta: float = 0.0, seed: int = 0, batch_size: int = 4, detector: str = "hog",
                 identity: bool = True, color_match: bool = False, feather: float = DEFAULT_FEATHER,
                 models_dir=None, progress: Callback | None = None, sampler: str = "ddim",
                 cache_interval: int = 1, detail: str = DEFAULT_DETAIL,
                 detail_radius: float = DEFAULT_DETAIL_RADIUS) -> ClipResult:
    """Relight one person through a clip of frames (PIL images of one size) -> ClipResult.

    light: the target SH light [9, 3]; end_light: the light at the last frame (keyframed:
    interpolated over the clip, see `light_keyframes`), None for one light throughout.
    strength: temporal smoothing of the fits (`smooth_codes`; 0 = every frame as fitted).
    face: which face of the first frame with a face to follow (0 = the largest); identity: use
    dlib descriptors to find the person again after the track is lost. The edit is `edit_faces`
    with the same settings (sampler and cache_interval too) and noise policy for every frame; detail,
    detail_radius: how each frame's face goes back (`photo.paste.paste_back`). Only the
    light changes, so the faces do not move: no rig motion is needed.
    progress(done, total, stage=) (`core.progress`) counts each stage on its own: "track" (frames),
    "fit" (0 then 1), "relight" (face-steps, with preview=, as `edit_faces`), "paste" (tracked frames).
    """
    from .photo.alignment import align_face
    from .photo.detection import detect_faces
    from .photo.paste import check_detail, paste_faces
    from .editing import check_edit_settings, edit_faces, encode_faces
    from .face.rig import fit_faces, render_layers, render_rig, stack_buffers

    check_edit_settings(start, steps, eta, batch_size, sampler, cache_interval)
    check_strength(strength)
    check_detail(detail, detail_radius)
    frames = list(frames)
    if not frames:
        raise ValueError("the clip has no frames")
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"the frames of a clip must have one size, got {sorted(sizes)}")
    def report(stage, done, total, **info):
        notify(progress, done, total, stage=stage, **info)
    detections = []
    for t, frame in enumerate(frames):
        detections.append(detect_faces(frame, detector=detector, models_dir=models_dir))
        report("track", t + 1, len(frames))
    describe = None
    if identity:
        from .photo.identity import face_descriptor

        describe = lambda t, f: face_descriptor(frames[t], face=f, models_dir=models_dir)  # noqa: E731
    chosen = track_faces(detections, first=face, describe=describe)
    tracked = [t for t, c in enumerate(chosen) if c is not None]
    missing = [t for t, c in enumerate(chosen) if c is None]
    if not tracked:
        raise ValueError(f"no face found in any of the {len(frames)} frames (detector {detector}); try the cnn "
                         "detector for turned, small or dark faces")
    size = model.config.image_size
    runs = frame_runs(tracked)  # smoothing never bridges frames without the face
    steady = steady_faces([detections[t][chosen[t]] for t in tracked], strength, runs=runs)
    aligned = [align_face(frames[t], f, size) for t, f in zip(tracked, steady)]
    images = pil_to_tensor([a.image for a in aligned])
    report("fit", 0, 1)
    rig = clip_rig(fit_faces(deca, images, np.stack([a.landmarks for a in aligned])), strength, runs=runs)
    report("fit", 1, 1)
    lights = light_keyframes(light, end_light, len(frames), ease)[tracked]
    target = rig.with_light(lights)
    source_buffers = render_rig(deca, rig)
    target_buffers = stack_buffers(render_layers(deca, target))
    x = images * 2 - 1
    codes = smooth_sequence(encode_faces(model, x), strength, runs=runs)
    edited = edit_faces(model, x, source_buffers, target_buffers, codes, start=start, steps=steps, eta=eta,
                        seed=seed, batch_size=batch_size, sampler=sampler, cache_interval=cache_interval,
                        callback=in_stage(progress, "relight"))
    faces = [tensor_to_pil(f) for f in edited]
    out = list(frames)
    width, height = frames[0].size
    masks = np.zeros((len(frames), height, width), np.float32)
    for k, t in enumerate(tracked):
        pasted = paste_faces(frames[t], aligned[k], faces[k], color_match=color_match, feather=feather, detail=detail,
                             detail_radius=detail_radius)
        out[t], masks[t] = pasted.image, pasted.mask
        report("paste", k + 1, len(tracked))
    return ClipResult(out, masks, missing, faces, target)

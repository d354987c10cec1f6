"""Paste back: the edited aligned faces into the original photo, feathered into the face region.

Two ways to fill the face region. "edit" takes the edited face's own pixels (resampled to the
photo: at 256 px a large face comes back blurred, so an upscaled edit goes this way).
"ratio" and "difference" keep the photo's own full-resolution detail and carry over only the
edit's change, taken at the model's resolution from smoothed images (frequency separation):
the photo is multiplied by smooth(edited) / smooth(aligned) (light multiplies), or has
smooth(edited) - smooth(aligned) added. Where the rig moved the face (a `FaceMotion`, see
`face.motion.rig_motion`) the photo's detail is first moved with it, and where that motion cannot
be trusted (disoccluded skin, the mouth opening) the edit's own pixels fill in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..core.conventions import BROWS, EYES, JAW_LINE, MOUTH_LEFT, MOUTH_RIGHT
from .alignment import AlignedFace, apply_transform
from .loading import _ALPHA_MODES, to_rgb, upright

DETAIL_MODES = ("ratio", "difference", "edit")
DEFAULT_DETAIL = "ratio"  # measured best on the synthetic known answer: benchmarks/bench_detail.py
DEFAULT_DETAIL_RADIUS = 2.0  # measured best there (px of a 256 px face)
DEFAULT_FEATHER = 0.08  # the soft edge of the pasted face, as a fraction of its width (jaw corner to corner)
DETAIL_SCALE = 256  # detail_radius is in pixels of a face aligned at 256 px (the official model's size)
RATIO_FLOOR = 4.0  # (of 255) added to both smoothed images of a ratio: dark pixels give no wild gains


@dataclass(frozen=True)
class FaceMotion:
    """Where each pixel of an edited face came from in the aligned photo, and whether to believe it.

    flow: [M, M, 2] float32, for each pixel of an M x M grid over the edited aligned face the
    (x, y) of the same face point in the unedited aligned face, in pixels of that grid (pixel
    centres at integers, as `AlignedFace.transform`); trust: [M, M] float32 in [0, 1], 1 where the
    photo's detail moved by the flow belongs there, 0 where the point was hidden or is stretched
    (the edit's own pixels are used there). M is any size (the grid is scaled to the face).
    """

    flow: np.ndarray
    trust: np.ndarray

    @staticmethod
    def still(size: int) -> "FaceMotion":
        """Nothing moved: the identity flow, trusted everywhere."""
        ys, xs = np.mgrid[:size, :size].astype(np.float32)
        return FaceMotion(np.stack([xs, ys], -1), np.ones((size, size), np.float32))

    @property
    def moved(self) -> bool:
        still = FaceMotion.still(self.flow.shape[0])
        return bool((self.trust < 1).any() or np.abs(self.flow - still.flow).max() > 1e-3)


@dataclass
class Pasted:
    """paste_faces' result: image (PIL, the original's size and mode), mask [H, W] float32 in [0, 1] (how much
    of each pixel the faces replaced), edit_mask [H, W] float32 in [0, 1] (how much of each pixel is the edit's
    own pixels rather than the photo's detail: all of the mask with detail "edit", the untrusted motion with
    "ratio" / "difference")."""

    image: Image.Image
    mask: np.ndarray
    edit_mask: np.ndarray


def face_region_mask(aligned: AlignedFace, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """[size, size] float32 in [0, 1]: the face (jaw line up to the forehead) in aligned pixels.

    Exactly 0 on and outside the region's outline and rising smoothly to 1 over feather x the
    face width inside it, so pasting never touches pixels outside the face region.
    """
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import ConvexHull

    size = aligned.size
    lm = aligned.landmarks
    eye_mid = lm[EYES].mean(axis=0)
    mouth_mid = (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) * 0.5
    up = eye_mid - mouth_mid  # forehead reaches about one eye-mouth distance above the brows
    outline = np.concatenate([lm[JAW_LINE], lm[BROWS] + up])
    hull = outline[ConvexHull(outline).vertices]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in hull], fill=255)
    inside = np.asarray(canvas) > 0
    ramp = feather * max(np.hypot(*(lm[16] - lm[0])), 1.0)
    t = np.clip(distance_transform_edt(inside) / max(ramp, 1e-6), 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep


def check_detail(detail: str, detail_radius: float) -> None:
    """Refuse an unknown detail mode or a radius that is not a finite number >= 0."""
    if detail not in DETAIL_MODES:
        raise ValueError(f"unknown detail mode {detail!r}; choose one of {', '.join(DETAIL_MODES)}")
    if isinstance(detail_radius, bool) or not isinstance(detail_radius, (int, float)) \
            or not math.isfinite(detail_radius) or detail_radius < 0:
        raise ValueError(f"detail_radius must be a number of pixels >= 0, got {detail_radius!r}")


def paste_back(original, aligned: AlignedFace | Sequence[AlignedFace], edited, *, color_match: bool = False,
               feather: float = DEFAULT_FEATHER, detail: str = DEFAULT_DETAIL, detail_radius: float = DEFAULT_DETAIL_RADIUS,
               motion: FaceMotion | Sequence[FaceMotion | None] | None = None) -> Image.Image:
    """Put edited aligned face(s) back into the original photo -> PIL image of the original's size.

    original: the photo the faces were aligned from (PIL or array; RGBA keeps its alpha channel,
    other modes come back RGB). aligned: an AlignedFace or a list of them; edited: the matching
    edited image(s) (PIL or [S, S, 3] array, any square size). Only pixels inside the feathered
    face region change; every other pixel keeps its exact value.
    detail: "ratio" (default) or "difference" keep the photo's own detail and carry over the edit's
    change, smoothed over detail_radius px (of a 256 px face; 0 = the change at the model's full
    resolution), as a ratio or a difference of the smoothed images; "edit" pastes the edit's own
    pixels (for an edit already upscaled to the photo's scale). motion: per face, where the rig moved
    the face (`face.motion.rig_motion`; None = it did not move). color_match shifts the edit's
    per-channel mean and spread inside the face to those of the unedited aligned face.
    """
    return paste_faces(original, aligned, edited, color_match=color_match, feather=feather, detail=detail,
                       detail_radius=detail_radius, motion=motion).image


def paste_faces(original, aligned: AlignedFace | Sequence[AlignedFace], edited, *, color_match: bool = False,
                feather: float = DEFAULT_FEATHER, detail: str = DEFAULT_DETAIL, detail_radius: float = DEFAULT_DETAIL_RADIUS,
                motion: FaceMotion | Sequence[FaceMotion | None] | None = None) -> Pasted:
    """`paste_back` with its masks (see `Pasted`); same arguments."""
    check_detail(detail, detail_radius)
    if isinstance(aligned, AlignedFace):
        aligned, edited = [aligned], [edited]
        motion = [motion] if isinstance(motion, FaceMotion) else motion
    aligned = list(aligned)
    edited = list(edited) if not (isinstance(edited, np.ndarray) and edited.ndim == 3) else [edited]
    if len(aligned) != len(edited):
        raise ValueError(f"paste_back got {len(aligned)} aligned face(s) but {len(edited)} edited image(s)")
    motion = [None] * len(aligned) if motion is None else list(motion)
    if len(motion) != len(aligned):
        raise ValueError(f"paste_back got {len(aligned)} aligned face(s) but {len(motion)} motion(s)")
    alpha = None
    if isinstance(original, Image.Image):
        base = upright(original)
        if base.mode in _ALPHA_MODES or (base.mode == "P" and "transparency" in base.info):
            rgba = np.asarray(base.convert("RGBA"))
            canvas, alpha = rgba[..., :3].copy(), rgba[..., 3]
        else:
            canvas = np.array(to_rgb(base))
    else:
        canvas = np.array(to_rgb(original))
    mask = np.zeros(canvas.shape[:2], np.float32)
    edit_mask = np.zeros_like(mask)
    for face, edit, moved in zip(aligned, edited, motion):
        if (canvas.shape[1], canvas.shape[0]) != tuple(face.original_size):
            raise ValueError(f"the face was aligned from a {face.original_size[0]}x{face.original_size[1]} "
                             f"image but the original given is {canvas.shape[1]}x{canvas.shape[0]}; pass the "
                             "same photo")
        _paste_one(canvas, mask, edit_mask, face, edit, color_match, feather, detail, detail_radius, moved)
    image = Image.fromarray(np.dstack([canvas, alpha]), "RGBA") if alpha is not None else Image.fromarray(canvas, "RGB")
    return Pasted(image, mask, edit_mask)


def pasted_mask(original_size: tuple[int, int], aligned: Sequence[AlignedFace], feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """[H, W] float32 in [0, 1]: the blend weight `paste_back` gives each pixel of a (width, height) photo."""
    black = Image.new("RGB", tuple(original_size))
    return paste_faces(black, list(aligned), [a.image for a in aligned], feather=feather, detail="edit").mask


def _paste_one(canvas: np.ndarray, mask_out: np.ndarray, edit_mask_out: np.ndarray, face: AlignedFace, edited,
               color_match: bool, feather: float, detail: str, radius: float, motion: FaceMotion | None) -> None:
    from scipy.ndimage import map_coordinates

    size = face.size
    edit = to_rgb(edited)
    if edit.size[0] != edit.size[1]:
        raise ValueError(f"the edited face must be square like the aligned one, got {edit.size}")
    mask = face_region_mask(face, feather)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return
    # original-pixel box holding the mask's support
    corners = np.array([[cols.min() - 1, rows.min() - 1], [cols.max() + 1, rows.min() - 1],
                        [cols.min() - 1, rows.max() + 1], [cols.max() + 1, rows.max() + 1]], np.float64)
    back = apply_transform(np.linalg.inv(face.transform), corners)
    height, width = canvas.shape[:2]
    x0, y0 = (max(int(np.floor(v)), 0) for v in back.min(axis=0))
    x1, y1 = min(int(np.ceil(back[:, 0].max())) + 1, width), min(int(np.ceil(back[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return

    edit_arr = np.asarray(edit, np.float32)
    if color_match:
        edit_arr = _match_colour(edit_arr, np.asarray(face.image, np.float32), mask)

    ys, xs = np.mgrid[y0:y1, x0:x1]
    pts = apply_transform(face.transform, np.stack([xs.ravel(), ys.ravel()], axis=1))
    weight = map_coordinates(mask, [pts[:, 1], pts[:, 0]], order=1, mode="constant", cval=0.0)
    inside = weight > 0
    pts, weight = pts[inside], weight[inside]
    region = canvas[y0:y1, x0:x1]
    photo = region.reshape(-1, 3)[inside].astype(np.float32)
    if motion is not None and not motion.moved:
        motion = None

    if detail == "edit":
        result, use_edit = _edit_pixels(edit_arr, face, pts), np.ones_like(weight)
    else:
        use_edit = np.zeros_like(weight)
        source = pts
        if motion is not None:
            source, trust = _moved_points(motion, pts, size)
            use_edit = 1.0 - trust
            moved = apply_transform(np.linalg.inv(face.transform), source)
            photo_moved = _sample_photo(canvas, moved)
        else:
            photo_moved = photo
        change = _change_map(edit_arr, np.asarray(face.image, np.float32), radius, detail, motion)
        k = change.shape[0] / size
        cx, cy = (pts[:, 0] + 0.5) * k - 0.5, (pts[:, 1] + 0.5) * k - 0.5
        result = np.empty_like(photo)
        for c in range(3):
            at = map_coordinates(change[..., c], [cy, cx], order=1, mode="nearest")
            result[:, c] = photo_moved[:, c] * at if detail == "ratio" else photo_moved[:, c] + at
        if motion is not None and (use_edit > 0).any():
            result += (_edit_pixels(edit_arr, face, pts) - result) * use_edit[:, None]

    blended = np.clip(np.rint(photo + (result - photo) * weight[:, None]), 0, 255).astype(np.uint8)
    flat = region.reshape(-1, 3)
    flat[inside] = blended
    region[...] = flat.reshape(region.shape)
    # blending face after face: a pixel keeps (1 - w) of what was there
    for out, value in ((mask_out, weight), (edit_mask_out, weight * use_edit)):
        sub = out[y0:y1, x0:x1].reshape(-1)
        sub[inside] = sub[inside] * (1 - weight) + value
        out[y0:y1, x0:x1] = sub.reshape(y1 - y0, x1 - x0)


def _edit_pixels(edit_arr: np.ndarray, face: AlignedFace, pts: np.ndarray) -> np.ndarray:
    """The edit's own pixels at aligned points [N, 2] -> [N, 3] float32 (bilinear; an edit finer than the photo's
    face is shrunk first, so it does not alias)."""
    from scipy.ndimage import map_coordinates

    size = face.size
    step = math.sqrt(abs(np.linalg.det(face.transform[:2, :2]))) * edit_arr.shape[0] / size
    if step > 1.5:
        small = max(1, round(edit_arr.shape[0] / step))
        edit_arr = np.asarray(Image.fromarray(np.clip(np.rint(edit_arr), 0, 255).astype(np.uint8))
                              .resize((small, small), Image.LANCZOS), np.float32)
    k = edit_arr.shape[0] / size
    ex, ey = (pts[:, 0] + 0.5) * k - 0.5, (pts[:, 1] + 0.5) * k - 0.5
    return np.stack([map_coordinates(edit_arr[..., c], [ey, ex], order=1, mode="nearest") for c in range(3)], 1)


def _sample_photo(canvas: np.ndarray, points: np.ndarray) -> np.ndarray:
    """canvas [H, W, 3] uint8 at photo points [N, 2] (x, y) -> [N, 3] float32: cubic B-spline, which keeps
    more of the fine detail than bilinear between pixels; edges clamped."""
    from scipy.ndimage import map_coordinates, spline_filter

    height, width = canvas.shape[:2]
    x0, y0 = (max(int(np.floor(points[:, k].min())) - 4, 0) for k in (0, 1))
    x1, y1 = min(int(np.ceil(points[:, 0].max())) + 5, width), min(int(np.ceil(points[:, 1].max())) + 5, height)
    if x1 <= x0 or y1 <= y0:  # every point off the photo: the nearest edge pixels
        x0, y0, x1, y1 = 0, 0, width, height
    crop = canvas[y0:y1, x0:x1].astype(np.float32)
    at = [points[:, 1] - y0, points[:, 0] - x0]
    return np.stack([map_coordinates(spline_filter(crop[..., c], 3, np.float32, mode="nearest"), at, order=3,
                                     mode="nearest", prefilter=False) for c in range(3)], 1)


def _moved_points(motion: FaceMotion, pts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned points [N, 2] of the edited face -> (where they came from in the aligned photo [N, 2], trust [N])."""
    from scipy.ndimage import map_coordinates

    m = motion.flow.shape[0]
    gx, gy = (pts[:, 0] + 0.5) * m / size - 0.5, (pts[:, 1] + 0.5) * m / size - 0.5
    still = FaceMotion.still(m).flow
    # the displacement is smooth where the flow is trusted; interpolate it, not the positions
    shift = [map_coordinates(motion.flow[..., c] - still[..., c], [gy, gx], order=1, mode="nearest") for c in range(2)]
    trust = np.clip(map_coordinates(motion.trust, [gy, gx], order=1, mode="nearest"), 0.0, 1.0)
    source = np.stack([gx + shift[0], gy + shift[1]], 1)
    return (source + 0.5) * size / m - 0.5, trust


def _change_map(edit: np.ndarray, aligned: np.ndarray, radius: float, detail: str,
                motion: FaceMotion | None) -> np.ndarray:
    """[W, W, 3] float32 over the aligned face: smooth(edit) / smooth(aligned) ("ratio") or their difference.

    Both images are resampled to W = max(aligned size, DETAIL_SCALE) px and smoothed with a Gaussian of
    radius x W / DETAIL_SCALE px; with a motion the aligned face is first moved as the photo's detail is,
    so the change is measured between the same face points.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    work = max(aligned.shape[0], DETAIL_SCALE)
    edit_w, aligned_w = _resized(edit, work), _resized(aligned, work)
    if motion is not None:
        ys, xs = np.mgrid[:work, :work].astype(np.float64)
        source, _ = _moved_points(motion, np.stack([xs.ravel(), ys.ravel()], 1), work)
        aligned_w = np.stack([map_coordinates(aligned_w[..., c], [source[:, 1], source[:, 0]], order=1,
                                              mode="nearest") for c in range(3)], 1).reshape(work, work, 3)
    sigma = radius * work / DETAIL_SCALE
    if sigma > 0:
        edit_w, aligned_w = (gaussian_filter(x, (sigma, sigma, 0), mode="nearest") for x in (edit_w, aligned_w))
    if detail == "ratio":
        return ((edit_w + RATIO_FLOOR) / (aligned_w + RATIO_FLOOR)).astype(np.float32)
    return (edit_w - aligned_w).astype(np.float32)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """[S, S, 3] float32 (0..255) -> [size, size, 3] float32 (bicubic up, LANCZOS down; unchanged at its size)."""
    if image.shape[0] == size:
        return image.astype(np.float32)
    channels = [Image.fromarray(image[..., c].astype(np.float32), "F") for c in range(3)]
    method = Image.BICUBIC if size > image.shape[0] else Image.LANCZOS
    return np.stack([np.asarray(ch.resize((size, size), method), np.float32) for ch in channels], -1)


def _match_colour(edit: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel mean/std transfer inside the face: edit [E, E, 3] towards reference [S, S, 3]."""
    ref_sel = reference[mask > 0.5]
    small_mask = np.asarray(Image.fromarray(mask).resize(edit.shape[1::-1], Image.BILINEAR)) > 0.5
    edit_sel = edit[small_mask]
    if len(ref_sel) < 16 or len(edit_sel) < 16:
        return edit
    scale = ref_sel.std(axis=0) / np.maximum(edit_sel.std(axis=0), 1e-3)
    return np.clip((edit - edit_sel.mean(axis=0)) * scale + ref_sel.mean(axis=0), 0, 255)

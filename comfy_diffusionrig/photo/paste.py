"""Paste back: warp edited aligned faces into the original photo, feathered into the face region."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..core.conventions import BROWS, EYES, JAW_LINE, MOUTH_LEFT, MOUTH_RIGHT
from .alignment import AlignedFace, apply_transform
from .loading import _ALPHA_MODES, to_rgb, upright

def face_region_mask(aligned: AlignedFace, feather: float = 0.08) -> np.ndarray:
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


def paste_back(original, aligned: AlignedFace | Sequence[AlignedFace], edited, *, color_match: bool = False,
               feather: float = 0.08) -> Image.Image:
    """Warp edited aligned face(s) back into the original photo -> PIL image of the original's size.

    original: the photo the faces were aligned from (PIL or array; RGBA keeps its alpha channel,
    other modes come back RGB). aligned: an AlignedFace or a list of them; edited: the matching
    edited image(s) (PIL or [S, S, 3] array, any square size). Only pixels inside the feathered
    face region change; every other pixel keeps its exact value. color_match shifts the edit's
    per-channel mean and spread inside the face to those of the unedited aligned face.
    """
    if isinstance(aligned, AlignedFace):
        aligned, edited = [aligned], [edited]
    aligned = list(aligned)
    edited = list(edited) if not (isinstance(edited, np.ndarray) and edited.ndim == 3) else [edited]
    if len(aligned) != len(edited):
        raise ValueError(f"paste_back got {len(aligned)} aligned face(s) but {len(edited)} edited image(s)")
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
    for face, edit in zip(aligned, edited):
        if (canvas.shape[1], canvas.shape[0]) != tuple(face.original_size):
            raise ValueError(f"the face was aligned from a {face.original_size[0]}x{face.original_size[1]} "
                             f"image but the original given is {canvas.shape[1]}x{canvas.shape[0]}; pass the "
                             "same photo")
        _paste_one(canvas, face, edit, color_match, feather)
    if alpha is not None:
        return Image.fromarray(np.dstack([canvas, alpha]), "RGBA")
    return Image.fromarray(canvas, "RGB")


def pasted_mask(original_size: tuple[int, int], aligned: Sequence[AlignedFace], feather: float = 0.08) -> np.ndarray:
    """[H, W] float32 in [0, 1]: the blend weight `paste_back` gives each pixel of a (width, height) photo
    (white faces pasted onto a black photo)."""
    black = Image.new("RGB", tuple(original_size))
    white = [Image.new("RGB", a.image.size, (255, 255, 255)) for a in aligned]
    return np.asarray(paste_back(black, list(aligned), white, feather=feather))[..., 0].astype(np.float32) / 255.0


def _paste_one(canvas: np.ndarray, face: AlignedFace, edited, color_match: bool, feather: float) -> None:
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

    # when the face is smaller in the photo than in the edit, shrink the edit first (no aliasing)
    step = math.sqrt(abs(np.linalg.det(face.transform[:2, :2]))) * edit.size[0] / size
    if step > 1.5:
        edit = edit.resize((max(1, round(edit.size[0] / step)),) * 2, Image.LANCZOS)
    edit_arr = np.asarray(edit, np.float32)
    if color_match:
        edit_arr = _match_colour(edit_arr, np.asarray(face.image, np.float32), mask)

    ys, xs = np.mgrid[y0:y1, x0:x1]
    pts = apply_transform(face.transform, np.stack([xs.ravel(), ys.ravel()], axis=1))
    weight = map_coordinates(mask, [pts[:, 1], pts[:, 0]], order=1, mode="constant", cval=0.0)
    k = edit_arr.shape[0] / size
    ex, ey = (pts[:, 0] + 0.5) * k - 0.5, (pts[:, 1] + 0.5) * k - 0.5
    region = canvas[y0:y1, x0:x1]
    flat = region.reshape(-1, 3).astype(np.float32)
    inside = weight > 0
    for c in range(3):
        values = map_coordinates(edit_arr[..., c], [ey[inside], ex[inside]], order=1, mode="nearest")
        flat[inside, c] += (values - flat[inside, c]) * weight[inside]
    blended = np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(region.shape)
    region[...] = np.where(inside.reshape(region.shape[:2])[..., None], blended, region)


def _match_colour(edit: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel mean/std transfer inside the face: edit [E, E, 3] towards reference [S, S, 3]."""
    ref_sel = reference[mask > 0.5]
    small_mask = np.asarray(Image.fromarray(mask).resize(edit.shape[1::-1], Image.BILINEAR)) > 0.5
    edit_sel = edit[small_mask]
    if len(ref_sel) < 16 or len(edit_sel) < 16:
        return edit
    scale = ref_sel.std(axis=0) / np.maximum(edit_sel.std(axis=0), 1e-3)
    return np.clip((edit - edit_sel.mean(axis=0)) * scale + ref_sel.mean(axis=0), 0, 255)

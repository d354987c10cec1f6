"""FFHQ alignment of a detected face, as DiffusionRig's `scripts/align.py`: an oriented square ("quad")
from the eyes and mouth, the shrink / crop / reflect-pad + blur steps and the final 4096 px quad render +
LANCZOS resize give the official pixels (tests/test_alignment.py checks it against a literal re-derivation),
and the 3x3 transform from original pixels to aligned pixels comes with it, for paste back."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.conventions import EYE_LEFT, EYE_RIGHT, MOUTH_LEFT, MOUTH_RIGHT
from .detection import Face, detect_faces, no_face_error, select_faces
from .loading import to_rgb

FFHQ_TRANSFORM_SIZE = 4096  # official align.py renders the quad at 4096 px, then resizes


@dataclass(frozen=True)
class AlignedFace:
    """An FFHQ-aligned face and what is needed to put it back.

    image: PIL RGB, size x size; transform: [3, 3] float64, original px -> aligned px
    (homogeneous, pixel centres at integers); quad: [4, 2] corners of the crop in original px
    (top-left, bottom-left, bottom-right, top-right of the aligned image, at pixel edges);
    original_size: (width, height) of the upright original; face: the face it came from.
    """

    image: Image.Image
    transform: np.ndarray
    quad: np.ndarray
    original_size: tuple[int, int]
    face: Face

    @property
    def size(self) -> int:
        return self.image.size[0]

    @property
    def landmarks(self) -> np.ndarray:
        """[68, 2] face landmarks in aligned pixels."""
        return apply_transform(self.transform, self.face.landmarks)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[3, 3] homogeneous transform applied to [N, 2] points -> [N, 2]."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """[68, 2] landmarks -> the FFHQ crop square [4, 2] (top-left, bottom-left, bottom-right,
    top-right, in pixel-index coordinates) and its side length.

    The square is centred a tenth of the way from the eye midpoint to the mouth midpoint, turned
    to the eye line (corrected by the eye-mouth axis), with half-side max(2 x eye distance,
    1.8 x eye-mouth distance): the FFHQ recipe, with its operations in the same order so that
    the floats match.
    """
    lm = np.asarray(landmarks, np.float64)
    eye_left, eye_right = lm[EYE_LEFT].mean(axis=0), lm[EYE_RIGHT].mean(axis=0)
    eye_mid = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_mid = (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) * 0.5  # outer mouth corners
    eye_to_mouth = mouth_mid - eye_mid
    half_x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    half_x = half_x / np.hypot(*half_x)
    half_x = half_x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    half_y = np.array([-half_x[1], half_x[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - half_x - half_y, centre - half_x + half_y, centre + half_x + half_y,
                     centre + half_x - half_y])
    return quad, float(np.hypot(*half_x) * 2)


def ffhq_align(rgb: Image.Image, landmarks: np.ndarray, size: int = 256,
               transform_size: int = FFHQ_TRANSFORM_SIZE, padding: bool = True) -> tuple[Image.Image, np.ndarray]:
    """FFHQ-align one face of an RGB image -> (size x size RGB image, [3, 3] original -> aligned).

    Steps of the official recipe, in order: shrink the photo by an integer factor when the face
    is over twice the output size; crop the quad plus a 10 % border; when the quad reaches past
    the photo, reflect-pad it (at least 30 % of the quad) and fade the padding to a blurred copy
    and then to the median colour; render the quad at transform_size px (bilinear) and resize to
    size (LANCZOS). Only the shrunk crop is ever resized (same pixels as resizing the whole photo,
    far cheaper for large photos). Unlike the official script, small faces are not skipped:
    they are upsampled.
    """
    width, height = rgb.size
    quad, qsize = ffhq_quad(landmarks)
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        small = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
        quad /= shrink
        qsize /= shrink
    else:
        small = (width, height)
    shrunk_quad = quad.copy()

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (max(int(np.floor(min(quad[:, 0]))) - border, 0), max(int(np.floor(min(quad[:, 1]))) - border, 0),
            min(int(np.ceil(max(quad[:, 0]))) + border, small[0]),
            min(int(np.ceil(max(quad[:, 1]))) + border, small[1]))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError(f"the face landmarks put the crop outside the {width}x{height} image; they do not "
                         "belong to this image")
    if shrink > 1:
        sx, sy = width / small[0], height / small[1]
        img = rgb.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.LANCZOS,
                         box=(crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy))
    else:
        img = rgb.crop(crop)
    quad -= crop[0:2]

    pad = (max(-int(np.floor(min(quad[:, 0]))) + border, 0), max(-int(np.floor(min(quad[:, 1]))) + border, 0),
           max(int(np.ceil(max(quad[:, 0]))) - img.size[0] + border, 0),
           max(int(np.ceil(max(quad[:, 1]))) - img.size[1] + border, 0))
    if padding and max(pad) > border - 4:
        pad = tuple(max(p, int(np.rint(qsize * 0.3)), 1) for p in pad)
        img = _fade_padding(img, pad, qsize)
        quad += pad[:2]

    aligned = _render_quad(img, quad, size, max(transform_size, size))

    # aligned pixel u -> shrunk photo: continuous (edge) coordinates are u + 0.5 on both sides,
    # and the shrunk photo maps to the original by the ratio of their sizes
    to_original = np.diag([width / small[0], height / small[1]])
    axes = np.stack([shrunk_quad[3] - shrunk_quad[0], shrunk_quad[1] - shrunk_quad[0]], axis=1) / size
    linear = to_original @ axes
    offset = to_original @ (shrunk_quad[0] + 0.5 + axes @ [0.5, 0.5]) - 0.5
    aligned_to_original = np.eye(3)
    aligned_to_original[:2, :2], aligned_to_original[:2, 2] = linear, offset
    return aligned, np.linalg.inv(aligned_to_original)


def _fade_padding(img: Image.Image, pad: tuple[int, int, int, int], qsize: float) -> Image.Image:
    """Reflect-pad (left, top, right, bottom) and fade the padding to a blur, then to the median.

    float32 throughout, as the official numpy code computes it.
    """
    from scipy.ndimage import gaussian_filter

    left, top, right, bottom = pad
    arr = np.pad(np.asarray(img, np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w = arr.shape[:2]
    y, x = np.ogrid[:h, :w]
    y, x = y.astype(np.float32), x.astype(np.float32)
    # 0 at the original border, rising to 1 at the outer edge of the padding (negative inside)
    edge = np.maximum(1.0 - np.minimum(x / left, (w - 1 - x) / right),
                      1.0 - np.minimum(y / top, (h - 1 - y) / bottom))[..., None]
    sigma = qsize * 0.02
    arr += (gaussian_filter(arr, [sigma, sigma, 0]) - arr) * np.clip(edge * 3.0 + 1.0, 0.0, 1.0)
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(edge, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")


def _render_quad(img: Image.Image, quad: np.ndarray, size: int, transform_size: int) -> Image.Image:
    """PIL quad render at transform_size (bilinear) then LANCZOS resize to size, in row bands.

    Each band renders its rows plus the LANCZOS support around them, so the bands are the same
    pixels as one big render; two threads (PIL releases the GIL) halve the time.
    """
    corners = quad + 0.5  # PIL puts pixel centres at +0.5
    if transform_size == size:
        return img.transform((size, size), Image.QUAD, tuple(corners.flatten()), Image.BILINEAR)
    nw, sw, se, ne = corners
    ratio = transform_size / size
    margin = math.ceil(3 * ratio) + 1  # LANCZOS reaches 3 output pixels each side
    bands = 4

    def band(k: int) -> Image.Image:
        o0, o1 = size * k // bands, size * (k + 1) // bands
        r0 = max(int(o0 * ratio) - margin, 0)
        r1 = min(math.ceil(o1 * ratio) + margin, transform_size)
        a, b = r0 / transform_size, r1 / transform_size
        band_quad = (nw + (sw - nw) * a, nw + (sw - nw) * b, ne + (se - ne) * b, ne + (se - ne) * a)
        rows = img.transform((transform_size, r1 - r0), Image.QUAD, tuple(np.concatenate(band_quad)),
                             Image.BILINEAR)
        return rows.resize((size, o1 - o0), Image.LANCZOS, box=(0, o0 * ratio - r0, transform_size, o1 * ratio - r0))

    with ThreadPoolExecutor(max_workers=min(bands, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(band, range(bands)))
    out = Image.new("RGB", (size, size))
    top = 0
    for part in parts:
        out.paste(part, (0, top))
        top += part.size[1]
    return out


def align_face(image, face: Face | int | None = None, size: int = 256, *, detector: str = "hog",
               transform_size: int = FFHQ_TRANSFORM_SIZE, padding: bool = True,
               models_dir: str | Path | None = None) -> AlignedFace:
    """FFHQ-align one face of a photo (DiffusionRig's input) -> AlignedFace.

    face: a Face from detect_faces on this image, an index into detect_faces' largest-first
    list, or None for the largest face. Raises ValueError ("no face ...") when none is found.
    """
    rgb = to_rgb(image)
    if not isinstance(face, Face):
        faces = detect_faces(rgb, detector=detector, models_dir=models_dir)
        if not faces:
            raise no_face_error(rgb.size, detector)
        face = select_faces(faces, "largest" if face is None else "index", face or 0)[0]
    aligned, transform = ffhq_align(rgb, face.landmarks, size, transform_size, padding)
    return AlignedFace(image=aligned, transform=transform, quad=ffhq_quad(face.landmarks)[0],
                       original_size=rgb.size, face=face)


def align_faces(image, mode: str = "all", index: int = 0, size: int = 256, *, detector: str = "hog",
                transform_size: int = FFHQ_TRANSFORM_SIZE, padding: bool = True,
                models_dir: str | Path | None = None) -> list[AlignedFace]:
    """Detect, select (see select_faces) and align: one AlignedFace per chosen face, largest first."""
    rgb = to_rgb(image)
    faces = detect_faces(rgb, detector=detector, models_dir=models_dir)
    if not faces:
        raise no_face_error(rgb.size, detector)
    return [align_face(rgb, face, size, transform_size=transform_size, padding=padding)
            for face in select_faces(faces, mode, index)]

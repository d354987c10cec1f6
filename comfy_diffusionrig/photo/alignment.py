"""Faces in ordinary photos: load, detect (68 landmarks), FFHQ-align, paste edited faces back.

DiffusionRig works on 256x256 faces aligned with the FFHQ recipe of its `scripts/align.py`
(dlib HOG detector upsampled once, 68 dlib landmarks, an oriented square from the eyes and
mouth). `align_face` reproduces that recipe: the square ("quad"), the shrink / crop / reflect-
pad + blur steps and the final 4096 px quad render + LANCZOS resize give the same pixels as the
official script (tests/test_alignment.py checks it against a literal re-derivation), and the
3x3 transform from original pixels to aligned pixels comes with it, so `paste_back` can warp an
edited face into the photo.

Coordinates are pixel indices with pixel centres at integers (dlib's landmark convention);
boxes are (x0, y0, x1, y1) with x1, y1 exclusive. Everything refers to the upright image (EXIF
orientation applied). Nothing here downloads anything: dlib models come from the
`face-recognition-models` package (or a `dlib/` folder of a ComfyUI models folder), insightface
models from `<models_dir>/insightface/models/<pack>/`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from ..core.conventions import BROWS, EYE_LEFT, EYE_RIGHT, EYES, JAW_LINE, MOUTH_LEFT, MOUTH_RIGHT

MAX_PIXELS = 100_000_000  # images above 100 MP are refused before decoding (decompression bombs)
DETECT_PIXELS = {"hog": 1_200_000, "cnn": 300_000}  # detection runs on a copy at most this big
UPSAMPLE = {"hog": 1, "cnn": 0}  # hog: official (faces from ~40 px); cnn: 4x cheaper at 0 (from ~60 px)
FFHQ_TRANSFORM_SIZE = 4096  # official align.py renders the quad at 4096 px, then resizes
HOG_CELL = 8  # dlib scan_fhog_pyramid default cell size (px of a pyramid level)
HOG_BOX_CELLS = 10  # dlib frontal face detector: 80x80 px detection box = 10 cells
DETECTORS = ("hog", "cnn", "insightface")
INSIGHTFACE_PACKS = ("buffalo_l", "antelopev2")  # model packs searched, in this order
INSTALL_HINT = "pip install dlib-bin face-recognition-models"

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Face:
    """One detected face in original-image pixels.

    box: (x0, y0, x1, y1), x1/y1 exclusive; landmarks: [68, 2] float (x, y), iBUG 68-point
    order; score: detector confidence (HOG margin, CNN confidence or insightface score).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    detector: str

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


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


# ----------------------------------------------------------------------------- images


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A path, file object or bytes -> upright 8-bit RGB PIL image (see `to_rgb`).

    The pixel count is read from the header and checked against max_pixels before anything is
    decoded; unreadable, truncated or non-image input raises ValueError saying which.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        source, name = io.BytesIO(bytes(source)), "the image bytes"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not Path(source).is_file():
            raise ValueError(f"image file {name} does not exist (or is not a file)")
    else:
        name = getattr(source, "name", "the image file")
    with warnings.catch_warnings():
        # our own max_pixels check below replaces PIL's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{name} is too large to open safely ({exc}); resize it first") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{name} is not an image this program can read ({exc}); use a JPEG, PNG, "
                             "WebP or TIFF file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} MP, above the "
                         f"{max_pixels / 1e6:.0f} MP limit (a decompression bomb, or simply too large); "
                         "downscale it first or pass a larger max_pixels")
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise ValueError(f"{name} is corrupt or truncated and cannot be decoded ({type(exc).__name__}: "
                         f"{exc}); re-export or re-download it") from exc
    return to_rgb(image)


def upright(image: Image.Image) -> Image.Image:
    """The image rotated/flipped as its EXIF orientation tag says (itself when there is none)."""
    orientation = image.getexif().get(0x0112, 1)  # 0x0112: EXIF Orientation
    return image if orientation in (1, None) else ImageOps.exif_transpose(image)


def to_rgb(image) -> Image.Image:
    """PIL image or numpy array -> upright 8-bit RGB PIL image.

    PIL: EXIF orientation applied; transparency composited on white (what viewers show);
    16-bit ("I;16", "I") scaled by 1/257, float ("F") read as [0, 1] when its maximum is <= 1,
    else as [0, 255]; CMYK, palette, grey and bilevel converted by PIL.
    numpy: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; uint8 as is, uint16 scaled by 1/257,
    float read as [0, 1] (ComfyUI images).
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    image = upright(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(image))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert a {mode} image to RGB ({exc}); save it as an RGB PNG or JPEG") from exc


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255):
        array = np.rint(np.clip(array, 0, 65535) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.rint(np.clip(array * scale, 0, 255)).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image array dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


# ----------------------------------------------------------------------------- models


def require_dlib():
    """The dlib module, or ImportError saying what to install."""
    try:
        import dlib
    except ImportError as exc:
        raise ImportError(f"face detection needs dlib and its models: {INSTALL_HINT}") from exc
    return dlib


def dlib_model_path(filename: str, models_dir: str | Path | None = None) -> Path:
    """Path of a dlib model file (e.g. "shape_predictor_68_face_landmarks.dat").

    Looked for in <models_dir>/dlib/ first, then in the installed face-recognition-models
    package, which is located without importing it (its __init__ needs pkg_resources, gone from
    recent setuptools).
    """
    searched = []
    if models_dir is not None:
        searched.append(Path(models_dir) / "dlib")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        searched += [Path(p) / "models" for p in spec.submodule_search_locations]
    else:
        try:
            dist = importlib.metadata.distribution("face_recognition_models")
            searched += [Path(dist.locate_file(f)).parent for f in dist.files or () if f.name == filename]
        except importlib.metadata.PackageNotFoundError:
            pass
    for folder in searched:
        if (folder / filename).is_file():
            return folder / filename
    where = ", ".join(str(f) for f in searched) or "nowhere (face-recognition-models is not installed)"
    raise FileNotFoundError(f"dlib model {filename} not found (looked in {where}); {INSTALL_HINT}, or put "
                            f"the file in your ComfyUI models/dlib/ folder")


@functools.lru_cache(maxsize=None)
def _hog_detector():
    return require_dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _cnn_detector(models_dir: str | None):
    path = dlib_model_path("mmod_human_face_detector.dat", models_dir)
    return require_dlib().cnn_face_detection_model_v1(str(path))


@functools.lru_cache(maxsize=None)
def _shape_predictor(models_dir: str | None):
    path = dlib_model_path("shape_predictor_68_face_landmarks.dat", models_dir)
    return require_dlib().shape_predictor(str(path))


def insightface_pack(models_dir: str | Path | None) -> Path | None:
    """Folder of the first insightface model pack present in <models_dir>/insightface/models/, or None."""
    if models_dir is None:
        return None
    for pack in INSIGHTFACE_PACKS:
        folder = Path(models_dir) / "insightface" / "models" / pack
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder
    return None


@functools.lru_cache(maxsize=None)
def insightface_app(models_dir: str):
    """insightface FaceAnalysis on the CPU from a pack already in models_dir (never downloads)."""
    pack = insightface_pack(models_dir)
    if pack is None:
        raise FileNotFoundError(f"no insightface model pack in {Path(models_dir) / 'insightface' / 'models'} "
                                f"(looked for {', '.join(INSIGHTFACE_PACKS)}); put one there, or use the "
                                "dlib detector (detector='hog')")
    try:
        from insightface.app import FaceAnalysis
    except ImportError as exc:
        raise ImportError("the insightface detector needs `pip install insightface onnxruntime`; or use "
                          "detector='hog'") from exc
    # FaceAnalysis downloads only when the pack folder is missing, which was ruled out above
    app = FaceAnalysis(name=pack.name, root=str(pack.parent.parent), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "landmark_3d_68", "recognition"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


# ----------------------------------------------------------------------------- detection


def detect_faces(image, detector: str = "hog", upsample: int | None = None, detect_pixels: int | None = None,
                 models_dir: str | Path | None = None) -> list[Face]:
    """All faces of an image, largest first.

    image: PIL image or [H, W, 3] uint8 array (anything `to_rgb` takes).
    detector: "hog" (dlib HOG, official default), "cnn" (dlib MMOD CNN: more poses, slower) or
    "insightface" (SCRFD + 68 3D landmarks, needs the package and a model pack in models_dir).
    upsample: dlib's pyramid upsampling, default UPSAMPLE[detector] (HOG at 1, the official
    setting, finds faces from ~40 px; the CNN at 0 from ~60 px of the detection copy).
    detect_pixels: dlib detects on a copy scaled down to at most this many pixels (default
    DETECT_PIXELS[detector]). Each face found on a smaller copy, and each CNN face, then gets the
    box the official recipe's full-resolution HOG detection (RGB, upsampled once) gives it, when
    that detection sees the face, and landmarks are fitted on the full-resolution image.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    rgb = to_rgb(image)
    if detector == "insightface":
        faces = _insightface_faces(rgb, models_dir)
    else:
        faces = _dlib_faces(rgb, detector, UPSAMPLE[detector] if upsample is None else upsample,
                            detect_pixels or DETECT_PIXELS[detector], None if models_dir is None else str(models_dir))
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def _dlib_faces(rgb: Image.Image, detector: str, upsample: int, detect_pixels: int,
                models_dir: str | None) -> list[Face]:
    dlib = require_dlib()
    width, height = rgb.size
    if min(width, height) < 16:  # nothing face-like fits; dlib's pyramid needs a few pixels
        return []
    scale = min(1.0, math.sqrt(detect_pixels / (width * height)))
    work = rgb if scale == 1.0 else rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                Image.BILINEAR, reducing_gap=2.0)
    sx, sy = width / work.size[0], height / work.size[1]
    if detector == "hog":
        # grey is 1.5x faster than RGB (where dlib takes each pixel's strongest channel) and
        # gives the same boxes on the example photos
        rects, scores, _ = _hog_detector().run(np.asarray(work.convert("L")), upsample)
    else:
        found = _cnn_detector(models_dir)(np.asarray(work), upsample)
        rects, scores = [d.rect for d in found], [d.confidence for d in found]
    predictor = _shape_predictor(models_dir)
    full = np.asarray(rgb)
    faces = []
    for rect, score in zip(rects, scores):
        box = (rect.left() * sx, rect.top() * sy, (rect.right() + 1) * sx, (rect.bottom() + 1) * sy)
        # a box found on a downscaled copy, or by the CNN, is replaced by the box the official
        # full-resolution HOG detection gives this face (the landmarks depend on the box to the pixel)
        official = _official_hog_box(full, box) if scale < 1.0 or detector == "cnn" else None
        if official is not None:
            box = official
        full_rect = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
        shape = predictor(full, full_rect)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        faces.append(Face(box=box, landmarks=landmarks, score=float(score), detector=detector))
    return faces


# dlib's HOG detector with upsampling 1 doubles the photo (bilinear), builds a pyramid whose levels
# are each floor(5/6) of the previous one (bilinear, first pixel to first, last to last), and scans
# every level with an 80x80 px (10-cell) window on an 8 px cell grid; a hit at (level, cell) is
# mapped back to photo pixels with the nominal 6/5 ratio and rounded. So the official box is a
# function of the level and cell alone: _official_hog_box finds them from a window of the photo
# instead of the whole photo. The window starts on the whole photo's cell grid of the two levels
# the face can be found on, and is resampled with dlib's own resize_image level by level up to the
# face's level, each step to the size that keeps the window's pixels on the whole photo's pyramid
# positions (within half a pixel at the window's far end); dlib scans from that level on.

_GRID_TOLERANCE = 0.15  # level px off the photo's cell grid a window may start (0.4 lost 3 of 44 official boxes)


def _on_cell_grid(cells):
    """Whether positions given in cells (a number or an array) lie on the cell grid, within _GRID_TOLERANCE
    level pixels."""
    return np.abs(cells - np.round(cells)) * HOG_CELL < _GRID_TOLERANCE


def _pyramid_sizes(size: int, axis: int) -> list[int]:
    """Pixel counts of the pyramid levels along one axis (0: columns, 1: rows) of a photo this size
    in dlib's HOG detection upsampled once: pyramid_up gives 2w+2 columns and 2h+1 rows, each
    level after that floor(5n/6). Level k maps to the photo by (size - 1) / (n_k - 1) px per px."""
    n = 2 * size + 2 if axis == 0 else 2 * size + 1
    sizes = [n]
    while n > HOG_CELL * HOG_BOX_CELLS // 2:
        n = 5 * n // 6
        sizes.append(n)
    return sizes


def _window_axis(lo: float, hi: float, size: int, axis: int, level: int) -> tuple[int, int, list[int]]:
    """A window of one photo axis covering [lo, hi) -> (start, length, sizes of its levels 0..level).

    The start lies on the photo's cell grid of `level` and `level + 1` (within _GRID_TOLERANCE, else
    0); the length (up to a cell more than needed) and level sizes are chosen so that the window's
    levels `level` (resized by us) and `level + 1` (floor(5n/6), by dlib) sample where the photo's do.
    """
    full = _pyramid_sizes(size, axis)
    levels = [k for k in (level, level + 1) if k < len(full)]
    cell = [HOG_CELL * (size - 1) / (full[k] - 1) for k in levels]  # photo px per cell
    first = min(max(int(math.floor(lo)), 0), size - 1)
    candidates = np.arange(first, max(first - int(60 * cell[-1]), 0), -1)
    on_grid = np.ones(len(candidates), bool)
    for c in cell:
        on_grid &= _on_cell_grid(candidates / c)
    start = int(candidates[on_grid][0]) if on_grid.any() else 0
    shortest = min(max(int(math.ceil(hi)) - start, 2), size - start)

    def fit(length: int) -> tuple[float, list[int]]:
        target = [(length - 1) * (full[k] - 1) / (size - 1) for k in range(level + 2) if k < len(full)]
        sizes = [round(t) + 1 for t in target[:level + 1]]
        error = abs(sizes[-1] - 1 - target[level])
        if len(target) > level + 1:  # dlib makes the next level floor(5n/6)
            error = max(error, abs(5 * sizes[-1] // 6 - 1 - target[level + 1]))
        return error * (hi - start) / max(length, 1), sizes  # level px at the far side of the face

    lengths = range(shortest, min(shortest + int(cell[-1]), size - start) + 1)
    length = min(lengths, key=lambda n: fit(n)[0])
    return start, length, fit(length)[1]


def _hog_rect(level: int, cell_x: int, cell_y: int) -> tuple[int, int, int, int]:
    """dlib's box (left, top, right, bottom, inclusive) for a hit at this level and cell, in px of
    the pyramid's base image (dlib's fhog_to_image, then rect_up by `level` 6/5 steps, rounded)."""
    corners = []
    half = HOG_CELL // 2
    for cx, cy in ((cell_x, cell_y), (cell_x + HOG_BOX_CELLS - 1, cell_y + HOG_BOX_CELLS - 1)):
        x, y = cx * HOG_CELL + 1, cy * HOG_CELL + 1  # cell corner, then its centre (away from 0)
        x, y = float(x + (half if x >= 0 else -half)), float(y + (half if y >= 0 else -half))
        for _ in range(level):
            x, y = x * 1.2 + 0.3, y * 1.2 + 0.3  # pyramid_down<6>::point_up
        corners += [_lround(x), _lround(y)]
    return corners[0], corners[1], corners[2], corners[3]


def _lround(value: float) -> int:
    """C's lround: halves away from zero (dlib rounds rectangles with it)."""
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def _hog_cell_of(rect: tuple[int, int, int, int]) -> tuple[int, int, int] | None:
    """(level, cell_x, cell_y) whose _hog_rect is exactly rect, or None."""
    guess = math.log(max(rect[2] - rect[0], 1) / (HOG_CELL * (HOG_BOX_CELLS - 1))) / math.log(1.2)
    for level in range(max(int(guess) - 1, 0), int(guess) + 3):
        pitch = HOG_CELL * 1.2 ** level
        for cx in range(int(rect[0] / pitch) - 2, int(rect[0] / pitch) + 3):
            for cy in range(int(rect[1] / pitch) - 2, int(rect[1] / pitch) + 3):
                if _hog_rect(level, cx, cy) == tuple(rect):
                    return level, cx, cy
    return None


def _official_hog_box(full: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, ...] | None:
    """The box (x0, y0, x1, y1 exclusive) that dlib's HOG detector, run as the official recipe runs
    it (RGB photo, upsampled once), gives the face near `box`; None when it finds none there.

    full: [H, W, 3] uint8 photo; box: a rough box of the face in its pixels (within ~10 %).
    A window reproduces the whole photo's hits on two adjacent pyramid levels only (its pixels sit
    within a fraction of a pixel of the whole photo's pyramid, so the scores agree to a few per
    cent and the best hit's box is the same), so the face's best level is climbed to: down a level
    while the lower of the pair wins, up while the upper one (or a level above the pair) wins; a
    CNN box, smaller than HOG's, is usually a level or two low. A step up is cut from the last
    window when it can be (`_derived_window`), which saves resampling the photo again.
    """
    height, width = full.shape[:2]
    top = min(len(_pyramid_sizes(width, 0)), len(_pyramid_sizes(height, 1))) - 2
    size = max(box[2] - box[0], box[3] - box[1], HOG_CELL * HOG_BOX_CELLS / 2)
    # the level whose 10-cell box is this size: a rough HOG box's face is mostly on it or the next
    level = min(max(int(math.log(size / (HOG_CELL * (HOG_BOX_CELLS - 1) / 2)) / math.log(1.2)), 0), top)
    paired, tried, hit, window = [], set(), None, None
    while 0 <= level <= top and level not in tried and len(tried) < 4:
        tried.add(level)
        # a level up from the last window: a crop of that window's next level (no new resampling chain)
        derived = _derived_window(full, box, window) if window is not None and window.level == level - 1 else None
        hit, window = derived if derived is not None else _window_hit(full, box, level)
        if hit is None:
            break
        if hit[2] in (level, level + 1):
            paired.append(hit)
        level = level - 1 if hit[2] == level else hit[2]
    if paired:
        return max(paired, key=lambda h: h[1])[0]
    return None if hit is None else hit[0]


@dataclass
class _Window:
    """A window's image at pyramid level `level` and where its pixel (0, 0) sits in the photo (photo
    pixels; on the cell grid of that level and the next)."""

    image: np.ndarray
    level: int
    origin: tuple[float, float]  # (x, y)


def _margin(size: float, level: int) -> float:
    """Photo pixels around a rough face box that a hit on levels `level` and `level + 1` reads: one cell of
    filter padding and one of HOG block normalisation each side, plus the rough box's own error (up to
    ~6 % measured)."""
    return 0.1 * size + (2 * HOG_CELL * 1.2 ** (level + 1) + HOG_CELL) / 2


def _window_hit(full: np.ndarray, box: tuple[float, float, float, float],
                level: int) -> tuple[tuple[tuple[float, ...], float, int] | None, _Window]:
    """The official HOG hit on this face from a window true to pyramid levels `level` and
    `level + 1`: ((box, score, level) or None when no hit there overlaps `box`, the window).

    The window gets the room a window a level up needs when one can then be cut from it
    (`_derived_window`: big faces, where resampling the photo again costs most), else the room
    its own two levels need."""
    dlib = require_dlib()
    height, width = full.shape[:2]
    size = max(box[2] - box[0], box[3] - box[1])
    for margin in (_margin(size, level + 1), _margin(size, level)):
        x0, w, cols = _window_axis(box[0] - margin, box[2] + margin, width, 0, level)
        y0, h, rows = _window_axis(box[1] - margin, box[3] + margin, height, 1, level)
        if _next_crop(full.shape, box, level, (float(x0), float(y0)), (rows[-1], cols[-1])) is not None:
            break
    base = np.ascontiguousarray(full[y0:y0 + h, x0:x0 + w])
    for n_rows, n_cols in zip(rows, cols):
        base = dlib.resize_image(base, n_rows, n_cols)
    window = _Window(base, level, (float(x0), float(y0)))
    return _best_hit(full.shape, box, window), window


def _next_crop(shape: tuple[int, ...], box: tuple[float, float, float, float], level: int,
               origin: tuple[float, float], image_hw: tuple[int, int]):
    """Where `_derived_window` cuts the window a level up from a window at `level` with this origin
    (photo px) and image size: ((x, width), (y, height)) in its next level's pixels and the cut's
    origin in photo px, or None when no cut fits."""
    height, width = shape[:2]
    full_rows, full_cols = _pyramid_sizes(height, 1), _pyramid_sizes(width, 0)
    up = level + 1
    if up + 1 >= min(len(full_rows), len(full_cols)):
        return None
    margin = _margin(max(box[2] - box[0], box[3] - box[1]), up)
    crop, cut_origin = [], []
    for axis, (lo, hi), sizes, photo in ((0, (box[0], box[2]), full_cols, width), (1, (box[1], box[3]), full_rows,
                                                                                     height)):
        scale = (sizes[up] - 1) / (photo - 1)  # level px per photo px
        first = round(origin[axis] * scale)  # the window's pixel 0 on this level (a whole pixel)
        found = _crop_axis((lo - margin) * scale, (hi + margin) * scale, first, 5 * image_hw[1 - axis] // 6,
                           (sizes[up + 1] - 1) / (sizes[up] - 1))
        if found is None:
            return None
        crop.append(found)
        cut_origin.append((first + found[0]) / scale)
    return crop, (cut_origin[0], cut_origin[1])


def _derived_window(full: np.ndarray, box: tuple[float, float, float, float],
                    window: _Window) -> tuple[tuple[tuple[float, ...], float, int] | None, _Window] | None:
    """The hit on levels `window.level + 1` and `+ 2` from the window's next level (dlib's own 5/6 step
    of it, which sits on the whole photo's next level) cropped to start on both levels' cell grids and
    sized so that dlib's step after it samples where the photo's does: the same hit as `_window_hit`
    of that level, without resampling the photo again. None when no such crop fits in the window."""
    rows, cols = window.image.shape[:2]
    cut = _next_crop(full.shape, box, window.level, window.origin, (rows, cols))
    if cut is None:
        return None
    ((sx, w), (sy, h)), origin = cut
    image = require_dlib().resize_image(window.image, 5 * rows // 6, 5 * cols // 6)
    derived = _Window(np.ascontiguousarray(image[sy:sy + h, sx:sx + w]), window.level + 1, origin)
    return _best_hit(full.shape, box, derived), derived


def _crop_axis(lo: float, hi: float, origin: int, available: int, ratio: float) -> tuple[int, int] | None:
    """A crop (start, length) along one axis of a level image whose pixel 0 is the photo's level pixel
    `origin`: starting on the level's cell grid and, within _GRID_TOLERANCE, on the next level's (level
    pixels times `ratio` = next level pixels), covering [lo, hi) (level pixels), the length chosen so
    that the next level's last sample lands nearest the photo's. None when none fits."""
    first = min(int(math.floor(lo)), origin + available - 1)
    start = None
    for position in range(first - first % HOG_CELL, origin - 1, -HOG_CELL):
        if _on_cell_grid(position * ratio / HOG_CELL):
            start = position
            break
    if start is None:
        return None
    shortest, longest = max(int(math.ceil(hi)) - start, 2), origin + available - start
    if shortest > longest:
        return None

    def error(length: int) -> float:  # next-level px at the far side of the face
        return abs(5 * length // 6 - 1 - (length - 1) * ratio) * (hi - start) / length

    length = min(range(shortest, min(shortest + 2 * HOG_CELL, longest) + 1), key=error)
    return start - origin, length


def _best_hit(shape: tuple[int, ...], box: tuple[float, float, float, float],
              window: _Window) -> tuple[tuple[float, ...], float, int] | None:
    """dlib's HOG hits in the window (scanned from its level down), mapped to the photo: the one that best
    overlaps `box` as (box, score, level), or None."""
    height, width = shape[:2]
    rects, scores, _ = _hog_detector().run(window.image, 0)
    full_rows, full_cols = _pyramid_sizes(height, 1), _pyramid_sizes(width, 0)
    level = window.level
    best, best_overlap = None, 0.3  # a hit must overlap the rough box by at least this IoU
    for rect, score in zip(rects, scores):
        found = _hog_cell_of((rect.left(), rect.top(), rect.right(), rect.bottom()))
        if found is None or found[0] + level >= min(len(full_rows), len(full_cols)):
            continue
        k = found[0] + level
        cx = found[1] + round(window.origin[0] * (full_cols[k] - 1) / (width - 1) / HOG_CELL)
        cy = found[2] + round(window.origin[1] * (full_rows[k] - 1) / (height - 1) / HOG_CELL)
        left, top, right, bottom = _hog_rect(k, cx, cy)
        # pyramid_down<2>::point_down maps the upsampled photo back to the photo
        candidate = (float(_lround(left / 2 - 1.25)), float(_lround(top / 2 - 0.75)),
                     float(_lround(right / 2 - 1.25) + 1), float(_lround(bottom / 2 - 0.75) + 1))
        overlap = _iou(candidate, box)
        if overlap > best_overlap:
            best, best_overlap = (candidate, float(score), k), overlap
    return best


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _insightface_faces(rgb: Image.Image, models_dir) -> list[Face]:
    if models_dir is None:
        raise ValueError("detector='insightface' needs models_dir (the ComfyUI models folder holding "
                         "insightface/models/buffalo_l)")
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    faces = []
    for found in insightface_app(str(models_dir)).get(bgr):
        if getattr(found, "landmark_3d_68", None) is None:
            raise ValueError("the insightface model pack has no 68-point landmark model (1k3d68.onnx); "
                             "use buffalo_l or detector='hog'")
        box = tuple(float(v) for v in found.bbox[:4])
        faces.append(Face(box=box, landmarks=np.asarray(found.landmark_3d_68, np.float64)[:, :2],
                          score=float(found.det_score), detector="insightface"))
    return faces


class NoFaceError(ValueError):
    """No face was found in an image (a ValueError whose message contains "no face" and what to try)."""


def no_face_error(image_size: tuple[int, int], detector: str) -> NoFaceError:
    width, height = image_size
    return NoFaceError(f"no face found in the {width}x{height} image (detector {detector!r}); try "
                      "detector='cnn' (profiles, small or dark faces), upsample=2 for faces under 40 px, a "
                      "larger detect_pixels for small faces in big photos, or a photo with a clearly visible, "
                      "roughly frontal face")


def select_faces(faces: Sequence[Face], mode: str = "largest", index: int = 0) -> list[Face]:
    """Pick faces from a largest-first list: "largest" -> [faces[0]], "index" -> [faces[index]],
    "all" -> every face (a batch). An empty list raises the "no face" ValueError."""
    if mode not in ("largest", "index", "all"):
        raise ValueError(f"unknown face selection {mode!r}; choose 'largest', 'index' or 'all'")
    if not faces:
        raise NoFaceError("no face found to select from; try detector='cnn', upsample=2 or a clearer photo")
    if mode == "all":
        return list(faces)
    if mode == "largest":
        return [faces[0]]
    if not -len(faces) <= index < len(faces):
        raise ValueError(f"face index {index} asked for, but only {len(faces)} face(s) were found "
                         f"(indices 0..{len(faces) - 1}, largest first)")
    return [faces[index]]


# ----------------------------------------------------------------------------- FFHQ alignment


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


# ----------------------------------------------------------------------------- paste back


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

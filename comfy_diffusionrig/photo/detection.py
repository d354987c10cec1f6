"""Face detection and 68 landmarks: dlib's HOG and CNN detectors (the official recipe), insightface, and the
model files they need. Nothing is downloaded: dlib models come from the `face-recognition-models` package
(or a `dlib/` folder of a ComfyUI models folder), insightface models from `<models_dir>/insightface/models/<pack>/`.

Coordinates are pixel indices with pixel centres at integers (dlib's landmark convention); boxes are
(x0, y0, x1, y1) with x1, y1 exclusive, in the upright image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .detector_models import _cnn_detector, _hog_detector, _shape_predictor, insightface_app, require_dlib
from .loading import to_rgb
from .pyramid import _official_hog_box

DETECT_PIXELS = {"hog": 1_200_000, "cnn": 300_000}  # detection runs on a copy at most this big
UPSAMPLE = {"hog": 1, "cnn": 0}  # hog: official (faces from ~40 px); cnn: 4x cheaper at 0 (from ~60 px)
DETECTORS = ("hog", "cnn", "insightface")


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


def detect_faces(image, detector: str = "hog", upsample: int | None = None, detect_pixels: int | None = None,
                 models_dir: str | Path | None = None) -> list[Face]:
    """All faces of an image, largest first.

    image: PIL image or [H, W, 3] uint8 array (anything `to_rgb` takes).
    detector: "hog" (dlib HOG, official default), "cnn" (dlib MMOD CNN: more poses, slower) or
    "insightface" (SCRFD + 68 3D landmarks, needs the package and a model pack in models_dir).
    upsample: dlib's pyramid upsampling, default UPSAMPLE[detector] (HOG at 1, the official
    setting, finds faces from ~40 px; the CNN at 0 from ~60 px of the detection copy).
    detect_pixels: dlib detects on a copy scaled down to at most this many pixels (default
    DETECT_PIXELS[detector]). A HOG detection within it is the official recipe's own (the RGB photo,
    upsampled once). Each face found on a smaller copy, and each CNN face, then gets the
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
        # at full resolution this is the official detection itself, on the RGB photo: dlib's HOG takes
        # each pixel's strongest-gradient channel, and grey (1.3x faster) can pick another face box
        # (a group photo's face got a box a pyramid level larger, 1.2x). A downscaled copy's boxes only
        # seed the full-resolution search, which reads the RGB photo, so the copy is scanned in grey.
        scan = np.asarray(work if scale == 1.0 else work.convert("L"))
        rects, scores, _ = _hog_detector().run(scan, upsample)
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

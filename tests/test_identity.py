"""Identity similarity: same person across a photo and its aligned / edited crops, different
people apart, thresholds and the optional ArcFace backend."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import NO_DLIB  # noqa: E402

pytest.importorskip("dlib", reason=NO_DLIB)

from comfy_diffusionrig.photo.alignment import align_face  # noqa: E402
from comfy_diffusionrig.photo.loading import load_image  # noqa: E402

from comfy_diffusionrig.photo.detector_models import insightface_app  # noqa: E402
from comfy_diffusionrig.photo.identity import (  # noqa: E402
    ARCFACE_COSINE_THRESHOLD,
    DLIB_DISTANCE_THRESHOLD,
    IdentityResult,
    face_descriptor,
    face_similarity,
    resolve_backend,
)

from conftest import EXAMPLES, skip_module_without_dlib_model  # noqa: E402

skip_module_without_dlib_model("dlib_face_recognition_resnet_model_v1.dat")


@pytest.fixture(scope="module")
def photos():
    return {name: load_image(EXAMPLES / f"{name}") for name in ("astronaut.png", "grace_hopper.jpg")}


def test_same_person_across_alignment_and_mild_edit(photos):
    """A photo and its aligned, blurred, brightened crop: dlib distance well under 0.6
    (measured 0.14); two different women: over 0.6 (measured 0.70)."""
    astro, hopper = photos["astronaut.png"], photos["grace_hopper.jpg"]
    aligned = align_face(astro).image
    edited = Image.eval(aligned.filter(ImageFilter.GaussianBlur(1.0)), lambda v: min(255, int(v * 1.1)))
    same = face_similarity(astro, edited, backend="dlib")
    assert isinstance(same, IdentityResult) and same.backend == "dlib"
    assert same.same_person and same.score > 1 - 0.3, same.verdict
    assert same.verdict.startswith("same person")
    other = face_similarity(aligned, align_face(hopper).image)
    assert not other.same_person and other.score < 1 - DLIB_DISTANCE_THRESHOLD, other.verdict
    assert other.verdict.startswith("different people")
    assert other.threshold == pytest.approx(1 - DLIB_DISTANCE_THRESHOLD)


def test_descriptor_properties(photos):
    astro = photos["astronaut.png"]
    d = face_descriptor(astro)
    assert d.shape == (128,) and np.isfinite(d).all()
    np.testing.assert_allclose(face_descriptor(np.asarray(astro)), d, atol=1e-6)  # array input = PIL input
    assert face_similarity(astro, astro).score == pytest.approx(1.0, abs=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="no face"):
        face_similarity(Image.new("RGB", (200, 200), (40, 40, 40)), Image.new("RGB", (200, 200)), backend="dlib")
    with pytest.raises(ValueError, match="unknown identity backend"):
        face_similarity(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), backend="facenet")
    with pytest.raises(ValueError, match="needs models_dir"):
        face_descriptor(Image.new("RGB", (8, 8)), backend="arcface")


def test_arcface_backend_chosen_when_present(tmp_path, monkeypatch, photos):
    """auto picks ArcFace only when insightface imports and a pack is in the models folder;
    a stand-in package checks the cosine score and its threshold."""
    assert resolve_backend("auto", tmp_path) == "dlib"
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "w600k_r50.onnx").write_bytes(b"")

    class FakeApp:
        def __init__(self, **kwargs):
            pass

        def prepare(self, **kwargs):
            pass

        def get(self, bgr):
            # embedding from the mean colour: the two photos differ, a photo matches itself
            colour = bgr.reshape(-1, 3).mean(0)
            emb = np.r_[colour, 100.0]
            return [types.SimpleNamespace(bbox=np.array([0, 0, 10, 10]), normed_embedding=emb / np.linalg.norm(emb))]

    module, app_module = types.ModuleType("insightface"), types.ModuleType("insightface.app")
    app_module.FaceAnalysis = FakeApp
    module.app = app_module
    monkeypatch.setitem(sys.modules, "insightface", module)
    monkeypatch.setitem(sys.modules, "insightface.app", app_module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "insightface" else None)
    insightface_app.cache_clear()
    try:
        assert resolve_backend("auto", tmp_path) == "arcface"
        astro = photos["astronaut.png"]
        result = face_similarity(astro, astro, models_dir=tmp_path)
    finally:
        insightface_app.cache_clear()
    assert result.backend == "arcface" and result.threshold == ARCFACE_COSINE_THRESHOLD
    assert result.score == pytest.approx(1.0) and result.same_person

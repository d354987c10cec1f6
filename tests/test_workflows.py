"""Every shipped workflow: only known nodes, widget values that fit, consistent links, up to date with
tools/make_workflows.py, and it runs end to end on the offline demo assets (node functions called
directly in dependency order, as ComfyUI's executor would; the real ComfyUI run is test_comfyui.py)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_workflows import build_all  # noqa: E402
from run_workflow import run_prompt  # noqa: E402
from workflow_format import CONTROL_BY_NAME, check_workflow, has_control_widget, to_api  # noqa: E402

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_there_are_workflows_for_every_task():
    names = {p.stem for p in WORKFLOWS}
    assert {"relight_from_reference", "relight_sliders_lit_sphere", "expression_pose_transfer", "light_sweep_video",
            "paste_back_upscale", "personalize_and_relight", "relight_preset", "relight_hdri_environment",
            "relight_video_clip", "relight_demo_person", "relight_large_photo"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_consistent_and_up_to_date(path):
    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, nodes.NODE_CLASS_MAPPINGS) == []
    assert build_all()[path.stem] == workflow, "regenerate with: python tools/make_workflows.py"


def test_the_checker_catches_broken_workflows():
    workflow = json.loads((ROOT / "workflows" / "relight_sliders_lit_sphere.json").read_text())
    unknown = copy.deepcopy(workflow)
    unknown["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown node type" in p for p in check_workflow(unknown, nodes.NODE_CLASS_MAPPINGS))
    widgets = copy.deepcopy(workflow)
    relight = next(n for n in widgets["nodes"] if n["type"] == "DiffusionRigRelight")
    relight["widgets_values"][0] = "candlelight"
    assert any("not one of" in p for p in check_workflow(widgets, nodes.NODE_CLASS_MAPPINGS))
    relight["widgets_values"] = relight["widgets_values"][:2]
    assert check_workflow(widgets, nodes.NODE_CLASS_MAPPINGS)
    unlinked = copy.deepcopy(workflow)
    link = unlinked["links"].pop()
    assert any(str(link[0]) in p for p in check_workflow(unlinked, nodes.NODE_CLASS_MAPPINGS))


def test_control_widgets_follow_the_frontends_rule():
    """comfyui-frontend-package 1.27 (useIntWidget): an INT input gets a control-after-generate widget, whose
    value is saved right after the input's own, when its spec says control_after_generate, or, when the spec
    does not say, when it is named seed or noise_seed (`spec.control_after_generate ?? [names].includes(name)`)."""
    assert has_control_widget("seed", ("INT", {"min": 0}))
    assert has_control_widget("noise_seed", ("INT",))
    assert has_control_widget("steps", ("INT", {"control_after_generate": True}))
    assert not has_control_widget("seed", ("INT", {"control_after_generate": False}))
    assert not has_control_widget("steps", ("INT", {"default": 20}))
    assert not has_control_widget("seed", ("FLOAT", {}))
    with pytest.raises(ValueError, match="INT inputs only"):
        has_control_widget("preset", (["a", "b"], {"control_after_generate": True}))


def test_every_seed_input_says_control_after_generate():
    """The node specs say what the frontend does anyway: an INT seed gets a control widget."""
    seeds = 0
    for node_type, cls in nodes.NODE_CLASS_MAPPINGS.items():
        for section in cls.INPUT_TYPES().values():
            for name, entry in section.items():
                if entry[0] == "INT" and name in CONTROL_BY_NAME:
                    seeds += 1
                    assert entry[1].get("control_after_generate") is True, f"{node_type}.{name}"
    assert seeds >= 3  # Sampler, Train, Relight Video Clip


def test_the_checker_catches_a_seed_without_its_control_value():
    """relight_video_clip.json as it was shipped (no value after the seed): the frontend read steps=
    'inversion', start='hog', detector=0; the checker names the seed."""
    workflow = json.loads((ROOT / "workflows" / "relight_video_clip.json").read_text())
    clip = next(n for n in workflow["nodes"] if n["type"] == "DiffusionRigRelightVideoClip")
    values = clip["widgets_values"]
    at = values.index("fixed")
    assert to_api(workflow, nodes.NODE_CLASS_MAPPINGS)[str(clip["id"])]["inputs"]["steps"] == values[at + 1]
    del values[at]
    problems = check_workflow(workflow, nodes.NODE_CLASS_MAPPINGS)
    assert any("seed lacks its control-after-generate value" in p for p in problems), problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_the_demo_assets(path, demo_person, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    prompt = to_api(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)
    for spec in prompt.values():  # a few steps are enough to run every node; the graph is unchanged
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    run_prompt(prompt, tmp_path)
    saved = list(tmp_path.glob("*.pt"))
    assert saved, "the workflow saved no image"
    for file in saved:
        image = torch.load(file, weights_only=True)
        assert image.ndim == 4 and image.shape[-1] == 3 and bool(torch.isfinite(image).all())
        assert 0 <= float(image.min()) and float(image.max()) <= 1


def test_the_upscaled_face_is_pasted_into_the_full_size_photo(demo_models, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    prompt = to_api(json.loads((ROOT / "workflows" / "paste_back_upscale.json").read_text()), nodes.NODE_CLASS_MAPPINGS)
    for spec in prompt.values():
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    results = run_prompt(prompt, tmp_path)
    by_type = {spec["class_type"]: results[node_id] for node_id, spec in prompt.items()}
    photo, edit = by_type["DiffusionRigLoadPhoto"][0], by_type["DiffusionRigSampler"][0]
    upscaled, (pasted, mask, _) = by_type["ImageUpscaleWithModel"][0], by_type["DiffusionRigPasteBack"]
    assert edit.shape[1:3] == (256, 256) and upscaled.shape[1:3] == (1024, 1024)
    assert pasted.shape == photo.shape  # the photo's own resolution, not the upscaler's
    outside = mask[0] == 0
    assert torch.equal(pasted[0][outside], photo[0][outside]) and not torch.equal(pasted, photo)


def test_a_sampler_inverting_itself_still_runs_and_gives_the_invert_nodes_edit(demo_person, tmp_path, monkeypatch):
    """Workflows saved before DiffusionRig Invert wire the photo and its buffers into the Sampler (start =
    inversion): that still runs, and gives exactly what the shipped Invert -> Sampler wiring gives."""
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    prompt = to_api(json.loads((ROOT / "workflows" / "relight_sliders_lit_sphere.json").read_text()),
                    nodes.NODE_CLASS_MAPPINGS)
    for spec in prompt.values():
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    (invert,) = [i for i, spec in prompt.items() if spec["class_type"] == "DiffusionRigInvert"]
    (sampler,) = [i for i, spec in prompt.items() if spec["class_type"] == "DiffusionRigSampler"]
    assert prompt[sampler]["inputs"]["inverted_start"] == [invert, 0]
    old = copy.deepcopy(prompt[sampler])
    del old["inputs"]["inverted_start"]
    old["inputs"].update({k: prompt[invert]["inputs"][k] for k in ("source_image", "source_buffers")})
    prompt["old_sampler"] = old
    results = run_prompt(prompt, tmp_path)
    assert torch.equal(results["old_sampler"][0], results[sampler][0])

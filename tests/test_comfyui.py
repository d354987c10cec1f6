"""Integration with a real ComfyUI, through its HTTP API: the pack loads and registers every node, the
example photos' previews are served, POST /free releases our models (read from ComfyUI's own log), a light
change re-runs the sampling while ComfyUI reuses DiffusionRig Invert's cached output, an uploaded photo runs,
our host helpers work against comfy.model_management in-process, and, on a machine
with a GPU, servers with --lowvram and --gpu-only run the upscaling workflow. The shipped workflows run
through the real frontend in test_frontend.py.

Skipped unless COMFYUI_DIR points to a ComfyUI checkout (ComfyUI is not on PyPI and CI cannot fetch
it); the server (tests/real_comfyui.py, which says how to set one up) is shared with test_frontend.py.
Workflows posted here are converted to API format by tools/workflow_format.py, every "steps" input
set to 2. `-s` prints each run's time inside ComfyUI; the server's log is kept in pytest's temporary
folder (its path is in any failure message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from real_comfyui import COMFYUI_DIR, COMFYUI_PYTHON, NO_COMFYUI, REPO, cached_nodes, check_outputs, \
    check_pasted_upscale, execution_errors, get_json, log_tail, post_json, start_comfyui, wait_for

import nodes

sys.path.insert(0, str(REPO / "tools"))
from workflow_format import to_api  # noqa: E402

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason=NO_COMFYUI)


def test_pack_imports_and_registers_every_node(comfyui_server):
    url, log = comfyui_server
    text = log.read_text(errors="replace")
    ours = [line for line in text.splitlines() if "comfy-diffusionrig" in line]
    assert ours, f"ComfyUI did not load the pack; {log_tail(log)}"
    assert not any("IMPORT FAILED" in line for line in ours), log_tail(log)
    info = get_json(f"{url}/object_info", timeout=60)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} is not registered in ComfyUI"
        registered = info[name]
        inputs = cls.INPUT_TYPES()
        assert set(registered["input"]["required"]) == set(inputs["required"]), name
        assert set(registered["input"].get("optional", {})) == set(inputs.get("optional", {})), name
        assert registered["output"] == list(cls.RETURN_TYPES), name
        assert registered["category"] == cls.CATEGORY, name
        assert registered["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[name], name
    # model and photo combos are filled through ComfyUI's folder_paths: the demo assets, the example photos
    required = {name: info[name]["input"]["required"] for name in info}
    assert "synthetic_random_diffusionrig.pt" in required["DiffusionRigLoadModel"]["ckpt_name"][0]
    assert "deca_model.tar" in required["DiffusionRigLoadDECA"]["deca_model"][0]
    assert "examples/astronaut.png" in required["DiffusionRigLoadPhoto"]["image"][0]

def test_example_photos_are_served_where_the_frontend_previews_them(comfyui_server):
    """Load Face Photo's examples/<name> are previewed with GET /view?type=input&subfolder=examples&filename=
    <name> (the frontend's request for a photo of the input folder): answered with the pack's file, on both
    of ComfyUI's paths; other names and subfolders still get ComfyUI's own 404."""
    url, _ = comfyui_server
    photo = (REPO / "example_images" / "grace_hopper.jpg").read_bytes()
    for path in ("/view", "/api/view"):
        with urllib.request.urlopen(f"{url}{path}?filename=grace_hopper.jpg&type=input&subfolder=examples") as answer:
            assert answer.status == 200 and answer.read() == photo
    for query in ("filename=no_such_photo.png&type=input&subfolder=examples",
                  "filename=grace_hopper.jpg&type=input&subfolder=other",
                  "filename=grace_hopper.jpg&type=output&subfolder=examples"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/view?{query}")
        assert refused.value.code == 404, query


def _prompt(name: str) -> dict:
    """A workflow of workflows/ in API format, with 2 sampler/training steps (every node runs; same graph)."""
    prompt = to_api(json.loads((REPO / "workflows" / f"{name}.json").read_text()), nodes.NODE_CLASS_MAPPINGS)
    for spec in prompt.values():
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    return prompt


def _run(url: str, log: Path, prompt: dict, what: str) -> tuple[dict, float]:
    """Queue a prompt, wait for it, fail with ComfyUI's error unless it succeeded: (history entry, seconds)."""
    started = time.monotonic()
    try:
        prompt_id = post_json(f"{url}/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
    except urllib.error.HTTPError as error:
        pytest.fail(f"ComfyUI rejected {what}: {error.code} {error.read().decode(errors='replace')[:4000]}")
    entry = wait_for(url, prompt_id, log)
    assert entry["status"]["status_str"] == "success", \
        f"{what} failed in ComfyUI: {json.dumps(execution_errors(entry))[:4000]}"
    return entry, time.monotonic() - started


def _log_since(log: Path, offset: int) -> str:
    return log.read_text(errors="replace")[offset:]


def _free_models(url: str, log: Path, offset: int, tries: int = 4) -> None:
    """POST /free {"unload_models": true} until ComfyUI logs "Unloading" for DiffusionRig and DECA: the flag only
    wakes a worker that is already waiting, so one sent while it finishes the previous prompt waits for the next."""
    wanted = ("Unloading DiffusionRig", "Unloading DECA")
    for _ in range(tries):
        time.sleep(2)
        request = urllib.request.Request(f"{url}/free", data=json.dumps({"unload_models": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(text in _log_since(log, offset) for text in wanted):
                return
            time.sleep(0.5)
    pytest.fail(f"POST /free: {wanted} not in ComfyUI's log; {log_tail(log)}")


def _set(prompt: dict, class_type: str, **inputs) -> None:
    for spec in prompt.values():
        if spec["class_type"] == class_type:
            spec["inputs"].update(inputs)


def test_free_memory_unloads_our_models_and_the_next_run_loads_them_again(comfyui_server):
    """ComfyUI's own log of its loaded-model list: load_models_gpu logs "Requested to load <class>" only for a
    model not in the list, and free_memory logs "Unloading <class>" (DEBUG) for each model it drops. A re-run
    with only a new seed reuses the loaded models; after POST /free {"unload_models": true} ComfyUI unloads
    DiffusionRig and DECA, and the next run has to load DiffusionRig again."""
    url, log = comfyui_server
    prompt = _prompt("relight_sliders_lit_sphere")
    _set(prompt, "DiffusionRigSampler", seed=101)
    _run(url, log, prompt, "first run")
    offset = len(log.read_text(errors="replace"))
    _set(prompt, "DiffusionRigSampler", seed=102)  # only the sampler runs again, with the cached models
    _run(url, log, prompt, "re-run")
    assert "Requested to load DiffusionRig" not in _log_since(log, offset), "a loaded model was loaded again"
    offset = len(log.read_text(errors="replace"))
    _free_models(url, log, offset)
    offset = len(log.read_text(errors="replace"))
    _set(prompt, "DiffusionRigSampler", seed=103)
    _run(url, log, prompt, "run after /free")
    assert "Requested to load DiffusionRig" in _log_since(log, offset), log_tail(log)


def test_a_light_change_reruns_the_sampling_only_and_gives_the_one_node_edit(comfyui_server):
    """ComfyUI keeps DiffusionRig Invert's output while its inputs stay: after a change of one light widget it
    reports the Invert node (and the global code) as cached (execution_cached) and runs Relight, Render Buffers
    and the Sampler again, which gives another photo; that photo equals the one of a Sampler inverting itself
    (the workflows before the Invert node) for that light."""
    url, log = comfyui_server
    prompt = _prompt("relight_sliders_lit_sphere")
    ids = {spec["class_type"]: node_id for node_id, spec in prompt.items()}  # the one node of each type used
    _set(prompt, "DiffusionRigRelight", azimuth=40.0)
    entry, first = _run(url, log, prompt, "first run")
    (before,) = check_outputs(url, prompt, entry, "first run")[ids["SaveImage"]]
    _set(prompt, "DiffusionRigRelight", azimuth=-40.0)
    entry, again = _run(url, log, prompt, "run after a light change")
    print(f"\nfirst run {first:.1f} s, after a light change {again:.1f} s ({again / first:.0%})")
    cached = cached_nodes(entry)
    source_buffers = prompt[ids["DiffusionRigInvert"]]["inputs"]["source_buffers"][0]
    edited_buffers = prompt[ids["DiffusionRigSampler"]]["inputs"]["rig_buffers"][0]
    for kept in (ids["DiffusionRigInvert"], ids["DiffusionRigEncodeGlobalCode"], source_buffers):
        assert kept in cached, (prompt[kept]["class_type"], cached)
    for rerun in (ids["DiffusionRigRelight"], edited_buffers, ids["DiffusionRigSampler"], ids["SaveImage"]):
        assert rerun not in cached, (prompt[rerun]["class_type"], cached)
    (split,) = check_outputs(url, prompt, entry, "run after a light change")[ids["SaveImage"]]
    assert split.tobytes() != before.tobytes(), "the Sampler's output did not change with the light"
    sampler = prompt[ids["DiffusionRigSampler"]]["inputs"]
    invert = prompt.pop(ids["DiffusionRigInvert"])["inputs"]
    del sampler["inverted_start"]
    sampler.update(source_image=invert["source_image"], source_buffers=invert["source_buffers"])
    entry, _ = _run(url, log, prompt, "the one-node edit (the Sampler inverting itself)")
    (one_node,) = check_outputs(url, prompt, entry, "the one-node edit")[ids["SaveImage"]]
    assert one_node.tobytes() == split.tobytes(), "the Sampler inverting itself gives another edit than Invert's"


def test_an_uploaded_photo_is_listed_and_runs(comfyui_server):
    """The upload button's route (POST /upload/image, as the frontend sends it) puts the photo where Load Face
    Photo lists it, and a workflow runs on it."""
    url, log = comfyui_server
    body, boundary = (REPO / "example_images" / "grace_hopper.jpg").read_bytes(), uuid.uuid4().hex
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"uploaded face.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/upload/image", data=data,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        name = json.loads(response.read())["name"]
    spec = get_json(f"{url}/object_info/DiffusionRigLoadPhoto")["DiffusionRigLoadPhoto"]["input"]["required"]["image"]
    assert name in spec[0] and spec[1].get("image_upload") is True
    prompt = _prompt("relight_preset")
    _set(prompt, "DiffusionRigLoadPhoto", image=name)
    entry, _ = _run(url, log, prompt, "relight_preset on the uploaded photo")
    check_outputs(url, prompt, entry, "relight_preset on the uploaded photo")


def test_models_are_managed_by_comfyui_in_process(tmp_path):
    """Our model handle against ComfyUI's real model management (CPU): a handle's model is listed by
    comfy.model_management.loaded_models() once it ran, once; a copy (as Train makes) is managed on its own;
    unload_all_models (the Free-memory button) drops both, and the next run loads the model again."""
    script = tmp_path / "check.py"
    script.write_text(MANAGED_CHECK)
    done = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_DIR, str(REPO)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]


MANAGED_CHECK = """
import copy, importlib.util, sys
comfy_dir, repo = sys.argv[1:3]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
import torch
spec = importlib.util.spec_from_file_location("pack", repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
host = sys.modules["pack.nodes.host"]
assert host.IN_COMFYUI
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig
config = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                    num_head_channels=16, dropout=0.0)
ours = lambda: [p.model.held for p in mm.loaded_models() if hasattr(p.model, "held")]
model = DiffusionRig(config).eval()
handle = host.ModelHandle(model)
assert ours() == [], "listed before use"
assert handle.run(lambda m: m.device) == mm.get_torch_device()
handle.run(lambda m: None)
assert ours() == [model], ours()
assert type(mm.loaded_models()[0].model).__name__ == "DiffusionRig"
twin = handle.copy()
twin_model = twin.run(lambda m: m)
assert twin_model is not model and {id(m) for m in ours()} == {id(model), id(twin_model)}, ours()
mm.unload_all_models()
assert ours() == [], ours()
with torch.no_grad():
    assert handle.run(lambda m: m.encode(torch.zeros(1, 3, 32, 32).to(m.device))).shape == (1, 64)
assert ours() == [model], "run loads the model again after Free memory"
print("ok")
"""


@pytest.mark.parametrize("flag", ["--lowvram", "--gpu-only"])
def test_workflow_runs_with_gpu_memory_flags(tmp_path_factory, demo_models, flag):
    """On a GPU: our models loaded whole under --lowvram (ComfyUI would otherwise split them) and kept on the GPU
    with --gpu-only; the upscaling workflow also runs ComfyUI's own upscaler next to them."""
    if not _has_gpu():
        pytest.skip(f"{flag} needs a GPU: ComfyUI refuses it together with --cpu, and without --cpu it needs CUDA")
    with start_comfyui(tmp_path_factory.mktemp("comfyui_flags"), demo_models, flag) as (url, log):
        prompt = _prompt("paste_back_upscale")
        entry, seconds = _run(url, log, prompt, f"paste_back_upscale with {flag}")
        print(f"\npaste_back_upscale with {flag}: {seconds:.1f} s")
        check_pasted_upscale(prompt, check_outputs(url, prompt, entry, "paste_back_upscale"))


def _has_gpu() -> bool:
    probe = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([COMFYUI_PYTHON, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"

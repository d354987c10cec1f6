"""Integration with a real ComfyUI: the pack loads, registers every node, and every shipped workflow runs.

Skipped unless COMFYUI_DIR points to a ComfyUI checkout (ComfyUI is not on PyPI and CI cannot
fetch it). ComfyUI runs as a separate server process, with the Python of COMFYUI_PYTHON (default:
the one running pytest), which needs ComfyUI's requirements and this pack installed. The test
does not write into ComfyUI's checkout nor into this repository: it starts ComfyUI with
`--base-directory` set to a temporary folder whose custom_nodes/ holds a link to this repository,
writes the offline demo assets (`comfy-diffusionrig demo-assets`) into another temporary folder,
points an extra_model_paths.yaml at its diffusionrig/, deca/ and upscale_models/ folders and at two
flame folders that each hold half of the FLAME files, and listens on 127.0.0.1 only. Each
workflows/*.json is converted to API format, every "steps" input set to 2, posted to /prompt, and
polled on /history until done (COMFYUI_WORKFLOW_TIMEOUT seconds each, default 600); it must succeed
and every SaveImage/PreviewImage node must have produced images (the upscaling workflow's at the
photo's size). The workflows' "examples/..." photos are the pack's example_images/ (resolved by
nodes/host.py). Then: POST /free releases our models (read from ComfyUI's own log), an uploaded
photo runs, our host helpers work against comfy.model_management in-process, and, on a machine with
a GPU, servers with --lowvram and --gpu-only run the upscaling workflow.

Run it (tested with ComfyUI commit a125cd84, October 2025, on 2 CPU cores shared with other jobs: about 7 minutes):

    # a ComfyUI checkout, e.g. git clone https://github.com/Comfy-Org/ComfyUI /tmp/ComfyUI
    python3 -m venv /tmp/comfyenv
    /tmp/comfyenv/bin/pip install torch==2.13.0 torchvision==0.28.0   # ComfyUI imports torchvision at start
    # (a CUDA-built torchvision: define its two op schemas before it imports, e.g. from a .pth file
    #  running torch.library.Library("torchvision", "DEF").define("nms(Tensor dets, Tensor scores,
    #  float iou_threshold) -> Tensor"), and the same for "qnms")
    grep -v -E '^(torch|torchvision|torchaudio)$' /tmp/ComfyUI/requirements.txt > /tmp/comfy-reqs.txt
    echo torch==2.13.0 > /tmp/torch-pin.txt                      # nothing may replace that torch
    /tmp/comfyenv/bin/pip install -c /tmp/torch-pin.txt -r /tmp/comfy-reqs.txt requests
    /tmp/comfyenv/bin/pip install -c /tmp/torch-pin.txt -e .     # this pack, from the repo root
    COMFYUI_DIR=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyenv/bin/python \\
        python -m pytest -q --durations=0 tests/test_comfyui.py

torchvision must be the build made for that torch (a CUDA torchvision wheel beside a CPU-only
torch fails to load its C++ ops, and ComfyUI cannot start); torchaudio is optional (without it
ComfyUI reports its audio nodes as failed imports, which does not matter here). `-s` also prints
each workflow's time inside ComfyUI. The server's log is kept in pytest's temporary folder (its
path is in any failure message).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path

import pytest

import nodes
from comfy_diffusionrig.face.deca import FLAME_FILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from workflow_format import to_api  # noqa: E402

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
WORKFLOW_TIMEOUT = float(os.environ.get("COMFYUI_WORKFLOW_TIMEOUT", "600"))
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
IMAGE_NODES = ("SaveImage", "PreviewImage")

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its Python) to run the "
                            "ComfyUI integration test; ComfyUI is not on PyPI, so CI cannot install it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, body: dict, timeout: float = 30):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _log_tail(log: Path, chars: int = 4000) -> str:
    return f"server log {log}:\n{log.read_text(errors='replace')[-chars:]}"


def _flame_folders(base: Path, demo_models: Path) -> list[Path]:
    """The demo FLAME files split over two folders: the pack must look in every configured flame folder."""
    folders = [base / "flame_a", base / "flame_b"]
    for i, name in enumerate(FLAME_FILES):
        folder = folders[0 if i < 2 else 1]
        folder.mkdir(exist_ok=True)
        (folder / name).symlink_to(demo_models / "flame" / name)
    return folders


@contextlib.contextmanager
def _comfyui(base: Path, demo_models: Path, *flags: str):
    """A ComfyUI server with the pack and the demo assets, started with `flags`: yields (url, log)."""
    root = Path(COMFYUI_DIR)
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} is not a ComfyUI checkout (no main.py)")
    for folder in ("custom_nodes", "input", "output", "temp", "user"):
        (base / folder).mkdir()
    (base / "custom_nodes" / "comfy-diffusionrig").symlink_to(REPO, target_is_directory=True)
    paths = base / "extra_model_paths.yaml"  # JSON strings are valid YAML scalars
    flame = "".join(f"\n    {folder}" for folder in _flame_folders(base, demo_models))
    paths.write_text("comfy_diffusionrig_test:\n" f"  base_path: {json.dumps(str(demo_models))}\n"
                     + "".join(f"  {name}: {name}\n" for name in ("diffusionrig", "deca", "upscale_models",
                                                                  "face_rigs"))
                     + f"  flame: |{flame}\n")
    env = dict(os.environ)
    for name in ("COMFY_DIFFUSIONRIG_MODELS", "COMFY_DIFFUSIONRIG_INPUT"):  # only used outside ComfyUI
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"  # the tests read the log while the server runs
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", *flags, "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--extra-model-paths-config", str(paths),
             "--database-url", f"sqlite:///{base / 'comfyui.db'}", "--disable-auto-launch"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get(f"{url}/system_stats", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"ComfyUI exited early (code {proc.returncode}); {_log_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start in 180 s; {_log_tail(log)}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_person):
    # DEBUG: ComfyUI then logs each model it unloads ("Unloading DiffusionRig"), which the /free test reads
    with _comfyui(tmp_path_factory.mktemp("comfyui_base"), demo_person, "--cpu", "--verbose", "DEBUG") as running:
        yield running


def test_pack_imports_and_registers_every_node(server):
    url, log = server
    text = log.read_text(errors="replace")
    ours = [line for line in text.splitlines() if "comfy-diffusionrig" in line]
    assert ours, f"ComfyUI did not load the pack; {_log_tail(log)}"
    assert not any("IMPORT FAILED" in line for line in ours), _log_tail(log)
    info = _get(f"{url}/object_info", timeout=60)
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

def _wait_for(url: str, prompt_id: str, log: Path) -> dict:
    deadline = time.monotonic() + WORKFLOW_TIMEOUT
    while time.monotonic() < deadline:
        entry = _get(f"{url}/history/{prompt_id}", timeout=30).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None \
                and entry["status"].get("status_str") in ("success", "error"):
            return entry
        time.sleep(1)
    queue = _get(f"{url}/queue")
    pytest.fail(f"prompt {prompt_id} not done after {WORKFLOW_TIMEOUT:.0f} s (queue: {queue}); {_log_tail(log)}")


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
        prompt_id = _post(f"{url}/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
    except urllib.error.HTTPError as error:
        pytest.fail(f"ComfyUI rejected {what}: {error.code} {error.read().decode(errors='replace')[:4000]}")
    entry = _wait_for(url, prompt_id, log)
    status = entry["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", f"{what} failed in ComfyUI: {json.dumps(errors)[:4000]}"
    return entry, time.monotonic() - started


def _image(url: str, image: dict):
    from PIL import Image

    query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=30) as response:
        data = response.read()
    picture = Image.open(BytesIO(data))
    picture.load()
    return picture


def _check_outputs(url: str, prompt: dict, entry: dict, what: str) -> dict[str, list]:
    """Every SaveImage/PreviewImage node produced readable images: {node id: [PIL images]}."""
    outputs = entry.get("outputs", {})
    image_nodes = [node_id for node_id, spec in prompt.items() if spec["class_type"] in IMAGE_NODES]
    assert image_nodes, f"{what} has no SaveImage/PreviewImage node"
    pictures = {}
    for node_id in image_nodes:
        images = outputs.get(node_id, {}).get("images", [])
        assert images, f"{what}: {prompt[node_id]['class_type']} node {node_id} produced no image ({outputs})"
        pictures[node_id] = [_image(url, image) for image in images]
        assert all(p.width > 0 and p.height > 0 for p in pictures[node_id])
    return pictures


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_comfyui(server, path):
    url, log = server
    prompt = _prompt(path.stem)
    entry, seconds = _run(url, log, prompt, path.name)
    print(f"\n{path.stem}: ran in ComfyUI in {seconds:.1f} s")
    pictures = _check_outputs(url, prompt, entry, path.name)
    if path.stem == "paste_back_upscale":
        _check_pasted_upscale(prompt, pictures)
    if path.stem == "relight_demo_person":  # five lights, five different faces, enlarged 8x for viewing
        (frames,) = [pictures[i] for i, spec in prompt.items() if spec["class_type"] == "SaveImage"]
        assert [f.size for f in frames] == [(256, 256)] * 5 and len({f.tobytes() for f in frames}) == 5


def _check_pasted_upscale(prompt: dict, pictures: dict) -> None:
    """The 4x-upscaled face was pasted into the photo at the photo's own resolution: same size as the photo,
    the face changed, the photo's border untouched."""
    import numpy as np
    from PIL import Image

    load = next(spec for spec in prompt.values() if spec["class_type"] == "DiffusionRigLoadPhoto")
    photo = np.asarray(Image.open(REPO / "example_images" / load["inputs"]["image"].split("/", 1)[1]).convert("RGB"))
    save = next(node_id for node_id, spec in prompt.items() if spec["class_type"] == "SaveImage")
    (out,) = pictures[save]
    out = np.asarray(out.convert("RGB"))
    assert out.shape == photo.shape, f"pasted result {out.shape} is not the photo's size {photo.shape}"
    changed = (out != photo).any(axis=2)
    assert 0.01 < changed.mean() < 0.5, f"{changed.mean():.3f} of the photo changed"
    border = np.ones_like(changed)
    border[16:-16, 16:-16] = False
    assert not changed[border].any(), "pixels far outside the face changed"


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
    pytest.fail(f"POST /free: {wanted} not in ComfyUI's log; {_log_tail(log)}")


def _set(prompt: dict, class_type: str, **inputs) -> None:
    for spec in prompt.values():
        if spec["class_type"] == class_type:
            spec["inputs"].update(inputs)


def test_free_memory_unloads_our_models_and_the_next_run_loads_them_again(server):
    """ComfyUI's own log of its loaded-model list: load_models_gpu logs "Requested to load <class>" only for a
    model not in the list, and free_memory logs "Unloading <class>" (DEBUG) for each model it drops. A re-run
    with only a new seed reuses the loaded models; after POST /free {"unload_models": true} ComfyUI unloads
    DiffusionRig and DECA, and the next run has to load DiffusionRig again."""
    url, log = server
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
    assert "Requested to load DiffusionRig" in _log_since(log, offset), _log_tail(log)


def test_a_light_change_reruns_the_sampling_only_and_gives_the_one_node_edit(server):
    """ComfyUI keeps DiffusionRig Invert's output while its inputs stay: after a light change it reports the
    Invert node as cached (execution_cached) and runs Relight, Render Buffers and the Sampler again; the saved
    photo equals the one of a Sampler inverting itself (the workflows before the Invert node) for that light."""
    url, log = server
    prompt = _prompt("relight_sliders_lit_sphere")
    ids = {spec["class_type"]: node_id for node_id, spec in prompt.items()}
    _set(prompt, "DiffusionRigRelight", azimuth=40.0)
    _, first = _run(url, log, prompt, "first run")
    _set(prompt, "DiffusionRigRelight", azimuth=-40.0)
    entry, again = _run(url, log, prompt, "run after a light change")
    print(f"\nfirst run {first:.1f} s, after a light change {again:.1f} s ({again / first:.0%})")
    (cached,) = [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    assert ids["DiffusionRigInvert"] in cached and ids["DiffusionRigEncodeGlobalCode"] in cached, cached
    assert ids["DiffusionRigRelight"] not in cached and ids["DiffusionRigSampler"] not in cached, cached
    split = _check_outputs(url, prompt, entry, "run after a light change")[ids["SaveImage"]]
    sampler = prompt[ids["DiffusionRigSampler"]]["inputs"]
    invert = prompt.pop(ids["DiffusionRigInvert"])["inputs"]
    del sampler["inverted_start"]
    sampler.update(source_image=invert["source_image"], source_buffers=invert["source_buffers"])
    entry, _ = _run(url, log, prompt, "the one-node edit (the Sampler inverting itself)")
    (one_node,) = _check_outputs(url, prompt, entry, "the one-node edit")[ids["SaveImage"]]
    assert one_node.tobytes() == split[0].tobytes()


def test_an_uploaded_photo_is_listed_and_runs(server):
    """The upload button's route (POST /upload/image, as the frontend sends it) puts the photo where Load Face
    Photo lists it, and a workflow runs on it."""
    url, log = server
    body, boundary = (REPO / "example_images" / "grace_hopper.jpg").read_bytes(), uuid.uuid4().hex
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"uploaded face.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/upload/image", data=data,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        name = json.loads(response.read())["name"]
    spec = _get(f"{url}/object_info/DiffusionRigLoadPhoto")["DiffusionRigLoadPhoto"]["input"]["required"]["image"]
    assert name in spec[0] and spec[1].get("image_upload") is True
    prompt = _prompt("relight_preset")
    _set(prompt, "DiffusionRigLoadPhoto", image=name)
    entry, _ = _run(url, log, prompt, "relight_preset on the uploaded photo")
    _check_outputs(url, prompt, entry, "relight_preset on the uploaded photo")


def test_models_are_managed_by_comfyui_in_process(tmp_path):
    """Our host helpers against ComfyUI's real model management (CPU): a managed model is listed by
    comfy.model_management.loaded_models() after use_model, once; a deep copy (as Train makes) is managed on its
    own; unload_all_models (the Free-memory button) drops both, and the model still runs (model.device follows
    the weights)."""
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
model = host.managed(DiffusionRig(config).eval())
assert ours() == [], "listed before use"
assert host.use_model(model) == model.device == mm.get_torch_device()
host.use_model(model)
assert ours() == [model], ours()
assert type(mm.loaded_models()[0].model).__name__ == "DiffusionRig"
twin = copy.deepcopy(model)
host.use_model(twin)
assert len(ours()) == 2 and {id(m) for m in ours()} == {id(model), id(twin)}
mm.unload_all_models()
assert ours() == [], ours()
with torch.no_grad():
    assert model.encode(torch.zeros(1, 3, 32, 32).to(model.device)).shape == (1, 64)
print("ok")
"""


@pytest.mark.parametrize("flag", ["--lowvram", "--gpu-only"])
def test_workflow_runs_with_gpu_memory_flags(tmp_path_factory, demo_models, flag):
    """On a GPU: our models loaded whole under --lowvram (ComfyUI would otherwise split them) and kept on the GPU
    with --gpu-only; the upscaling workflow also runs ComfyUI's own upscaler next to them."""
    if not _has_gpu():
        pytest.skip(f"{flag} needs a GPU: ComfyUI refuses it together with --cpu, and without --cpu it needs CUDA")
    with _comfyui(tmp_path_factory.mktemp("comfyui_flags"), demo_models, flag) as (url, log):
        prompt = _prompt("paste_back_upscale")
        entry, seconds = _run(url, log, prompt, f"paste_back_upscale with {flag}")
        print(f"\npaste_back_upscale with {flag}: {seconds:.1f} s")
        _check_pasted_upscale(prompt, _check_outputs(url, prompt, entry, "paste_back_upscale"))


def _has_gpu() -> bool:
    probe = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([COMFYUI_PYTHON, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"

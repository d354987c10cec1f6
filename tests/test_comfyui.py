"""Integration with a real ComfyUI: the pack loads, registers every node, and every shipped workflow runs.

Skipped unless COMFYUI_DIR points to a ComfyUI checkout (ComfyUI is not on PyPI and CI cannot
fetch it). ComfyUI runs as a separate server process, with the Python of COMFYUI_PYTHON (default:
the one running pytest), which needs ComfyUI's requirements and this pack installed. The test
does not write into ComfyUI's checkout nor into this repository: it starts ComfyUI with
`--base-directory` set to a temporary folder whose custom_nodes/ holds a link to this repository,
writes the offline demo assets (`comfy-diffusionrig demo-assets`) into another temporary folder,
points an extra_model_paths.yaml at its diffusionrig/, deca/ and flame/ folders, and listens on
127.0.0.1 only. Each workflows/*.json is converted to API format, every "steps" input set to 2,
posted to /prompt, and polled on /history until done (COMFYUI_WORKFLOW_TIMEOUT seconds each,
default 600); it must succeed and every SaveImage/PreviewImage node must have produced images.
The workflows' "examples/..." photos are the pack's example_images/ (resolved by nodes/host.py).

Run it (tested with ComfyUI commit a125cd84, October 2025, on 2 CPU cores: about 3 minutes):

    # a ComfyUI checkout, e.g. git clone https://github.com/Comfy-Org/ComfyUI /tmp/ComfyUI
    python3 -m venv /tmp/comfyenv
    /tmp/comfyenv/bin/pip install torch==2.13.0 torchvision==0.28.0   # ComfyUI imports torchvision at start
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_models):
    root = Path(COMFYUI_DIR)
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={COMFYUI_DIR} is not a ComfyUI checkout (no main.py)")
    base = tmp_path_factory.mktemp("comfyui_base")
    for folder in ("custom_nodes", "input", "output", "temp", "user"):
        (base / folder).mkdir()
    (base / "custom_nodes" / "comfy-diffusionrig").symlink_to(REPO, target_is_directory=True)
    paths = base / "extra_model_paths.yaml"  # JSON strings are valid YAML scalars
    paths.write_text("comfy_diffusionrig_test:\n" f"  base_path: {json.dumps(str(demo_models))}\n"
                     + "".join(f"  {name}: {name}\n" for name in ("diffusionrig", "deca", "flame")))
    env = dict(os.environ)
    for name in ("COMFY_DIFFUSIONRIG_MODELS", "COMFY_DIFFUSIONRIG_INPUT"):  # only used outside ComfyUI
        env.pop(name, None)
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
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


def _check_image(url: str, image: dict) -> None:
    from PIL import Image

    query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=30) as response:
        data = response.read()
    with Image.open(BytesIO(data)) as picture:
        picture.load()
        assert picture.width > 0 and picture.height > 0, image


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_comfyui(server, path):
    url, log = server
    prompt = to_api(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)
    for spec in prompt.values():  # a few steps run every node; the graph is unchanged
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    started = time.monotonic()
    try:
        prompt_id = _post(f"{url}/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
    except urllib.error.HTTPError as error:
        pytest.fail(f"ComfyUI rejected {path.name}: {error.code} {error.read().decode(errors='replace')[:4000]}")
    entry = _wait_for(url, prompt_id, log)
    seconds = time.monotonic() - started
    status = entry["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success", f"{path.name} failed in ComfyUI: {json.dumps(errors)[:4000]}"
    print(f"\n{path.stem}: ran in ComfyUI in {seconds:.1f} s")
    outputs = entry.get("outputs", {})
    image_nodes = [node_id for node_id, spec in prompt.items() if spec["class_type"] in IMAGE_NODES]
    assert image_nodes, f"{path.name} has no SaveImage/PreviewImage node"
    for node_id in image_nodes:
        images = outputs.get(node_id, {}).get("images", [])
        assert images, f"{path.name}: {prompt[node_id]['class_type']} node {node_id} produced no image ({outputs})"
        for image in images:
            _check_image(url, image)

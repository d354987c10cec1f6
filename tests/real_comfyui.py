"""A real ComfyUI server, and its real frontend in headless Chromium, for the integration tests.

Not a test module: tests/conftest.py makes fixtures of it (`comfyui_server`, `frontend`), used by
test_comfyui.py (the server's HTTP API) and test_frontend.py (the frontend, as a user drives it).

The server: ComfyUI from COMFYUI_DIR, run by COMFYUI_PYTHON (default: the Python running pytest),
with `--base-directory` in a temporary folder whose custom_nodes/ links to this repository, the
offline demo assets as its models (an extra_model_paths.yaml points at their diffusionrig/, deca/,
upscale_models/, face_rigs/ folders and at two flame folders that each hold half of the FLAME
files), on the CPU, listening on 127.0.0.1 only. Nothing is written into ComfyUI's checkout or into
this repository.

The frontend: the comfyui-frontend-package that ComfyUI serves, opened in Chromium (CHROMIUM,
default /usr/bin/chromium, Debian's package: Playwright's own browser download is not needed)
through the Python package `playwright`. A workflow is opened with the frontend's own file input
(as its Workflow > Open menu does), widgets are read and set as a user's edits would set them, and
the Run button queues it: the frontend converts the graph to API format itself.

Set up (tested with ComfyUI commit a125cd84, October 2025, frontend 1.27.10):

    git clone https://github.com/Comfy-Org/ComfyUI /tmp/ComfyUI
    python3 -m venv /tmp/comfyenv
    /tmp/comfyenv/bin/pip install torch==2.13.0 torchvision==0.28.0   # ComfyUI imports torchvision at start
    # (a CUDA-built torchvision beside the CPU torch: install it with --no-deps and define its two op
    #  schemas before it imports, e.g. from a .pth file running torch.library.Library("torchvision",
    #  "DEF").define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"), and "qnms")
    grep -v -E '^(torch|torchvision|torchaudio)$' /tmp/ComfyUI/requirements.txt > /tmp/comfy-reqs.txt
    echo torch==2.13.0 > /tmp/torch-pin.txt                      # nothing may replace that torch
    /tmp/comfyenv/bin/pip install -c /tmp/torch-pin.txt -r /tmp/comfy-reqs.txt requests
    /tmp/comfyenv/bin/pip install -c /tmp/torch-pin.txt -r requirements.txt   # the pack's needs
    apt-get install chromium && pip install playwright           # the frontend tests, in pytest's Python
    COMFYUI_DIR=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyenv/bin/python \
        python -m pytest -q -s --durations=0 tests/test_comfyui.py tests/test_frontend.py

The pack is not pip-installed into ComfyUI's Python: ComfyUI loads it from custom_nodes/, and it finds
its library beside itself (an installed copy would be used instead). torchaudio is optional (without it
ComfyUI reports its audio nodes as failed imports, which does not matter here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import pytest

from comfy_diffusionrig.face.deca import FLAME_FILES

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WORKFLOW_TIMEOUT = float(os.environ.get("COMFYUI_WORKFLOW_TIMEOUT", "600"))
REPO = Path(__file__).resolve().parents[1]

NO_COMFYUI = ("set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its Python) to run the ComfyUI "
              "integration tests; ComfyUI is not on PyPI, so CI cannot install it")


def no_browser_reason() -> str | None:
    """Why the frontend tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "the frontend tests need the Python package playwright (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"the frontend tests need Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, timeout: float = 30):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def log_tail(log: Path, chars: int = 4000) -> str:
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
def start_comfyui(base: Path, demo_models: Path, *flags: str):
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
    port = free_port()
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
                get_json(f"{url}/system_stats", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"ComfyUI exited early (code {proc.returncode}); {log_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start in 180 s; {log_tail(log)}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(url: str, prompt_id: str, log: Path) -> dict:
    """The /history entry of a queued prompt once it succeeded or failed (WORKFLOW_TIMEOUT seconds at most)."""
    deadline = time.monotonic() + WORKFLOW_TIMEOUT
    while time.monotonic() < deadline:
        entry = get_json(f"{url}/history/{prompt_id}", timeout=30).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None \
                and entry["status"].get("status_str") in ("success", "error"):
            return entry
        time.sleep(1)
    queue = get_json(f"{url}/queue")
    pytest.fail(f"prompt {prompt_id} not done after {WORKFLOW_TIMEOUT:.0f} s (queue: {queue}); {log_tail(log)}")


def execution_errors(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]


def cached_nodes(entry: dict) -> list[str]:
    """Ids of the nodes whose cached output ComfyUI reused for this prompt (its execution_cached message)."""
    return [node for m in entry["status"].get("messages", []) if m[0] == "execution_cached" for node in m[1]["nodes"]]


IMAGE_NODES = ("SaveImage", "PreviewImage")


def view_image(url: str, image: dict):
    from PIL import Image

    query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=30) as response:
        data = response.read()
    picture = Image.open(BytesIO(data))
    picture.load()
    return picture


def check_outputs(url: str, prompt: dict, entry: dict, what: str) -> dict[str, list]:
    """Every SaveImage/PreviewImage node produced readable images: {node id: [PIL images]}."""
    outputs = entry.get("outputs", {})
    image_nodes = [node_id for node_id, spec in prompt.items() if spec["class_type"] in IMAGE_NODES]
    assert image_nodes, f"{what} has no SaveImage/PreviewImage node"
    pictures = {}
    for node_id in image_nodes:
        images = outputs.get(node_id, {}).get("images", [])
        assert images, f"{what}: {prompt[node_id]['class_type']} node {node_id} produced no image ({outputs})"
        pictures[node_id] = [view_image(url, image) for image in images]
        assert all(p.width > 0 and p.height > 0 for p in pictures[node_id])
    return pictures


def check_pasted_upscale(prompt: dict, pictures: dict) -> None:
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


class Frontend:
    """One page of the real frontend, driven as a user drives it; see the module docstring.

    `failed_requests` lists every HTTP answer >= 400 the page got (the tests read the /view ones)."""

    def __init__(self, page, url: str, log: Path):
        self.page, self.url, self.log = page, url, log
        self.failed_requests: list[tuple[int, str]] = []
        page.on("response", lambda r: self.failed_requests.append((r.status, r.url)) if r.status >= 400 else None)

    def open(self, workflow: Path) -> None:
        """Open a workflow file with the frontend's file input, and wait until its nodes are on the canvas."""
        count = len(json.loads(workflow.read_text())["nodes"])
        self.page.set_input_files("#comfy-file-input", str(workflow))
        self.page.wait_for_function("n => window.app.graph.nodes.length === n", arg=count, timeout=60_000)

    def widgets(self) -> dict[str, list]:
        """{node id: [[widget name, value], ...]} of every node on the canvas, in the frontend's widget order."""
        return self.page.evaluate("""() => Object.fromEntries(window.app.graph.nodes.map(
            n => [String(n.id), (n.widgets || []).map(w => [w.name, w.value])]))""")

    def set_widget(self, name: str, value, node_type: str | None = None) -> int:
        """Set every widget called `name` (of nodes of `node_type`, or of all nodes), as editing it would:
        the widget's value, then its callback. Returns how many were set."""
        return self.page.evaluate("""([name, value, type]) => {
            let count = 0;
            for (const node of window.app.graph.nodes) {
                if (type && node.type !== type) continue;
                for (const w of node.widgets || []) {
                    if (w.name !== name) continue;
                    w.value = value;
                    w.callback?.(value, window.app.canvas, node);
                    count++;
                }
            }
            window.app.graph.setDirtyCanvas(true, true);
            return count;
        }""", [name, value, node_type])

    def run(self) -> dict:
        """Click Run; the server's answer to the frontend's POST /prompt: {"status", "answer" (its JSON),
        "prompt" (the API-format graph the frontend made and sent)}."""
        with self.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/api/prompt"),
                                       timeout=60_000) as sent:
            self.page.get_by_role("button", name="Run", exact=True).click()
        response = sent.value
        return {"status": response.status, "answer": response.json(),
                "prompt": json.loads(response.request.post_data)["prompt"]}

    def run_to_end(self, what: str) -> tuple[dict, dict, float]:
        """Run, wait for the prompt to finish, fail with ComfyUI's words unless it succeeded:
        (the API prompt the frontend sent, its /history entry, seconds from the click to the end)."""
        started = time.monotonic()
        queued = self.run()
        if queued["status"] != 200:
            pytest.fail(f"ComfyUI rejected {what} as the frontend sent it: {queued['status']} "
                        f"{json.dumps(queued['answer'])[:4000]}")
        entry = wait_for(self.url, queued["answer"]["prompt_id"], self.log)
        assert entry["status"]["status_str"] == "success", \
            f"{what} failed in ComfyUI: {json.dumps(execution_errors(entry))[:4000]}"
        return queued["prompt"], entry, time.monotonic() - started


@contextlib.contextmanager
def open_frontend(url: str, log: Path):
    """Headless Chromium on the server's frontend, first-run dialogs off: yields a Frontend."""
    from playwright.sync_api import sync_playwright

    post_json(f"{url}/api/settings", {"Comfy.TutorialCompleted": True})  # else the template browser covers Run
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            frontend = Frontend(page, url, log)
            page.goto(url)
            # the file input exists before the app; a workflow opened while our node types are not registered
            # (not yet, or the pack failed to import) gets nodes without widgets: wait, and say which is missing
            ready = """() => ({app: !!window.app?.vueAppReady, graph: !!window.app?.graph,
                nodes: !!window.LiteGraph?.registered_node_types?.DiffusionRigSampler,
                input: !!document.querySelector('#comfy-file-input')})"""
            deadline = time.monotonic() + 120
            while not all((state := page.evaluate(ready)).values()):
                if time.monotonic() > deadline:
                    pytest.fail(f"the frontend did not get ready in 120 s: {state}; {log_tail(log)}")
                time.sleep(0.5)
            yield frontend
        finally:
            browser.close()

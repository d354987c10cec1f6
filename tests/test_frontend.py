"""The shipped workflows as users run them: opened in the real ComfyUI frontend (headless Chromium),
queued with its Run button, run by the real server (the one of test_comfyui.py).

The frontend, not our tools/workflow_format.py, reads each workflow's widget values and converts the
graph to API format, so a workflow that the frontend reads differently (a seed's control-after-generate
value missing shifts every value after it) fails here. Every "steps" widget is set to 2 in the page
before Run (every node still runs). Skipped where there is no ComfyUI, playwright or Chromium, as in
CI; tests/real_comfyui.py says how to set them up. `-s` prints each workflow's seconds from the click to
the end of the run.
"""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image
from real_comfyui import REPO, check_outputs, check_pasted_upscale, execution_errors, wait_for

import nodes

sys.path.insert(0, str(REPO / "tools"))
from workflow_format import has_control_widget, node_spec, to_api  # noqa: E402

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def _view_failures(frontend) -> list:
    return [(status, url) for status, url in frontend.failed_requests if "/view?" in url]


def _check_read_as_meant(frontend, workflow: dict, what: str) -> None:
    """Every widget holds the value that the workflow means for its input (read by the node specs), and the
    frontend adds a control widget exactly where workflow_format expects one (and then its value is 'fixed')."""
    read = frontend.widgets()
    for node_id, spec in to_api(workflow, nodes.NODE_CLASS_MAPPINGS).items():
        widgets = read[node_id]
        names = [name for name, _ in widgets]
        for name, entry in ((n, e) for section in ("required", "optional")
                            for n, e in node_spec(spec["class_type"], nodes.NODE_CLASS_MAPPINGS)["input"]
                            .get(section, {}).items()):
            if name not in spec["inputs"] or isinstance(spec["inputs"][name], list):
                continue  # a link, not a widget
            assert name in names, f"{what}: node {node_id} has no widget {name!r} in the frontend ({names})"
            at = names.index(name)
            assert widgets[at][1] == spec["inputs"][name], f"{what}: node {node_id} {name} reads {widgets[at][1]!r}"
            has_control = at + 1 < len(widgets) and widgets[at + 1][0] == "control_after_generate"
            expected = has_control_widget(name, entry)
            assert has_control == expected, (f"{what}: node {node_id}: the frontend adds {'a' if has_control else 'no'}"
                                             f" control-after-generate widget after {name}, workflow_format "
                                             f"{'one' if expected else 'none'}")
            if has_control:
                assert widgets[at + 1][1] == "fixed", f"{what}: node {node_id} {name}'s control value"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_from_the_frontend(frontend, path):
    workflow = json.loads(path.read_text())
    frontend.open(path)
    _check_read_as_meant(frontend, workflow, path.name)
    steps = sum("steps" in node_spec(n["type"], nodes.NODE_CLASS_MAPPINGS)["input"]["required"]
                for n in workflow["nodes"])
    assert frontend.set_widget("steps", 2) == steps
    prompt, entry, seconds = frontend.run_to_end(path.name)
    print(f"\n{path.stem}: {seconds:.1f} s from Run to done")
    # what the frontend sent is what our converter makes of the file (test_workflows.py runs that one)
    ours = to_api(workflow, nodes.NODE_CLASS_MAPPINGS)
    for spec in ours.values():
        if "steps" in spec["inputs"]:
            spec["inputs"]["steps"] = 2
    assert {i: (s["class_type"], s["inputs"]) for i, s in prompt.items()} == \
        {i: (s["class_type"], s["inputs"]) for i, s in ours.items()}
    pictures = check_outputs(frontend.url, prompt, entry, path.name)
    if path.stem == "paste_back_upscale":
        check_pasted_upscale(prompt, pictures)
    if path.stem == "relight_demo_person":  # five lights, five different faces, enlarged 8x for viewing
        (frames,) = [pictures[i] for i, spec in prompt.items() if spec["class_type"] == "SaveImage"]
        assert [f.size for f in frames] == [(256, 256)] * 5 and len({f.tobytes() for f in frames}) == 5
    assert _view_failures(frontend) == []


def test_load_face_photo_previews_an_example_photo(frontend):
    """The photo picked in Load Face Photo shows on the node; an example photo (examples/<name>, kept in the
    pack, not in ComfyUI's input folder) too."""
    from playwright.sync_api import TimeoutError

    frontend.open(REPO / "workflows" / "relight_preset.json")
    try:
        size = frontend.page.wait_for_function("""() => {
            const img = window.app.graph.nodes.find(n => n.type === "DiffusionRigLoadPhoto").imgs?.[0];
            return img && img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight];
        }""", timeout=30_000).json_value()
    except TimeoutError:
        pytest.fail(f"Load Face Photo shows no preview after 30 s; failed requests: {_view_failures(frontend)}")
    assert tuple(size) == Image.open(REPO / "example_images" / "astronaut.png").size
    assert _view_failures(frontend) == []


def test_a_missing_demo_file_says_to_run_the_demo(frontend):
    """relight_demo_person.json before `comfy-diffusionrig demo` has run: ComfyUI refuses it, and the
    frontend shows, for both loaders, where the file comes from, not "Value not in list"."""
    frontend.open(REPO / "workflows" / "relight_demo_person.json")
    # this server has the demo's files: pick names the demo would write but that are not there
    frontend.set_widget("rig_photo", "synthetic_demo_person_9.png")
    frontend.set_widget("ckpt_name", "synthetic_demo_personalized_48px.safetensors")
    queued = frontend.run()
    assert queued["status"] == 400, queued
    errors = {spec["class_type"]: spec["errors"] for spec in queued["answer"]["node_errors"].values()}
    assert set(errors) == {"DiffusionRigLoadFaceRig", "DiffusionRigLoadModel"}, errors
    for class_type, (error,) in errors.items():
        assert error["type"] == "custom_validation_failed", error
        assert "`comfy-diffusionrig demo --models <ComfyUI models folder>`" in error["details"], error
    shown = frontend.page.get_by_text("comfy-diffusionrig demo --models", exact=False)
    shown.first.wait_for(timeout=10_000)
    frontend.page.keyboard.press("Escape")  # close the error dialog


_FACE_HALVES = """() => {
    const root = document.querySelector(".diffusionrig-light-handle");
    const face = root.querySelectorAll("canvas")[1];
    const pixels = face.getContext("2d").getImageData(0, 0, face.width, face.height).data;
    let left = 0, right = 0;
    for (let p = 0; p < face.width * face.height; p++) {
        const grey = pixels[4 * p] + pixels[4 * p + 1] + pixels[4 * p + 2];
        if (p % face.width < face.width / 2) left += grey; else right += grey;
    }
    const relight = window.app.graph.nodes.find(n => n.type === "DiffusionRigRelight");
    const value = name => relight.widgets.find(w => w.name === name).value;
    return {state: root.dataset.state, updates: Number(root.dataset.previewUpdates),
            azimuth: value("azimuth"), elevation: value("elevation"), contrast: (right - left) / pixels.length};
}"""

# one second of drags in the page itself, a pointer move per animation frame (as a mouse sends them), counting
# the face previews drawn: the preview's updates per second in this browser
_UPDATES_PER_SECOND = """() => new Promise(done => {
    const root = document.querySelector(".diffusionrig-light-handle");
    const sphere = root.querySelector("canvas");
    const box = sphere.getBoundingClientRect();
    const at = (type, t) => sphere.dispatchEvent(new PointerEvent(type, {bubbles: true, button: 0, pointerId: 7,
        clientX: box.left + box.width * (0.3 + 0.4 * t), clientY: box.top + box.height * 0.45}));
    at("pointerdown", 0);
    const first = Number(root.dataset.previewUpdates), start = performance.now();
    const step = () => {
        const t = (performance.now() - start) / 1000;
        if (t >= 1) {
            at("pointerup", 1);
            done((Number(root.dataset.previewUpdates) - first) / t);
            return;
        }
        at("pointermove", t);
        requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
})"""


# the frontend's auto-queue mode (the Run button's menu: off, "on change", "instant"), in its queue settings store
_AUTO_QUEUE = """mode => {
    const pinia = document.querySelector("#vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
    for (const [id, store] of pinia?._s ?? []) {
        if ("mode" in store && "batchCount" in store) { store.mode = mode; return id; }
    }
    return null;
}"""


def test_the_light_handle_drags_the_light_and_previews_the_face(frontend):
    """The Relight node shows the light handle; after a run, dragging on its sphere towards image right raises the
    azimuth widget and lights the previewed face's image-right side more at each step; with auto-queue "on change",
    releasing the handle queues the graph, whose prompt carries the dragged light in Relight's own inputs (and
    nothing of the handle)."""
    from playwright.sync_api import TimeoutError

    frontend.open(REPO / "workflows" / "relight_sliders_lit_sphere.json")
    frontend.set_widget("steps", 2)
    page = frontend.page
    page.evaluate("""() => {  // bring Relight into view at zoom 1
        const node = window.app.graph.nodes.find(n => n.type === "DiffusionRigRelight");
        window.app.canvas.ds.scale = 1;
        window.app.canvas.ds.offset = [200 - node.pos[0], 150 - node.pos[1]];
        window.app.graph.setDirtyCanvas(true, true);
    }""")
    sphere = page.locator(".diffusionrig-light-handle canvas").first
    sphere.wait_for(state="visible", timeout=30_000)
    assert page.evaluate(_FACE_HALVES)["state"] == "waiting"
    frontend.run_to_end("relight_sliders_lit_sphere.json")
    try:
        page.wait_for_function("() => document.querySelector('.diffusionrig-light-handle').dataset.state === 'face'",
                               timeout=30_000)
    except TimeoutError:
        pytest.fail("the light handle shows no face 30 s after the run (Render Buffers' maps did not arrive)")
    box = sphere.bounding_box()
    centre_x, centre_y, radius = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 0.3 * box["width"]

    def drag(positions) -> list[dict]:
        page.mouse.move(centre_x + positions[0] * radius, centre_y)
        page.mouse.down()
        seen = []
        for u in positions:
            page.mouse.move(centre_x + u * radius, centre_y, steps=3)
            page.wait_for_function("n => Number(document.querySelector('.diffusionrig-light-handle')"
                                   ".dataset.previewUpdates) > n", arg=seen[-1]["updates"] if seen else 0)
            page.wait_for_timeout(100)
            seen.append(page.evaluate(_FACE_HALVES))
        page.mouse.up()
        return seen

    seen = drag([-0.5, -0.25, 0.0, 0.25, 0.5])  # five positions towards image right
    azimuths, contrasts = [s["azimuth"] for s in seen], [s["contrast"] for s in seen]
    assert azimuths == sorted(azimuths) and len(set(azimuths)) == 5 and azimuths[0] < 0 < azimuths[-1], seen
    assert all(abs(s["elevation"]) <= 1 for s in seen), seen
    assert contrasts == sorted(contrasts) and len(set(contrasts)) == 5, seen
    rate = page.evaluate(_UPDATES_PER_SECOND)
    print(f"\nlight handle: {rate:.0f} face previews per second while dragging (256 px, headless Chromium)")
    assert rate > 0
    assert page.evaluate(_AUTO_QUEUE, "change"), "the frontend's queue settings store was not found"
    try:
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/api/prompt"),
                                  timeout=30_000) as sent:
            (released,) = drag([0.7])
        response = sent.value
        assert response.status == 200, response.text()
        prompt = json.loads(response.request.post_data)["prompt"]
    finally:
        page.evaluate(_AUTO_QUEUE, "disabled")
    (relight,) = [spec for spec in prompt.values() if spec["class_type"] == "DiffusionRigRelight"]
    assert relight["inputs"]["azimuth"] == released["azimuth"] > azimuths[-1]
    assert "light_handle" not in relight["inputs"]
    entry = wait_for(frontend.url, response.json()["prompt_id"], frontend.log)
    assert entry["status"]["status_str"] == "success", execution_errors(entry)
    assert _view_failures(frontend) == []
    # saved with the handle, the workflow holds Relight's widget values and nothing more, in the same slots as
    # the shipped file (written without the frontend): a ComfyUI without the extension reads it the same way
    saved = page.evaluate("() => window.app.graph.serialize()")
    shipped = json.loads((REPO / "workflows" / "relight_sliders_lit_sphere.json").read_text())
    (node,) = [n for n in saved["nodes"] if n["type"] == "DiffusionRigRelight"]
    (original,) = [n for n in shipped["nodes"] if n["type"] == "DiffusionRigRelight"]
    assert len(node["widgets_values"]) == len(original["widgets_values"]), (node, original)
    changed = [k for k, (a, b) in enumerate(zip(node["widgets_values"], original["widgets_values"])) if a != b]
    assert released["azimuth"] in [node["widgets_values"][k] for k in changed], (node, original)
    assert all(isinstance(original["widgets_values"][k], (int, float)) for k in changed), (node, original)  # light only

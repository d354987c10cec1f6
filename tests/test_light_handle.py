"""The Relight node's light handle (web/js/): its shading in the browser, run under Node.js, against the renderer.

web/js/sh_shading.js shades the normal and albedo maps that Render Buffers sends (its "ui" output) while the
handle moves; it must give what `render_layers` renders for the same light, within 2/255 (its result is 8-bit,
rounded; the renderer's shaded buffer is float). The drag -> azimuth/elevation mapping is checked through the
Python lit sphere: the point dragged to is where the sphere is brightest. Skipped where there is no `node`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import nodes.face_nodes as fn
from nodes import host
from comfy_diffusionrig.face.lighting import lit_sphere, sh_from_direction
from comfy_diffusionrig.face.rig import render_layers

NODE = shutil.which("node") or shutil.which("nodejs")
RUNNER = Path(__file__).with_name("sh_shading_runner.mjs")
DECA_FILE = "deca_model.tar"
# (azimuth, elevation, intensity, ambient, colour): key lights from both sides and behind, a tinted one, and one
# bright enough that the shaded buffer clips at 1
LIGHTS = [(60.0, 20.0, 0.9, 0.4, "#FFFFFF"), (-45.0, -10.0, 1.2, 0.2, "#FFD8A8"), (150.0, 30.0, 1.0, 0.3, "#A8C8FF"),
          (0.0, 0.0, 3.0, 1.5, "#FFFFFF")]
TOLERANCE = 2 / 255  # the bound: 8-bit rounding (0.5/255) plus float32 round-off

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not on PATH, so the browser's shading code cannot "
                                                     "run here (Debian: apt-get install nodejs; .ci/run installs it)")


def run_js(calls: list[dict]) -> list:
    """Call functions of web/js/sh_shading.js under Node.js (tests/sh_shading_runner.mjs)."""
    done = subprocess.run([NODE, str(RUNNER)], input=json.dumps(calls), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def hex_rgb(text: str) -> list[float]:
    return [int(text[i:i + 2], 16) / 255 for i in (1, 3, 5)]


@pytest.fixture(scope="module")
def rendered(demo_models, tmp_path_factory):
    """The demo photo's rig relit by each of LIGHTS through the nodes: [(light, render output, npy path, rig)]."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
        mp.setenv("COMFY_DIFFUSIONRIG_CACHE", str(tmp_path_factory.mktemp("cache")))
        (photo,) = fn.LoadFacePhoto().load("examples/astronaut.png")
        (deca,) = fn.LoadDECA().load(DECA_FILE, "auto")
        aligned, alignment, _ = fn.DetectAlignFace().align(photo, "largest", 0, "hog", 256)
        (rig,) = fn.DECAFit().fit(deca, aligned, alignment)
        out = []
        for light in LIGHTS:
            relit, _ = fn.Relight().relight(rig, "sliders", *light)
            result = fn.RenderBuffers().render(deca, relit)
            (entry,) = result["ui"]["diffusionrig_shading"]
            out.append((light, result, host.cache_dir("previews") / entry["filename"], relit, deca))
        yield out


def test_render_buffers_sends_the_normal_and_albedo_maps_it_renders(rendered):
    (light, result, path, rig, deca), *others = rendered
    (entry,) = result["ui"]["diffusionrig_shading"]
    assert entry["type"] == "temp" and entry["subfolder"] == "comfy-diffusionrig/previews"
    maps = np.load(path)
    assert maps.dtype == np.float32 and maps.shape == (6, 256, 256)
    layers = deca.run(render_layers, rig)
    assert np.array_equal(maps[:3], layers["normal"][0].numpy()) and np.array_equal(maps[3:], layers["albedo"][0].numpy())
    torch.testing.assert_close(torch.tensor(entry["light"]), rig.codes["light"][0], rtol=0, atol=0)
    # the maps do not depend on the light: every relit render reuses the one file
    assert {other[2] for other in others} == {path}


def test_the_browser_shading_is_the_renderers_shaded_buffer(rendered):
    calls = []
    for light, _, path, _, _ in rendered:
        calls.append({"fn": "lightFromSliders", "args": [*light[:4], hex_rgb(light[4])]})
    lights = run_js(calls)
    for (light, *_), js_light in zip(rendered, lights):
        expected = sh_from_direction(*light[:4], hex_rgb(light[4]))
        torch.testing.assert_close(torch.tensor(js_light, dtype=torch.float32).reshape(9, 3), expected, rtol=0, atol=1e-6)
    shaded = run_js([{"fn": "shadeMaps", "args": [{"npy": str(path)}, 256 * 256, js_light]}
                     for (_, _, path, _, _), js_light in zip(rendered, lights)])
    for (light, result, *_), rgba in zip(rendered, shaded):
        ours = torch.tensor(rgba, dtype=torch.float32).reshape(256, 256, 4) / 255
        theirs = result["result"][2][0]  # Render Buffers' shaded output: albedo x shading, clipped to 0..1
        assert float(theirs.max()) > 0.2  # a lit face, not a black picture
        assert float((ours[..., :3] - theirs).abs().max()) <= TOLERANCE, light
        assert bool((ours[..., 3] == 1).all())
    # the comparison tells lights apart: another light's preview is far from this render
    other = torch.tensor(shaded[1], dtype=torch.float32).reshape(256, 256, 4)[..., :3] / 255
    assert float((other - rendered[0][1]["result"][2][0]).abs().max()) > 0.2
    assert float(rendered[-1][1]["result"][2][0].max()) == 1.0  # the bright light clips, and the preview agrees


def test_the_handles_lit_sphere_is_the_lit_sphere_preview():
    size = 64
    lights = [sh_from_direction(*light[:4], hex_rgb(light[4])) for light in LIGHTS]
    (maps,) = run_js([{"fn": "sphereMaps", "args": [size]}])
    shaded = run_js([{"fn": "shadeMaps", "args": [{"floats": maps}, size * size, light.flatten().tolist()]}
                     for light in lights])
    for light, rgba in zip(lights, shaded):
        ours = torch.tensor(rgba, dtype=torch.float32).reshape(size, size, 4)[..., :3] / 255
        theirs = lit_sphere(light, size)[0].permute(1, 2, 0)
        assert float((ours - theirs).abs().max()) <= TOLERANCE


def test_dragging_puts_the_light_where_the_pointer_is_on_the_lit_sphere():
    """Drag towards image right = light from image right: the Python lit sphere of the angles the handle gives is
    brightest under the pointer (u image right, v up, in sphere radii)."""
    points = [(0.6, 0.0), (-0.5, 0.3), (0.2, -0.6), (0.0, 0.0), (-0.3, -0.2)]
    angles = run_js([{"fn": "dragToAngles", "args": [u, v, 2]} for u, v in points])
    size = 201
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    for (u, v), a in zip(points, angles):
        sphere = lit_sphere(sh_from_direction(a["azimuth"], a["elevation"], 0.8, 0.0), size)[0].mean(0)
        row, col = divmod(int(sphere.argmax()), size)
        assert abs(float(centres[col]) - u) < 0.05 and abs(-float(centres[row]) - v) < 0.05, (u, v, a)
    right = angles[0]
    assert right["azimuth"] > 0 and abs(right["elevation"]) < 1e-9
    sphere = lit_sphere(sh_from_direction(right["azimuth"], right["elevation"], 0.8, 0.3), 64)[0].mean(0)
    assert float(sphere[:, 32:].sum()) > 1.5 * float(sphere[:, :32].sum())  # the image-right half is lit
    # the ring past the rim reaches behind the head: its outer edge is a light from straight behind
    behind = run_js([{"fn": "dragToAngles", "args": [2.0, 0.0, 2]}, {"fn": "dragToAngles", "args": [0.0, 1.5, 2]}])
    assert behind[0]["azimuth"] == pytest.approx(180.0) and behind[0]["elevation"] == pytest.approx(0.0, abs=1e-9)
    assert behind[1]["elevation"] == pytest.approx(45.0) and abs(behind[1]["azimuth"]) == pytest.approx(180.0)


def test_the_handles_marker_is_where_the_drag_was():
    outer = 0.5 / 0.3  # light_handle.js: the canvas edge, in sphere radii (past it the drag is clamped)
    points = [(0.6, 0.0), (-0.5, 0.3), (1.4, 0.2), (-0.3, -1.3), (0.0, 1.2)]
    angles = run_js([{"fn": "dragToAngles", "args": [u, v, outer]} for u, v in points])
    back = run_js([{"fn": "anglesToDrag", "args": [a["azimuth"], a["elevation"], outer]} for a in angles])
    for (u, v), b in zip(points, back):
        assert b["u"] == pytest.approx(u, abs=1e-9) and b["v"] == pytest.approx(v, abs=1e-9)
    # past the canvas edge the drag holds at the edge: the light from straight behind
    (beyond,) = run_js([{"fn": "dragToAngles", "args": [-0.3, -1.7, outer]}])
    assert abs(beyond["azimuth"]) == pytest.approx(180.0) and beyond["elevation"] == pytest.approx(0.0, abs=1e-6)

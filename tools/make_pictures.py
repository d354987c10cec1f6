"""Regenerate every picture of the README and docs/, and the workflows' thumbnails, from real runs.

    comfy-diffusionrig demo --models models --out demo_output     # the full demo, once (12-15 min on 2 CPU cores)
    python tools/make_pictures.py --demo demo_output --models models [--comfyui /path/to/ComfyUI]
    python tools/make_pictures.py --no-demo      # only what needs no models: the icon and the graph thumbnails

Writes, each picture labelled with what made it (a caption drawn in, the same text in the file's metadata,
and docs/pictures/README.md listing them all):
- docs/pictures/icon.png: the registry icon, a sphere lit by the pack's light presets (lighting.lit_sphere);
- docs/pictures/before_after.png, light_sweep.gif: the demo's synthetic person (a held-out photo, a rigged
  photo in models/face_rigs/) relit by the demo's personalized 32 px model, the key light moving from image
  left to image right (the library path of `comfy-diffusionrig relight --light azimuth=A`);
- docs/pictures/contact_sheet.png: the first held-out edits of the demo's contact sheet (its images/ folder);
- docs/pictures/buffers_astronaut.png: the buffers (shaded, normals, albedo) of example_images/astronaut.png
  as fitted by the DECA in --models (the label says when it is the random-weight stand-in);
- docs/pictures/workflow_in_comfyui.png (only with --comfyui, ComfyUI's Python in $COMFYUI_PYTHON):
  relight_demo_person.json opened and run in the real ComfyUI frontend (headless Chromium; set up as
  tests/real_comfyui.py says);
- workflows/<name>.jpg, the template browser's thumbnail of each workflow: relight_demo_person.jpg is that
  workflow's own output (run in this process by tools/run_workflow.py on the demo's models); the others are a
  drawing of their graph (their pictures need the licensed models: the stand-ins would show noise).

tests/test_pictures.py checks that every workflow has a thumbnail, that every picture is listed with its
caption, that the graph drawings match their workflows, and that the files stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from comfy_diffusionrig.demo.plotting import _font, contact_sheet  # noqa: E402

PICTURES = ROOT / "docs" / "pictures"
WORKFLOWS = ROOT / "workflows"
COMMAND = "python tools/make_pictures.py --demo demo_output --models models"
DEMO_WORKFLOW = "relight_demo_person"  # the one workflow whose output is a real edit without licensed files
SWEEP = (-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0)  # key light azimuths (deg, + = from image right)
ELEVATION, INTENSITY, AMBIENT = 15.0, 0.9, 0.45  # the demo's light sweep (demo/run.py light_sweep)
STEPS = 20  # DDIM steps, the official default
THUMB_SIZE = (512, 384)
JPEG_QUALITY = 82
BACKGROUND, INK, FAINT = (24, 24, 28), (235, 235, 235), (150, 150, 160)
# display names of the core ComfyUI nodes the workflows use (ours come from the node classes)
CORE_TITLES = {"PreviewImage": "Preview Image", "SaveImage": "Save Image", "ImageScaleBy": "Upscale Image By",
               "RepeatImageBatch": "Repeat Image Batch", "UpscaleModelLoader": "Load Upscale Model",
               "ImageUpscaleWithModel": "Upscale Image (using Model)", "MaskToImage": "Convert Mask to Image"}
TITLE_HEIGHT, SLOT_HEIGHT = 30, 20  # LiteGraph's node title bar and slot spacing (graph units)


# ---------------------------------------------------------------------------------------------- labelling
def with_caption(image: Image.Image, lines: list[str], width: int | None = None, size: int = 12) -> Image.Image:
    """The image on a dark strip with `lines` of small text under it (wrapped to the image's width)."""
    from comfy_diffusionrig.demo.plotting import _wrap

    font = _font(size)
    width = width or image.width
    wrapped = [part for line in lines for part in (_wrap(line, font, width - 12) or [""])]
    height = image.height + 8 + len(wrapped) * (size + 4)
    out = Image.new("RGB", (width, height), BACKGROUND)
    out.paste(image.convert("RGB"), ((width - image.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(wrapped):
        draw.text((6, image.height + 4 + k * (size + 4)), line, fill=INK if k == 0 else FAINT, font=font)
    return out


def save_picture(image, path: Path, caption: str, frames: list[Image.Image] | None = None,
                 durations: list[int] | None = None) -> Path:
    """Write a PNG, GIF or JPEG carrying `caption` in its metadata (PNG Description, GIF/JPEG comment)."""
    if "\n" in caption or "|" in caption:
        raise ValueError(f"a caption is one line without '|' (it is a row of docs/pictures/README.md): {caption!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Description", caption)
        image = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        image.save(path, pnginfo=info, optimize=True)
    elif path.suffix == ".gif":
        palette = frames[len(frames) // 2].convert("RGB").quantize(255, method=Image.Quantize.MEDIANCUT)
        coded = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
        coded[0].save(path, save_all=True, append_images=coded[1:], duration=durations, loop=0,
                      comment=caption.encode(), optimize=True, disposal=1)
    elif path.suffix == ".jpg":
        image.convert("RGB").save(path, quality=JPEG_QUALITY, optimize=True, comment=caption.encode())
    else:
        raise ValueError(f"make_pictures writes .png, .gif or .jpg, not {path.name}")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")
    return path


def read_caption(path: Path) -> str:
    """The caption save_picture wrote into a picture's metadata ('' when there is none)."""
    with Image.open(path) as image:
        text = image.info.get("Description") or image.info.get("comment") or ""
    return text.decode() if isinstance(text, bytes) else text


def enlarge(image: Image.Image, size: int) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


# -------------------------------------------------------------------------------------------------- icon
ICON_LIGHTS = (  # (azimuth, elevation, colour) of each sphere's key light, big sphere last
    (70.0, 20.0, (0.75, 0.85, 1.0)), (-70.0, 10.0, (1.0, 0.75, 0.45)), (-40.0, 35.0, (1.0, 0.93, 0.82)))


def icon() -> tuple[Image.Image, str]:
    """Three spheres, each lit by one directional SH light of the pack's lighting model, on a dark tile."""
    from comfy_diffusionrig.core.imaging import tensor_to_pil
    from comfy_diffusionrig.face.lighting import lit_sphere, sh_from_direction

    tile = Image.new("RGB", (256, 256), BACKGROUND)
    for (azimuth, elevation, colour), size, at in zip(ICON_LIGHTS, (92, 92, 172), ((150, 12), (10, 150), (42, 42))):
        light = sh_from_direction(azimuth, elevation, intensity=1.0, ambient=0.12, color=colour)
        sphere = tensor_to_pil(lit_sphere(light, size=size * 2, albedo=0.75)[0]).resize((size, size))
        mask = Image.new("L", (size * 4, size * 4), 0)
        ImageDraw.Draw(mask).ellipse((0, 0, size * 4 - 1, size * 4 - 1), fill=255)
        tile.paste(sphere, at, mask.resize((size, size), Image.Resampling.LANCZOS))
    return tile, ("Icon: three spheres, each lit by one directional spherical-harmonics light of the pack's lighting "
                  "model (face.lighting.sh_from_direction, lit_sphere). python tools/make_pictures.py --no-demo")


# -------------------------------------------------------------------------------------- the demo's person
def demo_files(demo: Path, models: Path) -> dict:
    """What the full demo left: its report, its personalized model and its person's first rigged photo."""
    report_path = demo / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"make_pictures: {report_path} is missing; run `comfy-diffusionrig demo --models {models} "
                         f"--out {demo}` first (the full demo, not --quick)")
    report = json.loads(report_path.read_text())
    if "warning" in report:
        raise SystemExit(f"make_pictures: {demo} holds a --quick demo (its model learned nearly nothing); run the "
                         "full demo for the pictures")
    installed = report.get("installed") or {}
    if not installed.get("photos"):
        raise SystemExit(f"make_pictures: the demo in {demo} installed no rigged photos of its person (run it with "
                         f"--models {models})")
    model, photo = Path(installed["models"][0]), Path(installed["photos"][0])
    for path in (model, photo):
        if not path.is_file():
            raise SystemExit(f"make_pictures: {path} (installed by the demo in {demo}) is missing; run the demo "
                             f"again with --models {models}")
    return {"report": report, "model": model, "photo": photo}


def relight_person(models: Path, model: Path, photo: Path):
    """The demo's person relit under each SWEEP light: (its photo, [faces], right-minus-left brightness)."""
    from comfy_diffusionrig.core.imaging import pil_to_tensor
    from comfy_diffusionrig.demo.run import side_balance
    from comfy_diffusionrig.face.lighting import sh_from_direction
    from comfy_diffusionrig.face.rig_files import read_rig
    from comfy_diffusionrig.photo.loading import load_image
    from comfy_diffusionrig.pipeline import edit_photo, load_models

    loaded = load_models(models, model.name, device="cpu")
    lights = torch.stack([sh_from_direction(a, ELEVATION, intensity=INTENSITY, ambient=AMBIENT) for a in SWEEP])
    source = load_image(photo)
    result = edit_photo(loaded, source, lambda rig: rig.expand(len(lights)).with_light(lights.float()),
                        steps=STEPS, rig=read_rig(photo))
    return source, result.faces, side_balance(pil_to_tensor(result.faces), result.coverage)


def person_settings(model: Path, photo: Path) -> str:
    return (f"model {model.name} (the demo's, 32 px, trained on synthetic faces only), photo "
            f"models/face_rigs/{photo.name} (a held-out photo of the demo's synthetic person), DDIM {STEPS} steps "
            f"from its inversion, key light elevation {ELEVATION:.0f} deg, intensity {INTENSITY}, ambient {AMBIENT}")


def before_after(source, faces, balance, model: Path, photo: Path) -> tuple[Image.Image, str]:
    first, last = 0, len(SWEEP) - 1
    sheet = contact_sheet([[source, faces[first], faces[last]]], cell=192,
                          column_labels=["before: the photo", f"after: key light {SWEEP[first]:+.0f} deg (image left)",
                                         f"after: key light {SWEEP[last]:+.0f} deg (image right)"])
    caption = (f"Before/after: a SYNTHETIC person relit by the offline demo's 32 px model (enlarged 6x); "
               f"{person_settings(model, photo)}; face brightness right minus left {balance[first]:+.2f} -> "
               f"{balance[last]:+.2f}. {COMMAND}")
    return with_caption(sheet, ["Synthetic person, the offline demo's 32 px model (enlarged): not a real photo",
                                f"made by {COMMAND}"]), caption


def light_sweep_frames(faces, balance, model: Path, photo: Path) -> tuple[list[Image.Image], list[int], str]:
    frames = []
    for azimuth, face in zip(SWEEP, faces):
        frames.append(with_caption(enlarge(face, 160), [f"key light {azimuth:+.0f} deg",
                                                         "SYNTHETIC person, demo", "model (32 px, enlarged)"],
                                   size=12))
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))  # there and back
    durations = [700 if i in (0, len(frames) - 1) else 160 for i in order]
    caption = (f"Light sweep: a SYNTHETIC person relit by the offline demo's 32 px model (enlarged 5x), key light "
               f"azimuth {SWEEP[0]:+.0f} -> {SWEEP[-1]:+.0f} deg in {len(SWEEP)} steps; {person_settings(model, photo)}; "
               f"face brightness right minus left {balance[0]:+.2f} -> {balance[-1]:+.2f}. {COMMAND}")
    return [frames[i] for i in order], durations, caption


def demo_contact_sheet(demo: Path, report: dict, rows: int = 4) -> tuple[Image.Image, str]:
    """The first `rows` held-out edits of the demo's contact sheet, from its images/ folder."""
    scores = report["scores (mean over held-out edits, images in [0,1])"]
    names = list(scores)  # untrained, stage 1, personalized, LoRA (the demo's order)
    labels = ["source", "target", "untrained", "stage1", "personalized", "lora"]
    cells, row_labels = [], []
    for i in range(rows):
        files = [demo / "images" / f"edit{i:02d}_{label}.png" for label in labels]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"make_pictures: {missing[0]} is missing (the demo's images/ folder)")
        cells.append([Image.open(f).convert("RGB") for f in files])
        row_labels.append(f"edit {i + 1}\nstage 1 {scores[names[1]]['psnr per edit'][i]:.1f} dB\n"
                          f"personal {scores[names[2]]['psnr per edit'][i]:.1f} dB")
    columns = ["source photo (input)", "ground truth (true photo)", "untrained", "stage 1 (generic)",
               "personalized", names[3].replace("personalized ", "")]
    sheet = contact_sheet(cells, row_labels=row_labels, column_labels=columns, cell=96, font_size=12)
    personal = scores[names[2]]
    caption = (f"Contact sheet: {rows} of the {len(scores[names[2]]['psnr per edit'])} held-out edits of the offline "
               "demo (SYNTHETIC faces, 32 px models, enlarged 3x): each row inverts the source photo and renders it "
               "under the target view's light, expression and pose with each model, scored against the true photo; "
               f"personalized mean over all edits {personal['psnr']:.2f} dB PSNR, SSIM {personal['ssim']:.3f}. "
               f"From the demo's images/ (comfy-diffusionrig demo); {COMMAND}")
    return with_caption(sheet, ["Offline demo, held-out edits of its synthetic person (32 px models, enlarged)",
                                f"made by {COMMAND}"]), caption


# ------------------------------------------------------------------------------------ a real photo's buffers
def _stand_in(folder: Path) -> bool:
    return (folder / "SYNTHETIC_README.txt").exists()


def photo_buffers(models: Path, model: Path, photo: Path) -> tuple[Image.Image, str]:
    """A real photo aligned and fitted by the DECA of `models`, and its buffers (shaded | normals | albedo)."""
    from comfy_diffusionrig.core.imaging import tensor_to_pil
    from comfy_diffusionrig.face.buffers import buffer_images
    from comfy_diffusionrig.face.lighting import lit_sphere
    from comfy_diffusionrig.core.imaging import pil_to_tensor
    from comfy_diffusionrig.face.rig import fit_faces, render_layers, stack_buffers
    from comfy_diffusionrig.photo.alignment import align_faces
    from comfy_diffusionrig.photo.loading import load_image
    from comfy_diffusionrig.pipeline import load_models

    deca = load_models(models, model.name, device="cpu").deca
    # at the official 256 px (the demo's model works at 32 px; DECA and the renderer do not care)
    aligned = align_faces(load_image(photo), mode="largest", size=256, detector="hog", models_dir=models)
    rig = fit_faces(deca, pil_to_tensor([a.image for a in aligned]), np.stack([a.landmarks for a in aligned]))
    layers = render_layers(deca, rig)
    shaded, normals, albedo = buffer_images(stack_buffers(layers), layers["alpha"])
    sphere = lit_sphere(rig.codes["light"][0], size=256)
    cells = [aligned[0].image, *(tensor_to_pil(t[0]) for t in (shaded, normals, albedo)), tensor_to_pil(sphere[0])]
    fake_deca, fake_flame = _stand_in(models / "deca"), _stand_in(models / "flame")
    fitter = ("the random-weight DECA stand-in of demo-assets (NOT DECA: this fit is not the photo's shape, pose or "
            "light)" if fake_deca else "DECA (deca_model.tar)")
    flame = "the synthetic FLAME-format head (NOT FLAME)" if fake_flame else "FLAME 2020"
    sheet = contact_sheet([cells], cell=160, font_size=12,
                          column_labels=[f"{photo.name}, aligned", "shaded", "normals", "albedo", "fitted light"])
    caption = (f"Buffers of a real photo: example_images/{photo.name} detected, FFHQ-aligned and fitted by {fitter} with "
               f"{flame}, rendered at 256 px (rig.render_layers, as Render Buffers and --save-buffers). {COMMAND}")
    first = ("Real photo; buffers from the random DECA stand-in, not a fit of this face" if fake_deca else
             "Real photo; buffers from DECA's fit")
    return with_caption(sheet, [first, f"{fitter}; {flame}", f"made by {COMMAND}"]), caption


# ------------------------------------------------------------------------------------------------ workflows
def _titles() -> dict[str, str]:
    import nodes

    return {**CORE_TITLES, **nodes.NODE_DISPLAY_NAME_MAPPINGS}


def _type_colour(kind: str) -> tuple[int, int, int]:
    """A fixed colour per socket type (the same in every thumbnail)."""
    fixed = {"IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "FACE_RIG": (255, 183, 77),
             "DIFFUSIONRIG_MODEL": (186, 104, 200), "DECA_MODEL": (240, 98, 146)}
    if kind in fixed:
        return fixed[kind]
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(kind))
    return (90 + seed * 37 % 150, 90 + seed * 61 % 150, 90 + seed * 83 % 150)


def graph_drawing(workflow: dict, name: str) -> Image.Image:
    """The workflow's nodes (at their canvas positions, with their titles) and links, fitted into THUMB_SIZE."""
    titles = _titles()
    width, height = THUMB_SIZE
    band = 44
    nodes_ = workflow["nodes"]
    left = min(n["pos"][0] for n in nodes_)
    top = min(n["pos"][1] - TITLE_HEIGHT for n in nodes_)
    right = max(n["pos"][0] + n["size"][0] for n in nodes_)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes_)
    margin = 14
    scale = min((width - 2 * margin) / (right - left), (height - band - 2 * margin) / (bottom - top))
    ox = (width - (right - left) * scale) / 2 - left * scale
    oy = margin + (height - band - 2 * margin - (bottom - top) * scale) / 2 - top * scale
    at = lambda x, y: (ox + x * scale, oy + y * scale)  # noqa: E731
    image = Image.new("RGB", THUMB_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    by_id = {n["id"]: n for n in nodes_}
    for _, origin, slot, target, target_slot, kind in workflow["links"]:
        a, b = by_id[origin], by_id[target]
        x0, y0 = at(a["pos"][0] + a["size"][0], a["pos"][1] + (slot + 0.5) * SLOT_HEIGHT)
        x1, y1 = at(b["pos"][0], b["pos"][1] + (target_slot + 0.5) * SLOT_HEIGHT)
        reach = max(abs(x1 - x0) * 0.5, 12)
        curve = [((1 - t) ** 3 * x0 + 3 * (1 - t) ** 2 * t * (x0 + reach) + 3 * (1 - t) * t ** 2 * (x1 - reach)
                  + t ** 3 * x1, (1 - t) ** 3 * y0 + 3 * (1 - t) ** 2 * t * y0 + 3 * (1 - t) * t ** 2 * y1 + t ** 3 * y1)
                 for t in np.linspace(0, 1, 24)]
        draw.line(curve, fill=_type_colour(kind), width=2)
    font = _font(max(9, min(13, round(34 * scale))))
    for n in nodes_:
        x0, y0 = at(n["pos"][0], n["pos"][1] - TITLE_HEIGHT)
        x1, y1 = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        ours = n["type"].startswith("DiffusionRig")
        draw.rounded_rectangle((x0, y0, x1, y1), radius=4, fill=(52, 56, 70) if ours else (60, 60, 60),
                               outline=(120, 130, 160) if ours else (110, 110, 110))
        title_bottom = at(0, n["pos"][1])[1]
        draw.rounded_rectangle((x0, y0, x1, title_bottom), radius=4, fill=(70, 82, 120) if ours else (80, 80, 80))
        label = titles.get(n["type"], n["type"]).replace("DiffusionRig ", "")
        if font.getlength(label) > x1 - x0 - 4:
            while label and font.getlength(label + "…") > x1 - x0 - 4:
                label = label[:-1]
            label += "…"
        draw.text((x0 + 3, y0 + 1), label, fill=INK, font=font)
    big = _font(17)
    draw.rectangle((0, height - band, width, height), fill=(36, 36, 42))
    draw.text((10, height - band + 4), f"{name}.json", fill=INK, font=big)
    draw.text((10, height - band + 25), "graph of the workflow (drawn from its JSON; not a model output)",
              fill=FAINT, font=_font(12))
    return image


def graph_caption(name: str) -> str:
    return (f"Thumbnail of workflows/{name}.json: a drawing of its graph (nodes and links from the JSON), not a model "
            f"output. python tools/make_pictures.py --no-demo")


def demo_workflow_output(models: Path) -> list[Image.Image]:
    """relight_demo_person.json run in this process on the demo's models: its saved frames."""
    import nodes
    from run_workflow import run_prompt
    from workflow_format import to_api

    prompt = to_api(json.loads((WORKFLOWS / f"{DEMO_WORKFLOW}.json").read_text()), nodes.NODE_CLASS_MAPPINGS)
    previous = os.environ.get("COMFY_DIFFUSIONRIG_MODELS")
    os.environ["COMFY_DIFFUSIONRIG_MODELS"] = str(models)
    try:
        with tempfile.TemporaryDirectory() as out:
            run_prompt(prompt, out)
            saved = sorted(Path(out).glob("*.pt"))
            frames = torch.load(saved[0], weights_only=True)
    finally:
        if previous is None:
            os.environ.pop("COMFY_DIFFUSIONRIG_MODELS")
        else:
            os.environ["COMFY_DIFFUSIONRIG_MODELS"] = previous
    return [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()) for f in frames]


def demo_thumbnail(frames: list[Image.Image], model_name: str) -> tuple[Image.Image, str]:
    width, height = THUMB_SIZE
    band, cell = 44, 160
    image = Image.new("RGB", THUMB_SIZE, BACKGROUND)
    top = (height - band - 2 * cell) // 3
    places = [(16 + k * (cell + 8), top) for k in range(3)] + [(16 + k * (cell + 8), 2 * top + cell) for k in range(2)]
    for frame, place in zip(frames, places):
        image.paste(frame.resize((cell, cell), Image.Resampling.BICUBIC), place)
    draw = ImageDraw.Draw(image)
    x, y = places[-1][0] + cell + 8, 2 * top + cell
    for k, line in enumerate(["the workflow's own", f"{len(frames)} frames: light", "turned -60 -> +60 deg", "",
                              "SYNTHETIC person,", "demo model, 32 px"]):
        draw.text((x + 4, y + 10 + k * 19), line, fill=INK if k < 3 else FAINT, font=_font(14))
    draw.rectangle((0, height - band, width, height), fill=(36, 36, 42))
    draw.text((10, height - band + 4), f"{DEMO_WORKFLOW}.json", fill=INK, font=_font(17))
    draw.text((10, height - band + 25), "its output on the demo's models (after comfy-diffusionrig demo)", fill=FAINT,
              font=_font(12))
    caption = (f"Thumbnail of workflows/{DEMO_WORKFLOW}.json: the workflow's own output (run in-process by "
               f"tools/run_workflow.py, every widget as saved) on the offline demo's models ({model_name}, 32 px, "
               f"trained on SYNTHETIC faces only) and its synthetic person. {COMMAND}")
    return image, caption


# ------------------------------------------------------------------------------------------ the real frontend
def comfyui_screenshot(comfyui: Path, models: Path) -> tuple[Image.Image, str]:
    """relight_demo_person.json opened in the real ComfyUI frontend (headless Chromium) and run there; ComfyUI is
    started as tests/real_comfyui.py starts it (its Python: $COMFYUI_PYTHON)."""
    os.environ["COMFYUI_DIR"] = str(comfyui)
    sys.path.insert(0, str(ROOT / "tests"))
    import real_comfyui

    with tempfile.TemporaryDirectory() as base, real_comfyui.start_comfyui(Path(base), models, "--cpu") as (url, log):
        real_comfyui.post_json(f"{url}/api/settings", {"Comfy.Minimap.Visible": False})
        with real_comfyui.open_frontend(url, log) as frontend:
            page = frontend.page
            page.set_viewport_size({"width": 2000, "height": 820})
            frontend.open(WORKFLOWS / f"{DEMO_WORKFLOW}.json")
            frontend.run_to_end(DEMO_WORKFLOW)
            # 0.7: above LiteGraph's low-quality zoom (titles and widgets drawn); the whole graph in view
            page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 0.7; c.ds.offset = [20, 50];"
                          " window.app.graph.setDirtyCanvas(true, true); }")
            page.wait_for_timeout(2000)
            with tempfile.NamedTemporaryFile(suffix=".png") as shot:
                page.screenshot(path=shot.name)
                picture = Image.open(shot.name).convert("RGB")
            version = real_comfyui.get_json(f"{url}/system_stats")["system"].get("comfyui_version", "?")
    caption = (f"Screenshot: workflows/{DEMO_WORKFLOW}.json opened and run in the real ComfyUI frontend (ComfyUI "
               f"{version}, headless Chromium, --cpu) on the offline demo's models and its SYNTHETIC person. "
               f"{COMMAND} --comfyui COMFYUI_DIR")
    return with_caption(picture, [f"ComfyUI {version}: {DEMO_WORKFLOW}.json after Run (the demo's synthetic person, "
                                  "32 px model)", f"made by {COMMAND} --comfyui COMFYUI_DIR"]), caption


# ------------------------------------------------------------------------------------------------ the index
def write_index(captions: dict[str, str]) -> None:
    """docs/pictures/README.md: every picture and thumbnail with what made it (kept entries of earlier runs)."""
    index = PICTURES / "README.md"
    index.parent.mkdir(parents=True, exist_ok=True)
    known = {}
    if index.exists():
        for line in index.read_text().splitlines():
            if line.startswith("| `") and "` | " in line:
                file, text = line[3:].split("` | ", 1)
                known[file] = text.rstrip(" |")
    known.update(captions)
    rows = [f"| `{file}` | {text} |" for file, text in sorted(known.items())]
    index.write_text("# Pictures\n\nEvery picture here and every workflow thumbnail (`workflows/*.jpg`) is made by "
                     "`tools/make_pictures.py` from a real run; each carries the same caption in its metadata.\n\n"
                     "```\ncomfy-diffusionrig demo --models models --out demo_output\n"
                     f"{COMMAND}\n```\n\n| file | what made it |\n| --- | --- |\n" + "\n".join(rows) + "\n")
    print(f"wrote {index.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="the output folder of a finished full `comfy-diffusionrig demo`")
    parser.add_argument("--models", type=Path, help="the models folder that demo ran with (--models)")
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout: also screenshot a workflow in its frontend")
    parser.add_argument("--no-demo", action="store_true",
                        help="only what needs no models: the icon and the graph-drawing thumbnails")
    args = parser.parse_args(argv)
    captions: dict[str, str] = {}

    def keep(path: Path, image, caption: str, **kwargs) -> None:
        save_picture(image, path, caption, **kwargs)
        captions[str(path.relative_to(ROOT))] = caption

    for path in sorted(WORKFLOWS.glob("*.json")):
        if path.stem != DEMO_WORKFLOW:
            keep(path.with_suffix(".jpg"), graph_drawing(json.loads(path.read_text()), path.stem),
                 graph_caption(path.stem))
    keep(PICTURES / "icon.png", *icon())
    if not args.no_demo:
        if args.demo is None or args.models is None:
            parser.error("--demo and --models are needed (or --no-demo)")
        files = demo_files(args.demo, args.models)
        source, faces, balance = relight_person(args.models, files["model"], files["photo"])
        keep(PICTURES / "before_after.png", *before_after(source, faces, balance, files["model"], files["photo"]))
        frames, durations, caption = light_sweep_frames(faces, balance, files["model"], files["photo"])
        keep(PICTURES / "light_sweep.gif", frames[0], caption, frames=frames, durations=durations)
        keep(PICTURES / "contact_sheet.png", *demo_contact_sheet(args.demo, files["report"]))
        keep(PICTURES / "buffers_astronaut.png",
             *photo_buffers(args.models, files["model"], ROOT / "example_images" / "astronaut.png"))
        keep(WORKFLOWS / f"{DEMO_WORKFLOW}.jpg",
             *demo_thumbnail(demo_workflow_output(args.models), files["model"].name))
        if args.comfyui is not None:
            keep(PICTURES / "workflow_in_comfyui.png", *comfyui_screenshot(args.comfyui, args.models))
    write_index(captions)
    return 0


if __name__ == "__main__":
    sys.exit(main())

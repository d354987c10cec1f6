"""Write the shareable workflows in workflows/ (ComfyUI UI format) from compact graph descriptions.

    python tools/make_workflows.py          # rewrites workflows/*.json

Every workflow runs on the example images with the offline stand-in models of
`comfy-diffusionrig demo-assets`; with the real models, pick them in the loader nodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from comfy_diffusionrig.demo.run import demo_file_names, DemoConfig  # noqa: E402
from comfy_diffusionrig.demo.synthetic import DEMO_MODEL_NAME as DR_MODEL  # noqa: E402
from comfy_diffusionrig.demo.synthetic import DEMO_UPSCALER_NAME as UPSCALER  # noqa: E402
from workflow_format import Graph  # noqa: E402

DECA_FILE = "deca_model.tar"
PHOTO = "examples/astronaut.png"
REFERENCE = "examples/grace_hopper.jpg"
ENVIRONMENT = "examples/studio_key_fill.hdr"
DEMO_NAMES = demo_file_names(DemoConfig())


def _front(g: Graph, photo: str, x: int, y: int, title: str):
    """Load a photo, align its face, fit DECA: returns (photo, align, fit) node ids."""
    load = g.add("DiffusionRigLoadPhoto", (x, y), title=title, image=photo)
    align = g.add("DiffusionRigDetectAlign", (x + 340, y))
    g.connect(load, "image", align, "image")
    return load, align


def _models(g: Graph, x: int, y: int):
    deca = g.add("DiffusionRigLoadDECA", (x, y), deca_model=DECA_FILE)
    model = g.add("DiffusionRigLoadModel", (x, y + 140), ckpt_name=DR_MODEL)
    return deca, model


def _fit(g: Graph, deca: int, align: int, x: int, y: int) -> int:
    fit = g.add("DiffusionRigDECAFit", (x, y))
    g.connect(deca, "deca", fit, "deca")
    g.connect(align, "aligned", fit, "aligned")
    g.connect(align, "alignment", fit, "alignment")
    return fit


def _sample(g: Graph, deca: int, model: int, align: int, source_rig: int, edited_rig: int, x: int, y: int,
            edited_output: str = "rig", **sampler) -> int:
    """Render source and edited buffers, encode the global code, invert once (DiffusionRig Invert: ComfyUI keeps
    it while only the edit changes), sample from that inversion: returns the sampler id."""
    source = g.add("DiffusionRigRenderBuffers", (x, y), title="Render Buffers (original)")
    g.connect(deca, "deca", source, "deca")
    g.connect(source_rig, "rig", source, "rig")
    edited = g.add("DiffusionRigRenderBuffers", (x, y + 160), title="Render Buffers (edited)")
    g.connect(deca, "deca", edited, "deca")
    g.connect(edited_rig, edited_output, edited, "rig")
    code = g.add("DiffusionRigEncodeGlobalCode", (x, y + 320))
    g.connect(model, "dr_model", code, "dr_model")
    g.connect(align, "aligned", code, "aligned_image")
    preview = g.add("PreviewImage", (x + 340, y + 160), title="Buffers preview")
    g.connect(edited, "preview", preview, "images")
    invert = g.add("DiffusionRigInvert", (x, y + 460), title="DiffusionRig Invert (once; kept while only the "
                   "edit changes)", **sampler)
    g.connect(model, "dr_model", invert, "dr_model")
    g.connect(align, "aligned", invert, "source_image")
    g.connect(source, "buffers", invert, "source_buffers")
    g.connect(code, "global_code", invert, "global_code")
    sample = g.add("DiffusionRigSampler", (x + 340, y + 320), **{"start": "inversion", **sampler})
    g.connect(model, "dr_model", sample, "dr_model")
    g.connect(edited, "buffers", sample, "rig_buffers")
    g.connect(code, "global_code", sample, "global_code")
    g.connect(invert, "inverted_start", sample, "inverted_start")
    return sample


def _paste(g: Graph, load: int, align: int, sample: int, x: int, y: int, prefix: str,
           motion: tuple[int, int, int, str] | None = None, photo_output: str = "image", **settings) -> int:
    """Paste Face Back (its defaults: the photo's own detail, the measured best) -> Save Image. motion: (deca, fit,
    edited rig node, its output) connects the rigs, so a face the edit moved takes the photo's detail along."""
    paste = g.add("DiffusionRigPasteBack", (x, y), **settings)
    g.connect(load, photo_output, paste, "original")
    g.connect(align, "alignment", paste, "alignment")
    g.connect(sample, "image", paste, "edited")
    if motion is not None:
        deca, fit, edited, output = motion
        g.connect(deca, "deca", paste, "deca")
        g.connect(fit, "rig", paste, "rig")
        g.connect(edited, output, paste, "edited_rig")
    save = g.add("SaveImage", (x + 340, y), filename_prefix=prefix)
    g.connect(paste, "image", save, "images")
    return paste


def relight_from_reference(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo to relight")
    ref_load, ref_align = _front(g, REFERENCE, 0, 620, "Reference photo (its light is copied)")
    fit = _fit(g, deca, align, 700, 320)
    ref_fit = _fit(g, deca, ref_align, 700, 620)
    relight = g.add("DiffusionRigRelight", (1040, 320), mode="copy reference")
    g.connect(fit, "rig", relight, "rig")
    g.connect(ref_fit, "rig", relight, "reference")
    sphere = g.add("PreviewImage", (1040, 700), title="Reference light")
    g.connect(relight, "lit_sphere", sphere, "images")
    sample = _sample(g, deca, model, align, fit, relight, 1380, 0)
    _paste(g, load, align, sample, 2060, 320, "diffusionrig_relit_from_reference")
    return g.to_json()


def _relight_photo(mappings, relight: dict, sphere_title: str, prefix: str) -> dict:
    """Photo -> align -> fit -> Relight(**relight) with its lit sphere -> sample -> paste back -> save."""
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo to relight")
    fit = _fit(g, deca, align, 700, 320)
    node = g.add("DiffusionRigRelight", (1040, 320), **relight)
    g.connect(fit, "rig", node, "rig")
    sphere = g.add("PreviewImage", (1040, 700), title=sphere_title)
    g.connect(node, "lit_sphere", sphere, "images")
    sample = _sample(g, deca, model, align, fit, node, 1380, 0)
    _paste(g, load, align, sample, 2060, 320, prefix)
    return g.to_json()


def relight_sliders(mappings) -> dict:
    return _relight_photo(mappings, dict(mode="sliders", azimuth=60.0, elevation=25.0, intensity=0.9, ambient=0.45,
                                         color="#FFE2C4"), "Lit sphere: the new light", "diffusionrig_relit")


def relight_preset(mappings) -> dict:
    return _relight_photo(mappings, dict(title="Relight (pick a preset; mirror flips the key light)", mode="preset",
                                         preset="golden hour", mirror_preset=False),
                          "Lit sphere: the preset's light", "diffusionrig_relit_preset")


def relight_environment(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo to relight")
    fit = _fit(g, deca, align, 700, 320)
    light = g.add("DiffusionRigLightFromEnvironment", (1040, 320), title="Light from Environment (put your .hdr "
                  "in ComfyUI/input/)", environment=ENVIRONMENT, yaw=0.0, exposure=0.0, level="portrait")
    g.connect(fit, "rig", light, "rig")
    sphere = g.add("PreviewImage", (1040, 620), title="Lit sphere: the environment's light")
    g.connect(light, "lit_sphere", sphere, "images")
    panorama = g.add("PreviewImage", (1040, 900), title="Panorama (red mark: where the light comes from)")
    g.connect(light, "panorama", panorama, "images")
    sample = _sample(g, deca, model, align, fit, light, 1380, 0)
    _paste(g, load, align, sample, 2060, 320, "diffusionrig_relit_environment")
    return g.to_json()


def expression_pose_transfer(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo to edit")
    ref_load, ref_align = _front(g, REFERENCE, 0, 620, "Reference: expression and jaw donor")
    fit = _fit(g, deca, align, 700, 320)
    ref_fit = _fit(g, deca, ref_align, 700, 620)
    edit = g.add("DiffusionRigEditExpressionPose", (1040, 320), jaw_open=8.0, head_yaw=10.0)
    g.connect(fit, "rig", edit, "rig")
    g.connect(ref_fit, "rig", edit, "reference")
    sample = _sample(g, deca, model, align, fit, edit, 1380, 0)
    _paste(g, load, align, sample, 2060, 320, "diffusionrig_expression_transfer", motion=(deca, fit, edit, "rig"))
    return g.to_json()


def light_sweep_video(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo")
    fit = _fit(g, deca, align, 700, 320)
    sweep = g.add("DiffusionRigRigSweep", (1040, 320), parameter="light_azimuth", start=-60.0, end=60.0, frames=8)
    g.connect(fit, "rig", sweep, "rig")
    sample = _sample(g, deca, model, align, fit, sweep, 1380, 0, edited_output="frames", batch_size=4)
    _paste(g, load, align, sample, 2060, 320, "diffusionrig_light_sweep")
    return g.to_json()


def paste_back_upscale(mappings) -> dict:
    """Relight, upscale the 256 px edit with ComfyUI's model upscaler, paste it into the full-size photo."""
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load, align = _front(g, PHOTO, 0, 320, "Photo")
    fit = _fit(g, deca, align, 700, 320)
    relight = g.add("DiffusionRigRelight", (1040, 320), mode="rotate fitted light", azimuth=-40.0, elevation=10.0)
    g.connect(fit, "rig", relight, "rig")
    sample = _sample(g, deca, model, align, fit, relight, 1380, 0)
    upscaler = g.add("UpscaleModelLoader", (1720, 620), title="Load Upscale Model (pick a trained one)",
                     model_name=UPSCALER)
    upscale = g.add("ImageUpscaleWithModel", (2060, 620))
    g.connect(upscaler, "UPSCALE_MODEL", upscale, "upscale_model")
    g.connect(sample, "image", upscale, "image")
    paste = g.add("DiffusionRigPasteBack", (2400, 320), title="Paste Face Back (detail = edit: the upscaled pixels)",
                  color_match=True, detail="edit")
    g.connect(load, "image", paste, "original")
    g.connect(align, "alignment", paste, "alignment")
    g.connect(upscale, "IMAGE", paste, "edited")
    save = g.add("SaveImage", (2740, 320), filename_prefix="diffusionrig_upscaled")
    g.connect(paste, "image", save, "images")
    identity = g.add("DiffusionRigIdentity", (2740, 620), title="Did the edit keep the person?")
    g.connect(load, "image", identity, "image_a")
    g.connect(paste, "image", identity, "image_b")
    return g.to_json()


def relight_large_photo(mappings) -> dict:
    """Relight a large photo: the 256 px edit's change of light carried onto the photo's own full-resolution detail
    (Paste Face Back's default), the rigs connected so that a jaw or head edit moves the detail too."""
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load = g.add("DiffusionRigLoadPhoto", (0, 320), title="Photo (load your large photo)", image=PHOTO)
    large = g.add("ImageScaleBy", (340, 320), title="Stand-in for a large photo: 3x (remove with your own photo)",
                  upscale_method="lanczos", scale_by=3.0)
    g.connect(load, "image", large, "image")
    align = g.add("DiffusionRigDetectAlign", (700, 320))
    g.connect(large, "IMAGE", align, "image")
    fit = _fit(g, deca, align, 1040, 320)
    relight = g.add("DiffusionRigRelight", (1040, 520), mode="sliders", azimuth=55.0, elevation=20.0)
    g.connect(fit, "rig", relight, "rig")
    sample = _sample(g, deca, model, align, fit, relight, 1380, 0)
    paste = _paste(g, large, align, sample, 2060, 320, "diffusionrig_relit_large", motion=(deca, fit, relight, "rig"),
                   photo_output="IMAGE")
    where = g.add("MaskToImage", (2060, 620), title="Where the edit's own pixels were used (motion_mask)")
    g.connect(paste, "motion_mask", where, "mask")
    preview = g.add("PreviewImage", (2400, 620))
    g.connect(where, "IMAGE", preview, "images")
    return g.to_json()


def personalize_and_relight(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    album = g.add("DiffusionRigBuildAlbum", (0, 320), title="Build Face Album (set folder to one person's photos)",
                  check_identity=False, folder="examples")
    g.connect(deca, "deca", album, "deca")
    train = g.add("DiffusionRigTrain", (340, 320), steps=20, batch_size=2, learning_rate=1e-5,
                  save_name="workflow_example")
    g.connect(model, "dr_model", train, "dr_model")
    g.connect(album, "album", train, "face_album")
    curve = g.add("PreviewImage", (680, 620), title="Loss curve")
    g.connect(train, "loss_curve", curve, "images")
    load, align = _front(g, PHOTO, 0, 700, "Photo of the person to relight")
    fit = _fit(g, deca, align, 700, 700)
    relight = g.add("DiffusionRigRelight", (1040, 700), mode="sliders", azimuth=-50.0)
    g.connect(fit, "rig", relight, "rig")
    sample = _sample(g, deca, train, align, fit, relight, 1380, 320)
    _paste(g, load, align, sample, 2060, 700, "diffusionrig_personalized")
    return g.to_json()


def relight_demo_person(mappings) -> dict:
    """The offline demo's person (a rigged photo: no detection, no fit) relit by the demo's personalized model
    with its light turning from -60 to +60 degrees: a real, visible edit without licensed files."""
    g = Graph(mappings)
    deca = g.add("DiffusionRigLoadDECA", (0, 0), deca_model=DECA_FILE)
    model = g.add("DiffusionRigLoadModel", (0, 140), title="Load DiffusionRig Model (the demo's, trained on "
                  "synthetic faces)", ckpt_name=DEMO_NAMES["personalized"])
    person = g.add("DiffusionRigLoadFaceRig", (0, 320), title="Load Face Rig (the demo's person; run "
                   "`comfy-diffusionrig demo` first)", rig_photo=DEMO_NAMES["person"].format(1))
    sweep = g.add("DiffusionRigRigSweep", (1040, 320), parameter="light_azimuth", start=-60.0, end=60.0, frames=5,
                  ease=False)
    g.connect(person, "rig", sweep, "rig")
    sample = _sample(g, deca, model, person, person, sweep, 1380, 0, edited_output="frames", batch_size=5)
    enlarge = g.add("ImageScaleBy", (2060, 320), title="Enlarge for viewing (the demo model works at 32 px)",
                    upscale_method="nearest-exact", scale_by=8.0)
    g.connect(sample, "image", enlarge, "image")
    save = g.add("SaveImage", (2400, 320), filename_prefix="diffusionrig_demo_person_light_sweep")
    g.connect(enlarge, "IMAGE", save, "images")
    return g.to_json()


def relight_video_clip(mappings) -> dict:
    g = Graph(mappings)
    deca, model = _models(g, 0, 0)
    load = g.add("DiffusionRigLoadPhoto", (0, 320), title="Stand-in clip: one photo (use a video loader's IMAGE "
                 "output instead)", image=PHOTO)
    frames = g.add("RepeatImageBatch", (340, 320), title="Frames", amount=3)
    g.connect(load, "image", frames, "image")
    clip = g.add("DiffusionRigRelightVideoClip", (700, 0), light="sliders", azimuth=-50.0, elevation=20.0,
                 end_azimuth_turn=90.0, smoothing=2.0)
    g.connect(model, "dr_model", clip, "dr_model")
    g.connect(deca, "deca", clip, "deca")
    g.connect(frames, "IMAGE", clip, "frames")
    save = g.add("SaveImage", (1040, 0), filename_prefix="diffusionrig_relit_clip")
    g.connect(clip, "frames", save, "images")
    return g.to_json()


WORKFLOWS = {
    "relight_from_reference": relight_from_reference,
    "relight_sliders_lit_sphere": relight_sliders,
    "expression_pose_transfer": expression_pose_transfer,
    "light_sweep_video": light_sweep_video,
    "paste_back_upscale": paste_back_upscale,
    "relight_preset": relight_preset,
    "relight_hdri_environment": relight_environment,
    "personalize_and_relight": personalize_and_relight,
    "relight_video_clip": relight_video_clip,
    "relight_large_photo": relight_large_photo,
    "relight_demo_person": relight_demo_person,
}


def build_all() -> dict[str, dict]:
    import nodes

    return {name: make(nodes.NODE_CLASS_MAPPINGS) for name, make in WORKFLOWS.items()}


def main() -> None:
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    main()

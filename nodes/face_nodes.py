"""Face nodes: photos in, aligned faces, DECA fits (FACE_RIG), edits, buffers, paste back, identity."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from comfy_diffusionrig.photo import alignment as photo_alignment
from comfy_diffusionrig.photo import detection, loading, paste
from comfy_diffusionrig.photo import identity
from comfy_diffusionrig.face.buffers import buffer_images, buffer_preview, shading_maps
from comfy_diffusionrig.face.deca import FLAME_FILES, load_deca
from comfy_diffusionrig.core.imaging import hex_color
from comfy_diffusionrig.face.motion import rig_motion
from comfy_diffusionrig.face.lighting import LIGHT_PRESETS, SLIDER_LIGHT, lit_sphere, preset_light, rotate_sh, sh_from_direction
from comfy_diffusionrig.face.rig import (RENDER_BATCH, SWEEP_PARAMETERS, copy_from, edit_pose, fit_faces, render_layers,
                                    stack_buffers, sweep, sweep_values)
from comfy_diffusionrig.face.rig_files import RigFileError, load_rigged_photo, save_rigged_photo

from .host import (RIG_FOLDER, ModelHandle, check_interrupt, check_model_file, file_fingerprint, find_model_files,
                   image_to_pil, image_to_unit, input_files, input_path, model_files, model_fingerprint, model_path,
                   new_model_file, models_root, pil_to_image, preview_file, storage_device, unit_to_image)

CATEGORY = "DiffusionRig"
DETECTORS = list(detection.DETECTORS)


@dataclass
class FaceAlignments:
    """FACE_ALIGNMENT: the aligned faces of a batch of photos, and which photo each came from."""

    faces: list  # comfy_diffusionrig.photo.alignment.AlignedFace
    sources: list[int]

    def __len__(self) -> int:
        return len(self.faces)


class LoadFacePhoto:
    DISPLAY_NAME = "Load Face Photo"
    DESCRIPTION = ("Loads a photo from ComfyUI's input folder or the pack's example images, upright (EXIF "
                   "orientation applied) and as 8-bit RGB whatever the file (RGBA, grey, CMYK, 16-bit).")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The photo, [1, H, W, 3].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (input_files(), {"image_upload": True,
                                                       "tooltip": "A file of ComfyUI/input/ (upload one with the "
                                                                  "button) or one of the pack's example images "
                                                                  "(examples/...)."})}}

    def load(self, image):
        return (pil_to_image([loading.load_image(input_path(image, self.DISPLAY_NAME))]),)

    @classmethod
    def IS_CHANGED(cls, image):
        return file_fingerprint([input_path(image, cls.DISPLAY_NAME)])


class LoadDECA:
    DISPLAY_NAME = "Load DECA"
    DESCRIPTION = ("Loads DECA (the 3D face fitter) from models/deca/deca_model.tar and the FLAME files from "
                   "models/flame/ (generic_model.pkl, landmark_embedding.npy, head_template.obj, "
                   "FLAME_texture.npz).")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("DECA_MODEL",)
    RETURN_NAMES = ("deca",)
    OUTPUT_TOOLTIPS = ("DECA with FLAME and the buffer renderer, kept loaded between runs.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deca_model": (model_files("deca", (".tar", ".pt", ".pth")),
                           {"tooltip": "DECA checkpoint in models/deca/ (deca_model.tar)."}),
            "rasterizer": (["auto", "torch", "pytorch3d"],
                           {"default": "auto", "tooltip": "auto: pytorch3d when installed, else the pack's own "
                                                          "rasterizer (same pixels)."}),
        }}

    def load(self, deca_model, rasterizer):
        node = self.DISPLAY_NAME
        path = model_path("deca", deca_model, node)
        flame = find_model_files("flame", FLAME_FILES, node)
        return (ModelHandle(load_deca(path, flame, device=storage_device(), backend=rasterizer)),)

    @classmethod
    def IS_CHANGED(cls, deca_model, **_):
        # DECA and FLAME files replaced under the same names must be loaded again
        return model_fingerprint("deca", deca_model) + "\n" + model_fingerprint("flame", *FLAME_FILES)


class DetectAlignFace:
    DISPLAY_NAME = "Detect & Align Face"
    DESCRIPTION = ("Finds faces (dlib, offline) and FFHQ-aligns them to squares as DiffusionRig expects. Keeps "
                   "the alignment so Paste Face Back can put the edit into the photo.")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "align"
    RETURN_TYPES = ("IMAGE", "FACE_ALIGNMENT", "INT")
    RETURN_NAMES = ("aligned", "alignment", "count")
    OUTPUT_TOOLTIPS = ("Aligned faces, one per chosen face of every photo.", "For Paste Face Back / DECA Fit.",
                       "How many faces came out.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photo(s); every photo of the batch is searched."}),
            "faces": (["largest", "index", "all"],
                      {"default": "largest", "tooltip": "Which faces: the largest, the index-th (largest first), "
                                                        "or all of them as a batch."}),
            "index": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Face index for faces = index."}),
            "detector": (DETECTORS, {"default": "hog", "tooltip": "hog: fast, frontal faces (official). cnn: turned "
                                                                  "or small faces, slower. insightface: needs the "
                                                                  "package and a model pack in models/insightface."}),
            "size": ("INT", {"default": 256, "min": 64, "max": 1024, "step": 64,
                             "tooltip": "Aligned size; DiffusionRig models work at 256."}),
        }}

    def align(self, image, faces, index, detector, size):
        node = self.DISPLAY_NAME
        aligned, sources = [], []
        for i, photo in enumerate(image_to_pil(image, node)):
            check_interrupt()
            try:
                found = photo_alignment.align_faces(photo, mode=faces, index=index, size=size, detector=detector,
                                              models_dir=str(models_root()))
            except ValueError as err:
                raise ValueError(f"{node}, photo {i + 1} of {image.shape[0]}: {err}") from err
            aligned += found
            sources += [i] * len(found)
        return (pil_to_image([a.image for a in aligned]), FaceAlignments(aligned, sources), len(aligned))


class DECAFit:
    DISPLAY_NAME = "DECA Fit"
    DESCRIPTION = ("Fits DECA's 3D face model to aligned faces: shape, texture, expression, pose, camera and "
                   "spherical-harmonics light (a FACE_RIG to edit).")
    CATEGORY = CATEGORY
    FUNCTION = "fit"
    RETURN_TYPES = ("FACE_RIG",)
    RETURN_NAMES = ("rig",)
    OUTPUT_TOOLTIPS = ("The fitted codes of every face.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deca": ("DECA_MODEL", {"tooltip": "From Load DECA."}),
            "aligned": ("IMAGE", {"tooltip": "Aligned faces (Detect & Align Face)."}),
        }, "optional": {
            "alignment": ("FACE_ALIGNMENT", {"tooltip": "From the same Detect & Align Face: reuses its landmarks "
                                                        "instead of detecting them again."}),
        }}

    def fit(self, deca, aligned, alignment=None):
        node = self.DISPLAY_NAME
        if alignment is not None and len(alignment) == aligned.shape[0]:
            landmarks = np.stack([a.landmarks for a in alignment.faces])
        else:
            landmarks = []
            for i, face in enumerate(image_to_pil(aligned, node)):
                found = detection.detect_faces(face, models_dir=str(models_root()))
                if not found:
                    raise ValueError(f"{node}: no face found in aligned image {i + 1}; connect the alignment output "
                                     "of Detect & Align Face, or check the image")
                landmarks.append(found[0].landmarks)
            landmarks = np.stack(landmarks)
        return (deca.run(fit_faces, image_to_unit(aligned, node), landmarks, batch=len(landmarks)),)


class LoadFaceRig:
    DISPLAY_NAME = "Load Face Rig"
    DESCRIPTION = ("Loads a rigged photo from models/face_rigs/: an aligned face that carries its face rig (written "
                   "by Save Face Rig, or the offline demo's synthetic person). No detection, no DECA fit: edit and "
                   "render it as the output of DECA Fit.")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "FACE_RIG")
    RETURN_NAMES = ("aligned", "rig")
    OUTPUT_TOOLTIPS = ("The aligned face, [1, S, S, 3] (give it to Encode Global Code and the Sampler).",
                       "Its rig (as DECA Fit gives it).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"rig_photo": (model_files(RIG_FOLDER, (".png",)),
                                           {"tooltip": "A .png in models/face_rigs/ that carries a face rig."})}}

    def load(self, rig_photo):
        node = self.DISPLAY_NAME
        try:
            image, rig = load_rigged_photo(model_path(RIG_FOLDER, rig_photo, node))
        except RigFileError as err:
            raise ValueError(f"{node}: {err}") from err
        return (pil_to_image([image]), rig)

    @classmethod
    def VALIDATE_INPUTS(cls, rig_photo):  # a missing photo: say where it comes from (e.g. run the demo)
        return check_model_file(RIG_FOLDER, rig_photo, cls.DISPLAY_NAME)

    @classmethod
    def IS_CHANGED(cls, rig_photo):
        return model_fingerprint(RIG_FOLDER, rig_photo)


class SaveFaceRig:
    DISPLAY_NAME = "Save Face Rig"
    DESCRIPTION = ("Saves aligned faces with their rigs as rigged photos (PNG, the rig inside) in "
                   "models/face_rigs/: load them again with Load Face Rig to edit without fitting, or share them.")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "save"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("paths",)
    OUTPUT_TOOLTIPS = ("The files written, one line each.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aligned": ("IMAGE", {"tooltip": "The aligned faces the rig was fitted on (Detect & Align Face)."}),
            "rig": ("FACE_RIG", {"tooltip": "Their rig (DECA Fit, or an edit of it), one face per image."}),
            "name_prefix": ("STRING", {"default": "face_rig", "tooltip": "Files are <prefix>_00001.png, ... (the "
                                                                      "next free numbers); subfolders allowed."}),
        }}

    def save(self, aligned, rig, name_prefix):
        node = self.DISPLAY_NAME
        if aligned.shape[0] != len(rig):
            raise ValueError(f"{node}: {aligned.shape[0]} aligned images but the rig has {len(rig)} faces; connect "
                             "the aligned output that DECA Fit fitted")
        base = new_model_file(RIG_FOLDER, name_prefix, node)
        numbered = lambda n: base.with_name(f"{base.name}_{n:05d}.png")  # noqa: E731
        written, number = [], 1
        for i, picture in enumerate(image_to_pil(aligned, node)):
            while numbered(number).exists():
                number += 1
            try:
                written.append(save_rigged_photo(numbered(number), picture, rig, i))
            except RigFileError as err:
                raise ValueError(f"{node}: {err}") from err
        text = "\n".join(str(p) for p in written)
        return {"ui": {"text": [text]}, "result": (text,)}


def parse_color(text: str, node: str) -> tuple[float, float, float]:
    try:
        return hex_color(text)
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from None


def _sphere_image(light: torch.Tensor) -> torch.Tensor:
    return unit_to_image(lit_sphere(light.float(), size=256))


# The light sliders of Relight and Relight Video Clip (widget order matters to saved workflows).
LIGHT_SLIDERS = {
    "azimuth": ("FLOAT", {"default": SLIDER_LIGHT["azimuth"], "min": -180.0, "max": 180.0, "step": 1.0,
                          "tooltip": "Degrees; 0 = from the camera, positive = from image right."}),
    "elevation": ("FLOAT", {"default": SLIDER_LIGHT["elevation"], "min": -90.0, "max": 90.0, "step": 1.0,
                            "tooltip": "Degrees; positive = from above."}),
    "intensity": ("FLOAT", {"default": SLIDER_LIGHT["intensity"], "min": 0.0, "max": 3.0, "step": 0.05,
                            "tooltip": "Direct light strength (sliders mode)."}),
    "ambient": ("FLOAT", {"default": SLIDER_LIGHT["ambient"], "min": 0.0, "max": 3.0, "step": 0.05,
                          "tooltip": "Light from everywhere (sliders mode): higher = softer shadows."}),
    "color": ("STRING", {"default": SLIDER_LIGHT["color"],
                         "tooltip": "Light colour as hex, e.g. #FFD8A8 for warm (sliders mode)."}),
}


class Relight:
    DISPLAY_NAME = "Relight"
    DESCRIPTION = ("Changes the light of a face rig: set a light with sliders, pick a named lighting setup "
                   "(Rembrandt, split, rim, golden hour...), rotate the fitted light, or copy the light of a "
                   "reference face. The lit sphere shows the light before sampling. In the ComfyUI frontend the node "
                   "carries a light handle: drag on its sphere to set azimuth and elevation (the point dragged to is "
                   "where the light comes from; the ring around it reaches behind the head), turn the mouse wheel for "
                   "intensity and shift+wheel for ambient. Once the graph has run, the face (from the Render Buffers "
                   "node after it) shows shaded by the new light while you drag; releasing the handle queues the graph "
                   "in the auto-queue 'on change' mode. The handle only sets these widgets.")
    CATEGORY = CATEGORY
    FUNCTION = "relight"
    RETURN_TYPES = ("FACE_RIG", "IMAGE")
    RETURN_NAMES = ("rig", "lit_sphere")
    OUTPUT_TOOLTIPS = ("The rig with its new light.", "A grey sphere under each face's new light.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "From DECA Fit."}),
            "mode": (["sliders", "preset", "rotate fitted light", "copy reference"],
                     {"default": "sliders", "tooltip": "sliders: a new directional + ambient light. preset: a named "
                                                       "lighting setup (see 'preset'). rotate: turn the photo's own "
                                                       "light by azimuth/elevation. copy: the reference rig's light."}),
            **LIGHT_SLIDERS,
            "preset": (list(LIGHT_PRESETS), {"default": "rembrandt",
                                             "tooltip": "Lighting setup of preset mode: rembrandt, loop, split, "
                                                        "butterfly, flat, rim (from behind), under, golden hour, "
                                                        "blue hour, candlelight, overcast. Key light on image right."}),
            "mirror_preset": ("BOOLEAN", {"default": False, "tooltip": "Preset mode: key light on image left."}),
        }, "optional": {
            "reference": ("FACE_RIG", {"tooltip": "Rig of another photo whose light to copy (copy mode)."}),
        }}

    def relight(self, rig, mode, azimuth, elevation, intensity, ambient, color, preset="rembrandt",
                mirror_preset=False, reference=None):
        node = self.DISPLAY_NAME
        if mode == "preset":
            light = preset_light(preset, mirror=mirror_preset)
            out = rig.with_light(light)
        elif mode == "copy reference":
            if reference is None:
                raise ValueError(f"{node}: mode 'copy reference' needs a reference rig (DECA Fit of another photo)")
            out = copy_from(rig, reference, light=True)
        elif mode == "rotate fitted light":
            out = rig.with_codes(light=rotate_sh(rig.codes["light"], yaw_deg=azimuth, pitch_deg=elevation))
        else:
            light = sh_from_direction(azimuth, elevation, intensity, ambient, parse_color(color, node))
            out = rig.with_light(light)
        return (out, _sphere_image(out.codes["light"]))


class EditExpressionPose:
    DISPLAY_NAME = "Edit Expression & Pose"
    DESCRIPTION = ("Edits expression and pose of a face rig: open the jaw, turn the head, exaggerate or calm "
                   "the expression, or copy expression / jaw / head pose from a reference face.")
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("FACE_RIG",)
    RETURN_NAMES = ("rig",)
    OUTPUT_TOOLTIPS = ("The edited rig.",)

    @classmethod
    def INPUT_TYPES(cls):
        angle = lambda tip, lo=-90.0, hi=90.0: ("FLOAT", {"default": 0.0, "min": lo, "max": hi, "step": 1.0,  # noqa
                                                        "tooltip": tip})
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "From DECA Fit (or Relight)."}),
            "jaw_open": angle("Degrees to open (positive) or close the jaw, on top of the fitted jaw.", -30.0, 45.0),
            "head_yaw": angle("Degrees to turn the head; positive turns the face to image right."),
            "head_pitch": angle("Degrees to nod; positive looks down."),
            "head_roll": angle("Degrees to tilt; positive tilts the head to image right."),
            "expression_strength": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05,
                                              "tooltip": "Scales the expression: 0 = neutral, 1 = as fitted, "
                                                         ">1 exaggerated."}),
        }, "optional": {
            "reference": ("FACE_RIG", {"tooltip": "A rig to copy from (see the copy switches)."}),
            "copy_expression": ("BOOLEAN", {"default": True, "tooltip": "With a reference: take its expression."}),
            "copy_jaw": ("BOOLEAN", {"default": True, "tooltip": "With a reference: take its jaw pose."}),
            "copy_head_pose": ("BOOLEAN", {"default": False, "tooltip": "With a reference: take its head pose."}),
        }}

    def edit(self, rig, jaw_open, head_yaw, head_pitch, head_roll, expression_strength, reference=None,
             copy_expression=True, copy_jaw=True, copy_head_pose=False):
        if reference is not None:
            rig = copy_from(rig, reference, expression=copy_expression, jaw=copy_jaw, head_pose=copy_head_pose)
        return (edit_pose(rig, yaw=head_yaw, pitch=head_pitch, roll=head_roll, jaw_open=jaw_open,
                          expression_scale=expression_strength),)


class RenderBuffers:
    DISPLAY_NAME = "Render Buffers"
    DESCRIPTION = ("Renders the physical buffers DiffusionRig is conditioned on: SH-shaded face, normals and "
                   "albedo, aligned with the photo. Each buffer also comes out as its own IMAGE and the face "
                   "coverage as a MASK, to chain into ControlNet (normal), IC-Light or inpainting nodes. It also "
                   "sends the first face's normal and albedo maps to the light handle of the Relight node before it, "
                   "for its live preview (a file in ComfyUI's temp folder).")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    # new outputs go after the old ones: saved workflows link outputs by slot index
    RETURN_TYPES = ("RIG_BUFFERS", "IMAGE", "IMAGE", "IMAGE", "IMAGE", "MASK")
    RETURN_NAMES = ("buffers", "preview", "shaded", "normal_map", "albedo", "face_mask")
    OUTPUT_TOOLTIPS = (
        "For the DiffusionRig Sampler.",
        "shaded | normal | albedo side by side.",
        "The SH-shaded face (albedo x shading, clipped to 0..1), black outside the face.",
        "Camera-space normals as RGB = (n + 1) / 2 with x image right -> R, y up -> G, z towards the camera -> B "
        "(OpenGL / Blender camera space: a face looking at the camera is lavender, its image-left side bluish with "
        "R < 0.5, its image-right side pink with R > 0.5; a ControlNet trained on flipped x or y needs that channel "
        "inverted); black outside the face.",
        "The face's albedo (texture without light), black outside the face.",
        "Face coverage: 1 where the renderer drew the face mesh, 0 elsewhere (inpainting masks, compositing).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deca": ("DECA_MODEL", {"tooltip": "From Load DECA."}),
            "rig": ("FACE_RIG", {"tooltip": "A fitted (and maybe edited) rig."}),
        }}

    def render(self, deca, rig):
        layers = deca.run(render_layers, rig, batch=min(len(rig), RENDER_BATCH))
        buffers, alpha = stack_buffers(layers), layers["alpha"]
        shaded, normal, albedo = (unit_to_image(x) for x in buffer_images(buffers, alpha))
        preview = unit_to_image(buffer_preview(buffers, alpha))
        result = (buffers, preview, shaded, normal, albedo, alpha[:, 0].contiguous())
        return {"ui": {"diffusionrig_shading": [_shading_preview(layers, rig)]}, "result": result}


def _shading_preview(layers: dict, rig) -> dict:
    """For the Relight node's light handle (web/js/light_handle.js): the first face's normal and albedo maps as a
    float32 .npy file [6, H, W] (at most 256 px) in ComfyUI's temp folder, and the light they were rendered with
    ([9, 3] DECA SH), so the browser shades the face under a dragged light as `render_layers` would."""
    maps = shading_maps(layers)
    buffer = io.BytesIO()
    np.save(buffer, maps.numpy(), allow_pickle=False)
    return {**preview_file(buffer.getvalue(), ".npy"), "light": rig.codes["light"][0].float().tolist()}


SWEEPS = list(SWEEP_PARAMETERS)


class RigSweep:
    DISPLAY_NAME = "Rig Sweep"
    DESCRIPTION = ("Animates one parameter of a face over frames (a FACE_RIG batch): light direction or strength, "
                   "jaw, head turn, expression. With the sampler's shared noise the frames stay consistent: a "
                   "turntable or light sweep for video.")
    CATEGORY = CATEGORY
    FUNCTION = "sweep"
    RETURN_TYPES = ("FACE_RIG",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("One rig per frame.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "A fitted rig (the face at face_index is animated)."}),
            "parameter": (SWEEPS, {"default": "light_azimuth",
                                   "tooltip": "light_azimuth/elevation: degrees the fitted light turns; "
                                              "light_intensity: light scale; jaw_open, head_*: degrees; "
                                              "expression_strength: scale."}),
            "start": ("FLOAT", {"default": -60.0, "min": -360.0, "max": 360.0, "step": 1.0,
                                "tooltip": "Value at the first frame."}),
            "end": ("FLOAT", {"default": 60.0, "min": -360.0, "max": 360.0, "step": 1.0,
                              "tooltip": "Value at the last frame."}),
            "frames": ("INT", {"default": 24, "min": 1, "max": 1000, "tooltip": "Number of frames."}),
            "ease": ("BOOLEAN", {"default": True, "tooltip": "Smooth start and stop."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Which face of the rig batch."}),
        }}

    def sweep(self, rig, parameter, start, end, frames, ease, face_index):
        if face_index >= len(rig):
            raise ValueError(f"{self.DISPLAY_NAME}: face_index {face_index} but the rig has {len(rig)} face(s)")
        return (sweep(rig.select(face_index), parameter, sweep_values(start, end, frames, ease)),)


DETAIL_TIP = ("How the edited face goes back into the photo. ratio (measured best): the photo's own full-resolution "
              "detail, multiplied by the edit's smoothed change of light; difference: that change added instead; "
              "edit: the edited face's own pixels (a 256 px face is blurred on a large photo: for an edit already "
              "upscaled to the photo's scale).")
RADIUS_TIP = ("ratio / difference: how much the edit's change is smoothed before it is carried over, in pixels of a "
              "256 px face. 0 = the change at the model's full resolution; larger keeps more of the photo's own "
              "detail and less of the edit's finer changes (and of its noise).")


class PasteFaceBack:
    DISPLAY_NAME = "Paste Face Back"
    DESCRIPTION = ("Puts edited faces back into the original photos with a feathered face mask; every pixel "
                   "outside the face region stays exactly as it was. By default the photo keeps its own "
                   "full-resolution detail and takes the edit's change of light; connect deca, rig and edited_rig "
                   "when the edit moved the face (jaw, expression, head turn) so the detail moves with it.")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "paste"
    # new outputs go after the old ones: saved workflows link outputs by slot index
    RETURN_TYPES = ("IMAGE", "MASK", "MASK")
    RETURN_NAMES = ("image", "mask", "motion_mask")
    OUTPUT_TOOLTIPS = ("The photo(s) with the edit, at the original size.", "Where the edit was blended in.",
                       "Where the edit's own pixels were used instead of the photo's detail: where the rig moved the "
                       "face in a way the photo's detail cannot follow (skin hidden in the photo, the mouth "
                       "opening); the whole blend with detail = edit; 0 elsewhere.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The photo(s) given to Detect & Align Face."}),
            "alignment": ("FACE_ALIGNMENT", {"tooltip": "From that Detect & Align Face."}),
            "edited": ("IMAGE", {"tooltip": "Edited faces: one per aligned face, or many frames of a single face."}),
            "color_match": ("BOOLEAN", {"default": False, "tooltip": "Match the edit's colours to the original "
                                                                     "face (hides tint shifts)."}),
            "feather": ("FLOAT", {"default": paste.DEFAULT_FEATHER, "min": 0.0, "max": 0.5, "step": 0.01,
                                  "tooltip": "Width of the soft edge, as a fraction of the face width."}),
        }, "optional": {
            "detail": (list(paste.DETAIL_MODES), {"default": paste.DEFAULT_DETAIL, "tooltip": DETAIL_TIP}),
            "detail_radius": ("FLOAT", {"default": paste.DEFAULT_DETAIL_RADIUS, "min": 0.0, "max": 32.0, "step": 0.5,
                                        "tooltip": RADIUS_TIP}),
            "deca": ("DECA_MODEL", {"tooltip": "From Load DECA: with rig and edited_rig, the face's motion."}),
            "rig": ("FACE_RIG", {"tooltip": "The fitted rig of the aligned faces (DECA Fit)."}),
            "edited_rig": ("FACE_RIG", {"tooltip": "The rig the edit was rendered from (one row per edited image)."}),
        }}

    def paste(self, original, alignment, edited, color_match, feather, detail=paste.DEFAULT_DETAIL,
              detail_radius=paste.DEFAULT_DETAIL_RADIUS, deca=None, rig=None, edited_rig=None):
        node = self.DISPLAY_NAME
        try:
            paste.check_detail(detail, detail_radius)
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None
        photos, edits = image_to_pil(original, f"{node} (original)"), image_to_pil(edited, f"{node} (edited)")
        if len(alignment) == 1 and len(edits) > 1:  # frames of one face: one output photo per frame
            jobs = [(alignment.sources[0], [0], [j]) for j in range(len(edits))]
        elif len(edits) == len(alignment):
            jobs = [(p, [i for i, s in enumerate(alignment.sources) if s == p],
                     [i for i, s in enumerate(alignment.sources) if s == p]) for p in sorted(set(alignment.sources))]
        else:
            raise ValueError(f"{node}: {len(edits)} edited image(s) for {len(alignment)} aligned face(s); give one "
                             "edit per face (or frames of a single face)")
        if max(alignment.sources, default=0) >= len(photos):
            raise ValueError(f"{node}: the alignment came from {max(alignment.sources) + 1} photos but {len(photos)} "
                             "original(s) are connected; connect the same photos")
        motion = [None] * len(edits)
        if detail != "edit":
            motion = self._motion(node, deca, rig, edited_rig, len(alignment), len(edits)) or motion
        images, masks, motion_masks = [], [], []
        for source, faces, face_edits in jobs:
            check_interrupt()
            photo = photos[source]
            pasted = paste.paste_faces(photo, [alignment.faces[i] for i in faces], [edits[j] for j in face_edits],
                                       color_match=color_match, feather=feather, detail=detail,
                                       detail_radius=detail_radius, motion=[motion[j] for j in face_edits])
            images.append(pasted.image)
            masks.append(pasted.mask)
            motion_masks.append(pasted.edit_mask)
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ValueError(f"{node}: the photos have different sizes {sorted(sizes)}, which one IMAGE batch cannot "
                             "hold; run them one at a time")
        as_mask = lambda m: torch.from_numpy(np.stack(m).astype(np.float32))  # noqa: E731
        return (pil_to_image(images), as_mask(masks), as_mask(motion_masks))

    @staticmethod
    def _motion(node, deca, rig, edited_rig, faces: int, edits: int):
        """One FaceMotion per edited image from the two rigs, or None when none are connected."""
        given = {"deca": deca is not None, "rig": rig is not None, "edited_rig": edited_rig is not None}
        if not any(given.values()):
            return None
        if not all(given.values()):
            missing = ", ".join(k for k, v in given.items() if not v)
            raise ValueError(f"{node}: the face's motion needs deca, rig and edited_rig together; connect {missing} "
                             "too (or none of them for a relight)")
        if len(rig) != faces or len(edited_rig) != edits:
            raise ValueError(f"{node}: rig has {len(rig)} face(s) for {faces} aligned face(s) and edited_rig "
                             f"{len(edited_rig)} row(s) for {edits} edited image(s); connect the fit of these aligned "
                             "faces and the rig the edit was rendered from")
        try:
            return deca.run(rig_motion, rig, edited_rig, batch=len(edited_rig))
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None


NO_FACE_SCORE = -1.0  # below every backend's same-person threshold


class FaceIdentitySimilarity:
    DISPLAY_NAME = "Face Identity Similarity"
    DESCRIPTION = ("Scores whether two face images show the same person (dlib face descriptors, or ArcFace when "
                   "insightface and its models are installed): check that an edit kept the identity.")
    CATEGORY = f"{CATEGORY}/faces"
    FUNCTION = "compare"
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("similarity", "verdict")
    OUTPUT_TOOLTIPS = ("Similarity of the least similar pair (higher = more alike; -1 when a face was not found).",
                       "Readable verdict per pair.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_a": ("IMAGE", {"tooltip": "Face photo(s), e.g. the original aligned face."}),
            "image_b": ("IMAGE", {"tooltip": "Face photo(s) to compare, e.g. the edits (pairs up with image_a; a "
                                             "single image_a is compared with every image_b)."}),
            "backend": (["auto", "dlib", "arcface"], {"default": "auto",
                                                      "tooltip": "auto: ArcFace when available, else dlib."}),
        }}

    def compare(self, image_a, image_b, backend):
        node = self.DISPLAY_NAME
        a, b = image_to_pil(image_a, f"{node} (image_a)"), image_to_pil(image_b, f"{node} (image_b)")
        if len(a) not in (1, len(b)):
            raise ValueError(f"{self.DISPLAY_NAME}: {len(a)} images against {len(b)}; give one image_a or as "
                             "many as image_b")
        verdicts, scores = [], []
        for i, picture in enumerate(b):
            check_interrupt()
            try:
                result = identity.face_similarity(a[i if len(a) > 1 else 0], picture, backend=backend,
                                                  models_dir=str(models_root()))
            except detection.NoFaceError as exc:  # an edit that lost the face is an answer here, not a failure
                verdicts.append(str(exc).split(";")[0])  # what was not found, without the advice
                scores.append(NO_FACE_SCORE)
                continue
            verdicts.append(result.verdict)
            scores.append(result.score)
        text = "\n".join(f"pair {i + 1}: {v}" for i, v in enumerate(verdicts))
        return {"ui": {"text": [text]}, "result": (min(scores), text)}


NODE_CLASS_MAPPINGS = {
    "DiffusionRigLoadPhoto": LoadFacePhoto,
    "DiffusionRigLoadDECA": LoadDECA,
    "DiffusionRigDetectAlign": DetectAlignFace,
    "DiffusionRigDECAFit": DECAFit,
    "DiffusionRigRelight": Relight,
    "DiffusionRigEditExpressionPose": EditExpressionPose,
    "DiffusionRigRenderBuffers": RenderBuffers,
    "DiffusionRigRigSweep": RigSweep,
    "DiffusionRigPasteBack": PasteFaceBack,
    "DiffusionRigIdentity": FaceIdentitySimilarity,
    "DiffusionRigLoadFaceRig": LoadFaceRig,
    "DiffusionRigSaveFaceRig": SaveFaceRig,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}

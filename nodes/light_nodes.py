"""Light nodes: a light from an environment map (HDRI), and rig presets saved and loaded as JSON files."""

from __future__ import annotations

from pathlib import Path


from comfy_diffusionrig.face.environment import (LEVELS, environment_light, environment_preview, load_environment,
                                                 srgb_to_linear)
from comfy_diffusionrig.face.presets import load_preset, save_preset
from comfy_diffusionrig.face.rig import apply_preset, preset_from_rig

from .face_nodes import CATEGORY, _sphere_image
from .host import PRESET_FOLDER, file_fingerprint, input_files, input_path, model_files, model_path, new_model_file

ENVIRONMENT_SUFFIXES = (".hdr", ".pic", ".exr")
NO_FILE = "(use the panorama input)"
PACK_PRESETS = Path(__file__).resolve().parents[1] / "presets"
PACK_PREFIX = "pack/"


class LightFromEnvironment:
    DISPLAY_NAME = "Light from Environment (HDRI)"
    DESCRIPTION = ("Lights a face rig with an environment map: an equirectangular HDR panorama (Radiance .hdr; "
                   ".exr with the OpenEXR package) or an 8-bit panorama from any image loader (read as sRGB). "
                   "Layout: top = up, centre = what the camera sees behind the face, left/right edges = behind "
                   "the camera (frontal light). The order-2 SH light keeps the panorama's direction and colour; "
                   "'portrait' level scales it so its brightest point matches the named presets.")
    CATEGORY = CATEGORY
    FUNCTION = "relight"
    RETURN_TYPES = ("FACE_RIG", "IMAGE", "IMAGE")
    RETURN_NAMES = ("rig", "lit_sphere", "panorama")
    OUTPUT_TOOLTIPS = ("The rig with the environment's light.", "A grey sphere under each face's new light.",
                       "The panorama as it lights the face (turned by yaw), its dominant light marked in red.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "From DECA Fit (or any edit)."}),
            "environment": ([NO_FILE] + input_files(ENVIRONMENT_SUFFIXES),
                            {"tooltip": "An HDR panorama in ComfyUI/input/ (.hdr, .exr) or the pack's example "
                                        "studio; ignored when the panorama input is connected."}),
            "yaw": ("FLOAT", {"default": 0.0, "min": -180.0, "max": 180.0, "step": 1.0,
                              "tooltip": "Degrees to turn the environment; positive moves a light in front of the "
                                         "face towards image right (as Relight's rotate azimuth)."}),
            "exposure": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                   "tooltip": "Stops (EV) of brightness on top of the level: +1 doubles the light."}),
            "level": (list(LEVELS), {"default": "portrait",
                               "tooltip": "portrait: scale so the brightest point of the light is the presets' "
                                          "(key 1 + ambient 0.35), whatever the panorama's exposure. as exposed: "
                                          "keep the panorama's radiance (a uniform panorama of value v shades v)."}),
        }, "optional": {
            "panorama": ("IMAGE", {"tooltip": "An 8-bit equirectangular panorama (sRGB) from any image loader; "
                                              "used instead of the environment file when connected."}),
        }}

    @classmethod
    def IS_CHANGED(cls, rig, environment, yaw, exposure, level, panorama=None):
        if environment == NO_FILE:
            return ""
        return file_fingerprint([input_path(environment, cls.DISPLAY_NAME)])

    def relight(self, rig, environment, yaw, exposure, level, panorama=None):
        node = self.DISPLAY_NAME
        if panorama is not None:
            env = srgb_to_linear(panorama[0, ..., :3].double().clamp(0, 1))
        elif environment == NO_FILE:
            raise ValueError(f"{node}: choose an environment file or connect a panorama image")
        else:
            try:
                env = load_environment(input_path(environment, node))
            except ValueError as exc:
                raise ValueError(f"{node}: {exc}") from exc
        light = environment_light(env, yaw=yaw, exposure=exposure, level=level)
        preview = environment_preview(env, light, yaw=yaw)
        out = rig.with_light(light)
        return (out, _sphere_image(out.codes["light"]), preview[None])


def preset_files() -> list[str]:
    """Presets for a combo: the user's (models/diffusionrig_presets/), then the pack's as pack/<name>."""
    own = model_files(PRESET_FOLDER, (".json",))
    shipped = sorted(PACK_PREFIX + p.name for p in PACK_PRESETS.glob("*.json")) if PACK_PRESETS.is_dir() else []
    return own + shipped


def preset_path(name: str, node: str) -> Path:
    if name.startswith(PACK_PREFIX):
        path = PACK_PRESETS / name[len(PACK_PREFIX):]
        if path.is_file() and path.parent == PACK_PRESETS:
            return path
        raise FileNotFoundError(f"{node}: the pack has no preset {name!r}; pick one from the list")
    return model_path(PRESET_FOLDER, name, node)


class SaveRigPreset:
    DISPLAY_NAME = "Save Rig Preset"
    DESCRIPTION = ("Saves the light and/or the expression and pose edit of a face rig as a small JSON preset in "
                   "models/diffusionrig_presets/, to reuse with Load Rig Preset or share like a workflow.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the preset was written.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "The relit and/or edited rig."}),
            "name": ("STRING", {"default": "my_light", "tooltip": "File name (without .json); subfolders allowed."}),
            "save_light": ("BOOLEAN", {"default": True, "tooltip": "Store the SH light and its slider values."}),
            "save_expression": ("BOOLEAN", {"default": False, "tooltip": "Store the expression (absolute)."}),
            "save_jaw": ("BOOLEAN", {"default": False, "tooltip": "Store the jaw pose (absolute)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Which face of the rig batch."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a preset of the same name."}),
        }, "optional": {
            "original": ("FACE_RIG", {"tooltip": "The rig before Edit Expression & Pose: stores the head turn "
                                                 "between the two (yaw, pitch, roll) in the preset."}),
        }}

    def save(self, rig, name, save_light, save_expression, save_jaw, face_index, overwrite, original=None):
        node = self.DISPLAY_NAME
        path = new_model_file(PRESET_FOLDER, name, node, ".json")
        try:
            document = preset_from_rig(rig, face_index, original=original, light=save_light,
                                       expression=save_expression, jaw=save_jaw, name=path.stem)
            written = save_preset(path, document, overwrite=overwrite)
        except (ValueError, FileExistsError) as exc:
            raise ValueError(f"{node}: {exc}") from exc
        return {"ui": {"text": [str(written)]}, "result": (str(written),)}


class LoadRigPreset:
    DISPLAY_NAME = "Load Rig Preset"
    DESCRIPTION = ("Applies a rig preset (JSON from Save Rig Preset, a shared file, or one of the pack's named "
                   "lights) to every face of a rig: its light, expression, jaw and head turn.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_RIG", "IMAGE")
    RETURN_NAMES = ("rig", "lit_sphere")
    OUTPUT_TOOLTIPS = ("The rig with the preset applied.", "A grey sphere under each face's light.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rig": ("FACE_RIG", {"tooltip": "From DECA Fit (or any edit)."}),
            "preset": (preset_files(), {"tooltip": "models/diffusionrig_presets/*.json, then the pack's presets "
                                                   "(pack/light_*.json: the named lighting setups)."}),
            "apply_light": ("BOOLEAN", {"default": True, "tooltip": "Use the preset's light (if it has one)."}),
            "apply_expression": ("BOOLEAN", {"default": True, "tooltip": "Use its expression (if it has one)."}),
            "apply_pose": ("BOOLEAN", {"default": True, "tooltip": "Use its jaw pose and head turn (if it has them)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, rig, preset, apply_light, apply_expression, apply_pose):
        return file_fingerprint([preset_path(preset, cls.DISPLAY_NAME)])

    def load(self, rig, preset, apply_light, apply_expression, apply_pose):
        node = self.DISPLAY_NAME
        try:
            document = load_preset(preset_path(preset, node))
        except ValueError as exc:
            raise ValueError(f"{node}: {exc}") from exc
        out = apply_preset(rig, document, light=apply_light, expression=apply_expression, pose=apply_pose)
        return (out, _sphere_image(out.codes["light"]))


NODE_CLASS_MAPPINGS = {
    "DiffusionRigLightFromEnvironment": LightFromEnvironment,
    "DiffusionRigSavePreset": SaveRigPreset,
    "DiffusionRigLoadPreset": LoadRigPreset,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}

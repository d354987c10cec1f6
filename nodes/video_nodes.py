"""Video node: relight one person through a clip of frames (an IMAGE batch from any video loader)."""

from __future__ import annotations

import torch

from comfy_diffusionrig.face.lighting import LIGHT_PRESETS, preset_light, rotate_sh, sh_from_direction
from comfy_diffusionrig.video import relight_clip

from comfy_diffusionrig.photo.paste import DEFAULT_DETAIL, DEFAULT_DETAIL_RADIUS, DETAIL_MODES

from .face_nodes import CATEGORY, DETAIL_TIP, DETECTORS, LIGHT_SLIDERS, RADIUS_TIP, parse_color
from .host import image_to_pil, models_root, pil_to_image, progress_callback, run_models

LIGHTS = ["sliders", *LIGHT_PRESETS]


def clip_lights(light: str, azimuth: float, elevation: float, intensity: float, ambient: float, color: str,
                end_azimuth_turn: float, end_elevation_turn: float, node: str, light_rig=None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(start light [9, 3], end light or None): the start from the sliders, a preset or the first face of
    light_rig; the end is the start turned by the end_* degrees (None when both are 0: one light)."""
    if light_rig is not None:
        start = light_rig.codes["light"][0].float()
    elif light == "sliders":
        start = sh_from_direction(azimuth, elevation, intensity, ambient, parse_color(color, node)).float()
    else:
        start = preset_light(light).float()
    if end_azimuth_turn == 0 and end_elevation_turn == 0:
        return start, None
    return start, rotate_sh(start[None], yaw_deg=end_azimuth_turn, pitch_deg=end_elevation_turn)[0].float()


class RelightVideoClip:
    DISPLAY_NAME = "Relight Video Clip"
    DESCRIPTION = ("Relights one person through a video clip (the frames as an IMAGE batch, from any video "
                   "loader) without flicker: tracks the same face through the clip (not the largest face of each "
                   "frame), fits every frame, shares the clip's mean shape, smooths pose, jaw, expression and "
                   "camera over time, lights every frame with one light (or a light turning from the first to the "
                   "last frame), inverts and samples each frame the same way, and pastes the faces back. Frames "
                   "without the face pass through unchanged and are listed in the report.")
    CATEGORY = f"{CATEGORY}/video"
    FUNCTION = "relight"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("frames", "masks", "report")
    OUTPUT_TOOLTIPS = ("The relit frames, same count and size as the input.",
                       "Where each frame was changed (0 on frames without the face).",
                       "How many frames were relit; which frames had no face (0-based indices).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dr_model": ("DR_MODEL", {"tooltip": "From Load DiffusionRig Model (a personalized model is best)."}),
            "deca": ("DECA_MODEL", {"tooltip": "From Load DECA."}),
            "frames": ("IMAGE", {"tooltip": "The clip's frames, in order, all of one size (e.g. a video loader's "
                                            "IMAGE output)."}),
            "light": (LIGHTS, {"default": "sliders", "tooltip": "sliders: the light set by azimuth ... color; or a "
                                                                "named lighting setup."}),
            **LIGHT_SLIDERS,
            "end_azimuth_turn": ("FLOAT", {"default": 0.0, "min": -360.0, "max": 360.0, "step": 1.0,
                                           "tooltip": "Keyframe: degrees the light has turned about the vertical by "
                                                      "the last frame (cross-faded in between). 0 = one light."}),
            "end_elevation_turn": ("FLOAT", {"default": 0.0, "min": -180.0, "max": 180.0, "step": 1.0,
                                             "tooltip": "Keyframe: degrees the light has turned up by the last "
                                                        "frame."}),
            "smoothing": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.5,
                                    "tooltip": "Temporal smoothing of pose, jaw, expression, camera and the crop's "
                                               "landmarks, in frames (One-Euro filter, zero lag). 0 = every frame as "
                                               "detected and fitted."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed (start = noise, eta > 0): the same for every frame."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "DDIM steps (official 20)."}),
            "start": (["inversion", "noise"], {"default": "inversion",
                                               "tooltip": "inversion keeps each frame's background and details."}),
            "detector": (DETECTORS, {"default": "hog",
                                     "tooltip": "hog: fast, frontal faces. cnn: turned or small faces. insightface: "
                                                "needs the package and its models."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 64,
                                   "tooltip": "Which face to follow, in the first frame with a face (0 = largest)."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Frames denoised together; lower it if memory runs out."}),
        }, "optional": {
            "light_rig": ("FACE_RIG", {"tooltip": "Take the start light from this rig's first face instead (Relight, "
                                                  "Light from Environment, Load Rig Preset)."}),
            "detail": (list(DETAIL_MODES), {"default": DEFAULT_DETAIL, "tooltip": DETAIL_TIP}),
            "detail_radius": ("FLOAT", {"default": DEFAULT_DETAIL_RADIUS, "min": 0.0, "max": 32.0, "step": 0.5,
                                        "tooltip": RADIUS_TIP}),
        }}

    def relight(self, dr_model, deca, frames, light, azimuth, elevation, intensity, ambient, color, end_azimuth_turn,
                end_elevation_turn, smoothing, seed, steps, start, detector, face_index, batch_size, light_rig=None,
                detail=DEFAULT_DETAIL, detail_radius=DEFAULT_DETAIL_RADIUS):
        node = self.DISPLAY_NAME
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError(f"{node}: frames must be a non-empty IMAGE batch [T, H, W, C], got "
                             f"{tuple(frames.shape)}")
        start_light, end_light = clip_lights(light, azimuth, elevation, intensity, ambient, color, end_azimuth_turn,
                                             end_elevation_turn, node, light_rig)
        try:
            result = run_models(relight_clip, [dr_model, deca], image_to_pil(frames, node), start_light, end_light,
                                strength=smoothing, face=face_index, start=start, steps=steps, seed=seed,
                                batch_size=batch_size, detector=detector, models_dir=str(models_root()),
                                progress=progress_callback(stages=("relight",)), detail=detail,
                                detail_radius=detail_radius, batch=min(batch_size, frames.shape[0]))
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None
        out = frames[..., :3].clone()  # frames without the face stay bit-identical
        relit = [t for t in range(len(result.frames)) if t not in set(result.missing)]
        if relit:
            out[relit] = pil_to_image([result.frames[t] for t in relit]).to(out.dtype)
        return (out, torch.from_numpy(result.masks), result.report())


NODE_CLASS_MAPPINGS = {"DiffusionRigRelightVideoClip": RelightVideoClip}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}

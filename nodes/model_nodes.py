"""Nodes around the DiffusionRig model: load it, encode the global code, sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy_diffusionrig import InvertedStart, edit_faces, invert_faces
from comfy_diffusionrig.model.checkpoints import CHECKPOINT_SUFFIXES, for_inference
from comfy_diffusionrig.core.conventions import SEED_MAX
from comfy_diffusionrig.model.sampler_presets import SAMPLER_NAMES, SAMPLING_PRESETS
from comfy_diffusionrig.editing import check_edit_settings
from comfy_diffusionrig.model.lora import load_with_lora

from .host import (ModelHandle, check_interrupt, check_model_file, image_to_model, model_files, model_fingerprint,
                   model_path, model_to_image, progress_callback, storage_device, torch_device, unet_precision)

CATEGORY = "DiffusionRig"


class LoadDiffusionRigModel:
    DISPLAY_NAME = "Load DiffusionRig Model"
    DESCRIPTION = ("Loads a DiffusionRig denoiser + global encoder from models/diffusionrig/: the official stage-1 "
                   "model.pt, a personalized stage-2 .pt, or a .safetensors saved by this pack.")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("DR_MODEL",)
    RETURN_NAMES = ("dr_model",)
    OUTPUT_TOOLTIPS = ("The DiffusionRig model, kept loaded between runs.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (model_files("diffusionrig", CHECKPOINT_SUFFIXES),
                          {"tooltip": "Checkpoint file in models/diffusionrig/. A non-default official checkpoint "
                                      "needs its training kwargs in a .json file of the same name next to it."}),
            "precision": (["auto", "fp32", "bf16", "fp16"],
                          {"default": "auto", "tooltip": "UNet precision. auto: ComfyUI's own choice for diffusion "
                                                         "models (its --fp32-unet, --bf16-unet, --fp16-unet and "
                                                         "--force-fp32 flags apply): bf16 on GPUs with native bf16; "
                                                         "on older GPUs fp16 where ComfyUI uses fp16 (a result that "
                                                         "overflows is made again in fp32), else fp32; fp32 with "
                                                         "--cpu. fp16 is GPU-only."}),
        }, "optional": {
            "lora_name": (["none"] + model_files("diffusionrig", (".safetensors",)),
                          {"default": "none", "tooltip": "A personalization LoRA saved by Save DiffusionRig Model, "
                                                         "applied on top of the checkpoint it was trained from."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                                        "tooltip": "How much of the LoRA to apply (1 = as trained)."}),
        }}

    def load(self, ckpt_name, precision, lora_name="none", lora_strength=1.0):
        node = self.DISPLAY_NAME
        path = model_path("diffusionrig", ckpt_name, node)
        lora = None if lora_name == "none" else model_path("diffusionrig", lora_name, node)
        model = load_with_lora(path, lora, lora_strength, device=storage_device())  # fp32: adapters merge in fp32
        dtype = unet_precision(precision, sum(p.numel() for p in model.denoisingUNet.parameters()))
        return (ModelHandle(for_inference(model, storage_device(), dtype, run_device=torch_device())),)

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name):  # a missing checkpoint: say where it comes from (e.g. run the demo)
        return check_model_file("diffusionrig", ckpt_name, cls.DISPLAY_NAME)

    @classmethod
    def IS_CHANGED(cls, ckpt_name, lora_name="none", **_):
        # a file replaced under the same name must be loaded again (ComfyUI caches by input values)
        lora = model_fingerprint("diffusionrig", lora_name) if lora_name != "none" else "no lora"
        return model_fingerprint("diffusionrig", ckpt_name, sidecar=".json") + "\n" + lora


def _to_model_size(image: torch.Tensor, model, node: str) -> torch.Tensor:
    size = model.config.image_size
    if image.shape[-2:] != (size, size):
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"{node}: the image is {image.shape[-1]}x{image.shape[-2]}; DiffusionRig works on square "
                             "aligned faces: use Detect & Align Face first")
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return image


def _encode(model, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(image.to(model.device)).cpu()


class EncodeGlobalCode:
    DISPLAY_NAME = "Encode Global Code"
    DESCRIPTION = ("Encodes an aligned face photo into DiffusionRig's 64-d global code (hair, clothes, background: "
                   "what the 3D face model cannot describe). Encode another photo to borrow its appearance.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("GLOBAL_CODE",)
    RETURN_NAMES = ("global_code",)
    OUTPUT_TOOLTIPS = ("One 64-d code per image in the batch.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dr_model": ("DR_MODEL", {"tooltip": "From Load DiffusionRig Model."}),
            "aligned_image": ("IMAGE", {"tooltip": "Aligned face(s) from Detect & Align Face (resized to the "
                                                   "model's size if needed)."}),
        }}

    def encode(self, dr_model, aligned_image):
        image = _to_model_size(image_to_model(aligned_image, self.DISPLAY_NAME), dr_model, self.DISPLAY_NAME)
        return (dr_model.run(_encode, image, batch=image.shape[0]),)


SAMPLER_TIP = ("ddim: the official sampler and inversion (the reference; 20 steps = 40 UNet calls per edit). "
               "dpmpp_2m: DPM-Solver++(2M) and its matching inversion, second order: about half the steps for "
               "the same result (faster edits), but not bit-equal to the official output.")
CACHE_TIP = ("1 = off (exact). N > 1 reuses the UNet's deep features for N - 1 of every N steps and recomputes "
             "only the shallow layers: faster, with a small drift from the uncached result.")
PRESET_TIP = ("custom: use sampler, steps and cache_interval as set. official: ddim, 20 steps, no cache (the paper, "
              "40 UNet calls per edit). fast: dpmpp_2m 8 steps (15 calls; edits measured as good as official). "
              "faster: dpmpp_2m 7 steps (13 calls; about 0.4 dB worse, for quick previews). A preset overrides "
              "those three widgets.")


INVERSION = "DR_INVERSION"  # socket type of an inverted start (editing.InvertedStart)


def _sampler_settings(node: str, preset: str, sampler: str, steps: int, cache_interval: int) -> tuple[str, int, int]:
    """(sampler, steps, cache_interval) of a node's widgets: a preset other than custom overrides the three."""
    if preset == "custom":
        return sampler, steps, cache_interval
    if preset not in SAMPLING_PRESETS:
        raise ValueError(f"{node}: unknown preset {preset!r}; choose custom or one of {', '.join(SAMPLING_PRESETS)}")
    return tuple(SAMPLING_PRESETS[preset][k] for k in ("sampler", "steps", "cache_interval"))


def _source_images(source_image, source_buffers, dr_model, node: str) -> torch.Tensor:
    """The aligned source faces at the model's size, [N, 3, S, S] in [-1, 1], one per source buffer."""
    images = _to_model_size(image_to_model(source_image, node), dr_model, node)
    if images.shape[0] != source_buffers.shape[0]:
        raise ValueError(f"{node}: {images.shape[0]} source image(s) but {source_buffers.shape[0]} source "
                         "buffer(s); connect the aligned faces and the Render Buffers of the same fit")
    return images


class DiffusionRigInvert:
    DISPLAY_NAME = "DiffusionRig Invert"
    DESCRIPTION = ("Inverts each aligned face under its own buffers and global code, once: connect inverted_start "
                   "to DiffusionRig Sampler (start = inversion). ComfyUI keeps this node's output while its inputs "
                   "stay the same, so a new light, expression or pose re-runs only Relight / Edit -> Render Buffers "
                   "-> Sampler, the sampling alone. Give the Sampler the same sampler, steps and cache_interval "
                   "(or the same preset): it refuses an inversion made otherwise.")
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = (INVERSION,)
    RETURN_NAMES = ("inverted_start",)
    OUTPUT_TOOLTIPS = ("The faces' inverted starting noise with the settings and model it was made with: connect it "
                       "to DiffusionRig Sampler's inverted_start.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dr_model": ("DR_MODEL", {"tooltip": "From Load DiffusionRig Model (the Sampler must use the same)."}),
                "source_image": ("IMAGE", {"tooltip": "The aligned original faces, one per face."}),
                "source_buffers": ("RIG_BUFFERS", {"tooltip": "Render Buffers of the unedited fit of those faces."}),
                "global_code": ("GLOBAL_CODE", {"tooltip": "From Encode Global Code: one code per face, or one "
                                                           "code shared by every face."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                  "tooltip": "Inversion steps; 20 is the official setting. The Sampler must use "
                                             "the same."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Faces inverted together; lower it if memory runs out."}),
            },
            "optional": {
                "sampler": (list(SAMPLER_NAMES), {"default": "ddim", "tooltip": SAMPLER_TIP}),
                "cache_interval": ("INT", {"default": 1, "min": 1, "max": 10, "tooltip": CACHE_TIP}),
                "preset": (["custom", *SAMPLING_PRESETS], {"default": "custom", "tooltip": PRESET_TIP}),
            },
        }

    def invert(self, dr_model, source_image, source_buffers, global_code, steps, batch_size, sampler="ddim",
               cache_interval=1, preset="custom"):
        node = self.DISPLAY_NAME
        sampler, steps, cache_interval = _sampler_settings(node, preset, sampler, steps, cache_interval)
        try:
            check_edit_settings("inversion", steps, 0.0, batch_size, sampler, cache_interval)
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None
        images = _source_images(source_image, source_buffers, dr_model, node)
        check_interrupt()
        try:
            return (dr_model.run(invert_faces, images, source_buffers, global_code, steps=steps, sampler=sampler,
                                 batch_size=batch_size, callback=progress_callback(), cache_interval=cache_interval,
                                 batch=min(batch_size, images.shape[0])),)
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None


class DiffusionRigSampler:
    DISPLAY_NAME = "DiffusionRig Sampler"
    DESCRIPTION = ("Generates the edited portraits from the rig buffers and global codes with DDIM or DPM-Solver++ (sampler, steps, or a "
                   "named preset). 'inversion' starts each face from the inversion of its own source photo under its own buffers, which "
                   "keeps the background and fine details: from DiffusionRig Invert's inverted_start (inverted once, "
                   "kept while only the light, expression or pose changes), or inverted here from source_image and "
                   "source_buffers; 'noise' starts from one seeded noise shared by every face and frame. Each face "
                   "of a batch comes out as it would alone.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Edited aligned faces, one per buffer in the batch (same order).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dr_model": ("DR_MODEL", {"tooltip": "From Load DiffusionRig Model."}),
                "rig_buffers": ("RIG_BUFFERS", {"tooltip": "Edited buffers from Render Buffers: one per face, or "
                                                           "F frames per face (all frames of a face together, as "
                                                           "Rig Sweep makes them)."}),
                "global_code": ("GLOBAL_CODE", {"tooltip": "From Encode Global Code: one code per face, or one "
                                                           "code shared by every face."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": "Noise seed (start = noise, and eta > 0). The same noise is used for "
                                            "every face and frame."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                  "tooltip": "DDIM steps; 20 is the official setting (t = 950, 900, ..., 0)."}),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "0 = deterministic DDIM (official). Higher adds fresh noise per step."}),
                "start": (["noise", "inversion"], {"default": "noise",
                                                   "tooltip": "inversion needs inverted_start (from DiffusionRig "
                                                              "Invert) or source_image and source_buffers."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Images denoised together; lower it if memory runs out."}),
            },
            "optional": {
                "source_image": ("IMAGE", {"tooltip": "The aligned original faces, one per face (for start = "
                                                      "inversion without inverted_start)."}),
                "source_buffers": ("RIG_BUFFERS", {"tooltip": "Render Buffers of the unedited fit of those faces (for "
                                                              "start = inversion without inverted_start)."}),
                "sampler": (list(SAMPLER_NAMES), {"default": "ddim", "tooltip": SAMPLER_TIP}),
                "cache_interval": ("INT", {"default": 1, "min": 1, "max": 10, "tooltip": CACHE_TIP}),
                "preset": (["custom", *SAMPLING_PRESETS], {"default": "custom", "tooltip": PRESET_TIP}),
                "inverted_start": (INVERSION, {"tooltip": "From DiffusionRig Invert (for start = inversion): the "
                                                          "faces inverted once, with the same model, sampler, steps "
                                                          "and cache_interval as set here."}),
            },
        }

    def sample(self, dr_model, rig_buffers, global_code, seed, steps, eta, start, batch_size,
               source_image=None, source_buffers=None, sampler="ddim", cache_interval=1, preset="custom",
               inverted_start=None):
        node = self.DISPLAY_NAME
        sampler, steps, cache_interval = _sampler_settings(node, preset, sampler, steps, cache_interval)
        try:
            check_edit_settings(start, steps, eta, batch_size, sampler, cache_interval)
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None
        images = None
        if inverted_start is not None:
            if not isinstance(inverted_start, InvertedStart):
                raise ValueError(f"{node}: inverted_start must come from DiffusionRig Invert, got "
                                 f"{type(inverted_start).__name__}")
            if start != "inversion":
                raise ValueError(f"{node}: inverted_start is connected but start = {start}; set start to inversion "
                                 "to sample from it, or disconnect it to start from noise")
            if source_image is not None or source_buffers is not None:
                raise ValueError(f"{node}: connect either inverted_start (from DiffusionRig Invert) or source_image "
                                 "and source_buffers, not both")
            start = inverted_start
        elif start == "inversion":
            if source_image is None or source_buffers is None:
                raise ValueError(f"{node}: start = inversion needs inverted_start (from DiffusionRig Invert), or both "
                                 "source_image (the aligned photo) and source_buffers (Render Buffers of its "
                                 "unedited fit); connect them or use start = noise")
            images = _source_images(source_image, source_buffers, dr_model, node)
        faces = inverted_start.faces if inverted_start is not None else (
            images.shape[0] if images is not None else global_code.shape[0])
        if rig_buffers.shape[0] % faces or global_code.shape[0] not in (1, faces):
            raise ValueError(f"{node}: {rig_buffers.shape[0]} buffers, {global_code.shape[0]} global code(s) and "
                             f"{faces} source face(s) do not match; give one code per face (or one for all) and "
                             "the same number of frames for every face, all frames of a face together")
        check_interrupt()
        try:
            edited = dr_model.run(edit_faces, images, source_buffers, rig_buffers, global_code, start=start,
                                  steps=steps, eta=eta, seed=seed, batch_size=batch_size, callback=progress_callback(),
                                  sampler=sampler, cache_interval=cache_interval,
                                  batch=min(batch_size, rig_buffers.shape[0]))
        except ValueError as err:
            raise ValueError(f"{node}: {err}") from None
        return (model_to_image(edited),)


NODE_CLASS_MAPPINGS = {
    "DiffusionRigLoadModel": LoadDiffusionRigModel,
    "DiffusionRigEncodeGlobalCode": EncodeGlobalCode,
    "DiffusionRigInvert": DiffusionRigInvert,
    "DiffusionRigSampler": DiffusionRigSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}

"""Nodes around the DiffusionRig model: load it, encode the global code, sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comfy_diffusionrig import ddim_invert, ddim_sample, load_diffusionrig
from comfy_diffusionrig.checkpoints import for_inference
from comfy_diffusionrig.lora import load_lora, merge_lora

from .host import (Progress, check_interrupt, image_to_model, managed, model_files, model_fingerprint, model_path,
                   model_to_image, torch_device, use_model)

CATEGORY = "DiffusionRig"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


class LoadDiffusionRigModel:
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
                          {"default": "auto", "tooltip": "UNet precision. auto: bf16 on GPUs and on CPUs with native "
                                                         "bf16, else fp32. fp16 is GPU-only."}),
        }, "optional": {
            "lora_name": (["none"] + model_files("diffusionrig", (".safetensors",)),
                          {"default": "none", "tooltip": "A personalization LoRA saved by Save DiffusionRig Model, "
                                                         "applied on top of the checkpoint it was trained from."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                                        "tooltip": "How much of the LoRA to apply (1 = as trained)."}),
        }}

    def load(self, ckpt_name, precision, lora_name="none", lora_strength=1.0):
        node = "Load DiffusionRig Model"
        path = model_path("diffusionrig", ckpt_name, node)
        if lora_name == "none":
            return (managed(load_diffusionrig(path, device=torch_device(), dtype=precision)),)
        lora = model_path("diffusionrig", lora_name, node)
        model = load_lora(load_diffusionrig(path, device=torch_device()), lora)  # adapters merge in fp32
        return (managed(for_inference(merge_lora(model, lora_strength), torch_device(), precision)),)

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


class EncodeGlobalCode:
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
        image = _to_model_size(image_to_model(aligned_image, "Encode Global Code"), dr_model, "Encode Global Code")
        device = use_model(dr_model)
        with torch.no_grad():
            return (dr_model.encode(image.to(device)).cpu(),)


class DiffusionRigSampler:
    DESCRIPTION = ("Generates the edited portrait from the rig buffers and a global code with DDIM. 'inversion' "
                   "starts from the DDIM inversion of the source photo under its own buffers, which keeps the "
                   "background and fine details; 'noise' starts from seeded noise shared by the whole batch.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Edited aligned faces, one per buffer in the batch.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dr_model": ("DR_MODEL", {"tooltip": "From Load DiffusionRig Model."}),
                "rig_buffers": ("RIG_BUFFERS", {"tooltip": "Edited buffers from Render Buffers (a batch renders "
                                                           "a batch of images)."}),
                "global_code": ("GLOBAL_CODE", {"tooltip": "From Encode Global Code; one code is shared by the "
                                                           "whole batch."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed (start = noise). The same noise is used for every frame."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                  "tooltip": "DDIM steps; 20 is the official setting (t = 950, 900, ..., 0)."}),
                "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "0 = deterministic DDIM (official). Higher adds fresh noise per step."}),
                "start": (["noise", "inversion"], {"default": "noise",
                                                   "tooltip": "inversion needs source_image and source_buffers."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                       "tooltip": "Images denoised together; lower it if memory runs out."}),
            },
            "optional": {
                "source_image": ("IMAGE", {"tooltip": "The aligned original face (for start = inversion)."}),
                "source_buffers": ("RIG_BUFFERS", {"tooltip": "Buffers of the unedited fit (for start = inversion)."}),
            },
        }

    def sample(self, dr_model, rig_buffers, global_code, seed, steps, eta, start, batch_size,
               source_image=None, source_buffers=None):
        node = "DiffusionRig Sampler"
        device = use_model(dr_model)
        buffers = rig_buffers.to(device)
        size = buffers.shape[-2:]
        if global_code.shape[0] not in (1, buffers.shape[0]):
            raise ValueError(f"{node}: {global_code.shape[0]} global codes for {buffers.shape[0]} buffers; give one "
                             "code (shared by every frame) or one per buffer")
        if start == "inversion":
            if source_image is None or source_buffers is None:
                raise ValueError(f"{node}: start = inversion needs both source_image (the aligned photo) and "
                                 "source_buffers (Render Buffers of its unedited fit); connect them or use start = noise")
            image = _to_model_size(image_to_model(source_image[:1], node), dr_model, node).to(device)
            x_start = ddim_invert(dr_model, image, source_buffers[:1].to(device), global_code[:1].to(device),
                                  steps=steps, callback=lambda *a: check_interrupt())
        else:
            gen = torch.Generator().manual_seed(seed)
            x_start = torch.randn(1, 3, *size, generator=gen).to(device)
        total = buffers.shape[0] * steps
        progress = Progress(total)
        done = 0
        outputs = []
        check_interrupt()
        for first in range(0, buffers.shape[0], batch_size):
            chunk = buffers[first:first + batch_size]
            code = global_code[first:first + batch_size] if global_code.shape[0] > 1 else global_code

            def callback(step, steps_total, x, x0, offset=done, n=chunk.shape[0]):
                check_interrupt()
                progress.update(offset + (step + 1) * n, x0[0])

            outputs.append(ddim_sample(dr_model, chunk, code.to(device), x_start, steps=steps, eta=eta,
                                       callback=callback, generator=torch.Generator(device).manual_seed(seed)).cpu())
            done += chunk.shape[0] * steps
        return (model_to_image(torch.cat(outputs)),)


NODE_CLASS_MAPPINGS = {
    "DiffusionRigLoadModel": LoadDiffusionRigModel,
    "DiffusionRigEncodeGlobalCode": EncodeGlobalCode,
    "DiffusionRigSampler": DiffusionRigSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffusionRigLoadModel": "Load DiffusionRig Model",
    "DiffusionRigEncodeGlobalCode": "Encode Global Code",
    "DiffusionRigSampler": "DiffusionRig Sampler",
}

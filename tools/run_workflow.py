"""Run a workflow's API-format prompt in this process: our node functions, plus stand-ins for the few core
ComfyUI nodes the workflows use. No ComfyUI needed.

Used by tests/test_workflows.py (every workflow runs on the demo assets) and tools/make_pictures.py (the
thumbnail of relight_demo_person.json is that workflow's own output). Outside ComfyUI the nodes find the
models folder through $COMFY_DIFFUSIONRIG_MODELS. What the real ComfyUI and its frontend make of the
workflows is checked by tests/test_comfyui.py and tests/test_frontend.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import nodes
from nodes import host
from comfy_diffusionrig.demo.synthetic import compact_upscale

# ImageScaleBy's methods as torch modes (ComfyUI resizes lanczos with PIL; bicubic stands in for it here)
_SCALE_MODES = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic",
                "lanczos": "bicubic"}


def _core(class_type: str, inputs: dict, out_dir: Path) -> tuple:
    """Stand-ins for the core ComfyUI nodes the workflows use; SaveImage writes out_dir/<prefix>.pt."""
    if class_type == "UpscaleModelLoader":  # ComfyUI: spandrel; here the compact layout of the demo upscaler
        return (load_file(host.model_dirs("upscale_models")[0] / inputs["model_name"]),)
    if class_type == "ImageUpscaleWithModel":
        image = inputs["image"].permute(0, 3, 1, 2)
        return (compact_upscale(inputs["upscale_model"], image).clamp(0, 1).permute(0, 2, 3, 1),)
    if class_type == "ImageScaleBy":
        image = inputs["image"].permute(0, 3, 1, 2)
        size = [round(s * inputs["scale_by"]) for s in image.shape[-2:]]
        scaled = torch.nn.functional.interpolate(image, size=size, mode=_SCALE_MODES[inputs["upscale_method"]])
        return (scaled.clamp(0, 1).permute(0, 2, 3, 1),)
    if class_type == "MaskToImage":
        return (inputs["mask"][..., None].expand(*inputs["mask"].shape, 3),)
    if class_type == "RepeatImageBatch":
        return (inputs["image"].repeat(inputs["amount"], 1, 1, 1),)
    if class_type == "SaveImage":
        torch.save(inputs["images"], Path(out_dir) / f"{inputs['filename_prefix']}.pt")
    return ()


def run_prompt(prompt: dict, out_dir: str | Path) -> dict:
    """Execute an API-format prompt by calling the node functions in dependency order: {node id: outputs}.
    Each SaveImage node's images land in out_dir/<filename_prefix>.pt ([B, H, W, 3] in 0..1)."""
    results = {}

    def run(node_id):
        if node_id in results:
            return results[node_id]
        spec = prompt[node_id]
        inputs = {k: (run(v[0])[v[1]] if isinstance(v, list) else v) for k, v in spec["inputs"].items()}
        cls = nodes.NODE_CLASS_MAPPINGS.get(spec["class_type"])
        if cls is None:
            out = _core(spec["class_type"], inputs, Path(out_dir))
        else:
            out = getattr(cls(), cls.FUNCTION)(**inputs)
            out = out["result"] if isinstance(out, dict) else out
        results[node_id] = out
        return out

    for node_id in prompt:
        run(node_id)
    return results

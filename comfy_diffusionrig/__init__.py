"""comfy_diffusionrig: DiffusionRig (Ding et al., CVPR 2023) in plain PyTorch.

The public API is imported lazily so that `import comfy_diffusionrig` stays cheap (ComfyUI
imports the pack at start-up) and optional dependencies load only when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_diffusionrig": "model.checkpoints",
    "save_diffusionrig": "model.checkpoints",
    "DiffusionRig": "model.unet",
    "UNetConfig": "model.unet",
    "ddim_sample": "model.diffusion",
    "ddim_invert": "model.diffusion",
    "dpmpp_2m_sample": "model.diffusion",
    "dpmpp_2m_invert": "model.diffusion",
    "edit_faces": "editing",
    "invert_faces": "editing",
    "InvertedStart": "editing",
    "p2_loss": "model.diffusion",
    "load_flame": "face.flame",
    "load_deca": "face.deca",
    "detect_faces": "photo.detection",
    "align_face": "photo.alignment",
    "paste_back": "photo.paste",
    "sh_from_environment": "face.environment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'comfy_diffusionrig' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

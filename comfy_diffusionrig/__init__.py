"""comfy_diffusionrig: DiffusionRig (Ding et al., CVPR 2023) in plain PyTorch.

The public API is imported lazily so that `import comfy_diffusionrig` stays cheap (ComfyUI
imports the pack at start-up) and optional dependencies load only when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_diffusionrig": "checkpoints",
    "save_diffusionrig": "checkpoints",
    "DiffusionRig": "unet",
    "UNetConfig": "unet",
    "ddim_sample": "diffusion",
    "ddim_invert": "diffusion",
    "dpmpp_2m_sample": "diffusion",
    "dpmpp_2m_invert": "diffusion",
    "edit_faces": "editing",
    "p2_loss": "diffusion",
    "load_flame": "flame",
    "load_deca": "deca",
    "detect_faces": "alignment",
    "align_face": "alignment",
    "paste_back": "alignment",
    "sh_from_environment": "environment",
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

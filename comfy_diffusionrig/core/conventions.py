"""Named layouts that several modules share: their one home (import them from here, never write them again).

The 68 facial landmarks (dlib / iBUG 300-W order, as the official align.py and DECA use them),
the parts of DECA's pose code, the channels of DiffusionRig's 9-channel buffers, the photo
file suffixes we read, the seed range of the samplers, and the models folder outside ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

# 68 landmarks, 0-based (iBUG 300-W): the eyes as the image shows them (image-left first)
JAW_LINE = slice(0, 17)
BROWS = slice(17, 27)
NOSE_TIP = 30
EYE_LEFT = slice(36, 42)
EYE_RIGHT = slice(42, 48)
EYES = slice(36, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54  # outer mouth corners

# DECA's pose code [B, 6]: axis-angle of the whole head, then of the jaw (FLAME's frame)
GLOBAL_POSE = slice(0, 3)
JAW_POSE = slice(3, 6)

# DiffusionRig's buffers [B, 9, H, W] = rendered | normal | albedo (official decode() order)
RENDERED = slice(0, 3)
NORMAL = slice(3, 6)
ALBEDO = slice(6, 9)
BUFFER_CHANNELS = 9

# photo files we read (PIL opens them all)
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# seeds: any unsigned 64-bit value (ComfyUI's seed widget range; torch.Generator.manual_seed takes it)
SEED_MAX = 0xFFFFFFFFFFFFFFFF

# the models folder of the CLI, the library and the nodes outside ComfyUI (diffusionrig/, deca/, flame/, ...)
MODELS_ENV = "COMFY_DIFFUSIONRIG_MODELS"
MODELS_DEFAULT = "models"


def default_models_dir() -> Path:
    """$COMFY_DIFFUSIONRIG_MODELS, else ./models."""
    return Path(os.environ.get(MODELS_ENV, MODELS_DEFAULT))

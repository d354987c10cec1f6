"""Pictures <-> tensors, and colours written as text: the conversions the library, the CLI and the nodes share.

Model-side images are [B, 3, H, W] float in [-1, 1] (DiffusionRig's range) or in [0, 1]
(DECA's and the buffers'); PIL images are 8-bit RGB.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image

_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def pil_to_tensor(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> [B, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB"), np.float32) / 255.0 for p in pictures])
                            ).permute(0, 3, 1, 2).contiguous()


def to_uint8(image: torch.Tensor, low: float = -1.0) -> np.ndarray:
    """One image [3, H, W] in [low, 1] (low -1: DiffusionRig's range, 0: [0, 1]) -> H x W x 3 uint8."""
    scaled = (image.detach().float().clamp(low, 1) - low) * (255.0 / (1 - low))
    return scaled.round().byte().permute(1, 2, 0).cpu().numpy()


def tensor_to_pil(image: torch.Tensor, low: float = -1.0) -> Image.Image:
    """One image [3, H, W] in [low, 1] -> an RGB PIL image (see `to_uint8`)."""
    return Image.fromarray(to_uint8(image, low), "RGB")


def hex_color(text: str) -> tuple[float, float, float]:
    """'#FFE0C0' (or 'FFE0C0') -> RGB in 0..1; ValueError naming the text otherwise."""
    match = _HEX.match(text.strip())
    if not match:
        raise ValueError(f"colour {text!r} is not a hex colour like #FFE0C0")
    value = match.group(1)
    return tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))

"""Pictures <-> tensors and colour text (imaging.py): exact round trips and the value ranges."""

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_diffusionrig.core.imaging import hex_color, pil_to_tensor, tensor_to_pil, to_uint8


def test_round_trips_are_exact_and_ranges_are_respected():
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    tensor = pil_to_tensor([Image.fromarray(pixels)])
    assert tensor.shape == (1, 3, 5, 7) and tensor.dtype == torch.float32
    assert float(tensor[0, 2, 0, 1]) == pytest.approx(pixels[0, 1, 2] / 255, abs=1e-7)  # channel-first, [0, 1]
    assert np.array_equal(np.asarray(tensor_to_pil(tensor[0], low=0.0)), pixels)
    assert np.array_equal(np.asarray(tensor_to_pil(tensor[0] * 2 - 1)), pixels)  # DiffusionRig's [-1, 1]
    grey = pil_to_tensor([Image.new("L", (2, 2), 128)])
    assert grey.shape == (1, 3, 2, 2)
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 9.0]).view(1, 1, 5).expand(3, 1, 5))[0].tolist() == [
        [0, 0, 0], [0, 0, 0], [128, 128, 128], [255, 255, 255], [255, 255, 255]]


def test_hex_colours():
    assert hex_color("#FFE0C0") == (1.0, 224 / 255, 192 / 255)
    assert hex_color(" 00ff80 ") == (0.0, 1.0, 128 / 255)
    for bad in ("orange", "#FFF", "#GG0000", ""):
        with pytest.raises(ValueError, match="is not a hex colour like #FFE0C0"):
            hex_color(bad)

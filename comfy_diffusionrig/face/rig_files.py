"""Photos that carry their face rig: an aligned face saved as PNG with its fitted (or known) rig inside.

Fitting is the slow and the uncertain part of an edit; a rigged photo skips it. The rig rides in a
compressed PNG text chunk (as ComfyUI keeps workflows in its PNGs), so one file is the photo and
its rig: open it in any viewer, edit it again later, share it. The offline demo writes its synthetic
person this way (DECA with random weights cannot fit synthetic faces; the demo knows their true rig).

The chunk holds JSON: {"format", "version", "image_size": [H, W], "head" (the FLAME model's
`flame.head_id`, or null), "codes": {shape, tex, exp, pose, cam, light as nested lists},
"tform": 3x3, "ffhq_center": [3]} for one face. Values are float32 written exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .rig import CODE_KEYS, FaceRig

RIG_CHUNK = "comfy-diffusionrig.rig"
RIG_FORMAT = "comfy-diffusionrig face rig"
RIG_VERSION = 1
CODE_SHAPES = {"shape": (100,), "tex": (50,), "exp": (50,), "pose": (6,), "cam": (3,), "light": (9, 3)}


class RigFileError(ValueError):
    """A rigged photo that cannot be used (names the file, says what is wrong)."""


def rig_document(rig: FaceRig, index: int = 0) -> dict:
    """One face of a rig as the JSON document a rigged photo carries."""
    one = rig.select(index)
    as_list = lambda t: t[0].detach().cpu().float().tolist()  # noqa: E731
    return {"format": RIG_FORMAT, "version": RIG_VERSION, "image_size": list(rig.image_size), "head": rig.head,
            "codes": {key: as_list(one.codes[key]) for key in CODE_KEYS},
            "tform": as_list(one.tform), "ffhq_center": as_list(one.ffhq_center)}


def rig_from_document(document: dict, source: str = "the rig") -> FaceRig:
    """The one-face FaceRig of a rig document; RigFileError naming `source` when it is not one."""
    def fail(what: str) -> RigFileError:
        return RigFileError(f"{source}: its face rig {what}; save the rig again (Save Face Rig, or fit the photo)")

    if not isinstance(document, dict) or document.get("format") != RIG_FORMAT:
        raise fail("is not a comfy-diffusionrig face rig")
    if document.get("version") != RIG_VERSION:
        raise fail(f"has version {document.get('version')!r}; this pack reads version {RIG_VERSION} (update the pack)")

    def tensor(value, shape: tuple[int, ...], what: str) -> torch.Tensor:
        try:
            out = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError):
            raise fail(f"has a malformed '{what}'") from None
        if tuple(out.shape) != shape:
            raise fail(f"has '{what}' of shape {tuple(out.shape)}, expected {shape}")
        if not bool(torch.isfinite(out).all()):
            raise fail(f"has NaN or infinite values in '{what}'")
        return out[None]

    codes = document.get("codes")
    if not isinstance(codes, dict) or set(codes) != set(CODE_KEYS):
        raise fail(f"lacks codes (expected {', '.join(CODE_KEYS)})")
    size = document.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise fail("has no valid image_size")
    head = document.get("head")
    if head is not None and not isinstance(head, str):
        raise fail("has an invalid head id")
    return FaceRig({key: tensor(codes[key], CODE_SHAPES[key], key) for key in CODE_KEYS},
                   tensor(document.get("tform"), (3, 3), "tform"), tensor(document.get("ffhq_center"), (3,),
                                                                          "ffhq_center"),
                   (size[0], size[1]), head)


def save_rigged_photo(path: str | Path, image: Image.Image, rig: FaceRig, index: int = 0,
                      overwrite: bool = False) -> Path:
    """Write the aligned face `image` as PNG carrying face `index` of `rig` (atomic; never replaces a file
    unless overwrite)."""
    from ..model.checkpoints import atomic_write

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise RigFileError(f"{path}: a rigged photo is a PNG file (its rig rides in a PNG text chunk)")
    if (image.height, image.width) != tuple(rig.image_size):
        raise RigFileError(f"{path}: the photo is {image.width}x{image.height} but its rig was made for "
                           f"{rig.image_size[1]}x{rig.image_size[0]} aligned faces")
    info = PngImagePlugin.PngInfo()
    info.add_text(RIG_CHUNK, json.dumps(rig_document(rig, index)), zip=True)
    picture = image.convert("RGB")
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)
    return path


def read_rig(path: str | Path) -> FaceRig | None:
    """The rig a PNG carries, or None for any photo without one (other formats included)."""
    path = Path(path)
    try:
        with Image.open(path) as picture:
            text = getattr(picture, "text", {}).get(RIG_CHUNK) if picture.format == "PNG" else None
            size = (picture.height, picture.width)
    except (OSError, SyntaxError, ValueError):  # not an image PIL reads: not a rigged photo (load_image says why)
        return None
    if text is None:
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise RigFileError(f"{path}: its face rig is not valid JSON ({err.msg}); save the rig again") from None
    rig = rig_from_document(document, str(path))
    if size != tuple(rig.image_size):
        raise RigFileError(f"{path}: the photo is {size[1]}x{size[0]} but its rig was made for "
                           f"{rig.image_size[1]}x{rig.image_size[0]} (was it resized after the rig was saved?)")
    return rig


def load_rigged_photo(path: str | Path) -> tuple[Image.Image, FaceRig]:
    """(the aligned face as RGB, its one-face rig); RigFileError when the file carries no rig."""
    from ..photo.loading import load_image

    rig = read_rig(path)
    if rig is None:
        raise RigFileError(f"{path} carries no face rig: a rigged photo is a PNG written by Save Face Rig or by "
                           "`comfy-diffusionrig demo` (for any other photo use Load Face Photo, Detect & Align "
                           "Face and DECA Fit)")
    return load_image(path), rig


def rig_ready(rig: FaceRig, image_size: int, what: str) -> None:
    """Refuse a rigged photo made for a model of another size, naming `what`."""
    if tuple(rig.image_size) != (image_size, image_size):
        raise RigFileError(f"{what} is a {rig.image_size[1]} px rigged face but the DiffusionRig model works at "
                           f"{image_size} px: pick a model made for {rig.image_size[1]} px faces (for the demo's "
                           f"person: synthetic_demo_personalized_{rig.image_size[1]}px.safetensors)")

"""What the nodes need from ComfyUI: model folders, device, progress, cancel, IMAGE conversion.

Every ComfyUI import is guarded so the nodes' functions also run (and are tested) without
ComfyUI; outside ComfyUI, model folders live under $COMFY_DIFFUSIONRIG_MODELS (default
./models) and progress/cancel are no-ops.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

try:  # inside ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:  # library use and tests
    _mm = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None

PRESET_FOLDER = "diffusionrig_presets"  # Save / Load Rig Preset's files, a model folder of its own

# folder name -> (what goes there, where it comes from); used in every "missing file" error
MODEL_FOLDERS = {
    "diffusionrig": (
        "DiffusionRig checkpoints: the official stage-1 model.pt or your personalized .safetensors",
        "https://github.com/adobe-research/diffusion-rig (stage-1 checkpoint; Adobe research licence), "
        "or run `comfy-diffusionrig demo-assets` for a small synthetic one",
    ),
    "deca": (
        "deca_model.tar (DECA's trained encoder)",
        "https://github.com/yfeng95/DECA (DECA licence, non-commercial)",
    ),
    "flame": (
        "FLAME 2020 files: generic_model.pkl, landmark_embedding.npy, head_template.obj, FLAME_texture.npz",
        "https://flame.is.tue.mpg.de (FLAME licence, registration required) and the DECA repository's data/ folder",
    ),
    PRESET_FOLDER: (
        "Rig presets (.json files of a light and/or an expression and pose edit)",
        "Save Rig Preset, or other people's preset files (the pack's own are listed as pack/...)",
    ),
}


def _fallback_models_dir() -> Path:
    return Path(os.environ.get("COMFY_DIFFUSIONRIG_MODELS", "models"))


def register_model_folders() -> None:
    """Register our model folders with ComfyUI (so extra_model_paths.yaml works); no-op outside."""
    if not IN_COMFYUI:
        return
    for name in MODEL_FOLDERS:  # ComfyUI skips paths already registered (e.g. by extra_model_paths.yaml)
        _folder_paths.add_model_folder_path(name, os.path.join(_folder_paths.models_dir, name))


def model_files(folder: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """File names in a model folder (for a combo input), filtered by suffix."""
    if IN_COMFYUI:
        names = _folder_paths.get_filename_list(folder)
    else:
        root = _fallback_models_dir() / folder
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return [n for n in names if not suffixes or n.lower().endswith(suffixes)]


def folder_hint(folder: str) -> str:
    what, where = MODEL_FOLDERS[folder]
    if IN_COMFYUI:
        place = f"ComfyUI/models/{folder}/ (or a path added to '{folder}' in extra_model_paths.yaml)"
    else:
        place = str(_fallback_models_dir() / folder) + "/"
    return f"{what} go in {place}; get them from {where}"


def model_path(folder: str, name: str, node: str) -> Path:
    """Full path of a model file, or a FileNotFoundError naming the node, file, folder and source."""
    if name:
        if IN_COMFYUI:
            full = _folder_paths.get_full_path(folder, name)
            if full:
                return Path(full)
        else:
            candidate = _fallback_models_dir() / folder / name
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{node}: model file {name!r} not found. {folder_hint(folder)}")


def models_root() -> Path:
    """ComfyUI's models/ folder (where optional insightface/ and dlib/ model folders are looked up)."""
    return Path(_folder_paths.models_dir) if IN_COMFYUI else _fallback_models_dir()


def model_dir(folder: str) -> Path:
    """The first directory of a model folder (where FLAME's set of files is looked up)."""
    if IN_COMFYUI:
        return Path(_folder_paths.get_folder_paths(folder)[0])
    return _fallback_models_dir() / folder


EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "example_images"
EXAMPLE_PREFIX = "examples/"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _input_dir() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_input_directory())
    return Path(os.environ.get("COMFY_DIFFUSIONRIG_INPUT", "input"))


def input_files(suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Files for a combo input: ComfyUI's input folder, then the pack's example images as examples/<name>."""
    root = _input_dir()
    own = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes) \
        if root.is_dir() else []
    examples = sorted(EXAMPLE_PREFIX + p.name for p in EXAMPLE_IMAGES.iterdir()
                      if p.suffix.lower() in suffixes) if EXAMPLE_IMAGES.is_dir() else []
    return own + examples


def input_path(name: str, node: str) -> Path:
    """Full path of a photo chosen in `input_files`, or a FileNotFoundError saying where photos go."""
    example = name.startswith(EXAMPLE_PREFIX)
    relative = name[len(EXAMPLE_PREFIX):] if example else name
    path = (EXAMPLE_IMAGES if example else _input_dir()) / relative
    if "/" in relative or "\\" in relative or not path.is_file():
        raise FileNotFoundError(f"{node}: photo {name!r} not found; put photos in {_input_dir()} (ComfyUI's input "
                                f"folder, or upload them) or pick one of the examples/ images")
    return path


def photo_folder(text: str, node: str) -> Path:
    """A folder of photos: absolute, relative to the input folder, or 'examples' (the pack's example images)."""
    text = text.strip()
    if text == "examples":
        return EXAMPLE_IMAGES
    path = Path(text).expanduser()
    path = path if path.is_absolute() else _input_dir() / path
    if not path.is_dir():
        raise FileNotFoundError(f"{node}: folder {path} does not exist; give an absolute path, a folder inside "
                                f"{_input_dir()}, or 'examples'")
    return path


def torch_device() -> torch.device:
    return _mm.get_torch_device() if IN_COMFYUI else torch.device("cpu")


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed cancel (no-op outside ComfyUI)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar with optional JPEG previews; silent outside ComfyUI."""

    def __init__(self, total: int):
        self.total = total
        self._bar = _comfy_utils.ProgressBar(total) if IN_COMFYUI else None

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        """preview: one image [3, H, W] in [-1, 1]."""
        if self._bar is None:
            return
        image = None
        if preview is not None:
            from PIL import Image

            image = ("JPEG", Image.fromarray(to_uint8(preview)), 512)
        self._bar.update_absolute(value, self.total, image)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> HxWx3 uint8."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def image_to_model(image: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> [B, 3, H, W] in [-1, 1] (alpha dropped, grey expanded)."""
    if image.ndim != 4:
        raise ValueError(f"{node}: expected an IMAGE batch [B, H, W, C], got shape {tuple(image.shape)}")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"{node}: expected 1, 3 or 4 colour channels, got {channels}")
    return image.permute(0, 3, 1, 2).float() * 2 - 1


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [B, H, W, 3] in 0..1, float32 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()

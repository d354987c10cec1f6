"""Loading and saving DiffusionRig weights.

Official stage-1 / stage-2 `.pt` files (a bare `state_dict()` of the official `DiffusionRig`)
load key-for-key and strictly, through `torch.load(weights_only=True)` so that a file whose
pickle would run code is refused without running it. Our own format is `.safetensors` with
the model config in its metadata. Writes are atomic: a temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from .devices import parse_dtype, resolve_dtype
from .unet import DiffusionRig, UNetConfig

FORMAT_TAG = "comfy-diffusionrig"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_HELP = (
    "DiffusionRig checkpoints (stage 1 'model.pt' from https://github.com/adobe-research/diffusion-rig, "
    "or your own stage-2 model) go in ComfyUI's models/diffusionrig/ folder"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message saying what to do."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Call `write(tmp_path)` then rename the temporary file onto `path`.

    A crash or a full disk never leaves a half-written `path`, and an existing file is kept
    unless `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers and strip DataParallel/compile prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, found a {type(obj).__name__}")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    return tensors


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a `.safetensors` or `.pt`/`.pth`/`.ckpt` file, safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. {WEIGHTS_HELP}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                # clone: fresh, aligned storage (unaligned weights take slower, differently rounded kernels)
                return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(
                f"{path} is not a readable .safetensors file ({err}); it may be truncated: copy it again"
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint; its pickle references Python "
            f"objects{what} that could run code, so it was not unpickled. Official DiffusionRig checkpoints "
            "load safely; only use files from sources you trust, or convert the file to .safetensors"
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]}); "
            "the file may be truncated or not a checkpoint at all: download or copy it again"
        ) from err
    try:
        return _unwrap(obj), {}
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}; this is not a DiffusionRig checkpoint") from err


def infer_encoder_type(state_dict: dict[str, torch.Tensor]) -> str:
    """resnet50 checkpoints have bottleneck blocks (a third conv per block); resnet18 has not."""
    return "resnet50" if "encoder.layer1.0.conv3.weight" in state_dict else "resnet18"


def _describe(state_dict: dict[str, torch.Tensor]) -> str:
    prefixes = sorted({k.split(".")[0] for k in state_dict})
    return f"{len(state_dict)} tensors with top-level names {prefixes[:6]}"


def _check_keys(path: Path, state_dict: dict, model: DiffusionRig) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[:2]})")
    raise CheckpointError(
        f"{path} does not match a DiffusionRig model ({'; '.join(parts)}). The file holds {_describe(state_dict)}. "
        "If it is a DiffusionRig checkpoint trained with non-default settings, pass its "
        "create_model_and_diffusion kwargs as config (or put them in a JSON file next to it with the same "
        "name and a .json suffix); otherwise it is a checkpoint of another model."
    )


def _resolve_config(path: Path, config, state_dict, metadata) -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    if isinstance(config, dict):
        return UNetConfig.from_official_kwargs(config)
    if config is not None:
        raise TypeError(f"config must be None, a UNetConfig or a dict of official kwargs, got {type(config).__name__}")
    if "config" in metadata:
        return UNetConfig.from_dict(json.loads(metadata["config"]))
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return UNetConfig.from_official_kwargs(json.loads(sidecar.read_text()))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{sidecar} is not a valid DiffusionRig config: {err}") from err
    return UNetConfig(encoder_type=infer_encoder_type(state_dict))


def load_diffusionrig(path: str | os.PathLike, config: UNetConfig | dict | None = None, device="cpu",
                      dtype: torch.dtype | str = torch.float32) -> DiffusionRig:
    """Load a DiffusionRig model (official `.pt` or our `.safetensors`) ready for inference.

    config None: the config stored in a `.safetensors`, else a `<name>.json` of official kwargs
    next to the file, else the official defaults (encoder type inferred from the keys).
    dtype applies to the UNet ("auto" picks the fastest safe precision), whose weights are
    stored channels_last; the small encoder stays float32. The model is returned in eval mode.
    """
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    cfg = _resolve_config(path, config, state_dict, metadata)
    with torch.device("meta"):
        model = DiffusionRig(cfg)
    _check_keys(path, state_dict, model)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return for_inference(model, device, dtype)


def for_inference(model: DiffusionRig, device="cpu", dtype: torch.dtype | str = torch.float32) -> DiffusionRig:
    """Move a model to `device`, cast its UNet to `dtype` ("auto" allowed), in place; eval mode.

    The UNet is stored channels_last; the small encoder stays float32.
    """
    unet_dtype = resolve_dtype(dtype, device)
    model.to(device=device)
    # channels_last: oneDNN / cuDNN convolutions run 15-35 % faster (see benchmarks/bench_sample.py)
    model.denoisingUNet.to(dtype=unet_dtype, memory_format=torch.channels_last)
    model.encoder.float()
    return model.eval()


def save_diffusionrig(model: DiffusionRig, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                      overwrite: bool = False, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as `.safetensors` with its config in the metadata, atomically.

    dtype None keeps each tensor's dtype; "fp16"/"bf16"/"fp32" converts floating tensors
    (integer buffers such as BatchNorm counters are kept).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save path must end in .safetensors, got {path.name}")
    target = None if dtype is None else parse_dtype(dtype)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if target is not None and value.is_floating_point():
            value = value.to(target)
        tensors[key] = value.contiguous()
    metadata = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict()), **(extra_metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)

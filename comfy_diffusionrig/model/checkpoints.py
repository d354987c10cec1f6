"""Loading and saving DiffusionRig weights.

Official stage-1 / stage-2 `.pt` files (a bare `state_dict()` of the official `DiffusionRig`)
load key-for-key and strictly, through `torch.load(weights_only=True)` so that a file whose
pickle would run code is refused without running it. Our own format is `.safetensors` with
the model config in its metadata. Every unusable file raises `CheckpointError` naming it and
saying what it looks like; NaN/inf weights are refused at load. Writes are atomic: a temporary
file flushed to disk, then renamed into place (or linked, so that without `overwrite` the name
is taken exclusively); a full disk raises `DiskFullError` saying how much to free.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import torch

from ..core.devices import parse_dtype, resolve_dtype
from ..core.errors import ModelFileError, check_finite, file_kind, torch_load_error, unreadable
from .unet import DiffusionRig, UNetConfig

FORMAT_TAG = "comfy-diffusionrig"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")  # the files `load_diffusionrig` reads
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_HELP = (
    "DiffusionRig checkpoints (stage 1 'model.pt' from https://github.com/adobe-research/diffusion-rig, "
    "or your own stage-2 model) go in ComfyUI's models/diffusionrig/ folder"
)
TEMP_SUFFIX = ".tmp"
# torch's zip writer reports a failed write (a full disk among others) as a RuntimeError
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_MB = 1 << 20
_MAX_SIZE = 1 << 16  # no config size of a trainable DiffusionRig comes near this


class CheckpointError(ModelFileError):
    """A checkpoint file that cannot be used, with a message saying what to do."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFullError(OSError):
    """A write that ran out of disk space (errno ENOSPC); the message says how much to free."""


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged process may still write in `folder` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full_error(path: Path, needed: int, what: str = "") -> DiskFullError:
    """DiskFullError saying how many MB to free to write about `needed` bytes at `path`."""
    free = free_bytes(path.parent)
    short = max(needed - free, 0) + 16 * _MB  # some room for the file system's own bookkeeping
    return DiskFullError(errno.ENOSPC, f"disk full: writing {path} needs about {math.ceil(needed / _MB)} MB and "
                                       f"{free // _MB} MB are free; free {math.ceil(short / _MB)} MB or write "
                                       f"elsewhere{what}")


def _as_disk_full(err: BaseException, path: Path, written: int, size_hint: int | None) -> DiskFullError | None:
    """The DiskFullError `err` stands for, or None when it is another failure."""
    needed = max(written, size_hint or 0)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return disk_full_error(path, needed, f" ({err.strerror or err})")
    if isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        if free_bytes(path.parent) < max(needed, _MB):  # torch does not say why the write failed: look
            return disk_full_error(path, needed)
    return None


def _fsync(path: str | os.PathLike, folder: bool = False) -> None:
    """Flush a file (or a folder's entries) to the disk; folders cannot be synced on every system."""
    try:
        fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems refuse to sync a folder: nothing more to do there
            raise
    finally:
        os.close(fd)


def _link_exclusively(tmp: str, path: Path) -> None:
    """Give `tmp` the name `path` only if no file has it (one of two racing writers fails)."""
    exists = f"{path} already exists; choose another name or allow overwriting"
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, exists) from None
    except OSError:  # no hard links here (FAT, some network drives): reserve the name, then move onto it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, exists) from None
        try:
            os.replace(tmp, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    else:
        os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write, overwrite: bool = False, size_hint: int | None = None) -> Path:
    """Call `write(tmp_path)`, flush the temporary file to disk and give it the name `path`.

    A crash or a full disk never leaves a half-written `path`: the temporary file is removed
    and a full disk raises `DiskFullError` saying how much to free (size_hint: the expected
    size in bytes, for that message). Without `overwrite` the name is taken exclusively, so
    an existing file, or one that another writer creates meanwhile, raises FileExistsError
    and is kept. With `overwrite`, a symlink is written through (its target is replaced) and
    an existing file keeps its permission bits. Returns `path`.
    """
    path = Path(path)
    if overwrite and path.is_symlink():
        path = Path(os.path.realpath(path))
    elif not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if overwrite else None
    except FileNotFoundError:
        mode = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)  # mkstemp makes it private
        _fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusively(tmp, path)
        _fsync(path.parent, folder=True)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        Path(tmp).unlink(missing_ok=True)
        full = _as_disk_full(err, path, written, size_hint)
        if full is not None:
            raise full from err
        raise
    return path


def remove_stale_temp_files(path: str | os.PathLike, older_than_s: float = 600.0) -> list[Path]:
    """Delete the temporary files `atomic_write` left for `path` (a killed process) that nobody has
    touched for `older_than_s` seconds; returns them."""
    path = Path(path)
    now = time.time()
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # another process removed or renamed it meanwhile
            continue
    return removed


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers and strip DataParallel/compile prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}; this is not a "
                              "DiffusionRig checkpoint", path)
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a tensor is stored under the key {key!r}, not a parameter name; this is "
                                  "not a DiffusionRig checkpoint (or it is damaged): copy or download it again", path)
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    if not tensors:
        found = [str(k) for k in obj][:8]
        raise CheckpointError(f"{path}: holds no tensors (found {found}); this is not a DiffusionRig checkpoint", path)
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # clone: fresh, aligned storage (unaligned weights take slower, differently rounded kernels)
            return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise unreadable(CheckpointError, path, f"not a readable .safetensors file ({str(err)[:200]})",
                         "copy or download it again") from err


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as err:  # zip errors, truncation, MemoryError for absurd sizes, refused globals, ...
        advice = ("rename it to .safetensors" if file_kind(path) == "a safetensors file"
                  else "the file may be truncated or not a checkpoint at all: download or copy it again")
        raise torch_load_error(err, path, CheckpointError, "PyTorch checkpoint", advice,
                               refused_advice="official DiffusionRig checkpoints load safely; only use files from "
                                              "sources you trust, or convert the file to .safetensors") from err


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a `.safetensors` or `.pt`/`.pth`/`.ckpt` file, safely.

    Every failure is a `CheckpointError` naming the file and what it looks like; weights
    holding NaN or infinite values are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. {WEIGHTS_HELP}")
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = _unwrap(_read_torch(path), path), {}
    check_finite(tensors, path, CheckpointError, "use another copy or an earlier checkpoint")
    return tensors, metadata


def infer_encoder_type(state_dict: dict[str, torch.Tensor]) -> str:
    """resnet50 checkpoints have bottleneck blocks (a third conv per block); resnet18 has not."""
    return "resnet50" if "encoder.layer1.0.conv3.weight" in state_dict else "resnet18"


def _describe(state_dict: dict[str, torch.Tensor]) -> str:
    prefixes = sorted({k.split(".")[0] for k in state_dict})
    return f"{len(state_dict)} tensors with top-level names {prefixes[:6]}"


def _kind(tensor: torch.Tensor) -> str:
    """"float" or "int": a float weight stored as int64/bool (or a counter as float) is another file."""
    return "float" if tensor.is_floating_point() else "complex" if tensor.is_complex() else "int"


def _check_keys(path: Path, state_dict: dict, model: DiffusionRig) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    mistyped = [f"{k} {state_dict[k].dtype} vs model {v.dtype}" for k, v in expected.items()
                if k in state_dict and _kind(state_dict[k]) != _kind(v)]
    if not (missing or unexpected or mismatched or mistyped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[:2]})")
    if mistyped:
        parts.append(f"{len(mistyped)} tensors of the wrong type (first: {mistyped[:2]})")
    raise CheckpointError(
        f"{path} does not match a DiffusionRig model ({'; '.join(parts)}). The file holds {_describe(state_dict)}. "
        "If it is a DiffusionRig checkpoint trained with non-default settings, pass its "
        "create_model_and_diffusion kwargs as config (or put them in a JSON file next to it with the same "
        "name and a .json suffix); otherwise it is a checkpoint of another model.", path
    )


def _plausible(config: UNetConfig) -> UNetConfig:
    """The config if building it can work; a damaged one (negative or absurd sizes) raises ValueError."""
    sizes = {"image_size": config.image_size, "num_channels": config.num_channels,
             "num_res_blocks": config.num_res_blocks, "latent_dim": config.latent_dim,
             "in_channels": config.in_channels, "diffusion_steps": config.diffusion_steps}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool)
           or not 1 <= v <= _MAX_SIZE]
    mults = config.channel_mults
    if not 1 <= len(mults) <= 12 or any(not isinstance(m, (int, float)) or not 0 < m <= 64 for m in mults):
        bad.append(f"channel_mult={mults!r}")
    if any(not isinstance(r, int) or r < 1 for r in config.attention_resolutions):
        bad.append(f"attention_resolutions={config.attention_resolutions!r}")
    if bad:
        raise ValueError(f"implausible values {', '.join(bad)}")
    return config


def _resolve_config(path: Path, config, state_dict, metadata) -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    if isinstance(config, dict):
        return UNetConfig.from_official_kwargs(config)
    if config is not None:
        raise TypeError(f"config must be None, a UNetConfig or a dict of official kwargs, got {type(config).__name__}")
    if "config" in metadata:
        try:
            return _plausible(UNetConfig.from_dict(json.loads(metadata["config"])))
        except (ValueError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: the model config in its metadata is damaged ({str(err)[:200]}); "
                                  "save the model again, or pass its config explicitly", path) from err
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return _plausible(UNetConfig.from_official_kwargs(json.loads(sidecar.read_text())))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{sidecar} is not a valid DiffusionRig config: {err}", sidecar) from err
    return UNetConfig(encoder_type=infer_encoder_type(state_dict))


def load_diffusionrig(path: str | os.PathLike, config: UNetConfig | dict | None = None, device="cpu",
                      dtype: torch.dtype | str = torch.float32, run_device=None) -> DiffusionRig:
    """Load a DiffusionRig model (official `.pt` or our `.safetensors`) ready for inference.

    config None: the config stored in a `.safetensors`, else a `<name>.json` of official kwargs
    next to the file, else the official defaults (encoder type inferred from the keys).
    dtype applies to the UNet ("auto" picks the fastest safe precision), whose weights are
    stored channels_last; the small encoder stays float32. The model is returned in eval mode.
    run_device: where it will run when that is not `device` (a host that keeps idle models on the
    CPU and moves them to the GPU to run): "auto" and the precision checks are for that device.
    """
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    cfg = _resolve_config(path, config, state_dict, metadata)
    try:
        with torch.device("meta"):
            model = DiffusionRig(cfg)
    except (ValueError, TypeError, AssertionError, ZeroDivisionError, RuntimeError) as err:
        if config is not None:
            raise
        raise CheckpointError(f"{path}: the model config stored with it cannot build a DiffusionRig "
                              f"({type(err).__name__}: {str(err)[:200]}); pass the config explicitly", path) from err
    _check_keys(path, state_dict, model)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return for_inference(model, device, dtype, run_device)


def for_inference(model: DiffusionRig, device="cpu", dtype: torch.dtype | str = torch.float32,
                  run_device=None) -> DiffusionRig:
    """Move a model to `device`, cast its UNet to `dtype` ("auto" allowed), in place; eval mode.

    The UNet is stored channels_last; the small encoder stays float32. run_device: where the model
    will run, if not on `device` ("auto" picks the precision for it).
    """
    unet_dtype = resolve_dtype(dtype, device if run_device is None else run_device)
    if unet_dtype == torch.float16:  # fp16 tops out at 65504: a larger weight would become inf
        big = [name for name, p in model.denoisingUNet.named_parameters() if bool((p.detach().abs() > 65504).any())]
        if big:
            raise ValueError(f"the model has weights beyond fp16's range (65504) in {', '.join(big[:3])}; load it "
                             "with precision bf16 or fp32")
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

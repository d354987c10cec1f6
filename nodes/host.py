"""What the nodes need from ComfyUI: model folders, caches, file fingerprints, model memory
management, device, progress, cancel, IMAGE conversion, previews of the example photos.

Every ComfyUI import is guarded so the nodes' functions also run (and are tested) without
ComfyUI; outside ComfyUI, model folders live under $COMFY_DIFFUSIONRIG_MODELS (default
./models), caches under $COMFY_DIFFUSIONRIG_CACHE (default ~/.cache/comfy-diffusionrig),
models stay where they were loaded, and progress/cancel are no-ops.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from comfy_diffusionrig.core.conventions import PHOTO_SUFFIXES, default_models_dir
from comfy_diffusionrig.core.imaging import pil_to_tensor, tensor_to_pil
from comfy_diffusionrig.model.checkpoints import atomic_write

try:  # inside ComfyUI
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths
except ImportError:  # library use and tests
    _mm = _model_patcher = _comfy_utils = _folder_paths = None

IN_COMFYUI = _folder_paths is not None
log = logging.getLogger("comfy_diffusionrig")

PRESET_FOLDER = "diffusionrig_presets"  # Save / Load Rig Preset's files, a model folder of its own
RIG_FOLDER = "face_rigs"  # rigged photos (an aligned face + its rig): Save / Load Face Rig, the demo's person

# folder name -> (what goes there, where it comes from); used in every "missing file" error
MODEL_FOLDERS = {
    "diffusionrig": (
        "DiffusionRig checkpoints: the official stage-1 model.pt or your personalized .safetensors",
        "https://github.com/adobe-research/diffusion-rig (stage-1 checkpoint; Adobe research licence); "
        "`comfy-diffusionrig demo-assets` writes a small synthetic one, and `comfy-diffusionrig demo --models "
        "<ComfyUI models folder>` the offline demo's trained synthetic_demo_*.safetensors",
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
    RIG_FOLDER: (
        "Rigged photos (.png: an aligned face carrying its face rig)",
        "Save Face Rig; `comfy-diffusionrig demo --models <ComfyUI models folder>` writes the offline demo's "
        "person, synthetic_demo_person_<k>.png",
    ),
}


def register_model_folders() -> None:
    """Register our model folders with ComfyUI (so extra_model_paths.yaml works); no-op outside."""
    if not IN_COMFYUI:
        return
    for name in MODEL_FOLDERS:  # ComfyUI skips paths already registered (e.g. by extra_model_paths.yaml)
        _folder_paths.add_model_folder_path(name, os.path.join(_folder_paths.models_dir, name))


# subfolders of model folders that hold no models: album caches written there by older versions
# (now under `cache_dir`), and Train's resumable checkpoints
NOT_MODEL_SUBFOLDERS = ("albums", "training")


def model_files(folder: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """File names in a model folder (for a combo input), filtered by suffix; files under
    NOT_MODEL_SUBFOLDERS are never listed."""
    if IN_COMFYUI:
        names = _folder_paths.get_filename_list(folder)
    else:
        root = default_models_dir() / folder
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
            if root.is_dir() else []
    return [n for n in names if (not suffixes or n.lower().endswith(suffixes))
            and n.replace("\\", "/").split("/")[0] not in NOT_MODEL_SUBFOLDERS]


def folder_hint(folder: str) -> str:
    what, where = MODEL_FOLDERS[folder]
    if IN_COMFYUI:
        place = f"ComfyUI/models/{folder}/ (or a path added to '{folder}' in extra_model_paths.yaml)"
    else:
        place = str(default_models_dir() / folder) + "/"
    return f"{what} go in {place}; get them from {where}"


def _find_model(folder: str, name: str) -> Path | None:
    """The file `name` in the first directory of `folder` that has it."""
    if not name:
        return None
    if IN_COMFYUI:
        full = _folder_paths.get_full_path(folder, name)
        return Path(full) if full else None
    return next((d / name for d in model_dirs(folder) if (d / name).is_file()), None)


def model_path(folder: str, name: str, node: str) -> Path:
    """Full path of a model file, or a FileNotFoundError naming the node, file, folder and source."""
    path = _find_model(folder, name)
    if path is None:
        raise FileNotFoundError(f"{node}: model file {name!r} not found. {folder_hint(folder)}")
    return path


def check_model_file(folder: str, name: str, node: str) -> bool | str:
    """For a loader's VALIDATE_INPUTS: True if the model file exists, else `model_path`'s message. ComfyUI then
    shows that message (where the file goes, where it comes from) instead of its own "Value not in list"."""
    try:
        model_path(folder, name, node)
    except FileNotFoundError as err:
        return str(err)
    return True


def model_fingerprint(folder: str, *names: str, sidecar: str | None = None) -> str:
    """`file_fingerprint` of model files chosen by name (and of each one's `sidecar` suffix file next
    to it, e.g. a checkpoint's .json config), for IS_CHANGED; a missing file gives a value of its own."""
    paths = []
    for name in names:
        path = _find_model(folder, name) or Path(folder) / name
        paths += [path] + ([path.with_suffix(sidecar)] if sidecar else [])
    return file_fingerprint(paths)


def models_root() -> Path:
    """ComfyUI's models/ folder (where optional insightface/ and dlib/ model folders are looked up)."""
    return Path(_folder_paths.models_dir) if IN_COMFYUI else default_models_dir()


def model_dirs(folder: str) -> list[Path]:
    """Every directory of a model folder, in ComfyUI's search order (extra_model_paths.yaml may add several)."""
    if IN_COMFYUI:
        return [Path(p) for p in _folder_paths.get_folder_paths(folder)]
    return [default_models_dir() / folder]


def model_dir(folder: str) -> Path:
    """The first directory of a model folder (where the nodes write: trained models, training checkpoints)."""
    return model_dirs(folder)[0]


def new_model_file(folder: str, name: str, node: str, suffix: str = "", subfolder: str = "") -> Path:
    """Where a node writes `name` (+ `suffix`, added unless `name` ends with it) in the first directory of a
    model folder (in its `subfolder`, if given), resolved; a ValueError naming the node when the name is empty
    or leads out of that folder."""
    root = (model_dir(folder) / subfolder).resolve()
    stem = name.strip().removesuffix(suffix) if suffix else name.strip()
    path = (root / f"{stem}{suffix}").resolve()
    if not stem or root not in path.parents:
        raise ValueError(f"{node}: {name!r} is not a file name inside {root}")
    return path


def find_model_files(folder: str, names: Iterable[str], node: str) -> dict[str, Path]:
    """Each named file from the first directory of `folder` that has it (a set of files such as
    FLAME's may be spread over the directories), or a FileNotFoundError naming the missing ones."""
    found = {name: _find_model(folder, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        searched = ", ".join(str(d) for d in model_dirs(folder))
        raise FileNotFoundError(f"{node}: {', '.join(missing)} not found in {searched}. {folder_hint(folder)}")
    return found


def cache_dir(name: str) -> Path:
    """A folder for our caches (e.g. "albums"), outside every model folder so that no model dropdown lists
    its files: inside ComfyUI its temp directory (emptied when ComfyUI starts), elsewhere
    $COMFY_DIFFUSIONRIG_CACHE or ~/.cache/comfy-diffusionrig."""
    if IN_COMFYUI:
        root = Path(_folder_paths.get_temp_directory()) / "comfy-diffusionrig"
    else:
        default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfy-diffusionrig"
        root = Path(os.environ.get("COMFY_DIFFUSIONRIG_CACHE") or default)
    return root / name


def preview_file(data: bytes, suffix: str) -> dict:
    """Write `data` (a node's preview for the browser) under a name made from its content, in
    cache_dir("previews"), and return where the frontend fetches it: {"filename", "subfolder", "type"} for
    GET /view?type=temp (ComfyUI's temp folder is `cache_dir`'s root there, emptied at start). The same data
    keeps its file: re-runs that do not change it write nothing new."""
    folder = cache_dir("previews")
    name = f"{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
    path = folder / name
    if not path.is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=True, size_hint=len(data))
    return {"filename": name, "subfolder": "comfy-diffusionrig/previews", "type": "temp"}


def file_fingerprint(paths: Iterable[Path]) -> str:
    """Name, size and modification time of each file, for a node's IS_CHANGED: replacing a file under
    the same name changes it, so ComfyUI runs the node again instead of reusing its cached output.
    A missing file gives a value of its own (the node itself then reports it)."""
    parts = []
    for path in paths:
        try:
            stat = Path(path).stat()
            parts.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}|missing")
    return "\n".join(parts)


EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "example_images"
EXAMPLE_PREFIX = "examples/"
IMAGE_SUFFIXES = (*PHOTO_SUFFIXES, ".gif")  # the photos we read, and GIFs as ComfyUI's own Load Image takes them


def _input_dir() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_input_directory())
    return Path(os.environ.get("COMFY_DIFFUSIONRIG_INPUT", "input"))


def _example_files(suffixes: tuple[str, ...]) -> dict[str, Path]:
    """The pack's example files with one of `suffixes`: {name: path}."""
    return {p.name: p for p in sorted(EXAMPLE_IMAGES.iterdir()) if p.is_file() and p.suffix.lower() in suffixes} \
        if EXAMPLE_IMAGES.is_dir() else {}


def input_files(suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Files for a combo input: ComfyUI's input folder, then the pack's example images as examples/<name>."""
    root = _input_dir()
    own = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes) \
        if root.is_dir() else []
    return own + [EXAMPLE_PREFIX + name for name in _example_files(suffixes)]


async def _example_previews(request, handler):
    """aiohttp middleware: the frontend previews a photo picked in Load Face Photo with GET /view?type=input&
    subfolder=<folder>&filename=<name>, and ComfyUI looks in its input folder, where examples/<name> is not (the
    examples stay in the pack; nothing is copied into the input folder). Where ComfyUI answers such a request
    for the examples/ subfolder with 404, answer it with the pack's example image of that name."""
    from aiohttp import web

    response = await handler(request)
    query = request.rel_url.query
    if response.status != 404 or request.method not in ("GET", "HEAD") \
            or request.path not in ("/view", "/api/view") or query.get("type", "output") != "input" \
            or query.get("subfolder") != EXAMPLE_PREFIX.rstrip("/"):
        return response
    path = _example_files(IMAGE_SUFFIXES).get(query.get("filename", ""))
    return web.FileResponse(path) if path is not None else response


def serve_example_previews() -> None:
    """Inside a running ComfyUI server: add `_example_previews` to its aiohttp app (before the server starts,
    i.e. while ComfyUI imports the packs). Nothing to do elsewhere (library use, tests, a script that imports
    ComfyUI's modules without its server)."""
    prompt_server = getattr(sys.modules.get("server"), "PromptServer", None) if IN_COMFYUI else None
    app = getattr(getattr(prompt_server, "instance", None), "app", None)
    if app is not None and not app.frozen:
        from aiohttp import web

        app.middlewares.append(web.middleware(_example_previews))


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
    """Where our models run (ComfyUI's torch device; the CPU outside ComfyUI)."""
    return _mm.get_torch_device() if IN_COMFYUI else torch.device("cpu")


def storage_device() -> torch.device:
    """Where a freshly loaded model's weights go: ComfyUI's offload device, so that loading never needs room
    on a GPU that other models fill (a `ModelHandle` moves the weights to `torch_device` when a node runs the
    model, after ComfyUI has freed what it needs); the CPU outside ComfyUI."""
    return _mm.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def unet_precision(precision: str, parameters: int = 0) -> str | torch.dtype:
    """A loader's `precision` input as the UNet precision to load with.

    Inside ComfyUI, "auto" is ComfyUI's own choice for a diffusion model on its torch device
    (`model_management.unet_dtype`), so its flags apply (--fp32-unet, --bf16-unet, --fp16-unet, --force-fp32,
    --cpu): bf16 on GPUs with native bf16; on GPUs without it fp16 where ComfyUI runs its own models in fp16
    (a `ModelHandle` guards it: a non-finite result runs again in fp32), else fp32. A choice the pack does not
    run (fp8, fp64), or fp16 for the CPU, gives fp32. Outside ComfyUI, "auto" is left to the library
    (`core.devices.resolve_dtype`); parameters: the UNet's parameter count (ComfyUI weighs it against free memory)."""
    if precision != "auto" or _mm is None:
        return precision
    dtype = _mm.unet_dtype(device=torch_device(), model_params=parameters,
                           supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    ours = dtype in (torch.float32, torch.bfloat16, torch.float16)
    if not ours or (dtype == torch.float16 and torch_device().type == "cpu"):
        return torch.float32
    return dtype


class _Holder(torch.nn.Module):
    """What ComfyUI's ModelPatcher holds: our model as a submodule. ModelPatcher writes its bookkeeping
    (`device`, `model_loaded_weight_memory`, ...) onto this holder, so our model's own `device` property keeps
    reading where its weights are, wherever ComfyUI moves them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.held = model


# ComfyUI's log names the class of what it loads and unloads: "Requested to load DiffusionRig"
class DiffusionRig(_Holder):
    """ModelPatcher's holder of a DiffusionRig model."""


class DECA(_Holder):
    """ModelPatcher's holder of DECA (with FLAME and the renderer)."""


_HOLDERS = {cls.__name__: cls for cls in (DiffusionRig, DECA)}


class _Overflow(Exception):
    """An fp16 UNet gave a non-finite output (raised inside the library call, caught by `run_models`)."""


def _model_bytes(model: torch.nn.Module) -> int:
    # all parameters and buffers: DECA's FLAME and renderer tensors are buffers outside its state_dict
    return sum(t.nelement() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class ModelHandle:
    """What the DR_MODEL and DECA_MODEL sockets carry: a model and, inside ComfyUI, its ModelPatcher.

    The model is reached only through `run` (or `run_models`), which loads it first, so no node can run a
    model that ComfyUI has not loaded (as core's `comfy.clip_vision.ClipVisionModel` loads itself in its own
    methods). Outside ComfyUI the model stays where it was loaded and `run` only calls the function."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._patcher = None  # made on first load; made again when the model's size changed (fp32 fallback, Train)

    def __repr__(self) -> str:
        return f"<{type(self._model).__name__} model handle>"

    @property
    def config(self):
        """The model's configuration (a DiffusionRig's UNetConfig: image size, ...); reading it runs nothing."""
        return self._model.config

    def copy(self) -> ModelHandle:
        """A handle of a deep copy of the model, with a ModelPatcher of its own (Train personalizes a copy: the
        loader's cached model stays the base)."""
        return ModelHandle(copy.deepcopy(self._model))

    def run(self, fn, *args, batch: int = 1, training: bool = False, **kwargs):
        """fn(model, *args, **kwargs) once ComfyUI has loaded the model, with room asked for the activations of
        `batch` items (`training`: of a training step); see `run_models`."""
        return run_models(fn, [self], *args, batch=batch, training=training, **kwargs)

    def _load_patcher(self):
        size = _model_bytes(self._model)
        if self._patcher is None or self._patcher.size != size:
            # ComfyUI unloads the stale patcher as a clone of this one (it holds the same module)
            holder = self._patcher.model if self._patcher is not None else \
                _HOLDERS.get(type(self._model).__name__, _Holder)(self._model)
            self._patcher = _model_patcher.ModelPatcher(holder, load_device=_mm.get_torch_device(),
                                                        offload_device=_mm.unet_offload_device(), size=size)
        return self._patcher

    def _guard_fp16(self):
        """A hook that raises _Overflow where an fp16 UNet's output is not finite; None for other models. The
        UNet's last layer (`denoisingUNet.out`) sees every denoiser output, plain and feature-cached."""
        unet = getattr(self._model, "denoisingUNet", None)
        if unet is None or self._model.dtype != torch.float16:
            return None

        def check(module, args, out):
            if not bool(torch.isfinite(out).all()):
                raise _Overflow(self)
        return unet.out.register_forward_hook(check)


def run_models(fn, handles: list[ModelHandle], *args, batch: int = 1, training: bool = False, **kwargs):
    """fn(*models, *args, **kwargs) with the handles' models, once they are loaded (together).

    Inside ComfyUI, `comfy.model_management.load_models_gpu` loads them onto the GPU, offloading other models as
    needed to leave room for the activations of `batch` items (`memory_required`), and lists them among
    ComfyUI's loaded models, so the Free-memory button, --lowvram, --gpu-only and --cpu apply to them like to
    ComfyUI's own. They are loaded whole (force_full_load): our layers are plain torch modules, which ComfyUI
    cannot run half on the GPU; with --novram ComfyUI keeps the weights on the CPU and the models run there.

    An fp16 UNet whose output is not finite (fp16 tops out at 65504) is cast to fp32 for good and fn runs
    again from the start, with a one-line warning."""
    while True:
        if _mm is not None:  # inside ComfyUI (its model management)
            memory = sum(h._model.activation_bytes(batch, training=training) for h in handles)
            _mm.load_models_gpu([h._load_patcher() for h in handles], memory_required=memory, force_full_load=True)
        guards = [g for g in (h._guard_fp16() for h in handles) if g is not None]
        try:
            return fn(*(h._model for h in handles), *args, **kwargs)
        except _Overflow as overflow:
            model = overflow.args[0]._model
            log.warning("%s: the fp16 UNet overflowed (inf or NaN); running again in fp32, and keeping this model "
                        "in fp32 (load it with precision bf16 or fp32 to skip the fp16 try)", type(model).__name__)
            model.denoisingUNet.to(torch.float32)
        finally:
            for guard in guards:
                guard.remove()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed cancel (no-op outside ComfyUI)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


def progress_callback(stages: tuple[str, ...] | None = None):
    """The library's progress protocol (`comfy_diffusionrig.core.progress`) as ComfyUI's, for a node to pass
    as a library function's callback: every call raises ComfyUI's interrupt when the user pressed cancel
    (so the work stops within one step), then moves one ComfyUI progress bar, made on the first call with
    that call's total, and shows its `preview` (one image [3, H, W] in [-1, 1]) on the node. stages: only
    calls of these stages move the bar. Outside ComfyUI: no bar, no cancel."""
    bar = []

    def callback(done: int, total: int, stage: str | None = None, preview: torch.Tensor | None = None, **_):
        check_interrupt()
        if not IN_COMFYUI or (stages is not None and stage not in stages):
            return
        if not bar:
            bar.append(_comfy_utils.ProgressBar(total))
        bar[0].update_absolute(done, total, None if preview is None else ("JPEG", tensor_to_pil(preview), 512))
    return callback


def image_to_unit(image: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> [B, 3, H, W] float32 in 0..1 (alpha dropped, grey expanded).

    One clear error, naming the node, for what an IMAGE cannot be: another rank, an empty batch,
    2 or 5+ channels, NaN or infinite values.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: expected an IMAGE batch [B, H, W, C], got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{node}: the IMAGE batch is empty ({tuple(image.shape)}); connect a node that gives at "
                         "least one image")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"{node}: expected 1 (grey), 3 (RGB) or 4 (RGBA) colour channels, got {channels}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{node}: the IMAGE holds NaN or infinite values; re-run the node that produced it")
    return image.permute(0, 3, 1, 2).float()


def image_to_model(image: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> [B, 3, H, W] in [-1, 1] (see `image_to_unit`)."""
    return image_to_unit(image, node) * 2 - 1


def image_to_pil(image: torch.Tensor, node: str) -> list:
    """ComfyUI IMAGE -> RGB PIL images (see `image_to_unit`)."""
    return [tensor_to_pil(x, low=0.0) for x in image_to_unit(image, node)]


def pil_to_image(pictures) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE [B, H, W, 3] float32 in 0..1."""
    return pil_to_tensor(pictures).permute(0, 2, 3, 1).contiguous()


def unit_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ComfyUI IMAGE [B, H, W, 3] in 0..1 (clamped), float32 on the CPU."""
    return x.float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [B, H, W, 3] in 0..1, float32 on the CPU."""
    return unit_to_image((x.float().clamp(-1, 1) + 1) / 2)

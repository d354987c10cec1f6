"""Photo in, edited photo out: the whole DiffusionRig edit as one function (for the CLI and benchmarks).

align -> DECA fit -> edit the rig -> render buffers -> global code -> DDIM inversion of the
photo under its own buffers -> DDIM under the edited buffers -> paste back into the photo.
The ComfyUI nodes run the same library calls one node at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .photo.alignment import align_faces

from .photo.paste import DEFAULT_DETAIL, DEFAULT_DETAIL_RADIUS, check_detail, paste_back
from .model.checkpoints import CHECKPOINT_SUFFIXES
from .model.lora import is_lora_file, load_with_lora
from .face.deca import load_deca
from .editing import check_edit_settings, edit_faces, encode_faces
from .core.conventions import default_models_dir
from .core.imaging import pil_to_tensor, tensor_to_pil
from .core.progress import Callback
from .face.motion import rig_motion
from .face.rig import FaceRig, fit_faces, render_layers, render_rig, stack_buffers
from .face.rig_files import rig_ready

Edit = Callable[[FaceRig], FaceRig]


def _lora_path(models_dir: Path, name: str) -> Path:
    path = Path(name) if Path(name).is_file() else models_dir / "diffusionrig" / name
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {name} not found (as a path, or in {models_dir / 'diffusionrig'}/)")
    if not is_lora_file(path):
        raise ValueError(f"{path} is not a DiffusionRig LoRA (Save DiffusionRig Model of a LoRA-trained model "
                         "writes one); give a full model with --checkpoint instead")
    return path


@dataclass
class Models:
    diffusionrig: torch.nn.Module
    deca: torch.nn.Module
    root: Path | None = None  # the models folder (optional insightface/ and dlib/ models are looked up there)


def find_checkpoint(models_dir: str | Path, name: str | None = None) -> Path:
    """models_dir/diffusionrig/<name>, or the only / first checkpoint there (real checkpoints first, then the
    official-size stand-in of demo-assets, then the demo's small models trained on synthetic faces). LoRA files
    are not checkpoints (they apply on top of one: `load_models(lora=...)`)."""
    folder = Path(models_dir) / "diffusionrig"
    found = sorted((p for p in folder.glob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and not is_lora_file(p)),
                   key=lambda p: ("synthetic" in p.name, "synthetic_demo" in p.name, p.name)) \
        if folder.is_dir() else []
    if name:
        path = folder / name if not Path(name).is_file() else Path(name)
        if not path.is_file():
            there = (f"the checkpoints there are: {', '.join(p.name for p in found)}" if found
                     else "there is no checkpoint there yet")
            raise FileNotFoundError(f"DiffusionRig checkpoint {path} not found; put it in {folder}/ ({there})")
        return path
    if not found:
        raise FileNotFoundError(
            f"no DiffusionRig checkpoint in {folder}/: put the official stage-1 model.pt (or a personalized "
            "model) there, or run `comfy-diffusionrig demo-assets --out models` for synthetic stand-ins")
    return found[0]


def load_models(models_dir: str | Path | None = None, checkpoint: str | None = None,
                deca_file: str = "deca_model.tar", device="cpu", dtype="auto", backend: str = "auto",
                lora: str | None = None, lora_strength: float = 1.0) -> Models:
    """DiffusionRig + DECA from a ComfyUI-style models folder (diffusionrig/, deca/, flame/).

    lora: a LoRA file (a path, or a name in models_dir/diffusionrig/) merged into the checkpoint at
    lora_strength (`model.lora.load_with_lora`)."""
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    lora_path = None if lora is None else _lora_path(root, lora)
    model = load_with_lora(find_checkpoint(root, checkpoint), lora_path, lora_strength, device=device, dtype=dtype)
    deca = load_deca(root / "deca" / deca_file, root / "flame", device=device, backend=backend)
    return Models(model, deca, root)


def _align_and_fit(models: Models, photo: Image.Image, faces: str, detector: str,
                   lap: Callable[[str], None] = lambda stage: None):
    """(aligned faces, their images [N, 3, S, S] in [0, 1], their fitted rig) at the model's size;
    lap("align") and lap("fit") mark the end of each stage."""
    size = models.diffusionrig.config.image_size
    aligned = align_faces(photo, mode=faces, size=size, detector=detector, models_dir=models.root)
    lap("align")
    images = pil_to_tensor([a.image for a in aligned])
    rig = fit_faces(models.deca, images, np.stack([a.landmarks for a in aligned]))
    lap("fit")
    return aligned, images, rig


def fit_photo(models: Models, photo: Image.Image, faces: str = "largest", detector: str = "hog") -> FaceRig:
    """The fitted rig of a photo's face(s) (e.g. a reference to copy light or expression from)."""
    return _align_and_fit(models, photo, faces, detector)[2]


@dataclass
class EditResult:
    photos: list[Image.Image]  # the original photo with the edit pasted in, one per rig frame
    faces: list[Image.Image]  # the edited aligned faces (face-major: every frame of face 1, then of face 2, ...)
    seconds: dict[str, float] = field(default_factory=dict)
    aligned: list[Image.Image] = field(default_factory=list)  # the photo's aligned faces before the edit
    buffers: torch.Tensor | None = None  # the edited rig's buffers [N*F, 9, S, S], face-major
    coverage: torch.Tensor | None = None  # where the renderer drew the face in them [N*F, 1, S, S]
    lights: torch.Tensor | None = None  # the edited rig's SH lights [N*F, 9, 3]


def edit_photo(models: Models, photo: Image.Image, edit: Edit, steps: int = 20, seed: int = 0,
               start: str = "inversion", faces: str = "largest", detector: str = "hog",
               color_match: bool = False, batch_size: int = 4, eta: float = 0.0,
               callback: Callback | None = None, sampler: str = "ddim",
               cache_interval: int = 1, rig: FaceRig | None = None, detail: str = DEFAULT_DETAIL,
               detail_radius: float = DEFAULT_DETAIL_RADIUS) -> EditResult:
    """Edit the face(s) of one photo; `edit` maps the fitted rig (one row per face) to the edited rig.

    An edit may return F rows per face (a sweep: face-major, as `rig.sweep` makes them), giving
    one output photo per frame. start "inversion" keeps the photo's background and details
    (each face DDIM-inverted under its own buffers), "noise" samples from seeded noise; the
    denoising is `edit_faces` (with its sampler and cache_interval). callback(done, total, preview=)
    counts face-steps of inversion and sampling (`core.progress`, as `edit_faces`). rig: the photo's
    known rig (a rigged photo, see `rig_files`):
    the photo is then the aligned face itself, and alignment, fitting and pasting back are skipped.
    detail, detail_radius: how the edit goes back into the photo (`photo.paste.paste_back`); with the
    photo's own detail ("ratio", "difference") a face the edit moved takes its detail along (`rig_motion`).
    """
    check_edit_settings(start, steps, eta, batch_size, sampler, cache_interval)
    check_detail(detail, detail_radius)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock[0]
        clock[0] = now

    model, deca = models.diffusionrig, models.deca
    if rig is None:
        aligned, images, rig = _align_and_fit(models, photo, faces, detector, lap)
    else:
        rig_ready(rig, model.config.image_size, "the photo")
        aligned, images = None, pil_to_tensor([photo])
    edited = edit(rig)
    n_faces = len(rig)
    if len(edited) % n_faces:
        raise ValueError(f"the edit returned {len(edited)} rigs for {n_faces} faces")
    frames = len(edited) // n_faces
    source_buffers = render_rig(deca, rig)
    target = render_layers(deca, edited)
    target_buffers = stack_buffers(target)
    lap("render")
    x = images * 2 - 1
    code = encode_faces(model, x)
    lap("encode")
    result = edit_faces(model, x, source_buffers, target_buffers, code, start=start, steps=steps, eta=eta, seed=seed,
                        batch_size=batch_size, sampler=sampler, cache_interval=cache_interval,
                        callback=callback)
    lap("denoise")
    edited_faces = [tensor_to_pil(f) for f in result]
    if aligned is None:  # a rigged photo is its own aligned face
        photos, originals = edited_faces, [photo]
    else:
        motion = rig_motion(deca, rig, edited) if detail != "edit" else [None] * len(edited)
        photos = [paste_back(photo, aligned, edited_faces[k::frames], color_match=color_match, detail=detail,
                             detail_radius=detail_radius, motion=motion[k::frames]) for k in range(frames)]
        originals = [a.image for a in aligned]
    lap("paste")
    return EditResult(photos, edited_faces, seconds, originals, target_buffers, target["alpha"],
                      edited.codes["light"])

"""A personal album: one person's aligned photos with their rendered buffers, ready for stage 2.

Built albums are cached on disk under a key of everything that changes the result (photos,
names, settings, DECA and FLAME data). The cache is only a cache: an entry that cannot be
read, or whose content does not match its checksum, is a miss that is rebuilt and replaced,
and a cache write that fails only warns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model.checkpoints import atomic_write
from ..core.errors import ModelFileError, unreadable
from ..core.imaging import pil_to_tensor
from ..core.progress import Callback, notify
from .loop import TrainingData

ALBUM_FORMAT = "comfy-diffusionrig-album-v2"


class AlbumFileError(ModelFileError):
    """An album file that cannot be used (not an album, damaged, or unreadable)."""


@dataclass
class Album:
    """images [N, 3, S, S] in [-1, 1]; buffers [N, 9, S, S] rendered|normal|albedo (the mean shape's).

    names: where each photo came from; warnings: photos left out or doubtful, for the user.
    codes: the DECA codes of every photo (shape replaced by the album's mean shape).
    """

    images: torch.Tensor
    buffers: torch.Tensor
    names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def training_data(self) -> TrainingData:
        return TrainingData(self.images, self.buffers)


MIN_PHOTOS = 8  # below this, personalization overfits quickly (the paper uses about 20)


def album_key(photos: list[Image.Image], names: list[str], size: int, detector: str, check_identity: bool,
              deca) -> str:
    """Content key of an album: the photos' pixels and names, the settings, DECA's weights and its
    FLAME data (mesh, landmarks, texture) and renderer backend."""
    settings = {"size": size, "detector": detector, "check_identity": check_identity, "names": list(names),
                "backend": getattr(getattr(deca, "renderer", None), "backend", None)}
    digest = hashlib.sha256(f"album-v2|{json.dumps(settings, sort_keys=True)}|".encode())
    for photo in photos:
        rgb = photo.convert("RGB")
        digest.update(f"{rgb.size}".encode())
        digest.update(rgb.tobytes())
    # named_buffers: the FLAME data is held in non-persistent buffers, outside state_dict()
    for name, value in [*deca.state_dict().items(), *deca.named_buffers()]:
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _checksum(state: dict) -> str:
    """sha256 of everything an album file holds but the checksum itself."""
    digest = hashlib.sha256(json.dumps([state["format"], state["names"], state["warnings"]]).encode())
    tensors = [("images", state["images"]), ("buffers", state["buffers"]),
               *sorted((f"codes.{k}", v) for k, v in state["codes"].items())]
    for name, tensor in tensors:
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_album(album: Album, path: str | Path) -> Path:
    """Write an album atomically as a weights-only torch file (tensors, strings, lists) with a checksum."""
    state = {"format": ALBUM_FORMAT, "images": album.images, "buffers": album.buffers, "names": list(album.names),
             "warnings": list(album.warnings), "codes": dict(album.codes)}
    state["sha256"] = _checksum(state)
    return atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def read_album(path: str | Path) -> Album:
    """An album written by `save_album`; `AlbumFileError` when the file is not one or is damaged."""
    path = Path(path)
    advice = "delete it; building the album again writes a new one"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, zero-length, garbage, another format
        raise unreadable(AlbumFileError, path, f"not a readable album file ({type(err).__name__})", advice) from err
    if not isinstance(state, dict) or state.get("format") != ALBUM_FORMAT:
        raise AlbumFileError(f"{path} is not a face album written by this version of comfy-diffusionrig; {advice}",
                             path)
    try:
        valid = (all(isinstance(state[k], torch.Tensor) for k in ("images", "buffers"))
                 and all(isinstance(state[k], list) and all(isinstance(t, str) for t in state[k])
                         for k in ("names", "warnings"))
                 and isinstance(state["codes"], dict)
                 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["codes"].items())
                 and state.get("sha256") == _checksum(state))
    except (KeyError, TypeError, RuntimeError) as err:
        raise AlbumFileError(f"{path}: the album file is incomplete ({err}); {advice}", path) from err
    if not valid:
        raise AlbumFileError(f"{path}: the album's content does not match its checksum (the file is damaged); "
                             f"{advice}", path)
    return Album(state["images"], state["buffers"], state["names"], state["warnings"], state["codes"])


def _read_cached(path: Path) -> Album | None:
    """The cached album at `path`, or None (a miss) when there is none or it cannot be used."""
    if not path.is_file():
        return None
    try:
        return read_album(path)
    except (AlbumFileError, OSError) as err:
        warnings.warn(f"album cache entry ignored and rebuilt: {err}", stacklevel=3)
        return None


def _write_cached(album: Album, path: Path) -> None:
    """Best effort: a cache that cannot be written costs a rebuild next time, never this build."""
    try:
        save_album(album, path)
    except (OSError, RuntimeError) as err:  # full disk, read-only folder, torch's writer errors
        warnings.warn(f"could not write the album cache {path} ({err}); the album is fine and will be built "
                      "again next time", stacklevel=3)


def build_album(photos: list[Image.Image], deca, names: list[str] | None = None, size: int = 256,
                detector: str = "hog", check_identity: bool = True, cache_dir: str | Path | None = None,
                progress: Callback | None = None) -> Album:
    """One person's photos -> an Album: detect and align the largest face of each, fit DECA, give every
    fit the album's mean shape (official create_data.py --use_meanshape), render the buffers.

    Photos with no face, or (check_identity) whose face is not the album's person by the dlib
    identity score, are left out with a warning; so is an album too small to personalize.
    cache_dir: albums are stored there under a content key and reused when the same photos,
    names, settings and DECA come again; an unreadable or damaged entry is rebuilt and replaced.
    progress(done, total) (`core.progress`): one unit per photo aligned, then the fit, then the render.
    """
    from ..photo.alignment import align_face
    from ..photo.identity import DLIB_DISTANCE_THRESHOLD, face_descriptor
    from ..face.rig import fit_faces, render_rig

    names = list(names) if names else [f"photo {i + 1}" for i in range(len(photos))]
    if len(names) != len(photos):
        raise ValueError(f"{len(photos)} photos but {len(names)} names")
    if not photos:
        raise ValueError("the album is empty: give the photos of one person (about 20 work best)")
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"album_{album_key(photos, names, size, detector, check_identity, deca)}.pt"
        album = _read_cached(cached)
        if album is not None:
            return album
    report = functools.partial(notify, progress)
    warnings, kept, aligned = [], [], []
    for i, (photo, name) in enumerate(zip(photos, names)):
        try:
            aligned.append(align_face(photo, size=size, detector=detector))
            kept.append(i)
        except ValueError as err:
            warnings.append(f"{name}: left out, {err}")
        report(i + 1, len(photos) + 2)
    if check_identity and len(kept) >= 3:
        descriptors = np.stack([face_descriptor(photos[i], face=a.face) for i, a in zip(kept, aligned)])
        distances = np.linalg.norm(descriptors[:, None] - descriptors[None], axis=-1)
        typical = np.nanmedian(np.where(np.eye(len(kept), dtype=bool), np.nan, distances), axis=1)
        other = typical > DLIB_DISTANCE_THRESHOLD
        for j in np.flatnonzero(other):
            warnings.append(f"{names[kept[j]]}: left out, its face looks like another person (median identity "
                            f"distance {typical[j]:.2f} to the album, same-person threshold "
                            f"{DLIB_DISTANCE_THRESHOLD})")
        kept = [k for k, o in zip(kept, other) if not o]
        aligned = [a for a, o in zip(aligned, other) if not o]
    if not kept:
        raise ValueError("no usable face in the album's photos: " + "; ".join(warnings))
    if len(kept) < MIN_PHOTOS:
        warnings.append(f"only {len(kept)} usable photo(s): personalization works best with about 20 photos of "
                        "the person under varied light, expression and pose")
    images = pil_to_tensor([a.image for a in aligned])
    rig = fit_faces(deca, images, np.stack([a.landmarks for a in aligned]))
    report(len(photos) + 1, len(photos) + 2)
    mean_shape = rig.codes["shape"].mean(0, keepdim=True).expand_as(rig.codes["shape"]).clone()
    rig = rig.with_codes(shape=mean_shape)
    buffers = render_rig(deca, rig)
    report(len(photos) + 2, len(photos) + 2)
    album = Album(images * 2 - 1, buffers, [names[k] for k in kept], warnings, dict(rig.codes))
    if cached is not None:
        _write_cached(album, cached)
    return album

"""Training datasets on disk: what `prepare-data` writes and `train --data` reads.

A dataset is a folder of safetensors shards and an `index.json`:
    shard-00000.safetensors  "images" uint8 [n, 3, H, W] (0..255), "buffers" float16 [n, 9, H, W]
                             (rendered|normal|albedo, as buffers.py draws them)
    index.json               {"format", "version", "image_size", "shards": [{"file", "count"}]}
A shard is written atomically, so a listed shard is always whole; `index.json` is rewritten
after each shard. uint8 images and fp16 buffers hold a 256 px face in 1.4 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model.checkpoints import atomic_write
from .loop import TrainingData

DATASET_FORMAT = "comfy-diffusionrig-dataset"
INDEX = "index.json"


class DatasetError(ValueError):
    """A dataset folder that cannot be read (missing index, shard or tensors)."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def write_shard(folder: str | Path, name: str, images: torch.Tensor, buffers: torch.Tensor) -> Path:
    """Write one shard atomically. images [n, 3, H, W] uint8 or float in [-1, 1]; buffers [n, 9, H, W]."""
    from safetensors.torch import save_file

    if images.is_floating_point():
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    tensors = {"images": images.contiguous().cpu(), "buffers": buffers.to(torch.float16).contiguous().cpu()}
    path = Path(folder) / name
    return atomic_write(path, lambda tmp: save_file(tensors, tmp), overwrite=True)


def write_index(folder: str | Path, shards: list[dict], image_size: int) -> Path:
    """shards: [{"file": name, "count": n}] in order."""
    index = {"format": DATASET_FORMAT, "version": 1, "image_size": image_size, "shards": shards}
    text = json.dumps(index, indent=1)
    return atomic_write(Path(folder) / INDEX, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def write_dataset(folder: str | Path, images: torch.Tensor, buffers: torch.Tensor, shard_size: int = 1024) -> Path:
    """Write tensors (images [N, 3, H, W] in [-1, 1] or uint8, buffers [N, 9, H, W]) as a dataset folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, images.shape[0], shard_size)):
        name = shard_name(number)
        write_shard(folder, name, images[start:start + shard_size], buffers[start:start + shard_size])
        shards.append({"file": name, "count": min(shard_size, images.shape[0] - start)})
    return write_index(folder, shards, images.shape[-1])


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{folder} is not a dataset: it has no {INDEX}; make one with "
                           "`comfy-diffusionrig prepare-data PHOTOS --out DATASET`") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read {path} ({err}); run prepare-data again to rewrite it") from err
    if index.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path} is not a comfy-diffusionrig dataset index")
    return index


def load_dataset(folder: str | Path) -> TrainingData:
    """Every shard of the dataset as one TrainingData, as stored (images uint8, buffers fp16): the training loop
    converts each batch, so memory is 21 bytes per pixel instead of 48 in float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    images, buffers = [], []
    for shard in read_index(folder)["shards"]:
        path = folder / shard["file"]
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise DatasetError(f"cannot read the shard {path} ({type(err).__name__}: {err}); run prepare-data "
                               "again: it rewrites missing or broken shards") from err
        if tensors["images"].shape[0] != shard["count"]:
            raise DatasetError(f"{path} holds {tensors['images'].shape[0]} faces but {INDEX} lists {shard['count']}")
        images.append(tensors["images"])
        buffers.append(tensors["buffers"])
    if not images:
        raise DatasetError(f"the dataset {folder} has no faces")
    return TrainingData(torch.cat(images), torch.cat(buffers))

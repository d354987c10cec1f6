"""Damaged files never crash a loader: seeded mutations of small valid files of every format.

Each loader gets its valid file cut short, with flipped bytes, zeroed ranges and an edited
header, plus a Git LFS pointer, a web page, an empty file, the other loaders' files and a
valid file holding NaN/inf. Every case must either load with finite numbers or raise the
loader's own `ModelFileError` subclass naming the file, within a per-case time bound.

`python tests/test_fuzz.py [N [SEED]]` runs N random mutations per loader (default 300) and
prints the outcome counts; the test runs a few dozen per loader.
"""

from __future__ import annotations

import collections
import io
import math
import random
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from comfy_diffusionrig.demo import synthetic
from comfy_diffusionrig.train.album import Album, AlbumFileError, read_album, save_album
from comfy_diffusionrig.model.checkpoints import CheckpointError, read_state_dict
from comfy_diffusionrig.face.deca import DecaAssetError, _read_e_flame
from comfy_diffusionrig.core.errors import ModelFileError
from comfy_diffusionrig.face.flame import load_flame_texture
from comfy_diffusionrig.face.flame_files import FlameAssetError, read_flame_model, read_landmark_embedding, read_obj
from comfy_diffusionrig.model.lora import read_lora

SEED = 1234
CI_MUTATIONS = 24  # random mutations per loader in the suite (plus the fixed cases)
CASE_SECONDS = 20  # per-case bound: generous for a loaded 2-core CI machine, far below a hang
KINDS = ("truncate", "flip", "zero", "header")
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 123456789\n"
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no loader's `except Exception` can swallow it."""


@contextmanager
def _time_bound(seconds: int):
    def alarm(signum, frame):
        raise _Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ small valid files


def _tiny_head() -> dict[str, np.ndarray]:
    """A FLAME-layout cube: 8 vertices, 12 faces, FLAME's 5 joints and 400 shape components."""
    rng = np.random.default_rng(0)
    verts = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64) * 0.1
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.uint32)
    weights = rng.random((8, 5))
    regressor = rng.random((5, 8))
    return {
        "f": faces, "v_template": verts, "shapedirs": rng.normal(0, 1e-3, (8, 3, 400)),
        "posedirs": rng.normal(0, 1e-3, (8, 3, 36)), "J_regressor": regressor / regressor.sum(1, keepdims=True),
        "J": rng.random((5, 3)), "kintree_table": np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "weights": weights / weights.sum(1, keepdims=True), "vt": rng.random((10, 2)),
        "ft": rng.integers(0, 10, (12, 3)),
        "static_lmk_faces_idx": rng.integers(0, 12, 51), "static_lmk_bary_coords": rng.dirichlet([1, 1, 1], 51),
        "dynamic_lmk_faces_idx": rng.integers(0, 12, (79, 17)),
        "dynamic_lmk_bary_coords": rng.dirichlet([1, 1, 1], (79, 17)),
        "full_lmk_faces_idx": rng.integers(0, 12, (1, 68)), "full_lmk_bary_coords": rng.dirichlet([1, 1, 1], (1, 68)),
    }


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _safetensors_bytes(tensors: dict, metadata: dict, folder: Path) -> bytes:
    path = folder / "tmp.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path.read_bytes()


def _npy_object_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(obj, dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _npz_bytes(arrays: dict, compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


class Loader:
    """name, file name, the loader's error type, a reader, its valid bytes and a NaN-holding variant.

    checksummed: whatever loads must equal the valid file's content.
    """

    def __init__(self, name, filename, error, read, valid: bytes, nonfinite: bytes | None, checksummed=False):
        self.name, self.filename, self.error, self.read = name, filename, error, read
        self.valid, self.nonfinite, self.checksummed = valid, nonfinite, checksummed


def _loaders(folder: Path) -> list[Loader]:
    head = _tiny_head()
    g = torch.Generator().manual_seed(0)
    state = {"denoisingUNet.out.2.weight": torch.randn(3, 8, 3, 3, generator=g),
             "denoisingUNet.out.2.bias": torch.zeros(3), "encoder.bn1.num_batches_tracked": torch.tensor(4)}
    nan_state = dict(state, **{"denoisingUNet.out.2.bias": torch.tensor([0.0, float("nan"), 0.0])})
    config = '{"image_size": 32, "num_channels": 32, "channel_mult": [1, 2]}'
    lora_meta = {"format": "comfy-diffusionrig-lora", "rank": "2", "alpha": "2.0", "targets": '["attention"]',
                 "base_config": '{"image_size": 32, "num_channels": 32, "channel_mult": [1, 2]}'}
    lora = {"denoisingUNet.middle_block.1.qkv.lora_down.weight": torch.randn(2, 8, 1, generator=g),
            "denoisingUNet.middle_block.1.qkv.lora_up.weight": torch.zeros(24, 2, 1)}
    bad_head = dict(head, shapedirs=head["shapedirs"].copy())
    bad_head["shapedirs"][3, 1, 7] = np.inf
    embedding = synthetic._landmark_embedding(head)
    bad_embedding = dict(embedding, full_lmk_bary_coords=embedding["full_lmk_bary_coords"].copy())
    bad_embedding["full_lmk_bary_coords"][0, 5, 1] = np.nan
    texture = {"mean": np.random.default_rng(1).random((4, 4, 3)) * 255,
               "tex_dir": np.random.default_rng(2).normal(0, 10, (4, 4, 3, 50))}
    bad_texture = dict(texture, mean=texture["mean"].copy())
    bad_texture["mean"][1, 2, 0] = np.nan
    obj = synthetic._obj_text(head)
    e_flame = {"encoder.conv1.weight": torch.randn(4, 3, 3, 3, generator=g), "layers.0.weight": torch.randn(4, 4),
               "encoder.bn1.num_batches_tracked": torch.tensor(0)}
    expected = {k: torch.empty_like(v) for k, v in e_flame.items()}
    album = Album(torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 9, 8, 8), ["a", "b"], ["w"],
                  {"shape": torch.zeros(2, 100)})
    save_album(album, folder / "album.pt")
    return [
        Loader("checkpoint .pt", "model.pt", CheckpointError, read_state_dict, _torch_bytes({"state_dict": state}),
               _torch_bytes(nan_state)),
        Loader("checkpoint .safetensors", "model.safetensors", CheckpointError, read_state_dict,
               _safetensors_bytes(state, {"format": "comfy-diffusionrig", "config": config}, folder),
               _safetensors_bytes(nan_state, {"format": "comfy-diffusionrig", "config": config}, folder)),
        Loader("LoRA .safetensors", "lora.safetensors", CheckpointError, read_lora,
               _safetensors_bytes(lora, lora_meta, folder),
               _safetensors_bytes({k: v.clone().fill_(math.inf) for k, v in lora.items()}, lora_meta, folder)),
        Loader("generic_model.pkl", "generic_model.pkl", FlameAssetError, read_flame_model,
               synthetic._flame_pickle_bytes(head), synthetic._flame_pickle_bytes(bad_head)),
        Loader("landmark_embedding.npy", "landmark_embedding.npy", FlameAssetError, read_landmark_embedding,
               _npy_object_bytes(embedding), _npy_object_bytes(bad_embedding)),
        Loader("FLAME_texture.npz (stored)", "FLAME_texture.npz", FlameAssetError, load_flame_texture,
               _npz_bytes(texture, False), _npz_bytes(bad_texture, False)),
        Loader("FLAME_texture.npz (compressed)", "FLAME_texture.npz", FlameAssetError, load_flame_texture,
               _npz_bytes(texture, True), _npz_bytes(bad_texture, True)),
        Loader("head_template.obj", "head_template.obj", FlameAssetError,
               lambda path: read_obj(path, n_vertices=8, n_faces=12), obj.encode(),
               obj.replace("vt ", "vt nan ", 1).encode()),
        Loader("deca_model.tar", "deca_model.tar", DecaAssetError, lambda path: _read_e_flame(path, expected),
               _torch_bytes({"E_flame": e_flame, "E_detail": {}}),
               _torch_bytes({"E_flame": dict(e_flame, **{"layers.0.weight": torch.full((4, 4), math.nan)})})),
        Loader("album cache .pt", "album_0123.pt", AlbumFileError, read_album, (folder / "album.pt").read_bytes(),
               None, checksummed=True),
    ]


# ------------------------------------------------------------------ mutations


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[:rng.randrange(len(out))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        start = rng.randrange(len(out))
        length = rng.randint(1, max(1, min(4096, len(out) // 8)))
        out[start:start + length] = bytes(len(out[start:start + length]))
    elif kind == "header":  # the first bytes hold magic numbers, lengths and headers in every format here
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(min(len(out), 256))] = rng.randrange(256)
    return bytes(out)


def cases(loader: Loader, loaders: list[Loader], n_random: int, seed: int):
    """(label, bytes) for the fixed cases and `n_random` seeded mutations of the valid file."""
    yield "valid", loader.valid
    yield "LFS pointer", LFS
    yield "web page", HTML
    yield "empty", b""
    for other in loaders:
        if Path(other.filename).suffix != Path(loader.filename).suffix:
            yield f"wrong format ({other.name})", other.valid
    if loader.nonfinite is not None:
        yield "NaN/inf injected", loader.nonfinite
    rng = random.Random(f"{seed}|{loader.name}")
    for i in range(n_random):
        kind = KINDS[i % len(KINDS)]
        yield kind, mutate(loader.valid, kind, rng)


def _finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not (obj.is_floating_point() or obj.is_complex()) or bool(torch.isfinite(obj).all())
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind not in "fc" or bool(np.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    if isinstance(obj, torch.nn.Module):
        return all(_finite(b) for b in obj.buffers())
    if isinstance(obj, Album):
        return _finite([obj.images, obj.buffers, obj.codes])
    return True


def _same(a, b) -> bool:
    if isinstance(a, Album):
        return _same([a.images, a.buffers, a.names, a.warnings, a.codes], [b.images, b.buffers, b.names, b.warnings,
                                                                             b.codes])
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def run_case(loader: Loader, data: bytes, folder: Path) -> str:
    """"loaded" or "refused"; raises AssertionError for any other outcome."""
    path = folder / loader.filename
    path.write_bytes(data)
    try:
        with _time_bound(CASE_SECONDS):
            result = loader.read(path)
    except loader.error as err:
        assert str(path) in str(err), f"{loader.name}: the message does not name the file: {err}"
        assert err.path is not None and Path(err.path) == path, f"{loader.name}: error.path is {err.path}"
        return "refused"
    except ModelFileError as err:
        raise AssertionError(f"{loader.name}: {type(err).__name__} instead of {loader.error.__name__}: {err}")
    except _Hang as err:
        raise AssertionError(f"{loader.name}: {err}") from None
    except Exception as err:
        raise AssertionError(f"{loader.name}: crashed with {type(err).__name__}: {str(err)[:300]}") from err
    assert _finite(result), f"{loader.name}: NaN or infinite values loaded"
    if loader.checksummed:
        path.write_bytes(loader.valid)
        assert _same(result, loader.read(path)), f"{loader.name}: a damaged file loaded with other content"
    return "loaded"


def fuzz(folder: Path, n_random: int, seed: int = SEED) -> dict[str, collections.Counter]:
    """Run every case of every loader; returns {loader: Counter of (case kind, outcome)}."""
    loaders = _loaders(folder)
    counts = {}
    for loader in loaders:
        counter = collections.Counter()
        for label, data in cases(loader, loaders, n_random, seed):
            outcome = run_case(loader, data, folder)
            if label in ("valid",):
                assert outcome == "loaded", f"{loader.name}: its valid file was refused"
            if label in ("LFS pointer", "web page", "empty", "NaN/inf injected") or label.startswith("wrong"):
                assert outcome == "refused", f"{loader.name}: {label} was loaded"
            counter[(label.split(" (")[0], outcome)] += 1
        counts[loader.name] = counter
    return counts


needs_alarm = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the per-case time bound uses SIGALRM")


@needs_alarm
def test_damaged_files_raise_the_loaders_own_error(tmp_path):
    counts = fuzz(tmp_path, CI_MUTATIONS)
    assert len(counts) == 10
    for name, counter in counts.items():
        assert sum(counter.values()) >= CI_MUTATIONS + 5, name
        # truncation leaves an unusable file in every format here (lengths, end records, checksums; a text
        # file cut short lacks its final line break or faces)
        assert counter[("truncate", "refused")] == CI_MUTATIONS // len(KINDS), name


def test_lfs_pointer_and_web_page_messages(tmp_path):
    loaders = _loaders(tmp_path)
    for loader in loaders:
        for data, advice in ((LFS, "git lfs pull"), (HTML, "a web page")):
            path = tmp_path / loader.filename
            path.write_bytes(data)
            with pytest.raises(loader.error, match=advice) as err:
                loader.read(path)
            assert "would run code" not in str(err.value), loader.name


@needs_alarm
def test_time_bound_is_not_swallowed_by_the_loaders(tmp_path, monkeypatch):
    """The per-case bound works even through a loader's `except Exception`."""
    def hangs(*args, **kwargs):
        while True:
            pass

    monkeypatch.setattr(torch, "load", hangs)
    loader = _loaders(tmp_path)[0]
    monkeypatch.setattr(sys.modules[__name__], "CASE_SECONDS", 1)
    with pytest.raises(AssertionError, match="still running after 1 s"):
        run_case(loader, loader.valid, tmp_path)


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else SEED
    with tempfile.TemporaryDirectory() as folder:
        for name, counter in fuzz(Path(folder), n, seed).items():
            total = sum(counter.values())
            by_kind = ", ".join(f"{kind} {outcome} {count}" for (kind, outcome), count in sorted(counter.items()))
            print(f"{name}: {total} cases; {by_kind}")

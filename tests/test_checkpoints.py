"""Checkpoint loading/saving: official layout, wrappers, safetensors, and refusing bad files."""

import errno
import json
import os
import pickle
import shutil
import stat
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfy_diffusionrig import load_diffusionrig, save_diffusionrig
from comfy_diffusionrig.model.checkpoints import (
    CheckpointError,
    DiskFullError,
    atomic_write,
    infer_encoder_type,
    read_state_dict,
    remove_stale_temp_files,
)
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

from conftest import reference_file

TINY_CFG = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                num_head_channels=16, dropout=0.0)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return DiffusionRig(UNetConfig(**TINY_CFG)).eval()


def _eps(model):
    g = torch.Generator().manual_seed(5)
    x, buffers, code = torch.randn(1, 3, 32, 32, generator=g), torch.rand(1, 9, 32, 32, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        # zero-initialised output conv would make every model agree: perturb it deterministically
        return model.denoise(x, torch.tensor([300]), buffers, code)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return model


def test_tiny_official_checkpoint_loads_strict(tiny_kwargs, dr_ref):
    path = reference_file("diffusionrig", "tiny_model.pt")
    model = load_diffusionrig(path, config=tiny_kwargs)
    ref = dr_ref("tiny_model.pt")
    ours = model.state_dict()
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not model.training


def test_official_checkpoint_with_default_config_reports_keys():
    path = reference_file("diffusionrig", "tiny_model.pt")
    with pytest.raises(CheckpointError, match="shape mismatches") as err:
        load_diffusionrig(path)
    assert "pass its create_model_and_diffusion kwargs as config" in str(err.value)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_common_wrappers(tmp_path, small_model, wrap):
    model = _perturbed(small_model)
    sd = model.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "step": 3},
        "model": {"model": sd, "opt": {}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "m.pt")
    loaded = load_diffusionrig(tmp_path / "m.pt", config=UNetConfig(**TINY_CFG))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # channels_last weights take other conv kernels: equal up to float32 round-off
    torch.testing.assert_close(_eps(loaded), _eps(model), atol=1e-5, rtol=0)


def test_sidecar_json_config(tmp_path, small_model):
    import json

    torch.save(small_model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({**TINY_CFG, "channel_mult": "1,2", "attention_resolutions": "16"}))
    loaded = load_diffusionrig(tmp_path / "m.pt")
    assert loaded.config == UNetConfig(**TINY_CFG)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 5e-2), ("fp16", 5e-3)])
def test_safetensors_round_trip_keeps_config(tmp_path, small_model, dtype, tol):
    model = _perturbed(small_model)
    path = save_diffusionrig(model, tmp_path / "m.safetensors", dtype=dtype)
    tensors, meta = read_state_dict(path)
    assert meta["format"] == "comfy-diffusionrig"
    floating = {v.dtype for v in tensors.values() if v.is_floating_point()}
    assert floating == {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]}
    assert tensors["encoder.bn1.num_batches_tracked"].dtype == torch.int64
    loaded = load_diffusionrig(path)  # config comes from the metadata
    assert loaded.config == model.config
    assert loaded.encoder.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(_eps(loaded), _eps(model), atol=tol, rtol=0)


def test_load_in_bf16_runs(tmp_path, small_model):
    path = save_diffusionrig(small_model, tmp_path / "m.safetensors")
    model = load_diffusionrig(path, dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert _eps(model).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        load_diffusionrig(path, dtype="fp16")


def test_save_never_overwrites_without_flag(tmp_path, small_model):
    path = save_diffusionrig(small_model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_diffusionrig(small_model, path)
    assert path.read_bytes() == before
    save_diffusionrig(small_model, path, dtype="bf16", overwrite=True)
    assert path.read_bytes() != before
    with pytest.raises(ValueError, match=".safetensors"):
        save_diffusionrig(small_model, tmp_path / "m.pt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, failing, overwrite=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_missing_file_says_where_models_go(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/diffusionrig"):
        load_diffusionrig(tmp_path / "nope.pt")


def test_truncated_and_non_checkpoint_files(tmp_path, small_model):
    torch.save(small_model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_diffusionrig(tmp_path / "cut.pt")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError):
        load_diffusionrig(tmp_path / "image.pt")
    save_diffusionrig(small_model, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_diffusionrig(tmp_path / "cut.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a DiffusionRig checkpoint"):
        load_diffusionrig(tmp_path / "list.pt")


def test_checkpoint_of_another_model(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"missing keys .*unexpected keys .*top-level names \['0', '1'\]"):
        load_diffusionrig(tmp_path / "other.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_plain.pt", "wb") as f:  # a legacy plain pickle too
        pickle.dump(_Payload(marker), f, protocol=2)
    for name in ("evil.pt", "evil_plain.pt"):
        with pytest.raises(CheckpointError, match=r"refused \(would run code\).*system"):
            load_diffusionrig(tmp_path / name)
        assert not marker.exists()


def test_encoder_type_inferred_from_keys():
    with torch.device("meta"):
        r50 = DiffusionRig(UNetConfig(**TINY_CFG, encoder_type="resnet50")).state_dict()
        r18 = DiffusionRig(UNetConfig(**TINY_CFG)).state_dict()
    assert infer_encoder_type(r50) == "resnet50"
    assert infer_encoder_type(r18) == "resnet18"


def test_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"data"))
    assert len(synced) == 2
    # the data before the rename, then the rename itself
    assert synced[0].startswith(str(tmp_path / ".out.bin.")) and synced[0].endswith(".tmp")
    assert synced[1] == str(tmp_path)


def test_atomic_write_without_overwrite_lets_one_of_two_racing_writers_win(tmp_path):
    target = tmp_path / "out.bin"
    both_written = threading.Barrier(2)
    results = {}

    def writer(name):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(name.encode())
            both_written.wait(timeout=10)  # both passed the up-front existence check
        try:
            atomic_write(target, write)
            results[name] = "written"
        except FileExistsError as err:
            results[name] = str(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results.values())[-1] == "written"
    loser = next(n for n, r in results.items() if r != "written")
    assert "already exists" in results[loser]
    winner = next(n for n, r in results.items() if r == "written")
    assert target.read_bytes() == winner.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_overwrite_keeps_symlinks_and_modes(tmp_path):
    real = tmp_path / "store" / "model.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "model.bin"
    link.symlink_to(real)
    atomic_write(link, lambda tmp: open(tmp, "wb").write(b"new"), overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)  # written through, the link is kept
    assert real.read_bytes() == b"new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        atomic_write(link, lambda tmp: open(tmp, "wb").write(b"other"))
    fresh = atomic_write(tmp_path / "fresh.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_write_names_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=3 << 20))

    def torch_full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3478")

    with pytest.raises(DiskFullError, match=r"disk full: writing .*out.bin needs about 10 MB and 3 MB are free; "
                                            r"free 23 MB") as err:
        atomic_write(target, torch_full_disk, overwrite=True, size_hint=10 << 20)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    # the same torch error with room to spare is not called a full disk
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(target, torch_full_disk, overwrite=True, size_hint=1 << 20)


def test_stale_temp_files_are_removed(tmp_path):
    target = tmp_path / "m.safetensors"
    stale, fresh = tmp_path / ".m.safetensors.x1.tmp", tmp_path / ".m.safetensors.x2.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600,) * 2)
    assert remove_stale_temp_files(target) == [stale]
    assert not stale.exists() and fresh.exists()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, small_model):
    lfs = _write(tmp_path / "lfs.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                 + b"\nsize 50940399\n")
    html = _write(tmp_path / "page.pt", b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    save_diffusionrig(small_model, tmp_path / "m.safetensors")
    renamed = _write(tmp_path / "renamed.pt", (tmp_path / "m.safetensors").read_bytes())
    torch.save(small_model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    cut = _write(tmp_path / "cut.pt", data[: len(data) // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    expected = {
        lfs: r"the file is a Git LFS pointer.*git lfs pull",
        html: r"the file is a web page.*download it again",
        renamed: r"the file is a safetensors file: rename it to \.safetensors",
        cut: r"the file is a zip archive cut short \(truncated\)",
        _write(tmp_path / "empty.pt", b""): r"the file is empty \(0 bytes\)",
    }
    for path, message in expected.items():
        with pytest.raises(CheckpointError, match=message) as err:
            load_diffusionrig(path)
        assert str(path) in str(err.value) and err.value.path == path
        assert "would run code" not in str(err.value)


def test_weights_that_cannot_be_a_model_are_refused(tmp_path, small_model):
    state = small_model.state_dict()
    key = "denoisingUNet.out.2.weight"
    for name, bad in (("nan", float("nan")), ("inf", float("inf"))):
        broken = dict(state, **{key: state[key].clone().fill_(bad)})
        torch.save(broken, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=rf"{name}.pt: 1 weight\(s\) hold NaN or infinite.*{key}"):
            read_state_dict(tmp_path / f"{name}.pt")
        save_file({k: v.contiguous() for k, v in broken.items()}, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match=r"NaN or infinite"):
            read_state_dict(tmp_path / f"{name}.safetensors")
    torch.save({**state, 7: torch.zeros(1)}, tmp_path / "intkey.pt")
    with pytest.raises(CheckpointError, match=r"intkey.pt: a tensor is stored under the key 7"):
        load_diffusionrig(tmp_path / "intkey.pt", config=UNetConfig(**TINY_CFG))
    for dtype in (torch.int64, torch.bool):
        torch.save(dict(state, **{key: state[key].to(dtype)}), tmp_path / "int.pt")
        with pytest.raises(CheckpointError, match=rf"1 tensors of the wrong type .*{key} {dtype}"):
            load_diffusionrig(tmp_path / "int.pt", config=UNetConfig(**TINY_CFG))


@pytest.mark.parametrize("config,message", [
    ("{not json", "metadata is damaged"),
    ('["a list"]', "metadata is damaged"),
    ('{"num_channels": "32"}', "metadata is damaged"),
    (None, "implausible values num_channels=-32"),
])
def test_damaged_config_metadata(tmp_path, small_model, config, message):
    tensors = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    if config is None:
        config = json.dumps({**small_model.config.to_dict(), "num_channels": -32})
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "comfy-diffusionrig", "config": config})
    with pytest.raises(CheckpointError, match=message) as err:
        load_diffusionrig(tmp_path / "m.safetensors")
    assert err.value.path == tmp_path / "m.safetensors"


def test_fp16_refuses_weights_beyond_its_range():
    """A weight above 65504 would become inf in fp16: refused with what to use instead (checked before any
    device work, so this runs without a GPU)."""
    from comfy_diffusionrig.model.checkpoints import for_inference
    from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

    model = DiffusionRig(UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                                    attention_resolutions=(8,), num_head_channels=16, dropout=0.0))
    with torch.no_grad():
        next(model.denoisingUNet.parameters()).view(-1)[0] = 1e5
    with pytest.raises(ValueError, match="beyond fp16's range .* bf16 or fp32"):
        for_inference(model, device="cuda", dtype="fp16")

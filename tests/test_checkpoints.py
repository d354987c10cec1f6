"""Checkpoint loading/saving: official layout, wrappers, safetensors, and refusing bad files."""

import os
import pickle

import pytest
import torch

from comfy_diffusionrig import load_diffusionrig, save_diffusionrig
from comfy_diffusionrig.checkpoints import CheckpointError, atomic_write, infer_encoder_type, read_state_dict
from comfy_diffusionrig.unet import DiffusionRig, UNetConfig

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
        with pytest.raises(CheckpointError, match="refused to load"):
            load_diffusionrig(tmp_path / name)
        assert not marker.exists()


def test_encoder_type_inferred_from_keys():
    with torch.device("meta"):
        r50 = DiffusionRig(UNetConfig(**TINY_CFG, encoder_type="resnet50")).state_dict()
        r18 = DiffusionRig(UNetConfig(**TINY_CFG)).state_dict()
    assert infer_encoder_type(r50) == "resnet50"
    assert infer_encoder_type(r18) == "resnet18"

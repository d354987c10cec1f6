"""Personalization nodes run directly: train (resumable, cancellable), save, load a LoRA back."""

import pytest
import torch

from comfy_diffusionrig import load_diffusionrig
from comfy_diffusionrig.train.album import Album
from comfy_diffusionrig.model.lora import lora_layers
from nodes import host, model_nodes, train_nodes

from test_nodes import SMALL, models_dir  # noqa: F401  (fixture)


def _album(n=4, size=32):
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    buffers = torch.rand(n, 9, size, size, generator=gen)
    return Album(images, buffers, names=[f"photo{i}" for i in range(n)])


def _state(handle) -> dict:
    return handle.run(lambda model: model.state_dict())


def _base():
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    return model


def test_training_personalizes_a_copy_and_draws_the_loss_curve(models_dir):
    base = _base()
    before = {k: v.clone() for k, v in _state(base).items()}
    model, curve = train_nodes.TrainDiffusionRig().train(base, _album(), steps=3, learning_rate=1e-4, batch_size=2,
                                                         seed=0, lora_rank=0, save_name="anna", preview_every=2)
    assert all(torch.equal(before[k], v) for k, v in _state(base).items()), "the cached base model changed"
    changed = [k for k, v in _state(model).items() if k.startswith("denoisingUNet") and not torch.equal(before[k], v)]
    assert changed, "training did not change the UNet"
    assert all(torch.equal(before[k], v) for k, v in _state(model).items()
               if k.startswith("encoder") and "running" not in k and "num_batches" not in k)
    assert curve.shape == (1, 320, 640, 3) and 0 <= curve.min() and curve.max() <= 1
    assert (models_dir / "diffusionrig" / "training" / "anna.dr-train").is_file()


def test_cancel_keeps_progress_and_queueing_again_resumes(models_dir, monkeypatch):
    class Cancelled(Exception):
        pass

    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Cancelled()

    monkeypatch.setattr(host, "check_interrupt", interrupt)
    node = train_nodes.TrainDiffusionRig()
    with pytest.raises(Cancelled):
        node.train(_base(), _album(), steps=4, learning_rate=1e-4, batch_size=2, seed=1, lora_rank=0,
                   save_name="bob", preview_every=0)
    saved = torch.load(models_dir / "diffusionrig" / "training" / "bob.dr-train", weights_only=True)
    assert saved["step"] == 2
    resumed, _ = node.train(_base(), _album(), steps=4, learning_rate=1e-4, batch_size=2, seed=1, lora_rank=0,
                            save_name="bob", preview_every=0)
    monkeypatch.setattr(host, "check_interrupt", lambda: None)
    straight, _ = node.train(_base(), _album(), steps=4, learning_rate=1e-4, batch_size=2, seed=1, lora_rank=0,
                             save_name="carl", preview_every=0)
    for key, value in _state(straight).items():
        assert torch.equal(value, _state(resumed)[key]), key


def test_lora_training_saves_a_small_file_that_the_loader_applies(models_dir):
    model, _ = train_nodes.TrainDiffusionRig().train(_base(), _album(), steps=2, learning_rate=1e-3, batch_size=2,
                                                     seed=0, lora_rank=4, save_name="lora_run", preview_every=0)
    assert model.run(lora_layers)
    (path,) = train_nodes.SaveDiffusionRigModel().save(model, "anna_lora", "fp32", False)["result"]
    full = models_dir / "diffusionrig" / "small.safetensors"
    assert 0 < (models_dir / "diffusionrig" / "anna_lora.safetensors").stat().st_size < full.stat().st_size / 2
    (loaded,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32", lora_name="anna_lora.safetensors",
                                                         lora_strength=1.0)
    assert not loaded.run(lora_layers), "the loader merges the adapters"
    gen = torch.Generator().manual_seed(0)
    x, buffers = torch.randn(1, 3, 32, 32, generator=gen), torch.rand(1, 9, 32, 32, generator=gen)
    t, code = torch.tensor([500]), torch.randn(1, 64, generator=gen)
    denoise = lambda handle: handle.run(lambda m: m.eval().denoise(x, t, buffers, code))  # noqa: E731
    with torch.no_grad():
        want, got, base = denoise(model), denoise(loaded), denoise(_base())
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(base, want, atol=1e-5)
    # another strength, against the adapters' own forward at that strength (base + strength * scale * up(down(x)))
    (half,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32", lora_name="anna_lora.safetensors",
                                                       lora_strength=0.5)
    for layer in model.run(lora_layers).values():
        layer.alpha /= 2
    with torch.no_grad():
        want_half, got_half = denoise(model), denoise(half)
    assert torch.allclose(got_half, want_half, atol=1e-5) and not torch.allclose(got_half, want, atol=1e-5)


def test_save_never_overwrites_without_the_flag(models_dir):
    saver = train_nodes.SaveDiffusionRigModel()
    model = _base()
    (path,) = saver.save(model, "mine", "fp16", False)["result"]
    first = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite"):
        saver.save(model, "mine", "fp32", False)
    assert open(path, "rb").read() == first
    saver.save(model, "mine", "fp32", True)
    assert load_diffusionrig(path).config == SMALL
    with pytest.raises(ValueError, match="file name"):
        saver.save(model, "../escape", "fp32", False)

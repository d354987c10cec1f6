"""Stage-2 training loop: learning, exact resume, cancel, frozen encoder, and failure handling.

Everything runs on a 32 px model and a 4-image random album on the CPU in fp32, where the
loop is deterministic, so resumed and uninterrupted runs are compared bit for bit.
"""

import errno
import math
import os
import shutil
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from comfy_diffusionrig import load_diffusionrig
from comfy_diffusionrig.train import loop as training_module
from comfy_diffusionrig.model.checkpoints import CheckpointError, DiskFullError
from comfy_diffusionrig.model.diffusion import p2_loss
from comfy_diffusionrig.model.lora import lora_layers
from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, TrainingError, train
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

# 32 px, two levels, attention at 16x16; dropout on so that resuming must restore the dropout RNG
TINY = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                  num_head_channels=16, dropout=0.1)
FAST = dict(precision="fp32", batch_size=2)


real_load = torch.load


def tiny_model() -> DiffusionRig:
    torch.manual_seed(0)
    return DiffusionRig(TINY)


def album(n: int = 4, seed: int = 1) -> TrainingData:
    g = torch.Generator().manual_seed(seed)
    buffers = torch.cat([torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
                         torch.rand(n, 3, 32, 32, generator=g)], 1)
    # smooth images (a blurred random field) so that a tiny model can fit them in a few steps
    images = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
    return TrainingData(images, buffers)


def weights(model: DiffusionRig) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def fixed_eval_loss(model: DiffusionRig, data: TrainingData) -> float:
    """p2 loss over the album at fixed timesteps and noise, encoder in eval mode (no randomness)."""
    g = torch.Generator().manual_seed(99)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for t in (50, 250, 500, 750, 950):
            noise = torch.randn(data.images.shape, generator=g)
            steps = torch.full((len(data),), t, dtype=torch.int64)
            total += float(p2_loss(model, data.images, data.buffers, steps, noise).mean())
    return total / 5


def test_loss_decreases_on_tiny_album():
    model, data = tiny_model(), album()
    before = fixed_eval_loss(model, data)
    model, losses = train(model, data, TrainConfig(steps=40, lr=1e-3, **FAST))
    after = fixed_eval_loss(model, data)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # untrained, the zero-initialised output conv predicts eps = 0; 40 steps learn a good part of the noise
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert not model.training


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cancel_then_resume_is_bit_identical(tmp_path, lora_rank):
    config = TrainConfig(steps=6, lr=1e-3, checkpoint_every=4, lora_rank=lora_rank, **FAST)
    reference, ref_losses = train(tiny_model(), album(), config)

    class Cancel(Exception):
        pass

    def cancel_at_3(step, total, loss, model):
        assert total == 6
        if step == 3:
            raise Cancel

    path = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(Cancel):
        train(tiny_model(), album(), config, checkpoint_path=path, callback=cancel_at_3)
    # the cancel wrote step 3 (not the periodic step 4) and left no temporary file behind
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and state["losses"] == ref_losses[:3]

    resumed, losses = train(tiny_model(), album(), config, checkpoint_path=path)
    assert losses == ref_losses
    assert_same_weights(weights(resumed), weights(reference))
    assert torch.load(path, weights_only=True)["step"] == 6
    if lora_rank:
        assert lora_layers(resumed)
    # a finished checkpoint resumes to the same model without training
    again, again_losses = train(tiny_model(), album(), config, checkpoint_path=path, callback=cancel_at_3)
    assert again_losses == ref_losses
    assert_same_weights(weights(again), weights(reference))


def test_resume_from_periodic_checkpoint_after_a_crash(tmp_path):
    config = TrainConfig(steps=6, lr=1e-3, checkpoint_every=2, **FAST)
    reference, _ = train(tiny_model(), album(), config)

    def crash_at_5(step, total, loss, model):
        if step == 5:
            raise KeyboardInterrupt

    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), album(), config, checkpoint_path=path, callback=crash_at_5)
    resumed, _ = train(tiny_model(), album(), config, checkpoint_path=path)
    assert_same_weights(weights(resumed), weights(reference))


def test_full_checkpoint_loads_as_a_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, _ = train(tiny_model(), album(), TrainConfig(steps=2, **FAST), checkpoint_path=path)
    loaded = load_diffusionrig(path, config=TINY)
    assert_same_weights(weights(loaded), weights(model))


def test_encoder_weights_frozen_but_batchnorm_statistics_update():
    model = tiny_model()
    before = weights(model)
    model, _ = train(model, album(), TrainConfig(steps=3, lr=1e-3, **FAST))
    after = weights(model)
    encoder_params = {f"encoder.{k}" for k, _ in model.encoder.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in encoder_params)
    # official stage 2 trains in train mode: batch-statistics BN updates the running stats
    assert not torch.equal(before["encoder.bn1.running_mean"], after["encoder.bn1.running_mean"])
    assert int(after["encoder.bn1.num_batches_tracked"]) == 3
    assert not torch.equal(before["denoisingUNet.out.2.weight"], after["denoisingUNet.out.2.weight"])
    assert all(not p.requires_grad for p in model.encoder.parameters())


def test_preview_does_not_change_the_result():
    config = TrainConfig(steps=4, lr=1e-3, preview_every=2, **FAST)
    reference, _ = train(tiny_model(), album(), config)
    seen = []

    def preview(step, model):
        assert not model.training and not torch.is_grad_enabled()
        torch.randn(100)  # a sampler drawing from the global RNG
        model.denoise(torch.randn(1, 3, 32, 32), torch.tensor([500]), torch.rand(1, 9, 32, 32), torch.randn(1, 64))
        seen.append(step)

    model, _ = train(tiny_model(), album(), config, preview=preview)
    assert seen == [2, 4]
    assert_same_weights(weights(model), weights(reference))


def test_gradient_checkpointing_gives_the_same_weights(monkeypatch):
    from comfy_diffusionrig.model import unet

    calls, real = [], unet.checkpoint
    monkeypatch.setattr(unet, "checkpoint", lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1])
    config = TrainConfig(steps=3, lr=1e-3, **FAST)
    reference, _ = train(tiny_model(), album(), config)
    assert not calls  # off by default
    model = tiny_model()
    blocks = sum(isinstance(m, (unet.ResBlock, unet.AttentionBlock)) for m in model.denoisingUNet.modules())
    trained, _ = train(model, album(), TrainConfig(steps=3, lr=1e-3, gradient_checkpointing=True, **FAST))
    assert len(calls) == 3 * blocks  # every block of the UNet recomputed, once per step (one micro-batch each)
    # recomputation replays the same ops (dropout RNG included), so fp32 results are bit-identical
    assert_same_weights(weights(trained), weights(reference))
    assert not any(getattr(m, "use_checkpoint", False) for m in trained.modules())  # switched back off


def test_training_leaves_the_callers_rng_alone():
    model = tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, album(), TrainConfig(steps=1, **FAST))
    assert torch.equal(torch.rand(3), expected)


def test_trains_a_model_created_in_inference_mode():
    # ComfyUI runs nodes under torch.inference_mode(); the loaded model and album are inference tensors
    with torch.inference_mode():
        model, data = tiny_model(), album()
        trained, losses = train(model, data, TrainConfig(steps=2, **FAST))
    assert len(losses) == 2
    reference, _ = train(tiny_model(), album(), TrainConfig(steps=2, **FAST))
    assert_same_weights(weights(trained), weights(reference))


def test_bf16_autocast_keeps_fp32_master_weights():
    model, losses = train(tiny_model(), album(), TrainConfig(steps=2, lr=1e-3, precision="bf16", batch_size=2))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)


def test_album_smaller_than_batch_is_refused():
    with pytest.raises(ValueError, match="album has 3 image.*batch_size is 4.*about 20"):
        train(tiny_model(), album(3), TrainConfig(steps=1, precision="fp32"))


def test_bad_album_and_config_are_refused():
    with pytest.raises(ValueError, match=r"in \[-1, 1\].*x \* 2 - 1"):
        TrainingData(torch.rand(4, 3, 32, 32) * 255, torch.rand(4, 9, 32, 32))
    with pytest.raises(ValueError, match="matching the images"):
        TrainingData(torch.rand(4, 3, 32, 32), torch.rand(3, 9, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        TrainingData(torch.full((4, 3, 32, 32), float("nan")), torch.rand(4, 9, 32, 32))
    with pytest.raises(ValueError, match="multiples of 2"):
        train(tiny_model(), TrainingData(torch.rand(4, 3, 31, 31), torch.rand(4, 9, 31, 31)), TrainConfig(**FAST))
    with pytest.raises(ValueError, match="lr must be positive.*precision must be one of"):
        TrainConfig(lr=0, precision="fp8")
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        train(tiny_model(), album(), TrainConfig(steps=1, precision="fp16"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def failing_loss(*args, **kwargs):
        calls.append(1)
        loss = p2_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training_module, "p2_loss", failing_loss)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 of 5.*ckpt.pt \(step 2\) is kept"):
        train(tiny_model(), album(), TrainConfig(steps=5, checkpoint_every=1, **FAST), checkpoint_path=path)
    assert torch.load(path, weights_only=True)["step"] == 2


@pytest.mark.parametrize("failure", ["enospc", "torch_unexpected_pos"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """A disk that fills up during the second checkpoint: clear message, step-2 checkpoint intact, no temp file."""
    path = tmp_path / "ckpt.pt"
    real_save = torch.save
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=free["bytes"]))

    def disk_full_after_first(obj, f, *args, **kwargs):
        if path.exists():
            with open(f, "wb") as out:  # a partial file, as a full disk leaves it
                out.write(b"partial")
            free["bytes"] = 0
            if failure == "enospc":
                raise OSError(28, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3478")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_after_first)
    with pytest.raises(DiskFullError, match=r"disk full: writing .*ckpt.pt needs about \d+ MB and 0 MB are free; "
                                            r"free \d+ MB.*the checkpoint of step 2 is intact") as err:
        train(tiny_model(), album(), TrainConfig(steps=6, checkpoint_every=2, **FAST), checkpoint_path=path)
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert real_load(path)["step"] == 2


def test_other_write_failures_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    real_save = torch.save

    def fails_after_first(obj, f, *args, **kwargs):
        if path.exists():
            raise OSError(errno.EIO, "Input/output error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_after_first)
    with pytest.raises(OSError, match=r"cannot write the training checkpoint .*ckpt.pt \(Input/output error\)"
                                      r".*checkpoint of step 2 is intact") as err:
        train(tiny_model(), album(), TrainConfig(steps=4, checkpoint_every=2, **FAST), checkpoint_path=path)
    assert err.value.errno == errno.EIO and not isinstance(err.value, DiskFullError)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    """The writability check also asks for room for one checkpoint (a 100 % full disk passes mkstemp)."""
    measured = tmp_path / "measured" / "ckpt.pt"
    train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=measured)
    needed = training_module._checkpoint_bytes_estimate(tiny_model(), TrainConfig(**FAST))
    assert measured.stat().st_size <= needed <= 1.1 * measured.stat().st_size  # the estimate holds a real one
    shutil.rmtree(measured.parent)
    path = tmp_path / "ckpt.pt"
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=needed - 1))
    steps = []
    with pytest.raises(DiskFullError, match=r"disk full: writing .*ckpt.pt needs about \d+ MB and \d+ MB are free; "
                                            r"free \d+ MB.*before training starts; no checkpoint has been written"):
        train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=path,
              callback=lambda *args, **_: steps.append(1))
    assert not steps and list(tmp_path.iterdir()) == []
    path.write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(DiskFullError, match=r"ckpt.pt is unchanged"):
        train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=path)
    assert path.read_bytes() == b"an earlier run's checkpoint"


def test_stale_temp_files_are_removed_at_start(tmp_path):
    path = tmp_path / "ckpt.pt"
    stale, fresh, other = (tmp_path / ".ckpt.pt.dead1.tmp", tmp_path / ".ckpt.pt.live2.tmp",
                           tmp_path / ".other.pt.dead3.tmp")
    for p in (stale, fresh, other):
        p.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=path)
    # the killed run's file goes; one still being written (recent) and other checkpoints' files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, fresh.name, other.name])


def test_unwritable_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write the training checkpoint .*file/ckpt.pt.*no checkpoint"):
        train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=blocker / "ckpt.pt")


def test_resume_refuses_another_album_or_settings(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(tiny_model(), album(), TrainConfig(steps=2, **FAST), checkpoint_path=path)
    with pytest.raises(TrainingError, match=r"another album.*resume=False"):
        train(tiny_model(), album(seed=2), TrainConfig(steps=4, **FAST), checkpoint_path=path)
    with pytest.raises(TrainingError, match=r"lr 1e-05 \(now 0.001\)"):
        train(tiny_model(), album(), TrainConfig(steps=4, lr=1e-3, **FAST), checkpoint_path=path)
    with pytest.raises(TrainingError, match="2 steps done, more than steps=1"):
        train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=path)
    # resume=False starts over and overwrites
    _, losses = train(tiny_model(), album(seed=2), TrainConfig(steps=1, **FAST), checkpoint_path=path, resume=False)
    assert len(losses) == 1 and torch.load(path, weights_only=True)["step"] == 1
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read the training checkpoint"):
        train(tiny_model(), album(), TrainConfig(steps=1, **FAST), checkpoint_path=tmp_path / "junk.pt")


def test_lora_resume_refuses_another_base(tmp_path):
    path = tmp_path / "ckpt.pt"
    config = TrainConfig(steps=2, lora_rank=2, **FAST)
    train(tiny_model(), album(), config, checkpoint_path=path)
    other = DiffusionRig(TINY)  # same architecture, other weights
    with pytest.raises(TrainingError, match="another base model"):
        train(other, album(), TrainConfig(steps=3, lora_rank=2, **FAST), checkpoint_path=path)


def test_stage_one_trains_the_encoder_too():
    model = tiny_model()
    before = weights(model)
    # zero-initialised output convolutions block the encoder's gradient for the first two steps
    train(model, album(), TrainConfig(steps=4, lr=1e-3, train_encoder=True, **FAST))
    after = weights(model)
    moved = [k for k in before if k.startswith("encoder.") and k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert "encoder.fc.weight" in moved and "encoder.conv1.weight" in moved
    with pytest.raises(ValueError, match="train_encoder"):
        TrainConfig(train_encoder=True, lora_rank=4)


def test_ema_follows_the_closed_form_and_leaves_the_trajectory_alone(tmp_path):
    rate, seen = 0.75, []
    model = tiny_model()
    expected = {k: v.detach().clone() for k, v in model.denoisingUNet.named_parameters()}

    def record(step, total, loss, model):
        seen.append({k: v.detach().clone() for k, v in model.denoisingUNet.named_parameters()})

    path = tmp_path / "ckpt.pt"
    trained, _ = train(model, album(), TrainConfig(steps=3, lr=1e-3, ema_rate=rate, **FAST), checkpoint_path=path,
                       callback=record)
    for params in seen:  # ema_k = rate * ema_(k-1) + (1 - rate) * weights_k, from the initial weights
        expected = {k: rate * expected[k] + (1 - rate) * params[k] for k in expected}
    ema = torch.load(path, weights_only=True)["ema"]
    assert sorted(ema) == sorted(f"denoisingUNet.{k}" for k in expected)
    # lerp and the two-product form differ by round-off only: 1e-6 relative to weights of order 0.1
    assert max(float((ema[f"denoisingUNet.{k}"] - v).abs().max()) for k, v in expected.items()) < 1e-6
    assert max(float((ema[f"denoisingUNet.{k}"] - v).abs().max()) for k, v in seen[-1].items()) > 1e-5
    reference, _ = train(tiny_model(), album(), TrainConfig(steps=3, lr=1e-3, **FAST))
    assert_same_weights(weights(trained), weights(reference))


def test_a_damaged_training_checkpoint_says_what_it_is(tmp_path):
    """Resuming from an LFS pointer, a checkpoint missing a part, or one with NaN weights: one CheckpointError with
    the path and what to do, before any weight is touched (the NaN one used to resume and fail as a NaN loss)."""
    config = TrainConfig(steps=2, batch_size=2, precision="fp32", checkpoint_every=1)
    path = tmp_path / "train.pt"
    train(tiny_model(), album(), config, checkpoint_path=path)
    good = torch.load(path, weights_only=True)

    def resume():
        return train(tiny_model(), album(), replace(config, steps=3), checkpoint_path=path)

    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git lfs pull") as info:
        resume()
    assert info.value.path == path
    damaged = {k: v for k, v in good.items() if k != "optimizer"}
    torch.save(damaged, path)
    with pytest.raises(CheckpointError, match=r"is damaged: it lacks \['optimizer'\]"):
        resume()
    broken = dict(good, model={k: v.clone() for k, v in good["model"].items()})
    next(v for v in broken["model"].values() if v.is_floating_point())[...] = float("nan")
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        resume()

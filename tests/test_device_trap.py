"""Device mistakes caught without a GPU: the model runs on PyTorch's `meta` device as a stand-in accelerator.

A meta tensor has a shape and no data, and PyTorch refuses to mix it with a CPU tensor (other than a
0-dim one) exactly as it refuses to mix a CUDA tensor with a CPU one. `MetaAccelerator` (a
TorchFunctionMode) plays the host side of a GPU: reading a meta value (`.item()`, `bool()`) gives a
stand-in value and copying to the CPU gives zeros, and it records each such host read or copy and
each tensor made on the CPU by a factory (`torch.zeros(...)` without device=). The loops must keep
everything on the model's device: a run with more steps may not add any event (per-step host syncs
or CPU tensors), and a CPU tensor mixed into a step fails outright, as it would on CUDA.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from comfy_diffusionrig.editing import edit_faces, invert_faces
from comfy_diffusionrig.model.diffusion import SAMPLERS, ddim_invert_fixed_point, ddim_sample
from comfy_diffusionrig.model.feature_cache import FeatureCache
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig
from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train

_READS = (torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy)
SIZE = 16


def _meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


class MetaAccelerator(TorchFunctionMode):
    """The meta device as a GPU's stand-in; `events` counts host reads, copies to and from the host and CPU
    factory calls."""

    def __init__(self):
        super().__init__()
        self.events: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if func in _READS and _meta(x):
            self.events["host read"] += 1
            value = True if x.dtype == torch.bool else 0.5 if x.is_floating_point() else 0
            stand_in = torch.full(x.shape, value, dtype=x.dtype)
            return stand_in.numpy() if func is torch.Tensor.numpy else func(stand_in)
        if func is torch.equal and any(_meta(t) for t in args):  # a host read too (meta has no kernel for it)
            self.events["host read"] += 1
            return False
        if func in (torch.Tensor.to, torch.Tensor.cpu) and isinstance(x, torch.Tensor):
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs) if func is torch.Tensor.to else \
                (torch.device("cpu"), None, None, None)
            if _meta(x) and device is not None and device.type == "cpu":
                self.events["copy to host"] += 1
                return torch.zeros(x.shape, dtype=dtype or x.dtype)
            if x.device.type == "cpu" and device is not None and device.type == "meta":
                self.events["copy to device"] += 1
        out = func(*args, **kwargs)
        if func in _device_constructors() and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.events[f"CPU tensor from torch.{func.__name__}"] += 1
        return out


def per_step(run, steps: tuple[int, int]) -> Counter:
    """Events that the extra steps of run(steps[1]) add over run(steps[0]): what one step does on the host."""
    counts = []
    for n in steps:
        with MetaAccelerator() as mode:
            run(n)
        counts.append(mode.events)
    extra = Counter(counts[1])
    extra.subtract(counts[0])
    return Counter({k: v / (steps[1] - steps[0]) for k, v in extra.items() if v})


@pytest.fixture(scope="module")
def meta_model():
    torch.manual_seed(0)
    config = UNetConfig(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                        attention_resolutions=(8,), num_head_channels=16)
    return DiffusionRig(config).eval().to("meta")


def _inputs(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 2 - 1
    return image, torch.rand(n, 9, SIZE, SIZE, generator=gen), torch.rand(n, 64, generator=gen)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_sampler_loops_stay_on_the_device_without_host_syncs(meta_model, name):
    sample, invert = SAMPLERS[name]
    image, buffers, code = _inputs()
    outs = []

    def run(steps):
        x_t = invert(meta_model, image, buffers, code, steps=steps)
        outs.append(sample(meta_model, buffers, code, x_t, steps=steps, eta=0.5))  # eta > 0: fresh noise per step

    assert per_step(run, (2, 3)) == Counter()
    assert all(_meta(out) and out.shape == (2, 3, SIZE, SIZE) for out in outs)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_feature_cache_makes_no_cpu_tensors_and_reads_only_the_timestep(meta_model, name):
    """FeatureCache reads each call's timestep on the host (`int(t[0])`, to restart when the timesteps turn):
    on a GPU that is a sync per UNet call, the one per-step host read left in the samplers (a known cost of
    the cache, which no preset uses); nothing else may appear per step."""
    sample, invert = SAMPLERS[name]
    image, buffers, code = _inputs()

    def run(steps):
        net = FeatureCache(meta_model, 2)
        sample(net, buffers, code, invert(net, image, buffers, code, steps=steps), steps=steps)

    events = per_step(run, (2, 3))
    assert set(events) == {"host read"} and events["host read"] <= 2.5, events


def test_the_fixed_point_inversion_stays_on_the_device(meta_model):
    image, buffers, code = _inputs()
    assert per_step(lambda n: ddim_invert_fixed_point(meta_model, image, buffers, code, steps=n), (2, 3)) == Counter()


def test_edit_faces_keeps_its_loops_on_the_model_device(meta_model, monkeypatch):
    """Two faces inverted and sampled one at a time, from a kept inverted start and from noise, with progress
    callbacks: only the finished rows come back to the host, per batch, never per step. (The model's
    fingerprint, taken once per call, indexes every weight: far too slow on meta, so it is stood in.)"""
    from comfy_diffusionrig import editing

    monkeypatch.setattr(editing, "model_fingerprint", lambda model: "meta")
    image, buffers, code = _inputs()
    target = buffers.flip(-1)
    seen = []

    def run(steps):
        callback = lambda done, total, preview: seen.append((done, total, _meta(preview)))  # noqa: E731
        out = edit_faces(meta_model, image, buffers, target, code, steps=steps, batch_size=1, callback=callback)
        start = invert_faces(meta_model, image, buffers, code, steps=steps, sampler="dpmpp_2m")
        again = edit_faces(meta_model, None, None, target, code, start=start, steps=steps, sampler="dpmpp_2m")
        noise = edit_faces(meta_model, None, None, target, code, start="noise", steps=steps)
        for result in (out, again, noise):
            assert result.device.type == "cpu" and result.dtype == torch.float32 and result.shape == (2, 3, SIZE, SIZE)

    assert per_step(run, (2, 3)) == Counter()
    assert seen[-1] == (12, 12, True)  # 2 faces x (3 inversion + 3 sampling steps); previews stay on the device


def test_a_training_step_stays_on_the_device(meta_model, monkeypatch):
    """Per step: one host read (the loss, for progress and the divergence check) and the batch drawn from the
    shared CPU generator (album indices, timesteps, noise: the same on any device) copied over; nothing else.
    (The full fine-tune; tests/test_cuda.py trains LoRA on a GPU.)"""
    gen = torch.Generator().manual_seed(1)
    data = TrainingData(torch.rand(4, 3, SIZE, SIZE, generator=gen) * 2 - 1, torch.rand(4, 9, SIZE, SIZE, generator=gen))

    autocast = torch.autocast  # refuses the meta device even when disabled, as the fp32 loop asks
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" and not kw.get("enabled", True) else autocast(device_type, **kw))

    def run(steps):
        model = DiffusionRig(meta_model.config).to("meta")
        train(model, data, TrainConfig(steps=steps, batch_size=2, precision="fp32"))

    events = per_step(run, (1, 3))
    assert events.pop("host read") == 1, events
    factories = {k: v for k, v in events.items() if k.startswith("CPU tensor")}
    assert factories == {"CPU tensor from torch.randperm": 1, "CPU tensor from torch.randint": 1,
                         "CPU tensor from torch.randn": 1}, events
    assert set(events) - set(factories) <= {"copy to device"}, events


def test_the_trap_catches_a_cpu_tensor_inside_a_sampler_step(meta_model):
    """A denoiser that adds torch.zeros(x.shape) without device= fails as it would on CUDA; a 0-dim one (which
    CUDA accepts, at a host read per step) shows up as a per-step event."""
    image, buffers, code = _inputs()

    class Planted:
        def __init__(self, make):
            self.make, self.config, self.device = make, meta_model.config, meta_model.device

        def denoise(self, x, t, b, c):
            return meta_model.denoise(x, t, b, c) + self.make(x)

    with MetaAccelerator(), pytest.raises(RuntimeError, match="device"):
        ddim_sample(Planted(lambda x: torch.zeros(x.shape)), buffers, code, image, steps=2)
    events = per_step(lambda n: ddim_sample(Planted(lambda x: torch.zeros(())), buffers, code, image, steps=n), (1, 2))
    assert events == Counter({"CPU tensor from torch.zeros": 1})

"""The library and the nodes on a CUDA GPU (marked `cuda`: skipped where torch sees no GPU).

Every path runs on the GPU and is compared with the same path on the CPU: load, encode, fit,
render, invert, sample, edit_faces (a batch of faces equals each face alone), a stage-2 step
with bf16 autocast and with fp16 + GradScaler, LoRA, the video relight and the nodes; the
samplers make no host sync per step; bf16 and fp16 edits of the official-size random model
stay within 35 dB of fp32. `benchmarks/gpu_check.sh` runs them (`pytest -m cuda`); its CPU
dry run sets DIFFUSIONRIG_TEST_DEVICE=cpu (and DIFFUSIONRIG_TEST_TINY=1: the official-size
model at tiny widths) so that the same tests check their own plumbing without a GPU; what
only CUDA has (fp16, sync counting) skips there.

Tolerances: cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa, about 1e-3
relative per layer), so GPU-against-CPU comparisons allow 2e-2 absolute on [-1, 1] images;
the drift test turns TF32 off for its fp32 reference.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sample import make_model, psnr  # noqa: E402  (the benchmark's official-size random model)

from comfy_diffusionrig.editing import edit_faces, invert_faces  # noqa: E402
from comfy_diffusionrig.model.diffusion import SAMPLERS  # noqa: E402
from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train  # noqa: E402

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("DIFFUSIONRIG_TEST_DEVICE") or "cuda")
ON_CUDA = DEVICE.type == "cuda"
TINY = os.environ.get("DIFFUSIONRIG_TEST_TINY") == "1"
TF32_ATOL = 2e-2  # GPU against CPU on [-1, 1] images, float32 in TF32 convolutions (module docstring)
only_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (fp16 and sync counting); this run is on the CPU")


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == DEVICE.type


def small_model(seed: int = 0):
    """A 32 px, 32-channel DiffusionRig with deterministic random weights (fp32, eval), on the CPU."""
    return make_model("cpu", 32, tiny=True)


def inputs(n: int, size: int = 32, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    source = torch.cat([torch.rand(n, 3, size, size, generator=gen), torch.rand(n, 3, size, size, generator=gen) * 2 - 1,
                        torch.rand(n, 3, size, size, generator=gen)], 1)
    target = source.flip(-1).contiguous()
    return image, source, target


@contextmanager
def sync_warnings():
    """Every host synchronisation CUDA makes inside, as a list of warnings (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_load_and_encode_on_the_gpu_match_the_cpu(tmp_path):
    from comfy_diffusionrig.model.checkpoints import load_diffusionrig, save_diffusionrig

    model = small_model()
    path = tmp_path / "small.safetensors"
    save_diffusionrig(model, path)
    gpu = load_diffusionrig(path, device=DEVICE, dtype="fp32")
    assert all(on_device(p) for p in gpu.parameters()) and gpu.device.type == DEVICE.type
    image, _, _ = inputs(2)
    with torch.no_grad():
        code = gpu.encode(image)  # a CPU image goes to the model's device
        assert on_device(code) and code.dtype == torch.float32
        assert torch.allclose(code.cpu(), model.encode(image), atol=TF32_ATOL, rtol=1e-2)


def test_sample_and_invert_run_on_the_gpu_and_match_the_cpu():
    model = small_model()
    gpu = copy.deepcopy(model).to(DEVICE)
    image, source, target = inputs(2)
    code = model.encode(image).detach()
    for name, (sample, invert) in SAMPLERS.items():
        with torch.no_grad():
            x_t = invert(gpu, image, source, code, steps=5)
            out = sample(gpu, target, code, x_t, steps=5)
            assert on_device(x_t) and on_device(out), name
            expected = sample(model, target, code, invert(model, image, source, code, steps=5), steps=5)
        assert torch.allclose(out.cpu(), expected, atol=TF32_ATOL), (name, float((out.cpu() - expected).abs().max()))


def test_edit_faces_on_the_gpu_a_batch_equals_each_face_alone():
    model = small_model().to(DEVICE)
    image, source, target = inputs(2)
    code = model.encode(image).cpu()
    for sampler, eta, cache in (("ddim", 0.0, 1), ("ddim", 0.5, 1), ("dpmpp_2m", 0.0, 2)):
        settings = dict(steps=4, eta=eta, seed=3, sampler=sampler, cache_interval=cache)
        batched = edit_faces(model, image, source, target, code, batch_size=2, **settings)
        alone = torch.cat([edit_faces(model, image[i:i + 1], source[i:i + 1], target[i:i + 1], code[i:i + 1],
                                      batch_size=1, **settings) for i in range(2)])
        assert batched.device.type == "cpu" and batched.dtype == torch.float32 and batched.shape == (2, 3, 32, 32)
        assert torch.allclose(batched, alone, atol=1e-3), (sampler, eta, float((batched - alone).abs().max()))
        start = invert_faces(model, image, source, code, steps=4, sampler=sampler, cache_interval=cache)
        again = edit_faces(model, None, None, target, code, start=start, batch_size=2, **settings)
        assert torch.equal(again, batched)  # a kept inverted start is the same edit, bit for bit


@only_cuda
def test_the_samplers_make_no_host_sync_per_step():
    """Syncs per call (input checks) are allowed; per step none: 3 and 9 steps sync equally often."""
    from comfy_diffusionrig.model.feature_cache import FeatureCache

    model = small_model().to(DEVICE)
    image, source, target = inputs(2)
    with torch.no_grad():
        code = model.encode(image.to(DEVICE))
        image, source, target = image.to(DEVICE), source.to(DEVICE), target.to(DEVICE)
        for name, (sample, invert) in SAMPLERS.items():
            for eta in (0.0, 0.5):
                counts = []
                for steps in (3, 9):
                    with sync_warnings() as caught:
                        net = FeatureCache(model, 2) if eta == 0 else model
                        sample(net, target, code, invert(net, image, source, code, steps=steps), steps=steps, eta=eta,
                               generator=torch.Generator(DEVICE).manual_seed(0))
                    counts.append(len(caught))
                assert counts[0] == counts[1], (name, eta, counts, [str(w.message) for w in caught][:5])


def _album(n: int = 4, size: int = 32) -> TrainingData:
    gen = torch.Generator().manual_seed(5)
    return TrainingData(torch.rand(n, 3, size, size, generator=gen) * 2 - 1, torch.rand(n, 9, size, size, generator=gen))


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=only_cuda)])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_stage_2_step_trains_on_the_gpu_in_mixed_precision(precision, lora_rank):
    model = small_model().to(DEVICE)
    before = {k: v.clone() for k, v in model.denoisingUNet.state_dict().items()}
    config = TrainConfig(steps=2, batch_size=2, precision=precision, lora_rank=lora_rank, lr=1e-3)
    trained, losses = train(model, _album(), config)
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert all(on_device(p) and p.dtype == torch.float32 for p in trained.parameters())
    if lora_rank:
        from comfy_diffusionrig.model.lora import lora_layers, lora_state_dict

        assert lora_layers(trained) and all(on_device(t) for t in lora_state_dict(trained).values())
        assert any(float(layer.lora_up.weight.detach().abs().max()) > 0 for layer in lora_layers(trained).values())
    else:
        after = trained.denoisingUNet.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def _with_tf32(enabled: bool):
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def test_bf16_and_fp16_edits_of_the_official_size_model_stay_within_35_db_of_fp32():
    """The benchmark's random official-size model at 256 px, ddim20 (the goal of issue 23: 35 dB; on the CPU,
    docs/performance.md measured bf16 at 29.9 dB). DIFFUSIONRIG_TEST_TINY: the 32 px tiny widths, a plumbing
    check held to 25 dB only (a different model; the goal is the official one's)."""
    from comfy_diffusionrig.model.checkpoints import for_inference

    size = 32 if TINY else 256
    base = make_model("cpu", size, tiny=TINY)
    image, source, target = inputs(1, size)
    code = base.encode(image).detach()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    _with_tf32(False)
    try:
        reference = edit_faces(for_inference(copy.deepcopy(base), DEVICE, "fp32"), image, source, target, code)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for precision in ("bf16", "fp16") if ON_CUDA else ("bf16",):
        model = for_inference(copy.deepcopy(base), DEVICE, precision)
        assert model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        edit = edit_faces(model, image, source, target, code)
        assert torch.isfinite(edit).all()
        assert psnr(edit, reference) >= (25.0 if TINY else 35.0), (precision, psnr(edit, reference))


def _face_landmarks(cx: float, cy: float, width: float) -> np.ndarray:
    """68 iBUG-order points of a frontal face centred at (cx, cy), `width` px wide: jaw, brows, nose, eyes, mouth."""
    w = width / 2
    jaw = [(cx - w * math.cos(a), cy + 0.1 * w + w * math.sin(a)) for a in np.linspace(0, math.pi, 17)]
    brows = [(cx + w * x, cy - 0.45 * w) for x in np.linspace(-0.8, -0.15, 5)] + \
            [(cx + w * x, cy - 0.45 * w) for x in np.linspace(0.15, 0.8, 5)]
    nose = [(cx, cy - w * y) for y in np.linspace(0.3, 0.0, 4)] + [(cx + w * x, cy + 0.1 * w)
                                                                     for x in np.linspace(-0.2, 0.2, 5)]
    eye = lambda ex: [(ex + 0.18 * w * math.cos(a), cy - 0.25 * w + 0.08 * w * math.sin(a))  # noqa: E731
                      for a in np.linspace(math.pi, -math.pi, 7)[:6]]
    mouth = [(cx + 0.4 * w * math.cos(a), cy + 0.45 * w + 0.15 * w * math.sin(a))
             for a in np.linspace(math.pi, -math.pi, 13)[:12]]
    inner = [(cx + 0.25 * w * math.cos(a), cy + 0.45 * w + 0.05 * w * math.sin(a))
             for a in np.linspace(math.pi, -math.pi, 9)[:8]]
    points = np.array(jaw + brows + nose + eye(cx - 0.4 * w) + eye(cx + 0.4 * w) + mouth + inner, dtype=np.float64)
    assert points.shape == (68, 2)
    return points


def test_fit_and_render_on_the_gpu_match_the_cpu(demo_models):
    from comfy_diffusionrig.face.deca import load_deca
    from comfy_diffusionrig.face.rig import fit_faces, render_layers

    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    marks = _face_landmarks(128.0, 140.0, 110.0)[None]
    files = demo_models / "deca" / "deca_model.tar", demo_models / "flame"
    cpu, gpu = load_deca(*files), load_deca(*files, device=DEVICE)
    assert all(on_device(t) for t in (*gpu.parameters(), *gpu.buffers()))
    rig_gpu, rig_cpu = fit_faces(gpu, image, marks), fit_faces(cpu, image, marks)
    for key, value in rig_gpu.codes.items():
        assert value.device.type == "cpu" and torch.allclose(value, rig_cpu.codes[key], atol=1e-2, rtol=1e-2), key
    layers_gpu, layers_cpu = render_layers(gpu, rig_cpu), render_layers(cpu, rig_cpu)
    for key in layers_cpu:
        a, b = layers_gpu[key], layers_cpu[key]
        assert a.device.type == "cpu" and a.shape == b.shape, key
        differ = float(((a - b).abs() > 1e-2).float().mean())  # edge pixels may flip between rasterizer runs
        assert differ < 0.01, (key, differ)


def test_video_relight_on_the_gpu(demo_models, monkeypatch):
    """`relight_clip` on the GPU, with face detection stood in by fixed landmarks (dlib's models are too big to
    carry to the device machine): every frame is edited on the model's device and pasted back."""
    from comfy_diffusionrig.face.deca import load_deca
    from comfy_diffusionrig.face.lighting import sh_from_direction
    from comfy_diffusionrig.model.checkpoints import for_inference
    from comfy_diffusionrig.photo import detection
    from comfy_diffusionrig.photo.detection import Face
    from comfy_diffusionrig.video import relight_clip
    from PIL import Image

    marks = _face_landmarks(128.0, 140.0, 110.0)
    face = Face((70.0, 60.0, 190.0, 210.0), marks, 1.0, "hog")
    monkeypatch.setattr(detection, "detect_faces", lambda *a, **k: [face])
    model = for_inference(small_model(), DEVICE, "fp32")
    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame", device=DEVICE)
    frames = [Image.fromarray((np.random.default_rng(k).random((256, 256, 3)) * 255).astype(np.uint8))
              for k in range(3)]
    result = relight_clip(model, deca, frames, sh_from_direction(40.0, 20.0, 0.9, 0.5), steps=2, identity=False)
    assert len(result.frames) == 3 and result.missing == [] and len(result.faces) == 3
    assert all(p.size == (256, 256) for p in result.frames) and float(result.masks.max()) > 0
    assert all(not np.array_equal(np.asarray(p), np.asarray(f)) for p, f in zip(result.frames, frames))


@pytest.fixture
def nodes_on_device(monkeypatch, demo_person):
    """The nodes as ComfyUI runs them on a GPU: models stored on the CPU, moved to the GPU when a model handle
    runs them (ComfyUI's load_models_gpu does that move inside ComfyUI)."""
    from nodes import face_nodes, host, model_nodes, train_nodes, video_nodes

    run_models = host.run_models

    def run_on_device(fn, handles, *args, **kwargs):
        for handle in handles:
            handle._model.to(DEVICE)
        return run_models(fn, handles, *args, **kwargs)

    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    monkeypatch.setattr(host, "run_models", run_on_device)
    monkeypatch.setattr(video_nodes, "run_models", run_on_device)
    for module in (host, face_nodes, model_nodes, train_nodes):
        if hasattr(module, "torch_device"):
            monkeypatch.setattr(module, "torch_device", lambda: DEVICE)
    return demo_person


def first_parameter(handle):
    return handle.run(lambda model: next(model.parameters()))


def test_the_nodes_on_the_gpu(nodes_on_device):
    """Load Face Rig -> Relight -> Render Buffers -> Encode -> Invert -> Sampler -> Train (2 steps, bf16, LoRA)."""
    from nodes import face_nodes as fn
    from nodes import model_nodes as mn
    from nodes import train_nodes as tn
    from nodes.host import model_to_image

    (deca,) = fn.LoadDECA().load("deca_model.tar", "auto")
    (dr,) = mn.LoadDiffusionRigModel().load("synthetic_demo_personalized_32px.safetensors", "auto")
    image, rig = fn.LoadFaceRig().load("synthetic_demo_person_1.png")
    lit = fn.Relight().relight(rig, "sliders", 60.0, 20.0, 1.0, 0.4, "#FFFFFF")[0]
    source = fn.RenderBuffers().render(deca, rig)["result"][0]
    target = fn.RenderBuffers().render(deca, lit)["result"][0]
    assert on_device(first_parameter(deca)) and source.device.type == "cpu"
    (code,) = mn.EncodeGlobalCode().encode(dr, image)
    assert on_device(first_parameter(dr)) and code.device.type == "cpu"
    (start,) = mn.DiffusionRigInvert().invert(dr, image, source, code, 4, 1, sampler="dpmpp_2m")
    (edited,) = mn.DiffusionRigSampler().sample(dr, target, code, 0, 4, 0.0, "inversion", 1, sampler="dpmpp_2m",
                                                 inverted_start=start)
    (direct,) = mn.DiffusionRigSampler().sample(dr, target, code, 0, 4, 0.0, "inversion", 1, source_image=image,
                                                 source_buffers=source, sampler="dpmpp_2m")
    assert edited.shape == image.shape and edited.device.type == "cpu" and torch.equal(edited, direct)
    assert not torch.equal(edited, model_to_image(torch.zeros(1, 3, *image.shape[1:3])))
    # Train on an album of the demo person's rigged photos (Build Face Album would need dlib's detector)
    from comfy_diffusionrig.train.album import Album

    images = torch.cat([fn.LoadFaceRig().load(f"synthetic_demo_person_{k}.png")[0] for k in (1, 2)])
    rigs = [fn.LoadFaceRig().load(f"synthetic_demo_person_{k}.png")[1] for k in (1, 2)]
    buffers = torch.cat([fn.RenderBuffers().render(deca, r)["result"][0] for r in rigs])
    album = Album(images.permute(0, 3, 1, 2) * 2 - 1, buffers)
    trained, curve = tn.TrainDiffusionRig().train(dr, album, 2, 1e-4, 2, 0, 4, "cuda_check", precision="bf16",
                                                  preview_every=1, restart=True)
    assert trained is not dr and on_device(first_parameter(trained)) and curve.shape[0] == 1

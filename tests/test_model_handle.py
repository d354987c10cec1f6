"""The model handle (nodes/host.py) against a stand-in for ComfyUI's model management: every node that takes a
DR_MODEL or DECA_MODEL runs its models only after ComfyUI loaded them; "auto" precision is ComfyUI's choice; an
fp16 UNet that overflows runs again in fp32; the activation estimates given to ComfyUI match traced peaks.

The stand-in records `load_models_gpu` calls; a forward pre-hook on every module call fails the test when a module
of ours runs while the model holding it is not loaded (or was never handed to ComfyUI at all). Nothing is loaded
when a node starts, as after ComfyUI offloaded everything (Free memory) between two nodes."""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nodes
from comfy_diffusionrig import ddim_sample, edit_faces
from comfy_diffusionrig.face.deca import load_deca
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig
from comfy_diffusionrig.train.album import Album
from nodes import face_nodes as fn
from nodes import host
from nodes import model_nodes as mn
from nodes import train_nodes as tn
from nodes import video_nodes as vn

from test_nodes import SMALL

MODEL_SOCKETS = {"DR_MODEL", "DECA_MODEL"}
DR_FILE = "synthetic_random_diffusionrig.pt"


class StandInComfy:
    """comfy.model_management and comfy.model_patcher as far as the handle uses them, recording what happens."""

    def __init__(self, dtype_choice=torch.bfloat16):
        self.loaded: set[int] = set()  # ids of the holders ComfyUI has loaded
        self.holders: dict[int, torch.nn.Module] = {}  # every holder seen (kept alive: ids stay unique)
        self.owner: dict[int, int] = {}  # id(module) -> id(its holder)
        self.loads: list[dict] = []
        self.ran: dict[int, int] = {}  # id(holder) -> module calls
        self.violations: list[str] = []
        self.watching = True
        self.dtype_choice, self.dtype_calls = dtype_choice, []
        self.ModelPatcher = self._patcher  # comfy.model_patcher.ModelPatcher

    @staticmethod
    def _patcher(model, load_device, offload_device, size=0):
        return SimpleNamespace(model=model, load_device=load_device, offload_device=offload_device, size=size)

    # comfy.model_management
    def get_torch_device(self):
        return torch.device("cpu")

    unet_offload_device = get_torch_device

    def load_models_gpu(self, models, memory_required=0, force_full_load=False, **_):
        self.loads.append({"patchers": list(models), "memory_required": memory_required,
                           "force_full_load": force_full_load})
        for patcher in models:
            holder = patcher.model
            self.holders[id(holder)] = holder
            self.loaded.add(id(holder))
            self.owner.update({id(m): id(holder) for m in holder.modules()})

    def unload_all_models(self):
        self.loaded.clear()

    def unet_dtype(self, device=None, model_params=0, supported_dtypes=(), **_):
        self.dtype_calls.append({"device": device, "model_params": model_params, "supported": list(supported_dtypes)})
        return self.dtype_choice

    def throw_exception_if_processing_interrupted(self):
        pass

    # the spy: a pre-hook on every module call
    @contextlib.contextmanager
    def unwatched(self):
        """For a test's own reference runs, which use models outside any handle."""
        self.watching = False
        try:
            yield
        finally:
            self.watching = True

    def check_call(self, module, args):
        if not self.watching or not type(module).__module__.startswith("comfy_diffusionrig."):
            return
        # a module of ours outside the models (Train's loss wrapper) answers for the model it wraps
        holder = next((self.owner[id(m)] for m in module.modules() if id(m) in self.owner), None)
        if holder is None:
            self.violations.append(f"{type(module).__name__} ran, but its model was never loaded by ComfyUI")
        elif holder not in self.loaded:
            self.violations.append(f"{type(module).__name__} ran while its model was not loaded")
        else:
            self.ran[holder] = self.ran.get(holder, 0) + 1


@pytest.fixture()
def comfy(monkeypatch, tmp_path):
    """The stand-in installed as host's ComfyUI model management, the spy on; models and caches under tmp_path."""
    stand_in = StandInComfy()
    monkeypatch.setattr(host, "_mm", stand_in)
    monkeypatch.setattr(host, "_model_patcher", stand_in)
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_CACHE", str(tmp_path / "cache"))
    spy = torch.nn.modules.module.register_module_forward_pre_hook(stand_in.check_call)
    yield stand_in
    spy.remove()


@pytest.fixture(scope="module")
def pipe(demo_models):
    """Handles from the loaders and the inputs the nodes need, made outside ComfyUI (the stand-in is not on)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
        (photo,) = fn.LoadFacePhoto().load("examples/astronaut.png")
        (deca,) = fn.LoadDECA().load("deca_model.tar", "torch")
        (dr,) = mn.LoadDiffusionRigModel().load(DR_FILE, "fp32")
        aligned, alignment, _ = fn.DetectAlignFace().align(photo, "largest", 0, "hog", 256)
        (rig,) = fn.DECAFit().fit(deca, aligned, alignment)
        (opened,) = fn.EditExpressionPose().edit(rig, 20.0, 0.0, 0.0, 0.0, 1.0)
        buffers = fn.RenderBuffers().render(deca, rig)["result"][0]
        (code,) = mn.EncodeGlobalCode().encode(dr, aligned)
        gen = torch.Generator().manual_seed(0)
        album = Album(torch.rand(2, 3, 256, 256, generator=gen) * 2 - 1, torch.rand(2, 9, 256, 256, generator=gen),
                      names=["a", "b"])
        yield SimpleNamespace(photo=photo, deca=deca, dr=dr, aligned=aligned, alignment=alignment, rig=rig,
                              opened=opened, buffers=buffers, code=code, album=album)


# One call per node that takes a model, with the models it is given. A node that only reads the weights (Save)
# loads its model without running it.
CALLS = {
    "DiffusionRigDECAFit": (("deca",), lambda p: fn.DECAFit().fit(p.deca, p.aligned, p.alignment)),
    "DiffusionRigRenderBuffers": (("deca",), lambda p: fn.RenderBuffers().render(p.deca, p.rig)),
    "DiffusionRigPasteBack": (("deca",), lambda p: fn.PasteFaceBack().paste(
        p.photo, p.alignment, p.aligned, False, 0.08, "ratio", 2.0, p.deca, p.rig, p.opened)),
    "DiffusionRigEncodeGlobalCode": (("dr",), lambda p: mn.EncodeGlobalCode().encode(p.dr, p.aligned)),
    "DiffusionRigInvert": (("dr",), lambda p: mn.DiffusionRigInvert().invert(
        p.dr, p.aligned, p.buffers, p.code, steps=1, batch_size=4)),
    "DiffusionRigSampler": (("dr",), lambda p: mn.DiffusionRigSampler().sample(
        p.dr, p.buffers, p.code, 0, 1, 0.0, "inversion", 4, source_image=p.aligned, source_buffers=p.buffers)),
    "DiffusionRigBuildAlbum": (("deca",), lambda p: tn.BuildFaceAlbum().build(
        p.deca, size=64, detector="hog", check_identity=False, folder="examples")),
    "DiffusionRigTrain": (("dr",), lambda p: tn.TrainDiffusionRig().train(
        p.dr, p.album, steps=1, learning_rate=1e-4, batch_size=1, seed=0, lora_rank=0, save_name="handle",
        preview_every=0)),
    "DiffusionRigSaveModel": (("dr",), lambda p: tn.SaveDiffusionRigModel().save(p.dr, "handle", "fp16", True)),
    "DiffusionRigRelightVideoClip": (("dr", "deca"), lambda p: vn.RelightVideoClip().relight(
        p.dr, p.deca, p.photo.expand(2, -1, -1, -1), "sliders", 60.0, 20.0, 0.9, 0.5, "#FFFFFF", 0.0, 0.0, 2.0, 0, 1,
        "inversion", "hog", 0, 2)),
}
READS_ONLY = {"DiffusionRigSaveModel"}


def _takes_a_model(cls) -> bool:
    spec = cls.INPUT_TYPES()
    return any(isinstance(entry[0], str) and entry[0] in MODEL_SOCKETS
               for section in ("required", "optional") for entry in spec.get(section, {}).values())


MODEL_NODES = sorted(key for key, cls in nodes.NODE_CLASS_MAPPINGS.items() if _takes_a_model(cls))


def test_every_node_that_takes_a_model_is_driven_here():
    assert len(MODEL_NODES) >= 10
    assert set(CALLS) == set(MODEL_NODES), "add a call for each new node that takes a model to CALLS"


@pytest.mark.parametrize("key", MODEL_NODES)
def test_a_node_runs_its_models_only_after_comfyui_loaded_them(key, pipe, comfy, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path / "models"))  # Train and Save write here
    if key not in CALLS:
        pytest.fail(f"{key} takes a model but has no call in CALLS")
    given, call = CALLS[key]
    call(pipe)
    assert not comfy.violations, f"{key}: {comfy.violations[:3]}"
    assert comfy.loads and all(load["force_full_load"] for load in comfy.loads), key
    loaded = {id(p.model) for load in comfy.loads for p in load["patchers"]}
    assert len(loaded) == len(given), f"{key} was given {given} and loaded {len(loaded)} model(s)"
    if key in READS_ONLY:
        assert not comfy.ran and all(load["memory_required"] == 0 for load in comfy.loads)
    else:
        assert set(comfy.ran) == loaded, f"{key}: a model it loaded never ran"
        assert all(load["memory_required"] > 0 for load in comfy.loads), key


def test_memory_required_is_the_activation_estimate_of_the_batch(pipe, comfy):
    """The Sampler asks for room for one batch (2 of its 3 buffers), not the whole set and not nothing."""
    buffers = pipe.buffers.expand(3, -1, -1, -1)
    mn.DiffusionRigSampler().sample(pipe.dr, buffers, pipe.code, 0, 1, 0.0, "noise", 2)
    (load,) = comfy.loads
    assert load["memory_required"] == pipe.dr.run(lambda model: model.activation_bytes(2))
    assert load["memory_required"] != pipe.dr.run(lambda model: model.activation_bytes(3))


def test_a_trained_copy_gets_a_patcher_of_its_own(pipe, comfy, monkeypatch, tmp_path):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path))
    personal, _ = CALLS["DiffusionRigTrain"][1](pipe)
    trained = comfy.loads[-1]["patchers"][0]
    pipe.dr.run(lambda model: None)
    base = comfy.loads[-1]["patchers"][0]
    assert trained is not base and trained.model is not base.model
    comfy.unload_all_models()
    assert personal.run(lambda model: model) is not pipe.dr.run(lambda model: model)
    assert comfy.loads[-2]["patchers"][0].model is trained.model, "the copy's own holder, loaded again"


def test_the_loaders_load_and_run_nothing(demo_models, comfy, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    (deca,) = fn.LoadDECA().load("deca_model.tar", "torch")
    (dr,) = mn.LoadDiffusionRigModel().load(DR_FILE, "auto")
    assert isinstance(deca, host.ModelHandle) and isinstance(dr, host.ModelHandle)
    assert not comfy.loads and not comfy.ran and not comfy.violations


def _loaded_dtype(demo_models, precision="auto") -> torch.dtype:
    (dr,) = mn.LoadDiffusionRigModel().load(DR_FILE, precision)
    return dr.run(lambda model: next(model.denoisingUNet.parameters()).dtype)


@pytest.mark.parametrize("choice, expected", [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.float8_e4m3fn, torch.float32),  # --fp8_e4m3fn-unet: a precision the pack does not run
    (torch.float16, torch.float32),  # fp16 for the CPU (--fp16-unet --cpu): the pack never runs fp16 there
])
def test_auto_precision_is_comfyuis_choice(choice, expected, demo_models, comfy, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    comfy.dtype_choice = choice
    assert _loaded_dtype(demo_models) == expected
    (asked,) = comfy.dtype_calls
    parameters = sum(p.numel() for p in DiffusionRig(UNetConfig.from_official_kwargs(
        __import__("json").loads((demo_models / "diffusionrig" / "synthetic_random_diffusionrig.json").read_text())
    )).denoisingUNet.parameters())
    assert asked["device"] == torch.device("cpu") and asked["model_params"] == parameters
    assert {torch.bfloat16, torch.float16, torch.float32} <= set(asked["supported"])
    assert _loaded_dtype(demo_models, "fp32") == torch.float32 and len(comfy.dtype_calls) == 1, "only auto asks"


def test_auto_precision_is_comfyuis_fp16_on_a_gpu_without_bf16(demo_models, comfy, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(mn, "torch_device", host.torch_device)
    comfy.dtype_choice = torch.float16
    assert _loaded_dtype(demo_models) == torch.float16  # stored on the offload device, to run on the GPU
    assert comfy.dtype_calls[0]["device"] == torch.device("cuda")


def _overflowing_model(scale: float) -> DiffusionRig:
    """SMALL with non-trivial weights; its first convolution scaled by `scale` (1e5: activations near 1e5 > 65504,
    fp16's largest value, with every weight still below it)."""
    torch.manual_seed(0)
    model = DiffusionRig(SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
        model.denoisingUNet.input_blocks[0][0].weight.mul_(scale)
    model.denoisingUNet.to(torch.float16, memory_format=torch.channels_last)
    return model


def _sample_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(2, 9, 32, 32, generator=gen), torch.randn(2, 64, generator=gen),
            torch.randn(2, 3, 32, 32, generator=gen))


SAMPLERS = {  # the plain UNet call and the feature-cached one (FeatureCache runs forward_split)
    "ddim": lambda model, b, c, n: ddim_sample(model, b, c, n, steps=2),
    "cached": lambda model, b, c, n: edit_faces(model, None, None, b, c, start="noise", steps=4, cache_interval=2,
                                                sampler="dpmpp_2m"),
}


@pytest.mark.parametrize("path", SAMPLERS)
def test_an_fp16_overflow_runs_again_in_fp32(path, comfy, caplog):
    buffers, code, noise = _sample_inputs()
    model = _overflowing_model(1e5)
    reference = copy.deepcopy(model)
    reference.denoisingUNet.float()
    with torch.no_grad():
        with comfy.unwatched():
            assert not bool(torch.isfinite(SAMPLERS[path](copy.deepcopy(model), buffers, code, noise)).all()), \
                "the stand-in model must overflow fp16"
            want = SAMPLERS[path](reference, buffers, code, noise)
        handle = host.ModelHandle(model)
        with caplog.at_level(logging.WARNING, logger="comfy_diffusionrig"):
            got = handle.run(SAMPLERS[path], buffers, code, noise, batch=2)
    assert bool(torch.isfinite(got).all()) and torch.equal(got, want)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "fp16" in warning.getMessage() and "fp32" in warning.getMessage() and "\n" not in warning.getMessage()
    assert handle.run(lambda m: m.dtype) == torch.float32, "the model stays in fp32"
    sizes = [load["patchers"][0].size for load in comfy.loads]
    assert sizes[-1] > sizes[0], "ComfyUI is told the fp32 model's size"
    assert not comfy.violations


def test_an_fp16_model_that_does_not_overflow_keeps_fp16_and_its_result(comfy, caplog):
    buffers, code, noise = _sample_inputs()
    model = _overflowing_model(1.0)
    with torch.no_grad():
        with comfy.unwatched():
            want = SAMPLERS["ddim"](copy.deepcopy(model), buffers, code, noise)
        with caplog.at_level(logging.WARNING, logger="comfy_diffusionrig"):
            got = host.ModelHandle(model).run(SAMPLERS["ddim"], buffers, code, noise)
    assert torch.equal(got, want) and model.dtype == torch.float16 and not caplog.records


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors alive at once (views share their base's storage: not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                size = t.nelement() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size):
        self.live -= size


@pytest.mark.parametrize("config", [SMALL, UNetConfig(image_size=64, num_channels=64, num_res_blocks=1,
                                                      channel_mult=(1, 2, 2), num_head_channels=32, dropout=0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unet_activation_estimate_is_near_the_traced_peak(config, dtype):
    """Within -5 % .. +25 % of the peak traced op by op (on the meta device: shapes only) for 2 images."""
    with torch.device("meta"):
        model = DiffusionRig(config).eval()
    model.denoisingUNet.to(dtype)
    size = config.image_size
    args = [torch.zeros(2, 3, size, size, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
            torch.zeros(2, 9, size, size, device="meta"), torch.zeros(2, config.latent_dim, device="meta")]
    trace = _LiveBytes()
    with torch.no_grad(), trace:
        model.denoise(*args)
    assert 0.95 * trace.peak <= model.activation_bytes(2) <= 1.25 * trace.peak


def test_the_deca_activation_estimate_covers_the_traced_peak(demo_models):
    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame", backend="torch")
    trace = _LiveBytes()
    with torch.no_grad(), trace:
        deca.decode(deca.encode(torch.rand(2, 3, 224, 224)), image_size=256)
    assert trace.peak <= deca.activation_bytes(2) <= 1.5 * trace.peak

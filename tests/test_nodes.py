"""Node contracts and node functions run directly, without ComfyUI."""

from pathlib import Path

import pytest
import torch

import nodes
from nodes import host, model_nodes
from comfy_diffusionrig import save_diffusionrig
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

SMALL = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                   num_head_channels=16, dropout=0.0)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path))
    torch.manual_seed(0)
    model = DiffusionRig(SMALL)
    with torch.no_grad():  # make the zero-initialised output layers non-trivial
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    save_diffusionrig(model, tmp_path / "diffusionrig" / "small.safetensors")
    return tmp_path


def test_every_node_honours_the_contract():
    assert nodes.NODE_CLASS_MAPPINGS and set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, name
        for section in ("required", "optional"):
            for input_name, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, input_name)
                assert isinstance(entry[0], (str, list)), (name, input_name)
                assert entry[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        assert cls.CATEGORY.startswith("DiffusionRig"), name
        assert len(cls.DESCRIPTION) > 40, name


def test_load_lists_and_loads_models(models_dir):
    choices = model_nodes.LoadDiffusionRigModel.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["small.safetensors"]
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    assert model.config == SMALL and not model.run(lambda m: m.training)


def test_missing_model_names_the_folder_and_source(models_dir):
    with pytest.raises(FileNotFoundError) as err:
        model_nodes.LoadDiffusionRigModel().load("model.pt", "auto")
    message = str(err.value)
    assert "Load DiffusionRig Model" in message and "diffusionrig" in message
    assert "github.com/adobe-research/diffusion-rig" in message


def _pipeline_inputs(model):
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 32, 32, 3, generator=gen)
    buffers = torch.rand(3, 9, 32, 32, generator=gen)
    (code,) = model_nodes.EncodeGlobalCode().encode(model, image)
    return image, buffers, code


def test_encode_and_sample_from_noise(models_dir):
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    image, buffers, code = _pipeline_inputs(model)
    assert code.shape == (1, 64)
    sampler = model_nodes.DiffusionRigSampler()
    (out,) = sampler.sample(model, buffers, code, seed=5, steps=3, eta=0.0, start="noise", batch_size=2)
    assert out.shape == (3, 32, 32, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    (again,) = sampler.sample(model, buffers, code, seed=5, steps=3, eta=0.0, start="noise", batch_size=3)
    torch.testing.assert_close(out, again, atol=1e-5, rtol=0)  # chunking does not change results
    # the seed, compared at one batch size (batches of 2 and 3 differ by ~1e-5 from batching alone)
    (other,) = sampler.sample(model, buffers, code, seed=6, steps=3, eta=0.0, start="noise", batch_size=3)
    (same,) = sampler.sample(model, buffers, code, seed=5, steps=3, eta=0.0, start="noise", batch_size=3)
    assert torch.equal(same, again)
    assert (other - again).abs().max() > 1e-2


def test_sample_from_inversion_needs_sources(models_dir):
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    image, buffers, code = _pipeline_inputs(model)
    sampler = model_nodes.DiffusionRigSampler()
    with pytest.raises(ValueError, match="needs inverted_start .*, or both source_image"):
        sampler.sample(model, buffers, code, 0, 3, 0.0, "inversion", 4)
    (out,) = sampler.sample(model, buffers, code, 0, 3, 0.0, "inversion", 4, source_image=image,
                            source_buffers=buffers[:1])
    assert out.shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match=r"3 buffers, 2 global code\(s\) and 2 source face\(s\) do not match"):
        sampler.sample(model, buffers, code.expand(2, -1), 0, 3, 0.0, "noise", 4)


class Interrupted(Exception):
    """What the stand-in for ComfyUI's cancel check raises."""


def _cancel_at_the_second_step(handle, monkeypatch) -> dict:
    """Count the model's denoise calls and have the nodes' cancel check raise Interrupted once two have run."""
    calls = {"denoise": 0}
    model = handle.run(lambda m: m)
    original = model.denoise

    def counting(*args):
        calls["denoise"] += 1
        return original(*args)

    def check():
        if calls["denoise"] >= 2:
            raise Interrupted

    monkeypatch.setattr(model, "denoise", counting)
    monkeypatch.setattr(host, "check_interrupt", check)  # what the nodes' progress callback calls
    return calls


def test_sampler_stops_within_one_step_when_cancelled(models_dir, monkeypatch):
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    _, buffers, code = _pipeline_inputs(model)
    calls = _cancel_at_the_second_step(model, monkeypatch)
    with pytest.raises(Interrupted):
        model_nodes.DiffusionRigSampler().sample(model, buffers, code, 0, 20, 0.0, "noise", 4)
    assert calls["denoise"] == 2  # cancelled after the second step's callback, not at the end


def test_invert_once_then_sample_equals_the_samplers_own_inversion(models_dir):
    """Invert -> Sampler(inverted_start) is the Sampler inverting itself, bit for bit, for every edit of the light."""
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(2, 32, 32, 3, generator=gen)  # two faces, two frames each
    source = torch.rand(2, 9, 32, 32, generator=gen)
    (code,) = model_nodes.EncodeGlobalCode().encode(model, image)
    (start,) = model_nodes.DiffusionRigInvert().invert(model, image, source, code, steps=20, batch_size=4,
                                                        preset="fast")
    sampler = model_nodes.DiffusionRigSampler()
    for k in range(2):  # two light tries from one inversion
        target = torch.rand(4, 9, 32, 32, generator=gen)
        (own,) = sampler.sample(model, target, code, 0, 20, 0.0, "inversion", 4, source_image=image,
                                source_buffers=source, preset="fast")
        (kept,) = sampler.sample(model, target, code, 0, 20, 0.0, "inversion", 4, preset="fast", inverted_start=start)
        assert torch.equal(kept, own)
    with pytest.raises(ValueError, match="DiffusionRig Sampler: the inverted start was made with sampler dpmpp_2m, 8 "
                                         "steps, no feature cache, but this edit asks for sampler ddim, 20 steps"):
        sampler.sample(model, target, code, 0, 20, 0.0, "inversion", 4, inverted_start=start)
    with pytest.raises(ValueError, match="inverted_start is connected but start = noise; set start to inversion"):
        sampler.sample(model, target, code, 0, 20, 0.0, "noise", 4, preset="fast", inverted_start=start)
    with pytest.raises(ValueError, match="connect either inverted_start .* or source_image and source_buffers, not"):
        sampler.sample(model, target, code, 0, 20, 0.0, "inversion", 4, source_image=image, source_buffers=source,
                       preset="fast", inverted_start=start)
    (bf16,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "bf16")
    with pytest.raises(ValueError, match=r"DiffusionRig Sampler: the inverted start was made with another model "
                                         r"\(DiffusionRig 32 px float32"):
        sampler.sample(bf16, target, code, 0, 20, 0.0, "inversion", 4, preset="fast", inverted_start=start)
    with pytest.raises(ValueError, match="DiffusionRig Invert: 2 source image.* but 1 source buffer"):
        model_nodes.DiffusionRigInvert().invert(model, image, source[:1], code, 20, 4)


def test_invert_stops_within_one_step_when_cancelled(models_dir, monkeypatch):
    (model,) = model_nodes.LoadDiffusionRigModel().load("small.safetensors", "fp32")
    image, buffers, code = _pipeline_inputs(model)
    calls = _cancel_at_the_second_step(model, monkeypatch)
    with pytest.raises(Interrupted):
        model_nodes.DiffusionRigInvert().invert(model, image, buffers[:1], code, 20, 4)
    assert calls["denoise"] == 2  # cancelled after the second step's callback, not at the end


def test_image_conversions_round_trip():
    image = torch.rand(2, 8, 8, 3)
    back = host.model_to_image(host.image_to_model(image, "test"))
    torch.testing.assert_close(back, image, atol=1e-6, rtol=0)
    # a non-square IMAGE with one known pixel: row 1, column 4 pure red; rows are height, columns width
    image = torch.zeros(1, 5, 7, 3)
    image[0, 1, 4, 0] = 1.0
    model = host.image_to_model(image, "test")
    assert model.shape == (1, 3, 5, 7) and model[0, 0, 1, 4] == 1 and int((model > -1).sum()) == 1
    back = host.model_to_image(model)
    assert back.shape == (1, 5, 7, 3) and torch.equal(back, image)
    assert host.pil_to_image(host.image_to_pil(image, "test")).shape == (1, 5, 7, 3)
    assert host.image_to_pil(image, "test")[0].getpixel((4, 1)) == (255, 0, 0)  # PIL: (x, y)
    rgba = torch.rand(1, 8, 8, 4)
    assert host.image_to_model(rgba, "test").shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="test: expected an IMAGE batch"):
        host.image_to_model(torch.rand(8, 8, 3), "test")


def test_importing_the_pack_does_no_work():
    """ComfyUI imports every pack at start-up: ours must not load dlib, scipy or any model file then."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, builtins; sys.path.insert(0, {root!r}); opened = []\n"
            "real = builtins.open\n"
            "builtins.open = lambda f, *a, **k: (opened.append(str(f)), real(f, *a, **k))[1]\n"
            "import nodes\n"
            "print([m for m in ('dlib', 'scipy', 'safetensors', 'insightface') if m in sys.modules])\n"
            "print([f for f in opened if f.endswith(('.pt', '.tar', '.pkl', '.npy', '.npz', '.dat', '.safetensors'))])\n"
            ).format(root=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]", out


def test_node_names_come_from_one_map():
    # each node's display name is its class's DISPLAY_NAME, and its error messages use that name
    import inspect

    for key, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == cls.DISPLAY_NAME
        source = inspect.getsource(cls)
        for other in nodes.NODE_DISPLAY_NAME_MAPPINGS.values():
            assert f'node = "{other}"' not in source and f'f"{other}: ' not in source, (key, other)

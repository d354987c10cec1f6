"""LoRA adapters: injection, stable file format, round trip, merge equivalence, refusals."""

import pytest
import torch
from torch import nn

from comfy_diffusionrig import save_diffusionrig
from comfy_diffusionrig.model.checkpoints import CheckpointError, read_state_dict
from comfy_diffusionrig.model.lora import (
    LoRALayer, inject_lora, load_lora, lora_info, lora_layers, lora_state_dict, merge_lora, read_lora, save_lora,
)
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

TINY = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                  num_head_channels=16, dropout=0.0)


def base_model() -> DiffusionRig:
    """Tiny model with every zero-initialised weight re-drawn, so every layer affects the output."""
    torch.manual_seed(0)
    model = DiffusionRig(TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def perturb_adapters(model: DiffusionRig, seed: int = 2) -> None:
    """Give the (zero-initialised) up weights values, as training would, and change encoder BN stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.05)
        model.encoder.bn1.running_mean.add_(0.5)
        model.encoder.bn1.num_batches_tracked.add_(7)


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 3, 32, 32, generator=g), torch.tensor([10, 700][:batch]),
            torch.rand(batch, 9, 32, 32, generator=g), torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1)


@torch.no_grad()
def output(model: DiffusionRig) -> torch.Tensor:
    """eps for fixed inputs, with the global code from the (eval-mode) encoder, so BN stats matter."""
    x, t, buffers, image = inputs()
    return model.denoise(x, t, buffers, model.encode(image))


def test_injection_targets_and_freezing():
    model = base_model()
    counts = {}
    for targets in (("attention",), ("conv",), ("embedding",)):
        fresh = base_model()
        counts[targets[0]] = len(inject_lora(fresh, rank=4, targets=targets))
    n_conv2d = sum(isinstance(m, nn.Conv2d) for m in model.denoisingUNet.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.denoisingUNet.modules())
    n_attn = sum(name.endswith((".qkv", ".proj_out")) for name, _ in model.denoisingUNet.named_modules())
    assert counts == {"attention": n_attn, "conv": n_conv2d, "embedding": n_linear}
    assert n_attn > 0 and n_conv2d > 0

    names = inject_lora(model, rank=4)
    assert names[0] == "denoisingUNet.input_blocks.0.0" and "denoisingUNet.middle_block.1.qkv" in names
    assert set(lora_layers(model)) == set(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("encoder.") for n in trainable)
    assert not any(p.requires_grad for layer in lora_layers(model).values() for p in layer.base.parameters())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        inject_lora(model, rank=4)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        inject_lora(base_model(), rank=4, targets=("norm",))


def test_fresh_adapters_leave_the_output_unchanged():
    model = base_model()
    before = output(model)
    inject_lora(model, rank=4, targets=("attention", "conv", "embedding"))
    # the up projections start at zero: the adapted model is exactly the base model
    torch.testing.assert_close(output(model), before, atol=0, rtol=0)


def test_adapters_receive_gradients():
    model = base_model()
    inject_lora(model, rank=4)
    perturb_adapters(model)
    x, t, buffers, image = inputs()
    model.denoise(x, t, buffers, model.encode(image)).square().mean().backward()
    layers = lora_layers(model).values()
    assert all(layer.lora_down.weight.grad is not None and layer.lora_up.weight.grad is not None for layer in layers)
    assert all(layer.base.weight.grad is None for layer in layers)


def test_save_load_round_trip(tmp_path):
    model = base_model()
    inject_lora(model, rank=4, alpha=8, targets=("attention", "conv", "embedding"))
    perturb_adapters(model)
    expected = output(model)
    path = save_lora(model, tmp_path / "alice.safetensors")

    tensors, meta = read_state_dict(path)
    assert meta["format"] == "comfy-diffusionrig-lora" and meta["rank"] == "4" and float(meta["alpha"]) == 8.0
    # documented, stable key names: official layer name + .lora_down/.lora_up, encoder BN stats verbatim
    assert tensors["denoisingUNet.middle_block.1.qkv.lora_down.weight"].shape == (4, 64, 1)
    assert tensors["denoisingUNet.middle_block.1.qkv.lora_up.weight"].shape == (192, 4, 1)
    assert tensors["denoisingUNet.input_blocks.1.0.in_layers.2.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors["denoisingUNet.time_embed.0.lora_up.weight"].shape == (128, 4)
    assert int(tensors["encoder.bn1.num_batches_tracked"]) == 7
    assert not any(k.endswith(".base.weight") for k in tensors)
    assert set(tensors) == set(lora_state_dict(model))
    _, info = read_lora(path)
    assert (info.rank, info.alpha, info.targets, info.base_config) == (4, 8.0, ("attention", "conv", "embedding"), TINY)

    loaded = load_lora(base_model(), path)
    assert lora_info(loaded) == lora_info(model)
    # the same tensors in the same layers: bit-identical output
    torch.testing.assert_close(output(loaded), expected, atol=0, rtol=0)


def test_half_precision_file(tmp_path):
    model = base_model()
    inject_lora(model, rank=4)
    perturb_adapters(model)
    path = save_lora(model, tmp_path / "a.safetensors", dtype="fp16")
    tensors, _ = read_state_dict(path)
    assert tensors["denoisingUNet.middle_block.1.qkv.lora_up.weight"].dtype == torch.float16
    assert tensors["encoder.bn1.num_batches_tracked"].dtype == torch.int64
    loaded = load_lora(base_model(), path)
    assert loaded.denoisingUNet.middle_block[1].qkv.lora_up.weight.dtype == torch.float32
    # fp16 rounding of adapter weights (relative 2^-11) on top of an O(1) output
    torch.testing.assert_close(output(loaded), output(model), atol=1e-3, rtol=0)


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_merge_matches_the_adapters(strength):
    model = base_model()
    base_keys = list(model.state_dict())
    inject_lora(model, rank=4, alpha=2, targets=("attention", "conv", "embedding"))
    perturb_adapters(model)
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.alpha *= strength  # the unmerged reference at this strength
    expected = output(model)
    for layer in layers:
        layer.alpha = 2.0
    merged = merge_lora(model, strength=strength)
    assert not lora_layers(merged) and list(merged.state_dict()) == base_keys
    # W x + s*up(down x) vs (W + s*up@down) x: the same sum in another order, float32 round-off only
    torch.testing.assert_close(output(merged), expected, atol=1e-5, rtol=1e-5)


def test_merged_model_saves_in_the_official_layout(tmp_path):
    model = base_model()
    inject_lora(model, rank=4)
    perturb_adapters(model)
    expected = output(model)
    merge_lora(model)
    from comfy_diffusionrig import load_diffusionrig

    path = save_diffusionrig(model, tmp_path / "merged.safetensors")
    torch.testing.assert_close(output(load_diffusionrig(path)), expected, atol=1e-5, rtol=1e-5)


def test_lora_on_another_architecture_is_refused(tmp_path):
    model = base_model()
    inject_lora(model, rank=4)
    path = save_lora(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    other = DiffusionRig(UNetConfig(**{**TINY.to_dict(), "num_channels": 64}))
    with pytest.raises(CheckpointError, match=r"different architecture .*num_channels: 32 vs 64.*base model it"):
        load_lora(other, path)
    # training-only settings do not matter
    same = DiffusionRig(UNetConfig(**{**TINY.to_dict(), "dropout": 0.1, "use_checkpoint": True}))
    assert lora_layers(load_lora(same, path))


def test_full_model_file_is_not_a_lora(tmp_path):
    path = save_diffusionrig(base_model(), tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match="not a DiffusionRig LoRA.*load_diffusionrig"):
        load_lora(base_model(), path)


def test_unsupported_layer_is_refused():
    with pytest.raises(TypeError, match="LoRA supports"):
        LoRALayer(nn.Conv2d(4, 4, 3, groups=2), rank=2, alpha=2)


def test_damaged_lora_files_are_refused_with_the_path(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = base_model()
    inject_lora(model, rank=2)
    path = save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    damaged = tmp_path / "damaged.safetensors"
    for change, message in (({"rank": "0"}, "rank 0"), ({"alpha": "nan"}, "alpha nan"),
                            ({"targets": '["everything"]'}, "everything"), ({"base_config": "{"}, "Expecting property name")):
        save_file(tensors, damaged, metadata={**metadata, **change})
        with pytest.raises(CheckpointError, match=rf"damaged\.safetensors has damaged LoRA metadata.*{message}"):
            load_lora(base_model(), damaged)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    save_file({**tensors, key: tensors[key].to(torch.int64)}, damaged, metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"shape or type mismatches .*{key}.*torch.int64"):
        load_lora(base_model(), damaged)
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, damaged, metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"damaged\.safetensors: 1 weight\(s\) hold NaN.*{key}"):
        load_lora(base_model(), damaged)

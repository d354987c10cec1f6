"""UNet and encoder: official layout, strict loading and single-forward parity."""

import json

import pytest
import torch

from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig, timestep_embedding

from conftest import reference_file

# README: independent CPU fp32 implementation, single forward / detail_cond: atol 1e-5 rtol 1e-5
ATOL = RTOL = 1e-5


@pytest.mark.parametrize("name,encoder", [("full_keys.json", "resnet18"), ("full_keys_resnet50.json", "resnet50")])
def test_full_size_state_dict_layout_matches_official(name, encoder):
    ref = json.loads(reference_file("diffusionrig", name).read_text())
    with torch.device("meta"):
        model = DiffusionRig(UNetConfig(encoder_type=encoder))
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == [[k, list(shape), dtype] for k, shape, dtype in ref["keys"]]
    if "params_denoisingUNet" in ref:
        assert sum(p.numel() for p in model.denoisingUNet.parameters()) == ref["params_denoisingUNet"]
        assert sum(p.numel() for p in model.encoder.parameters()) == ref["params_encoder"]


def test_official_kwargs_give_official_defaults(dr_ref):
    kwargs = dr_ref("full_keys.json")["create_model_and_diffusion_kwargs"]
    assert UNetConfig.from_official_kwargs(kwargs) == UNetConfig()
    assert UNetConfig().attention_downsample == (16,)
    assert UNetConfig().channel_mults == (1, 1, 2, 2, 4, 4)


def test_tiny_config_derived_facts(tiny_kwargs, dr_ref):
    cfg = UNetConfig.from_official_kwargs(tiny_kwargs)
    derived = dr_ref("tiny_config.json")["derived"]
    assert list(cfg.attention_downsample) == derived["attention_downsample_factors"]
    with torch.device("meta"):
        model = DiffusionRig(cfg)
    attn = sorted({k.rsplit(".", 2)[0] for k in model.state_dict() if k.endswith("qkv.weight")})
    assert attn == sorted(derived["attention_block_prefixes"])
    assert sum(p.numel() for p in model.denoisingUNet.parameters()) == derived["params_denoisingUNet"]


def test_config_round_trip_and_bad_values(tiny_kwargs):
    cfg = UNetConfig.from_official_kwargs(tiny_kwargs)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({"num_chanels": 32})
    with pytest.raises(ValueError, match="predict_xstart"):
        UNetConfig.from_official_kwargs({**tiny_kwargs, "predict_xstart": True})
    with pytest.raises(ValueError, match="encoder_type"):
        UNetConfig(encoder_type="vit")


def test_timestep_embedding_is_cos_then_sin(dr_ref):
    io = dr_ref("tiny_io.pt")
    torch.testing.assert_close(timestep_embedding(io["t"], 32), io["timestep_embedding"], atol=ATOL, rtol=RTOL)


def test_encoder_matches_official(tiny_model, dr_ref):
    io = dr_ref("tiny_io.pt")
    with torch.no_grad():
        code = tiny_model.encode(io["x_start"])
    torch.testing.assert_close(code, io["detail_cond"], atol=ATOL, rtol=RTOL)


def test_single_forward_matches_official(tiny_model, dr_ref):
    io = dr_ref("tiny_io.pt")
    with torch.no_grad():
        eps = tiny_model.denoise(io["x_t"], io["t"], io["physic_cond"], io["detail_cond"])
        via_forward = tiny_model(io["x_t"], io["t"], io["physic_cond"], io["detail_cond"])
    torch.testing.assert_close(eps, io["eps"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(via_forward, eps, atol=0, rtol=0)


def test_new_attention_order_and_learn_sigma_change_the_model(tiny_kwargs, dr_ref):
    io = dr_ref("tiny_io.pt")
    sd = dr_ref("tiny_model.pt")
    new_order = DiffusionRig(UNetConfig.from_official_kwargs({**tiny_kwargs, "use_new_attention_order": True})).eval()
    new_order.load_state_dict(sd)
    with torch.no_grad():
        eps = new_order.denoise(io["x_t"], io["t"], io["physic_cond"], io["detail_cond"])
    # same weights, different q/k/v split: the output must differ from the legacy one
    assert (eps - io["eps"]).abs().max() > 1e-3
    sigma = DiffusionRig(UNetConfig.from_official_kwargs({**tiny_kwargs, "learn_sigma": True})).eval()
    assert sigma.denoisingUNet.out[2].out_channels == 6
    with torch.no_grad():
        assert sigma.denoise(io["x_t"], io["t"], io["physic_cond"], io["detail_cond"]).shape == (2, 3, 64, 64)


def test_bad_image_size_and_non_finite_input(tiny_model):
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_model.check_image_size(66, 64)
    with pytest.raises(ValueError, match="NaN"):
        tiny_model.encode(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.encode(torch.zeros(3, 64, 64))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_kwargs, dr_ref):
    sd = dr_ref("tiny_model.pt")
    io = dr_ref("tiny_io.pt")
    grads = []
    for use_checkpoint in (False, True):
        model = DiffusionRig(UNetConfig.from_official_kwargs({**tiny_kwargs, "use_checkpoint": use_checkpoint}))
        model.load_state_dict(sd)
        model.train()
        eps = model.denoise(io["x_t"], io["t"], io["physic_cond"], io["detail_cond"])
        eps.square().mean().backward()
        grads.append(model.denoisingUNet.input_blocks[1][0].in_layers[2].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)

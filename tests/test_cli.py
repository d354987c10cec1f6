"""The command line, run in-process."""

import json

import torch

from comfy_diffusionrig.cli import main
from comfy_diffusionrig.checkpoints import read_state_dict

from conftest import reference_file


def test_convert_official_checkpoint_to_safetensors(tmp_path, tiny_kwargs, capsys):
    src = reference_file("diffusionrig", "tiny_model.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_kwargs))
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(src), str(out), "--config", str(tmp_path / "cfg.json")]) == 0
    tensors, meta = read_state_dict(out)
    reference = torch.load(src, weights_only=True)
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert json.loads(meta["config"])["num_channels"] == 32
    assert main(["info", str(out)]) == 0
    assert '"params_unet": 1481859' in capsys.readouterr().out
    # a second convert refuses to overwrite and says so
    assert main(["convert", str(src), str(out), "--config", str(tmp_path / "cfg.json")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.pt")]) == 2
    assert "models/diffusionrig" in capsys.readouterr().err

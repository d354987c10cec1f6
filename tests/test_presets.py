"""Preset files: the shipped light presets are the code's presets, files round-trip, bad files are refused."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from comfy_diffusionrig.face.lighting import light_preset_document, preset_light
from comfy_diffusionrig.face.presets import (
    LIGHT_PRESETS,
    PRESET_VERSION,
    PresetError,
    light_preset_file_name,
    load_preset,
    make_preset,
    preset_json,
    save_preset,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"


def test_every_named_light_ships_as_a_file():
    assert sorted(p.name for p in PRESETS.glob("*.json")) == sorted(light_preset_file_name(n) for n in LIGHT_PRESETS)


@pytest.mark.parametrize("name", list(LIGHT_PRESETS))
def test_shipped_light_files_equal_the_code(name):
    path = PRESETS / light_preset_file_name(name)
    assert path.read_text() == preset_json(light_preset_document(name)), "regenerate: python tools/make_examples.py"
    preset = load_preset(path)
    assert preset["name"] == name
    # 6 decimals in the file
    torch.testing.assert_close(torch.tensor(preset["light"]["sh"]), preset_light(name), atol=1e-6, rtol=0)
    sliders = preset["light"]["sliders"]
    assert {**sliders, "color": tuple(sliders["color"])} == LIGHT_PRESETS[name]


def test_save_and_load_round_trip(tmp_path):
    sh = (torch.arange(27, dtype=torch.float64).reshape(9, 3) / 7 - 1).tolist()
    edit = {"expression": [0.1 * i for i in range(50)], "jaw_pose": [0.2, 0.0, 0.01],
            "head_turn": {"yaw": 10.0, "pitch": -5.0, "roll": 0.0}}
    document = make_preset("mine", sh=sh, sliders={"azimuth": 30.0, "environment": "x.hdr"}, edit=edit)
    path = save_preset(tmp_path / "sub" / "mine", document)
    assert path.name == "mine.json" and path.is_file()
    loaded = load_preset(path)
    assert loaded == document
    assert loaded["light"]["sh"] == [[round(v, 6) for v in row] for row in sh]
    assert loaded["edit"]["expression"] == pytest.approx(edit["expression"])
    assert json.loads(path.read_text())["version"] == PRESET_VERSION
    with pytest.raises(FileExistsError, match="already exists"):
        save_preset(path, document)
    save_preset(path, make_preset("other", edit={"jaw_pose": [0.0, 0.0, 0.0]}), overwrite=True)
    assert load_preset(path)["name"] == "other" and "light" not in load_preset(path)
    assert not list(path.parent.glob("*.tmp"))


def _write(tmp_path, name, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_preset_files_are_refused_with_the_file_name(tmp_path):
    good = make_preset("g", sh=[[1.0, 1.0, 1.0]] * 9)
    nan_sh = {**good, "light": {"sh": [[math.nan, 1.0, 1.0]] + [[1.0, 1.0, 1.0]] * 8}}
    cases = {
        "text.json": ("{not json", "not a JSON preset file"),
        "workflow.json": ({"nodes": [], "links": []}, "not a comfy-diffusionrig preset"),
        "future.json": ({**good, "version": PRESET_VERSION + 1}, "newer comfy-diffusionrig"),
        "rows.json": ({**good, "light": {"sh": [[1.0, 1.0, 1.0]] * 8}}, "9 rows"),
        "nan.json": (json.dumps(nan_sh), "finite numbers"),  # Python writes NaN, JSON readers accept it
        "extra.json": ({**good, "edit": {"smile": 1}}, "unknown edit entries"),
        "empty.json": ({"format": good["format"], "version": 1}, "neither a light nor an edit"),
    }
    for name, (content, problem) in cases.items():
        path = _write(tmp_path, name, content)
        with pytest.raises(PresetError, match=problem) as error:
            load_preset(path)
        assert str(path) in str(error.value)
        assert isinstance(error.value, ValueError)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_preset(tmp_path / "nope.json")


def test_presets_module_stays_free_of_torch():
    # the command line lists and checks presets without importing torch
    import subprocess

    code = "import sys, comfy_diffusionrig.face.presets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"

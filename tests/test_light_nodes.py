"""Light nodes run directly (as ComfyUI's executor calls them): Light from Environment, Save / Load Rig Preset."""

import json

import numpy as np
import pytest
import torch

from comfy_diffusionrig.face.environment import load_environment, sh_from_environment, studio_environment, write_hdr
from comfy_diffusionrig.face.lighting import normalize_light, preset_light, sh_from_direction
from comfy_diffusionrig.face.rig import edit_pose
from nodes import host
from nodes import light_nodes as ln
from test_rig import _rig

STUDIO = "examples/studio_key_fill.hdr"


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_INPUT", str(tmp_path / "input"))
    (tmp_path / "input").mkdir()
    return tmp_path


def test_environment_files_are_listed(folders):
    write_hdr(folders / "input" / "room.hdr", studio_environment(8, 16))
    (folders / "input" / "face.png").write_bytes(b"")
    choices = ln.LightFromEnvironment.INPUT_TYPES()["required"]["environment"][0]
    assert choices == [ln.NO_FILE, "room.hdr", STUDIO]


def test_light_from_the_example_studio(folders):
    rig = _rig(2)
    node = ln.LightFromEnvironment()
    out, sphere, panorama = node.relight(rig, STUDIO, 0.0, 0.0, "portrait")
    expected = normalize_light(sh_from_environment(load_environment(host.EXAMPLE_IMAGES / "studio_key_fill.hdr")))
    torch.testing.assert_close(out.codes["light"], expected.expand(2, -1, -1))
    assert torch.equal(out.codes["shape"], rig.codes["shape"])
    assert sphere.shape == (2, 256, 256, 3) and panorama.shape == (1, 256, 512, 3)
    grey = sphere[0].mean(-1)
    assert float(grey[:, 160:].mean()) > 1.5 * float(grey[:, :96].mean())  # the key is on image right
    doubled = node.relight(rig, STUDIO, 0.0, 1.0, "portrait")[0]
    torch.testing.assert_close(doubled.codes["light"], 2 * out.codes["light"])
    raw = node.relight(rig, STUDIO, 30.0, 0.0, "as exposed")[0]
    torch.testing.assert_close(raw.codes["light"][0], sh_from_environment(load_environment(
        host.EXAMPLE_IMAGES / "studio_key_fill.hdr"), yaw=30.0))


def test_an_8bit_panorama_image_is_linearised_and_wins_over_the_file(folders):
    srgb = torch.full((1, 64, 128, 3), 0.5)
    out = ln.LightFromEnvironment().relight(_rig(1), STUDIO, 0.0, 0.0, "as exposed", panorama=srgb)[0]
    # a uniform sRGB 0.5 panorama is linear 0.214 everywhere: a white furnace shades every normal 0.214
    light = out.codes["light"][0]
    torch.testing.assert_close(light, sh_from_direction(0.0, 0.0, 0.0, 0.2140411, (1.0, 1.0, 1.0)), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="Light from Environment \\(HDRI\\): choose an environment file or connect"):
        ln.LightFromEnvironment().relight(_rig(1), ln.NO_FILE, 0.0, 0.0, "portrait")


def test_a_corrupt_environment_file_names_the_node_and_file(folders):
    (folders / "input" / "broken.hdr").write_bytes(b"#?RADIANCE\n\n-Y 4 +X 8\n\x00")
    with pytest.raises(ValueError, match=r"Light from Environment \(HDRI\): .*broken\.hdr: truncated"):
        ln.LightFromEnvironment().relight(_rig(1), "broken.hdr", 0.0, 0.0, "portrait")


def test_save_then_load_a_light_and_an_edit(folders):
    rig = _rig(1, seed=1).with_light(sh_from_direction(35.0, 20.0, 0.8, 0.4, (1.0, 0.9, 0.8)))
    edited = edit_pose(rig, yaw=15.0, jaw_open=10.0)
    save = ln.SaveRigPreset()
    result = save.save(edited, "team/warm_turn", True, True, True, 0, False, original=rig)
    path = folders / "models" / host.PRESET_FOLDER / "team" / "warm_turn.json"
    assert result["result"] == (str(path.resolve()),) and path.is_file()
    document = json.loads(path.read_text())
    assert document["name"] == "warm_turn" and document["edit"]["head_turn"]["yaw"] == pytest.approx(15.0, abs=1e-3)
    choices = ln.LoadRigPreset.INPUT_TYPES()["required"]["preset"][0]
    assert choices[0] == "team/warm_turn.json" and "pack/light_rembrandt.json" in choices
    other = _rig(2, seed=2)
    out, sphere = ln.LoadRigPreset().load(other, "team/warm_turn.json", True, True, True)
    torch.testing.assert_close(out.codes["light"], rig.codes["light"].expand(2, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.codes["exp"], edited.codes["exp"].expand(2, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.codes["pose"][:, 3:6], edited.codes["pose"][:, 3:6].expand(2, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.codes["pose"][:, :3], edit_pose(other, yaw=15.0).codes["pose"][:, :3], atol=1e-4,
                               rtol=0)
    assert sphere.shape == (2, 256, 256, 3)
    light_only = ln.LoadRigPreset().load(other, "team/warm_turn.json", True, False, False)[0]
    assert torch.equal(light_only.codes["pose"], other.codes["pose"])
    with pytest.raises(ValueError, match="Save Rig Preset: preset .* already exists"):
        save.save(edited, "team/warm_turn", True, False, False, 0, False)
    save.save(edited, "team/warm_turn", True, False, False, 0, True)
    with pytest.raises(ValueError, match="not a file name inside"):
        save.save(edited, "../outside", True, False, False, 0, False)
    ln.LoadRigPreset.IS_CHANGED(other, "team/warm_turn.json", True, True, True)


def test_load_the_packs_named_lights_and_refuse_bad_files(folders):
    out = ln.LoadRigPreset().load(_rig(1), "pack/light_golden_hour.json", True, True, True)[0]
    torch.testing.assert_close(out.codes["light"][0], preset_light("golden hour"), atol=1e-6, rtol=0)
    bad = folders / "models" / host.PRESET_FOLDER / "bad.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"format": "comfy-diffusionrig preset", "version": 99, "light": {}}))
    with pytest.raises(ValueError, match=r"Load Rig Preset: .*bad\.json: preset version 99"):
        ln.LoadRigPreset().load(_rig(1), "bad.json", True, True, True)
    with pytest.raises(FileNotFoundError, match="Load Rig Preset: model file 'gone.json' not found.*Save Rig Preset"):
        ln.LoadRigPreset().load(_rig(1), "gone.json", True, True, True)
    with pytest.raises(FileNotFoundError, match="the pack has no preset"):
        ln.LoadRigPreset().load(_rig(1), "pack/../README.md", True, True, True)
    assert np.isfinite(out.codes["light"].numpy()).all()

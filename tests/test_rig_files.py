"""Rigged photos (an aligned face carrying its rig), and the offline demo's person made visible with them:
the demo's world renders through the pack's own renderer, the CLI and the nodes edit a rigged photo
without detection or fitting, and the demo installs its models and person where both find them."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from comfy_diffusionrig.cli import main
from comfy_diffusionrig.face.deca import load_deca
from comfy_diffusionrig.demo.run import demo_file_names, DemoConfig, install_demo, run_demo, side_balance
from comfy_diffusionrig.demo.world import World
from comfy_diffusionrig.editing import edit_faces
from comfy_diffusionrig.face.flame import head_id
from comfy_diffusionrig.core.imaging import pil_to_tensor, tensor_to_pil
from comfy_diffusionrig.face.lighting import sh_from_direction
from comfy_diffusionrig.pipeline import Models, edit_photo, find_checkpoint
from comfy_diffusionrig.face.rig import render_layers, render_rig
from comfy_diffusionrig.face.rig_files import RIG_CHUNK, RigFileError, load_rigged_photo, read_rig, save_rigged_photo
from comfy_diffusionrig.model.unet import DiffusionRig

NAMES = demo_file_names(DemoConfig())


@pytest.fixture(scope="module")
def world(demo_models):
    return World(demo_models / "flame", 32, seed=3)


@pytest.fixture(scope="module")
def deca(demo_models):
    return load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame", backend="torch")


def _same_rig(a, b):
    assert a.image_size == b.image_size and a.head == b.head
    assert all(torch.equal(a.codes[k], b.codes[k]) for k in a.codes)
    assert torch.equal(a.tform, b.tform) and torch.equal(a.ffhq_center, b.ffhq_center)


def test_the_world_renders_through_the_pack_renderer(world, deca):
    """World.photograph draws its buffers with its own camera (no tform, head unmoved); the rig it hands out
    must give the same buffers through DECA's decode path (tform, FFHQ centre), which the nodes and CLI use."""
    person = world.subjects(1)[0]
    views = world.views(3)
    _, buffers = world.photograph(person, views)
    rig = world.rig(person, views)
    assert rig.head == head_id(deca.flame) and rig.image_size == (32, 32)
    assert torch.allclose(render_rig(deca, rig), buffers, atol=1e-4)
    # a wrong camera, centre or view would draw another face
    moved = replace(rig, ffhq_center=rig.ffhq_center + torch.tensor([0.02, 0.0, 0.0]))
    assert (render_rig(deca, moved) - buffers).abs().max() > 0.1
    assert (render_rig(deca, rig.select([1, 0, 2])) - buffers).abs().max() > 0.1


def test_a_rigged_photo_keeps_its_rig_exactly(world, tmp_path):
    person = world.subjects(1)[0]
    views = world.views(2)
    photos, _ = world.photograph(person, views)
    rig = world.rig(person, views)
    path = save_rigged_photo(tmp_path / "face.png", tensor_to_pil(photos[1]), rig, index=1)
    image, loaded = load_rigged_photo(path)
    _same_rig(loaded, rig.select(1))
    assert torch.equal(pil_to_tensor([image]), pil_to_tensor([tensor_to_pil(photos[1])]))
    with pytest.raises(FileExistsError):
        save_rigged_photo(path, tensor_to_pil(photos[0]), rig)
    with pytest.raises(RigFileError, match="PNG"):
        save_rigged_photo(tmp_path / "face.jpg", tensor_to_pil(photos[0]), rig)
    with pytest.raises(RigFileError, match="64x64"):
        save_rigged_photo(tmp_path / "big.png", tensor_to_pil(photos[0]).resize((64, 64)), rig)


def _with_chunk(path: Path, text: str, size: int = 32) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(RIG_CHUNK, text, zip=True)
    Image.new("RGB", (size, size)).save(path, pnginfo=info)
    return path


def test_photos_without_a_rig_and_broken_rigs(world, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(plain)
    Image.new("RGB", (32, 32)).save(tmp_path / "plain.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert read_rig(plain) is None and read_rig(tmp_path / "plain.jpg") is None
    assert read_rig(tmp_path / "notes.txt") is None
    with pytest.raises(RigFileError, match="carries no face rig"):
        load_rigged_photo(plain)
    person = world.subjects(1)[0]
    views = world.views(1)
    path = save_rigged_photo(tmp_path / "good.png", tensor_to_pil(world.photograph(person, views)[0][0]),
                             world.rig(person, views))
    document = json.loads(Image.open(path).text[RIG_CHUNK])

    def broken(name: str, change, match: str, size: int = 32):
        doc = json.loads(json.dumps(document))
        change(doc)
        with pytest.raises(RigFileError, match=match) as err:
            read_rig(_with_chunk(tmp_path / name, json.dumps(doc), size))
        assert name in str(err.value)

    broken("nan.png", lambda d: d["codes"]["exp"].__setitem__(3, float("nan")), "NaN")
    broken("short.png", lambda d: d["codes"].__setitem__("shape", d["codes"]["shape"][:10]), r"shape.*\(10,\)")
    broken("missing.png", lambda d: d["codes"].pop("light"), "lacks codes")
    broken("future.png", lambda d: d.__setitem__("version", 9), "version 9")
    broken("other.png", lambda d: d.__setitem__("format", "something else"), "not a comfy-diffusionrig face rig")
    broken("resized.png", lambda d: None, "was it resized", size=64)
    with pytest.raises(RigFileError, match="not valid JSON"):
        read_rig(_with_chunk(tmp_path / "garbled.png", "{not json"))


def test_a_rig_of_another_flame_model_is_refused(world, deca):
    person = world.subjects(1)[0]
    rig = world.rig(person, world.views(1))
    with pytest.raises(ValueError, match="another FLAME model"):
        render_layers(deca, replace(rig, head="0123456789abcdef"))
    render_layers(deca, replace(rig, head=None))  # unknown head: rendered as before


def test_editing_a_rigged_photo_uses_its_true_buffers(world, deca):
    """edit_photo with a rig skips detection and fitting (DECA's random stand-in could not fit the synthetic
    face) and denoises exactly what edit_faces gives under the world's own buffers."""
    person = world.subjects(1)[0]
    views = world.views(1)
    photos, buffers = world.photograph(person, views)
    rig = world.rig(person, views)
    torch.manual_seed(0)
    model = DiffusionRig(DemoConfig().unet()).eval()
    light = sh_from_direction(60.0, 20.0, 0.9, 0.45)
    photo = tensor_to_pil(photos[0])
    result = edit_photo(Models(model, deca), photo, lambda r: r.with_light(light), steps=3, rig=rig)
    assert len(result.photos) == 1 and result.photos[0].size == (32, 32)  # the face itself, nothing pasted
    lit = {**views[0], "light": torch.as_tensor(light, dtype=torch.float32)}
    target = world.photograph(person, [lit])[1]
    x = pil_to_tensor([photo]) * 2 - 1
    with torch.no_grad():
        code = model.encode(x)
    expected = edit_faces(model, x, buffers, target, code, steps=3)
    assert torch.equal(pil_to_tensor(result.faces), pil_to_tensor([tensor_to_pil(expected[0])]))


def test_side_balance_follows_the_light(world):
    """The light-sweep measure, checked on the world's own photos: a key light from image right (positive
    azimuth) brightens the face's right half."""
    person = world.subjects(1)[0]
    view = world.views(1)[0]
    view["pose"] = torch.zeros(6)
    lit = [replace_light(view, azimuth) for azimuth in (-60.0, 0.0, 60.0)]
    photos, buffers = world.photograph(person, lit)
    coverage = (buffers[:, 3:6].abs().sum(1, keepdim=True) > 0).float()
    left, middle, right = side_balance((photos + 1) / 2, coverage)
    assert left < -0.05 and right > 0.05 and left < middle < right


def replace_light(view: dict, azimuth: float) -> dict:
    return {**view, "light": torch.as_tensor(sh_from_direction(azimuth, 10.0, 1.0, 0.4), dtype=torch.float32)}


def test_demo_installs_its_models_and_person_where_the_cli_finds_them(demo_person, tmp_path, capsys):
    """After the demo (here its installer, with an untrained model), the report's CLI commands run."""
    photo = demo_person / "face_rigs" / NAMES["person"].format(1)
    assert read_rig(photo) is not None
    assert find_checkpoint(demo_person).name == "synthetic_random_diffusionrig.pt"  # the default stays official-size
    args = ["--models", str(demo_person), "--checkpoint", NAMES["personalized"], "--steps", "2"]
    assert main(["relight", str(photo), *args, "--light-preset", "rembrandt", "--out", str(tmp_path / "relit.png"),
                 "--save-buffers"]) == 0
    assert Image.open(tmp_path / "relit.png").size == (32, 32)
    assert (tmp_path / "relit_buffers.png").exists() and (tmp_path / "relit_light.png").exists()
    assert main(["sweep", str(photo), *args, "--light-azimuth=-60:60", "--frames", "3",
                 "--out", str(tmp_path / "sweep")]) == 0
    frames = sorted((tmp_path / "sweep").glob("*.png"))
    assert len(frames) == 3 and len({f.read_bytes() for f in frames}) == 3
    capsys.readouterr()
    # the 256 px stand-in cannot edit a 32 px rigged face: one line saying which model to pick
    assert main(["relight", str(photo), "--models", str(demo_person), "--light-preset", "rembrandt",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert NAMES["personalized"] in err and err.count("\n") == 1


def test_install_keeps_a_partial_flame_folder_and_says_why(world, tmp_path, demo_models):
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame" / "generic_model.pkl").write_bytes((demo_models / "flame" / "generic_model.pkl").read_bytes())
    person, views = world.subjects(1)[0], world.views(1)
    photos, _ = world.photograph(person, views)
    model = DiffusionRig(DemoConfig().unet())
    done = install_demo(tmp_path, DemoConfig(), demo_models / "flame", model, model, photos, world.rig(person, views))
    assert "only generic_model.pkl" in done["skipped"] and done["photos"] == []
    assert sorted(p.name for p in (tmp_path / "flame").iterdir()) == ["generic_model.pkl"]
    assert [p.name for p in done["models"]] == [NAMES["personalized"], NAMES["stage 1"]]


def test_the_quick_demo_installs_and_sweeps_the_light(tmp_path):
    config = replace(DemoConfig(), subjects=2, views=3, album=4, held_out=2, stage1_steps=4, stage2_steps=2,
                     sample_steps=2, stage1_batch=4, sampler_edits=1)
    models = tmp_path / "models"
    report = run_demo(tmp_path / "out", config, models_dir=models, quick=True)
    quick = demo_file_names(config, quick=True)
    assert (models / "diffusionrig" / quick["personalized"]).is_file()
    assert [Path(p).name for p in report["installed"]["photos"]] == [quick["person"].format(k) for k in (1, 2)]
    assert (models / "flame" / "SYNTHETIC_README.txt").exists() and (models / "deca" / "deca_model.tar").exists()
    sweep = report["light sweep"]
    assert len(sweep["face brightness right half minus left half"]) == 5 and sweep["verdict"]
    assert (tmp_path / "out" / "light_sweep.png").exists()
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Try it yourself" in text and f"--checkpoint {quick['personalized']}" in text
    # a second run finds the stand-ins and the head it installed, and renders the same person
    report2 = run_demo(tmp_path / "out2", config, models_dir=models, quick=True)
    assert report2["head"].startswith("the synthetic FLAME-format head in")
    assert report2["installed"]["stand-ins"] == []


def test_load_and_save_face_rig_nodes(demo_person, tmp_path, monkeypatch):
    import nodes
    from nodes import host

    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    load = nodes.NODE_CLASS_MAPPINGS["DiffusionRigLoadFaceRig"]
    save = nodes.NODE_CLASS_MAPPINGS["DiffusionRigSaveFaceRig"]
    listed = load.INPUT_TYPES()["required"]["rig_photo"][0]
    assert NAMES["person"].format(1) in listed and all(n.endswith(".png") for n in listed)
    name = NAMES["person"].format(2)
    aligned, rig = load().load(name)
    assert aligned.shape == (1, 32, 32, 3)
    _same_rig(rig, read_rig(demo_person / "face_rigs" / name))
    before = load.IS_CHANGED(name)
    # Save Face Rig writes numbered rigged photos into the first face_rigs folder and never replaces one
    monkeypatch.setattr(host, "model_dirs", lambda folder: [tmp_path / folder])
    both = rig.cat([rig, rig.with_codes(exp=rig.codes["exp"] + 0.1)])
    paths = save().save(aligned.repeat(2, 1, 1, 1), both, "mine/person")["result"][0].split("\n")
    assert [Path(p).name for p in paths] == ["person_00001.png", "person_00002.png"]
    _same_rig(read_rig(paths[1]), both.select(1))
    again = save().save(aligned, rig, "mine/person")["result"][0]
    assert Path(again).name == "person_00003.png"
    with pytest.raises(ValueError, match="Save Face Rig: 2 aligned images but the rig has 1"):
        save().save(aligned.repeat(2, 1, 1, 1), rig, "x")
    with pytest.raises(ValueError, match="not a file name inside"):
        save().save(aligned, rig, "../outside")
    monkeypatch.undo()
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    # a replaced file under the same name is loaded again
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(plain)
    copy = demo_person / "face_rigs" / "replaced.png"
    copy.write_bytes((demo_person / "face_rigs" / name).read_bytes())
    first = load.IS_CHANGED("replaced.png")
    copy.write_bytes(plain.read_bytes())
    assert load.IS_CHANGED("replaced.png") != first and load.IS_CHANGED(name) == before
    with pytest.raises(ValueError, match="Load Face Rig: .*carries no face rig"):
        load().load("replaced.png")
    copy.unlink()
    with pytest.raises(FileNotFoundError, match="Load Face Rig: .*face_rigs"):
        load().load("missing.png")

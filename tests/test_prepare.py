"""prepare-data on the pack's example photos plus bad files: what lands, what is rejected and why, resuming.

DECA and FLAME are the synthetic demo stand-ins (`demo-assets`); faces are aligned at 64 px.
"""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_diffusionrig.train import prepare as prepare_module
from comfy_diffusionrig.train.dataset import load_dataset
from comfy_diffusionrig.train.prepare import PrepareConfig, parse_shard, plan_chunks, prepare_data

EXAMPLES = Path(__file__).resolve().parents[1] / "example_images"
CONFIG = PrepareConfig(size=64, shard_size=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "cameraman.png", "grace_hopper.jpg"):  # cameraman: a face dlib's HOG misses
        shutil.copy(EXAMPLES / name, folder / name)
    astronaut = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    both = Image.new("RGB", (1024, 512))
    both.paste(astronaut, (0, 0))
    both.paste(astronaut, (512, 0))
    both.save(folder / "two_people.png")
    Image.new("RGB", (16, 16), (128, 90, 80)).save(folder / "tiny.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 the start of a JPEG and nothing else")
    return folder


def run(photos, out, demo_models, **kwargs):
    return prepare_data(photos, out, demo_models / "deca" / "deca_model.tar", demo_models / "flame", CONFIG,
                        progress=lambda message: None, **kwargs)


def test_good_photos_land_and_bad_ones_are_listed_with_reasons(photos, demo_models, tmp_path, monkeypatch):
    out = tmp_path / "data"
    manifest = run(photos, out, demo_models)
    reasons = {Path(r["file"]).name: r["reason"] for r in manifest["rejected"]}
    assert sorted(reasons) == ["cameraman.png", "corrupt.jpg", "tiny.png", "two_people.png"]
    assert reasons["cameraman.png"].startswith("no face found")
    assert reasons["corrupt.jpg"].startswith("unreadable file") and "corrupt.jpg" in reasons["corrupt.jpg"]
    assert reasons["tiny.png"] == "tiny face: the image is 16x16 px, below min_face 64"
    assert reasons["two_people.png"].startswith("several faces")
    assert (manifest["photos"], manifest["kept"], manifest["shards_total"], manifest["shards_done"]) == (6, 2, 2, 2)
    # sorted photos: astronaut, cameraman, corrupt, grace_hopper -> shard 0 (2 faces); tiny, two_people -> shard 1
    # (no faces: a report, no shard file, not in the index)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "manifest.json", "shard-00000.json",
                                                     "shard-00000.safetensors", "shard-00001.json"]
    data = load_dataset(out)
    assert data.images.shape == (2, 3, 64, 64) and data.buffers.shape == (2, 9, 64, 64)
    assert float(data.images.float().std()) > 25 and float(data.buffers[:, 3:6].float().abs().amax()) > 0.5  # faces and normals
    # a second run does no work: no chunk is processed and the shard file is untouched
    before = (out / "shard-00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(prepare_module, "prepare_chunk", lambda *a, **k: pytest.fail("redid a finished shard"))
    assert run(photos, out, demo_models) == manifest
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before


def test_shards_split_over_runs_and_workers_give_the_same_dataset(photos, demo_models, tmp_path):
    first = run(photos, tmp_path / "split", demo_models, shard=(1, 2))
    assert (first["shards_done"], first["kept"]) == (1, 0)  # shard 1 only: tiny and two_people
    second = run(photos, tmp_path / "split", demo_models, shard=(0, 2), workers=2)
    assert (second["shards_done"], second["kept"]) == (2, 2)
    reference = run(photos, tmp_path / "one_run", demo_models)
    a = load_file(tmp_path / "split" / "shard-00000.safetensors")
    b = load_file(tmp_path / "one_run" / "shard-00000.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in ("images", "buffers"))
    assert [Path(r["file"]).name for r in second["rejected"]] == [Path(r["file"]).name for r in reference["rejected"]]


def test_chunks_keep_identities_together_with_mean_shape():
    photos = [Path(f"{person}/{i}.jpg") for person, n in (("a", 3), ("b", 2), ("c", 4)) for i in range(n)]
    by_size = plan_chunks(photos, PrepareConfig(shard_size=4))
    assert [len(c) for c in by_size] == [4, 4, 1]
    by_person = plan_chunks(photos, PrepareConfig(shard_size=4, mean_shape=True))
    assert [[p.parent.name for p in c] for c in by_person] == [["a"] * 3, ["b"] * 2, ["c"] * 4]
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0..n-1"):
        parse_shard("3/3")


def test_mean_shape_gives_each_identity_its_average_shape(demo_models, tmp_path, monkeypatch):
    from comfy_diffusionrig.face import rig as rig_module

    for person, name in (("p", "astronaut.png"), ("p", "grace_hopper.jpg"), ("q", "astronaut.png")):
        (tmp_path / "photos" / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLES / name, tmp_path / "photos" / person / name)
    fitted, rendered = [], []
    real_fit, real_render = rig_module.fit_faces, rig_module.render_rig
    monkeypatch.setattr(rig_module, "fit_faces", lambda *a: fitted.append(real_fit(*a)) or fitted[-1])
    monkeypatch.setattr(rig_module, "render_rig", lambda deca, rig: rendered.append(rig) or real_render(deca, rig))
    prepare_data(tmp_path / "photos", tmp_path / "data", demo_models / "deca" / "deca_model.tar",
                 demo_models / "flame", PrepareConfig(size=64, shard_size=8, mean_shape=True), progress=lambda m: None)
    own, used = fitted[0].codes["shape"], rendered[0].codes["shape"]  # rows: p/astronaut, p/grace_hopper, q/astronaut
    assert not torch.allclose(own[0], own[1])  # two people: the per-photo fits differ
    assert torch.allclose(used[0], (own[0] + own[1]) / 2) and torch.equal(used[0], used[1])
    assert torch.equal(used[2], own[2])  # q has one photo: its own shape
    assert torch.equal(rendered[0].codes["exp"], fitted[0].codes["exp"])  # only the shape is shared

"""Personal albums: faces aligned and fitted, the person's mean shape, outliers left out with a reason, cached."""

import struct
import zipfile
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from comfy_diffusionrig.train import album as album_module
from comfy_diffusionrig import load_deca
from comfy_diffusionrig.train.album import Album, AlbumFileError, album_key, build_album, read_album, save_album

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "example_images"


@pytest.fixture(scope="module")
def deca(demo_models):
    return load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame")


def _person_photos():
    """Four photos of one person (crops, light, mirror) and one of someone else, and one with no face."""
    astronaut = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    same = [astronaut, astronaut.crop((20, 10, 500, 490)), ImageEnhance.Brightness(astronaut).enhance(0.8),
            ImageOps.mirror(astronaut)]
    other = Image.open(EXAMPLES / "grace_hopper.jpg").convert("RGB")
    empty = Image.new("RGB", (300, 300), (128, 128, 128))
    return same + [other, empty], ["a1", "a2", "a3", "a4", "hopper", "grey"]


def test_album_keeps_the_person_and_says_why_others_left(deca, tmp_path):
    photos, names = _person_photos()
    steps = []
    album = build_album(photos, deca, names, size=64, cache_dir=tmp_path, progress=lambda d, t: steps.append((d, t)))
    assert album.names == ["a1", "a2", "a3", "a4"]
    text = "\n".join(album.warnings)
    assert "grey: left out" in text and "no face" in text
    assert "hopper: left out" in text and "another person" in text
    assert "only 4 usable photo(s)" in text
    assert album.images.shape == (4, 3, 64, 64) and album.buffers.shape == (4, 9, 64, 64)
    assert -1 <= float(album.images.min()) and float(album.images.max()) <= 1
    shape = album.codes["shape"]
    assert torch.equal(shape, shape[:1].expand_as(shape))  # one mean shape for the person
    assert not torch.equal(album.codes["pose"][0], album.codes["pose"][3])  # but each photo its own pose
    assert steps[-1][0] == steps[-1][1]
    data = album.training_data()
    assert data.images is album.images and data.buffers is album.buffers


def test_album_is_cached_by_content(deca, tmp_path, monkeypatch):
    photos, names = _person_photos()
    first = build_album(photos[:4], deca, names[:4], size=64, cache_dir=tmp_path, check_identity=False)
    assert len(list(tmp_path.glob("album_*.pt"))) == 1

    import comfy_diffusionrig.photo.alignment as alignment

    def no_work(*args, **kwargs):
        raise AssertionError("a cached album must not be rebuilt")

    monkeypatch.setattr(alignment, "align_face", no_work)
    again = build_album(photos[:4], deca, names[:4], size=64, cache_dir=tmp_path, check_identity=False)
    assert torch.equal(again.images, first.images) and torch.equal(again.buffers, first.buffers)
    assert again.warnings == first.warnings
    monkeypatch.undo()
    changed = [photos[0].rotate(3)] + photos[1:4]  # other pixels: another key, a new album
    build_album(changed, deca, names[:4], size=64, cache_dir=tmp_path, check_identity=False)
    assert len(list(tmp_path.glob("album_*.pt"))) == 2


def test_album_files_round_trip_and_foreign_files_are_refused(tmp_path):
    album = Album(torch.zeros(2, 3, 8, 8), torch.ones(2, 9, 8, 8), ["x", "y"], ["w"], {"shape": torch.zeros(2, 100)})
    path = save_album(album, tmp_path / "a.pt")
    back = read_album(path)
    assert back.names == ["x", "y"] and back.warnings == ["w"] and torch.equal(back.buffers, album.buffers)
    torch.save({"format": "something else"}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a face album"):
        read_album(tmp_path / "b.pt")


def test_empty_or_faceless_albums_are_refused(deca):
    with pytest.raises(ValueError, match="empty"):
        build_album([], deca)
    with pytest.raises(ValueError, match="no usable face"):
        build_album([Image.new("RGB", (200, 200))], deca, ["black"])
    with pytest.raises(ValueError, match="names"):
        build_album([Image.new("RGB", (200, 200))], deca, ["a", "b"])


def _flip_tensor_byte(path):
    """Flip one byte inside the first tensor record of a torch zip file (its data is stored, not compressed)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 40] ^= 0x10
    path.write_bytes(bytes(raw))


def test_damaged_album_files_are_refused_with_the_path(tmp_path):
    album = Album(torch.rand(2, 3, 8, 8), torch.rand(2, 9, 8, 8), ["x", "y"], [], {"shape": torch.rand(2, 100)})
    path = save_album(album, tmp_path / "a.pt")
    good = path.read_bytes()
    damages = {
        "truncated": good[: len(good) // 2],
        "zero-length": b"",
        "garbage": bytes(range(256)) * 8,
    }
    for what, data in damages.items():
        path.write_bytes(data)
        with pytest.raises(AlbumFileError, match=str(path)) as err:
            read_album(path)
        assert err.value.path == path, what
    path.write_bytes(good)
    _flip_tensor_byte(path)
    # torch reads the flipped byte without complaint: only the checksum notices
    assert not torch.equal(torch.load(path, weights_only=True)["images"], album.images)
    with pytest.raises(AlbumFileError, match="does not match its checksum"):
        read_album(path)


class _FakeDeca(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.E_flame = torch.nn.Linear(2, 2)
        self.register_buffer("texture_mean", torch.zeros(3), persistent=False)  # FLAME data: not in state_dict
        self.renderer = SimpleNamespace(backend="torch")


def test_album_key_covers_every_option_that_changes_the_result():
    photos = [Image.new("RGB", (16, 16), (10, 20, 30))]
    deca = _FakeDeca()
    base = dict(photos=photos, names=["a"], size=64, detector="hog", check_identity=True, deca=deca)
    key = album_key(**base)
    assert album_key(**base) == key
    for change in (dict(names=["b"]), dict(size=128), dict(detector="cnn"), dict(check_identity=False),
                   dict(photos=[Image.new("RGB", (16, 16), (10, 20, 31))])):
        assert album_key(**{**base, **change}) != key, change
    with torch.no_grad():
        deca.texture_mean[0] = 1
    assert album_key(**base) != key  # other FLAME data renders other buffers
    deca.texture_mean.zero_()
    deca.renderer.backend = "pytorch3d"
    assert album_key(**base) != key


def test_album_cache_is_only_a_cache(deca, tmp_path, monkeypatch):
    """A failed cache write only warns; an unreadable or damaged entry is rebuilt and replaced."""
    photo = [Image.open(EXAMPLES / "astronaut.png").convert("RGB")]
    options = dict(deca=deca, names=["a1"], size=64, cache_dir=tmp_path, check_identity=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(album_module, "save_album", disk_full)
    with pytest.warns(UserWarning, match="could not write the album cache .*No space left"):
        first = build_album(photo, **options)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    build_album(photo, **options)
    (entry,) = tmp_path.glob("album_*.pt")
    for damage in ("zero-length", "flipped byte"):
        if damage == "zero-length":
            entry.write_bytes(b"")
        else:
            _flip_tensor_byte(entry)
        with pytest.warns(UserWarning, match="ignored and rebuilt"):
            again = build_album(photo, **options)
        assert torch.equal(again.images, first.images) and torch.equal(again.buffers, first.buffers)
        replaced = read_album(entry)  # the entry was replaced by a good one (read_album checks the checksum)
        assert replaced.names == ["a1"] and torch.equal(replaced.buffers, first.buffers)

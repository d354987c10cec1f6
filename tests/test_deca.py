"""DECA: checkpoint layout and loading, the crop rule, encoding, and DiffusionRig's decode()
render path against render.pt (official decode(render_orig=True, align_ffhq=True))."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from comfy_diffusionrig import load_deca
from comfy_diffusionrig.face.buffers import Renderer
from comfy_diffusionrig.face.deca import (
    CODE_SLICES,
    DECA,
    DecaAssetError,
    DecaEncoder,
    crop_from_landmarks,
    similarity_transform,
    split_codes,
    warp_crop,
)
from comfy_diffusionrig.face.flame import load_flame, load_flame_texture
from comfy_diffusionrig.face.flame_files import read_obj

from conftest import reference_file

CODE_KEYS = ("shape", "tex", "exp", "pose", "cam", "light")
REFERENCE_NAMES = {  # our synthetic stand-ins for the licensed files
    "generic_model.pkl": "flame_synthetic.pkl",
    "landmark_embedding.npy": "landmark_embedding_synthetic.npy",
    "head_template.obj": "head_template_synthetic.obj",
    "FLAME_texture.npz": "FLAME_texture_synthetic_64.npz",
}


def _deca_keys():
    return json.loads(reference_file("flame", "deca_keys.json").read_text())


@pytest.fixture(scope="module")
def parts():
    flame = load_flame(reference_file("flame", REFERENCE_NAMES["generic_model.pkl"]),
                       reference_file("flame", REFERENCE_NAMES["landmark_embedding.npy"]))
    texture = load_flame_texture(reference_file("flame", REFERENCE_NAMES["FLAME_texture.npz"]))
    renderer = Renderer(*read_obj(reference_file("flame", REFERENCE_NAMES["head_template.obj"])), backend="torch")
    return flame, texture, renderer


@pytest.fixture(scope="module")
def render_cases():
    return torch.load(reference_file("flame", "render.pt"), weights_only=True)


@pytest.fixture
def flame_dir(tmp_path):
    folder = tmp_path / "flame"
    folder.mkdir()
    for name, ref in REFERENCE_NAMES.items():
        (folder / name).symlink_to(reference_file("flame", ref))
    return folder


# ------------------------------------------------------------------ checkpoint layout and loading


def test_state_dict_layout_is_decas():
    keys = _deca_keys()
    with torch.device("meta"):
        encoder = DecaEncoder()
    ours = [[k, list(v.shape)] for k, v in encoder.state_dict().items()]
    assert ours == keys["E_flame"]
    assert sum(v.numel() for v in encoder.state_dict().values()) == keys["E_flame_numel"]
    assert {k: [c.start, c.stop] for k, c in CODE_SLICES.items()} == {k: [a, b] for k, a, b in keys["code_slices"]}


def _official_checkpoint(path, e_flame: dict):
    """A deca_model.tar as DECA's trainer writes it (E_detail / D_detail: small stand-ins, unused)."""
    torch.save({
        "E_flame": e_flame,
        "E_detail": {"encoder.conv1.weight": torch.zeros(64, 3, 7, 7), "layers.2.bias": torch.zeros(128)},
        "D_detail": {"layers.0.weight": torch.zeros(4, 4)},
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "global_step": 100,
        "batch_size": 2,
    }, path)


def test_load_deca_from_official_layout(tmp_path, flame_dir):
    torch.manual_seed(0)
    source = DecaEncoder().eval()
    for module in source.modules():  # non-trivial BatchNorm statistics, so that loading them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    tar = tmp_path / "deca_model.tar"
    _official_checkpoint(tar, source.state_dict())
    deca = load_deca(tar, flame_dir, backend="torch")
    assert not deca.training
    assert list(deca.state_dict()) == [f"E_flame.{k}" for k in source.state_dict()]
    crop = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = deca.encode(crop)
        flat = source(crop)
    assert set(codes) == set(CODE_KEYS)
    # same weights, same computation: bit-identical
    assert torch.equal(codes["light"], flat[:, 209:236].reshape(1, 9, 3))
    assert torch.equal(torch.cat([codes[k].reshape(1, -1) for k in CODE_KEYS], 1), flat)
    shapes = {k: tuple(v.shape) for k, v in codes.items()}
    assert shapes == {"shape": (1, 100), "tex": (1, 50), "exp": (1, 50), "pose": (1, 6), "cam": (1, 3),
                      "light": (1, 9, 3)}


def test_checkpoint_of_another_architecture(tmp_path, flame_dir):
    tar = tmp_path / "deca_model.tar"
    # DECA's E_detail (128 outputs) where E_flame should be: same trunk, other head
    wrong = {k: torch.zeros(s) for k, s in _deca_keys()["E_detail"]}
    _official_checkpoint(tar, wrong)
    with pytest.raises(DecaAssetError, match=r"deca_model\.tar: E_flame is not DECA's.*mismatched 2.*layers\.2"):
        load_deca(tar, flame_dir)
    torch.save({"model": {}}, tar)
    with pytest.raises(DecaAssetError, match=r"no 'E_flame' weights \(found \['model'\]\)"):
        load_deca(tar, flame_dir)
    for value, what in ((torch.zeros(3), "Tensor"), ({"w": [1, 2]}, "dict holding other things than named tensors")):
        torch.save({"E_flame": value}, tar)  # there, but not weights: the message must not say it is missing
        with pytest.raises(DecaAssetError, match=rf"'E_flame' is a {what}, not the encoder's weights") as err:
            load_deca(tar, flame_dir)
        assert "no 'E_flame'" not in str(err.value)


def test_nan_weights_and_a_cut_mesh_are_refused_at_load(tmp_path, flame_dir):
    torch.manual_seed(0)
    state = DecaEncoder().state_dict()
    tar = tmp_path / "deca_model.tar"
    _official_checkpoint(tar, dict(state, **{"layers.2.bias": torch.full((236,), float("nan"))}))
    with pytest.raises(DecaAssetError, match=r"deca_model\.tar: 1 weight\(s\) hold NaN or infinite.*layers\.2\.bias"):
        load_deca(tar, flame_dir)
    _official_checkpoint(tar, state)
    obj = flame_dir / "head_template.obj"
    lines = obj.read_text().splitlines()
    obj.unlink()  # a symlink to the fixture: replace it, never write through it
    obj.write_text("\n".join(lines[: len(lines) * 3 // 4]) + "\n")
    with pytest.raises(ValueError, match=r"head_template\.obj: \d+ faces, FLAME has 2116"):
        load_deca(tar, flame_dir)


def test_checkpoint_that_runs_code_is_refused(tmp_path, flame_dir):
    sentinel = tmp_path / "ran"

    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    tar = tmp_path / "deca_model.tar"
    tar.write_bytes(pickle.dumps({"E_flame": RunsShell()}, protocol=2))
    with pytest.raises(DecaAssetError, match=r"deca_model\.tar: refused \(would run code\).*system"):
        load_deca(tar, flame_dir)
    assert not sentinel.exists()


def test_missing_files_name_their_folder(tmp_path, flame_dir):
    with pytest.raises(FileNotFoundError, match=r"deca_model\.tar.*models/deca/.*yfeng95/DECA"):
        load_deca(tmp_path / "deca_model.tar", flame_dir)
    tar = tmp_path / "deca_model.tar"
    tar.write_bytes(b"")
    (flame_dir / "landmark_embedding.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"landmark_embedding\.npy.*models/flame/"):
        load_deca(tar, flame_dir)


def test_split_codes():
    flat = torch.arange(2 * 236, dtype=torch.float32).reshape(2, 236)
    codes = split_codes(flat)
    assert codes["cam"].tolist() == [[206, 207, 208], [442, 443, 444]]
    assert codes["light"][1, 8].tolist() == [236 + 233, 236 + 234, 236 + 235]  # [sh coefficient, rgb]


def test_encode_rejects_bad_crops(parts):
    deca = DECA(*parts)
    with pytest.raises(ValueError, match=r"\[B, 3, 224, 224\]"):
        deca.encode(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        deca.encode(torch.full((1, 3, 224, 224), -1.0))
    with pytest.raises(ValueError, match=r"NaN"):
        deca.encode(torch.full((1, 3, 224, 224), float("nan")))


# ------------------------------------------------------------------ crop


def test_crop_transform_matches_decas_rule():
    rng = np.random.default_rng(0)
    landmarks = rng.uniform([60, 80], [190, 230], size=(68, 2))
    tform = crop_from_landmarks(landmarks)
    # re-derivation: the box's three corners map onto (0,0), (0,223), (223,0) -> pure scale + shift
    left, top = landmarks.min(0)
    right, bottom = landmarks.max(0)
    size = int((right - left + bottom - top) / 2 * 1.1 * 1.25)
    corner = np.array([(left + right) / 2, (top + bottom) / 2]) - size / 2
    scale = 223 / size
    expected = np.array([[scale, 0, -scale * corner[0]], [0, scale, -scale * corner[1]], [0, 0, 1]])
    # float32 output as DECA's `torch.tensor(tform.params).float()`
    np.testing.assert_allclose(tform.numpy(), expected, rtol=1e-6, atol=1e-5)
    batched = crop_from_landmarks(torch.tensor(np.stack([landmarks, landmarks + 5])), crop_size=64)
    assert batched.shape == (2, 3, 3)
    np.testing.assert_allclose(batched[1, :2, 2] - batched[0, :2, 2], -5 * batched[0, 0, 0].repeat(2), rtol=1e-5)


def test_similarity_is_least_squares():
    """Umeyama's similarity = the least-squares solution over (a, b, tx, ty) of [[a, -b], [b, a]] p + t."""
    rng = np.random.default_rng(1)
    src = rng.normal(size=(10, 2)) * 50
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift + rng.normal(size=src.shape)
    rows = np.concatenate([np.stack([src[:, 0], -src[:, 1], np.ones(10), np.zeros(10)], 1),
                           np.stack([src[:, 1], src[:, 0], np.zeros(10), np.ones(10)], 1)])
    a, b, tx, ty = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty], [0, 0, 1]], atol=1e-9)


def _skimage_bilinear_warp(image: np.ndarray, tform: np.ndarray, crop: int) -> np.ndarray:
    """skimage warp(order=1, mode='constant', cval=0) written out: crop (i, j) <- inverse(T) @ (j, i, 1)."""
    inverse = np.linalg.inv(tform)
    channels, height, width = image.shape
    out = np.zeros((channels, crop, crop))
    for i in range(crop):
        for j in range(crop):
            x, y, w = inverse @ np.array([j, i, 1.0])
            x, y = x / w, y / w
            c0, r0 = int(np.floor(x)), int(np.floor(y))
            dc, dr = x - c0, y - r0

            def pixel(r, c):
                return image[:, r, c] if 0 <= r < height and 0 <= c < width else np.zeros(channels)

            top = (1 - dc) * pixel(r0, c0) + dc * pixel(r0, c0 + 1)
            bottom = (1 - dc) * pixel(r0 + 1, c0) + dc * pixel(r0 + 1, c0 + 1)
            out[:, i, j] = (1 - dr) * top + dr * bottom
    return out


def test_warp_crop_matches_skimage_rule():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(3, 40, 52))
    # a rotated similarity that runs off the image (zeros outside) and lands between pixels
    tform = similarity_transform([[5.0, 3.0], [30.0, 8.0], [12.0, 35.0], [45.0, 30.0]],
                                 [[0.0, 0.0], [20.0, 3.0], [2.0, 25.0], [27.0, 27.0]])
    ours = warp_crop(torch.tensor(image), torch.tensor(tform), crop_size=32)
    # float64 on both sides: only round-off separates them
    np.testing.assert_allclose(ours.numpy(), _skimage_bilinear_warp(image, tform, 32), atol=1e-10)
    batched = warp_crop(torch.tensor(image)[None].float().expand(2, -1, -1, -1), torch.tensor(tform).float(), 32)
    assert batched.shape == (2, 3, 32, 32) and batched.dtype == torch.float32
    with pytest.raises(ValueError, match="invertible"):
        warp_crop(torch.tensor(image), torch.zeros(3, 3), 32)


# ------------------------------------------------------------------ decode / render parity


def _codes(case):
    return {k: case[k] for k in CODE_KEYS}


@pytest.mark.parametrize("name", ["orig_224_to_256", "orig_64_to_72x96"])
def test_render_matches_diffusionrig_decode(parts, render_cases, name):
    case = render_cases[name]
    deca = DECA(*parts, crop_size=int(case["deca_image_size"]))
    image_size = tuple(case["original_hw"].tolist())
    out = deca.decode(_codes(case), image_size, case["tform"], case["ffhq_center"])
    # geometry: float32 re-implementation of float32 reference code (README: 1e-5)
    for ours, ref in [("verts", "verts"), ("trans_verts", "trans_verts"), ("landmarks2d", "landmarks2d"),
                      ("landmarks3d", "landmarks3d"), ("landmarks3d_world", "landmarks3d_world"),
                      ("center", "center_of_code")]:
        torch.testing.assert_close(out[ours], case[ref], atol=1e-5, rtol=0, msg=ours)
    # rasterisation: README tolerances (pytorch3d float32 vs exact arithmetic)
    same = out["pix_to_face"] == case["pix_to_face"][..., 0]
    assert same.float().mean() >= 0.999
    on_face = (same & (out["pix_to_face"] >= 0))[:, None]
    for ours, ref in [("rendered", "images"), ("normal", "normal_images"), ("albedo", "albedo_images"),
                      ("alpha", "alpha_images")]:
        assert ((out[ours] - case[ref]).abs() * on_face).max() <= 1e-4, ours
    buffers = deca.render(_codes(case), image_size, case["tform"], case["ffhq_center"])
    assert torch.equal(buffers, torch.cat([out["rendered"], out["normal"], out["albedo"]], 1))


def test_batched_decode_aligns_each_face(parts, render_cases):
    """DECA's `verts + delta` only broadcasts for B = 1; ours moves each face by its own delta."""
    case = render_cases["orig_224_to_256"]
    deca = DECA(*parts)
    codes = {k: torch.cat([v, v.flip(-1)]) for k, v in _codes(case).items()}
    centers = torch.cat([case["ffhq_center"], case["ffhq_center"] + 0.01])
    batched = deca.decode(codes, ffhq_center=centers)
    for b in range(2):
        single = deca.decode({k: v[b:b + 1] for k, v in codes.items()}, ffhq_center=centers[b:b + 1])
        torch.testing.assert_close(batched["verts"][b:b + 1], single["verts"], atol=1e-6, rtol=0)
    assert "rendered" not in batched  # no image_size: geometry only


def test_decode_rejects_bad_inputs(parts, render_cases):
    case = render_cases["orig_224_to_256"]
    deca = DECA(*parts)
    codes = _codes(case)
    with pytest.raises(ValueError, match=r"code 'exp' contains NaN"):
        deca.render({**codes, "exp": torch.full_like(codes["exp"], float("nan"))}, (256, 256), case["tform"])
    with pytest.raises(ValueError, match=r"not invertible"):
        deca.render(codes, (256, 256), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"missing \['light'\]"):
        deca.render({k: v for k, v in codes.items() if k != "light"}, (256, 256))
    with pytest.raises(ValueError, match=r"ffhq_center must be \[B, 3\]"):
        deca.decode(codes, ffhq_center=torch.zeros(3))

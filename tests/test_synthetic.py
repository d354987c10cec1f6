"""The offline demo assets: synthetic FLAME/DECA files in the official layouts that our loaders read."""

import json
import pickle
import pickletools
import warnings

import numpy as np
import pytest
import torch

from comfy_diffusionrig import load_deca, load_flame
from comfy_diffusionrig.face.deca import CODE_SLICES, FLAME_FILES, crop_from_landmarks, warp_crop
from comfy_diffusionrig.face.flame_files import read_flame_model, read_landmark_embedding
from comfy_diffusionrig.demo.synthetic import (DEMO_UPSCALER_NAME, compact_upscale, deca_camera, write_demo_assets,
                                               write_demo_upscaler, write_flame_files)
from comfy_diffusionrig.demo.synthetic_head import make_head

from conftest import reference_file


@pytest.fixture(scope="module")
def flame_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flame")
    write_flame_files(out, seed=0)
    return out


def test_flame_files_have_the_official_layouts(flame_dir):
    assert all((flame_dir / name).is_file() for name in FLAME_FILES)
    assert "NOT FLAME" in (flame_dir / "SYNTHETIC_README.txt").read_text()
    blob = (flame_dir / "generic_model.pkl").read_bytes()
    opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]
    assert opcodes[0] == ("PROTO", 2)
    globals_ = {arg for name, arg in opcodes if name == "GLOBAL"}
    assert {"chumpy.ch Ch", "scipy.sparse.csc csc_matrix", "numpy.core.multiarray _reconstruct"} <= globals_
    assert not any(name in ("BINUNICODE", "SHORT_BINUNICODE") for name, _ in opcodes)  # python-2 strings only
    with pytest.raises(ModuleNotFoundError, match="chumpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy.sparse.csc, as old files name it
        pickle.loads(blob, encoding="latin1")  # needs chumpy to unpickle plainly, like the real file

    model = read_flame_model(flame_dir / "generic_model.pkl")
    head = make_head(0)
    assert model["shapedirs"].shape == (len(head["v_template"]), 3, 400)
    np.testing.assert_allclose(model["J_regressor"], head["J_regressor"])
    np.testing.assert_allclose(model["J_regressor"].sum(1), 1.0, atol=1e-9)
    assert model["kintree_table"].tolist() == [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]

    embedding = read_landmark_embedding(flame_dir / "landmark_embedding.npy")
    assert tuple(embedding["dynamic_faces"].shape) == (79, 17) and tuple(embedding["full_faces"].shape) == (68,)
    raw = np.load(flame_dir / "landmark_embedding.npy", allow_pickle=True, encoding="latin1").item()
    assert torch.is_tensor(raw["dynamic_lmk_faces_idx"]) and isinstance(raw["static_lmk_faces_idx"], np.ndarray)

    texture = np.load(flame_dir / "FLAME_texture.npz")
    assert texture["mean"].shape[-1] == 3 and texture["tex_dir"].shape[-2:] == (3, 200)
    assert 0 <= texture["mean"].min() and texture["mean"].max() <= 255


def test_synthetic_head_behaves_like_a_face(flame_dir):
    flame = load_flame(flame_dir / "generic_model.pkl", flame_dir / "landmark_embedding.npy")
    zeros = lambda n: torch.zeros(2, n)  # noqa: E731
    verts, lmk2d, lmk3d = flame(zeros(100), zeros(50), zeros(6))
    size = verts[0].max(0).values - verts[0].min(0).values
    assert 0.12 < float(size[0]) < 0.25 and 0.2 < float(size[1]) < 0.4  # a head in metres
    p = lmk2d[0]
    assert float(p[36:42, 0].mean()) < float(p[42:48, 0].mean())  # eyes in FLAME's left/right order
    # top to bottom: eyes, nose tip, mouth, chin
    assert float(p[36:48, 1].mean()) > float(p[30, 1]) > float(p[48:68, 1].mean()) > float(p[8, 1])
    # mouth open (expression 1) moves the lower lip down, and the jaw joint does too
    exp = zeros(50)
    exp[1, 1] = 2.0
    _, opened, _ = flame(zeros(100), exp, zeros(6))
    assert float(opened[1, 57, 1]) < float(opened[0, 57, 1]) - 0.002
    pose = zeros(6)
    pose[1, 3] = 0.3
    _, jaw, _ = flame(zeros(100), zeros(50), pose)
    assert float(jaw[1, 8, 1]) < float(jaw[0, 8, 1]) - 0.005
    # turning the head picks other contour rows
    pose = zeros(6)
    pose[1, 1] = 0.5
    _, turned, _ = flame(zeros(100), zeros(50), pose)
    assert not torch.allclose(turned[1, :17], turned[0, :17])


def test_demo_assets_load_and_give_plausible_codes(demo_models):
    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame")
    checkpoint = torch.load(demo_models / "deca" / "deca_model.tar", weights_only=True)
    assert sorted(checkpoint) == ["D_detail", "E_detail", "E_flame"]
    try:  # key-for-key the layout of the real deca_model.tar
        keys = json.loads(reference_file("flame", "deca_keys.json").read_text())
    except pytest.skip.Exception:
        keys = None
    if keys is not None:
        for part in ("E_flame", "E_detail", "D_detail"):
            assert [[k, list(v.shape)] for k, v in checkpoint[part].items()] == keys[part], part

    # render the neutral head with the camera the encoder is biased to, then fit that render
    head_cam = torch.as_tensor(deca_camera(), dtype=torch.float32)
    codes = {name: torch.zeros(1, cols.stop - cols.start) for name, cols in CODE_SLICES.items()}
    codes["cam"] = head_cam[None]
    codes["light"] = codes["light"].reshape(1, 9, 3)
    codes["light"][0, 0] = 2.0
    out = deca.decode(codes, image_size=(224, 224))
    coverage = float(out["alpha"].mean())
    assert 0.2 < coverage < 0.8, coverage  # the face fills DECA's crop as its crop rule would
    image = out["rendered"].clamp(0, 1)
    _, lmk2d, _ = deca.flame(codes["shape"], codes["exp"], codes["pose"])
    crop = warp_crop(image, crop_from_landmarks(((lmk2d[0, :, :2] * codes["cam"][0, 0] + codes["cam"][0, 0] *
                                                  codes["cam"][0, 1:]) * torch.tensor([1, -1]) + 1) * 112))
    with torch.no_grad():
        fitted = deca.encode(crop)
    assert abs(float(fitted["cam"][0, 0] / head_cam[0]) - 1) < 0.1
    assert float((fitted["cam"][0, 1:] - head_cam[1:]).abs().max()) < 0.03  # metres
    for name in ("shape", "exp", "pose", "tex"):
        assert float(fitted[name].abs().max()) < 0.5, name
    assert float(fitted["light"][0, 0].mean()) > 0.5  # a lit scene


def test_writers_never_overwrite_without_asking(tmp_path):
    write_demo_assets(tmp_path)
    before = (tmp_path / "deca" / "deca_model.tar").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        write_demo_assets(tmp_path)
    assert (tmp_path / "deca" / "deca_model.tar").stat().st_mtime_ns == before
    assert not list(tmp_path.rglob("*.tmp"))
    write_demo_assets(tmp_path, seed=1, overwrite=True)
    assert (tmp_path / "deca" / "deca_model.tar").stat().st_mtime_ns != before
    assert (tmp_path / "diffusionrig" / "synthetic_random_diffusionrig.pt").is_file()
    assert (tmp_path / "diffusionrig" / "synthetic_random_diffusionrig.json").is_file()


def test_an_existing_model_file_stops_everything_before_any_write(tmp_path):
    (tmp_path / "diffusionrig").mkdir()
    (tmp_path / "diffusionrig" / "synthetic_random_diffusionrig.pt").write_text("mine")
    with pytest.raises(FileExistsError, match="diffusionrig/synthetic_random_diffusionrig.pt.*overwrite"):
        write_demo_assets(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "diffusionrig", "diffusionrig/synthetic_random_diffusionrig.pt"]
    assert (tmp_path / "diffusionrig" / "synthetic_random_diffusionrig.pt").read_text() == "mine"


def test_the_demo_upscaler_has_the_compact_layout_that_comfyui_recognises(tmp_path):
    from safetensors.torch import load_file

    path = write_demo_upscaler(tmp_path)
    assert path.name == DEMO_UPSCALER_NAME and "random" in path.name and "synthetic" in path.name
    with pytest.raises(FileExistsError):
        write_demo_upscaler(tmp_path)
    state = load_file(path)
    # spandrel's Compact detection: body.0 and body.1 weights; body.<last> bias gives 3 x scale^2 channels
    assert {"body.0.weight", "body.1.weight"} <= set(state)
    last = max(int(k.split(".")[1]) for k in state)
    assert state[f"body.{last}.bias"].shape == (3 * 4 * 4,) and state["body.0.weight"].shape[1] == 3
    assert all(state[f"body.{i}.weight"].ndim == (4 if i % 2 == 0 else 1) for i in range(last + 1))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = compact_upscale(state, image)
    nearest = torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest")
    assert out.shape == (1, 3, 64, 64)
    assert 0 < float((out - nearest).abs().max()) < 0.05  # random, but close to a plain enlargement
    try:
        from spandrel import ModelLoader
    except ImportError:  # ComfyUI's loader; the ComfyUI integration test loads the file with it
        return
    model = ModelLoader().load_from_state_dict(state).eval()
    assert model.architecture.id == "Compact" and model.scale == 4
    with torch.no_grad():  # spandrel's call clamps to the image range
        assert torch.allclose(model(image), out.clamp(0, 1), atol=1e-5)


def test_demo_assets_include_the_upscaler_with_its_readme(demo_models):
    assert (demo_models / "upscale_models" / DEMO_UPSCALER_NAME).is_file()
    assert "RANDOM weights" in (demo_models / "upscale_models" / "SYNTHETIC_README.txt").read_text()


def test_every_stand_in_folder_says_it_is_synthetic(demo_models):
    """The README promises a SYNTHETIC_README.txt in each stand-in folder, diffusionrig/ included."""
    for folder in ("flame", "deca", "diffusionrig", "upscale_models"):
        note = (demo_models / folder / "SYNTHETIC_README.txt").read_text()
        assert "demo-assets" in note or "NOT" in note or "RANDOM" in note, folder
    assert "RANDOM weights" in (demo_models / "diffusionrig" / "SYNTHETIC_README.txt").read_text()
    from nodes.host import model_files

    with pytest.MonkeyPatch.context() as mp:  # the note never shows as a checkpoint
        mp.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
        assert all(not name.endswith(".txt") for name in model_files("diffusionrig", (".pt", ".safetensors")))

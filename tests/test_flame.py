"""FLAME, its landmarks and texture: parity with DECA's FLAME/FLAMETex (flame_forward.pt, flametex.pt),
and the asset readers' refusal of files that are not FLAME's (malicious pickles included)."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from comfy_diffusionrig import load_flame
from comfy_diffusionrig.face.flame import dynamic_lut_rows, ffhq_center, load_flame_texture
from comfy_diffusionrig.face.flame_files import FlameAssetError, MissingAssetError, read_flame_model, read_landmark_embedding, read_obj

from conftest import reference_file

# float32 re-implementation of float32 reference code: vertices are ~0.1 m, so summation-order
# differences are ~1e-8; 1e-5 is the README's suggested bound and still 1000x below a visible change
ATOL_GEOMETRY = 1e-5


@pytest.fixture(scope="module")
def flame():
    return load_flame(reference_file("flame", "flame_synthetic.pkl"),
                      reference_file("flame", "landmark_embedding_synthetic.npy"))


@pytest.fixture(scope="module")
def forward_ref():
    return torch.load(reference_file("flame", "flame_forward.pt"), weights_only=True)


def test_forward_matches_deca(flame, forward_ref):
    ref = forward_ref
    verts, lmk2d, lmk3d = flame(ref["shape"], ref["exp"], ref["pose"])
    torch.testing.assert_close(verts, ref["vertices"], atol=ATOL_GEOMETRY, rtol=0)
    torch.testing.assert_close(lmk2d, ref["landmarks2d"], atol=ATOL_GEOMETRY, rtol=0)
    torch.testing.assert_close(lmk3d, ref["landmarks3d"], atol=ATOL_GEOMETRY, rtol=0)
    _, joints = flame.skin(ref["shape"], ref["exp"], ref["pose"])
    torch.testing.assert_close(joints, ref["joints"], atol=ATOL_GEOMETRY, rtol=0)
    assert torch.equal(flame.full_pose(ref["pose"]), ref["full_pose"])


def test_contour_lut_rows_exact(flame, forward_ref):
    # rows cover yaw +17, -29, +43 (clamped to 39), 0 and -49 (< -39): every branch of the rule
    rows = dynamic_lut_rows(flame.full_pose(forward_ref["pose"]), flame.neck_chain)
    assert torch.equal(rows, forward_ref["dyn_lut_row"])
    assert torch.equal(flame.lmk_dynamic_faces[rows], forward_ref["dyn_lmk_faces_idx"])


def test_ffhq_center(flame, forward_ref):
    _, lmk2d, _ = flame(forward_ref["shape"], forward_ref["exp"], forward_ref["pose"])
    torch.testing.assert_close(ffhq_center(lmk2d), forward_ref["ffhq_center"], atol=ATOL_GEOMETRY, rtol=0)


def test_texture_matches_flametex():
    ref = torch.load(reference_file("flame", "flametex.pt"), weights_only=True)
    texture = load_flame_texture(reference_file("flame", "FLAME_texture_synthetic_64.npz"))
    albedo = texture(ref["texcode"])
    assert albedo.shape == (2, 3, 256, 256)
    # values ~1 summed over 50 components in another order than DECA's: float32 round-off ~1e-7
    torch.testing.assert_close(albedo, ref["albedo"], atol=1e-6, rtol=0)
    assert albedo.min() < 0  # no clamping, as DECA


def test_obj_topology(flame):
    faces, uvcoords, uvfaces = read_obj(reference_file("flame", "head_template_synthetic.obj"))
    assert torch.equal(faces, flame.faces)
    assert faces.dtype == uvfaces.dtype == torch.long and uvcoords.shape == (1173, 2)
    assert uvfaces.shape == faces.shape and int(uvfaces.max()) < 1173
    assert not torch.equal(uvfaces, faces)  # the seam: texture corners differ from vertex corners


def test_buffers_not_in_state_dict(flame):
    assert flame.state_dict() == {}
    assert flame.faces.dtype == torch.long and flame.faces.shape == (2116, 3)


def test_code_shape_errors(flame):
    with pytest.raises(ValueError, match=r"shape must be \[B, 100\]"):
        flame(torch.zeros(1, 300), torch.zeros(1, 50), torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"pose must be \[B, 6\]"):
        flame(torch.zeros(1, 100), torch.zeros(1, 50), torch.zeros(1, 15))


# ------------------------------------------------------------------ asset files


class _RunsShell:
    """Pickles to a call of os.system: loading it must never run the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _write_npy_object(path, payload: bytes):
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (), }".ljust(117) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + payload)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "ran"
    evil = _RunsShell(f"touch {sentinel}")
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps({"f": evil}, protocol=2))
    with pytest.raises(FlameAssetError, match=r"generic_model\.pkl.*refused.*posix\.system|refused.*os\.system"):
        read_flame_model(pkl)
    npy = tmp_path / "landmark_embedding.npy"
    _write_npy_object(npy, pickle.dumps(evil, protocol=3))
    with pytest.raises(FlameAssetError, match=r"landmark_embedding\.npy.*refused"):
        read_landmark_embedding(npy)
    assert not sentinel.exists()


def test_pickle_that_is_not_flame(tmp_path):
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps({"v_template": np.zeros((4, 3))}, protocol=2))
    with pytest.raises(FlameAssetError, match=r"generic_model\.pkl.*not a FLAME model.*missing"):
        read_flame_model(pkl)
    model = read_flame_model(reference_file("flame", "flame_synthetic.pkl"))
    model["shapedirs"] = model["shapedirs"][:, :, :300]  # FLAME without expression space
    pkl.write_bytes(pickle.dumps(model, protocol=2))
    with pytest.raises(FlameAssetError, match=r"shapedirs has 300 components"):
        read_flame_model(pkl)
    model["shapedirs"] = model["shapedirs"][:10]
    pkl.write_bytes(pickle.dumps(model, protocol=2))
    with pytest.raises(FlameAssetError, match=r"'shapedirs' has shape \(10, 3, 300\), expected 1060x3x\?"):
        read_flame_model(pkl)


def test_sparse_and_plain_variants_load_alike(tmp_path, flame, forward_ref):
    """Other pickles of the same model (csr regressor, plain shapedirs) give the same FLAME."""
    sparse = pytest.importorskip("scipy.sparse")  # only to write the test file; loading never needs scipy
    model = read_flame_model(reference_file("flame", "flame_synthetic.pkl"))
    regressor = model["J_regressor"].copy()
    model["J_regressor"] = sparse.csr_matrix(regressor)
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(model, protocol=2))
    reread = read_flame_model(pkl)
    assert np.array_equal(reread["J_regressor"], regressor)
    shutil.copy(reference_file("flame", "landmark_embedding_synthetic.npy"), tmp_path / "lmk.npy")
    other = load_flame(pkl, tmp_path / "lmk.npy")
    ref = forward_ref
    assert torch.equal(other(ref["shape"], ref["exp"], ref["pose"])[0], flame(ref["shape"], ref["exp"], ref["pose"])[0])


def test_missing_files_say_where_they_go(tmp_path):
    with pytest.raises(MissingAssetError, match=r"generic_model\.pkl.*models/flame/.*flame\.is\.tue\.mpg\.de") as info:
        load_flame(tmp_path / "generic_model.pkl", tmp_path / "landmark_embedding.npy")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match=r"FLAME_texture\.npz"):
        load_flame_texture(tmp_path / "FLAME_texture.npz")
    with pytest.raises(FileNotFoundError, match=r"head_template\.obj"):
        read_obj(tmp_path / "head_template.obj")


def test_texture_npz_errors(tmp_path):
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, MU=np.zeros((4, 4, 3)), PC=np.zeros((4, 4, 3, 60)))  # the BFM-converted layout
    with pytest.raises(FlameAssetError, match=r"FLAME_texture\.npz.*\['mean', 'tex_dir'\] are missing"):
        load_flame_texture(path)
    np.savez(path, mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 4, 3, 20)))
    with pytest.raises(FlameAssetError, match=r"20 components, 50 are needed"):
        load_flame_texture(path)
    np.savez(path, mean=np.array([{"a": 1}], dtype=object), tex_dir=np.zeros(3))
    with pytest.raises(FlameAssetError, match=r"FLAME_texture\.npz: not a readable \.npz"):
        load_flame_texture(path)


def test_obj_errors(tmp_path):
    path = tmp_path / "head_template.obj"
    path.write_text("vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nf 1/1 2/2 3/3 4/4\n")
    with pytest.raises(FlameAssetError, match=r"head_template\.obj, line 5: expected a triangle"):
        read_obj(path)
    path.write_text("vt 0 0\nf 1/1 2/2 3/3\n")
    with pytest.raises(FlameAssetError, match=r"indices out of range"):
        read_obj(path)


def test_flame_pickle_resaved_with_protocol_5_loads(tmp_path):
    """Today's pickle default (protocol 5) stores arrays through numpy's _frombuffer; still nothing runs."""
    sparse = pytest.importorskip("scipy.sparse")  # only to write the test file
    model = read_flame_model(reference_file("flame", "flame_synthetic.pkl"))
    resaved = dict(model, J_regressor=sparse.csc_matrix(model["J_regressor"]),
                   posedirs=np.asfortranarray(model["posedirs"]))
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(pickle.dumps(resaved, protocol=5))
    assert b"_frombuffer" in pkl.read_bytes()
    reread = read_flame_model(pkl)
    assert all(np.array_equal(reread[k], model[k]) for k in model)
    # _frombuffer rebuilds numbers only: an object array through it is refused
    evil = pickle.dumps({"f": np.array([_RunsShell("true")], dtype=object)}, protocol=5)
    pkl.write_bytes(evil)
    with pytest.raises(FlameAssetError, match=r"generic_model\.pkl"):
        read_flame_model(pkl)


def test_flame_values_that_are_not_numbers_are_refused(tmp_path):
    model = read_flame_model(reference_file("flame", "flame_synthetic.pkl"))
    pkl = tmp_path / "generic_model.pkl"
    for bad in (np.nan, np.inf, 1e300):  # 1e300 is finite in float64 but inf in FLAME's float32 buffers
        shapedirs = model["shapedirs"].copy()
        shapedirs[5, 1, 2] = bad
        pkl.write_bytes(pickle.dumps(dict(model, shapedirs=shapedirs), protocol=2))
        with pytest.raises(FlameAssetError, match=r"generic_model\.pkl: 1 weight\(s\) hold NaN or infinite.*shapedirs"):
            read_flame_model(pkl)
    pkl.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 53022\n")
    with pytest.raises(FlameAssetError, match=r"generic_model\.pkl: could not be read.*Git LFS pointer.*git lfs pull"):
        read_flame_model(pkl)


def test_texture_header_claiming_terabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 4, 3, 50)))
    raw = path.read_bytes()
    # a header edited in place (same length, padding absorbs it): 4.4e9 float64 values, numpy asks for 33 GiB
    edited = raw.replace(b"(4, 4, 3, 50), }", b"(44000, 99999),}", 1)
    assert len(edited) == len(raw)
    path.write_bytes(edited)
    with pytest.raises(FlameAssetError, match=r"FLAME_texture\.npz: not a readable \.npz .*'tex_dir' claims shape"):
        load_flame_texture(path)
    path.write_bytes(raw[: len(raw) * 2 // 3])  # cut: no zip end record
    with pytest.raises(FlameAssetError, match=r"FLAME_texture\.npz: not a readable \.npz.*zip archive cut short"):
        load_flame_texture(path)
    np.savez(path, mean=np.full((4, 4, 3), np.nan), tex_dir=np.zeros((4, 4, 3, 50)))
    with pytest.raises(FlameAssetError, match=r"NaN or infinite.*mean"):
        load_flame_texture(path)


def test_npy_cut_inside_its_header(tmp_path):
    npy = tmp_path / "landmark_embedding.npy"
    data = reference_file("flame", "landmark_embedding_synthetic.npy").read_bytes()
    for cut in (7, 9, 40):  # inside the version, the header length, the header text
        npy.write_bytes(data[:cut])
        with pytest.raises(FlameAssetError, match=r"landmark_embedding\.npy"):
            read_landmark_embedding(npy)


def test_obj_is_checked_against_flames_counts(tmp_path, flame):
    n_vertices, n_faces = flame.v_template.shape[0], flame.faces.shape[0]
    text = reference_file("flame", "head_template_synthetic.obj").read_text()
    lines = text.splitlines()
    face_lines = [i for i, line in enumerate(lines) if line.startswith("f ")]
    path = tmp_path / "head_template.obj"
    path.write_text("\n".join(lines[: face_lines[len(face_lines) // 2]]) + "\n")  # half the faces
    with pytest.raises(FlameAssetError, match=rf"head_template\.obj: {n_faces // 2} faces, FLAME has {n_faces}"):
        read_obj(path, n_vertices=n_vertices, n_faces=n_faces)
    past = lines.copy()
    past[face_lines[0]] = f"f {n_vertices + 1}/1 1/2 2/3"
    path.write_text("\n".join(past) + "\n")
    with pytest.raises(FlameAssetError, match=rf"a face uses vertex {n_vertices + 1}, but the file has {n_vertices} 'v'"):
        read_obj(path)  # on its own too: a face past the file's own vertices
    with pytest.raises(FlameAssetError, match=rf"vertex indices out of range .*1\.\.{n_vertices} for FLAME"):
        read_obj(path, n_vertices=n_vertices, n_faces=n_faces)
    past[face_lines[0]] = "f 99999999999999999999999/1 1/2 2/3"  # used to overflow int64 in torch.tensor
    path.write_text("\n".join(past) + "\n")
    with pytest.raises(FlameAssetError, match=r"out of range"):
        read_obj(path)


def test_a_damaged_module_name_in_a_flame_pickle_is_called_damaged_not_malicious(tmp_path):
    """One damaged byte in a numpy module name: a name that exists nowhere cannot run code; say it is damaged."""
    real = reference_file("flame", "flame_synthetic.pkl").read_bytes()
    at = real.index(b"numpy")
    damaged = real[:at] + b"numpz" + real[at + 5:]
    pkl = tmp_path / "generic_model.pkl"
    pkl.write_bytes(damaged)
    with pytest.raises(FlameAssetError, match=r"generic_model\.pkl: damaged: the pickle asks for 'numpz\..*no module "
                                              r"or name that exists") as err:
        read_flame_model(pkl)
    assert "would run code" not in str(err.value)
    name = real.index(b"_reconstruct")  # a damaged name inside a real numpy module: damaged too
    pkl.write_bytes(real[:name] + b"_reconstrucx" + real[name + 12:])
    with pytest.raises(FlameAssetError, match=r"damaged: the pickle asks for 'numpy\..*_reconstrucx'"):
        read_flame_model(pkl)


def _obj_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def test_a_cut_head_template_read_on_its_own_is_refused(tmp_path):
    """Without FLAME's counts the reader itself sees a cut file: no final line break, vertices in no face (the
    faces that used them are missing), or a face past the file's own vertices."""
    text = reference_file("flame", "head_template_synthetic.obj").read_text()
    lines = _obj_lines(text)
    path = tmp_path / "head_template.obj"
    path.write_text(text)
    faces, _, _ = read_obj(path)
    assert len(faces) == sum(line.startswith("f ") for line in lines)
    path.write_text(text[:-2])  # cut inside the last number of the last face: it still reads as a face
    with pytest.raises(FlameAssetError, match=r"head_template\.obj: the file ends in the middle of line \d+ .*cut short"):
        read_obj(path)
    half = [line for line in lines if not line.startswith("f ")] + [line for line in lines if line.startswith("f ")][
        : len(faces) // 2]
    path.write_text("".join(half))  # cut at a line break, halfway through the faces
    with pytest.raises(FlameAssetError, match=r"head_template\.obj: \d+ of its \d+ vertices are in no face: the file "
                                              r"is cut short"):
        read_obj(path)
    vertices = sum(line.startswith("v ") for line in lines)
    kept = [line for line in lines if not line.startswith("v ")]
    v_lines = [line for line in lines if line.startswith("v ")]
    path.write_text("".join(v_lines[: vertices - 5] + kept))  # the last vertices lost
    with pytest.raises(FlameAssetError, match=rf"a face uses vertex \d+, but the file has {vertices - 5} 'v' lines"):
        read_obj(path)

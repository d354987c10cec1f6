"""FLAME's and DECA's asset files, read without running any pickled code.

FLAME's `generic_model.pkl` (a python-2 pickle with chumpy and scipy objects) and DECA's
`landmark_embedding.npy` (a pickled object array holding legacy torch tensors) go through restricted
unpicklers that rebuild only arrays and refuse everything else (neither chumpy nor scipy is needed);
`head_template.obj` and the texture space's `.npz` are parsed and checked against FLAME's counts.
Every failure is a `FlameAssetError` naming the file and what to do.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ModelFileError, check_finite, unreadable


# DECA's code sizes (decalib config: n_shape, n_exp, n_pose, n_tex)
N_SHAPE, N_EXP, N_POSE, N_TEX = 100, 50, 6, 50
# FLAME 2020 stores 300 shape then 100 expression components in `shapedirs`; DECA takes the
# first 100 shape and the first 50 expression ones
_EXP_OFFSET = 300
# DECA's albedo map size (decalib config: uv_size)
UV_SIZE = 256
# rows of DECA's contour look-up table: yaw 0..39, -1..-39 degrees
_LUT_ROWS = 79
# where the licensed files come from; quoted in every "missing file" message
FLAME_SOURCE = (
    "FLAME 2020 from https://flame.is.tue.mpg.de (FLAME licence, registration required); "
    "landmark_embedding.npy and head_template.obj from the DECA repository's data/ folder"
)
TEXTURE_SOURCE = "https://flame.is.tue.mpg.de (FLAME texture space, FLAME_texture.npz)"
OBJ_SOURCE = "the DECA repository's data/ folder (head_template.obj)"
# numpy's own limit on a .npy header (np.load's max_header_size default)
_MAX_NPY_HEADER = 10000
# a FLAME sparse matrix (J_regressor 5 x 5023) is tiny; refuse to densify absurd damaged shapes
_MAX_DENSE = 1 << 26


class FlameAssetError(ModelFileError):
    """A FLAME/DECA asset file that cannot be used; the message names the file and what to do."""


class MissingAssetError(FlameAssetError, FileNotFoundError):
    """A FLAME/DECA asset file that is not there."""


def require_file(path: str | os.PathLike, folder: str, source: str) -> Path:
    """The path if it is a file, else `MissingAssetError` naming it, its models folder and its source."""
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(
            f"{path} not found: {path.name} goes into ComfyUI's models/{folder}/ folder; get it from {source}", path
        )
    return path


class _ChumpyArray:
    """Stand-in for `chumpy.Ch`: keeps the pickled state, whose `x` is the array."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _SparseMatrix:
    """Stand-in for a scipy csc/csr matrix: keeps the pickled attributes (data, indices, indptr, shape)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _CscMatrix(_SparseMatrix):
    compressed_axis = 1


class _CsrMatrix(_SparseMatrix):
    compressed_axis = 0


def _numpy_multiarray():
    try:  # numpy >= 2 moved the implementation; the pickles name the old path
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _frombuffer(buffer, dtype, shape, order):
    """numpy's `_frombuffer` (protocol-5 pickles of arrays) for plain numeric data only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"refusing an array of dtype {dtype} from a protocol-5 buffer")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as python 3 uses it to pickle bytes at protocol 2 (latin-1 only)."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"unexpected text encoding {encoding!r} in the pickle")
    return text.encode("latin1")


def _common_globals() -> dict[tuple[str, str], object]:
    multiarray = _numpy_multiarray()
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # arrays re-saved at protocol 5
        allowed[(module, "_frombuffer")] = _frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("__builtin__", "builtins"):
        allowed[(module, "set")] = set
        allowed[(module, "frozenset")] = frozenset
        allowed[(module, "object")] = object
    for module in ("copy_reg", "copyreg"):
        allowed[(module, "_reconstructor")] = importlib.import_module("copyreg")._reconstructor
    allowed[("_codecs", "encode")] = _latin1_bytes
    allowed[("collections", "OrderedDict")] = importlib.import_module("collections").OrderedDict
    return allowed


def _flame_pickle_globals() -> dict[tuple[str, str], object]:
    allowed = _common_globals()
    for module in ("scipy.sparse.csc", "scipy.sparse._csc"):
        allowed[(module, "csc_matrix")] = _CscMatrix
    for module in ("scipy.sparse.csr", "scipy.sparse._csr"):
        allowed[(module, "csr_matrix")] = _CsrMatrix
    return allowed


def _storage_from_legacy_bytes(blob: bytes):
    """A storage saved by legacy `torch.save`, read with torch's own weights-only unpickler."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, *_grad_and_hooks):
    """`torch._utils._rebuild_tensor_v2` for plain CPU tensors (requires_grad and hooks are dropped)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"expected a torch storage, found {type(storage).__name__}")
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _embedding_globals() -> dict[tuple[str, str], object]:
    allowed = _common_globals()
    allowed[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor
    allowed[("torch.storage", "_load_from_bytes")] = _storage_from_legacy_bytes
    return allowed


def _global_exists(module: str, name: str, safe_modules=()) -> bool:
    """Whether `module.name` names something that exists, found without importing anything new (but the
    `safe_modules`, which the allow-list imports itself): a module not yet imported is looked up by its spec
    only; one inside a package not yet imported counts as existing (it could not be checked without running
    the package's code)."""
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts) or not name.replace(".", "_").isidentifier():
        return False
    if module in safe_modules:
        importlib.import_module(module)
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if prefix in sys.modules:
            continue
        if depth > 1 and ".".join(parts[:depth - 1]) not in sys.modules:
            return True
        try:
            return importlib.util.find_spec(prefix) is not None
        except (ImportError, ValueError):
            return False
    target = sys.modules[module]
    for attribute in name.split("."):
        if not hasattr(target, attribute):
            return False
        target = getattr(target, attribute)
    return True


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (plus `chumpy.*` as `_ChumpyArray`)."""

    def __init__(self, file, path: Path, allowed: dict[tuple[str, str], object]):
        super().__init__(file, encoding="latin1")  # python-2 pickles: byte strings are latin-1
        self._path = path
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyArray
        found = self._allowed.get((module, name))
        if found is None and not _global_exists(module, name, {m for m, _ in self._allowed}):
            raise FlameAssetError(
                f"{self._path}: damaged: the pickle asks for '{module}.{name}', which is no module or name that "
                "exists (a FLAME/DECA file names numpy, scipy and chumpy ones), so the file is corrupt rather than "
                f"made to run code; nothing in it was run. Replace it with the original file ({FLAME_SOURCE}).",
                self._path
            )
        if found is None:
            raise FlameAssetError(
                f"{self._path}: refused (would run code): the pickle asks for '{module}.{name}'. Only numpy arrays, "
                "sparse matrices and chumpy arrays are rebuilt from FLAME/DECA files, so this is not the official "
                f"{self._path.name} (or it was modified); nothing in it was run. Replace it with the original "
                f"file ({FLAME_SOURCE}).", self._path
            )
        return found

    def persistent_load(self, pid):
        raise FlameAssetError(f"{self._path}: unexpected persistent reference in the pickle; not a FLAME/DECA file",
                              self._path)


def _unpickle(data: bytes, path: Path, allowed) -> object:
    """Unpickle `data` (the file's bytes, read whole so that damaged lengths cannot ask for more) under `allowed`."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, allowed).load()
    except FlameAssetError:
        raise
    except Exception as exc:  # truncated file, wrong format, damaged lengths (MemoryError), ...
        raise unreadable(FlameAssetError, path, f"could not be read as a pickle ({type(exc).__name__}: "
                                                f"{str(exc)[:200]})", f"download it again ({FLAME_SOURCE})") from exc


def _sparse_to_dense(matrix: _SparseMatrix, key: str, path: Path) -> np.ndarray:
    """Dense float64 copy of a pickled scipy csc/csr matrix (duplicates summed, as scipy does)."""
    state = getattr(matrix, "state", None) or {}
    shape = state.get("_shape", state.get("shape"))
    try:
        data = np.asarray(state["data"], dtype=np.float64)
        indices = np.asarray(state["indices"], dtype=np.int64)
        indptr = np.asarray(state["indptr"], dtype=np.int64)
        rows, cols = (int(s) for s in shape)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FlameAssetError(f"{path}: '{key}' is a sparse matrix without data/indices/indptr/shape", path) from exc
    if not (0 <= rows and 0 <= cols and rows * cols <= _MAX_DENSE):
        raise FlameAssetError(f"{path}: '{key}' is a sparse matrix of impossible shape {(rows, cols)}; the file is "
                              f"damaged: download it again ({FLAME_SOURCE})", path)
    n_major = cols if matrix.compressed_axis == 1 else rows
    n_minor = rows if matrix.compressed_axis == 1 else cols
    if (indptr.shape != (n_major + 1,) or indptr[0] != 0 or indptr[-1] != data.size or np.any(np.diff(indptr) < 0)
            or indices.shape != data.shape or (indices.size and (indices.min() < 0 or indices.max() >= n_minor))):
        raise FlameAssetError(f"{path}: '{key}' is a corrupt sparse matrix; download the file again ({FLAME_SOURCE})",
                              path)
    major = np.repeat(np.arange(n_major), np.diff(indptr))
    dense = np.zeros((rows, cols))
    where = (indices, major) if matrix.compressed_axis == 1 else (major, indices)
    np.add.at(dense, where, data)
    return dense


def _as_array(value, key: str, path: Path) -> np.ndarray:
    if isinstance(value, _ChumpyArray):
        value = (getattr(value, "state", None) or {}).get("x")
        if value is None:
            raise FlameAssetError(f"{path}: '{key}' is a chumpy expression, not a stored array; use FLAME 2020's "
                                  f"generic_model.pkl ({FLAME_SOURCE})", path)
    elif isinstance(value, _SparseMatrix):
        value = _sparse_to_dense(value, key, path)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        what = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise FlameAssetError(f"{path}: '{key}' is a {what}, expected a numeric array; not a FLAME model file", path)
    return value


def _check_shape(array: np.ndarray, expected: tuple, key: str, path: Path) -> None:
    """expected: ints or None (any size) per dimension."""
    if array.ndim != len(expected) or any(e is not None and s != e for s, e in zip(array.shape, expected)):
        want = "x".join("?" if e is None else str(e) for e in expected)
        raise FlameAssetError(f"{path}: '{key}' has shape {array.shape}, expected {want}; not a FLAME model file",
                              path)


def read_flame_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """FLAME's `generic_model.pkl` -> the arrays DECA uses (float64/int64, as stored).

    Returns f [F,3], v_template [V,3], shapedirs [V,3,K], posedirs [V,3,P], J_regressor [J,V]
    (dense), kintree_table [2,J], weights [V,J].
    """
    path = require_file(path, "flame", FLAME_SOURCE)
    model = _unpickle(path.read_bytes(), path, _flame_pickle_globals())
    if not isinstance(model, dict):
        raise FlameAssetError(f"{path}: holds a {type(model).__name__}, not a FLAME model dict; use FLAME 2020's "
                              f"generic_model.pkl ({FLAME_SOURCE})", path)
    keys = ("f", "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
    missing = [k for k in keys if k not in model]
    if missing:
        found = sorted(str(k) for k in model)[:12]
        raise FlameAssetError(f"{path}: not a FLAME model, keys {missing} are missing (found {found}); "
                              f"use FLAME 2020's generic_model.pkl ({FLAME_SOURCE})", path)
    arrays = {k: _as_array(model[k], k, path) for k in keys}
    _check_shape(arrays["v_template"], (None, 3), "v_template", path)
    _check_shape(arrays["kintree_table"], (2, None), "kintree_table", path)
    n_verts = arrays["v_template"].shape[0]
    n_joints = arrays["kintree_table"].shape[-1]
    _check_shape(arrays["f"], (None, 3), "f", path)
    _check_shape(arrays["shapedirs"], (n_verts, 3, None), "shapedirs", path)
    _check_shape(arrays["posedirs"], (n_verts, 3, 9 * (n_joints - 1)), "posedirs", path)
    _check_shape(arrays["J_regressor"], (n_joints, n_verts), "J_regressor", path)
    _check_shape(arrays["weights"], (n_verts, n_joints), "weights", path)
    if arrays["shapedirs"].shape[2] < _EXP_OFFSET + N_EXP:
        raise FlameAssetError(f"{path}: shapedirs has {arrays['shapedirs'].shape[2]} components, DECA needs "
                              f"{_EXP_OFFSET} shape + {N_EXP} expression ones (FLAME 2020 has 400)", path)
    # FLAME keeps float32 copies: a value beyond float32's range would become infinite there
    check_finite(arrays, path, FlameAssetError, f"download it again ({FLAME_SOURCE})", dtype=np.float32)
    for key in ("f", "kintree_table"):
        if arrays[key].dtype.kind == "f" and not np.array_equal(arrays[key], np.round(arrays[key])):
            raise FlameAssetError(f"{path}: '{key}' holds fractional indices; not a FLAME model file", path)
    faces = arrays["f"].astype(np.int64)
    if not n_verts or not faces.size or faces.min() < 0 or faces.max() >= n_verts:
        raise FlameAssetError(f"{path}: face indices out of range for {n_verts} vertices; the file is damaged: "
                              f"download it again ({FLAME_SOURCE})", path)
    parents = arrays["kintree_table"][0].astype(np.int64)
    if n_joints < 3 or any(not 0 <= int(parents[i]) < i for i in range(1, n_joints)):
        raise FlameAssetError(f"{path}: the kinematic tree {parents.tolist()[:8]} does not list parents before "
                              f"children (FLAME: global, neck, jaw, eyes); not a FLAME model file", path)
    return arrays


def _read_npy_object(path: Path) -> object:
    """The object inside a `.npy` file holding a 0-d object array, unpickled under an allow-list."""
    advice = "use landmark_embedding.npy from the DECA repository's data/ folder"
    data = path.read_bytes()
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise unreadable(FlameAssetError, path, "not a .npy file", advice)
    major = data[6]
    if major not in (1, 2, 3):
        raise unreadable(FlameAssetError, path, f"unsupported .npy version {major}", advice)
    start = 10 if major == 1 else 12
    (length,) = struct.unpack("<H" if major == 1 else "<I", data[8:start].ljust(start - 8, b"\0"))
    if length > _MAX_NPY_HEADER or start + length > len(data):
        raise unreadable(FlameAssetError, path, f"damaged .npy header (it claims {length} bytes)", advice)
    try:
        header = ast.literal_eval(data[start:start + length].decode("utf8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, TypeError, MemoryError, RecursionError) as exc:
        raise unreadable(FlameAssetError, path, "unreadable .npy header", advice) from exc
    if not isinstance(header, dict) or header.get("descr") != "|O" or header.get("shape") != ():
        raise FlameAssetError(f"{path}: expected a pickled object (DECA's landmark embedding), found the .npy header "
                              f"{str(header)[:200]}; {advice}", path)
    array = _unpickle(data[start + length:], path, _embedding_globals())
    if isinstance(array, np.ndarray) and array.dtype == object and array.shape == ():
        return array[()]
    return array


def read_landmark_embedding(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """DECA's `landmark_embedding.npy` -> tensors (faces int64, barycentrics float32).

    Returns static_faces [L], static_bary [L,3] (landmarks 17..67), dynamic_faces [79,K],
    dynamic_bary [79,K,3] (contour landmarks 0..K-1 per yaw row), full_faces [68],
    full_bary [68,3] (DECA's "3D" landmarks).
    """
    path = require_file(path, "flame", FLAME_SOURCE)
    embedding = _read_npy_object(path)
    advice = "use landmark_embedding.npy from the DECA repository's data/ folder"
    if not isinstance(embedding, dict):
        raise FlameAssetError(f"{path}: holds a {type(embedding).__name__}, not DECA's landmark embedding dict; "
                              f"{advice}", path)
    keys = {
        "static_faces": "static_lmk_faces_idx",
        "static_bary": "static_lmk_bary_coords",
        "dynamic_faces": "dynamic_lmk_faces_idx",
        "dynamic_bary": "dynamic_lmk_bary_coords",
        "full_faces": "full_lmk_faces_idx",
        "full_bary": "full_lmk_bary_coords",
    }
    missing = [v for v in keys.values() if v not in embedding]
    if missing:
        raise FlameAssetError(f"{path}: keys {missing} are missing; {advice}", path)
    out = {}
    for name, key in keys.items():
        value = embedding[key]
        numeric = (isinstance(value, np.ndarray) and value.dtype.kind in "biuf") or (
            isinstance(value, torch.Tensor) and not value.is_complex() and value.dtype != torch.bool)
        if not numeric:
            what = f"array of {value.dtype}" if isinstance(value, (np.ndarray, torch.Tensor)) else type(value).__name__
            raise FlameAssetError(f"{path}: '{key}' is a {what}, expected a numeric array or tensor; {advice}", path)
        value = torch.as_tensor(value)
        out[name] = value.long() if name.endswith("faces") else value.float()
        if not bool(torch.isfinite(value.double()).all() and torch.isfinite(out[name]).all()):
            raise FlameAssetError(f"{path}: '{key}' holds NaN or infinite values; the file is damaged: {advice}", path)
    for name in ("full_faces", "full_bary"):
        if out[name].numel() != 68 * (3 if name == "full_bary" else 1):
            raise FlameAssetError(f"{path}: '{keys[name]}' has shape {tuple(out[name].shape)}, expected 68 landmarks; "
                                  f"{advice}", path)
    out["full_faces"] = out["full_faces"].reshape(-1)
    out["full_bary"] = out["full_bary"].reshape(-1, 3)
    n_static = out["static_faces"].numel()
    n_dynamic = out["dynamic_faces"].shape[-1] if out["dynamic_faces"].dim() else 0
    expected = {
        "static_faces": (n_static,),
        "static_bary": (n_static, 3),
        "dynamic_faces": (_LUT_ROWS, n_dynamic),
        "dynamic_bary": (_LUT_ROWS, n_dynamic, 3),
        "full_faces": (68,),
        "full_bary": (68, 3),
    }
    for name, shape in expected.items():
        if tuple(out[name].shape) != shape:
            raise FlameAssetError(f"{path}: '{keys[name]}' has shape {tuple(out[name].shape)}, expected {shape}; "
                                  f"{advice}", path)
    if n_static + n_dynamic != 68:
        raise FlameAssetError(f"{path}: {n_dynamic} contour + {n_static} static landmarks, expected 68 in all; "
                              f"{advice}", path)
    return out


def read_obj(path: str | os.PathLike, n_vertices: int | None = None,
             n_faces: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DECA's `head_template.obj` -> faces [F,3] int64, uvcoords [T,2] float32 (OBJ `vt`), uvfaces [F,3] int64.

    Faces are `f a/ta b/tb c/tc` lines (1-based; a third `/n` field is ignored); only triangles.
    Read on its own, a file is refused when it is cut short (it does not end with a line break, or
    some of its own `v` vertices are in no face: the faces that held them are missing) or when a
    face uses a vertex past its `v` lines. n_vertices, n_faces: FLAME's counts (`FLAME.v_template`,
    `FLAME.faces`), when known: a file of another mesh is refused here, not at render time.
    """
    path = require_file(path, "flame", OBJ_SOURCE)
    advice = f"use head_template.obj from {OBJ_SOURCE}"
    faces, uvfaces, uvcoords = [], [], []
    vertices, line = 0, "\n"
    with open(path, encoding="utf8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                if tokens[0] == "v":
                    vertices += 1
                elif tokens[0] == "vt":
                    uv = (float(tokens[1]), float(tokens[2]))
                    if not all(math.isfinite(c) for c in uv):
                        raise ValueError("a texture coordinate that is not a finite number")
                    uvcoords.append(uv)
                elif tokens[0] == "f":
                    corners = [t.split("/") for t in tokens[1:]]
                    if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                        raise ValueError("expected a triangle 'f a/ta b/tb c/tc'")
                    faces.append([int(c[0]) - 1 for c in corners])
                    uvfaces.append([int(c[1]) - 1 for c in corners])
            except (ValueError, IndexError) as exc:
                raise FlameAssetError(f"{path}, line {number}: {exc} in {line.strip()[:80]!r}; {advice}", path) from exc
    if not faces or not uvcoords:
        raise unreadable(FlameAssetError, path, "no textured faces (f a/ta ...) or no 'vt' lines; not a head template",
                         advice)
    if not line.endswith("\n"):
        raise FlameAssetError(f"{path}: the file ends in the middle of line {number} (no final line break): it is cut "
                              f"short (truncated); {advice}", path)
    limit = n_vertices if n_vertices is not None else 1 << 31
    if min(map(min, faces)) < 0 or max(map(max, faces)) >= limit:
        raise FlameAssetError(f"{path}: face vertex indices out of range (they must lie in 1..{limit}"
                              f"{' for FLAME' if n_vertices is not None else ''}); {advice}", path)
    if vertices and max(map(max, faces)) >= vertices:
        raise FlameAssetError(f"{path}: a face uses vertex {max(map(max, faces)) + 1}, but the file has {vertices} "
                              f"'v' lines: it is cut short or damaged; {advice}", path)
    if n_faces is not None and len(faces) != n_faces:
        raise FlameAssetError(f"{path}: {len(faces)} faces, FLAME has {n_faces}; the file is cut short or belongs to "
                              f"another mesh: {advice}", path)
    unused = vertices - len({i for face in faces for i in face})
    if vertices and unused:
        raise FlameAssetError(f"{path}: {unused} of its {vertices} vertices are in no face: the file is cut short "
                              f"(faces are missing) or damaged; {advice}", path)
    if min(map(min, uvfaces)) < 0 or max(map(max, uvfaces)) >= len(uvcoords):
        raise FlameAssetError(f"{path}: texture indices out of range for its {len(uvcoords)} 'vt' lines; {advice}",
                              path)
    return torch.tensor(faces), torch.tensor(uvcoords, dtype=torch.float32), torch.tensor(uvfaces)


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Numeric arrays `keys` of an `.npz`, each header checked against the bytes the archive holds
    before anything is allocated (a damaged shape would otherwise ask for terabytes)."""
    advice = f"download it again ({TEXTURE_SOURCE})"
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4] if name.endswith(".npy") else name: name for name in archive.namelist()}
            missing = [k for k in keys if k not in members]
            if missing:
                raise FlameAssetError(f"{path}: keys {missing} are missing (found {sorted(members)[:12]}); use FLAME's "
                                      "FLAME_texture.npz (the FLAME albedo, not the BFM-converted one)", path)
            return {key: _read_npz_member(archive, members[key], path, key, advice) for key in keys}
    except FlameAssetError:
        raise
    except Exception as exc:  # not a zip, bad CRC, zlib errors, damaged headers, ...
        raise unreadable(FlameAssetError, path, f"not a readable .npz of plain arrays ({type(exc).__name__}: "
                                                f"{str(exc)[:200]})", advice) from exc


def _read_npz_member(archive: zipfile.ZipFile, name: str, path: Path, key: str, advice: str) -> np.ndarray:
    info = archive.getinfo(name)
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"'{key}' has .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f, max_header_size=_MAX_NPY_HEADER)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise FlameAssetError(f"{path}: not a readable .npz of plain arrays ('{key}' holds {dtype} data, not "
                                  f"numbers); {advice}", path)
        size = math.prod(shape) * dtype.itemsize
        stored = info.file_size - f.tell()
        if size != stored:
            raise FlameAssetError(f"{path}: not a readable .npz of plain arrays ('{key}' claims shape {shape} of "
                                  f"{dtype} = {size} bytes, the archive holds {stored}); the file is damaged: {advice}",
                                  path)
        data = f.read(size)  # zipfile checks the CRC when the member is read to its end
    if len(data) != size:
        raise FlameAssetError(f"{path}: '{key}' is cut short ({len(data)} of {size} bytes): {advice}", path)
    array = np.frombuffer(data, dtype)
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)

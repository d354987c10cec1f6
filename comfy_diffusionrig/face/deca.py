"""DECA (Feng et al. 2021) as DiffusionRig uses it: fit FLAME codes to a face crop, render them back.

`crop_from_landmarks` / `warp_crop` make DECA's 224 px input crop from 68 landmarks (its
`TestData` rule), `DECA.encode` regresses the codes with DECA's E_flame (ResNet-50 + MLP, its
checkpoint layout key for key), and `DECA.render` is DiffusionRig's `decode(render_orig=True,
align_ffhq=True)`: the posed FLAME head, moved so its FFHQ centre stays put, rendered into the
original image as the physical buffers rendered | normal | albedo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .buffers import DECA_CROP_SIZE, Renderer, project, stack_buffers
from ..core.errors import ModelFileError, check_finite, torch_load_error
from .flame import FLAME, FlameTexture, load_flame, load_flame_texture
from .flame_files import read_obj, require_file
from .flame import ffhq_center as face_center
from ..model.resnet import resnet50

# DECA's flattened code: name -> columns (decalib config n_shape, n_tex, n_exp, n_pose, n_cam, n_light)
CODE_SLICES = {
    "shape": slice(0, 100),
    "tex": slice(100, 150),
    "exp": slice(150, 200),
    "pose": slice(200, 206),
    "cam": slice(206, 209),
    "light": slice(209, 236),
}
N_PARAMS = 236
# DECA's crop rule (decalib TestData defaults): landmark box grown by 1.1, then by `scale`
_LANDMARK_BOX_GROWTH = 1.1
DEFAULT_CROP_SCALE = 1.25
DECA_SOURCE = "https://github.com/yfeng95/DECA (deca_model.tar, DECA licence, non-commercial)"
FLAME_FILES = ("generic_model.pkl", "landmark_embedding.npy", "head_template.obj", "FLAME_texture.npz")


class DecaAssetError(ModelFileError):
    """A DECA checkpoint that cannot be used; the message names the file and what to do."""


class DecaEncoder(nn.Module):
    """DECA's E_flame: ResNet-50 trunk + MLP 2048 -> 1024 -> 236.

    Module names equal DECA's checkpoint keys (`encoder.*` torchvision-style, `layers.0/2`).
    forward: crop [B, 3, 224, 224] in [0, 1] -> flat codes [B, 236].
    """

    def __init__(self, n_params: int = N_PARAMS):
        super().__init__()
        self.encoder = resnet50()
        self.layers = nn.Sequential(nn.Linear(self.encoder.feature_dim, 1024), nn.ReLU(), nn.Linear(1024, n_params))

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        # DECA pools with AvgPool2d(7) on the 7x7 map of a 224 crop, i.e. the global mean
        return self.layers(self.encoder.features(crop))


def split_codes(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat E_flame output [B, 236] -> shape [B,100], tex [B,50], exp [B,50], pose [B,6], cam [B,3],
    light [B,9,3] (9 SH coefficients x RGB)."""
    codes = {name: params[:, cols] for name, cols in CODE_SLICES.items()}
    codes["light"] = codes["light"].reshape(-1, 9, 3)
    return codes


# ------------------------------------------------------------------ crop


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991, with scale) mapping 2D points src -> dst.

    src, dst: [N, 2].  Returns the [3, 3] float64 matrix T with dst ~ T @ [src, 1] (column vectors);
    this is what skimage's `estimate_transform('similarity', src, dst).params` computes.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(2)
    if np.linalg.matrix_rank(cov) == 0:
        raise ValueError("cannot fit a similarity: the source points coincide")
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection fits better: keep a proper rotation
        signs[-1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = (sing * signs).sum() / src_c.var(0).sum()
    out = np.eye(3)
    out[:2, :2] = scale * rotation
    out[:2, 2] = dst_mean - scale * rotation @ src_mean
    return out


def crop_from_landmarks(landmarks, crop_size: int = DECA_CROP_SIZE, scale: float = DEFAULT_CROP_SCALE) -> torch.Tensor:
    """DECA's crop transform from 68 landmarks (decalib `TestData` with a landmark file).

    landmarks: [68, 2] or [B, 68, 2] pixel (x, y) in the original image (numpy or torch).
    The box of the landmarks, grown by 1.1 then by `scale` and truncated to whole pixels, is
    mapped onto the crop's corners 0 and crop_size - 1.
    Returns: [3, 3] (or [B, 3, 3]) float32 T, original pixel -> crop pixel (column vectors),
    the official `tform.params`; DECA.render wants `inverse(T).transpose(-1, -2)`.
    """
    if torch.is_tensor(landmarks):
        landmarks = landmarks.detach().cpu().double().numpy()
    points = np.asarray(landmarks, np.float64)
    single = points.ndim == 2
    points = points[None] if single else points
    if points.ndim != 3 or points.shape[-1] != 2 or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be finite [68, 2] or [B, 68, 2] pixel coordinates, got {points.shape}")
    last = crop_size - 1
    dst = np.array([[0, 0], [0, last], [last, 0]], np.float64)
    out = []
    for pts in points:
        left, top = pts.min(0)
        right, bottom = pts.max(0)
        box = (right - left + bottom - top) / 2 * _LANDMARK_BOX_GROWTH
        cx, cy = right - (right - left) / 2.0, bottom - (bottom - top) / 2.0
        size = int(box * scale)  # DECA truncates to whole pixels
        if size <= 0:
            raise ValueError(f"landmarks span {box:.3g} px: too small to crop a face")
        half = size / 2
        src = np.array([[cx - half, cy - half], [cx - half, cy + half], [cx + half, cy - half]])
        out.append(similarity_transform(src, dst))
    tform = torch.tensor(np.stack(out), dtype=torch.float32)
    return tform[0] if single else tform


def warp_crop(image: torch.Tensor, tform: torch.Tensor, crop_size: int = DECA_CROP_SIZE) -> torch.Tensor:
    """The crop DECA encodes: skimage `warp(image, tform.inverse, output_shape=(crop, crop))`.

    image: [B, C, H, W] or [C, H, W]; tform: [3, 3] or [B, 3, 3] original pixel -> crop pixel.
    Crop pixel (row i, col j) samples the original at inverse(T) @ (j, i, 1), bilinearly, with
    pixel centres at integer coordinates and zeros outside (skimage order=1, mode='constant').
    Returns: [B, C, crop, crop] (or [C, crop, crop]) in the image's dtype.
    """
    single = image.dim() == 3
    images = image[None] if single else image
    tforms = tform[None] if tform.dim() == 2 else tform
    if images.dim() != 4 or tforms.shape[-2:] != (3, 3) or tforms.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"image [B,C,H,W] {tuple(image.shape)} and tform [B,3,3] {tuple(tform.shape)} do not fit")
    height, width = images.shape[-2:]
    # the sampling grid is computed in float64 on the CPU (some accelerators have no float64)
    inverse = _inverse(tforms.detach().cpu().double(), "tform").expand(images.shape[0], 3, 3)
    steps = torch.arange(crop_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    crop_px = torch.stack([cols, rows, torch.ones_like(rows)], -1).reshape(-1, 3)
    source = crop_px @ inverse.transpose(1, 2)
    x, y = source[..., 0] / source[..., 2], source[..., 1] / source[..., 2]
    # align_corners=False puts pixel k's centre at (2k + 1) / size - 1
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], -1)
    grid = grid.reshape(-1, crop_size, crop_size, 2).to(images.device, images.dtype)
    crop = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crop[0] if single else crop


def _inverse(tform: torch.Tensor, what: str) -> torch.Tensor:
    det = torch.linalg.det(tform[..., :2, :2].double())
    if not bool(torch.isfinite(tform).all()) or bool((det.abs() < 1e-12).any()):
        raise ValueError(f"{what} is not an invertible finite 3x3 transform (det of its 2x2 part {det.tolist()})")
    return torch.linalg.inv(tform)


# ------------------------------------------------------------------ DECA


def _check_codes(codes: dict, batch_keys=("shape", "tex", "exp", "pose", "cam", "light")) -> int:
    missing = [k for k in batch_keys if k not in codes]
    if missing:
        raise ValueError(f"DECA codes are missing {missing}; expected {list(batch_keys)}")
    sizes = {k: codes[k].shape[0] for k in batch_keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"DECA codes have different batch sizes: {sizes}")
    for key in batch_keys:
        if not bool(torch.isfinite(codes[key]).all()):
            raise ValueError(f"DECA code '{key}' contains NaN or infinite values")
    if tuple(codes["cam"].shape[1:]) != (3,) or tuple(codes["light"].shape[1:]) != (9, 3):
        raise ValueError(f"cam must be [B, 3] and light [B, 9, 3], got {tuple(codes['cam'].shape)} and "
                         f"{tuple(codes['light'].shape)}")
    return sizes["shape"]


class DECA(nn.Module):
    """DECA's coarse model: E_flame encoder, FLAME, FLAME texture and the buffer renderer.

    Only `E_flame.*` is in `state_dict()` (FLAME data comes from its own files).  Build with
    `load_deca`.  crop_size: the square crop the codes' camera refers to (DECA: 224).
    """

    def __init__(self, flame: FLAME, texture: FlameTexture, renderer: Renderer, crop_size: int = DECA_CROP_SIZE):
        super().__init__()
        self.E_flame = DecaEncoder()
        self.flame = flame
        self.texture = texture
        self.renderer = renderer
        self.crop_size = crop_size

    def activation_bytes(self, batch: int = 1, training: bool = False) -> int:
        """Estimated peak memory (bytes) of fitting and rendering `batch` faces at 256 px, beyond the weights, for
        a host that makes room before running the model: 40 MiB a face (traced op by op: 32 MiB for encode +
        decode at 256 px). training: DECA is never trained here (the same figure)."""
        return batch * 40 * 2**20

    def encode(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        """crop [B, 3, 224, 224] RGB in [0, 1] (see `warp_crop`) -> codes: shape [B,100], tex [B,50],
        exp [B,50], pose [B,6] (global axis-angle | jaw), cam [B,3] (scale, tx, ty), light [B,9,3]."""
        if crop.dim() != 4 or crop.shape[1:] != (3, 224, 224):
            raise ValueError(f"DECA encodes [B, 3, 224, 224] crops (see warp_crop), got {tuple(crop.shape)}")
        if not bool(torch.isfinite(crop).all()):
            raise ValueError("the crop contains NaN or infinite values")
        low, high = float(crop.min()), float(crop.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"DECA expects crops in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                             "(a [-1, 1] image needs (x + 1) / 2)")
        param = next(self.E_flame.parameters())
        return split_codes(self.E_flame(crop.to(param.device, param.dtype)))

    def decode(self, codes: dict, image_size=None, tform: torch.Tensor | None = None,
               ffhq_center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiffusionRig's `decode`: geometry, and the buffers when `image_size` is given.

        codes: as `encode` returns; image_size: None (geometry only), int or (H, W)
        tform: None (render the crop space directly) or [B, 3, 3] crop -> original transform,
            `inverse(T_orig->crop).transpose(1, 2)` with T from `crop_from_landmarks`
        ffhq_center: None or [B, 3]: move the head so its FFHQ centre lands there (DiffusionRig
            keeps a re-posed head in place this way; pass the centre of the unedited fit)
        Returns dict: verts [B,V,3] (world, moved), trans_verts [B,V,3] (crop space),
            landmarks2d [B,68,2], landmarks3d [B,68,3] (crop space, not moved, as DECA),
            landmarks3d_world [B,68,3], center [B,3] (FFHQ centre of these codes, unmoved),
            albedo_map [B,3,256,256]; with image_size also rendered, normal, albedo [B,3,H,W],
            alpha [B,1,H,W], pix_to_face [B,H,W], bary [B,H,W,3] (see `Renderer`).
        """
        batch = _check_codes(codes)
        verts, lmk2d, lmk3d = self.flame(codes["shape"], codes["exp"], codes["pose"])
        center = face_center(lmk2d)
        if ffhq_center is not None:
            if ffhq_center.shape != (batch, 3) and ffhq_center.shape != (1, 3):
                raise ValueError(f"ffhq_center must be [B, 3] with B = {batch}, got {tuple(ffhq_center.shape)}")
            if not bool(torch.isfinite(ffhq_center).all()):
                raise ValueError("ffhq_center contains NaN or infinite values")
            verts = verts + (ffhq_center.to(verts) - center)[:, None]
        out = {
            "verts": verts,
            "trans_verts": project(verts, codes["cam"]),
            "landmarks2d": project(lmk2d, codes["cam"])[..., :2],
            "landmarks3d": project(lmk3d, codes["cam"]),
            "landmarks3d_world": lmk3d,
            "center": center,
            "albedo_map": self.texture(codes["tex"]),
        }
        if image_size is not None:
            out.update(self.renderer(verts, out["trans_verts"], out["albedo_map"], codes["light"],
                                     image_size=image_size, tform=tform, crop_size=self.crop_size))
        return out

    def render(self, codes: dict, image_size, tform: torch.Tensor | None = None,
               ffhq_center: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's physical conditioning [B, 9, H, W] = rendered | normal | albedo.

        Same arguments as `decode` (image_size required).
        """
        return stack_buffers(self.decode(codes, image_size, tform, ffhq_center))


def _read_e_flame(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E_flame weights of a `deca_model.tar` (a torch.save dict), checked key by key."""
    advice = f"use deca_model.tar from {DECA_SOURCE}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickle, corrupt or truncated file, absurd sizes (MemoryError)
        raise torch_load_error(exc, path, DecaAssetError, "DECA checkpoint", advice) from exc
    if not isinstance(checkpoint, dict) or "E_flame" not in checkpoint:
        found = [str(k) for k in checkpoint][:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise DecaAssetError(f"{path}: no 'E_flame' weights (found {found}); {advice}", path)
    state = checkpoint["E_flame"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        what = type(state).__name__ if not isinstance(state, dict) else "dict holding other things than named tensors"
        raise DecaAssetError(f"{path}: 'E_flame' is a {what}, not the encoder's weights; {advice}", path)
    # BatchNorm counters do not affect inference; older checkpoints may lack them
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} {state[k].dtype} (expected {tuple(v.shape)} {v.dtype})"
                  for k, v in expected.items()
                  if k in state and (state[k].shape != v.shape or (state[k].is_floating_point() != v.is_floating_point()
                                                                    and not k.endswith("num_batches_tracked")))]
    if missing or unexpected or mismatched:
        problems = [f"{name} {len(keys)}: {keys[:5]}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if keys]
        raise DecaAssetError(f"{path}: E_flame is not DECA's ResNet-50 encoder with {N_PARAMS} outputs ("
                             + "; ".join(problems) + f"); {advice}", path)
    check_finite(state, path, DecaAssetError, advice)
    return state


def load_deca(deca_model_tar: str | os.PathLike, flame_dir: str | os.PathLike | Mapping[str, str | os.PathLike],
              device="cpu", backend: str = "auto") -> DECA:
    """DECA from `deca_model.tar` (models/deca/) and the FLAME files in `flame_dir` (models/flame/):
    generic_model.pkl, landmark_embedding.npy, head_template.obj, FLAME_texture.npz. flame_dir may
    also map each of those names (FLAME_FILES) to its path, for files kept in different folders.

    The checkpoint is read with `torch.load(weights_only=True)`; its E_detail / D_detail are not
    used (DiffusionRig renders the coarse model).  backend: rasterizer backend of `Renderer`.
    Returns the model in eval mode on `device`.
    """
    deca_model_tar = require_file(deca_model_tar, "deca", DECA_SOURCE)
    files = flame_dir if isinstance(flame_dir, Mapping) else {name: Path(flame_dir) / name for name in FLAME_FILES}
    pkl, lmk, obj, tex = (Path(files[name]) for name in FLAME_FILES)
    flame = load_flame(pkl, lmk)
    texture = load_flame_texture(tex)
    renderer = Renderer(*read_obj(obj, n_vertices=flame.v_template.shape[0], n_faces=flame.faces.shape[0]),
                        backend=backend)
    deca = DECA(flame, texture, renderer)
    state = _read_e_flame(deca_model_tar, deca.E_flame.state_dict())
    deca.E_flame.load_state_dict(state, strict=False)
    return deca.to(device).eval()

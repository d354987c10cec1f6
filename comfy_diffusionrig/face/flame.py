"""FLAME (Li et al. 2017) as DECA drives it: the head model, its landmarks and its texture space.

The math is plain functions over tensors (`batch_rodrigues`, `lbs`, `dynamic_lut_rows`,
`vertices_to_landmarks`, `ffhq_center`); `FLAME` and `FlameTexture` only hold the model
data as buffers. The asset files are read by `flame_files` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.conventions import EYE_LEFT, EYE_RIGHT, MOUTH_LEFT, MOUTH_RIGHT
from ..core.errors import check_finite
from .flame_files import (_EXP_OFFSET, N_EXP, N_POSE, N_SHAPE, N_TEX, TEXTURE_SOURCE, UV_SIZE, FlameAssetError,
                          _read_npz, read_flame_model, read_landmark_embedding, require_file)


def batch_rodrigues(rotvecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle [N,3] -> rotation matrices [N,3,3].

    The angle is |r + 1e-8| (the eps added to every component, as smplx/DECA), so r = 0 gives I.
    """
    angle = torch.norm(rotvecs + 1e-8, dim=1, keepdim=True)
    rx, ry, rz = torch.split(rotvecs / angle, 1, dim=1)
    zeros = torch.zeros_like(rx)
    skew = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    sin, cos = torch.sin(angle)[:, :, None], torch.cos(angle)[:, :, None]
    eye = torch.eye(3, dtype=rotvecs.dtype, device=rotvecs.device)
    return eye + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def _rigid_transforms(rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor):
    """Forward kinematics.  rot_mats [B,J,3,3], joints [B,J,3] (rest), parents [J] (parents[0] = -1).

    Returns posed joints [B,J,3] and skinning transforms [B,J,4,4] (rest joint -> posed).
    """
    rest = joints.unsqueeze(-1)
    offsets = rest.clone()
    offsets[:, 1:] -= rest[:, parents[1:]]
    local = torch.cat([F.pad(rot_mats, [0, 0, 0, 1]), F.pad(offsets, [0, 0, 0, 1], value=1)], dim=3)
    chain = [local[:, 0]]
    for i, parent in enumerate(parents.tolist()[1:], 1):
        chain.append(torch.matmul(chain[parent], local[:, i]))
    world = torch.stack(chain, dim=1)
    # subtract the rotated rest position so the transforms act on rest-pose vertices
    skinning = world - F.pad(torch.matmul(world, F.pad(rest, [0, 0, 0, 1])), [3, 0])
    return world[:, :, :3, 3], skinning


def lbs(betas, full_pose, v_template, shapedirs, posedirs, j_regressor, parents, weights):
    """Linear blend skinning (smplx/DECA `lbs`, axis-angle pose).

    betas [B,K]; full_pose [B,J*3]; v_template [V,3]; shapedirs [V,3,K]; posedirs [9(J-1),3V];
    j_regressor [J,V]; parents [J]; weights [V,J].
    Returns vertices [B,V,3] and posed joints [B,J,3].
    """
    batch = betas.shape[0]
    v_shaped = v_template + torch.einsum("bl,mkl->bmk", betas, shapedirs)
    joints = torch.einsum("bik,ji->bjk", v_shaped, j_regressor)
    rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).view(batch, -1, 3, 3)
    eye = torch.eye(3, dtype=betas.dtype, device=betas.device)
    pose_feature = (rot_mats[:, 1:] - eye).view(batch, -1)
    v_posed = torch.matmul(pose_feature, posedirs).view(batch, -1, 3) + v_shaped
    posed_joints, transforms = _rigid_transforms(rot_mats, joints, parents)
    per_vertex = torch.matmul(weights, transforms.view(batch, -1, 16)).view(batch, -1, 4, 4)
    homogeneous = F.pad(v_posed, [0, 1], value=1.0)
    verts = torch.matmul(per_vertex, homogeneous.unsqueeze(-1))[:, :, :3, 0]
    return verts, posed_joints


def dynamic_lut_rows(full_pose: torch.Tensor, neck_chain: torch.Tensor) -> torch.Tensor:
    """Row of DECA's contour look-up table for each pose: [B,J*3] -> [B] int64.

    The head's yaw relative to the body (rotations of `neck_chain`, child first) in whole
    degrees, clamped above at 39, rounded half-to-even (torch.round); rows 0..39 hold yaw
    0..39, rows 40..78 yaw -1..-39, and anything below -39 uses row 78.
    """
    batch = full_pose.shape[0]
    rot_mats = batch_rodrigues(full_pose.reshape(batch, -1, 3)[:, neck_chain].reshape(-1, 3)).view(batch, -1, 3, 3)
    relative = torch.eye(3, dtype=full_pose.dtype, device=full_pose.device).expand(batch, 3, 3)
    for k in range(rot_mats.shape[1]):
        relative = torch.bmm(rot_mats[:, k], relative)
    yaw = torch.atan2(-relative[:, 2, 0], torch.sqrt(relative[:, 0, 0] ** 2 + relative[:, 1, 0] ** 2))
    degrees = torch.round(torch.clamp(yaw * 180.0 / np.pi, max=39)).long()
    return torch.where(degrees >= 0, degrees, torch.where(degrees < -39, 78, 39 - degrees))


def vertices_to_landmarks(verts: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor):
    """Barycentric landmarks.  verts [B,V,3]; faces [F,3]; face_idx [B,L]; bary [B,L,3] -> [B,L,3]."""
    corners = verts[torch.arange(verts.shape[0], device=verts.device)[:, None, None], faces[face_idx]]
    return torch.einsum("blfi,blf->bli", corners, bary)


def ffhq_center(landmarks2d: torch.Tensor) -> torch.Tensor:
    """DiffusionRig's face centre (FFHQ alignment rule) from the 68 landmarks: [B,68,D] -> [B,D].

    eye_avg = mean of both eyes' centres (36..41, 42..47), mouth_avg = mean of the mouth
    corners (48, 54); centre = eye_avg + 0.1 * (mouth_avg - eye_avg).
    """
    eye_avg = (landmarks2d[:, EYE_LEFT].mean(1) + landmarks2d[:, EYE_RIGHT].mean(1)) * 0.5
    mouth_avg = (landmarks2d[:, MOUTH_LEFT] + landmarks2d[:, MOUTH_RIGHT]) * 0.5
    return eye_avg + (mouth_avg - eye_avg) * 0.1


def _kinematic_chain(parents: torch.Tensor, joint: int) -> torch.Tensor:
    chain = [joint]
    while int(parents[chain[-1]]) != -1:
        chain.append(int(parents[chain[-1]]))
    return torch.tensor(chain)


def _float32(array: np.ndarray) -> torch.Tensor:
    """DECA casts every FLAME array to float32 (after slicing/reshaping in float64)."""
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def _check_code(value: torch.Tensor, width: int, name: str) -> None:
    if value.dim() != 2 or value.shape[1] != width:
        raise ValueError(f"FLAME {name} must be [B, {width}], got {tuple(value.shape)}")


def head_id(flame: "FLAME") -> str:
    """A short fingerprint of a FLAME head's geometry (template, shape/expression bases, mesh): codes fitted
    with one FLAME model mean another face under another model, so saved rigs record it."""
    cached = getattr(flame, "_head_id", None)
    if cached is None:
        digest = hashlib.sha256()
        for name in ("v_template", "shapedirs", "faces"):
            digest.update(getattr(flame, name).detach().cpu().contiguous().numpy().tobytes())
        cached = flame._head_id = digest.hexdigest()[:16]
    return cached


class FLAME(nn.Module):
    """FLAME as DECA uses it: 100 shape, 50 expression, pose = global axis-angle | jaw.

    Neck and eyes stay at rest, as in DECA.  Build with `load_flame`.  Buffers are not part of
    `state_dict()` (they come from the asset files, not from checkpoints).
    """

    # joint order of FLAME: global, neck, jaw, left eye, right eye
    NECK = 1

    def __init__(self, model: dict[str, np.ndarray], embedding: dict[str, torch.Tensor]):
        super().__init__()
        shapedirs = model["shapedirs"]
        shapedirs = np.concatenate([shapedirs[:, :, :N_SHAPE], shapedirs[:, :, _EXP_OFFSET:_EXP_OFFSET + N_EXP]], 2)
        posedirs = model["posedirs"].reshape(-1, model["posedirs"].shape[-1]).T
        parents = torch.as_tensor(model["kintree_table"][0].astype(np.int64))
        parents[0] = -1  # FLAME stores the root's parent as uint32 max
        if any(not 0 <= int(parents[i]) < i for i in range(1, len(parents))):
            raise FlameAssetError(f"FLAME kinematic tree {parents.tolist()} does not list parents before children")
        buffers = {
            "faces": torch.as_tensor(model["f"].astype(np.int64)),
            "v_template": _float32(model["v_template"]),
            "shapedirs": _float32(shapedirs),
            "posedirs": _float32(posedirs),
            "j_regressor": _float32(model["J_regressor"]),
            "parents": parents,
            "lbs_weights": _float32(model["weights"]),
            "neck_chain": _kinematic_chain(parents, self.NECK),
            **{f"lmk_{k}": v for k, v in embedding.items()},
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def full_pose(self, pose: torch.Tensor) -> torch.Tensor:
        """pose [B,6] (global | jaw) -> [B,J*3] = global, neck 0, jaw, eyes 0 (DECA's full pose)."""
        batch = pose.shape[0]
        n_joints = self.parents.shape[0]
        zeros = pose.new_zeros(batch, 3)
        return torch.cat([pose[:, :3], zeros, pose[:, 3:], pose.new_zeros(batch, 3 * (n_joints - 3))], 1)

    def skin(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor):
        """shape [B,100], expression [B,50], pose [B,6] -> vertices [B,V,3], posed joints [B,J,3]."""
        _check_code(shape, N_SHAPE, "shape")
        _check_code(expression, N_EXP, "expression")
        _check_code(pose, N_POSE, "pose")
        betas = torch.cat([shape, expression], 1)
        return lbs(betas, self.full_pose(pose), self.v_template, self.shapedirs, self.posedirs,
                   self.j_regressor, self.parents, self.lbs_weights)

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor):
        """shape [B,100], expression [B,50], pose [B,6] -> vertices [B,V,3], landmarks2d [B,68,3],
        landmarks3d [B,68,3].

        landmarks2d: 17 pose-dependent contour points then 51 static ones, as 3D world points
        (DECA projects them later); landmarks3d: DECA's fixed 68-point embedding.
        """
        verts, _ = self.skin(shape, expression, pose)
        batch = verts.shape[0]
        rows = dynamic_lut_rows(self.full_pose(pose), self.neck_chain)
        face_idx = torch.cat([self.lmk_dynamic_faces[rows], self.lmk_static_faces.expand(batch, -1)], 1)
        bary = torch.cat([self.lmk_dynamic_bary[rows], self.lmk_static_bary.expand(batch, -1, -1)], 1)
        landmarks2d = vertices_to_landmarks(verts, self.faces, face_idx, bary)
        landmarks3d = vertices_to_landmarks(verts, self.faces, self.lmk_full_faces.expand(batch, -1),
                                            self.lmk_full_bary.expand(batch, -1, -1))
        return verts, landmarks2d, landmarks3d


def load_flame(generic_model_pkl: str | os.PathLike, landmark_embedding_npy: str | os.PathLike) -> FLAME:
    """FLAME 2020's `generic_model.pkl` + DECA's `landmark_embedding.npy` -> `FLAME` (CPU, float32).

    Nothing in either file is executed; files that are not these raise `FlameAssetError`.
    """
    model = read_flame_model(generic_model_pkl)
    embedding = read_landmark_embedding(landmark_embedding_npy)
    n_faces = model["f"].shape[0]
    for name in ("static_faces", "dynamic_faces", "full_faces"):
        if embedding[name].numel() and (embedding[name].min() < 0 or embedding[name].max() >= n_faces):
            raise FlameAssetError(f"{landmark_embedding_npy}: landmark faces out of range for the {n_faces} faces "
                                  f"of {generic_model_pkl}; the two files do not belong together",
                                  landmark_embedding_npy)
    return FLAME(model, embedding)


class FlameTexture(nn.Module):
    """FLAME's PCA albedo space as DECA uses it: texcode [B,N] -> albedo [B,3,256,256] RGB.

    mean: [R,R,3], basis: [R,R,3,N] (BGR, 0..255, row 0 = top of the UV map).  The map is
    mean/255 + basis/255 @ code, nearest-resized to 256 (texel i*R//256), BGR -> RGB; not clamped.
    """

    def __init__(self, mean: np.ndarray, basis: np.ndarray, size: int = UV_SIZE):
        super().__init__()
        self.resolution = mean.shape[0]
        self.size = size
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32).reshape(-1) / 255), persistent=False)
        basis = np.asarray(basis, np.float32).reshape(-1, basis.shape[-1]) / 255
        self.register_buffer("basis", torch.as_tensor(basis), persistent=False)
        texels = torch.arange(size) * self.resolution // size
        self.register_buffer("texels", texels, persistent=False)

    def forward(self, texcode: torch.Tensor) -> torch.Tensor:
        if texcode.dim() != 2 or texcode.shape[1] != self.basis.shape[1]:
            raise ValueError(f"texcode must be [B, {self.basis.shape[1]}], got {tuple(texcode.shape)}")
        flat = self.mean + texcode.to(self.basis.dtype) @ self.basis.T
        res = self.resolution
        maps = flat.view(-1, res, res, 3).permute(0, 3, 1, 2)
        maps = maps.index_select(2, self.texels).index_select(3, self.texels)
        return maps.flip(1)  # BGR -> RGB


def load_flame_texture(path: str | os.PathLike, n_components: int = N_TEX) -> FlameTexture:
    """`FLAME_texture.npz` (keys mean [R,R,3], tex_dir [R,R,3,200]) -> `FlameTexture` with the first PCs."""
    path = require_file(path, "flame", TEXTURE_SOURCE)
    arrays = _read_npz(path, ("mean", "tex_dir"))
    mean, basis = arrays["mean"], arrays["tex_dir"]
    res = mean.shape[0] if mean.ndim else 0
    if mean.shape != (res, res, 3) or basis.shape[:3] != (res, res, 3) or basis.ndim != 4 or not res:
        raise FlameAssetError(f"{path}: mean {mean.shape} / tex_dir {basis.shape} are not [R,R,3] / [R,R,3,N]; "
                              f"use FLAME's FLAME_texture.npz ({TEXTURE_SOURCE})", path)
    if basis.shape[3] < n_components:
        raise FlameAssetError(f"{path}: tex_dir has {basis.shape[3]} components, {n_components} are needed", path)
    basis = basis[..., :n_components]
    check_finite({"mean": mean, "tex_dir": basis}, path, FlameAssetError, f"download it again ({TEXTURE_SOURCE})",
                 dtype=np.float32)  # FlameTexture keeps float32
    return FlameTexture(mean, basis)

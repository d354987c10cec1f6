"""A fitted face rig: DECA codes of aligned faces plus what rendering them back needs; edits on it.

The rig is what artists edit between fitting and rendering. Edits are pure functions
returning a new rig: relight, change expression / jaw / head pose, copy them from another
face, or sweep one parameter over a batch of frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..core.conventions import GLOBAL_POSE, JAW_POSE
from .buffers import stack_buffers

CODE_KEYS = ("shape", "tex", "exp", "pose", "cam", "light")


@dataclass(frozen=True)
class FaceRig:
    """codes: shape [B,100], tex [B,50], exp [B,50], pose [B,6] (global axis-angle | jaw), cam [B,3], light [B,9,3].

    tform [B,3,3]: the renderer's transform from DECA crop to the aligned image (official
    decode() convention: inverse(T_aligned->crop) transposed); ffhq_center [B,3]: the FFHQ
    centre of the unedited fit (FLAME units), so a re-posed head stays where alignment put it;
    image_size (H, W): the aligned image size the buffers are rendered at.
    head: the `flame.head_id` of the FLAME model the codes belong to (None: unknown); rendering
    checks it, since the same codes under another FLAME model are another face.
    """

    codes: dict
    tform: torch.Tensor
    ffhq_center: torch.Tensor
    image_size: tuple[int, int]
    head: str | None = None

    def __len__(self) -> int:
        return self.codes["shape"].shape[0]

    def with_codes(self, **changes: torch.Tensor) -> "FaceRig":
        unknown = set(changes) - set(CODE_KEYS)
        if unknown:
            raise KeyError(f"unknown code(s) {sorted(unknown)}; a rig has {CODE_KEYS}")
        return replace(self, codes={**self.codes, **changes})

    def with_light(self, light: torch.Tensor) -> "FaceRig":
        """Every face lit by one SH light [9, 3] (or one light per face, [B, 9, 3])."""
        light = light.reshape(-1, 9, 3) if light.ndim == 2 else light
        return self.with_codes(light=_broadcast(light, len(self), "light").clone())

    def select(self, index) -> "FaceRig":
        """Rows of the batch (an int, a slice or a list of ints); keeps the batch dimension."""
        if isinstance(index, int):
            index = [index]
        return FaceRig({k: v[index] for k, v in self.codes.items()}, self.tform[index], self.ffhq_center[index],
                       self.image_size, self.head)

    def expand(self, n: int) -> "FaceRig":
        """Repeat a one-face rig n times (frames of a sweep)."""
        if len(self) != 1:
            raise ValueError(f"only a rig of one face can be expanded to {n} frames, this one has {len(self)}")
        rep = lambda t: t.expand(n, *t.shape[1:]).clone()  # noqa: E731
        return FaceRig({k: rep(v) for k, v in self.codes.items()}, rep(self.tform), rep(self.ffhq_center),
                       self.image_size, self.head)

    @staticmethod
    def cat(rigs: list["FaceRig"]) -> "FaceRig":
        sizes = {r.image_size for r in rigs}
        if len(sizes) != 1:
            raise ValueError(f"cannot batch rigs rendered at different sizes {sorted(sizes)}")
        heads = {r.head for r in rigs} - {None}
        if len(heads) > 1:
            raise ValueError("cannot batch rigs fitted with different FLAME models")
        return FaceRig({k: torch.cat([r.codes[k] for r in rigs]) for k in CODE_KEYS},
                       torch.cat([r.tform for r in rigs]), torch.cat([r.ffhq_center for r in rigs]), rigs[0].image_size,
                       next(iter(heads), None))


RENDER_BATCH = 16  # faces rendered together by render_layers (bounds its memory on long sweeps)


@torch.no_grad()
def fit_faces(deca, images: torch.Tensor, landmarks) -> FaceRig:
    """Fit DECA to aligned faces, as DiffusionRig prepares its data.

    images: [B, 3, H, W] RGB in [0, 1] (FFHQ-aligned faces); landmarks: [B, 68, 2] pixel (x, y)
    of each face in its image. The DECA crop comes from the landmarks (DECA's TestData rule).
    """
    from .deca import crop_from_landmarks, warp_crop
    from .flame import head_id

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"fit_faces needs images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    device = next(deca.parameters()).device
    to_crop = crop_from_landmarks(landmarks)
    to_crop = to_crop[None] if to_crop.ndim == 2 else to_crop
    if to_crop.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {to_crop.shape[0]} landmark sets")
    codes = deca.encode(warp_crop(images.float(), to_crop).to(device))
    codes = {k: v.float().cpu() for k, v in codes.items()}
    center = deca.decode({k: v.to(device) for k, v in codes.items()})["center"].float().cpu()
    tform = torch.linalg.inv(to_crop.double()).transpose(1, 2).float()  # official decode() convention
    return FaceRig(codes, tform, center, (int(images.shape[2]), int(images.shape[3])), head_id(deca.flame))


RENDER_LAYERS = ("rendered", "normal", "albedo", "alpha")


@torch.no_grad()
def render_layers(deca, rig: FaceRig, batch_size: int = RENDER_BATCH) -> dict[str, torch.Tensor]:
    """Every face of the rig rendered (the head kept at its FFHQ centre), layer by layer, on the CPU.

    Returns dict: rendered, normal, albedo [B, 3, H, W] (the buffers, see `buffers.Renderer`:
    normal = unit FLAME-frame normals, x image right, y up, z towards the camera) and alpha
    [B, 1, H, W] (1 where the rasterizer covered the pixel with the face mesh, else 0).
    """
    check_finite(rig)
    check_head(deca, rig)
    device = next(deca.parameters()).device
    parts = {key: [] for key in RENDER_LAYERS}
    for first in range(0, len(rig), batch_size):
        part = rig.select(list(range(first, min(first + batch_size, len(rig)))))
        codes = {k: v.to(device) for k, v in part.codes.items()}
        out = deca.decode(codes, part.image_size, part.tform.to(device), part.ffhq_center.to(device))
        for key in RENDER_LAYERS:
            parts[key].append(out[key].cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def check_head(deca, rig: FaceRig) -> None:
    """Refuse to render a rig whose codes belong to another FLAME model than this DECA's."""
    from .flame import head_id

    if rig.head is not None and rig.head != head_id(deca.flame):
        raise ValueError(
            f"this face rig was fitted with another FLAME model (head {rig.head}) than the loaded DECA's (head "
            f"{head_id(deca.flame)}): its codes would draw another face. Load DECA with the FLAME files the rig was "
            "made with (a rig from the offline demo needs the demo's synthetic FLAME files in models/flame), or fit "
            "the photo again")


def render_rig(deca, rig: FaceRig, batch_size: int = RENDER_BATCH) -> torch.Tensor:
    """[B, 9, H, W] rendered|normal|albedo of every face of the rig (the head kept at its FFHQ centre)."""
    return stack_buffers(render_layers(deca, rig, batch_size))


def _broadcast(source: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if source.shape[0] == n:
        return source
    if source.shape[0] == 1:
        return source.expand(n, *source.shape[1:])
    raise ValueError(f"the reference has {source.shape[0]} faces for {n} target faces; use one reference face "
                     "or as many as targets")


def copy_from(rig: FaceRig, reference: FaceRig, light: bool = False, expression: bool = False, jaw: bool = False,
              head_pose: bool = False) -> FaceRig:
    """Take light / expression / jaw / global head pose from another fit (one reference face or one per face)."""
    n = len(rig)
    exp, pose, sh = rig.codes["exp"], rig.codes["pose"].clone(), rig.codes["light"]
    ref_pose = _broadcast(reference.codes["pose"], n, "pose")
    if light:
        sh = _broadcast(reference.codes["light"], n, "light").clone()
    if expression:
        exp = _broadcast(reference.codes["exp"], n, "expression").clone()
    if jaw:
        pose[:, JAW_POSE] = ref_pose[:, JAW_POSE]
    if head_pose:
        pose[:, GLOBAL_POSE] = ref_pose[:, GLOBAL_POSE]
    return rig.with_codes(exp=exp, pose=pose, light=sh)


def axis_angle_to_matrix(r: torch.Tensor) -> torch.Tensor:
    """[..., 3] axis-angle -> [..., 3, 3] rotation (Rodrigues; exact at zero)."""
    angle = r.norm(dim=-1, keepdim=True)
    axis = r / angle.clamp_min(1e-12)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*r.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(k)
    s, c = angle.sin()[..., None], angle.cos()[..., None]
    return eye + s * k + (1 - c) * (k @ k)


def matrix_to_axis_angle(m: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotation -> [..., 3] axis-angle (angle in [0, pi]); via float64 for accuracy."""
    m64 = m.double()
    cos = ((m64.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.acos(cos)
    vee = torch.stack([m64[..., 2, 1] - m64[..., 1, 2], m64[..., 0, 2] - m64[..., 2, 0],
                       m64[..., 1, 0] - m64[..., 0, 1]], -1)
    sin = angle.sin()
    small = sin.abs() < 1e-6
    axis = vee / (2 * torch.where(small, torch.ones_like(sin), sin))[..., None]
    result = axis * angle[..., None]
    # near 0: vee/2 is the answer; near pi: take the axis from the symmetric part
    near_pi = small & (cos < 0)
    if bool(near_pi.any()):
        sym = (m64 + torch.eye(3, dtype=m64.dtype, device=m64.device)) / 2
        col = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
        pick = torch.gather(sym, -1, col[..., None, None].expand(*col.shape, 3, 1)).squeeze(-1)
        pick = pick / pick.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        result = torch.where(near_pi[..., None], pick * math.pi, result)
    result = torch.where((small & (cos > 0))[..., None], vee / 2, result)
    return result.to(m.dtype)


def euler_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Degrees -> [B,3,3] in FLAME's frame (+y up, +z to the camera): yaw about y (positive turns the face to
    image right), pitch about x (positive looks down), roll about z (positive tilts the head to image right)."""
    def axis(angle: torch.Tensor, index: int, sign: float) -> torch.Tensor:
        vec = torch.zeros(*angle.shape, 3, dtype=angle.dtype, device=angle.device)
        vec[..., index] = sign * torch.deg2rad(angle)
        return axis_angle_to_matrix(vec)

    return axis(yaw, 1, 1.0) @ axis(pitch, 0, 1.0) @ axis(roll, 2, -1.0)


def euler_angles(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `euler_matrix`: [..., 3, 3] rotation -> (yaw, pitch, roll) in degrees, float64.

    matrix = Ry(yaw) Rx(pitch) Rz(-roll); unique for |pitch| < 90.
    """
    m = matrix.double()
    pitch = torch.asin((-m[..., 1, 2]).clamp(-1, 1))
    yaw = torch.atan2(m[..., 0, 2], m[..., 2, 2])
    roll = -torch.atan2(m[..., 1, 0], m[..., 1, 1])
    return torch.rad2deg(yaw), torch.rad2deg(pitch), torch.rad2deg(roll)


def edit_pose(rig: FaceRig, yaw: float | torch.Tensor = 0.0, pitch: float | torch.Tensor = 0.0,
              roll: float | torch.Tensor = 0.0, jaw_open: float | torch.Tensor = 0.0,
              expression_scale: float | torch.Tensor = 1.0) -> FaceRig:
    """Turn the head by (yaw, pitch, roll) degrees on top of its fitted pose, open the jaw by jaw_open
    degrees more than fitted (negative closes it), scale the expression; scalars or one value per face."""
    pose, exp = rig.codes["pose"].clone(), rig.codes["exp"]
    n, dtype = len(rig), pose.dtype
    as_batch = lambda v: torch.as_tensor(v, dtype=torch.float64).expand(n).clone()  # noqa: E731
    turn = euler_matrix(as_batch(yaw), as_batch(pitch), as_batch(roll))
    fitted = axis_angle_to_matrix(pose[:, GLOBAL_POSE].double())
    pose[:, GLOBAL_POSE] = matrix_to_axis_angle(turn @ fitted).to(dtype)
    zero = torch.zeros(n, dtype=torch.float64)
    opening = axis_angle_to_matrix(torch.stack([torch.deg2rad(as_batch(jaw_open)), zero, zero], -1))
    jaw = axis_angle_to_matrix(pose[:, JAW_POSE].double())
    pose[:, JAW_POSE] = matrix_to_axis_angle(jaw @ opening).to(dtype)  # FLAME's jaw opens about +x
    exp = exp * as_batch(expression_scale).to(exp.dtype)[:, None]
    return rig.with_codes(pose=pose, exp=exp)


def check_finite(rig: FaceRig, what: str = "face rig") -> None:
    for key, value in rig.codes.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the {what} has NaN or infinite '{key}' codes; fit the face again (is the input "
                             "image valid?) or check the edit values")


def sweep_values(start: float, end: float, frames: int, ease: bool = False) -> np.ndarray:
    """frames values from start to end inclusive; ease = smooth start and stop (cosine)."""
    if frames < 1:
        raise ValueError(f"a sweep needs at least 1 frame, got {frames}")
    s = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    if ease:
        s = (1 - np.cos(np.pi * s)) / 2
    return start + (end - start) * s


SWEEP_PARAMETERS = ("light_azimuth", "light_elevation", "light_intensity", "jaw_open", "head_yaw", "head_pitch",
                    "head_roll", "expression_strength")


def sweep(rig: FaceRig, parameter: str, values) -> FaceRig:
    """One frame per value for every face (face-major rows: face 0's frames, then face 1's, ...,
    as `edit_faces` takes them).

    light_azimuth / light_elevation: degrees the fitted light turns (about the vertical / the
    horizontal axis); light_intensity: scale of the light; jaw_open, head_yaw/pitch/roll:
    degrees on top of the fit (see `edit_pose`); expression_strength: expression scale.
    """
    from .lighting import rotate_sh

    if parameter not in SWEEP_PARAMETERS:
        raise ValueError(f"unknown sweep parameter {parameter!r}; choose one of {', '.join(SWEEP_PARAMETERS)}")
    values = torch.as_tensor(np.asarray(values, dtype=np.float64))
    n, frames = len(rig), values.numel()
    rows = rig.select([face for face in range(n) for _ in range(frames)]) if frames > 1 else rig
    per_row = values.repeat(n)
    light = rows.codes["light"]
    if parameter == "light_azimuth":
        return rows.with_codes(light=rotate_sh(light, yaw_deg=per_row))
    if parameter == "light_elevation":
        return rows.with_codes(light=rotate_sh(light, pitch_deg=per_row))
    if parameter == "light_intensity":
        return rows.with_codes(light=light * per_row.to(light.dtype).view(-1, 1, 1))
    keyword = {"jaw_open": "jaw_open", "head_yaw": "yaw", "head_pitch": "pitch", "head_roll": "roll",
               "expression_strength": "expression_scale"}[parameter]
    return edit_pose(rows, **{keyword: per_row})


def preset_from_rig(rig: FaceRig, index: int = 0, original: FaceRig | None = None, light: bool = True,
                    expression: bool = False, jaw: bool = False, name: str = "", sliders: dict | None = None) -> dict:
    """A preset document (see `presets.py`) from one face of a rig.

    light: its SH light, with the Relight slider values that make it (`light_parameters`: exact
    for slider and preset lights, the nearest directional light otherwise) unless `sliders` is given;
    expression / jaw: its absolute expression code / jaw pose; original: the same face before
    Edit Expression & Pose, to store the head turn between the two (yaw, pitch, roll degrees).
    """
    from .lighting import light_parameters
    from .presets import make_preset

    if not 0 <= index < len(rig):
        raise ValueError(f"face index {index} but the rig has {len(rig)} face(s)")
    sh = None
    if light:
        sh = rig.codes["light"][index].double()
        if sliders is None:
            azimuth, elevation, intensity, ambient, color = light_parameters(sh)
            sliders = {"azimuth": round(float(azimuth), 3), "elevation": round(float(elevation), 3),
                       "intensity": round(float(intensity), 4), "ambient": round(float(ambient), 4),
                       "color": [round(float(c), 4) for c in color]}
        sh = sh.tolist()
    edit = {}
    if expression:
        edit["expression"] = [round(float(v), 6) for v in rig.codes["exp"][index]]
    if jaw:
        edit["jaw_pose"] = [round(float(v), 6) for v in rig.codes["pose"][index, JAW_POSE]]
    if original is not None:
        if len(original) != len(rig):
            raise ValueError(f"the original rig has {len(original)} face(s), the edited one {len(rig)}")
        turn = axis_angle_to_matrix(rig.codes["pose"][index, GLOBAL_POSE].double()) @ \
            axis_angle_to_matrix(original.codes["pose"][index, GLOBAL_POSE].double()).T
        edit["head_turn"] = {k: round(float(v), 4) for k, v in zip(("yaw", "pitch", "roll"), euler_angles(turn))}
    return make_preset(name, sh=sh, sliders=sliders if light else None, edit=edit or None)


def apply_preset(rig: FaceRig, preset: dict, light: bool = True, expression: bool = True, pose: bool = True
                 ) -> FaceRig:
    """Every face of the rig with what a preset holds: its light, its expression, its jaw pose and head turn.

    preset: a checked document (`presets.load_preset`); the switches skip parts of it.
    """
    n = len(rig)
    out = rig
    if light and "light" in preset:
        out = out.with_light(torch.tensor(preset["light"]["sh"], dtype=rig.codes["light"].dtype))
    edit = preset.get("edit", {})
    if expression and "expression" in edit:
        exp = torch.tensor(edit["expression"], dtype=out.codes["exp"].dtype).expand(n, -1).clone()
        out = out.with_codes(exp=exp)
    if pose and "jaw_pose" in edit:
        pose_codes = out.codes["pose"].clone()
        pose_codes[:, JAW_POSE] = torch.tensor(edit["jaw_pose"], dtype=pose_codes.dtype)
        out = out.with_codes(pose=pose_codes)
    if pose and "head_turn" in edit:
        out = edit_pose(out, **edit["head_turn"])
    return out

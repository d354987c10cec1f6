"""Where an edit of the rig moves the face: the dense motion between a fitted rig and its edit.

Both rigs are drawn with the same mesh, so every pixel the edited rig covers names a surface
point (a triangle and its barycentrics); the same point under the fitted rig is where that pixel's
skin sits in the photo. That flow moves the photo's own detail with a jaw that opens or a head that
turns (`photo.paste`). It is not to be believed where the point was hidden in the photo (behind the
nose, the far cheek of a turned head), where the surface is stretched open (the mouth opening: a
seam in the photo), or where the face uncovers background it hid: there the trust is 0 and paste
back uses the edit's own pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..photo.paste import FaceMotion
from .buffers import transform_points
from .rig import FaceRig, check_finite, check_head

MOTION_SIZE = 256  # the flow is drawn on at least this grid (a 32 px model's face is too coarse for it)
DEPTH_TOLERANCE = 0.015  # of the grid: a point this much behind the photo's surface there counts as hidden
MIN_STRETCH = 1 / 3  # a triangle drawn over more than 3x its area in the photo: stretched open, untrusted
EDGE = 2.0  # px of a 256 px grid: trust is eroded by 2x and feathered by 1x this along its borders


@torch.no_grad()
def rig_motion(deca, source: FaceRig, target: FaceRig, size: int | None = None) -> list[FaceMotion]:
    """The motion from the fitted rig to its edit, one `FaceMotion` per target row.

    source: the fitted rig (N faces); target: its edit with N x F rows, face-major (F frames of face 0,
    then of face 1, ..., as `rig.sweep` makes them). size: the flow's grid (default: the rig's image
    size, at least MOTION_SIZE). A row whose geometry (shape, expression, pose, camera, framing) did
    not change gets `FaceMotion.still`: exactly nothing moved.
    """
    n, total = len(source), len(target)
    if n == 0 or total % n:
        raise ValueError(f"the edited rig has {total} rows for {n} fitted face(s); give F rows per face, face-major")
    if source.image_size != target.image_size:
        raise ValueError(f"the fitted rig is drawn at {source.image_size} but the edited one at {target.image_size}; "
                         "give the edit of that fit")
    for rig, what in ((source, "fitted rig"), (target, "edited rig")):
        check_finite(rig, what)
        check_head(deca, rig)
    height, width = source.image_size
    if height != width:
        raise ValueError(f"rig_motion needs square aligned faces, got {width}x{height}")
    size = int(size or max(height, MOTION_SIZE))
    frames = total // n
    paired = source.select([k // frames for k in range(total)])
    moving = [k for k in range(total) if not _same_geometry(paired, target, k)]
    out = [FaceMotion.still(size)] * total
    if moving:
        before = _surface(deca, paired.select(moving), size)
        after = _surface(deca, target.select(moving), size)
        faces = deca.renderer.faces.cpu().numpy()
        for j, k in enumerate(moving):
            out[k] = _motion({key: v[j] for key, v in before.items()}, {key: v[j] for key, v in after.items()},
                             faces, size)
    return out


def _same_geometry(a: FaceRig, b: FaceRig, k: int) -> bool:
    keys = ("shape", "exp", "pose", "cam")
    return all(torch.equal(a.codes[key][k], b.codes[key][k]) for key in keys) and \
        torch.equal(a.tform[k], b.tform[k]) and torch.equal(a.ffhq_center[k], b.ffhq_center[k])


def _surface(deca, rig: FaceRig, size: int) -> dict[str, np.ndarray]:
    """The rig's mesh on a size x size grid over its aligned image: xy [B, V, 2] vertex positions in grid
    pixels (centres at integers), z [B, V] depth in grid pixels (smaller = nearer), face [B, M, M] the
    triangle drawn at each pixel (-1: none), bary [B, M, M, 3]."""
    device = next(deca.parameters()).device
    scale = size / rig.image_size[0]
    tform = rig.tform.double() @ torch.diag(torch.tensor([scale, scale, 1.0], dtype=torch.float64))
    codes = {key: v.to(device) for key, v in rig.codes.items()}
    out = deca.decode(codes, (size, size), tform.float().to(device), rig.ffhq_center.to(device))
    crop = out["trans_verts"].double().cpu()
    image = transform_points(crop, tform, deca.crop_size, (size, size))
    xy = (image[..., :2] + 1) * size / 2 - 0.5  # [-1, 1] edges -> pixel centres (align_corners=False)
    # a similarity maps crop units to pixels with one scale; depth takes the same one
    spread = lambda p: (p - p.mean(1, keepdim=True)).pow(2).sum((1, 2)).sqrt()  # noqa: E731
    px_per_unit = spread(xy) / spread(crop[..., :2])
    z = crop[..., 2] * px_per_unit[:, None]
    n_faces = deca.renderer.faces.shape[0]
    packed = out["pix_to_face"].cpu()
    face = torch.where(packed >= 0, packed % n_faces, packed)
    return {"xy": xy.numpy(), "z": z.numpy(), "face": face.numpy(), "bary": out["bary"].double().cpu().numpy()}


def _at_pixels(values: np.ndarray, face: np.ndarray, bary: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-vertex values [V, C] interpolated at the pixels a mesh covers -> [M, M, C] (0 where uncovered)."""
    out = np.zeros(face.shape + values.shape[1:], np.float64)
    hit = face >= 0
    corners = values[faces[face[hit]]]  # [P, 3, C]
    out[hit] = (bary[hit][..., None] * corners).sum(1)
    return out


def _triangle_areas(xy: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (xy[faces[:, i]] for i in range(3))
    return 0.5 * np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def _motion(before: dict, after: dict, faces: np.ndarray, size: int) -> FaceMotion:
    from scipy.ndimage import binary_erosion, gaussian_filter

    covered, was_covered = after["face"] >= 0, before["face"] >= 0
    # the edited pixel's surface point, where it was in the photo and how deep
    where = _at_pixels(np.concatenate([before["xy"], before["z"][:, None]], 1), after["face"], after["bary"], faces)
    depth_then = _at_pixels(before["z"][:, None], before["face"], before["bary"], faces)[..., 0]
    depth_then[~was_covered] = np.inf
    col, row = np.rint(where[..., 0]).astype(np.int64), np.rint(where[..., 1]).astype(np.int64)
    in_grid = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    surface = np.full(covered.shape, -np.inf)
    surface[in_grid] = depth_then[row[in_grid], col[in_grid]]
    visible = in_grid & (where[..., 2] <= surface + DEPTH_TOLERANCE * size)
    with np.errstate(divide="ignore", invalid="ignore"):
        stretch = _triangle_areas(before["xy"], faces) / _triangle_areas(after["xy"], faces)
    kept = np.zeros(covered.shape, bool)
    kept[covered] = stretch[after["face"][covered]] >= MIN_STRETCH
    trusted = (covered & visible & kept) | (~covered & ~was_covered)  # background stays where it was
    edge = EDGE * size / MOTION_SIZE
    trusted = binary_erosion(trusted, iterations=max(1, math.ceil(2 * edge)), border_value=1)
    trust = np.clip(gaussian_filter(trusted.astype(np.float32), edge, mode="nearest"), 0.0, 1.0)
    flow = FaceMotion.still(size).flow.astype(np.float64)
    flow[covered] = where[covered, :2]
    return FaceMotion(flow.astype(np.float32), trust.astype(np.float32))

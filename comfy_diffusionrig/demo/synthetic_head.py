"""The synthetic head: a procedural FLAME-format head and albedo space, built from analytic shapes.

`make_head` builds a closed mesh with nose, brows, eye sockets, lips, chin, ears and a neck; 5 joints,
skinning weights, 300 shape + 100 expression directions, a 68-point landmark embedding with DECA's
yaw-dependent contour table and a lat-long UV map; `make_texture` paints a FLAME-format albedo space
onto that UV map. No value here comes from FLAME or DECA data. `synthetic` writes them as files.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np



# FLAME 2020 layout: 300 shape then 100 expression components; 5 joints
N_SHAPE_DIRS, N_EXP_DIRS, N_JOINTS = 300, 100, 5
# FLAME's kinematic tree; the root's parent is stored as uint32 max
KINTREE_TABLE = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
# FLAME_texture.npz stores 200 principal components; DECA reads the first 50
N_TEX_DIRS, N_TEX_USED = 200, 50
# rows of DECA's contour table: yaw 0..39, then -1..-39 degrees
LUT_YAWS = list(range(0, 40)) + list(range(-1, -40, -1))
# the face layout (metres): eye centres (+-x) and sizes
_EYE_X, _EYE_Y = 0.032, 0.035
_EYE_HALF_WIDTH, _EYE_HALF_HEIGHT = 0.0125, 0.0055

# FLAME frame: +y up, +z towards the camera, +x = subject's left.  Rays from this point reach
# every surface point once (the head is star-shaped around it); it sits at mouth height so
# the mouth line is one horizontal ring.
_RAY_CENTRE = np.array([0.0, -0.045, -0.01])
_MOUTH_Y = _RAY_CENTRE[1]
_MOUTH_HALF_WIDTH = 0.025
_BROW_Y = 0.052
_NOSE_TIP_Y = -0.008
_CHIN_Y = -0.088
_JAW_JOINT = np.array([0.0, -0.02, 0.0])  # hinge of the jaw, in front of the ears


def _smoothstep(x, lo, hi):
    t = np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _gauss(points, centre, sigma):
    """Anisotropic Gaussian of [N, 3] points; a None centre/sigma entry ignores that axis."""
    total = np.zeros(len(points))
    for axis in range(3):
        if centre[axis] is not None:
            total += ((points[:, axis] - centre[axis]) / sigma[axis]) ** 2
    return np.exp(-0.5 * total)


def _ring_angles(n_rings: int) -> np.ndarray:
    """Polar angles (from +y around the ray centre) of the rings, dense over the face.

    Two rings 0.35 degrees apart straddle the mouth line (90 degrees) so that the closed mouth
    is a thin dark seam that opens into the painted mouth interior.
    """
    theta = np.linspace(0, np.pi, 4001)
    density = 1 + 3.0 * np.exp(-0.5 * ((theta - np.radians(88)) / np.radians(26)) ** 2)
    cdf = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2)])
    cdf /= cdf[-1]
    rings = np.interp(np.arange(1, n_rings) / n_rings, cdf, theta)
    nearest = int(np.argmin(np.abs(rings - np.pi / 2)))
    gap = np.radians(0.35)
    return np.sort(np.concatenate([np.delete(rings, nearest), [np.pi / 2 - gap / 2, np.pi / 2 + gap / 2]]))


def _segment_angles(n_segments: int) -> np.ndarray:
    """Azimuths (0 = facing +z, positive towards +x) of the ring vertices, dense at the front.

    Index 0 is the back (-pi) and index n - j mirrors index j, so x -> -x is a permutation.
    """
    t = 2 * np.arange(n_segments) / n_segments - 1  # -1 (back) .. 0 (front)
    return np.pi * (0.45 * t + 0.55 * t ** 3)


def _grid_topology(n_rings: int, n_segments: int):
    """Faces, texture coordinates and texture faces of a lat-long grid closed by two poles.

    Vertex 0 is the top pole, 1 + i * n_segments + j ring i / segment j, the last one the
    bottom pole.  UVs: u = j / n_segments with the seam column (u = 1) duplicated at the back,
    v = 1 at the top; each pole face has its own pole texcoord.
    """
    n_s = n_segments
    ring = lambda i, j: 1 + i * n_s + (j % n_s)  # noqa: E731
    bottom = 1 + n_rings * n_s
    uv_grid = lambda i, j: i * (n_s + 1) + j  # noqa: E731  (texcoord of ring i, column j = 0..n_s)
    n_grid_uv = n_rings * (n_s + 1)
    faces, uv_faces = [], []
    # every face is counter-clockwise seen from outside (normals point out)
    for j in range(n_s):
        faces.append([0, ring(0, j), ring(0, j + 1)])
        uv_faces.append([n_grid_uv + j, uv_grid(0, j), uv_grid(0, j + 1)])
    for i in range(n_rings - 1):
        for j in range(n_s):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j + 1), ring(i + 1, j)
            ta, tb, tc, td = uv_grid(i, j), uv_grid(i, j + 1), uv_grid(i + 1, j + 1), uv_grid(i + 1, j)
            faces += [[a, c, b], [a, d, c]]
            uv_faces += [[ta, tc, tb], [ta, td, tc]]
    for j in range(n_s):
        faces.append([ring(n_rings - 1, j), bottom, ring(n_rings - 1, j + 1)])
        uv_faces.append([uv_grid(n_rings - 1, j), n_grid_uv + n_s + j, uv_grid(n_rings - 1, j + 1)])
    i_idx, j_idx = np.meshgrid(np.arange(n_rings), np.arange(n_s + 1), indexing="ij")
    vt = np.stack([j_idx / n_s, 1 - (i_idx + 1) / (n_rings + 1)], -1).reshape(-1, 2)
    caps = (np.arange(n_s) + 0.5) / n_s
    vt = np.concatenate([vt, np.stack([caps, np.ones(n_s)], -1), np.stack([caps, np.zeros(n_s)], -1)])
    return np.array(faces, np.int64), vt, np.array(uv_faces, np.int64)


def _head_field(p: np.ndarray) -> np.ndarray:
    """Implicit base shape, negative inside: skull/face superquadric softly joined to a neck.

    p: [..., 3] metres.  The lower face narrows towards the jaw and is boxier than an
    ellipsoid so the chin sits under the mouth rather than far behind it.
    """
    x, y, z = p[..., 0], p[..., 1] - 0.015, p[..., 2] + 0.005
    half_width = 0.077 * (1 - 0.2 * _smoothstep(y, -0.02, -0.105))
    depth = np.where(z > 0, 0.097, 0.104)
    height = np.where(y > 0, 0.11, 0.113)
    power_y = np.where(y > 0, 2.3, 2.9)
    across = (np.abs(x / half_width) ** 2.2 + np.abs(z / depth) ** 2.2) ** (power_y / 2.2)
    head = (across + np.abs(y / height) ** power_y) ** (1 / power_y) - 1
    nx, ny, nz = p[..., 0], p[..., 1], p[..., 2] + 0.018
    neck = np.sqrt(nx ** 2 + (nz / 1.1) ** 2) / 0.054 - 1
    neck = np.maximum(neck, np.maximum(-0.19 - ny, ny - 0.0) / 0.054)  # flat bottom, top hidden in the head
    # soft union (k in field units): a smooth fillet under the jaw and at the nape
    k = 0.06
    return -k * np.logaddexp(-head / k, -neck / k)


def _ray_surface(directions: np.ndarray, r_max: float = 0.32, steps: int = 320) -> np.ndarray:
    """Distance from `_RAY_CENTRE` to the outermost surface crossing along each direction [N, 3]."""
    radii = np.linspace(1e-3, r_max, steps)
    inside = _head_field(_RAY_CENTRE + directions[:, None, :] * radii[None, :, None]) < 0
    last_inside = steps - 1 - np.argmax(inside[:, ::-1], axis=1)
    lo, hi = radii[last_inside], radii[np.minimum(last_inside + 1, steps - 1)]
    for _ in range(40):
        mid = (lo + hi) / 2
        outside = _head_field(_RAY_CENTRE + directions * mid[:, None]) >= 0
        hi, lo = np.where(outside, mid, hi), np.where(outside, lo, mid)
    return (lo + hi) / 2


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals.  verts [V, 3], faces [F, 3] -> [V, 3]."""
    tri = verts[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(verts)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def _mirrored(points, centre, sigma):
    """`_gauss` at a centre and at its mirror image across x = 0 (centre[0] must be set)."""
    mirror = (-centre[0], *centre[1:])
    return _gauss(points, centre, sigma) + _gauss(points, mirror, sigma)


def _features(base: np.ndarray, normals: np.ndarray, mouth_rings: np.ndarray) -> dict[str, np.ndarray]:
    """Facial features as displacement fields [V, 3] (metres) on the base shape.

    base, normals: [V, 3] base-shape vertices and their normals; mouth_rings: [V] bool, the
    two rings that meet at the mouth line.  The shape and expression directions reuse these
    fields, so each is one recognisable part of the face.
    """
    front = _smoothstep(base[:, 2], 0.0, 0.05)[:, None]
    plus_z = np.array([0.0, 0.0, 1.0])
    out = {}
    bridge = _gauss(base, (0, 0.008, None), (0.0075, 0.019, None))
    tip = _gauss(base, (0, _NOSE_TIP_Y, None), (0.0085, 0.0075, None))
    wings = _mirrored(base, (0.0135, -0.013, None), (0.0055, 0.0055, None))
    out["nose"] = front * ((0.011 * bridge + 0.017 * tip + 0.007 * wings)[:, None] * plus_z)
    out["brow"] = front * (0.0055 * _gauss(base, (0, _BROW_Y, None), (0.034, 0.0075, None)))[:, None] * normals
    socket = _mirrored(base, (_EYE_X, _EYE_Y + 0.002, None), (0.0155, 0.0105, None))
    out["sockets"] = -front * (0.0125 * socket)[:, None] * normals
    ball = _mirrored(base, (_EYE_X, _EYE_Y, None), (0.0095, 0.0062, None))
    out["eyeballs"] = front * (0.0068 * ball)[:, None] * normals
    out["cheeks"] = front * (0.0045 * _mirrored(base, (0.046, 0.008, None), (0.013, 0.014, None)))[:, None] * normals
    upper = _gauss(base, (0, _MOUTH_Y + 0.0052, None), (0.0165, 0.0042, None))
    lower = _gauss(base, (0, _MOUTH_Y - 0.0068, None), (0.0155, 0.0052, None))
    corners = _mirrored(base, (_MOUTH_HALF_WIDTH, _MOUTH_Y, None), (0.0045, 0.0045, None))
    seam = mouth_rings * np.exp(-0.5 * (base[:, 0] / 0.02) ** 4)
    out["lips"] = front * ((0.0062 * upper + 0.0072 * lower - 0.0035 * corners - 0.004 * seam)[:, None] * normals)
    chin = _gauss(base, (0, _CHIN_Y + 0.004, None), (0.0145, 0.0105, None))
    out["chin"] = front * (0.0085 * chin)[:, None] * normals
    side = np.sign(base[:, 0]) * _smoothstep(np.abs(base[:, 0]), 0.05, 0.072)
    ear = _gauss(base, (None, 0.012, -0.012), (None, 0.021, 0.0085))
    out["ears"] = (0.016 * ear * side)[:, None] * np.array([1.0, 0.0, 0.0])
    return out


def _smooth_fields(rng: np.random.Generator, base: np.ndarray, normals: np.ndarray, count: int, amplitude,
                   mirror: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`count` random smooth, left-right symmetric displacement fields [V, 3, count].

    Each is a few Gaussian bumps along the normals (sizes 1.5-5 cm) scaled so that its largest
    displacement is amplitude[k] metres; mirror: [V] index of each vertex's mirror image.
    """
    amplitude = np.broadcast_to(np.asarray(amplitude, np.float64), (count,))
    fields = np.zeros((len(base), 3, count))
    for k in range(count):
        field = np.zeros(len(base))
        for _ in range(4):
            centre = base[rng.integers(len(base))]
            sigma = rng.uniform(0.015, 0.05)
            field += rng.normal() * np.exp(-0.5 * np.sum((base - centre) ** 2, 1) / sigma ** 2)
        field = (field + field[mirror]) / 2
        if mask is not None:
            field = field * mask
        fields[:, :, k] = field[:, None] * normals * amplitude[k] / max(np.abs(field).max(), 1e-12)
    return fields


def _skinning(base: np.ndarray, ring: np.ndarray, mouth_ring: int) -> np.ndarray:
    """LBS weights [V, 5]: root (lower neck), neck (head), jaw (lower face), eyes (none: no eyeballs).

    Across the mouth the jaw weight steps from 0 (upper lip ring) to 1 (lower lip ring), so
    opening the jaw opens the mouth; past the mouth corners and towards the ears it fades
    smoothly, and the neck under the jaw does not follow it.
    """
    x, y, z = base.T
    across = np.abs(x) / _MOUTH_HALF_WIDTH
    # past the corners the step widens into a ramp over the cheek
    width = 0.012 * np.maximum(across - 1, 0) + 1e-9
    lower = np.where(across <= 1, ring > mouth_ring, _smoothstep(_MOUTH_Y - y, -width, width))
    jaw = lower * _smoothstep(z, -0.02, 0.03) * _smoothstep(y, -0.125, -0.098)
    root = 1 - _smoothstep(y, -0.17, -0.11)
    neck = 1 - root - jaw
    weights = np.zeros((len(base), N_JOINTS))
    weights[:, 0], weights[:, 1], weights[:, 2] = root, np.clip(neck, 0, 1), jaw
    return weights / weights.sum(1, keepdims=True)


def _regressor(weights_at: list[np.ndarray]) -> np.ndarray:
    """J_regressor [5, V]: each joint a normalised non-negative weighting of vertices."""
    rows = np.stack([w / w.sum() for w in weights_at])
    rows[rows < 1e-3 * rows.max(1, keepdims=True)] = 0  # sparse, as FLAME's
    return rows / rows.sum(1, keepdims=True)


def _eye_half_height(dx: np.ndarray) -> np.ndarray:
    """Half-height of the eye opening at horizontal offset dx from the eye centre (0 outside)."""
    t = np.clip(1 - (np.asarray(dx) / _EYE_HALF_WIDTH) ** 2, 0, None)
    return _EYE_HALF_HEIGHT * t ** 0.75


def _lip_outline(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heights (y) of the upper and lower lip's outer edges at x (a cupid's bow on top)."""
    t = np.clip(1 - (np.asarray(x) / _MOUTH_HALF_WIDTH) ** 2, 0, None)
    upper = _MOUTH_Y + 0.0085 * t ** 0.7 - 0.0016 * np.exp(-0.5 * (np.asarray(x) / 0.0035) ** 2)
    lower = _MOUTH_Y - 0.0105 * t ** 0.6
    return upper, lower


def _shape_fields(base, normals, feats, mirror, rng) -> np.ndarray:
    """300 shape directions [V, 3, 300]: named proportions first, then smooth random ones."""
    x, y, z = base.T
    front = _smoothstep(z, 0.0, 0.05)
    lower_face = _smoothstep(-y, 0.0, 0.06)
    named = [
        0.045 * base * [1, 0, 0],  # head width
        0.06 * np.clip(y - _EYE_Y, -0.12, 0)[:, None] * [0, 1, 0] * (1 - _smoothstep(-y, 0.13, 0.19))[:, None],  # face length
        0.3 * feats["nose"],  # nose size
        0.07 * base * [1, 0, 0] * lower_face[:, None],  # jaw width
        0.04 * (base - [0, 0, -0.005]) * [0, 0, 1],  # head depth
        0.7 * feats["chin"],  # chin prominence
        0.8 * feats["cheeks"],  # cheek fullness
        0.7 * feats["brow"],  # brow ridge
        0.35 * (feats["sockets"] + feats["eyeballs"]),  # deeper set eyes
        0.45 * feats["lips"],  # lip fullness
        0.4 * feats["ears"],  # ear size
        (0.004 * front * _smoothstep(y, 0.04, 0.1))[:, None] * normals,  # forehead slope
    ]
    fields = np.stack(named, -1)
    count = N_SHAPE_DIRS - fields.shape[-1]
    amplitude = 0.004 / (1 + np.arange(count) / 8)
    return np.concatenate([fields, _smooth_fields(rng, base, normals, count, amplitude, mirror)], -1)


def _expression_fields(base, normals, feats, weights, jaw_joint, mirror, rng) -> np.ndarray:
    """100 expression directions [V, 3, 100]: ten named movements, then small random ones."""
    x, y, z = base.T
    front = _smoothstep(z, 0.0, 0.05)[:, None]
    side = np.sign(x)[:, None]
    corners = _mirrored(base, (_MOUTH_HALF_WIDTH, _MOUTH_Y, None), (0.009, 0.008, None))[:, None]
    lips = (_gauss(base, (0, _MOUTH_Y, None), (0.02, 0.011, None)))[:, None]
    brows = _mirrored(base, (0.03, _BROW_Y + 0.004, None), (0.022, 0.012, None))[:, None]
    inner_brows = _mirrored(base, (0.014, _BROW_Y, None), (0.01, 0.009, None))[:, None]
    eye_dx = np.abs(x) - _EYE_X
    upper_lid = (np.exp(-0.5 * (eye_dx / 0.012) ** 2) * _smoothstep(y - _EYE_Y, -0.002, 0.003)
                 * (1 - _smoothstep(y - _EYE_Y, 0.008, 0.016)))[:, None]
    lower_lid = (np.exp(-0.5 * (eye_dx / 0.012) ** 2) * _smoothstep(_EYE_Y - y, 0.001, 0.006)
                 * (1 - _smoothstep(_EYE_Y - y, 0.008, 0.014)))[:, None]
    cheeks = _mirrored(base, (0.04, -0.03, None), (0.014, 0.014, None))[:, None]
    # mouth opening: the lower face turns 0.12 rad about the jaw hinge (x axis)
    arm = base - jaw_joint
    open_jaw = 0.12 * np.stack([np.zeros_like(x), -arm[:, 2], arm[:, 1]], 1) * weights[:, 2:3]
    named = [
        front * corners * (0.006 * np.array([0, 1, 0]) + 0.004 * side * [1, 0, 0] - 0.002 * np.array([0, 0, 1])),
        open_jaw,  # mouth open
        front * brows * [0, 0.005, 0],  # brows up
        front * (upper_lid * [0, -0.0045, 0] + lower_lid * [0, 0.0015, 0]),  # eyes closing
        front * inner_brows * (np.array([0, -0.004, 0]) - 0.003 * side * [1, 0, 0]),  # frown
        front * lips * (np.array([0, 0, 0.005]) - 0.12 * base * [1, 0, 0]),  # pucker
        front * corners * side * [0.005, 0, 0],  # mouth stretch
        front * cheeks * normals * 0.005,  # cheek puff
        front * lips * [0, 0, -0.0035],  # lips pressed in
        front * corners * [0, -0.005, 0],  # mouth corners down
    ]
    fields = np.stack(named, -1)
    count = N_EXP_DIRS - fields.shape[-1]
    amplitude = 0.0025 / (1 + np.arange(count) / 6)
    face = front[:, 0] * _smoothstep(y, -0.11, -0.09) * (1 - _smoothstep(y, 0.07, 0.09))
    return np.concatenate([fields, _smooth_fields(rng, base, normals, count, amplitude, mirror, face)], -1)


def _frontal_hits(verts: np.ndarray, faces: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface points seen from the front: for each (x, y) [L, 2], the nearest face along -z.

    Returns face indices [L] and barycentrics [L, 3] aligned with each face's vertex order.
    """
    tri = verts[faces]
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    face_ids, barys = [], []
    for q in xy:
        w1 = ((q[0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (q[1] - a[:, 1]) * (c[:, 0] - a[:, 0])) / np.where(area > 0, area, 1)
        w2 = ((b[:, 0] - a[:, 0]) * (q[1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (q[0] - a[:, 0])) / np.where(area > 0, area, 1)
        w = np.stack([1 - w1 - w2, w1, w2], 1)
        hit = (area > 1e-12) & (w >= -1e-9).all(1)  # front-facing faces only
        if not hit.any():
            raise RuntimeError(f"no front-facing surface at landmark position {q}")
        depth = np.where(hit, (w * tri[:, :, 2]).sum(1), -np.inf)
        best = int(np.argmax(depth))
        face_ids.append(best)
        barys.append(np.clip(w[best], 0, 1) / np.clip(w[best], 0, 1).sum())
    return np.array(face_ids, np.int64), np.array(barys)


def _static_landmark_xy() -> np.ndarray:
    """Frontal (x, y) of iBUG landmarks 17..67 (brows, nose, eyes, outer mouth) on the template.

    iBUG runs left to right in the image, i.e. from the subject's right (-x) to left (+x).
    Inner-mouth points (60..67) are placed on the mouth rings separately; they are NaN here.
    """
    points = []
    brow_x = np.linspace(0.056, 0.012, 5)
    for sign, xs in ((-1, brow_x), (1, brow_x[::-1])):
        for bx in xs:  # an arched brow, highest a little outside the eye centre
            points.append((sign * bx, _BROW_Y - 0.001 + 0.004 * np.exp(-0.5 * ((bx - 0.036) / 0.016) ** 2)))
    bridge_y = np.linspace(_EYE_Y, _NOSE_TIP_Y, 4)
    points += [(0.0, by) for by in bridge_y]
    points += [(nx, -0.0185 + 0.0025 * (abs(nx) / 0.014) ** 2) for nx in np.linspace(-0.014, 0.014, 5)]
    lid = 0.4 * _EYE_HALF_WIDTH
    h_lid = float(_eye_half_height(lid))
    for sign in (-1, 1):
        cx = sign * _EYE_X
        outer, inner = cx + sign * _EYE_HALF_WIDTH, cx - sign * _EYE_HALF_WIDTH
        left, right = (outer, inner) if sign < 0 else (inner, outer)
        # left corner, two upper-lid points, right corner, two lower-lid points (right to left)
        points += [(left, _EYE_Y), (cx - lid, _EYE_Y + h_lid), (cx + lid, _EYE_Y + h_lid), (right, _EYE_Y),
                   (cx + lid, _EYE_Y - h_lid), (cx - lid, _EYE_Y - h_lid)]
    mw = _MOUTH_HALF_WIDTH
    upper_x = np.array([-0.62, -0.3, 0.0, 0.3, 0.62]) * mw
    upper, _ = _lip_outline(upper_x)
    _, lower = _lip_outline(upper_x[::-1])
    points += [(-mw, _MOUTH_Y)] + list(zip(upper_x, upper - 0.0012)) + [(mw, _MOUTH_Y)]
    points += list(zip(upper_x[::-1], lower + 0.0012))
    points += [(np.nan, np.nan)] * 8
    return np.array(points)


def _vertex_on_face(faces: np.ndarray, vertex: int, allowed: np.ndarray) -> tuple[int, np.ndarray]:
    """A face holding `vertex` whose vertices are all `allowed` [V] bool, and the one-hot barycentric."""
    candidates = np.nonzero((faces == vertex).any(1) & allowed[faces].all(1))[0]
    face = int(candidates[0])
    return face, (faces[face] == vertex).astype(np.float64)


def _contour_table(verts, normals, faces, candidates) -> tuple[np.ndarray, np.ndarray]:
    """DECA's dynamic contour table: for each yaw row, 17 jaw-line points on the silhouette.

    For the head turned by the row's yaw (about +y), contour point k is the visible candidate
    vertex farthest from a point between the eyes in the image direction of k (-x for k = 0,
    down for k = 8, +x for k = 16).  Returns faces [79, 17] and one-hot barycentrics [79, 17, 3].
    """
    centre = np.array([0.0, _EYE_Y - 0.01])
    angles = np.radians(np.linspace(-90, 90, 17))
    directions = np.stack([np.sin(angles), -np.cos(angles)], 1)
    first_face = {}
    table_faces = np.zeros((len(LUT_YAWS), 17), np.int64)
    table_bary = np.zeros((len(LUT_YAWS), 17, 3), np.float32)
    for row, yaw in enumerate(LUT_YAWS):
        c, s = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))
        rotation = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        turned, turned_n = verts @ rotation.T, normals @ rotation.T
        visible = candidates & (turned_n[:, 2] > -0.05)
        offsets = turned[:, :2] - centre
        heading = np.arctan2(offsets[:, 0], -offsets[:, 1])
        for k, (angle, direction) in enumerate(zip(angles, directions)):
            for width in (4, 8, 16):
                in_sector = visible & (np.abs(heading - angle) < np.radians(width))
                if in_sector.any():
                    break
            reach = np.where(in_sector, offsets @ direction, -np.inf)
            vertex = int(np.argmax(reach))
            if vertex not in first_face:
                first_face[vertex] = _vertex_on_face(faces, vertex, np.ones(len(verts), bool))
            table_faces[row, k], table_bary[row, k] = first_face[vertex]
    return table_faces, table_bary


@lru_cache(maxsize=4)
def _cached_head(seed: int, detail: tuple[int, int]) -> dict[str, np.ndarray]:
    n_rings, n_segments = detail
    if n_rings < 24 or n_segments < 32 or n_segments % 2:
        raise ValueError(f"detail must be (rings >= 24, even segments >= 32), got {detail}")
    rng = np.random.default_rng(seed)
    polar, azimuth = _ring_angles(n_rings), _segment_angles(n_segments)
    n_rings = len(polar)
    theta, phi = np.meshgrid(polar, azimuth, indexing="ij")
    directions = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)
    directions = np.concatenate([[[0.0, 1.0, 0.0]], directions.reshape(-1, 3), [[0.0, -1.0, 0.0]]])
    base = _RAY_CENTRE + directions * _ray_surface(directions)[:, None]
    faces, vt, ft = _grid_topology(n_rings, n_segments)
    ring = np.concatenate([[-1], np.repeat(np.arange(n_rings), n_segments), [n_rings]])
    segment = np.concatenate([[0], np.tile(np.arange(n_segments), n_rings), [0]])
    mirror = np.where((ring >= 0) & (ring < n_rings), 1 + ring * n_segments + (n_segments - segment) % n_segments,
                      np.arange(len(base)))
    mouth_ring = int(np.searchsorted(polar, np.pi / 2)) - 1  # upper ring of the mouth-line pair
    normals = _vertex_normals(base, faces)
    feats = _features(base, normals, (ring == mouth_ring) | (ring == mouth_ring + 1))
    template = base + sum(feats.values())

    weights = _skinning(base, ring, mouth_ring)
    x, y, z = base.T
    on_neck = np.hypot(x, z + 0.018) < 0.07
    eye = lambda sign: _gauss(base, (sign * _EYE_X, _EYE_Y, None), (0.005, 0.004, None)) * (z > 0)  # noqa: E731
    regressor = _regressor([
        np.exp(-0.5 * ((y + 0.155) / 0.004) ** 2) * on_neck,  # root: lower neck
        np.exp(-0.5 * ((y + 0.105) / 0.004) ** 2) * on_neck * (weights[:, 2] < 0.05),  # neck: under the skull
        _gauss(base, (None, _JAW_JOINT[1], _JAW_JOINT[2] + 0.012), (None, 0.006, 0.006)) * (np.abs(x) > 0.05),
        eye(1), eye(-1),  # left eye (+x), right eye (-x)
    ])
    joints = regressor @ template

    shapedirs = np.concatenate([
        _shape_fields(base, normals, feats, mirror, rng),
        _expression_fields(base, normals, feats, weights, joints[2], mirror, rng),
    ], -1)
    posedirs = _smooth_fields(rng, base, normals, 9 * (N_JOINTS - 1), 5e-4, mirror)

    xy = _static_landmark_xy()
    static_faces, static_bary = np.zeros(51, np.int64), np.zeros((51, 3))
    outer = ~np.isnan(xy[:, 0])
    static_faces[outer], static_bary[outer] = _frontal_hits(template, faces, xy[outer])
    upper_band = (ring == mouth_ring - 1) | (ring == mouth_ring)
    lower_band = (ring == mouth_ring + 1) | (ring == mouth_ring + 2)
    inner_x = np.array([-0.85, -0.35, 0.0, 0.35, 0.85, 0.35, 0.0, -0.35]) * _MOUTH_HALF_WIDTH
    for k, ix in enumerate(inner_x):  # 60..64 on the upper lip's edge, 65..67 on the lower one
        on_upper = k < 5
        on_ring = ring == (mouth_ring if on_upper else mouth_ring + 1)
        vertex = int(np.argmin(np.where(on_ring & (z > 0), np.abs(template[:, 0] - ix), np.inf)))
        static_faces[43 + k], static_bary[43 + k] = _vertex_on_face(faces, vertex, upper_band if on_upper else lower_band)
    ears = np.linalg.norm(feats["ears"], axis=1) > 1e-3
    candidates = (np.abs(np.arctan2(x, z)) < np.radians(105)) & (y < _EYE_Y - 0.005) & ~ears
    template_normals = _vertex_normals(template, faces)
    candidates &= (template[:, 1] > _CHIN_Y - 0.006) & (template_normals[:, 1] > -0.7)  # not the neck or under the chin
    dynamic_faces, dynamic_bary = _contour_table(template, template_normals, faces, candidates)

    return {
        "f": faces.astype(np.uint32),
        "v_template": template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": regressor,
        "J": joints,
        "kintree_table": KINTREE_TABLE.copy(),
        "weights": weights,
        "vt": vt,
        "ft": ft.astype(np.uint32),
        "static_lmk_faces_idx": static_faces,
        "static_lmk_bary_coords": static_bary,
        "dynamic_lmk_faces_idx": dynamic_faces,
        "dynamic_lmk_bary_coords": dynamic_bary,
        "full_lmk_faces_idx": np.concatenate([dynamic_faces[0], static_faces])[None],
        "full_lmk_bary_coords": np.concatenate([dynamic_bary[0], static_bary]).astype(np.float32)[None],
        # grid layout, used to paint the texture
        "ring": ring,
        "segment": segment,
        "mouth_ring": np.array(mouth_ring),
    }


def make_head(seed: int = 0, detail: tuple[int, int] = (56, 64)) -> dict[str, np.ndarray]:
    """A synthetic FLAME-format head in FLAME's frame and units (metres, +y up, +z to the camera).

    seed: random shape/expression/pose-corrective directions beyond the named ones
    detail: (rings, segments) of the lat-long grid; the default gives 3586 vertices, 7168 faces.
    Returns numpy arrays (a fresh copy each call):
        f [F,3] uint32, v_template [V,3], shapedirs [V,3,400] (300 shape + 100 expression;
        shape 0..11: head width, face length, nose, jaw width, head depth, chin, cheeks, brow
        ridge, eye depth, lips, ears, forehead; expression 0..9: smile, mouth open, brows up,
        eyes closing, frown, pucker, mouth stretch, cheek puff, lips pressed, corners down),
        posedirs [V,3,36], J_regressor [5,V] (rows sum to 1), J [5,3], kintree_table [2,5] int64,
        weights [V,5] (root, neck, jaw, left eye, right eye), vt [T,2], ft [F,3] uint32,
        the landmark embedding (static_/dynamic_/full_lmk_faces_idx and _bary_coords, as DECA's
        file but all numpy), and the grid layout ring [V], segment [V], mouth_ring [].
    """
    return {k: v.copy() for k, v in _cached_head(int(seed), tuple(int(d) for d in detail)).items()}


def _texel_positions(head: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Template surface point [R*R, 3] under each texel centre (row 0 = top, v = 1), and the
    texel's fractional ring index [R*R] (the UV map is the lat-long grid, so it inverts directly)."""
    ring, segment, verts = head["ring"], head["segment"], head["v_template"]
    n_segments = int(segment.max()) + 1
    n_rings = int(ring.max())
    grid = verts[1:-1].reshape(n_rings, n_segments, 3)
    grid = np.concatenate([grid, grid[:, :1]], 1)  # the seam column
    grid = np.concatenate([np.repeat(verts[:1][None], n_segments + 1, 1), grid,
                           np.repeat(verts[-1:][None], n_segments + 1, 1)], 0)  # poles as rings -1, n
    centres = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(centres, 1 - centres, indexing="xy")
    ring_f = (1 - v) * (n_rings + 1)  # + 1: row 0 of `grid` is the top pole
    col_f = u * n_segments
    r0 = np.clip(np.floor(ring_f).astype(int), 0, n_rings)
    c0 = np.clip(np.floor(col_f).astype(int), 0, n_segments - 1)
    fr, fc = (ring_f - r0)[..., None], (col_f - c0)[..., None]
    points = ((1 - fr) * ((1 - fc) * grid[r0, c0] + fc * grid[r0, c0 + 1])
              + fr * ((1 - fc) * grid[r0 + 1, c0] + fc * grid[r0 + 1, c0 + 1]))
    return points.reshape(-1, 3), (ring_f - 1).reshape(-1)


def _soft(distance: np.ndarray, edge: float = 0.0006) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a soft edge of `edge` metres."""
    return _smoothstep(-distance, -edge, edge)


def _face_masks(points: np.ndarray, ring_f: np.ndarray, mouth_ring: int) -> dict[str, np.ndarray]:
    """Paint masks [N] in 0..1 of the facial regions at template points [N, 3]."""
    x, y, z = points.T
    front = _smoothstep(z, 0.0, 0.04)
    azimuth = np.abs(np.arctan2(x, z))
    hairline = 0.076 - 0.04 * _smoothstep(azimuth, 0.5, 1.45) - 0.085 * _smoothstep(azimuth, 1.8, 2.6)
    masks = {"hair": _soft(hairline - y, 0.006)}
    ax = np.abs(x)
    brow_y = _BROW_Y - 0.001 + 0.004 * np.exp(-0.5 * ((ax - 0.036) / 0.016) ** 2)
    brow_thickness = 0.0032 * (1 - 0.5 * _smoothstep(ax, 0.03, 0.058))
    masks["brows"] = front * _soft(np.abs(y - brow_y) - brow_thickness, 0.0012) * _soft(np.abs(ax - 0.034) - 0.023, 0.003)
    dx, dy = ax - _EYE_X, y - _EYE_Y
    opening = _eye_half_height(dx)
    masks["eyes"] = front * _soft(np.abs(dy) - opening, 0.0004) * (opening > 0)
    iris = np.hypot(dx, dy)
    masks["iris"] = masks["eyes"] * _soft(iris - 0.0052, 0.0004)
    masks["pupil"] = masks["eyes"] * _soft(iris - 0.0021, 0.0003)
    masks["lashes"] = front * _soft(np.abs(dy - opening - 0.0004) - 0.0007, 0.0004) * _soft(np.abs(dx) - _EYE_HALF_WIDTH, 0.0008)
    masks["eye_area"] = front * np.exp(-0.5 * ((dx / 0.014) ** 2 + ((dy + 0.004) / 0.007) ** 2))
    upper, lower = _lip_outline(x)
    inside_x = _soft(ax - _MOUTH_HALF_WIDTH, 0.0015)
    masks["lips"] = front * inside_x * _soft(y - upper, 0.0007) * _soft(lower - y, 0.0009)
    masks["mouth"] = front * inside_x * ((ring_f > mouth_ring) & (ring_f < mouth_ring + 1))
    nostril = np.exp(-0.5 * (((ax - 0.0068) / 0.0028) ** 2 + ((y + 0.0175) / 0.0018) ** 2))
    masks["nostrils"] = nostril * _smoothstep(z, 0.085, 0.1)
    masks["cheeks"] = front * np.exp(-0.5 * (((ax - 0.045) / 0.013) ** 2 + ((y + 0.008) / 0.012) ** 2))
    masks["ears"] = _smoothstep(ax, 0.07, 0.08) * np.exp(-0.5 * ((y - 0.012) / 0.025) ** 2)
    masks["beard"] = front * _smoothstep(-y, 0.02, 0.03) * (1 - masks["lips"]) * (1 - masks["mouth"]) \
        * _smoothstep(y, -0.11, -0.095) * (1 - _smoothstep(ax, 0.055, 0.07))
    masks["skin"] = (1 - masks["hair"]) * (1 - masks["eyes"])
    return masks


def make_texture(head: dict[str, np.ndarray] | None = None, size: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """A FLAME_texture-format albedo space painted on the head's UV map.

    head: `make_head` output (default: make_head(seed)); size: texture resolution R.
    Returns mean [R,R,3] float32 and tex_dir [R,R,3,200] float32 (0..255 units, BGR, row 0 =
    top of the UV map), vt [T,2] float64, ft [F,3] uint32.  Components 0..9: skin lighter,
    redness, lip colour, eyebrows darker, hair lighter, olive tint, cheek blush, blue irises,
    beard shadow, darker eye area; 10..49 smooth small variations; 50..199 zero (DECA reads
    only the first 50, and zeros keep the file small).
    """
    head = make_head(seed) if head is None else head
    rng = np.random.default_rng(seed + 1)
    points, ring_f = _texel_positions(head, size)
    m = _face_masks(points, ring_f, int(head["mouth_ring"]))
    rgb = lambda *c: np.array(c, np.float64)  # noqa: E731
    colour = np.broadcast_to(rgb(0.86, 0.66, 0.56), points.shape).copy()
    layers = [  # (mask, colour, opacity), painted in order
        (m["ears"], rgb(0.84, 0.6, 0.52), 0.6),
        (m["cheeks"], rgb(0.86, 0.58, 0.52), 0.5),
        (m["lips"], rgb(0.72, 0.39, 0.39), 1.0),
        (m["mouth"], rgb(0.3, 0.08, 0.09), 1.0),
        (m["nostrils"], rgb(0.35, 0.2, 0.17), 0.9),
        (m["brows"], rgb(0.27, 0.18, 0.12), 0.9),
        (m["hair"], rgb(0.21, 0.14, 0.09), 1.0),
        (m["eyes"], rgb(0.93, 0.91, 0.88), 1.0),
        (m["iris"], rgb(0.36, 0.23, 0.13), 1.0),
        (m["pupil"], rgb(0.04, 0.04, 0.04), 1.0),
        (m["lashes"], rgb(0.16, 0.1, 0.08), 0.9),
    ]
    for mask, paint, opacity in layers:
        colour += (opacity * mask)[:, None] * (paint - colour)
    skin = m["skin"][:, None]
    named = [
        skin * rgb(0.13, 0.13, 0.12),  # lighter skin
        skin * rgb(0.06, -0.02, -0.02),  # redness
        m["lips"][:, None] * rgb(0.1, -0.04, 0.0),  # lip colour
        m["brows"][:, None] * rgb(-0.12, -0.09, -0.06),  # darker eyebrows
        m["hair"][:, None] * rgb(0.2, 0.16, 0.1),  # lighter hair
        skin * rgb(0.02, 0.03, -0.05),  # olive tint
        m["cheeks"][:, None] * rgb(0.08, -0.02, -0.01),  # blush
        (m["iris"] - m["pupil"])[:, None] * rgb(-0.08, 0.06, 0.16),  # blue irises
        m["beard"][:, None] * rgb(-0.1, -0.09, -0.07),  # beard shadow
        m["eye_area"][:, None] * rgb(-0.07, -0.07, -0.05),  # darker eye area
    ]
    centres = (np.arange(size) + 0.5) / size
    tu, tv = (a.reshape(-1) for a in np.meshgrid(centres, 1 - centres, indexing="xy"))
    for k in range(N_TEX_USED - len(named)):  # smooth blotches in UV space, shrinking with k
        field = np.zeros(size * size)
        for _ in range(3):
            cu, cv, sigma = rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.05, 0.2)
            field += rng.normal() * np.exp(-0.5 * (((tu - cu + 0.5) % 1 - 0.5) ** 2 + (tv - cv) ** 2) / sigma ** 2)
        field /= max(np.abs(field).max(), 1e-12)
        named.append(field[:, None] * rng.normal(0, 1, 3) * 0.03 / (1 + k / 10))
    tex_dir = np.zeros((size * size, 3, N_TEX_DIRS), np.float32)
    tex_dir[:, :, :N_TEX_USED] = np.stack(named, -1)[:, ::-1] * 255  # RGB -> BGR
    mean = (colour[:, ::-1] * 255).astype(np.float32)
    return {
        "mean": mean.reshape(size, size, 3),
        "tex_dir": tex_dir.reshape(size, size, 3, N_TEX_DIRS),
        "vt": head["vt"].copy(),
        "ft": head["ft"].copy(),
    }

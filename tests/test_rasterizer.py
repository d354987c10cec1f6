"""Rasterizer: the fast path against a slow float64 reference and against pytorch3d's output."""

from __future__ import annotations

import pytest
import torch

from comfy_diffusionrig.face import rasterizer
from comfy_diffusionrig.face.flame_files import read_obj
from comfy_diffusionrig.face.rasterizer import rasterize

from conftest import reference_file


def _edge(px, py, ax, ay, bx, by):
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def reference_rasterize(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """Obviously-correct rasterizer: every pixel against every face, python floats (float64).

    Written from pytorch3d's documented conventions: screen NDC with +x left and +y up, the
    shorter side spanning [-1, 1]; bary = edge / (2 * area + 1e-8); strictly inside; skip
    |2 * area| <= 1e-8, vertices at z < 1e-8 and points at z < 0; nearest z, then lowest face.
    Also returns, per pixel, whether float32 round-off could change the answer (a face
    edge or a depth tie with another face closer than 1e-4).
    verts: [V, 3]; faces: [F, 3].  Returns face [H, W] (-1), bary [H, W, 3], z [H, W], ambiguous [H, W].
    """
    v = verts.double().tolist()
    tris = [[v[i] for i in face] for face in faces.tolist()]
    span_x = 2.0 * width / height if width > height else 2.0
    span_y = 2.0 * height / width if height > width else 2.0
    face_map = torch.full((height, width), -1, dtype=torch.long)
    bary_map = torch.full((height, width, 3), -1.0, dtype=torch.float64)
    z_map = torch.full((height, width), -1.0, dtype=torch.float64)
    ambiguous = torch.zeros(height, width, dtype=torch.bool)
    for row in range(height):
        py = span_y / 2 * (1 - (2 * row + 1) / height)  # +y up: row 0 is the top
        for col in range(width):
            px = span_x / 2 * (1 - (2 * col + 1) / width)  # +x left: column 0 is the left
            hits = []
            for f, ((x0, y0, z0), (x1, y1, z1), (x2, y2, z2)) in enumerate(tris):
                if abs(_edge(x0, y0, x1, y1, x2, y2)) <= 1e-8 or min(z0, z1, z2) < 1e-8:
                    continue
                if not (min(x0, x1, x2) <= px <= max(x0, x1, x2) and min(y0, y1, y2) <= py <= max(y0, y1, y2)):
                    continue
                den = _edge(x2, y2, x0, y0, x1, y1) + 1e-8
                w = (_edge(px, py, x1, y1, x2, y2) / den, _edge(px, py, x2, y2, x0, y0) / den,
                     _edge(px, py, x0, y0, x1, y1) / den)
                if abs(min(w)) < 1e-4:
                    ambiguous[row, col] = True
                z = w[0] * z0 + w[1] * z1 + w[2] * z2
                if min(w) > 0 and z >= 0:
                    hits.append((z, f, w))
            if hits:
                hits.sort(key=lambda hit: (hit[0], hit[1]))
                z, f, w = hits[0]
                face_map[row, col], z_map[row, col] = f, z
                bary_map[row, col] = torch.tensor(w, dtype=torch.float64)
                # exact ties (duplicated faces) are deterministic; near ties are round-off
                if len(hits) > 1 and 0 < hits[1][0] - z < 1e-4:
                    ambiguous[row, col] = True
    return face_map, bary_map, z_map, ambiguous


def random_mesh(seed: int, n_faces: int = 14):
    """Random overlapping triangles (both orientations, some off-screen) plus special faces:
    two exact duplicates (depth ties), a collinear and a repeated-vertex face (degenerate,
    skipped) and a face with a vertex behind the image plane (skipped)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(n_faces, 1, 2, generator=gen) * 2.4 - 1.2
    corners = centres + (torch.rand(n_faces, 3, 2, generator=gen) - 0.5) * 1.6
    depth = torch.rand(n_faces, 3, 1, generator=gen) * 2 + 0.5
    verts = torch.cat([corners, depth], -1).reshape(-1, 3)
    faces = torch.arange(3 * n_faces).reshape(n_faces, 3)
    # dyadic coordinates: exactly collinear in float32 and float64
    special = torch.tensor(
        [[0.25, 0.5, 1.0], [0.75, -0.25, 1.0], [0.5, 0.125, 1.0], [-0.5, -0.5, 0.7], [0.5, 0.6, -0.5], [0.1, -0.9, 1.0]]
    )
    base = verts.shape[0]
    verts = torch.cat([verts, special])
    extra = torch.tensor(
        [faces[2].tolist(), [base, base + 1, base + 2], [base, base, base + 1], [base + 3, base + 4, base + 5],
         faces[5].tolist()]
    )
    return verts.float(), torch.cat([faces, extra])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (20, 12)])
def test_matches_reference_on_random_meshes(seed, hw):
    height, width = hw
    verts, faces = random_mesh(seed)
    fast = rasterize(verts[None], faces, hw, backend="torch")
    face, bary, z, ambiguous = reference_rasterize(verts, faces, height, width)
    clear = ~ambiguous
    # a handful of pixels sit within float32 round-off of an edge or a depth tie
    assert ambiguous.float().mean() < 0.05
    assert torch.equal(fast.pix_to_face[0][clear], face[clear])
    covered = clear & (face >= 0)
    assert covered.sum() > 20
    # float32 (fast) vs float64 (reference) arithmetic on O(1) triangles
    torch.testing.assert_close(fast.bary[0][covered].double(), bary[covered], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.zbuf[0][covered].double(), z[covered], atol=1e-5, rtol=0)
    empty = fast.pix_to_face[0] < 0
    assert bool((fast.bary[0][empty] == -1).all()) and bool((fast.zbuf[0][empty] == -1).all())


def float32_brute_force(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """Every face against every pixel with pytorch3d's float32 operation order (no spans, no
    bounding-box enumeration): the fast path must agree bit for bit.  Returns face [H, W]."""
    def centres(size, other):
        span = torch.tensor(2.0) * size / other if size > other else torch.tensor(2.0)
        return -(span / 2) + (span * torch.arange(size, dtype=torch.float32) + span / 2) / size

    # pytorch3d's +y up / +x left: output row 0 is the largest y, column 0 the largest x
    py = centres(height, width).flip(0)[None, :, None]
    px = centres(width, height).flip(0)[None, None, :]
    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = (verts[faces[:, k]].T[..., None, None] for k in range(3))
    area = (x0 - x1) * (y2 - y1) - (y0 - y1) * (x2 - x1)
    den = (((x2 - x0) * (y1 - y0) - (y2 - y0) * (x1 - x0)).double() + 1e-8).float()
    w0 = ((px - x1) * (y2 - y1) - (py - y1) * (x2 - x1)) / den
    w1 = ((px - x2) * (y0 - y2) - (py - y2) * (x0 - x2)) / den
    w2 = ((px - x0) * (y1 - y0) - (py - y0) * (x1 - x0)) / den
    z = w0 * z0 + w1 * z1 + w2 * z2
    in_box = ((px >= torch.minimum(torch.minimum(x0, x1), x2)) & (px <= torch.maximum(torch.maximum(x0, x1), x2))
              & (py >= torch.minimum(torch.minimum(y0, y1), y2)) & (py <= torch.maximum(torch.maximum(y0, y1), y2)))
    usable = (area.double().abs() > 1e-8) & (torch.minimum(torch.minimum(z0, z1), z2).double() >= 1e-8)
    inside = usable & in_box & (w0 > 0) & (w1 > 0) & (w2 > 0) & (z >= 0)
    depth = torch.where(inside, z, torch.inf)
    nearest = inside & (depth == depth.amin(0))
    return torch.where(nearest.any(0), nearest.int().argmax(0), -1)  # argmax: first = lowest face


@pytest.mark.parametrize("hw", [(48, 64), (64, 40)])
def test_spans_never_drop_a_pixel_on_slivers(hw):
    # thin slivers, near-horizontal and near-vertical edges and sub-pixel triangles stress the
    # per-row spans; against the float32 brute force the answer must be identical
    gen = torch.Generator().manual_seed(11)
    n = 300
    centre = torch.rand(n, 1, 2, generator=gen) * 2.2 - 1.1
    along = torch.randn(n, 1, 2, generator=gen)
    along = along / along.norm(dim=-1, keepdim=True) * torch.rand(n, 1, 1, generator=gen) * 1.5
    across = torch.stack([-along[..., 1], along[..., 0]], -1) * torch.rand(n, 1, 1, generator=gen) ** 4 * 0.2
    # every third face gets an exactly horizontal or vertical edge
    corners = torch.cat([centre - along, centre + along, centre + across], 1)
    corners[::3, 1, 1] = corners[::3, 0, 1]
    corners[1::3, 1, 0] = corners[1::3, 0, 0]
    corners[2::6] = corners[2::6] * 0.01 + corners[2::6, :1]  # sub-pixel
    verts = torch.cat([corners, torch.rand(n, 3, 1, generator=gen) + 0.5], -1).reshape(-1, 3)
    faces = torch.arange(3 * n).reshape(n, 3)
    fast = rasterize(verts[None], faces, hw, backend="torch")
    expected = float32_brute_force(verts, faces, *hw)
    assert (expected >= 0).sum() > 500
    assert torch.equal(fast.pix_to_face[0], expected)


def test_strict_inside_on_exact_edges():
    # dyadic vertices: every edge function is exact in float32, the hypotenuse x + y = 0
    # passes through pixel centres, which must stay empty (strict test)
    verts = torch.tensor([[-0.625, -0.625, 1.0], [0.625, -0.625, 1.0], [-0.625, 0.625, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    fast = rasterize(verts[None], faces, 8, backend="torch")
    face, _, _, _ = reference_rasterize(verts, faces, 8, 8)
    assert torch.equal(fast.pix_to_face[0], face)
    # NDC (0.125, -0.125) = pixel row 4, column 3 (x left, y up); it lies on the hypotenuse
    assert fast.pix_to_face[0, 4, 3] == -1
    assert fast.pix_to_face[0, 5, 3] == 0


def test_depth_ties_go_to_the_lower_face_index():
    verts = torch.tensor(
        [[-0.9, -0.9, 2.0], [0.9, -0.9, 2.0], [0.0, 0.9, 2.0], [-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0]]
    )
    small, big = [3, 4, 5], [0, 1, 2]
    for faces, expected in (([big, small, small], 1), ([small, big, small], 0), ([small[::-1], big, small[::-1]], 0)):
        fast = rasterize(verts[None], torch.tensor(faces), 16, backend="torch")
        assert fast.pix_to_face[0, 8, 8] == expected
        assert fast.pix_to_face[0, 3, 8] == faces.index(big)


def test_batch_uses_packed_face_indices():
    verts, faces = random_mesh(3)
    moved = verts.clone()
    moved[:, 0] += 0.3
    fast = rasterize(torch.stack([verts, moved]), faces, 16, backend="torch")
    single = rasterize(moved[None], faces, 16, backend="torch")
    hit = single.pix_to_face[0] >= 0
    assert torch.equal(fast.pix_to_face[1][hit], single.pix_to_face[0][hit] + faces.shape[0])
    assert bool((fast.pix_to_face[1][~hit] == -1).all())
    assert torch.equal(fast.bary[1], single.bary[0])


def test_chunking_does_not_change_the_result(monkeypatch):
    verts, faces = random_mesh(4, n_faces=40)
    whole = rasterize(verts[None], faces, (24, 32), backend="torch")
    monkeypatch.setattr(rasterizer, "_CHUNK", 37)
    chunked = rasterize(verts[None], faces, (24, 32), backend="torch")
    assert torch.equal(whole.pix_to_face, chunked.pix_to_face)
    assert torch.equal(whole.bary, chunked.bary)
    assert torch.equal(whole.zbuf, chunked.zbuf)


def test_non_finite_and_off_screen_vertices():
    verts = torch.tensor(
        [[float("nan"), 0.0, 1.0], [0.5, 0.5, 1.0], [-0.5, 0.5, 1.0], [1e30, 1e30, 1.0], [2e30, 1e30, 1.0],
         [1e30, 2e30, 1.0], [-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0]]
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    fast = rasterize(verts[None], faces, 8, backend="torch")
    face, _, _, _ = reference_rasterize(verts[6:], faces[2:] - 6, 8, 8)
    assert torch.equal(fast.pix_to_face[0], torch.where(face >= 0, face + 2, face))


def test_backend_selection():
    verts, faces = random_mesh(0)
    with pytest.raises(ValueError, match="backend"):
        rasterize(verts[None], faces, 8, backend="opengl")
    if rasterizer._pytorch3d_available():
        pytest.skip("pytorch3d is installed")
    with pytest.raises(ImportError, match="backend='torch'"):
        rasterize(verts[None], faces, 8, backend="pytorch3d")
    auto = rasterize(verts[None], faces, 8, backend="auto")
    assert torch.equal(auto.pix_to_face, rasterize(verts[None], faces, 8, backend="torch").pix_to_face)


@pytest.fixture(scope="module")
def render_cases():
    cases = torch.load(reference_file("flame", "render.pt"), weights_only=True)
    faces, _, _ = read_obj(reference_file("flame", "head_template_synthetic.obj"))
    return {name: case for name, case in cases.items() if isinstance(case, dict)}, faces


@pytest.mark.parametrize("name", ["direct_64", "direct_256", "orig_224_to_256", "orig_64_to_72x96"])
def test_matches_pytorch3d_fixture(render_cases, name):
    cases, faces = render_cases
    case = cases[name]
    height, width = case["pix_to_face"].shape[1:3]
    fast = rasterize(case["raster_verts"], faces, (height, width), backend="torch")
    expected = case["pix_to_face"][..., 0]  # packed b * F + f like ours
    same = fast.pix_to_face == expected
    # README tolerance for a float32 re-implementation (pytorch3d vs float64 oracle: 100 %)
    assert same.float().mean() >= 0.999
    hit = same & (expected >= 0)
    assert (fast.bary - case["bary_coords"][..., 0, :])[hit].abs().max() <= 1e-4
    assert (fast.zbuf - case["zbuf"][..., 0])[hit].abs().max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(render_cases):
    cases, faces = render_cases
    case = cases["direct_256"]
    cpu = rasterize(case["raster_verts"], faces, 256, backend="torch")
    gpu = rasterize(case["raster_verts"].cuda(), faces.cuda(), 256, backend="torch")
    assert (gpu.pix_to_face.cpu() == cpu.pix_to_face).float().mean() >= 0.999

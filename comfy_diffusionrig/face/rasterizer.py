"""Triangle rasterizer in plain PyTorch, numerically matching pytorch3d's `rasterize_meshes`.

DECA (and so DiffusionRig) renders its physical buffers with pytorch3d's CPU rasterizer
(faces_per_pixel=1, blur 0, no perspective correction, no culling).  pytorch3d is hard to
install, so this module reproduces the same conventions with vectorised tensor ops:

* input vertices are in pytorch3d's screen NDC: +x left, +y up, the shorter image side spans
  [-1, 1] and the longer one is scaled by the aspect ratio; z is depth (smaller = nearer);
* pixel centres and barycentrics are computed with pytorch3d's float32 formulas, including
  the +1e-8 in the barycentric denominator (it makes sum(bary) slightly below 1);
* a pixel is covered iff all three barycentrics are > 0 (strict); faces with
  |2 * area| <= 1e-8 or a vertex at z < 1e-8 are skipped, as are points with z < 0;
* the nearest z wins, ties go to the lower face index; back faces are rasterised.

The fast path works on (face, pixel row) items inside each face's exact pixel bounding box:
a float64 solve of the three edge inequalities along the row gives a slightly widened span
of columns, every (face, pixel) candidate in it is tested with the float32 formulas, and
depth is resolved with one `scatter_reduce(amin)` over a packed (depth bits, candidate
index) key.  On the reference renders it reproduces pytorch3d bit for bit.  Works on any
device; the host syncs only on candidate counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# pytorch3d's kEpsilon (a C++ double): barycentric denominator offset, degenerate-face and
# near-plane thresholds
_EPS = 1e-8

# candidates evaluated per chunk (~100 bytes each): bounds peak memory, stays cache-friendly
_CHUNK = 1 << 18

_BACKENDS = ("auto", "torch", "pytorch3d")


@dataclass
class Fragments:
    """Rasterizer output, one face per pixel (pytorch3d's Fragments with K squeezed).

    pix_to_face: [B, H, W] int64, *packed* face index b * F + f (as pytorch3d), -1 = empty
    bary: [B, H, W, 3] float32 barycentrics of the face's vertices, -1 where empty
    zbuf: [B, H, W] float32 interpolated depth, -1 where empty
    """

    pix_to_face: torch.Tensor
    bary: torch.Tensor
    zbuf: torch.Tensor


def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(s) for s in image_size)
    return height, width


def pixel_centres(size: int, other: int, device=None) -> torch.Tensor:
    """NDC coordinate of pixel index i along a side of `size` pixels (pytorch3d's formula).

    Index 0 is the most negative coordinate (pytorch3d's flipped index, not the image column).
    Returns: [size] float32.
    """
    # the shorter side spans [-1, 1]; the longer side is stretched by the aspect ratio
    span = torch.tensor(2.0, dtype=torch.float32, device=device)
    if size > other:
        span = span * size / other
    half = span / 2.0
    index = torch.arange(size, dtype=torch.float32, device=device)
    return -half + (span * index + half) / size


def rasterize(
    verts: torch.Tensor,
    faces: torch.Tensor,
    image_size,
    backend: str = "auto",
) -> Fragments:
    """Rasterize triangle meshes, one face per pixel.

    verts: [B, V, 3] float, pytorch3d screen NDC (+x left, +y up, z = depth)
    faces: [F, 3] or [B, F, 3] int64 vertex indices
    image_size: int or (H, W)
    backend: "torch" (this module), "pytorch3d" (requires pytorch3d) or "auto" (pytorch3d
        when importable, else torch)
    Returns: Fragments with [B, H, W] fields (see `Fragments`).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; use one of {_BACKENDS}")
    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise ValueError(f"verts must be [B, V, 3], got {tuple(verts.shape)}")
    if faces.dim() == 2:
        faces = faces.unsqueeze(0).expand(verts.shape[0], -1, -1)
    if faces.dim() != 3 or faces.shape[-1] != 3 or faces.shape[0] != verts.shape[0]:
        raise ValueError(f"faces must be [F, 3] or [B, F, 3] matching verts, got {tuple(faces.shape)}")
    height, width = _image_hw(image_size)
    if backend == "pytorch3d" or (backend == "auto" and _pytorch3d_available()):
        return _rasterize_pytorch3d(verts, faces, (height, width), required=backend == "pytorch3d")
    return _rasterize_torch(verts.float(), faces.long(), height, width)


def _pytorch3d_available() -> bool:
    try:
        import pytorch3d.renderer  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterize_pytorch3d(verts, faces, image_size, required: bool) -> Fragments:
    try:
        from pytorch3d.renderer.mesh import rasterize_meshes
        from pytorch3d.structures import Meshes
    except ImportError as error:
        raise ImportError(
            "rasterizer backend 'pytorch3d' was requested but pytorch3d is not installed; "
            "install pytorch3d or use backend='torch' (same results, no extra dependency)"
        ) from error
    pix_to_face, zbuf, bary, _ = rasterize_meshes(
        Meshes(verts=verts.float(), faces=faces.long()),
        image_size=image_size,
        blur_radius=0.0,
        faces_per_pixel=1,
        bin_size=None,
        max_faces_per_bin=None,
        perspective_correct=False,
    )
    return Fragments(pix_to_face[..., 0], bary[..., 0, :], zbuf[..., 0])


def _first_last(centres: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """First index and count of the pixel centres c with lo <= c <= hi (exact float32 test).

    centres: [S] increasing float32; lo, hi: [N] float32.  Returns ([N] int64, [N] int64).
    """
    first = torch.searchsorted(centres, lo.contiguous())
    last = torch.searchsorted(centres, hi.contiguous(), right=True)
    return first, (last - first).clamp(min=0)


def _expand(counts: torch.Tensor):
    """Enumerate sub-items: for group g with counts[g] items -> (group id, index within group).

    counts: [G] int64.  Returns ([N] int64, [N] int64), N = counts.sum().
    """
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return group, torch.arange(group.numel(), device=counts.device) - starts.index_select(0, group)


def _rasterize_torch(verts: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Fragments:
    batch, n_faces = faces.shape[:2]
    device = verts.device
    # [B*F, 3 corners, 3 coords]; packed face order = b * F + f, as pytorch3d
    tri = torch.gather(verts, 1, faces.reshape(batch, -1, 1).expand(-1, -1, 3).long())
    tri = tri.reshape(batch * n_faces, 3, 3)
    x0, x1, x2 = tri[:, 0, 0], tri[:, 1, 0], tri[:, 2, 0]
    y0, y1, y2 = tri[:, 0, 1], tri[:, 1, 1], tri[:, 2, 1]

    # pytorch3d compares float32 geometry with its double epsilon: do the same in float64
    area = (x0 - x1) * (y2 - y1) - (y0 - y1) * (x2 - x1)
    denom = (((x2 - x0) * (y1 - y0) - (y2 - y0) * (x1 - x0)).double() + _EPS).float()
    usable = (area.double().abs() > _EPS) & (tri[:, :, 2].amin(1).double() >= _EPS)

    # per-face terms of the three edge functions w_k = ((p.x - a.x) * ex - (p.y - a.y) * ey) / denom
    # (edge k runs from corner k+1 to corner k+2), in pytorch3d's operation order
    table = torch.stack(
        [x1, y1, y2 - y1, x2 - x1, x2, y2, y0 - y2, x0 - x2, x0, y0, y1 - y0, x1 - x0,
         tri[:, 0, 2], tri[:, 1, 2], tri[:, 2, 2], denom]
    )

    xs = pixel_centres(width, height, device)
    ys = pixel_centres(height, width, device)
    xmin, xmax = tri[:, :, 0].amin(1), tri[:, :, 0].amax(1)
    row_first, n_rows = _first_last(ys, tri[:, :, 1].amin(1), tri[:, :, 1].amax(1))
    n_rows = torch.where(usable, n_rows, torch.zeros_like(n_rows))

    # one item per (face, pixel row) inside the face's bounding box
    row_face, row_local = _expand(n_rows)
    row = row_first.index_select(0, row_face) + row_local
    col_first, n_cols = _row_spans(table.index_select(1, row_face), ys.index_select(0, row),
                                   xmin.index_select(0, row_face), xmax.index_select(0, row_face), xs)

    kept = []
    # rows grouped so that each chunk holds about _CHUNK candidate pixels
    starts = torch.cumsum(n_cols, 0) - n_cols
    total = int(n_cols.sum())
    bounds = torch.searchsorted(starts, torch.arange(0, max(total, 1), _CHUNK, device=device)).tolist()
    bounds = sorted(set(bounds + [n_cols.numel()]))
    for first, last in zip(bounds[:-1], bounds[1:]):
        item, col_local = _expand(n_cols[first:last])
        item = item + first
        face = row_face.index_select(0, item)
        pix_row = row.index_select(0, item)
        col = col_first.index_select(0, item) + col_local
        px, py = xs.index_select(0, col), ys.index_select(0, pix_row)
        ax, ay, ex0, ey0, bx, by, ex1, ey1, cx, cy, ex2, ey2, z0, z1, z2, den = table.index_select(1, face)
        w0 = ((px - ax) * ex0 - (py - ay) * ey0) / den
        w1 = ((px - bx) * ex1 - (py - by) * ey1) / den
        w2 = ((px - cx) * ex2 - (py - cy) * ey2) / den
        z = w0 * z0 + w1 * z1 + w2 * z2
        idx = ((w0 > 0) & (w1 > 0) & (w2 > 0) & (z >= 0)).nonzero().squeeze(1)
        face = face.index_select(0, idx)
        b = torch.div(face, n_faces, rounding_mode="floor")
        # output rows/cols run opposite to pytorch3d's NDC axes (+y up, +x left)
        pixel = (b * height + (height - 1 - pix_row.index_select(0, idx))) * width + (width - 1 - col.index_select(0, idx))
        weights = torch.stack([w0, w1, w2], 1).index_select(0, idx)
        kept.append((pixel, face, weights, z.index_select(0, idx)))

    n_pix = batch * height * width
    pix_to_face = torch.full((n_pix,), -1, dtype=torch.long, device=device)
    bary = torch.full((n_pix, 3), -1.0, dtype=torch.float32, device=device)
    zbuf = torch.full((n_pix,), -1.0, dtype=torch.float32, device=device)
    if kept:
        pixel, face, weights, z = (torch.cat(parts) for parts in zip(*kept))
        # depth then candidate order (= face order) in one int64 key: z >= 0 here, so its
        # float bits sort like the value (abs() turns -0.0 into +0.0)
        zbits = z.detach().abs().view(torch.int32).long()
        key = (zbits << 32) | torch.arange(z.numel(), device=device)
        sentinel = torch.iinfo(torch.long).max
        best = torch.full((n_pix,), sentinel, dtype=torch.long, device=device)
        best.scatter_reduce_(0, pixel, key, reduce="amin")
        hit = (best != sentinel).nonzero().squeeze(1)
        winner = best.index_select(0, hit) & 0xFFFFFFFF
        pix_to_face[hit] = face.index_select(0, winner)
        bary[hit] = weights.index_select(0, winner)
        zbuf[hit] = z.index_select(0, winner)
    return Fragments(
        pix_to_face.reshape(batch, height, width),
        bary.reshape(batch, height, width, 3),
        zbuf.reshape(batch, height, width),
    )


def _row_spans(table, py, xmin, xmax, xs):
    """Columns of one pixel row that may lie inside a face: a conservative superset.

    table: [16, R] face terms (see `_rasterize_torch`); py: [R] row centre; xmin, xmax: [R]
    face bounding box.  Returns (first column [R], count [R]) into xs.

    Each edge function is affine in x along the row; solving `sign * w_k > -tol` for x gives
    a half-line per edge.  tol is far above float32 round-off, so every pixel the exact
    float32 test accepts is kept; the bounding box (exact, as pytorch3d) caps the span.
    """
    t = table.double()
    py = py.double()
    sign = torch.sign(t[15])
    lower = xmin.double()
    upper = xmax.double()
    scale = t[[0, 1, 4, 5, 8, 9]].abs().amax(0) + py.abs() + 1.0
    for ax, ay, ex, ey in ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)):
        slope = sign * t[ex]
        offset = -sign * (py - t[ay]) * t[ey]
        tol = 2.0**-16 * scale * (t[ex].abs() + t[ey].abs())
        # sign * E_k(x) = slope * (x - ax) + offset > -tol
        bound = t[ax] + (-tol - offset) / torch.where(slope == 0, torch.ones_like(slope), slope)
        lower = torch.where(slope > 0, torch.maximum(lower, bound), lower)
        upper = torch.where(slope < 0, torch.minimum(upper, bound), upper)
        # an edge parallel to the row excludes the whole row or nothing
        upper = torch.where((slope == 0) & (offset <= -tol), torch.full_like(upper, -torch.inf), upper)
    # back to float32 without shrinking the span; the bounding box stays exact
    lower = torch.maximum(lower.float(), xmin)
    upper = torch.minimum(upper.float(), xmax)
    return _first_last(xs, lower, upper)

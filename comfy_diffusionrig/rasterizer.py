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

The fast path enumerates (face, pixel) candidates inside each face's pixel bounding box,
keeps the covered ones and resolves depth with one `scatter_reduce(amin)` over a packed
(depth bits, candidate index) key.  Works on any device; the only host sync is the number of
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# pytorch3d's kEpsilon (a C++ double): barycentric denominator offset, degenerate-face and
# near-plane thresholds
_EPS = 1e-8

# candidates evaluated per chunk; bounds peak memory at roughly 100 bytes per candidate
_CHUNK = 1 << 21

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


def _index_range(lo: torch.Tensor, hi: torch.Tensor, centres: torch.Tensor):
    """First index and count of the pixel centres within [lo, hi] (+-1 pixel slack).

    lo, hi: [N] float; centres: [S] increasing.  Returns ([N] int64, [N] int64).
    """
    size = centres.numel()
    step = float(centres[1] - centres[0]) if size > 1 else 2.0
    # clamp in float first: off-screen or non-finite vertices must not overflow the cast
    first = ((lo - centres[0]) / step).nan_to_num(0.0).clamp(-2.0, size + 1.0).floor().long() - 1
    last = ((hi - centres[0]) / step).nan_to_num(0.0).clamp(-2.0, size + 1.0).ceil().long() + 1
    first = first.clamp(min=0)
    last = last.clamp(max=size - 1)
    return first, (last - first + 1).clamp(min=0)


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
    denom = ((x2 - x0) * (y1 - y0) - (y2 - y0) * (x1 - x0)).double() + _EPS
    denom = denom.float()
    xmin, xmax = tri[:, :, 0].amin(1), tri[:, :, 0].amax(1)
    ymin, ymax = tri[:, :, 1].amin(1), tri[:, :, 1].amax(1)
    usable = (area.double().abs() > _EPS) & (tri[:, :, 2].amin(1).double() >= _EPS)

    xs = pixel_centres(width, height, device)
    ys = pixel_centres(height, width, device)
    # pixel-index range of each bounding box, with one pixel of slack against rounding (the
    # exact float32 bounding-box test below decides)
    cols = _index_range(xmin, xmax, xs)
    rows = _index_range(ymin, ymax, ys)
    col_lo, n_cols = cols
    row_lo, n_rows = rows
    counts = torch.where(usable, n_cols * n_rows, torch.zeros_like(n_cols))

    # per-face terms of the three edge functions, in pytorch3d's operation order
    e0x, e0y = y2 - y1, x2 - x1
    e1x, e1y = y0 - y2, x0 - x2
    e2x, e2y = y1 - y0, x1 - x0

    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    kept = []
    # faces grouped so that each chunk holds about _CHUNK candidates (one huge face may exceed it)
    bounds = torch.searchsorted(starts, torch.arange(0, max(total, 1), _CHUNK, device=device)).tolist()
    bounds = sorted(set(bounds + [batch * n_faces]))
    for first, last in zip(bounds[:-1], bounds[1:]):
        chunk_counts = counts[first:last]
        face = torch.repeat_interleave(torch.arange(first, last, device=device), chunk_counts)
        if face.numel() == 0:
            continue
        local = torch.arange(face.numel(), device=device) - (starts[face] - starts[first])
        ncol = n_cols[face]
        col = col_lo[face] + local % ncol
        row = row_lo[face] + torch.div(local, ncol, rounding_mode="floor")
        px, py = xs[col], ys[row]

        in_box = (px <= xmax[face]) & (px >= xmin[face]) & (py <= ymax[face]) & (py >= ymin[face])
        den = denom[face]
        w0 = ((px - x1[face]) * e0x[face] - (py - y1[face]) * e0y[face]) / den
        w1 = ((px - x2[face]) * e1x[face] - (py - y2[face]) * e1y[face]) / den
        w2 = ((px - x0[face]) * e2x[face] - (py - y0[face]) * e2y[face]) / den
        z = w0 * tri[face, 0, 2] + w1 * tri[face, 1, 2] + w2 * tri[face, 2, 2]
        inside = in_box & (w0 > 0) & (w1 > 0) & (w2 > 0) & (z >= 0)
        idx = inside.nonzero().squeeze(1)
        b = torch.div(face[idx], n_faces, rounding_mode="floor")
        # output rows/cols run opposite to pytorch3d's NDC axes (+y up, +x left)
        pixel = (b * height + (height - 1 - row[idx])) * width + (width - 1 - col[idx])
        kept.append((pixel, face[idx], torch.stack([w0[idx], w1[idx], w2[idx]], 1), z[idx]))

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
        winner = best[hit] & 0xFFFFFFFF
        pix_to_face[hit] = face[winner]
        bary[hit] = weights[winner]
        zbuf[hit] = z[winner]
    return Fragments(
        pix_to_face.reshape(batch, height, width),
        bary.reshape(batch, height, width, 3),
        zbuf.reshape(batch, height, width),
    )

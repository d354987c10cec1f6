"""DiffusionRig's physical buffers: DECA's shaded render, normal map and albedo image.

Reproduces DECA's `SRenderY.forward` as DiffusionRig's `decode()` drives it: the projected
mesh is rasterised (see `rasterizer.py`), world-space vertex normals and UV coordinates are
interpolated with the barycentrics, the albedo map is sampled at the UVs and shaded with
the SH light (see `lighting.py`).  The UNet takes `cat(rendered, normal, albedo)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.conventions import ALBEDO, NORMAL, RENDERED
from .lighting import sh_shading
from .rasterizer import rasterize

# DECA moves the mesh this far along +z before rasterising, so that every depth is positive
_Z_OFFSET = 10.0

# DECA's input crop size: the space `trans_verts` live in on the render-original path
DECA_CROP_SIZE = 224


def stack_buffers(layers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's conditioning [B, 9, H, W] = rendered | normal | albedo from a render's dict of layers
    (`Renderer.forward`, `DECA.decode`, `rig.render_layers`)."""
    return torch.cat([layers["rendered"], layers["normal"], layers["albedo"]], 1)


def buffer_images(buffers: torch.Tensor, coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The buffers as pictures, each [B, 3, H, W] in [0, 1]: the shaded face, the normal map as RGB = (n + 1) / 2
    (x image right -> R, y up -> G, z towards the camera -> B) and the albedo, black outside the face.

    buffers: [B, 9, H, W] rendered|normal|albedo; coverage: [B, 1, H, W] the renderer's alpha.
    """
    rendered, normal, albedo = buffers[:, RENDERED], (buffers[:, NORMAL] + 1) / 2 * coverage, buffers[:, ALBEDO]
    return rendered.clamp(0, 1), normal.clamp(0, 1), albedo.clamp(0, 1)


def buffer_preview(buffers: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, 3W] in [0, 1]: `buffer_images` side by side (shaded | normals | albedo)."""
    return torch.cat(buffer_images(buffers, coverage), dim=3)


def shading_maps(layers: dict[str, torch.Tensor], face: int = 0, max_size: int = 256) -> torch.Tensor:
    """What the light preview in the browser shades: one face's normal and albedo buffers, [6, H, W] float32.

    layers: `rig.render_layers`' dict (normal, albedo [B, 3, H, W], zero outside the face); rows 0..2 are
    the normal, 3..5 the albedo, so that `rendered = albedo * sh_shading(normal, light)` (`Renderer`) for
    any light. Buffers larger than max_size are subsampled by a whole stride (pixels kept exactly, not
    averaged: the shading of averaged normals would not be the renderer's).
    """
    maps = torch.cat([layers["normal"][face], layers["albedo"][face]], 0).float()
    stride = -(-max(maps.shape[-2:]) // max_size)
    return maps[:, ::stride, ::stride].contiguous()


def project(verts: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's orthographic camera, in image orientation (as `decode()` does).

    verts: [B, V, 3] world (FLAME frame); cam: [B, 3] = (scale, tx, ty)
    Returns: [B, V, 3] = s * (x + tx, y + ty, z) with y and z negated (image y points down,
    smaller z = nearer); x, y in [-1, 1] across the crop.  z is scaled too (DECA's convention).
    """
    scale = cam[:, None, 0:1]
    shifted = torch.cat([verts[..., :2] + cam[:, None, 1:], verts[..., 2:]], -1)
    projected = scale * shifted
    return projected * projected.new_tensor([1.0, -1.0, -1.0])


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (DECA's normalisation eps 1e-6).

    verts: [B, V, 3]; faces: [F, 3] int64.  Returns: [B, V, 3].
    """
    v0, v1, v2 = (verts.index_select(1, faces[:, k]) for k in range(3))
    # the cross product's length is twice the face area: summing weights faces by area
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1, eps=1e-6)


def transform_points(points: torch.Tensor, tform: torch.Tensor, crop_size: int, image_hw) -> torch.Tensor:
    """Map crop-space points into the original image (DECA's render-original path).

    points: [B, N, 3] with x, y in [-1, 1] across a `crop_size` square crop
    tform: [B, 3, 3] row-vector similarity (original = [p, 1] @ tform, p in crop pixels;
        what `decode()` receives: inverse(T_orig->crop) transposed)
    image_hw: (H, W) of the original image.
    Returns: [B, N, 3] with x, y in [-1, 1] across the original image; z unchanged.
    """
    height, width = image_hw
    # no half-pixel shift, as DECA
    pixels = (points[..., :2] * 0.5 + 0.5) * crop_size
    homogeneous = torch.cat([pixels, torch.ones_like(pixels[..., :1])], -1)
    mapped = torch.bmm(homogeneous, tform.to(points.dtype))
    x = mapped[..., 0] / width * 2 - 1
    y = mapped[..., 1] / height * 2 - 1
    return torch.cat([x[..., None], y[..., None], points[..., 2:]], -1)


def _check_tform(tform: torch.Tensor, batch: int) -> torch.Tensor:
    if tform.dim() == 2:
        tform = tform[None]
    if tform.shape[-2:] != (3, 3) or tform.shape[0] not in (1, batch):
        raise ValueError(f"tform must be [3, 3] or [B, 3, 3] with B = {batch}, got {tuple(tform.shape)}")
    det = torch.linalg.det(tform[:, :2, :2].double())
    if not bool(torch.isfinite(det).all()) or bool((det.abs() < 1e-12).any()):
        raise ValueError(
            f"tform is not invertible (det of its 2x2 part = {det.tolist()}); pass the crop->original "
            "transform decode() receives, inverse(T_orig->crop).transpose(1, 2)"
        )
    return tform.expand(batch, -1, -1)


def _raster_verts(trans_verts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image-space vertices -> pytorch3d screen NDC, exactly as DECA hands them to pytorch3d.

    trans_verts: [B, V, 3], x right, y down, in [-1, 1] across the image.  Returns a new tensor.
    """
    x, y, z = trans_verts.unbind(-1)
    x, y, z = -x, -y, z + _Z_OFFSET
    # pytorch3d stretches the longer image side; DECA pre-scales that axis to compensate
    if height > width:
        y = y * height / width
    else:
        x = x * width / height
    return torch.stack([x, y, z], -1)


class Renderer(nn.Module):
    """DECA's SH renderer of the DiffusionRig physical buffers.

    faces: [F, 3] int64 mesh faces; uvcoords: [T, 2] texture coordinates (OBJ `vt`, v up);
    uvfaces: [F, 3] int64 texture-coordinate faces (OBJ `ft`); backend: rasterizer backend
    ("auto", "torch" or "pytorch3d", see `rasterizer.rasterize`).
    """

    def __init__(self, faces: torch.Tensor, uvcoords: torch.Tensor, uvfaces: torch.Tensor, backend: str = "auto"):
        super().__init__()
        faces = torch.as_tensor(faces).long()
        uvfaces = torch.as_tensor(uvfaces).long()
        if faces.shape != uvfaces.shape or faces.dim() != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces {tuple(faces.shape)} and uvfaces {tuple(uvfaces.shape)} must both be [F, 3]")
        uvcoords = torch.as_tensor(uvcoords).float()
        # grid_sample coordinates: x = 2u - 1, y = -(2v - 1), so v = 1 is the map's top row
        uv_grid = torch.stack([uvcoords[:, 0] * 2 - 1, -(uvcoords[:, 1] * 2 - 1)], -1)
        self.register_buffer("faces", faces, persistent=False)
        self.register_buffer("uvfaces", uvfaces, persistent=False)
        self.register_buffer("uv_grid", uv_grid, persistent=False)
        self.backend = backend

    def forward(
        self,
        verts: torch.Tensor,
        trans_verts: torch.Tensor,
        albedo: torch.Tensor,
        light: torch.Tensor,
        image_size=256,
        tform: torch.Tensor | None = None,
        crop_size: int = DECA_CROP_SIZE,
    ) -> dict[str, torch.Tensor]:
        """Render the buffers.

        verts: [B, V, 3] world-space vertices (normals are computed from them)
        trans_verts: [B, V, 3] projected vertices (`project`), crop space; not modified
        albedo: [B, 3, Ht, Wt] UV albedo map; light: [B, 9, 3] DECA SH coefficients
        image_size: int or (H, W) of the output
        tform: None = render `trans_verts` directly at image_size; else [B, 3, 3] crop->original
            transform of `decode(render_orig=True)` (see `transform_points`), with
            `trans_verts` living in a `crop_size` crop and the output being the original image
        Returns dict: rendered, normal, albedo [B, 3, H, W] (normal = world-space FLAME-frame
            normals, not re-normalised), shading [B, 3, H, W], alpha [B, 1, H, W], and the
            raster outputs pix_to_face [B, H, W] (packed b * F + f, -1 empty), bary [B, H, W, 3].
        """
        height, width = (image_size, image_size) if isinstance(image_size, int) else (int(s) for s in image_size)
        batch = verts.shape[0]
        if tform is not None:
            tform = _check_tform(tform.to(trans_verts.device), batch)
            trans_verts = transform_points(trans_verts, tform, crop_size, (height, width))
        fragments = rasterize(_raster_verts(trans_verts, height, width), self.faces, (height, width), self.backend)

        pix_to_face = fragments.pix_to_face
        hit = (pix_to_face >= 0).reshape(-1).nonzero().squeeze(1)
        packed = pix_to_face.reshape(-1).index_select(0, hit)
        n_faces, n_verts = self.faces.shape[0], verts.shape[1]
        b, f = torch.div(packed, n_faces, rounding_mode="floor"), packed % n_faces
        weights = fragments.bary.reshape(-1, 3).index_select(0, hit).unsqueeze(-1)

        normals = vertex_normals(verts, self.faces).reshape(-1, 3)
        corners = (self.faces.index_select(0, f) + b[:, None] * n_verts).reshape(-1)
        normal_at = (weights * normals.index_select(0, corners).reshape(-1, 3, 3)).sum(1)
        uv_corners = self.uvfaces.index_select(0, f).reshape(-1)
        uv_at = (weights * self.uv_grid.index_select(0, uv_corners).reshape(-1, 3, 2)).sum(1)

        pixels = batch * height * width
        normal_map = verts.new_zeros(pixels, 3).index_copy_(0, hit, normal_at).reshape(batch, height, width, 3)
        grid = verts.new_zeros(pixels, 2).index_copy_(0, hit, uv_at).reshape(batch, height, width, 2)
        alpha = (pix_to_face >= 0).to(verts.dtype)[:, None]

        albedo_raw = F.grid_sample(albedo.to(verts.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        shading = sh_shading(normal_map, light).permute(0, 3, 1, 2)
        normal = normal_map.permute(0, 3, 1, 2)
        return {
            "rendered": albedo_raw * shading * alpha,
            "normal": normal * alpha,
            "albedo": albedo_raw * alpha,
            "shading": shading,
            "alpha": alpha,
            "pix_to_face": pix_to_face,
            "bary": fragments.bary,
        }

    def render_buffers(self, *args, **kwargs) -> torch.Tensor:
        """The UNet's physical conditioning: [B, 9, H, W] = cat(rendered, normal, albedo).

        Same arguments as `forward`.
        """
        return stack_buffers(self(*args, **kwargs))

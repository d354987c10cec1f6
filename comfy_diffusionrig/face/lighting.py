"""Spherical-harmonics lighting in DECA's convention, and the light-editing math of the nodes.

DECA's light code is `light [B, 9, 3]`: 9 order-2 SH coefficients per RGB channel, and the
shading of a (world-space, FLAME-frame) normal n is `sum_k light[k, c] * basis_k(n)` with
`basis = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] * DECA_SH_CONSTANTS`.  No clamping.

Angles are in the FLAME frame: +y up, +z towards the camera, +x = subject's left = image
right.  Azimuth 0 = light from the camera, positive azimuth = light from image right;
elevation positive = light from above.
"""

from __future__ import annotations

import math

import torch

from .presets import LIGHT_PRESETS, make_preset


def _deca_constants() -> torch.Tensor:
    # DECA SH constants (decalib renderer): the clamped-cosine convolution weights (pi, 2pi/3,
    # pi/4) times the SH normalisations, except that the DC term carries no pi; computed in
    # float64 and cast once, as DECA does
    pi = math.pi
    band1 = (2 * pi / 3) * math.sqrt(3 / (4 * pi))
    band2 = (pi / 4) * 3 * math.sqrt(5 / (12 * pi))
    return torch.tensor(
        [
            1 / math.sqrt(4 * pi),
            band1,
            band1,
            band1,
            band2,
            band2,
            band2,
            (pi / 4) * (3 / 2) * math.sqrt(5 / (12 * pi)),
            (pi / 4) * (1 / 2) * math.sqrt(5 / (4 * pi)),
        ],
        dtype=torch.float64,
    ).float()


DECA_SH_CONSTANTS = _deca_constants()


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """DECA's 9 SH basis functions at the given normals.

    normals: [..., 3] (x, y, z), not re-normalised (DECA shades interpolated normals as is)
    Returns: [..., 9] in normals' dtype.
    """
    x, y, z = normals.unbind(-1)
    basis = torch.stack(
        [torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], -1
    )
    return basis * DECA_SH_CONSTANTS.to(device=normals.device, dtype=normals.dtype)


def sh_shading(normals: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """RGB shading of normals under SH lights.

    normals: [B, ..., 3]; light: [B, 9, 3]
    Returns: [B, ..., 3] = sum_k light[b, k, c] * basis_k(n).
    """
    basis = sh_basis(normals)
    flat = basis.reshape(basis.shape[0], -1, 9)
    return torch.bmm(flat, light.to(basis.dtype)).reshape(*normals.shape[:-1], 3)


def _sh_weights() -> torch.Tensor:
    """Per-basis factor from a radiance SH projection to DECA's light code, float64 [9].

    Irradiance of order-2 SH radiance is sum_k A_l * Y_k(d) * Y_k(n) (Ramamoorthi & Hanrahan
    2001), with Y_k = norm_k * poly_k; DECA shades with light_k * DECA_SH_CONSTANTS_k * poly_k,
    so light_k = A_l * norm_k^2 * poly_k(d) / DECA_SH_CONSTANTS_k.
    """
    pi = math.pi
    cosine_lobe = torch.tensor([pi] + [2 * pi / 3] * 3 + [pi / 4] * 5, dtype=torch.float64)
    norm_sq = torch.tensor(
        [1 / (4 * pi)] + [3 / (4 * pi)] * 3 + [15 / (4 * pi)] * 3 + [15 / (16 * pi), 5 / (16 * pi)],
        dtype=torch.float64,
    )
    return cosine_lobe * norm_sq / DECA_SH_CONSTANTS.double()


def _polynomials(normals: torch.Tensor) -> torch.Tensor:
    return sh_basis(normals) / DECA_SH_CONSTANTS.to(device=normals.device, dtype=normals.dtype)


def light_direction(azimuth_deg, elevation_deg) -> torch.Tensor:
    """Unit vector pointing towards the light, FLAME frame (see module docstring).

    azimuth_deg, elevation_deg: floats or tensors (broadcast).  Returns: [..., 3] float64.
    """
    azimuth = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float64))
    elevation = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float64))
    azimuth, elevation = torch.broadcast_tensors(azimuth, elevation)
    return torch.stack(
        [torch.sin(azimuth) * torch.cos(elevation), torch.sin(elevation), torch.cos(azimuth) * torch.cos(elevation)], -1
    )


def sh_from_direction(azimuth_deg, elevation_deg, intensity=1.0, ambient=0.4, color=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """A directional light plus uniform ambient light as a DECA SH light code.

    azimuth_deg, elevation_deg: direction the light comes from (module docstring convention)
    intensity: irradiance of the direct light on a surface facing it (order-2 SH smooths the
        clamped cosine: a facing normal gets 17/16 * intensity, the opposite one 1/16)
    ambient: irradiance added everywhere; color: RGB tint of the whole light, [..., 3]
    Scalars or tensors, broadcast together.  Returns: [..., 9, 3] float32.
    """
    direction = light_direction(azimuth_deg, elevation_deg)
    intensity = torch.as_tensor(intensity, dtype=torch.float64)
    ambient = torch.as_tensor(ambient, dtype=torch.float64)
    color = torch.as_tensor(color, dtype=torch.float64)
    batch = torch.broadcast_shapes(direction.shape[:-1], intensity.shape, ambient.shape, color.shape[:-1])
    light = _polynomials(direction) * _sh_weights() * intensity[..., None]
    light = light.expand(*batch, 9).clone()
    # uniform irradiance lives in the constant band only
    light[..., 0] += ambient / DECA_SH_CONSTANTS[0].double()
    return (light[..., :, None] * color[..., None, :]).float()


def light_preset_document(name: str) -> dict:
    """The preset file of a named setup (what the pack's presets/ folder ships): its SH and sliders."""
    preset_light(name)  # the error for an unknown name
    sliders = {k: list(v) if k == "color" else v for k, v in LIGHT_PRESETS[name].items()}
    return make_preset(name, sh=preset_light(name).tolist(), sliders=sliders)


def sh_from_radiance(directions: torch.Tensor, radiance: torch.Tensor, solid_angle: torch.Tensor) -> torch.Tensor:
    """The DECA light code of an environment given as radiance samples (a discretised sphere).

    directions: [N, 3] unit vectors towards where each sample's light comes from (FLAME frame)
    radiance: [N, 3] linear RGB radiance; solid_angle: [N] steradians of each sample (sum 4 pi)
    Returns: [9, 3] float32 whose shading of a normal n is the order-2 SH approximation of
    (1 / pi) * integral L(w) max(0, n . w) dw: irradiance over pi, the outgoing radiance of a
    white Lambertian surface, so a uniform environment of radiance L shades every normal with L
    (a white furnace) and an image-exposed panorama lights the face at the same exposure.
    """
    weighted = _polynomials(directions.double()) * solid_angle.double()[:, None]  # [N, 9]
    moments = weighted.T @ radiance.double()  # [9, 3] = integral of L(w) * poly_k(w)
    # `sh_from_direction` is the same map for one delta light of integral 1 (intensity 1)
    return (_sh_weights()[:, None] * moments / math.pi).float()


# Brightest point of the portrait presets (rembrandt, loop, butterfly, under): a key light of
# intensity 1 reaches 17/16 through order-2 SH, plus ambient 0.35 (see `sh_from_direction`)
PORTRAIT_PEAK = 17 / 16 + 0.35

# the default light of the Relight node's sliders and of the CLI's --light: a white key from upper image right
SLIDER_LIGHT = {"azimuth": 45.0, "elevation": 20.0, "intensity": 0.8, "ambient": 0.5, "color": "#FFFFFF"}


def peak_shading(light: torch.Tensor) -> torch.Tensor:
    """Largest shading value of a light over all normals and RGB channels (its brightest point).

    light: [..., 9, 3].  Returns: [...] float64; sampled on 2048 normals (within ~0.3 % of the
    true maximum of an order-2 light).
    """
    basis = sh_basis(_fibonacci_sphere(2048).to(light.device))  # [P, 9]
    shading = torch.einsum("pk,...kc->...pc", basis, light.double())
    return shading.amax((-1, -2))


def normalize_light(light: torch.Tensor, peak: float = PORTRAIT_PEAK) -> torch.Tensor:
    """Scale a light so its brightest point is `peak`, keeping its direction, contrast and colour.

    light: [..., 9, 3].  Used to bring environment lights, whose absolute level depends on how
    the panorama was exposed, to the level of the presets.  Returns light's shape and dtype.
    """
    current = peak_shading(light)
    if bool((current <= 1e-12).any()):
        raise ValueError("the light is black (no positive shading anywhere), so it cannot be normalised; "
                         "check that the panorama is not all zeros")
    return (light.double() * (peak / current)[..., None, None]).to(light.dtype)


def preset_light(name: str, mirror: bool = False) -> torch.Tensor:
    """The SH light [9, 3] of a named setup (LIGHT_PRESETS); mirror puts the key light on the other side."""
    try:
        preset = LIGHT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown light preset {name!r}; choose one of {', '.join(LIGHT_PRESETS)}") from None
    azimuth = -preset["azimuth"] if mirror else preset["azimuth"]
    return sh_from_direction(azimuth, preset["elevation"], preset["intensity"], preset["ambient"], preset["color"])


def light_parameters(light: torch.Tensor):
    """Approximate inverse of `sh_from_direction`, to start sliders from a fitted light.

    The direction is the dominant direction of the linear SH band (summed over RGB); the
    per-channel direct intensity is the linear band's component along it, the ambient is
    what the constant band holds beyond the direct light's share.  Exact for lights made
    by `sh_from_direction` whose color has its largest channel equal to 1.
    light: [..., 9, 3].  Returns (azimuth_deg [...], elevation_deg [...], intensity [...],
    ambient [...], color [..., 3]) in light's dtype; color's largest channel is 1.
    """
    irradiance = light.double() * DECA_SH_CONSTANTS.double().to(light.device)[:, None]
    linear = irradiance[..., 1:4, :]  # [..., 3 xyz, 3 rgb]
    summed = linear.sum(-1)
    length = summed.norm(dim=-1, keepdim=True)
    directional = length[..., 0] > 1e-9
    direction = torch.where(directional[..., None], summed / length.clamp_min(1e-12), summed.new_tensor([0.0, 0.0, 1.0]))
    # the linear band of a directional light is intensity / 2 * direction (A_1 * norm_1^2 = 1/2)
    per_channel = 2 * (linear * direction[..., :, None]).sum(-2)
    per_channel = torch.where(directional[..., None], per_channel, torch.zeros_like(per_channel))
    constant = irradiance[..., 0, :] - per_channel / 4  # the direct light's DC share is 1/4
    intensity = per_channel.amax(-1)
    tint = torch.where((intensity > 1e-9)[..., None], per_channel, constant)
    color = tint / tint.amax(-1, keepdim=True).clamp_min(1e-12)
    ambient = constant.sum(-1) / color.sum(-1).clamp_min(1e-12)
    azimuth = torch.rad2deg(torch.atan2(direction[..., 0], direction[..., 2]))
    elevation = torch.rad2deg(torch.asin(direction[..., 1].clamp(-1.0, 1.0)))
    dtype = light.dtype
    return azimuth.to(dtype), elevation.to(dtype), intensity.to(dtype), ambient.to(dtype), color.to(dtype)


def rotation_matrix(yaw_deg=0.0, pitch_deg=0.0) -> torch.Tensor:
    """R = yaw about +y after pitch about -x: turns the camera direction (0, 0, 1) into
    `light_direction(yaw_deg, pitch_deg)`.  Returns: [..., 3, 3] float64."""
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float64))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float64))
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    about_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(*yaw.shape, 3, 3)
    about_minus_x = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], -1).reshape(*yaw.shape, 3, 3)
    return about_y @ about_minus_x


def _fibonacci_sphere(count: int) -> torch.Tensor:
    index = torch.arange(count, dtype=torch.float64) + 0.5
    y = 1 - 2 * index / count
    radius = torch.sqrt(1 - y * y)
    angle = math.pi * (3 - math.sqrt(5)) * index
    return torch.stack([radius * torch.cos(angle), y, radius * torch.sin(angle)], -1)


def rotate_sh(light: torch.Tensor, rotation: torch.Tensor | None = None, yaw_deg=0.0, pitch_deg=0.0) -> torch.Tensor:
    """Rotate the lighting environment: a light from d afterwards comes from R d.

    light: [B, 9, 3] or [9, 3]; rotation: [3, 3] or [B, 3, 3], or None to use
    `rotation_matrix(yaw_deg, pitch_deg)`.  Exact for order-2 SH: the result shades a normal n
    like `light` shades R^T n.  Returns light's shape and dtype.
    """
    if rotation is None:
        rotation = rotation_matrix(yaw_deg, pitch_deg)
    rotation = torch.as_tensor(rotation, dtype=torch.float64, device=light.device)
    # the 9 basis functions span a rotation-invariant space, so basis(R^T n) is an exact
    # linear map of basis(n); solve for it on points that pin down all 9 functions
    points = _fibonacci_sphere(32).to(light.device)
    basis = sh_basis(points)
    rotated = sh_basis(points @ rotation)  # row p @ R = (R^T p)^T
    mixing = torch.linalg.lstsq(basis.expand(*rotated.shape[:-2], -1, -1), rotated).solution
    return (mixing @ light.double()).to(light.dtype)


def lit_sphere(light: torch.Tensor, size: int = 256, albedo=0.7) -> torch.Tensor:
    """Preview of the SH light on a sphere seen from the camera.

    light: [9, 3] or [B, 9, 3]; albedo: grey level or RGB.  Normals are in the FLAME frame
    (image right = +x, up = +y, towards the viewer = +z); outside the sphere is black.
    Returns: [B, 3, size, size] float32 in [0, 1].
    """
    if light.dim() == 2:
        light = light[None]
    centres = (torch.arange(size, dtype=torch.float32, device=light.device) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(-centres, centres, indexing="ij")
    inside = (x * x + y * y) < 1
    z = torch.sqrt((1 - x * x - y * y).clamp_min(0))
    normals = torch.stack([x, y, z], -1).expand(light.shape[0], -1, -1, -1)
    shading = sh_shading(normals, light.float())
    albedo = torch.as_tensor(albedo, dtype=torch.float32, device=light.device)
    image = (shading * albedo).clamp(0, 1) * inside[..., None]
    return image.permute(0, 3, 1, 2).contiguous()

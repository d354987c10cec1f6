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

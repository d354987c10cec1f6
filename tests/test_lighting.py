"""SH lighting: DECA's basis, directional lights, rotation, inversion, code copying, preview."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_diffusionrig.face.lighting import (
    DECA_SH_CONSTANTS,
    LIGHT_PRESETS,
    light_direction,
    light_parameters,
    lit_sphere,
    preset_light,
    rotate_sh,
    rotation_matrix,
    sh_basis,
    sh_from_direction,
    sh_shading,
)

from conftest import reference_file


def sphere_points(count: int = 4000) -> torch.Tensor:
    index = torch.arange(count, dtype=torch.float64) + 0.5
    y = 1 - 2 * index / count
    angle = math.pi * (3 - math.sqrt(5)) * index
    radius = torch.sqrt(1 - y * y)
    return torch.stack([radius * torch.cos(angle), y, radius * torch.sin(angle)], -1)


def test_constants_are_decas():
    pi = math.pi
    expected = [1 / math.sqrt(4 * pi)] + [(2 * pi / 3) * math.sqrt(3 / (4 * pi))] * 3
    expected += [(pi / 4) * 3 * math.sqrt(5 / (12 * pi))] * 3
    expected += [(pi / 4) * 1.5 * math.sqrt(5 / (12 * pi)), (pi / 4) * 0.5 * math.sqrt(5 / (4 * pi))]
    assert torch.equal(DECA_SH_CONSTANTS, torch.tensor(expected, dtype=torch.float64).float())
    n = torch.tensor([0.2, -0.3, 0.9])
    x, y, z = n.tolist()
    poly = torch.tensor([1, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1])
    torch.testing.assert_close(sh_basis(n), poly * DECA_SH_CONSTANTS)


def test_shading_matches_deca_fixture():
    cases = torch.load(reference_file("flame", "render.pt"), weights_only=True)
    case = cases["direct_64"]
    normals = case["normal_images"].permute(0, 2, 3, 1)
    shading = sh_shading(normals, case["lights"]).permute(0, 3, 1, 2)
    covered = case["alpha_images"] > 0
    # float32 sums in a different order than DECA's
    assert ((shading - case["shading_images"]).abs() * covered).max() <= 1e-5


@pytest.mark.parametrize("azimuth, elevation", [(0, 0), (50, 10), (-120, -35), (170, 60)])
def test_directional_light_is_brightest_towards_the_light(azimuth, elevation):
    light = sh_from_direction(azimuth, elevation, intensity=1.0, ambient=0.3).double()
    points = sphere_points()
    shading = sh_shading(points[None], light[None])[0, :, 0]
    direction = light_direction(azimuth, elevation)
    # the closest sample of a 4000-point sphere is within ~3 degrees
    assert torch.dot(points[shading.argmax()], direction) > math.cos(math.radians(4))
    peak = sh_shading(direction[None, None], light[None])[0, 0, 0]
    assert peak >= shading.max()
    # order-2 SH clamped cosine: 1/4 + 1/2 + 5/16 facing the light, 1/4 - 1/2 + 5/16 opposite
    torch.testing.assert_close(peak, torch.tensor(17 / 16 + 0.3, dtype=torch.float64), atol=1e-6, rtol=0)
    back = sh_shading(-direction[None, None], light[None])[0, 0, 0]
    torch.testing.assert_close(back, torch.tensor(1 / 16 + 0.3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ambient_only_is_uniform_and_colored():
    light = sh_from_direction(20, 30, intensity=0.0, ambient=0.8, color=(1.0, 0.5, 0.25))
    shading = sh_shading(sphere_points()[None].float(), light[None])[0]
    torch.testing.assert_close(shading, torch.tensor([0.8, 0.4, 0.2]).expand_as(shading), atol=1e-6, rtol=0)


def test_azimuth_and_elevation_convention():
    # from the camera = +z, from image right = +x (subject's left), from above = +y
    torch.testing.assert_close(light_direction(0, 0), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(light_direction(90, 0), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(light_direction(0, 90), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_batched_arguments_broadcast():
    light = sh_from_direction(torch.tensor([0.0, 45.0, 90.0]), 10.0, ambient=torch.tensor([0.1, 0.2, 0.3]))
    assert light.shape == (3, 9, 3)
    torch.testing.assert_close(light[1], sh_from_direction(45.0, 10.0, ambient=0.2))


@pytest.mark.parametrize("yaw, pitch", [(30, 0), (0, -25), (-70, 40)])
def test_rotation_equals_evaluating_rotated_normals(yaw, pitch):
    gen = torch.Generator().manual_seed(0)
    light = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    rotation = rotation_matrix(yaw, pitch)
    rotated = rotate_sh(light, rotation)
    normals = sphere_points(500).expand(2, -1, -1)
    # shading of n under the rotated light = shading of R^T n under the original (row n @ R)
    expected = sh_shading(normals @ rotation, light)
    torch.testing.assert_close(sh_shading(normals, rotated), expected, atol=1e-5, rtol=0)
    assert torch.allclose(rotate_sh(light, yaw_deg=yaw, pitch_deg=pitch), rotated)


def test_rotating_a_frontal_light_gives_the_directional_light():
    rotated = rotate_sh(sh_from_direction(0, 0), yaw_deg=35, pitch_deg=-20)
    torch.testing.assert_close(rotated, sh_from_direction(35, -20), atol=1e-6, rtol=0)
    batched = rotate_sh(sh_from_direction(0, 0).expand(2, -1, -1), rotation_matrix(torch.tensor([10.0, -60.0]), 5.0))
    torch.testing.assert_close(batched, sh_from_direction(torch.tensor([10.0, -60.0]), 5.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "azimuth, elevation, intensity, ambient, color",
    [(0, 0, 1.0, 0.4, (1.0, 1.0, 1.0)), (65, -20, 0.7, 0.1, (1.0, 0.8, 0.6)), (-140, 45, 1.6, 0.0, (0.3, 1.0, 0.9))],
)
def test_light_parameters_round_trip(azimuth, elevation, intensity, ambient, color):
    light = sh_from_direction(azimuth, elevation, intensity, ambient, color)
    got = light_parameters(light)
    expected = (azimuth, elevation, intensity, ambient)
    # float32 light codes
    for value, want in zip(got[:4], expected):
        assert abs(float(value) - want) < 1e-4
    torch.testing.assert_close(got[4], torch.tensor(color), atol=1e-5, rtol=0)


def test_light_parameters_of_ambient_only_and_batches():
    azimuth, elevation, intensity, ambient, color = light_parameters(
        sh_from_direction(0, 0, intensity=0.0, ambient=0.5, color=(0.5, 1.0, 0.5))
    )
    assert float(intensity) == 0 and abs(float(ambient) - 0.5) < 1e-6
    torch.testing.assert_close(color, torch.tensor([0.5, 1.0, 0.5]))
    batch = sh_from_direction(torch.tensor([10.0, -80.0]), torch.tensor([5.0, 30.0]))
    assert light_parameters(batch)[0].shape == (2,) and light_parameters(batch)[4].shape == (2, 3)


def test_lit_sphere_preview():
    right = lit_sphere(sh_from_direction(90, 0, intensity=1.0, ambient=0.1), size=32)
    assert right.shape == (1, 3, 32, 32)
    assert right.min() >= 0 and right.max() <= 1
    assert right[0, :, 16, 28].mean() > right[0, :, 16, 4].mean()  # lit from image right
    assert bool((right[0, :, 0, 0] == 0).all())  # background
    flat = lit_sphere(sh_from_direction(0, 0, intensity=0.0, ambient=1.0).expand(2, -1, -1), size=16, albedo=0.5)
    inside = flat[0, 0] > 0
    assert flat.shape == (2, 3, 16, 16)
    torch.testing.assert_close(flat[:, :, inside], torch.full_like(flat[:, :, inside], 0.5))


@pytest.mark.parametrize("name", list(LIGHT_PRESETS))
def test_light_presets_are_the_setups_they_name(name):
    preset = LIGHT_PRESETS[name]
    azimuth, elevation, intensity, ambient, color = light_parameters(preset_light(name))
    assert float(azimuth) == pytest.approx(preset["azimuth"], abs=1e-3)
    assert float(elevation) == pytest.approx(preset["elevation"], abs=1e-3)
    assert float(intensity) == pytest.approx(preset["intensity"], abs=1e-4)
    assert float(ambient) == pytest.approx(preset["ambient"], abs=1e-4)
    torch.testing.assert_close(color, torch.tensor(preset["color"]), atol=1e-4, rtol=0)
    mirrored = light_parameters(preset_light(name, mirror=True))
    assert float(mirrored[0]) == pytest.approx(-preset["azimuth"], abs=1e-3)
    assert float(mirrored[1]) == pytest.approx(preset["elevation"], abs=1e-3)


def test_light_presets_light_the_side_they_say():
    sphere = lit_sphere(torch.stack([preset_light("split"), preset_light("split", mirror=True),
                                     preset_light("under"), preset_light("butterfly")]), size=64)
    brightness = sphere.mean(1)  # [4, H, W]
    left, right = brightness[..., :32].mean((-1, -2)), brightness[..., 32:].mean((-1, -2))
    top, bottom = brightness[..., :32, :].mean((-1, -2)), brightness[..., 32:, :].mean((-1, -2))
    assert right[0] > 1.5 * left[0] and left[1] > 1.5 * right[1]  # split: image right, mirrored: left
    assert bottom[2] > top[2] and top[3] > bottom[3]  # under-light vs butterfly (from above)
    with pytest.raises(ValueError, match="unknown light preset 'disco'.*rembrandt"):
        preset_light("disco")

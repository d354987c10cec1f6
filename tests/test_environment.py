"""Environment maps: panorama -> DECA SH light (layout, solid angles, yaw, normalisation), .hdr files, preview.

The conventions are checked through pictures, not through the formulas they are built from: bright
pixels placed by row and column must light the matching side of `lit_sphere`, and yaw must equal
scrolling the panorama's columns."""

import math
import struct

import numpy as np
import pytest
import torch

from comfy_diffusionrig import sh_from_environment
from comfy_diffusionrig.face.environment import (
    disk_environment,
    environment_preview,
    load_environment,
    read_hdr,
    srgb_to_linear,
    studio_environment,
    write_hdr,
)
from comfy_diffusionrig.face.lighting import (
    PORTRAIT_PEAK,
    light_direction,
    light_parameters,
    lit_sphere,
    normalize_light,
    peak_shading,
    preset_light,
    rotate_sh,
    sh_shading,
)

H, W = 64, 128


def angle_between(light: torch.Tensor, azimuth: float, elevation: float) -> float:
    got_azimuth, got_elevation = (float(v) for v in light_parameters(light.double())[:2])
    cos = float(light_direction(got_azimuth, got_elevation) @ light_direction(azimuth, elevation))
    return math.degrees(math.acos(min(1.0, cos)))


def test_uniform_panorama_is_only_the_constant_term_and_a_white_furnace():
    light = sh_from_environment(torch.full((H, W, 3), 0.7) * torch.tensor([1.0, 0.5, 0.25]))
    assert light.shape == (9, 3) and light.dtype == torch.float32
    # the midpoint rule over 64 rows leaves the band-2 zonal terms at ~1e-4 of the constant
    assert float(light[1:].abs().max()) < 1e-4 * float(light[0].abs().max())
    # radiance L everywhere shades every normal with L (irradiance / pi)
    normals = torch.nn.functional.normalize(torch.randn(1, 200, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    shading = sh_shading(normals, light[None])[0]
    torch.testing.assert_close(shading, torch.tensor([0.7, 0.35, 0.175]).expand_as(shading), atol=2e-4, rtol=0)


@pytest.mark.parametrize("azimuth, elevation", [(0, 0), (90, 0), (-45, 30), (180, 0), (135, -40), (10, 75), (-170, -60)])
def test_a_small_disk_gives_its_direction(azimuth, elevation):
    env = disk_environment(H, W, [(azimuth, elevation, 5.0, (50.0, 50.0, 50.0))], background=(0.02, 0.02, 0.02))
    assert angle_between(sh_from_environment(env), azimuth, elevation) < 3.0


def _block(row: int, column: int) -> torch.Tensor:
    """A black panorama with one bright 4x4-pixel patch at (row, column) of a 64x128 image."""
    env = torch.zeros(H, W, 3)
    env[row - 2:row + 2, column - 2:column + 2] = 40.0  # an unclamped lit sphere
    return env


def _sphere_brightness(env) -> dict[str, float]:
    sphere = lit_sphere(sh_from_environment(env), size=64)[0].mean(0)  # [64, 64]
    return {"left": float(sphere[28:36, 4:10].mean()), "right": float(sphere[28:36, 54:60].mean()),
            "top": float(sphere[4:10, 28:36].mean()), "bottom": float(sphere[54:60, 28:36].mean()),
            "centre": float(sphere[28:36, 28:36].mean())}


def test_the_panorama_layout_lights_the_sphere_from_where_the_pixels_are():
    # 3/4 across the panorama, on the horizon: the face's image right
    right = _sphere_brightness(_block(H // 2, 3 * W // 4))
    assert right["right"] > 3 * right["left"] + 1e-3
    # 1/4 across: image left
    left = _sphere_brightness(_block(H // 2, W // 4))
    assert left["left"] > 3 * left["right"] + 1e-3
    # the top rows: from above
    top = _sphere_brightness(_block(6, W // 2))
    assert top["top"] > 3 * top["bottom"] + 1e-3
    # the left/right edges are behind the camera: a frontal light, brightest in the middle of the sphere
    front = _sphere_brightness(_block(H // 2, 2))
    assert front["centre"] > 1.3 * max(front["left"], front["right"], front["top"], front["bottom"])
    # the centre column is behind the face: a back light leaves the side facing the camera dark
    back = _sphere_brightness(_block(H // 2, W // 2))
    assert back["centre"] < 0.1 * front["centre"]


def test_rows_are_weighted_by_their_solid_angle():
    # the same disk (same solid angle) near the pole and on the horizon lights as strongly
    polar = sh_from_environment(disk_environment(H, W, [(30.0, 70.0, 8.0, (1.0, 1.0, 1.0))]))
    equator = sh_from_environment(disk_environment(H, W, [(30.0, 0.0, 8.0, (1.0, 1.0, 1.0))]))
    polar_intensity, equator_intensity = float(light_parameters(polar)[2]), float(light_parameters(equator)[2])
    # the disks' pixel footprints differ by a few pixels; unweighted rows would differ by 1 / cos 70 = 2.9x
    assert polar_intensity == pytest.approx(equator_intensity, rel=0.06)


@pytest.mark.parametrize("columns", [1, 5, 32, -20])
def test_yaw_equals_scrolling_the_panorama_and_rotating_the_light(columns):
    env = studio_environment(H, W)
    yaw = columns * 360.0 / W
    turned = sh_from_environment(env, yaw=yaw)
    # positive yaw scrolls the picture to the left
    scrolled = sh_from_environment(torch.roll(env, -columns, dims=1))
    torch.testing.assert_close(turned, scrolled, atol=1e-5, rtol=1e-5)
    # and is Relight's "rotate fitted light" azimuth
    torch.testing.assert_close(rotate_sh(sh_from_environment(env), yaw_deg=yaw), turned, atol=1e-4, rtol=1e-5)


def test_positive_yaw_moves_a_front_light_to_image_right():
    front = _block(H // 2, 2)
    turned = _sphere_brightness(torch.roll(front, -W // 4, dims=1))  # 90 degrees by scrolling
    assert turned["right"] > 3 * turned["left"] + 1e-3
    by_yaw = lit_sphere(sh_from_environment(front, yaw=90.0), size=64)
    torch.testing.assert_close(by_yaw, lit_sphere(sh_from_environment(torch.roll(front, -W // 4, dims=1)), size=64),
                               atol=1e-4, rtol=0)


def test_a_key_and_fill_studio_relights_the_sphere_as_expected():
    light = normalize_light(sh_from_environment(studio_environment()))
    assert float(peak_shading(light)) == pytest.approx(PORTRAIT_PEAK, rel=1e-6)
    sphere = lit_sphere(light, size=64, albedo=0.6)[0]  # [3, 64, 64]
    inside = sphere.sum(0) > 0
    left, right = inside.clone(), inside.clone()
    left[:, 32:], right[:, :32] = False, False
    left_rgb, right_rgb = sphere[:, left].mean(1), sphere[:, right].mean(1)
    # the warm key is on image right (azimuth +50), the cool fill on image left
    assert float(right_rgb.mean()) > 1.5 * float(left_rgb.mean())
    assert float(right_rgb[0] / right_rgb[2]) > 1.3  # key side is warm (more red than blue)
    assert float(left_rgb[2] / left_rgb[0]) > float(right_rgb[2] / right_rgb[0]) * 1.3  # fill side bluer
    # and from above: the key is 25 degrees up
    assert float(sphere[:, :32][:, inside[:32]].mean()) > float(sphere[:, 32:][:, inside[32:]].mean())


def test_normalisation_keeps_direction_and_colour():
    light = sh_from_environment(studio_environment()) * 7.3
    normal = normalize_light(light)
    ratio = normal / light
    torch.testing.assert_close(ratio, ratio[0, 0].expand_as(ratio), atol=1e-5, rtol=1e-5)  # one scale factor
    # the presets' brightest point is the constant: 17/16 key + 0.35 ambient (sampled within 0.3 %)
    assert float(peak_shading(preset_light("rembrandt"))) == pytest.approx(PORTRAIT_PEAK, rel=3e-3)
    with pytest.raises(ValueError, match="black"):
        normalize_light(sh_from_environment(torch.zeros(8, 16, 3)))


def test_bad_environment_maps_are_refused():
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        sh_from_environment(torch.ones(8, 16))
    with pytest.raises(ValueError, match="negative"):
        sh_from_environment(-torch.ones(8, 16, 3))
    bad = torch.ones(8, 16, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sh_from_environment(bad)


def test_srgb_panorama_files_are_linearised(tmp_path):
    from PIL import Image

    path = tmp_path / "pano.png"
    Image.fromarray(np.full((8, 16, 3), 128, dtype=np.uint8)).save(path)
    env = load_environment(path)
    # sRGB 128/255 is 21.6 % linear (IEC 61966-2-1 reference value 0.2158605)
    np.testing.assert_allclose(env, 0.2158605, atol=1e-6)
    assert float(srgb_to_linear(torch.tensor(0.02))) == pytest.approx(0.02 / 12.92)


@pytest.mark.parametrize("rle", [True, False])
def test_hdr_round_trip(tmp_path, rle):
    rng = np.random.default_rng(0)
    image = (rng.random((9, 40, 3)) ** 3 * 50).astype(np.float32)
    image[3, 5:30] = [2.0, 1.0, 0.5]  # long runs for the RLE encoder
    image[4] = 0.0
    path = write_hdr(tmp_path / "x.hdr", image, rle=rle)
    back = read_hdr(path)
    assert back.shape == (9, 40, 3) and back.dtype == np.float32
    # RGBE: 8 mantissa bits under the pixel's largest channel's exponent
    assert np.all(np.abs(back - image) <= image.max(-1, keepdims=True) / 128 + 1e-30)
    assert np.all(back[4] == 0)
    assert path.read_bytes().startswith(b"#?RADIANCE\n")


def test_rle_files_are_smaller_and_read_the_same(tmp_path):
    env = studio_environment().numpy()
    flat, rle = write_hdr(tmp_path / "flat.hdr", env, rle=False), write_hdr(tmp_path / "rle.hdr", env, rle=True)
    assert rle.stat().st_size < flat.stat().st_size / 4
    assert np.array_equal(read_hdr(rle), read_hdr(flat))


def _hand_made_hdr(body: bytes, width: int, height: int = 1) -> bytes:
    return b"#?RADIANCE\n# made by hand\nFORMAT=32-bit_rle_rgbe\nEXPOSURE=1.0\n\n" + \
        f"-Y {height} +X {width}\n".encode() + body


def test_hdr_reader_decodes_hand_made_files(tmp_path):
    # flat: (128, 64, 0, 129) = ((128.5, 64.5, 0.5) / 256) * 2^(129-128); top row first
    path = tmp_path / "flat.hdr"
    path.write_bytes(_hand_made_hdr(bytes([128, 64, 0, 129, 0, 0, 0, 0]) + bytes([255, 255, 255, 128] * 2), 2, 2))
    image = read_hdr(path)
    np.testing.assert_allclose(image[0, 0], [128.5 / 128, 64.5 / 128, 0.5 / 128])
    assert np.all(image[0, 1] == 0)
    np.testing.assert_allclose(image[1], 255.5 / 256)
    # RLE, width 8: R = a run of 8 x 200, G = 8 literals, B = a run of 5 then 3 literals, E = a run of 8 x 128
    rle = bytes([2, 2, 0, 8]) + bytes([128 + 8, 200]) + bytes([8, 0, 10, 20, 30, 40, 50, 60, 70])
    rle += bytes([128 + 5, 7, 3, 1, 2, 3]) + bytes([128 + 8, 128])
    path = tmp_path / "rle.hdr"
    path.write_bytes(_hand_made_hdr(rle, 8))
    image = read_hdr(path)
    np.testing.assert_allclose(image[0, :, 0] * 256, 200.5)
    np.testing.assert_allclose(image[0, :, 1] * 256, [0.5, 10.5, 20.5, 30.5, 40.5, 50.5, 60.5, 70.5])
    np.testing.assert_allclose(image[0, :, 2] * 256, [7.5] * 5 + [1.5, 2.5, 3.5])


def test_corrupt_hdr_files_are_refused_with_the_path(tmp_path):
    good = write_hdr(tmp_path / "good.hdr", studio_environment(8, 16).numpy()).read_bytes()
    cases = {
        "notes.hdr": (b"hello, not an image", "no #.RADIANCE header"),
        "truncated.hdr": (good[:-20], "truncated in scanline"),
        "size.hdr": (good.replace(b"-Y 8 +X 16", b"+Y 8 -X 16"), "resolution line"),
        "runs.hdr": (good.replace(b"-Y 8 +X 16\n", b"-Y 8 +X 16\n\x02\x02\x00\x10\xff"), "run-length"),
        "format.hdr": (good.replace(b"32-bit_rle_rgbe", b"32-bit_rle_xyze"), "32-bit_rle_xyze"),
    }
    for name, (data, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=problem) as error:
            read_hdr(path)
        assert str(path) in str(error.value)


def test_exr_without_a_reader_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openexr(name, *args, **kwargs):
        if name == "OpenEXR":
            raise ImportError("no OpenEXR")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openexr)
    path = tmp_path / "pano.exr"
    path.write_bytes(struct.pack("<I", 20000630))
    with pytest.raises(ValueError, match=r"pano\.exr: reading \.exr needs the OpenEXR package.*\.hdr"):
        load_environment(path)


def test_preview_marks_the_dominant_light():
    env = disk_environment(H, W, [(90.0, 30.0, 6.0, (30.0, 30.0, 30.0))], background=(0.1, 0.1, 0.1))
    preview = environment_preview(env, sh_from_environment(env), width=256)
    assert preview.shape == (128, 256, 3) and 0 <= float(preview.min()) and float(preview.max()) <= 1
    red = (preview[..., 0] > 0.9) & (preview[..., 1] < 0.2) & (preview[..., 2] < 0.2)
    rows, columns = torch.nonzero(red, as_tuple=True)
    # azimuth 90 = image right = 3/4 across; elevation 30 = 1/3 of the way down
    assert abs(float(columns.float().mean()) - 192) < 4 and abs(float(rows.float().mean()) - 128 / 3) < 4
    # yaw turns the picture with the light: +90 brings image right to the centre column (behind the face)
    turned = environment_preview(env, sh_from_environment(env, yaw=90.0), yaw=90.0, width=256)
    red = (turned[..., 0] > 0.9) & (turned[..., 1] < 0.2) & (turned[..., 2] < 0.2)
    assert abs(float(torch.nonzero(red)[:, 1].float().mean()) - 128) < 4
    bright = turned.mean(-1) > 0.8
    assert abs(float(torch.nonzero(bright & ~red)[:, 1].float().mean()) - 128) < 6  # the disk moved there too


def test_the_example_panorama_is_the_studio(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "example_images" / "studio_key_fill.hdr"
    expected = write_hdr(tmp_path / "studio.hdr", studio_environment())
    assert shipped.read_bytes() == expected.read_bytes(), "regenerate: python tools/make_examples.py"
    assert load_environment(shipped).shape == (64, 128, 3)


def test_exr_panoramas_read_with_openexr(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR", reason="the optional OpenEXR package is not installed")
    env = studio_environment(16, 32).numpy().astype(np.float32)
    layouts = {"rgb.exr": {"RGB": env}, "planes.exr": {c: np.ascontiguousarray(env[..., i]) for i, c in enumerate("RGB")}}
    for name, channels in layouts.items():
        with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}, channels) as exr:
            exr.write(str(tmp_path / name))
        assert np.array_equal(load_environment(tmp_path / name), env)
    (tmp_path / "bad.exr").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.exr: not a readable RGB OpenEXR file"):
        load_environment(tmp_path / "bad.exr")


def test_large_panoramas_are_averaged_down_without_changing_the_light(monkeypatch):
    from comfy_diffusionrig.face import environment

    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 16, 32, generator=gen) * 2
    smooth = torch.nn.functional.interpolate(noise, size=(1024, 2048), mode="bilinear")[0].permute(1, 2, 0)
    env = smooth + disk_environment(1024, 2048, [(40.0, 70.0, 3.0, (60.0, 40.0, 20.0)),
                                                 (-100.0, -20.0, 1.5, (200.0, 200.0, 200.0))])
    reduced = sh_from_environment(env, yaw=33.0)
    monkeypatch.setattr(environment, "_MAX_ROWS", 4096)  # the full-resolution projection, in pieces of rows
    full = sh_from_environment(env, yaw=33.0)
    # 4x4 blocks of 0.7 degrees: the band-2 terms move by ~1e-4 of the light
    torch.testing.assert_close(reduced, full, atol=2e-4 * float(full.abs().max()), rtol=0)

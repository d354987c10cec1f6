"""Rig edits: pose composition, jaw, expression scale, copying from a reference, batching."""

import math

import pytest
import torch

from comfy_diffusionrig.face.rig import (FaceRig, axis_angle_to_matrix, copy_from, edit_pose, euler_matrix,
                                    matrix_to_axis_angle, sweep_values)


def _rig(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = {"shape": torch.randn(n, 100, generator=gen), "tex": torch.randn(n, 50, generator=gen),
             "exp": torch.randn(n, 50, generator=gen), "pose": 0.2 * torch.randn(n, 6, generator=gen),
             "cam": torch.randn(n, 3, generator=gen), "light": torch.randn(n, 9, 3, generator=gen)}
    return FaceRig(codes, torch.eye(3).expand(n, 3, 3).clone(), torch.randn(n, 3, generator=gen), (256, 256))


def test_axis_angle_round_trip_including_zero_and_half_turn():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True) * torch.rand(64, 1, generator=gen, dtype=torch.float64) * 3.0
    r = torch.cat([r, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0.0, math.pi, 0.0]], dtype=torch.float64)])
    back = matrix_to_axis_angle(axis_angle_to_matrix(r))
    assert torch.allclose(axis_angle_to_matrix(back), axis_angle_to_matrix(r), atol=1e-9)
    assert torch.allclose(back[:-1], r[:-1], atol=1e-9)


def test_yaw_turns_the_face_to_image_right_and_pitch_looks_down():
    forward = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # FLAME: the face looks along +z
    turned = euler_matrix(torch.tensor([30.0]), torch.tensor([0.0]), torch.tensor([0.0])).double()[0] @ forward
    assert turned[0] == pytest.approx(math.sin(math.radians(30)), abs=1e-7) and turned[1] == pytest.approx(0)
    down = euler_matrix(torch.tensor([0.0]), torch.tensor([20.0]), torch.tensor([0.0])).double()[0] @ forward
    assert down[1] < 0


def test_edit_pose_composes_on_the_fitted_pose_and_sets_the_jaw():
    rig = _rig()
    edited = edit_pose(rig, yaw=15.0, jaw_open=10.0, expression_scale=0.5)
    fitted = axis_angle_to_matrix(rig.codes["pose"][:, :3].double())
    want = euler_matrix(torch.full((2,), 15.0), torch.zeros(2), torch.zeros(2)).double() @ fitted
    assert torch.allclose(axis_angle_to_matrix(edited.codes["pose"][:, :3].double()), want, atol=1e-6)
    opening = axis_angle_to_matrix(torch.tensor([[math.radians(10), 0.0, 0.0]], dtype=torch.float64))
    want_jaw = axis_angle_to_matrix(rig.codes["pose"][:, 3:].double()) @ opening
    assert torch.allclose(axis_angle_to_matrix(edited.codes["pose"][:, 3:].double()), want_jaw, atol=1e-6)
    closed = edit_pose(rig.with_codes(pose=torch.zeros(2, 6)), jaw_open=10.0)
    assert torch.allclose(closed.codes["pose"][:, 3:], torch.tensor([[math.radians(10), 0, 0]] * 2))
    assert torch.allclose(edited.codes["exp"], rig.codes["exp"] * 0.5)
    assert torch.equal(edited.codes["light"], rig.codes["light"]) and torch.equal(edited.tform, rig.tform)
    same = edit_pose(rig)
    assert torch.allclose(same.codes["pose"], rig.codes["pose"], atol=1e-6)


def test_copy_from_one_reference_broadcasts_and_touches_only_what_is_asked():
    rig, ref = _rig(3, 0), _rig(1, 5)
    out = copy_from(rig, ref, light=True, jaw=True)
    assert torch.equal(out.codes["light"], ref.codes["light"].expand(3, 9, 3))
    assert torch.equal(out.codes["pose"][:, 3:], ref.codes["pose"][:, 3:].expand(3, 3))
    assert torch.equal(out.codes["pose"][:, :3], rig.codes["pose"][:, :3])
    assert torch.equal(out.codes["exp"], rig.codes["exp"]) and torch.equal(out.codes["shape"], rig.codes["shape"])
    with pytest.raises(ValueError, match="reference has 2 faces"):
        copy_from(rig, _rig(2), light=True)


def test_batching_helpers():
    rig = _rig(1)
    frames = rig.expand(4)
    assert len(frames) == 4 and torch.equal(frames.codes["tex"][3], rig.codes["tex"][0])
    both = FaceRig.cat([rig, _rig(2)])
    assert len(both) == 3 and len(both.select(slice(1, 3))) == 2 and len(both.select(0)) == 1
    with pytest.raises(KeyError):
        rig.with_codes(colour=torch.zeros(1))
    one_light = torch.arange(27.0).reshape(9, 3)
    lit = both.with_light(one_light)
    assert lit.codes["light"].shape == (3, 9, 3) and all(torch.equal(lit.codes["light"][i], one_light) for i in range(3))
    lit.codes["light"][0, 0, 0] = -1.0  # each face owns its copy
    assert float(lit.codes["light"][1, 0, 0]) == 0.0
    per_face = torch.randn(3, 9, 3)
    assert torch.equal(both.with_light(per_face).codes["light"], per_face)
    with pytest.raises(ValueError, match="2 faces for 3"):
        both.with_light(torch.zeros(2, 9, 3))
    assert sweep_values(-60, 60, 5).tolist() == [-60, -30, 0, 30, 60]
    eased = sweep_values(0, 1, 5, ease=True)
    assert eased[0] == 0 and eased[-1] == 1 and eased[1] < 0.25


def test_sweep_makes_face_major_rows():
    from comfy_diffusionrig.face.lighting import rotate_sh
    from comfy_diffusionrig.face.rig import sweep

    rig = _rig(2)
    frames = sweep(rig, "light_azimuth", [0.0, 30.0, 60.0])
    assert len(frames) == 6  # rows: face 0 at 0, 30, 60 degrees, then face 1 at 0, 30, 60
    for face in range(2):
        for k, angle in enumerate([0.0, 30.0, 60.0]):
            torch.testing.assert_close(frames.codes["light"][3 * face + k],
                                       rotate_sh(rig.codes["light"][face:face + 1], yaw_deg=angle)[0], atol=1e-6,
                                       rtol=0)
            assert torch.equal(frames.codes["shape"][3 * face + k], rig.codes["shape"][face])
    jaw = sweep(rig, "jaw_open", [0.0, 10.0])
    assert torch.allclose(jaw.codes["pose"][[1, 3]], edit_pose(rig, jaw_open=10.0).codes["pose"], atol=1e-6)
    assert torch.allclose(jaw.codes["pose"][[0, 2]], rig.codes["pose"], atol=1e-6)
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep(rig, "hair", [1.0])


def test_euler_angles_invert_euler_matrix():
    from comfy_diffusionrig.face.rig import euler_angles

    gen = torch.Generator().manual_seed(3)
    yaw, roll = (torch.rand(50, generator=gen, dtype=torch.float64) * 340 - 170 for _ in range(2))
    pitch = torch.rand(50, generator=gen, dtype=torch.float64) * 170 - 85
    got = euler_angles(euler_matrix(yaw, pitch, roll))
    for value, want in zip(got, (yaw, pitch, roll)):
        torch.testing.assert_close(value, want, atol=1e-7, rtol=0)


def test_a_preset_from_an_edit_redoes_the_edit_on_the_original():
    from comfy_diffusionrig.face.lighting import sh_from_direction
    from comfy_diffusionrig.face.presets import check_preset
    from comfy_diffusionrig.face.rig import apply_preset, preset_from_rig

    rig, donor = _rig(2, seed=4), _rig(1, seed=5)
    edited = copy_from(rig, donor, expression=True)
    edited = edit_pose(edited, yaw=20.0, pitch=-10.0, roll=5.0, jaw_open=12.0)
    edited = edited.with_light(sh_from_direction(-40.0, 15.0, 0.9, 0.3, (1.0, 0.9, 0.7)))
    preset = preset_from_rig(edited, index=1, original=rig, light=True, expression=True, jaw=True, name="turn")
    assert check_preset(preset) == preset
    # the head turn between the rigs is what edit_pose was asked for
    assert preset["edit"]["head_turn"] == pytest.approx({"yaw": 20.0, "pitch": -10.0, "roll": 5.0}, abs=1e-3)
    # the light's Relight slider values come back from its SH
    sliders = preset["light"]["sliders"]
    assert (sliders["azimuth"], sliders["elevation"], sliders["intensity"], sliders["ambient"]) == \
        pytest.approx((-40.0, 15.0, 0.9, 0.3), abs=1e-3)
    assert sliders["color"] == pytest.approx([1.0, 0.9, 0.7], abs=1e-3)
    redone = apply_preset(rig.select(1), preset)
    for key in ("light", "exp", "pose"):
        torch.testing.assert_close(redone.codes[key], edited.select(1).codes[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(redone.codes["shape"], rig.select(1).codes["shape"])
    # switches skip parts; every face of a batch gets the preset
    light_only = apply_preset(rig, preset, expression=False, pose=False)
    assert torch.equal(light_only.codes["pose"], rig.codes["pose"]) and torch.equal(light_only.codes["exp"], rig.codes["exp"])
    torch.testing.assert_close(light_only.codes["light"], edited.codes["light"][1:2].expand(2, -1, -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="face index 2"):
        preset_from_rig(edited, index=2)

"""Relighting a clip (video.py, the Relight Video Clip node): smoothing, light keyframes, tracking, pass-through.

The smoothing is checked against closed forms (a plain exponential moving average's step
response and noise variance); tracking on boxes and on real detections; the whole clip path on
the offline demo assets (random weights: shapes, pass-through and reporting, not picture quality).
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_diffusionrig.photo.detection import Face, detect_faces

from comfy_diffusionrig.photo.loading import load_image
from comfy_diffusionrig.face.lighting import sh_from_direction, sh_shading
from comfy_diffusionrig.video import (frame_jitter, light_keyframes, one_euro, smooth_codes, smooth_sequence,
                                      track_faces)
from nodes import host


def test_strength_zero_changes_nothing_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    codes = {"pose": torch.randn(9, 6, generator=g), "exp": torch.randn(9, 50, generator=g),
             "cam": torch.randn(9, 3, generator=g), "light": torch.randn(9, 9, 3, generator=g),
             "shape": torch.randn(9, 100, generator=g)}
    out = smooth_codes(codes, 0.0)
    assert all(torch.equal(out[k], codes[k]) for k in codes)
    assert not torch.equal(smooth_codes(codes, 1.0)["pose"], codes["pose"])
    assert torch.equal(smooth_codes(codes, 1.0)["shape"], codes["shape"])  # not a smoothed key
    with pytest.raises(ValueError, match="strength"):
        smooth_sequence(codes["pose"], -1.0)


def test_one_euro_at_rest_is_the_closed_form_moving_average():
    strength = 3.0
    alpha = 1 / (1 + strength)
    step = torch.cat([torch.zeros(1, 1), torch.ones(12, 1)])
    out = one_euro(step, strength, speed=0.0)[:, 0]
    k = torch.arange(13, dtype=torch.float64)
    expected = torch.where(k == 0, 0.0, 1 - (1 - alpha) ** k)  # y_k = 1 - (1 - alpha)^k after a unit step
    assert torch.allclose(out, expected, atol=1e-12)
    # white noise of unit variance: Var(y) = alpha / (2 - alpha), Var(y_t - y_t-1) = 2 alpha^2 / (2 - alpha)
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = one_euro(noise, strength, speed=0.0)[200:]
    assert float(y.var()) == pytest.approx(alpha / (2 - alpha), rel=0.06)
    assert float((y[1:] - y[:-1]).var()) == pytest.approx(2 * alpha ** 2 / (2 - alpha), rel=0.06)


def test_smoothing_lowers_jitter_but_follows_a_real_step():
    frames, sigma, height = 80, 0.02, 1.0
    truth = torch.zeros(frames, 1)
    truth[frames // 2:] = height
    noisy = truth + sigma * torch.randn(frames, 1, generator=torch.Generator().manual_seed(2))
    flat = slice(0, frames // 2 - 4)  # jitter where the truth is still
    raw = frame_jitter(noisy[flat])
    jitters = [frame_jitter(smooth_sequence(noisy, s)[flat]) for s in (1.0, 2.0, 4.0)]
    assert jitters[0] < 0.3 * raw and jitters[1] < jitters[0] and jitters[2] < jitters[1]
    smoothed = smooth_sequence(noisy, 4.0)
    # away from the step the output sits on the true levels (a filter without the speed term smears
    # the step over ~3 time constants: 12 frames on each side)
    away = torch.ones(frames, dtype=torch.bool)
    away[frames // 2 - 3:frames // 2 + 3] = False
    assert float((smoothed - truth)[away].abs().max()) < 4 * sigma
    slow = smooth_sequence(noisy, 4.0, speed=0.0)
    assert float((slow - truth)[away].abs().max()) > 0.1 * height


def test_light_keyframes_cross_fade_the_shading():
    start, end = sh_from_direction(-60, 10, 0.9, 0.4).float(), sh_from_direction(70, 40, 0.5, 0.6).float()
    lights = light_keyframes(start, end, 5)
    assert lights.shape == (5, 9, 3)
    assert torch.equal(lights[0], start) and torch.allclose(lights[4], end)
    normals = torch.nn.functional.normalize(torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    shade = lambda light: sh_shading(normals, light[None])  # noqa: E731
    # SH shading is linear in the light: frame k is the cross-fade (1 - k/4) start + (k/4) end
    assert torch.allclose(shade(lights[1]), 0.75 * shade(start) + 0.25 * shade(end), atol=1e-5)
    eased = light_keyframes(start, end, 5, ease=True)
    s = (1 - math.cos(math.pi / 4)) / 2
    assert torch.allclose(eased[1], (1 - s) * start + s * end, atol=1e-6)
    assert torch.equal(light_keyframes(start, None, 3), start.expand(3, 9, 3))


def _face(x0, y0, size):
    return Face((x0, y0, x0 + size, y0 + size), np.zeros((68, 2)), 1.0, "hog")


def test_tracking_follows_the_person_not_the_largest_face():
    person = [_face(100 + 4 * t, 100, 80) for t in range(6)]
    intruder = _face(300, 40, 200)
    detections = [[person[0]], [person[1]], [], [intruder, person[3]], [intruder, person[4]], [person[5], intruder]]
    assert track_faces(detections) == [0, 0, None, 1, 1, 0]
    # the person jumps away (a cut): without identity the track is lost, with it the person is found again
    jumped = [[person[0]], [intruder, _face(500, 300, 80)]]
    assert track_faces(jumped) == [0, None]
    same = {id(person[0]): np.zeros(128), id(jumped[1][1]): np.full(128, 0.01), id(intruder): np.ones(128)}
    describe = lambda t, face: same[id(face)]  # noqa: E731
    assert track_faces(jumped, describe=describe) == [0, 1]
    with pytest.raises(ValueError, match="face 2"):
        track_faces([[person[0]]], first=2)


def _clip_frames() -> list[Image.Image]:
    """Astronaut's face drifting right; a larger face (Grace Hopper) enters in frame 2; frame 1 has no face."""
    astronaut = load_image(host.EXAMPLE_IMAGES / "astronaut.png").crop((110, 10, 330, 230))
    grace = load_image(host.EXAMPLE_IMAGES / "grace_hopper.jpg").crop((140, 90, 410, 390))
    frames = []
    for t in range(3):
        canvas = Image.new("RGB", (600, 340), (128, 128, 128))
        if t != 1:
            canvas.paste(astronaut, (10 + 8 * t, 60))
        if t == 2:
            canvas.paste(grace, (300, 20))
        frames.append(canvas)
    return frames


def test_tracking_real_detections_keeps_the_person_when_a_larger_face_enters():
    frames = _clip_frames()
    detections = [detect_faces(f) for f in frames]
    assert [len(d) for d in detections] == [1, 0, 2]
    chosen = track_faces(detections)
    assert chosen == [0, None, 1]
    assert detections[2][chosen[2]].box[0] < 300  # the astronaut on the left, not the larger face


@pytest.fixture(scope="module")
def clip_nodes(demo_models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
        from nodes import face_nodes as fn
        from nodes import model_nodes as mn

        (deca,) = fn.LoadDECA().load("deca_model.tar", "auto")
        (dr,) = mn.LoadDiffusionRigModel().load("synthetic_random_diffusionrig.pt", "fp32")
        yield deca, dr


def test_relight_video_clip_node_passes_faceless_frames_through_and_reports_them(clip_nodes):
    from nodes.video_nodes import RelightVideoClip

    deca, dr = clip_nodes
    frames = host.pil_to_image(_clip_frames())
    frames[1] += 0.001 * torch.rand(frames[1].shape, generator=torch.Generator().manual_seed(0))  # off the 8-bit grid
    out, masks, report = RelightVideoClip().relight(
        dr, deca, frames, "sliders", 60.0, 20.0, 0.9, 0.5, "#FFFFFF", 40.0, 0.0, 2.0, 0, 2, "inversion", "hog", 0, 3)
    assert out.shape == frames.shape and out.dtype == torch.float32
    assert masks.shape == (3, 340, 600) and masks.dtype == torch.float32
    assert torch.equal(out[1], frames[1])  # bit-identical, not round-tripped through 8 bits
    assert float(masks[1].abs().max()) == 0.0
    assert "2 of 3" in report and "1 frame(s)" in report and ": 1 " in report
    for t in (0, 2):
        changed = (out[t] - frames[t]).abs().amax(-1) > 0
        assert bool(changed.any()), f"frame {t} was not relit"
        assert not bool(changed[masks[t] == 0].any())  # only inside the pasted mask
        assert float(masks[t][:, 300:].max()) == 0.0  # the larger face on the right stays untouched
    with pytest.raises(ValueError, match="Relight Video Clip"):
        RelightVideoClip().relight(dr, deca, frames[1:2], "sliders", 60.0, 20.0, 0.9, 0.5, "#FFFFFF", 0.0, 0.0, 2.0,
                                   0, 2, "inversion", "hog", 0, 3)


def test_relight_video_clip_node_hands_the_detail_settings_to_the_library(clip_nodes, monkeypatch):
    """The node's detail / detail_radius reach relight_clip (which pastes with them); a bad one stops before work."""
    from comfy_diffusionrig.video import relight_clip
    from nodes import video_nodes

    deca, dr = clip_nodes
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stopped here")

    monkeypatch.setattr(video_nodes, "relight_clip", spy)
    frames = host.pil_to_image(_clip_frames()[:1])
    with pytest.raises(ValueError, match="Relight Video Clip: stopped here"):
        video_nodes.RelightVideoClip().relight(dr, deca, frames, "sliders", 60.0, 20.0, 0.9, 0.5, "#FFFFFF", 0.0, 0.0,
                                               2.0, 0, 2, "inversion", "hog", 0, 3, detail="difference",
                                               detail_radius=5.0)
    assert seen["detail"] == "difference" and seen["detail_radius"] == 5.0
    with pytest.raises(ValueError, match="unknown detail mode 'sharp'"):
        host.run_models(relight_clip, [dr, deca], [], torch.zeros(9, 3), detail="sharp")


def test_relight_video_cli_on_a_frames_folder(demo_models, tmp_path, capsys):
    from comfy_diffusionrig.cli import main

    clip = tmp_path / "clip"
    clip.mkdir()
    frames = _clip_frames()
    for k, frame in enumerate(frames[:2]):
        frame.save(clip / f"f{k}.png")
    common = ["--models", str(demo_models), "--steps", "1", "--device", "cpu", "--precision", "fp32"]
    assert main(["relight-video", str(clip), "--out", str(tmp_path / "bad"), "--smooth", "-1", *common]) == 2
    assert "strength" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "relit"
    code = main(["relight-video", str(clip), "--out", str(out), "--light-preset", "rembrandt", "--end-turn", "30",
                 *common])
    assert code == 1  # a frame without the face: written unchanged, reported, exit status 1
    assert "1 of 2 frames" in capsys.readouterr().out
    first, second = (np.asarray(Image.open(out / f"{k:05d}.png")) for k in range(2))
    assert np.array_equal(second, np.asarray(frames[1]))
    assert first.shape == np.asarray(frames[0]).shape and not np.array_equal(first, np.asarray(frames[0]))


def test_relight_video_cli_refuses_a_video_without_ffmpeg_before_loading_models(tmp_path, capsys, monkeypatch):
    from comfy_diffusionrig import cli
    from comfy_diffusionrig import pipeline

    monkeypatch.setattr(cli, "video_writer", lambda: None)
    monkeypatch.setattr(pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    movie = tmp_path / "clip.mp4"
    movie.write_bytes(b"not really a video")
    assert cli.main(["relight-video", str(movie), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "needs ffmpeg on the PATH" in capsys.readouterr().err
    assert cli.main(["relight-video", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "folder of frames or a video file" in capsys.readouterr().err


def test_steady_faces_smooth_landmark_jitter_and_follow_a_real_move():
    """The landmarks the crops are aligned on: detection jitter (1 px) on a still head is mostly removed, a real
    40 px move is followed, and strength 0 gives the detections back untouched."""
    from comfy_diffusionrig.video import steady_faces

    gen = np.random.default_rng(0)
    base = gen.uniform(100, 200, (68, 2))
    truth = [base + (40.0 if t >= 12 else 0.0) for t in range(24)]
    faces = [Face(box=(0, 0, 1, 1), landmarks=m + gen.normal(0, 1.0, m.shape), score=1.0, detector="hog")
             for m in truth]
    assert all(a is b for a, b in zip(steady_faces(faces, 0.0), faces))
    steady = steady_faces(faces, 2.0)
    assert [f.box for f in steady] == [f.box for f in faces]
    error = lambda fs, ts: np.sqrt(np.mean([(f.landmarks - m) ** 2 for f, m in zip(fs, ts)]))  # noqa: E731
    still = [t for t in range(24) if abs(t - 11.5) > 3]  # away from the move
    assert error([steady[t] for t in still], [truth[t] for t in still]) < \
        0.6 * error([faces[t] for t in still], [truth[t] for t in still])
    assert np.abs(steady[23].landmarks - truth[23]).mean() < 1.0 and np.abs(steady[0].landmarks - truth[0]).mean() < 1.0


def test_a_still_head_gets_a_steady_crop_through_the_clip(demo_models, monkeypatch):
    """End to end: a still photo repeated as a clip, with dlib's landmarks jittered per frame (as on video): the
    pasted region (from each frame's alignment) stays put with smoothing and shakes without."""
    from comfy_diffusionrig.photo import detection
    from comfy_diffusionrig.face.deca import load_deca
    from comfy_diffusionrig.pipeline import find_checkpoint
    from comfy_diffusionrig.model.checkpoints import load_diffusionrig
    from comfy_diffusionrig.video import relight_clip

    photo = load_image(host.EXAMPLE_IMAGES / "astronaut.png").resize((256, 256))
    (face,) = detect_faces(photo)[:1]
    gen = np.random.default_rng(1)
    jitter = iter([gen.normal(0, 1.5, (68, 2)) for _ in range(16)])
    monkeypatch.setattr(detection, "detect_faces", lambda *a, **k: [Face(face.box, face.landmarks + next(jitter),
                                                                          face.score, face.detector)])
    model = load_diffusionrig(find_checkpoint(demo_models), dtype="fp32")
    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame")
    spread = {}
    for strength in (0.0, 3.0):
        result = relight_clip(model, deca, [photo] * 8, sh_from_direction(40.0, 20.0, 0.9, 0.5), strength=strength,
                              steps=1, identity=False)
        ys, xs = np.mgrid[:256, :256]
        centres = np.array([[(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()] for m in result.masks])
        spread[strength] = float(np.linalg.norm(centres - centres.mean(0), axis=1).mean())
    assert spread[3.0] < 0.5 * spread[0.0], spread


def test_smoothing_never_bridges_frames_without_the_face(monkeypatch, clip_nodes):
    """Two shots of one person, the face unseen in between: each run is smoothed on its own, so the second shot's
    pose does not bleed into the end of the first (as it does when the runs are joined)."""
    from comfy_diffusionrig import video
    from comfy_diffusionrig.video import frame_runs

    assert frame_runs([0, 1, 2, 5, 6, 9]) == [slice(0, 3), slice(3, 5), slice(5, 6)]
    assert frame_runs([]) == [] and frame_runs([4]) == [slice(0, 1)]
    gen = torch.Generator().manual_seed(0)
    first, second = torch.zeros(10, 3), torch.full((10, 3), 0.5)
    x = torch.cat([first, second]) + 0.01 * torch.randn(20, 3, generator=gen)
    joined = smooth_sequence(x, 3.0)
    apart = smooth_sequence(x, 3.0, runs=frame_runs(list(range(10)) + list(range(14, 24))))
    assert torch.equal(apart[:10], smooth_sequence(x[:10], 3.0)) and torch.equal(apart[10:], smooth_sequence(x[10:], 3.0))
    assert float(apart[9].abs().max()) < 0.05 < float(joined[9].abs().max())
    # relight_clip smooths within runs of frames with the face: here frame 1 has none, so nothing spans it
    lengths = []
    original = video.smooth_sequence

    def spy(x, strength, speed=video.SPEED, runs=None):
        lengths.append([r.stop - r.start for r in runs] if runs is not None else [len(x)])
        return original(x, strength, speed, runs)

    monkeypatch.setattr(video, "smooth_sequence", spy)
    deca, dr = clip_nodes
    host.run_models(video.relight_clip, [dr, deca], _clip_frames(), sh_from_direction(40.0, 20.0, 0.9, 0.5),
                    strength=2.0, steps=1, identity=False)
    top_level = [n for n in lengths if len(n) > 1]  # (each run is then smoothed by a call of its own)
    assert top_level and all(n == [1, 1] for n in top_level), lengths  # landmarks, pose..., global code
    assert len(top_level) == 1 + len(video.SMOOTH_KEYS) + 1

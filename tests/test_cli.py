"""The command line, run in-process."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_diffusionrig import pipeline
from comfy_diffusionrig import cli
from comfy_diffusionrig.cli import main
from comfy_diffusionrig.model.checkpoints import read_state_dict

from conftest import reference_file


def test_convert_official_checkpoint_to_safetensors(tmp_path, tiny_kwargs, capsys):
    src = reference_file("diffusionrig", "tiny_model.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_kwargs))
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(src), str(out), "--config", str(tmp_path / "cfg.json")]) == 0
    tensors, meta = read_state_dict(out)
    reference = torch.load(src, weights_only=True)
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert json.loads(meta["config"])["num_channels"] == 32
    assert main(["info", str(out)]) == 0
    assert '"params_unet": 1481859' in capsys.readouterr().out
    # a second convert refuses to overwrite and says so
    assert main(["convert", str(src), str(out), "--config", str(tmp_path / "cfg.json")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.pt")]) == 2
    assert "models/diffusionrig" in capsys.readouterr().err


# ------------------------------------------------------------------ relight / edit / sweep on the demo assets

EXAMPLES = Path(__file__).resolve().parents[1] / "example_images"
ASTRONAUT, GRACE = EXAMPLES / "astronaut.png", EXAMPLES / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def cached_models():
    """The CLI's model loading, done once per models folder for this module (each command would reload them)."""
    cache, real = {}, pipeline.load_models

    def load(models_dir=None, checkpoint=None, **kwargs):
        key = (str(models_dir), checkpoint, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(models_dir, checkpoint, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_models", load)
        yield cache


@pytest.fixture()
def run_cli(demo_models, cached_models):
    def run(*argv: str) -> int:
        return main([*argv, "--models", str(demo_models), "--steps", "2"])

    return run


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _changed(out: np.ndarray, original: np.ndarray) -> np.ndarray:
    assert out.shape == original.shape  # the photo's own size
    return np.abs(out - original).max(-1) > 0


def _face_only(changed: np.ndarray, face_box) -> None:
    """Pixels changed inside the face box, and none far from it (paste back touches only the face)."""
    x0, y0, x1, y1 = face_box
    assert changed[y0:y1, x0:x1].mean() > 0.3
    far, margin = np.ones_like(changed), x1 - x0  # the pasted region reaches up to the forehead
    far[max(0, y0 - margin):y1 + margin // 2, max(0, x0 - margin // 2):x1 + margin // 2] = False
    assert far.mean() > 0.3
    assert not changed[far].any()


ASTRONAUT_FACE, GRACE_FACE = (175, 76, 266, 167), (180, 139, 367, 326)  # dlib HOG boxes of the example photos


def test_relight_with_a_light_needs_overwrite_to_replace_a_file(tmp_path, run_cli, capsys):
    out = tmp_path / "relit.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out)
    before = out.read_bytes()
    light = "azimuth=60,elevation=20,intensity=0.9,ambient=0.4,color=#FFE0C0"
    assert run_cli("relight", str(ASTRONAUT), "--out", str(out), "--light", light, "--start", "noise") == 2
    err = capsys.readouterr().err
    assert f"comfy-diffusionrig relight: error: {out} already exists; pass --overwrite" in err
    assert "[" not in err  # refused before any work (no progress bar)
    assert out.read_bytes() == before  # the old file is kept
    assert run_cli("relight", str(ASTRONAUT), "--out", str(out), "--light", light, "--overwrite") == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (512, 512) and image.mode == "RGB"
    _face_only(_changed(_pixels(out), _pixels(ASTRONAUT)), ASTRONAUT_FACE)
    assert not list(tmp_path.glob("*.tmp*"))  # no temporary file left behind
    # an unreadable light is a clear error, not a traceback
    assert run_cli("relight", str(ASTRONAUT), "--out", str(tmp_path / "x.png"), "--light", "azimut=3") == 2
    assert "--light: cannot read 'azimut=3'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_relight_a_folder_with_the_light_of_a_reference_photo(tmp_path, run_cli):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(ASTRONAUT, photos)
    shutil.copy(GRACE, photos)
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    assert run_cli("relight", str(photos), "--out", str(out), "--light-from", str(GRACE), "--start", "noise") == 0
    assert sorted(p.name for p in out.iterdir()) == ["astronaut_relit.png", "grace_hopper_relit.png"]
    with Image.open(out / "grace_hopper_relit.png") as image:
        assert image.size == (512, 600)  # width x height of the input
    _face_only(_changed(_pixels(out / "astronaut_relit.png"), _pixels(ASTRONAUT)), ASTRONAUT_FACE)
    _face_only(_changed(_pixels(out / "grace_hopper_relit.png"), _pixels(GRACE)), GRACE_FACE)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("relight", str(empty), "--out", str(out), "--light", "azimuth=0") == 2


def test_edit_pose_sliders_and_expression_from_a_photo(tmp_path, run_cli, capsys, monkeypatch):
    seen = []
    real = pipeline.edit_photo

    def spy(*args, **kwargs):
        seen.append((kwargs["detail"], kwargs["detail_radius"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "edit_photo", spy)
    out = tmp_path / "edited.jpg"
    assert run_cli("edit", str(ASTRONAUT), "--out", str(out), "--jaw-open", "15", "--yaw", "10",
                   "--expression-from", str(GRACE), "--start", "noise", "--detail", "difference",
                   "--detail-radius", "3") == 0
    assert seen == [("difference", 3.0)]
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (512, 512)
    changed = _changed(_pixels(out), _pixels(ASTRONAUT))
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert changed[y0:y1, x0:x1].mean() > 0.3  # (JPEG re-encoding may touch pixels anywhere)
    assert "astronaut.png" in capsys.readouterr().err  # the progress bar names the photo
    assert run_cli("edit", str(ASTRONAUT), "--out", str(tmp_path / "edited"), "--yaw", "10") == 2
    assert "should be an image file name" in capsys.readouterr().err


def test_sweep_writes_frames_and_a_gif(tmp_path, run_cli, capsys, monkeypatch):
    monkeypatch.setattr(cli, "video_writer", lambda: None)  # no ffmpeg: GIF only
    out = tmp_path / "sweep"
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out), "--light-azimuth", "-60:60", "--frames", "3",
                   "--start", "noise", "--fps", "5") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["astronaut_light_azimuth.gif"] + [f"astronaut_light_azimuth_{k:04d}.png" for k in range(3)]
    assert "ffmpeg is not on the PATH: writing the PNG frames and the GIF, no MP4" in capsys.readouterr().err
    frames = [_pixels(out / f"astronaut_light_azimuth_{k:04d}.png") for k in range(3)]
    original = _pixels(ASTRONAUT)
    for frame in frames:
        _face_only(_changed(frame, original), ASTRONAUT_FACE)
    assert not np.array_equal(frames[0], frames[2])  # the light moved
    with Image.open(out / "astronaut_light_azimuth.gif") as gif:
        assert gif.size == (512, 512) and gif.n_frames == 3 and gif.info["duration"] == 200
    # frames are never silently replaced
    (out / "astronaut_light_azimuth_0000.png").unlink()  # even with a frame gone, no frame is written
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out), "--light-azimuth", "-60:60", "--frames", "3",
                   "--start", "noise") == 2
    assert "astronaut_light_azimuth_0001.png already exists; pass --overwrite" in capsys.readouterr().err
    assert not (out / "astronaut_light_azimuth_0000.png").exists()
    assert np.array_equal(_pixels(out / "astronaut_light_azimuth_0002.png"), frames[2])
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out), "--head-yaw", "-30:30", "--jaw-open", "0:10") == 2
    assert "give exactly one sweep" in capsys.readouterr().err


def test_sweep_also_writes_an_mp4_when_ffmpeg_is_there(tmp_path, run_cli, monkeypatch):
    fake = tmp_path / "bin" / "ffmpeg"  # records its arguments and writes the output file it is given
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args.txt"\nfor last; do :; done\necho video > "$last"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    out = tmp_path / "sweep"
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out), "--jaw-open", "0:10", "--frames", "2",
                   "--start", "noise", "--fps", "8") == 0
    assert (out / "astronaut_jaw_open.mp4").read_text() == "video\n"
    args = (fake.parent / "args.txt").read_text().split()
    assert args[args.index("-framerate") + 1] == "8"
    assert args[args.index("-i") + 1] == str(out / "astronaut_jaw_open_%04d.png")
    assert not list(out.glob("*.tmp"))
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out / "again"), "--jaw-open", "0:10", "--frames", "2",
                   "--start", "noise") == 0
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")  # a failing ffmpeg: a clear error, nothing half-written
    assert run_cli("sweep", str(ASTRONAUT), "--out", str(out / "third"), "--jaw-open", "0:10", "--frames", "2",
                   "--start", "noise") == 2
    assert not (out / "third" / "astronaut_jaw_open.mp4").exists() and not list((out / "third").glob("*.tmp"))
    assert (out / "third" / "astronaut_jaw_open.gif").exists()


def test_relight_with_a_named_preset_and_its_mirror(tmp_path, run_cli, capsys):
    right, left = tmp_path / "right.png", tmp_path / "left.png"
    assert run_cli("relight", str(ASTRONAUT), "--out", str(right), "--light-preset", "golden hour", "--start",
                   "noise") == 0
    assert run_cli("relight", str(ASTRONAUT), "--out", str(left), "--light-preset", "golden hour", "--mirror",
                   "--start", "noise") == 0
    for out in (right, left):
        _face_only(_changed(_pixels(out), _pixels(ASTRONAUT)), ASTRONAUT_FACE)
    assert not np.array_equal(_pixels(right), _pixels(left))
    with pytest.raises(SystemExit):
        run_cli("relight", str(ASTRONAUT), "--out", str(tmp_path / "x.png"), "--light-preset", "disco")
    assert "unknown light preset 'disco'; choose one of rembrandt" in capsys.readouterr().err


def test_all_faces_of_a_photo_are_each_edited_as_alone(demo_models, cached_models, tmp_path):
    """`--faces all` (pipeline.edit_photo -> edit_faces): the largest face comes out as with `--faces largest`."""
    from comfy_diffusionrig.face.lighting import sh_from_direction

    astronaut = Image.open(ASTRONAUT).convert("RGB").crop((110, 10, 330, 230))
    grace = Image.open(GRACE).convert("RGB").crop((140, 90, 410, 390))
    photo = Image.new("RGB", (560, 330), (128, 128, 128))
    photo.paste(astronaut, (10, 50))
    photo.paste(grace, (270, 15))
    models = pipeline.load_models(demo_models, device="cpu", dtype="fp32")
    light = sh_from_direction(60.0, 20.0, 0.9, 0.45)
    edit = lambda rig: rig.with_light(light)  # noqa: E731
    both = pipeline.edit_photo(models, photo, edit, steps=2, faces="all")
    largest = pipeline.edit_photo(models, photo, edit, steps=2, faces="largest")
    assert len(both.faces) == 2 and len(both.photos) == 1 and len(largest.faces) == 1
    faces = [np.asarray(f, np.int16) for f in both.faces]
    alone = np.asarray(largest.faces[0], np.int16)
    match = [np.abs(f - alone).max() for f in faces]
    assert min(match) <= 1  # one uint8 level of round-off
    assert max(match) > 20  # and the other face is another face


def test_a_folder_with_a_photo_without_a_face_goes_on_and_says_which(tmp_path, run_cli, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cameraman.png", "grace_hopper.jpg"):  # cameraman (a profile in a coat) sorts first
        shutil.copy(EXAMPLES / name, photos)
    out = tmp_path / "out"
    assert run_cli("relight", str(photos), "--out", str(out), "--light-preset", "rembrandt", "--start", "noise") == 1
    assert sorted(p.name for p in out.iterdir()) == ["grace_hopper_relit.png"]
    err = capsys.readouterr().err
    assert "skipped 1 of 2 photos without a face (detector hog; try --detector cnn): cameraman.png" in err
    # one photo without a face: an error naming it and the CLI's own options
    assert run_cli("relight", str(EXAMPLES / "cameraman.png"), "--out", str(tmp_path / "c.png"), "--light",
                   "azimuth=10") == 2
    err = capsys.readouterr().err
    assert f"no face found in {EXAMPLES / 'cameraman.png'} (detector hog); try --detector cnn" in err
    assert "upsample" not in err and "detect_pixels" not in err


def test_save_buffers_writes_the_buffers_and_the_lit_sphere(tmp_path, run_cli):
    out = tmp_path / "relit.png"
    assert run_cli("relight", str(ASTRONAUT), "--out", str(out), "--light-preset", "Golden_Hour", "--start", "noise",
                   "--save-buffers") == 0
    buffers, sphere = _pixels(tmp_path / "relit_buffers.png"), _pixels(tmp_path / "relit_light.png")
    assert buffers.shape == (256, 768, 3) and sphere.shape == (256, 256, 3)
    # the golden-hour key light comes from image left (azimuth -70): the sphere's left half is brighter and warm
    left, right = sphere[:, :128].astype(float), sphere[:, 128:].astype(float)
    assert left.mean() > right.mean() + 10 and left[..., 0].mean() > left[..., 2].mean()


def test_cli_option_mistakes_get_one_clear_line_before_any_work(tmp_path, run_cli, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_models", no_models)
    out = str(tmp_path / "x.png")
    cases = [
        (["relight", str(ASTRONAUT), "--out", out, "--light", "azimuth=left"],
         "--light: azimuth='left' is not a number (degrees, + = from image right)"),
        (["relight", str(ASTRONAUT), "--out", out, "--light", "azimut=3"], "unknown key 'azimut'; the keys are azimuth"),
        (["relight", str(ASTRONAUT), "--out", out, "--light-from", str(GRACE), "--mirror"],
         "--mirror works with --light-preset and --light"),
        (["edit", str(ASTRONAUT), "--out", out], "nothing to edit: give at least one of --expression-from"),
        (["sweep", str(ASTRONAUT), "--out", str(tmp_path), "--jaw-open", "0:10", "--fps", "0"], "--fps must be at least 1"),
        (["sweep", str(ASTRONAUT), "--out", str(tmp_path), "--jaw-open", "0:10", "--frames", "0"],
         "--frames must be at least 1"),
        (["relight", str(ASTRONAUT), "--out", out, "--light", "azimuth=3", "--detail-radius", "-2"],
         "--detail / --detail-radius: detail_radius must be a number of pixels >= 0, got -2.0"),
    ]
    for argv, message in cases:
        assert run_cli(*argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["relight", str(ASTRONAUT), "--out", out, "--light", "azimuth=3", "--steps", "0"]) == 2
    assert "steps must be a whole number of at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli("relight", str(ASTRONAUT), "--out", out, "--light", "azimuth=3", "--device", "cuda") == 2
        err = capsys.readouterr().err
        assert "has no CUDA" in err and "--device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_a_wrong_checkpoint_lists_the_ones_there_and_version(demo_models, tmp_path, capsys):
    assert main(["relight", str(ASTRONAUT), "--out", str(tmp_path / "x.png"), "--light", "azimuth=3", "--models",
                 str(demo_models), "--checkpoint", "nope.pt"]) == 2
    err = capsys.readouterr().err
    assert "nope.pt not found" in err and "the checkpoints there are: synthetic_random_diffusionrig.pt" in err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from comfy_diffusionrig import __version__

    assert capsys.readouterr().out.strip() == f"comfy-diffusionrig {__version__}"


def test_the_progress_bar_gives_an_eta_and_stays_short_when_redirected():
    import io

    stream = io.StringIO()  # not a terminal
    bar = cli._Bar(stream)
    for done in range(0, 1501):
        bar(done, 1500, stage="stage 1")
    bar(1, 4, stage="stage 2")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 + 1  # each tenth of stage 1 once, then stage 2's first line
    assert "\r" not in stream.getvalue()
    assert "ETA" in lines[1] and lines[10].endswith("done") and "1500/1500" in lines[10]


def _chosen_edit(monkeypatch, *argv):
    """The rig edit `relight` would run on every face, without running it (no models, no sampler)."""
    chosen = {}
    monkeypatch.setattr(cli, "_run_edits", lambda args, make_edit, suffix: chosen.update(edit=make_edit(None)) or 0)
    code = main(["relight", str(ASTRONAUT), "--out", "unused.png", *argv])
    return code, chosen.get("edit")


def test_relight_with_an_environment_map_or_a_preset_file(tmp_path, monkeypatch, capsys):
    from comfy_diffusionrig.face.environment import load_environment, sh_from_environment
    from comfy_diffusionrig.face.lighting import normalize_light, preset_light
    from comfy_diffusionrig.face.rig import FaceRig, edit_pose

    rig = FaceRig({"shape": torch.zeros(1, 100), "tex": torch.zeros(1, 50), "exp": torch.zeros(1, 50),
                   "pose": torch.zeros(1, 6), "cam": torch.ones(1, 3), "light": torch.zeros(1, 9, 3)},
                  torch.eye(3)[None], torch.zeros(1, 3), (256, 256))
    studio = EXAMPLES / "studio_key_fill.hdr"
    code, edit = _chosen_edit(monkeypatch, "--light-env", str(studio), "--env-yaw", "30", "--env-exposure", "-1")
    assert code == 0
    expected = normalize_light(sh_from_environment(load_environment(studio), yaw=30.0)) / 2
    torch.testing.assert_close(edit(rig).codes["light"][0], expected)
    code, edit = _chosen_edit(monkeypatch, "--preset-file", str(EXAMPLES.parent / "presets" / "light_rim.json"))
    torch.testing.assert_close(edit(rig).codes["light"][0], preset_light("rim"), atol=1e-6, rtol=0)
    turn = tmp_path / "turn.json"
    turn.write_text(json.dumps({"format": "comfy-diffusionrig preset", "version": 1,
                                "edit": {"head_turn": {"yaw": 12.0, "pitch": 0.0, "roll": 0.0}}}))
    code, edit = _chosen_edit(monkeypatch, "--preset-file", str(turn))
    torch.testing.assert_close(edit(rig).codes["pose"], edit_pose(rig, yaw=12.0).codes["pose"])
    turn.write_text("{")
    assert _chosen_edit(monkeypatch, "--preset-file", str(turn))[0] == 2
    assert f"{turn}: not a JSON preset file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one light source at a time
        main(["relight", str(ASTRONAUT), "--out", "x.png", "--light-env", str(studio), "--light-preset", "rim"])


def test_relight_with_the_example_environment_end_to_end(tmp_path, run_cli):
    out = tmp_path / "studio.png"
    assert run_cli("relight", str(ASTRONAUT), "--out", str(out), "--light-env", str(EXAMPLES / "studio_key_fill.hdr"),
                   "--start", "noise", "--save-buffers") == 0
    _face_only(_changed(_pixels(out), _pixels(ASTRONAUT)), ASTRONAUT_FACE)
    # the studio's warm key is at azimuth +50 (image right), its dim blue fill at -60: the face's shaded buffer
    # and the lit sphere are brighter and warmer on the right
    sphere, shaded = _pixels(tmp_path / "studio_light.png").astype(float), _pixels(tmp_path / "studio_buffers.png")
    left, right = sphere[:, :128], sphere[:, 128:]
    assert right.mean() > left.mean() + 10 and right[..., 0].mean() > right[..., 2].mean()
    shaded = shaded[:, :256].astype(float).sum(-1)
    assert shaded[:, 128:].mean() > 1.2 * shaded[:, :128].mean()


def _random_lora(checkpoint, path):
    """A LoRA for `checkpoint` whose adapters are not zero (a fresh one changes nothing)."""
    from comfy_diffusionrig import load_diffusionrig
    from comfy_diffusionrig.model.lora import inject_lora, lora_layers, save_lora

    model = load_diffusionrig(checkpoint)
    inject_lora(model, rank=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=gen) * 0.05)
    return save_lora(model, path)


def test_a_lora_changes_the_edit_and_strength_zero_is_the_checkpoint_alone(demo_models, tmp_path, run_cli):
    lora = _random_lora(pipeline.find_checkpoint(demo_models), tmp_path / "anna_lora.safetensors")
    runs = {"none": [], "zero": ["--lora", str(lora), "--lora-strength", "0"], "one": ["--lora", str(lora)]}
    pixels = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.png"
        assert run_cli("relight", str(ASTRONAUT), "--out", str(out), "--light-preset", "rim", "--start", "noise",
                       *extra) == 0
        pixels[name] = _pixels(out)
    assert np.array_equal(pixels["zero"], pixels["none"])
    assert np.abs(pixels["one"] - pixels["none"]).max() > 8


def test_find_checkpoint_skips_lora_files_and_reads_suffixes_in_any_case(demo_models, tmp_path):
    folder = tmp_path / "diffusionrig"
    folder.mkdir()
    base = pipeline.find_checkpoint(demo_models)
    _random_lora(base, folder / "a_lora.safetensors")  # named to sort first: only its content says what it is
    shutil.copy(base, folder / "b_MODEL.PT")
    shutil.copy(base.with_suffix(".json"), folder / "b_MODEL.json")
    assert pipeline.find_checkpoint(tmp_path) == folder / "b_MODEL.PT"
    (folder / "b_MODEL.PT").unlink()
    with pytest.raises(FileNotFoundError, match="no DiffusionRig checkpoint in"):
        pipeline.find_checkpoint(tmp_path)  # the LoRA alone is no checkpoint

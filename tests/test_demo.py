"""The offline demo (README's main command) in a tiny configuration: it runs end to end, learns, and reports."""

import json
from dataclasses import replace

import numpy as np
import torch

from comfy_diffusionrig.cli import main
from comfy_diffusionrig.demo.run import DemoConfig, run_demo
from comfy_diffusionrig.demo.world import World
from comfy_diffusionrig.demo.synthetic import write_flame_files

TINY = replace(DemoConfig(), subjects=3, views=4, album=4, held_out=2, stage1_steps=40, stage2_steps=4,
               sample_steps=3, stage1_batch=4, sampler_edits=2)


def test_world_photographs_a_subject_with_buffers_that_match(tmp_path):
    write_flame_files(tmp_path, seed=0)
    world = World(tmp_path, size=32, seed=0)
    subject = world.subjects(1)[0]
    photos, buffers = world.photograph(subject, world.views(3))
    assert photos.shape == (3, 3, 32, 32) and buffers.shape == (3, 9, 32, 32)
    assert float(photos.min()) >= -1 and float(photos.max()) <= 1
    face = buffers[:, 3:6].abs().sum(1) > 0  # normals are non-zero on the face
    assert 0.15 < float(face.float().mean()) < 0.9  # framed like an FFHQ crop: face fills much of it
    # where the face is, the photo follows the shaded render (marks and supersampling aside)
    rendered = buffers[:, 0:3] * 2 - 1
    inside = face[:, None].expand_as(photos)
    assert float((photos - rendered)[inside].abs().mean()) < 0.2
    other = world.subjects(1)[0]
    assert not torch.equal(world.photograph(other, world.views(1))[0], photos[:1])


def test_tiny_demo_runs_learns_and_reports(tmp_path):
    progress = []
    report = run_demo(tmp_path, TINY, progress=lambda done, total, stage, **_: progress.append((stage, done, total)))
    assert {s for s, _, _ in progress} >= {"photograph", "stage 1", "stage 2", "stage 2 (LoRA)", "edit held-out views"}
    for name in ("contact_sheet.png", "album.png", "loss_stage1.png", "loss_stage2.png", "report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list((tmp_path / "images").glob("*.png"))) == TINY.held_out * 6
    scores = report["scores (mean over held-out edits, images in [0,1])"]
    assert set(scores) == {"untrained", "stage 1 (generic)", "personalized", "personalized LoRA r8"}
    assert all(np.isfinite(v["psnr"]) and -1 <= v["ssim"] <= 1 for v in scores.values())
    assert json.loads((tmp_path / "report.json").read_text())["scores (mean over held-out edits, images in [0,1])"] \
        == scores
    assert "| personalized |" in (tmp_path / "report.md").read_text()
    samplers = report["sampler settings (personalized model)"]
    assert samplers["ddim 20 (preset official)"]["unet calls"] == 40
    assert samplers["dpmpp_2m 8 (preset fast)"]["unet calls"] == 15
    assert samplers["ddim 20 + cache 2"]["full unet calls"] == 20 and samplers["ddim 20 + cache 2"]["unet calls"] == 40
    assert all(np.isfinite(r["edit psnr"]) and np.isfinite(r["reconstruction psnr"]) for r in samplers.values())
    assert "| dpmpp_2m 8 (preset fast) | 15 (15) |" in (tmp_path / "report.md").read_text()
    losses = report["stage 1 losses"]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])  # stage 1 learns, even in 40 steps


def test_demo_command_prints_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path / "models"))  # the demo installs its models there
    assert main(["demo", "--out", str(tmp_path / "out"), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "| stage 1 (generic) |" in out and (tmp_path / "out" / "contact_sheet.png").exists()
    assert "## Try it yourself" in out and (tmp_path / "models" / "face_rigs").is_dir()


def test_licensed_files_are_told_from_the_synthetic_ones(demo_models, tmp_path):
    from comfy_diffusionrig.demo.run import real_models

    assert real_models(demo_models) is None  # our stand-ins carry SYNTHETIC_README.txt
    assert real_models(None) is None and real_models(tmp_path) is None
    for folder in ("flame", "deca"):  # the same files without the markers and under a real-looking name
        (tmp_path / folder).mkdir()
        for f in (demo_models / folder).iterdir():
            if f.name != "SYNTHETIC_README.txt":
                (tmp_path / folder / f.name).symlink_to(f)
    (tmp_path / "diffusionrig").mkdir()
    synthetic = demo_models / "diffusionrig" / "synthetic_random_diffusionrig.pt"
    (tmp_path / "diffusionrig" / "model.pt").symlink_to(synthetic)
    assert real_models(tmp_path) == tmp_path / "diffusionrig" / "model.pt"


def test_example_photos_are_relit_with_the_models_given(demo_models, tmp_path):
    from PIL import Image

    from comfy_diffusionrig.demo.run import EXAMPLE_IMAGES, EXAMPLE_LIGHTS, relight_examples

    written = relight_examples(demo_models, tmp_path, photos=[EXAMPLE_IMAGES / "astronaut.png"], steps=2)
    assert written[0] == tmp_path / "examples.png" and len(written) == 1 + len(EXAMPLE_LIGHTS)
    for path in written[1:]:
        assert Image.open(path).size == Image.open(EXAMPLE_IMAGES / "astronaut.png").size
    sheet = Image.open(written[0])
    assert sheet.width > sheet.height  # one row, a column per light plus the original


def test_an_interrupted_demo_resumes_to_the_same_result(tmp_path):
    """Stop the demo in stage 2; run it again: it resumes from the checkpoints and ends as an uninterrupted run."""
    import pytest

    from comfy_diffusionrig.demo.run import prepare_out_dir

    whole = run_demo(tmp_path / "whole", TINY)
    assert not whole["resumed"]

    def stop_in_stage_2(done, total, stage, **_):
        if stage == "stage 2" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "cut", TINY, progress=stop_in_stage_2)
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == ["config.json", "stage1.pt", "stage2.pt"]  # stage 1 whole, stage 2 up to its last step
    stages = []
    resumed = run_demo(tmp_path / "cut", TINY, progress=lambda done, total, stage, **_: stages.append((stage, done)))
    assert resumed["resumed"]
    assert ("stage 1", 1) not in stages  # stage 1 was not trained again
    key = "scores (mean over held-out edits, images in [0,1])"
    assert resumed[key] == whole[key]
    assert resumed["stage 1 losses"] == whole["stage 1 losses"]
    # a finished demo is not replaced without --overwrite; other settings or other files are not touched
    with pytest.raises(FileExistsError, match="already holds a finished demo .* --overwrite"):
        prepare_out_dir(tmp_path / "cut", TINY)
    assert not prepare_out_dir(tmp_path / "cut", TINY, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["config.json"]
    (tmp_path / "cut" / "report.json").unlink()
    with pytest.raises(FileExistsError, match="interrupted demo with other settings"):
        prepare_out_dir(tmp_path / "cut", replace(TINY, seed=1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not empty and holds no interrupted demo"):
        prepare_out_dir(tmp_path / "mine", TINY)


def test_the_report_speaks_plainly_and_quick_says_its_numbers_mean_nothing(tmp_path):
    report = run_demo(tmp_path, TINY, quick=True)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# comfy-diffusionrig offline demo\n\n**QUICK RUN")
    assert "numbers are meaningless" in report["warning"]
    scores = report["scores (mean over held-out edits, images in [0,1])"]
    gain = scores["personalized"]["psnr"] - scores["stage 1 (generic)"]["psnr"]
    assert f"by {gain:+.2f} dB" in report["verdict"] and "higher is better" in report["verdict"]
    assert report["verdict"] in text and "ground truth" in text
    assert len(scores["personalized"]["psnr per edit"]) == TINY.held_out


def test_full_unet_calls_of_a_cached_edit_are_what_the_cache_counts():
    """The demo's 'full unet calls' column against FeatureCache's own counter on a real inversion + sampling."""
    from comfy_diffusionrig.model import diffusion as D
    from comfy_diffusionrig.demo.run import _full_calls
    from comfy_diffusionrig.model.feature_cache import FeatureCache
    from comfy_diffusionrig.model.unet import DiffusionRig

    torch.manual_seed(0)
    model = DiffusionRig(replace(DemoConfig(), size=16).unet()).eval()
    x, buffers, code = torch.randn(1, 3, 16, 16), torch.rand(1, 9, 16, 16), torch.randn(1, 64)
    for sampler, steps, interval in (("ddim", 7, 3), ("dpmpp_2m", 5, 2)):
        cache = FeatureCache(model, interval)
        sample, invert = D.sampler_functions(sampler)
        with torch.no_grad():
            sample(cache, buffers, code, invert(cache, x, buffers, code, steps=steps), steps=steps)
        counts = D.sampler_step_counts(model, sampler, steps)
        assert cache.full_calls == sum(_full_calls(c, interval) for c in counts), (sampler, cache.full_calls)
        assert cache.full_calls + cache.cached_calls == sum(counts)

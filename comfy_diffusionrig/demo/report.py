"""The demo's pictures (contact sheet, album, loss curves, every edit) and its report.md, from its results."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.imaging import tensor_to_pil
from .plotting import contact_sheet, loss_curve


def save_pictures(out: Path, config, names: list[str], source: torch.Tensor, target: torch.Tensor, edits: dict,
                  results: dict, losses1: list[float], losses2: list[float], album_photos: torch.Tensor,
                  album_buffers: torch.Tensor) -> None:
    """images/ (every held-out edit of every model), contact_sheet.png, album.png and the loss curves.

    names: the models in column order (untrained, stage 1, personalized, LoRA); edits[name]: [N, 3, S, S] in [-1, 1].
    """
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    rows = []
    for i in range(config.held_out):
        row = [tensor_to_pil(source[i]), tensor_to_pil(target[i])] + [tensor_to_pil(edits[name][i]) for name in names]
        for label, picture in zip(["source", "target", "untrained", "stage1", "personalized", "lora"], row):
            picture.save(images_dir / f"edit{i:02d}_{label}.png")
        rows.append(row)
    labels = ["source photo (input)", "ground truth (true photo of the target view)", "untrained model",
              "stage 1 (generic)", "personalized", f"LoRA r{config.lora_rank}"]
    row_labels = [f"edit {i + 1}\nstage 1 {results[names[1]]['psnr per edit'][i]:.1f} dB\n"
                  f"personal {results[names[2]]['psnr per edit'][i]:.1f} dB" for i in range(config.held_out)]
    sheet = contact_sheet(rows, row_labels=row_labels, column_labels=labels, cell=128)
    sheet.save(out / "contact_sheet.png")
    loss_curve(losses1, title="stage 1 loss").save(out / "loss_stage1.png")
    loss_curve(losses2, title="stage 2 loss").save(out / "loss_stage2.png")
    album_row = [tensor_to_pil(p) for p in album_photos[:8]]
    buffer_rows = [[tensor_to_pil(b[i:i + 3] * (1 if i == 3 else 2) - (0 if i == 3 else 1)) for b in album_buffers[:8]]
                   for i in (0, 3, 6)]
    contact_sheet([album_row] + buffer_rows, row_labels=["album photos", "rendered", "normal", "albedo"],
                  cell=96).save(out / "album.png")


def report_markdown(report: dict, config, models_dir, checkpoint: Path | None, example_lights: list[str]) -> str:
    """report.md: the verdict, what was done, the score tables, the times and how to try the installed models
    (checkpoint: the user's licensed model the example photos were relit with, under example_lights)."""

    verdict, head_source = report["verdict"], report["head"]
    results = report["scores (mean over held-out edits, images in [0,1])"]
    no_edit = report["source photo as the answer (no edit)"]
    samplers = report["sampler settings (personalized model)"]
    timings = report["seconds"]
    lines = ["# comfy-diffusionrig offline demo", ""]
    if "warning" in report:
        lines += [f"**{report['warning']}**", ""]
    lines += [verdict, "",
              "What was done: a small DiffusionRig learned synthetic faces (stage 1), then was personalized on one "
              "new synthetic person's album (stage 2). Each held-out edit takes a photo of that person (the source), "
              "re-renders it under another light, expression and head pose with each model, and is scored against "
              "the true photo of that target view (the ground truth): PSNR in dB (higher is better) and SSIM "
              "(1 = identical).", "",
              "contact_sheet.png: one row per held-out edit (the row label gives that edit's PSNR for the stage-1 "
              "and the personalized model); columns: the source photo (the input), the ground truth, then the "
              "output of each model.", "",
              f"Head: {head_source}. Stage 1: {config.subjects} subjects x {config.views} photos at "
             f"{config.size}px, {config.stage1_steps} steps. Stage 2: an album of {config.album} photos of a new "
             f"subject, {config.stage2_steps} steps (full fine-tune, and LoRA rank {config.lora_rank}).",
             f"Held-out edits: {config.held_out} (invert a photo, re-render under another light, expression and "
             "pose, compare with the true photo).", "",
             "| model | PSNR (dB) | SSIM |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} |" for name, r in results.items()]
    lines += [f"| (the source photo itself) | {no_edit['psnr']:.2f} | {no_edit['ssim']:.3f} |", "",
              f"Sampler settings, on the personalized model and {config.sampler_edits} more held-out edits (UNet "
              "calls per edit, inversion + sampling; edit PSNR/SSIM against the ground truth; reconstruction: "
              "invert, then sample under the same buffers):", "",
              "| setting | UNet calls (full) | edit PSNR (dB) | vs official | edit SSIM | reconstruction PSNR (dB) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    official = next(iter(samplers.values()))
    lines += [f"| {name} | {r['unet calls']} ({r['full unet calls']}) | {r['edit psnr']:.2f} | "
              f"{r['edit psnr'] - official['edit psnr']:+.2f} | {r['edit ssim']:.3f} | {r['reconstruction psnr']:.2f} |"
              for name, r in samplers.items()]
    lines += ["",
              "Time (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())
              + f"; total {report['total_seconds']}", "",
              "Files: contact_sheet.png (rows: held-out edits), album.png, images/, loss_stage1.png, "
              "loss_stage2.png, report.json."]
    installed = report.get("installed")
    if installed:
        lines += ["", "## Try it yourself", "",
                  "The demo's models, trained on synthetic faces only, are now in the models folder: "
                  + ", ".join(Path(p).name for p in installed["models"]) + "."]
        if installed["photos"]:
            photo = installed["photos"][0]
            sweep = report["light sweep"]
            lines += [f"Rigged photos of the demo's person (each carries its true rig, so no face fitting is "
                      f"needed) are in {Path(photo).parent}/. light_sweep.png shows the personalized model "
                      "relighting one of them with the key light moving from image left to image right. "
                      + sweep["verdict"] + " Face brightness, right half minus left half: "
                      + ", ".join(f"{a:+.0f} deg: {b:+.3f}" for a, b in
                                  zip(sweep["azimuth (deg, + = from image right)"],
                                      sweep["face brightness right half minus left half"])) + ".", "",
                      "The same from the command line:", "",
                      f"    comfy-diffusionrig relight {photo} --models {models_dir} --checkpoint {sweep['model']} "
                      "--light-preset rembrandt --out relit.png",
                      f"    comfy-diffusionrig sweep {photo} --models {models_dir} --checkpoint {sweep['model']} "
                      "--light-azimuth=-60:60 --frames 8 --out sweep/", "",
                      "and in ComfyUI: workflows/relight_demo_person.json (the demo's models folder must be "
                      "ComfyUI's models folder, or listed in extra_model_paths.yaml)."]
        if installed["skipped"]:
            lines += ["", f"No rigged photos were written: {installed['skipped']}."]
    if checkpoint is not None:
        lines += ["", f"Example photos relit with your {checkpoint.name}: examples.png (rows: photos; columns: "
                  + ", ".join(example_lights) + ") and examples/ (whole photos)."]
    return "\n".join(lines) + "\n"

"""The offline demo: proves, with no licensed file and no GPU, that the whole system works and learns.

1. A synthetic world: FLAME-format heads (our synthetic head, or the real FLAME files when
   the user has them), each subject with its own shape, FLAME texture and personal marks
   that the 50-component texture model cannot express (as real moles, freckles or make-up),
   on its own background; photographed under many lights, expressions and poses.
2. Stage 1: a small DiffusionRig trained from scratch on many subjects (buffers rendered from
   the codes, as DECA would give them: no personal marks in the albedo).
3. Stage 2: personalized on an album of one new subject (full fine-tune, and LoRA).
4. Held-out edits of that subject: invert a held-out photo, re-render it under another light
   and pose, score against the ground-truth photo (PSNR, SSIM) for every model.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..face.deca import FLAME_FILES
from ..editing import edit_faces, encode_faces, invert_faces
from ..core.imaging import pil_to_tensor, tensor_to_pil
from ..core.progress import Callback, in_stage, notify
from ..face.lighting import sh_from_direction
from .metrics import psnr, ssim
from ..pipeline import find_checkpoint
from .plotting import contact_sheet
from ..face.rig import FaceRig
from .report import report_markdown, save_pictures
from .synthetic import write_flame_files
from .world import World
from ..train.loop import TrainConfig, TrainingData, train
from ..model.unet import DiffusionRig, UNetConfig

EXAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "example_images"


@dataclass(frozen=True)
class DemoConfig:
    size: int = 32  # image size of the demo model (px)
    subjects: int = 24  # stage-1 training subjects
    views: int = 12  # photos per stage-1 subject
    album: int = 20  # photos of the personal subject (the paper: about 20)
    held_out: int = 8  # held-out edits scored per model
    sampler_edits: int = 48  # held-out edits scoring each sampler setting on the personalized model
    stage1_steps: int = 1500
    stage1_lr: float = 3e-4
    stage1_batch: int = 8
    stage2_steps: int = 300
    stage2_lr: float = 5e-5
    lora_rank: int = 8
    lora_lr: float = 1e-3
    sample_steps: int = 20  # DDIM steps (official 20)
    seed: int = 0

    def unet(self) -> UNetConfig:
        return UNetConfig(image_size=self.size, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                          attention_resolutions=(self.size // 4,), num_head_channels=16, dropout=0.0)


def _licensed(folder: Path, files) -> bool:
    """All of `files` are in folder and it is not one of our synthetic stand-ins (SYNTHETIC_README.txt)."""
    return all((folder / f).is_file() for f in files) and not (folder / "SYNTHETIC_README.txt").exists()


def _flame_dir(models_dir: Path | None, work: Path, seed: int) -> tuple[Path, str]:
    """The FLAME files of models_dir/flame when all four are there (the licensed ones, or the stand-ins of
    `demo-assets`: the demo's person is then rendered with the head the CLI and ComfyUI load), else
    synthetic ones written into the work folder."""
    if models_dir is not None:
        user = Path(models_dir) / "flame"
        if _licensed(user, FLAME_FILES):
            return user, f"FLAME files from {user}"
        if all((user / f).is_file() for f in FLAME_FILES):
            return user, f"the synthetic FLAME-format head in {user} (`comfy-diffusionrig demo-assets`)"
    target = work / "synthetic_flame"
    if not all((target / f).is_file() for f in FLAME_FILES):
        write_flame_files(target, seed=seed)
    return target, "the synthetic FLAME-format head of `comfy-diffusionrig demo-assets`"


def real_models(models_dir: str | Path | None) -> Path | None:
    """The DiffusionRig checkpoint of models_dir when the licensed files are all there (not our
    synthetic stand-ins): FLAME files, deca_model.tar and a non-synthetic checkpoint."""
    if models_dir is None:
        return None
    root = Path(models_dir)
    if not _licensed(root / "flame", FLAME_FILES) or not _licensed(root / "deca", ["deca_model.tar"]):
        return None
    try:
        checkpoint = find_checkpoint(root)
    except FileNotFoundError:
        return None
    return None if "synthetic" in checkpoint.name else checkpoint


EXAMPLE_LIGHTS = {"light from the left": dict(azimuth_deg=-60.0, elevation_deg=15.0),
                  "light from the right": dict(azimuth_deg=60.0, elevation_deg=15.0),
                  "light from above": dict(azimuth_deg=0.0, elevation_deg=70.0)}


def relight_examples(models_dir: str | Path, out_dir: str | Path, photos: list[Path] | None = None,
                     checkpoint: str | None = None, steps: int = 20, device="cpu",
                     progress: Callback | None = None) -> list[Path]:
    """Relight the example portraits under EXAMPLE_LIGHTS with the models of models_dir.

    Writes out_dir/examples/<photo>_<light>.png (the whole photo with the face pasted back)
    and out_dir/examples.png (rows: photos; columns: aligned original, then each light).
    """
    from ..photo.loading import load_image
    from ..pipeline import edit_photo, load_models

    photos = photos if photos is not None else [EXAMPLE_IMAGES / "astronaut.png", EXAMPLE_IMAGES / "grace_hopper.jpg"]
    models = load_models(models_dir, checkpoint, device=device)
    folder = Path(out_dir) / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    lights = torch.stack([sh_from_direction(**v, intensity=0.9, ambient=0.45) for v in EXAMPLE_LIGHTS.values()])
    written, rows = [], []
    report = functools.partial(notify, progress, stage="relight example photos")
    for i, path in enumerate(photos):
        report(i, len(photos))
        photo = load_image(path)
        result = edit_photo(models, photo, lambda rig: rig.expand(len(lights)).with_light(lights), steps=steps)
        rows.append([result.aligned[0], *result.faces])
        for name, picture in zip(EXAMPLE_LIGHTS, result.photos):
            target = folder / f"{Path(path).stem}_{name.replace(' ', '_')}.png"
            picture.save(target)
            written.append(target)
    report(len(photos), len(photos))
    sheet = Path(out_dir) / "examples.png"
    contact_sheet(rows, column_labels=["aligned photo", *EXAMPLE_LIGHTS], cell=160).save(sheet)
    return [sheet, *written]


DEMO_PERSON_PHOTOS = 4  # rigged photos of the demo's person written into models/face_rigs/


def demo_file_names(config: DemoConfig, quick: bool = False) -> dict[str, str]:
    """Names of what the demo installs in the models folder (a --quick run's names say so)."""
    tag = "synthetic_demo_quick" if quick else "synthetic_demo"
    return {"personalized": f"{tag}_personalized_{config.size}px.safetensors",
            "stage 1": f"{tag}_stage1_{config.size}px.safetensors",
            "person": f"{tag}_person_{{}}.png"}


def install_demo(models_dir: str | Path, config: DemoConfig, flame_dir: Path, stage1: DiffusionRig,
                 personal: DiffusionRig, photos: torch.Tensor, rig: FaceRig, quick: bool = False) -> dict:
    """Put the demo's models and its person where the CLI and ComfyUI find them, so that without any licensed
    file an edit shows something real: models_dir/diffusionrig/synthetic_demo_{personalized,stage1}_<S>px
    .safetensors (trained on synthetic faces only), models_dir/face_rigs/synthetic_demo_person_<k>.png
    (held-out photos of the person with their true rigs: the random DECA stand-in cannot fit them), and,
    where missing, the stand-ins loading needs (the demo's FLAME-format head in flame/, a random DECA in
    deca/). Files named synthetic_demo_* are the demo's own and are replaced by a newer run.

    Returns {"models": [...], "photos": [...], "stand-ins": [...], "skipped": reason or None}.
    """
    from ..model.checkpoints import save_diffusionrig
    from ..face.rig_files import save_rigged_photo
    from .synthetic import SYNTHETIC_NOTE, write_deca_checkpoint
    from .synthetic_head import make_head

    root = Path(models_dir)
    names = demo_file_names(config, quick)
    done = {"models": [], "photos": [], "stand-ins": [], "skipped": None}
    note = {"comfy-diffusionrig": "the offline demo's model, trained on SYNTHETIC faces only (not a real model)"}
    for key, net in (("personalized", personal), ("stage 1", stage1)):
        done["models"].append(save_diffusionrig(net, root / "diffusionrig" / names[key], overwrite=True,
                                                extra_metadata=note))
    flame = root / "flame"
    present = [f for f in FLAME_FILES if (flame / f).exists()]
    if flame_dir.resolve() != flame.resolve():
        if present:  # another (partial) FLAME there: the person's rigs would not fit what loads
            done["skipped"] = (f"{flame} holds only {', '.join(present)} of the four FLAME files; complete it (or "
                               "empty it) and run the demo again for the rigged photos of its person")
            return done
        flame.mkdir(parents=True, exist_ok=True)
        for name in FLAME_FILES:
            (flame / name).write_bytes((flame_dir / name).read_bytes())
            done["stand-ins"].append(flame / name)
        (flame / "SYNTHETIC_README.txt").write_text(SYNTHETIC_NOTE)
    deca = root / "deca" / "deca_model.tar"
    if not deca.exists():
        done["stand-ins"].append(write_deca_checkpoint(deca, config.seed, head=make_head(config.seed)))
        (deca.parent / "SYNTHETIC_README.txt").write_text(SYNTHETIC_NOTE)
    for k in range(min(DEMO_PERSON_PHOTOS, len(rig))):
        done["photos"].append(save_rigged_photo(root / "face_rigs" / names["person"].format(k + 1),
                                                tensor_to_pil(photos[k]), rig, index=k, overwrite=True))
    return done


SWEEP_AZIMUTHS = (-60.0, -30.0, 0.0, 30.0, 60.0)


def side_balance(faces: torch.Tensor, coverage: torch.Tensor) -> list[float]:
    """Per image: mean brightness of the face's image-right half minus its image-left half.

    faces [N, 3, S, S] in [0, 1]; coverage [N, 1, S, S] (> 0 on the face). A key light from image
    right (positive azimuth) makes it positive."""
    brightness, mask, half = faces.mean(1), coverage[:, 0] > 0, faces.shape[-1] // 2
    out = []
    for b, m in zip(brightness, mask):
        right, left = b[:, half:][m[:, half:]], b[:, :half][m[:, :half]]
        out.append(float(right.mean() - left.mean()) if len(right) and len(left) else float("nan"))
    return out


def light_sweep(models_dir: str | Path, out: Path, checkpoint: Path, photo: Path, steps: int) -> dict:
    """Relight the demo's person (a rigged photo) with the installed personalized model under a key light
    moving from image left to image right (`--light azimuth=A` of `comfy-diffusionrig relight`, on the same
    library path); write light_sweep.png and measure that the light moves: the face's right-half minus
    left-half brightness for each azimuth."""
    from ..photo.loading import load_image
    from ..pipeline import edit_photo, load_models
    from ..face.rig_files import read_rig

    models = load_models(models_dir, checkpoint.name)
    lights = torch.stack([sh_from_direction(a, 15.0, intensity=0.9, ambient=0.45) for a in SWEEP_AZIMUTHS]).float()
    result = edit_photo(models, load_image(photo), lambda rig: rig.expand(len(lights)).with_light(lights),
                        steps=steps, rig=read_rig(photo))
    balance = [round(v, 3) for v in side_balance(pil_to_tensor(result.faces), result.coverage)]
    cells = [[result.aligned[0], *result.faces]]
    contact_sheet(cells, column_labels=["demo person", *(f"light {a:+.0f} deg" for a in SWEEP_AZIMUTHS)],
                  cell=128).save(out / "light_sweep.png")
    rise = balance[-1] - balance[0]
    verdict = (f"The light moves: the lit side of the face follows the key light (the right-minus-left "
               f"brightness rises by {rise:+.3f} from -60 to +60 deg)." if rise > 0.05 else
               f"The light barely moves (right-minus-left brightness {rise:+.3f} from -60 to +60 deg): this model "
               "has not learned enough (a --quick run trains a few steps only).")
    return {"model": checkpoint.name, "photo": str(photo), "azimuth (deg, + = from image right)": list(SWEEP_AZIMUTHS),
            "face brightness right half minus left half": balance, "verdict": verdict}


# sampler settings the demo scores on its personalized model: every named preset, and the settings between
# them that show where quality falls off (name: sampler, steps, cache interval)
def sampler_settings() -> dict[str, tuple[str, int, int]]:
    from ..model.sampler_presets import SAMPLING_PRESETS

    named = {f"{p['sampler']} {p['steps']}" + (f" + cache {p['cache_interval']}" if p["cache_interval"] > 1 else "")
             + f" (preset {name})": (p["sampler"], p["steps"], p["cache_interval"])
             for name, p in SAMPLING_PRESETS.items()}
    others = {"ddim 10": ("ddim", 10, 1), "ddim 20 + cache 2": ("ddim", 20, 2), "dpmpp_2m 10": ("dpmpp_2m", 10, 1),
              "dpmpp_2m 8": ("dpmpp_2m", 8, 1), "dpmpp_2m 7": ("dpmpp_2m", 7, 1), "dpmpp_2m 6": ("dpmpp_2m", 6, 1),
              "dpmpp_2m 10 + cache 2": ("dpmpp_2m", 10, 2)}
    return {**named, **{k: v for k, v in others.items() if v not in named.values()}}


def score_samplers(model: DiffusionRig, source: torch.Tensor, source_buffers: torch.Tensor, target: torch.Tensor,
                   target_buffers: torch.Tensor) -> dict[str, dict]:
    """Per sampler setting, on held-out photos: the edit's PSNR/SSIM against the true photo of the target view,
    the reconstruction PSNR (invert, then sample under the same buffers) and the UNet calls per edit (full
    evaluations, and all of them with feature caching). Each setting inverts the photos once (`invert_faces`)
    and samples both from that start (`edit_faces`: bit for bit the edit that inverts itself)."""
    from ..model.diffusion import sampler_step_counts

    code = encode_faces(model, source)
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    out = {}
    for name, (sampler, steps, interval) in sampler_settings().items():
        settings = dict(steps=steps, sampler=sampler, cache_interval=interval, batch_size=len(source))
        start = invert_faces(model, source, source_buffers, code, **settings)
        edited, rebuilt = (edit_faces(model, None, None, buffers, code, start=start, **settings)
                           for buffers in (target_buffers, source_buffers))
        counts = sampler_step_counts(model, sampler, steps)  # (inversion, sampling)
        out[name] = {"edit psnr": round(float(psnr(to01(edited), to01(target)).mean()), 2),
                     "edit ssim": round(float(ssim(to01(edited), to01(target)).mean()), 3),
                     "reconstruction psnr": round(float(psnr(to01(rebuilt), to01(source)).mean()), 2),
                     "unet calls": sum(counts), "full unet calls": sum(_full_calls(c, interval) for c in counts)}
    return out


def _full_calls(calls: int, interval: int) -> int:
    """Full UNet evaluations of a run of `calls` calls with the deep features reused between (first of every
    `interval` calls full)."""
    return -(-calls // interval)


def _edit(model: DiffusionRig, source: torch.Tensor, source_buffers: torch.Tensor, target_buffers: torch.Tensor,
          steps: int) -> torch.Tensor:
    """The artist's edit (`edit_faces`): each source photo inverted under its buffers, denoised under the target's."""
    return edit_faces(model, source, source_buffers, target_buffers, encode_faces(model, source), steps=steps, batch_size=len(source))


def _checkpoint_every(steps: int) -> int:
    """About 10 checkpoints per stage (an interrupted run loses at most a tenth of a stage), at least 50 steps
    apart: a stage-1 checkpoint holds the encoder and Adam's moments (~140 MB), and tiny runs need no more
    than the one written at the end (or at an interruption)."""
    return max(50, steps // 10)


QUICK_WARNING = ("QUICK RUN: a plumbing check with a few training steps; its numbers are meaningless. Run "
                 "`comfy-diffusionrig demo` without --quick for the real comparison.")


def prepare_out_dir(out: Path, config: DemoConfig, overwrite: bool = False) -> bool:
    """Make out ready for a run of `config`; True when an interrupted run of the same config resumes.

    A folder with a finished demo (report.json), a run of another config, or other files is
    refused unless overwrite (then the old run's checkpoints are dropped and it starts afresh).
    """
    state = out / "checkpoints"
    settings = json.dumps(asdict(config), sort_keys=True)
    if overwrite:
        for old in state.glob("*") if state.is_dir() else []:
            old.unlink()
    elif out.exists() and any(out.iterdir()):
        if (out / "report.json").exists():
            raise FileExistsError(f"{out} already holds a finished demo (report.md); pass --overwrite to run it again "
                                  "or choose another --out")
        if not (state / "config.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no interrupted demo; choose another --out (or pass "
                                  "--overwrite to write into it)")
        if (state / "config.json").read_text() != settings:
            raise FileExistsError(f"{out} holds an interrupted demo with other settings (--quick or --seed differ); "
                                  "run it with the same settings to resume, or pass --overwrite to start afresh")
        return True
    state.mkdir(parents=True, exist_ok=True)
    (state / "config.json").write_text(settings)
    return False


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), models_dir: str | Path | None = None,
             progress: Callback | None = None, overwrite: bool = False, quick: bool = False) -> dict:
    """Run the whole demo, write images, a contact sheet and a report into out_dir; returns the report.

    Each training stage checkpoints into out_dir/checkpoints/ as it goes: an interrupted run,
    started again with the same settings, resumes where it stopped (bit for bit). quick marks
    the report as a plumbing check whose numbers mean nothing. progress(done, total, stage=)
    (`core.progress`) counts each stage on its own; raise in it to stop (a later run resumes).
    """
    out = Path(out_dir)
    resumed = prepare_out_dir(out, config, overwrite)
    state = out / "checkpoints"
    def report_progress(stage: str, done: int, total: int) -> None:
        notify(progress, done, total, stage=stage)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    flame_dir, head_source = _flame_dir(None if models_dir is None else Path(models_dir), out, config.seed)
    world = World(flame_dir, config.size, config.seed)
    report_progress("photograph", 0, config.subjects + 1)
    crowd = world.subjects(config.subjects)
    images, buffers = [], []
    for i, subject in enumerate(crowd):
        photo, buf = world.photograph(subject, world.views(config.views))
        images.append(photo)
        buffers.append(buf)
        report_progress("photograph", i + 1, config.subjects + 1)
    person = world.subjects(1)[0]
    album_photos, album_buffers = world.photograph(person, world.views(config.album))
    held_views = world.views(2 * config.held_out)
    held_photos, held_buffers = world.photograph(person, held_views)
    person_rig = world.rig(person, held_views[0::2])  # the true rigs of the source photos
    sampler_photos, sampler_buffers = world.photograph(person, world.views(2 * config.sampler_edits))
    source, target = held_photos[0::2], held_photos[1::2]
    source_buffers, target_buffers = held_buffers[0::2], held_buffers[1::2]
    report_progress("photograph", config.subjects + 1, config.subjects + 1)
    t = lap("photograph", start)

    torch.manual_seed(config.seed)
    model = DiffusionRig(config.unet())
    untrained = DiffusionRig(config.unet()).eval()
    untrained.load_state_dict(model.state_dict())
    stage1 = TrainConfig(steps=config.stage1_steps, lr=config.stage1_lr, batch_size=config.stage1_batch,
                         seed=config.seed, precision="fp32", train_encoder=True,
                         checkpoint_every=_checkpoint_every(config.stage1_steps))
    model, losses1 = train(model, TrainingData(torch.cat(images), torch.cat(buffers)), stage1,
                           checkpoint_path=state / "stage1.pt",
                           callback=in_stage(progress, "stage 1"))
    t = lap("stage 1", t)

    album = TrainingData(album_photos, album_buffers)

    def personalize(stage: str, lr: float, lora_rank: int = 0):
        """Stage 2 on a copy of the stage-1 model (encoder frozen)."""
        copy = DiffusionRig(config.unet())
        copy.load_state_dict(model.state_dict())
        settings = TrainConfig(steps=config.stage2_steps, lr=lr, batch_size=4, seed=config.seed + 1, precision="fp32",
                               lora_rank=lora_rank, checkpoint_every=_checkpoint_every(config.stage2_steps))
        name = f"stage2_lora{lora_rank}.pt" if lora_rank else "stage2.pt"
        return train(copy, album, settings, checkpoint_path=state / name,
                     callback=in_stage(progress, stage))

    personal, losses2 = personalize("stage 2", config.stage2_lr)
    t = lap("stage 2", t)
    lora, _ = personalize("stage 2 (LoRA)", config.lora_lr, config.lora_rank)
    t = lap("stage 2 LoRA", t)

    candidates = {"untrained": untrained, "stage 1 (generic)": model.eval(), "personalized": personal,
                  f"personalized LoRA r{config.lora_rank}": lora}
    results, edits = {}, {}
    for k, (name, net) in enumerate(candidates.items()):
        report_progress("edit held-out views", k, len(candidates))
        edited = _edit(net, source, source_buffers, target_buffers, config.sample_steps)
        edits[name] = edited
        gt, got = (target + 1) / 2, (edited.clamp(-1, 1) + 1) / 2
        per_edit = psnr(got, gt)
        results[name] = {"psnr": float(per_edit.mean()), "ssim": float(ssim(got, gt).mean()),
                         "psnr per edit": [round(float(v), 2) for v in per_edit]}
    report_progress("edit held-out views", len(candidates), len(candidates))
    report_progress("score sampler settings", 0, 1)
    samplers = score_samplers(personal, sampler_photos[0::2], sampler_buffers[0::2], sampler_photos[1::2],
                              sampler_buffers[1::2])
    report_progress("score sampler settings", 1, 1)
    no_edit = {"psnr": float(psnr((source + 1) / 2, (target + 1) / 2).mean()),
               "ssim": float(ssim((source + 1) / 2, (target + 1) / 2).mean())}
    lap("edits", t)

    save_pictures(out, config, list(candidates), source, target, edits, results, losses1, losses2, album_photos,
                  album_buffers)

    gain = results["personalized"]["psnr"] - results["stage 1 (generic)"]["psnr"]
    lora_gain = results[f"personalized LoRA r{config.lora_rank}"]["psnr"] - results["stage 1 (generic)"]["psnr"]
    verdict = (f"Personalization {'improves' if gain > 0 else 'does not improve'} held-out edits by {gain:+.2f} dB "
               f"PSNR over the generic stage-1 model (LoRA: {lora_gain:+.2f} dB); higher is better. In "
               "contact_sheet.png compare the personalized column with the ground truth: skin tone, the "
               "subject's own marks and the background colours are what personalization should get right.")
    report = {"verdict": verdict, "config": asdict(config), "head": head_source, "seconds": timings,
              "resumed": resumed,
              "total_seconds": round(time.perf_counter() - start, 1),
              "scores (mean over held-out edits, images in [0,1])": results,
              "source photo as the answer (no edit)": no_edit,
              "sampler settings (personalized model)": samplers,
              "stage 1 final loss (mean of last 10%)": float(np.mean(losses1[-max(1, len(losses1) // 10):])),
              "stage 2 final loss (mean of last 10%)": float(np.mean(losses2[-max(1, len(losses2) // 10):])),
              "stage 1 losses": [round(float(v), 5) for v in losses1]}
    if models_dir is not None:
        t = time.perf_counter()
        installed = install_demo(models_dir, config, flame_dir, model, personal, source, person_rig, quick)
        report["installed"] = {k: [str(p) for p in v] if isinstance(v, list) else v for k, v in installed.items()}
        if installed["photos"]:
            report["light sweep"] = light_sweep(models_dir, out, installed["models"][0], installed["photos"][0],
                                                config.sample_steps)
        lap("install and light sweep", t)
    checkpoint = real_models(models_dir)
    if checkpoint is not None:  # the licensed files are there: show them on the example photos too
        t = time.perf_counter()
        relight_examples(models_dir, out, checkpoint=checkpoint.name, steps=config.sample_steps, progress=progress)
        lap("relight example photos", t)
        report["examples"] = f"the example photos relit with {checkpoint.name}: examples.png, examples/"
        report["total_seconds"] = round(time.perf_counter() - start, 1)
    if quick:
        report["warning"] = QUICK_WARNING
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report, config, models_dir, checkpoint,
                                                          list(EXAMPLE_LIGHTS)))
    return report

"""`comfy-diffusionrig` command line: scripting without ComfyUI."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .core.conventions import MODELS_DEFAULT, MODELS_ENV, PHOTO_SUFFIXES, default_models_dir
from .core.progress import in_stage
from .face.presets import LIGHT_PRESETS
from .photo.paste import DEFAULT_DETAIL, DEFAULT_DETAIL_RADIUS, DETAIL_MODES, check_detail
from .model.sampler_presets import SAMPLER_NAMES, SAMPLING_PRESETS


def _cmd_info(args) -> int:
    from .model.checkpoints import load_diffusionrig

    model = load_diffusionrig(args.model, config=_read_config(args.config))
    unet = sum(p.numel() for p in model.denoisingUNet.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    print(json.dumps({"config": model.config.to_dict(), "params_unet": unet, "params_encoder": encoder}, indent=1))
    return 0


def _cmd_convert(args) -> int:
    from .model.checkpoints import load_diffusionrig, save_diffusionrig

    _check_new(Path(args.out), args.overwrite)
    model = load_diffusionrig(args.model, config=_read_config(args.config))
    out = save_diffusionrig(model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype or 'original precision'})")
    return 0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Bar:
    """A progress callback (`core.progress`) that draws on stderr, `stage [#####.....] done/total  elapsed
    ETA` per stage (its `stage` field).

    On a terminal one line is redrawn in place; when the output is redirected (a log file, CI)
    a stage prints a new line only at each tenth of its work, so a log stays readable.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self.stage = None
        self.start = self.stage_start = time.perf_counter()
        self.shown = -1  # tenths of the stage already printed (redirected output)

    def __call__(self, done: int, total: int, stage: str = "", **_) -> None:
        now = time.perf_counter()
        if stage != self.stage:
            if self.stage is not None and self.live:
                self.stream.write("\n")
            self.stage, self.stage_start, self.shown = stage, now, -1
        total = max(total, 1)
        if done >= total:
            eta = "done"
        elif done > 0:
            eta = "ETA " + _clock((now - self.stage_start) / done * (total - done))
        else:
            eta = "ETA --"
        filled = int(30 * min(done, total) / total)
        line = (f"{stage:<22} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}  "
                f"{_clock(now - self.start)} elapsed  {eta}")
        if self.live:
            self.stream.write("\r" + line + "   ")
        else:
            tenth = 10 * min(done, total) // total
            if tenth == self.shown:
                return
            self.shown = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None and self.live:
            self.stream.write("\n")


def _cmd_demo_assets(args) -> int:
    from .demo.synthetic import write_demo_assets

    out = Path(args.out)
    written = write_demo_assets(out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote synthetic stand-ins (not FLAME, not DECA, not DiffusionRig weights, not a trained upscaler) "
          f"into {out}:")
    for path in written.values():
        print(f"  {path}")
    print(f"copy (or point extra_model_paths.yaml at) {out}/flame, {out}/deca, {out}/diffusionrig and "
          f"{out}/upscale_models as ComfyUI/models/flame, models/deca, models/diffusionrig and models/upscale_models")
    return 0


def _cmd_prepare_data(args) -> int:
    from .train.prepare import PrepareConfig, parse_shard, prepare_data

    root = Path(args.models) if args.models else default_models_dir()
    config = PrepareConfig(size=args.size, min_face=args.min_face, detector=args.detector,
                           mean_shape=args.mean_shape, shard_size=args.shard_size)
    manifest = prepare_data(args.photos, args.out, root / "deca" / "deca_model.tar", root / "flame", config,
                            workers=args.workers, shard=parse_shard(args.shard), models_dir=str(root))
    print(f"{args.out}: {manifest['kept']} faces from {manifest['photos']} photos, {len(manifest['rejected'])} "
          f"rejected (see manifest.json); {manifest['shards_done']}/{manifest['shards_total']} shards done")
    return 0


def _cmd_demo(args) -> int:
    from dataclasses import replace

    from .demo.run import DemoConfig, run_demo

    config = DemoConfig(seed=args.seed)
    if args.quick:
        config = replace(config, subjects=4, views=4, album=6, held_out=2, stage1_steps=30, stage2_steps=10,
                         sample_steps=5, sampler_edits=2)
    bar = _Bar()
    try:
        report = run_demo(args.out, config, models_dir=args.models or default_models_dir(), progress=bar,
                          overwrite=args.overwrite, quick=args.quick)
    finally:
        bar.close()
    print(Path(args.out, "report.md").read_text())
    resumed = " (resumed an interrupted run from its checkpoints)" if report.get("resumed") else ""
    print(f"total {report['total_seconds']} s{resumed}; images in {args.out}")
    return 0


LIGHT_KEYS = {"azimuth": "degrees, + = from image right", "elevation": "degrees, + = from above",
              "intensity": "strength of the key light, e.g. 0.8", "ambient": "fill level, e.g. 0.5",
              "color": "hex colour like #FFE0C0"}


def _photos(path: str) -> list[Path]:
    source = Path(path)
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in folder {source}")
        return found
    if not source.is_file():
        raise FileNotFoundError(f"photo {source} not found")
    return [source]


def _parse_light(text: str) -> dict:
    """'azimuth=45,elevation=20,intensity=0.8,ambient=0.5,color=#FFE0C0' -> keyword arguments."""
    from .core.imaging import hex_color

    form = "write e.g. --light azimuth=45,elevation=20,intensity=0.8,ambient=0.5,color=#FFE0C0"
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if key not in LIGHT_KEYS:
            raise ValueError(f"--light: cannot read {part!r}: unknown key {key!r}; the keys are "
                             f"{', '.join(LIGHT_KEYS)}; {form}")
        if not sep or not value:
            raise ValueError(f"--light: {key!r} has no value ({LIGHT_KEYS[key]}); {form}")
        if key == "color":
            hex_color(value)
            values[key] = value
            continue
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--light: {key}={value!r} is not a number ({LIGHT_KEYS[key]}); {form}") from None
    return values


def _preset_name(text: str) -> str:
    """A light preset name, case- and separator-insensitive ('Golden_Hour' -> 'golden hour')."""
    key = " ".join(text.replace("_", " ").replace("-", " ").lower().split())
    if key not in LIGHT_PRESETS:
        raise argparse.ArgumentTypeError(f"unknown light preset {text!r}; choose one of {', '.join(LIGHT_PRESETS)}")
    return key


def _range(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"a sweep range is START:END (e.g. -60:60), got {text!r}")
    return float(start), float(end)


def _outputs(out: Path, photo: Path, suffix: str, frames: int, many: bool, video: str | None,
             save_buffers: bool = False) -> dict:
    """Where the edit of one photo goes: "images" (one per frame), "gif" and "mp4" (sweeps), "pattern",
    and with --save-buffers "buffers" and "light" (the rendered buffers and the lit sphere of each output)."""
    if not many:
        plan = {"images": [out], "gif": None, "mp4": None}
    elif frames == 1:
        plan = {"images": [out / f"{photo.stem}_{suffix}.png"], "gif": None, "mp4": None}
    else:
        stem = f"{photo.stem}_{suffix}"
        plan = {"images": [out / f"{stem}_{k:04d}.png" for k in range(frames)], "gif": out / f"{stem}.gif",
                "mp4": out / f"{stem}.mp4" if video else None, "pattern": out / f"{stem}_%04d.png"}
    plan["buffers"] = [i.with_name(f"{i.stem}_buffers.png") for i in plan["images"]] if save_buffers else []
    plan["light"] = [i.with_name(f"{i.stem}_light.png") for i in plan["images"]] if save_buffers else []
    return plan


def _check_run(args) -> None:
    """The settings every edit command shares, checked before any model is loaded."""
    from .core.devices import resolve_device
    from .editing import check_edit_settings

    preset = SAMPLING_PRESETS.get(args.preset or "official")
    args.sampler = args.sampler or preset["sampler"]
    args.steps = args.steps if args.steps is not None else preset["steps"]
    args.cache = args.cache if args.cache is not None else preset["cache_interval"]
    check_edit_settings(args.start, args.steps, 0.0, 4, args.sampler, args.cache)
    try:
        check_detail(args.detail, args.detail_radius)
    except ValueError as err:
        raise ValueError(f"--detail / --detail-radius: {err}") from None
    for name in ("frames", "fps"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    args.device = str(resolve_device(args.device))


def _run_edits(args, make_edit, suffix: str) -> int:
    from .photo.detection import NoFaceError
    from .photo.loading import load_image
    from .pipeline import edit_photo, load_models
    from .face.rig_files import read_rig

    _check_run(args)
    photos = _photos(args.photo)
    out = Path(args.out)
    frames = getattr(args, "frames", 1)
    many = len(photos) > 1 or frames > 1
    if not many and out.suffix.lower() not in PHOTO_SUFFIXES:
        raise ValueError(f"--out {out} should be an image file name (e.g. out.png) for one photo")
    video = video_writer() if frames > 1 else None
    if frames > 1 and video is None:
        print("ffmpeg is not on the PATH: writing the PNG frames and the GIF, no MP4", file=sys.stderr)
    plans = [_outputs(out, photo_path, suffix, frames, many, video, args.save_buffers) for photo_path in photos]
    for plan in plans:  # existing outputs: say so before minutes of sampling, not after
        for path in [*plan["images"], plan["gif"], plan["mp4"], *plan["buffers"], *plan["light"]]:
            if path is not None:
                _check_new(path, args.overwrite)
    models = load_models(args.models, args.checkpoint, device=args.device, dtype=args.precision, lora=args.lora,
                         lora_strength=args.lora_strength)
    edit = make_edit(models)
    if many:
        out.mkdir(parents=True, exist_ok=True)
    bar = _Bar()
    skipped = []
    try:
        for photo_path, plan in zip(photos, plans):
            try:
                rig = read_rig(photo_path)  # a rigged photo (Save Face Rig, the demo's person): no align, no fit
                result = edit_photo(models, load_image(photo_path), edit, steps=args.steps, seed=args.seed,
                                    start=args.start, faces=args.faces, detector=args.detector,
                                    color_match=args.color_match, sampler=args.sampler, cache_interval=args.cache,
                                    callback=in_stage(bar, photo_path.name),
                                    rig=rig, detail=args.detail, detail_radius=args.detail_radius)
            except NoFaceError:
                if not many:
                    raise NoFaceError(f"no face found in {photo_path} (detector {args.detector}); try --detector "
                                      "cnn (profiles, small or dark faces) or a photo with a clearly visible face")
                skipped.append(photo_path.name)
                continue
            for path, image in zip(plan["images"], result.photos):
                _save_new(image, path, args.overwrite)
            if args.save_buffers:
                _save_buffers(result, plan, args.overwrite)
            if plan["gif"] is not None:
                first, rest = result.photos[0], result.photos[1:]
                _write_new(plan["gif"], lambda tmp: first.save(tmp, format="GIF", save_all=True, loop=0,
                                                                append_images=rest, duration=1000 // args.fps),
                           args.overwrite)
            if plan["mp4"] is not None:
                _write_mp4(video, plan["pattern"], plan["mp4"], args.fps, args.overwrite)
    finally:
        bar.close()
    print(f"wrote {out}")
    if skipped:
        print(f"skipped {len(skipped)} of {len(photos)} photos without a face (detector {args.detector}; try "
              f"--detector cnn): {', '.join(skipped)}", file=sys.stderr)
        return 1
    return 0


def _save_buffers(result, plan: dict, overwrite: bool) -> None:
    """Next to each output: the edited buffers (shaded | normals | albedo, one row per face) and the lit sphere."""
    import torch

    from .face.buffers import buffer_preview
    from .core.imaging import tensor_to_pil
    from .face.lighting import lit_sphere

    frames = len(plan["images"])
    for k in range(frames):
        rows = slice(k, None, frames)  # face-major: frame k of every face
        strip = torch.cat(list(buffer_preview(result.buffers[rows], result.coverage[rows])), dim=1)
        spheres = torch.cat(list(lit_sphere(result.lights[rows], size=result.buffers.shape[-1])), dim=1)
        _save_new(tensor_to_pil(strip, low=0.0), plan["buffers"][k], overwrite)
        _save_new(tensor_to_pil(spheres, low=0.0), plan["light"][k], overwrite)


def video_writer() -> str | None:
    """ffmpeg on the PATH, used for an MP4 of a sweep next to the GIF (None: GIF only)."""
    import shutil

    return shutil.which("ffmpeg")


def _write_mp4(ffmpeg: str, frames_pattern: Path, path: Path, fps: int, overwrite: bool) -> None:
    import subprocess

    def encode(tmp):
        command = [ffmpeg, "-y", "-loglevel", "error", "-framerate", str(fps), "-i", str(frames_pattern),
                   "-c:v", "libx264", "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-f", "mp4",
                   str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"ffmpeg could not write {path} ({done.stderr.strip()[-300:]}); the PNG frames and the "
                             "GIF are written")

    _write_new(path, encode, overwrite)


def _check_new(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _write_new(path: Path, write, overwrite: bool) -> None:
    """`write(tmp)` then rename onto path (atomic); an existing path needs --overwrite."""
    from .model.checkpoints import atomic_write

    _check_new(path, overwrite)
    atomic_write(path, write, overwrite=overwrite)


def _save_new(image, path: Path, overwrite: bool) -> None:
    _write_new(path, lambda tmp: image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG")),
               overwrite)


def _reference_rig(models, path: str):
    from .photo.loading import load_image
    from .pipeline import fit_photo
    from .face.rig_files import read_rig

    rig = read_rig(path)
    return rig if rig is not None else fit_photo(models, load_image(path))


def _slider_light(text: str, mirror: bool = False):
    """--light's text -> SH light [9, 3] (unset keys: the Relight node's slider defaults)."""
    from .core.imaging import hex_color
    from .face.lighting import SLIDER_LIGHT, sh_from_direction

    light = {**SLIDER_LIGHT, **_parse_light(text)}
    azimuth = light["azimuth"]
    return sh_from_direction(-azimuth if mirror else azimuth, light["elevation"], light["intensity"],
                             light["ambient"], hex_color(light["color"]))


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif")


def _clip_frames(source: Path, scratch: Path) -> list[Path]:
    """The frames of a clip: a folder's images in name order, or a video file split by ffmpeg into scratch."""
    import subprocess

    if source.is_dir():
        return _photos(str(source))
    if not source.is_file():
        raise FileNotFoundError(f"clip {source} not found: give a folder of frames or a video file")
    if source.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{source} is neither a folder of frames nor a video ({', '.join(VIDEO_SUFFIXES)})")
    ffmpeg = video_writer()
    if ffmpeg is None:
        raise ValueError(f"reading the video {source} needs ffmpeg on the PATH; install it, or give a folder of "
                         "frames (e.g. exported by your editor)")
    done = subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(source), str(scratch / "%06d.png")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"ffmpeg could not read {source}: {done.stderr.strip()[-300:]}")
    return _photos(str(scratch))


def _cmd_relight_video(args) -> int:
    import tempfile

    from .photo.loading import load_image
    from .face.lighting import preset_light, rotate_sh
    from .pipeline import load_models
    from .video import check_strength, relight_clip

    _check_run(args)
    check_strength(args.smooth)
    light = preset_light(args.light_preset, mirror=args.mirror) if args.light_preset else _slider_light(
        args.light or "", args.mirror)
    end = _slider_light(args.light_end) if args.light_end else None
    if args.end_turn is not None:
        end = rotate_sh(light[None].float(), yaw_deg=args.end_turn)[0]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} should be a folder (the relit frames go there)")
    with tempfile.TemporaryDirectory() as scratch:
        paths = _clip_frames(Path(args.clip), Path(scratch))
        frames = [load_image(p) for p in paths]
        names = [out / f"{k:05d}.png" for k in range(len(frames))]
        movie = out / "relit.mp4" if video_writer() else None
        for path in [*names, movie]:
            if path is not None:
                _check_new(path, args.overwrite)
        models = load_models(args.models, args.checkpoint, device=args.device, dtype=args.precision, lora=args.lora,
                             lora_strength=args.lora_strength)
        bar = _Bar()
        try:
            result = relight_clip(models.diffusionrig, models.deca, frames, light, end, strength=args.smooth,
                                  face=args.face_index, start=args.start, steps=args.steps, seed=args.seed,
                                  detector=args.detector, color_match=args.color_match, models_dir=models.root,
                                  progress=bar, sampler=args.sampler, cache_interval=args.cache,
                                  detail=args.detail, detail_radius=args.detail_radius)
        finally:
            bar.close()
    out.mkdir(parents=True, exist_ok=True)
    for path, frame in zip(names, result.frames):
        _save_new(frame, path, args.overwrite)
    if movie is not None:
        _write_mp4(video_writer(), out / "%05d.png", movie, args.fps, args.overwrite)
    print(f"wrote {len(names)} frames to {out}{' and ' + movie.name if movie else ''}; {result.report()}")
    return 1 if result.missing else 0


def _cmd_relight(args) -> int:
    if args.mirror and not (args.light_preset or args.light):
        raise ValueError("--mirror works with --light-preset and --light (turn an environment with --env-yaw)")

    def make_edit(models):
        from .face.rig import copy_from

        if args.light_from:
            reference = _reference_rig(models, args.light_from)
            return lambda rig: copy_from(rig, reference, light=True)
        if args.light_preset:
            from .face.lighting import preset_light

            preset = preset_light(args.light_preset, mirror=args.mirror)
            return lambda rig: rig.with_light(preset)
        if args.light_env:
            from .face.environment import environment_light, load_environment

            env_light = environment_light(load_environment(args.light_env), yaw=args.env_yaw,
                                          exposure=args.env_exposure)
            return lambda rig: rig.with_light(env_light)
        if args.preset_file:
            from .face.presets import load_preset
            from .face.rig import apply_preset

            document = load_preset(args.preset_file)
            return lambda rig: apply_preset(rig, document)
        sh = _slider_light(args.light, args.mirror)
        return lambda rig: rig.with_light(sh)

    if args.light:
        _parse_light(args.light)  # a typo is reported before the models load
    return _run_edits(args, make_edit, "relit")


EDIT_OPTIONS = ("--expression-from", "--jaw-from", "--pose-from", "--jaw-open", "--yaw", "--pitch", "--roll",
                "--expression-strength")


def _cmd_edit(args) -> int:
    unchanged = (not (args.expression_from or args.jaw_from or args.pose_from)
                 and args.jaw_open == args.yaw == args.pitch == args.roll == 0.0 and args.expression_strength == 1.0)
    if unchanged:
        raise ValueError(f"nothing to edit: give at least one of {', '.join(EDIT_OPTIONS)}")

    def make_edit(models):
        from .face.rig import copy_from, edit_pose

        refs = {}
        for key, path in (("expression", args.expression_from), ("jaw", args.jaw_from), ("head_pose", args.pose_from)):
            if path:
                refs[key] = _reference_rig(models, path)

        def edit(rig):
            for key, reference in refs.items():
                rig = copy_from(rig, reference, **{key: True})
            return edit_pose(rig, yaw=args.yaw, pitch=args.pitch, roll=args.roll, jaw_open=args.jaw_open,
                             expression_scale=args.expression_strength)

        return edit

    return _run_edits(args, make_edit, "edited")


def _cmd_sweep(args) -> int:
    from .face.rig import SWEEP_PARAMETERS, sweep, sweep_values

    chosen = [(name, getattr(args, name)) for name in SWEEP_PARAMETERS if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one sweep, e.g. --light-azimuth -60:60 or --head-yaw -30:30")
    parameter, text = chosen[0]
    start, end = _range(text)

    def make_edit(models):  # after _run_edits has checked --frames
        values = sweep_values(start, end, args.frames, ease=not args.linear)
        return lambda rig: sweep(rig, parameter, values)

    return _run_edits(args, make_edit, parameter)


def _edit_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """Arguments of the photo commands (relight, edit, sweep): photo(s), output, faces, buffers, then the run's."""
    parser.add_argument("photo", help="a photo, or a folder of photos")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--faces", choices=["largest", "all"], default="largest", help="which faces to edit")
    parser.add_argument("--save-buffers", action="store_true",
                        help="also write, next to each output, the edited buffers (<name>_buffers.png: shaded | "
                             "normals | albedo) and the light on a sphere (<name>_light.png)")
    _run_arguments(parser)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """Models, sampler, device and output options shared by every editing command (photos and clips)."""
    parser.add_argument("--models", default=None, help="ComfyUI-style models folder with diffusionrig/, deca/, flame/ "
                                                       f"{MODELS_HELP}")
    parser.add_argument("--checkpoint", default=None, help="file in models/diffusionrig/ (default: a real checkpoint "
                                                           "before the synthetic ones)")
    parser.add_argument("--lora", default=None, metavar="FILE",
                        help="a personalization LoRA (Save DiffusionRig Model of a LoRA-trained model; a path or a "
                             "file in models/diffusionrig/) merged into the checkpoint it was trained from")
    parser.add_argument("--lora-strength", type=float, default=1.0, metavar="S",
                        help="how much of the LoRA to apply (1 = as trained, the default; 0 = none)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: 20, the official ddim20; "
                                                                 "or the --preset's)")
    parser.add_argument("--sampler", choices=list(SAMPLER_NAMES), default=None,
                        help="ddim (official, default) or dpmpp_2m (second order: about half the steps for the same "
                             "result, not bit-equal to the official output)")
    parser.add_argument("--cache", type=int, default=None, metavar="N",
                        help="reuse the UNet's deep features for N-1 of every N steps (faster, drifts a little; "
                             "default 1 = off)")
    parser.add_argument("--preset", choices=list(SAMPLING_PRESETS), default=None,
                        help="named sampler settings: " + ", ".join(f"{k} = {v['sampler']} {v['steps']} steps, cache "
                                                              f"{v['cache_interval']}" for k, v in SAMPLING_PRESETS.items())
                             + " (explicit --sampler/--steps/--cache win)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed for --start noise (the same noise for every "
                                                            "face and frame); default 0")
    parser.add_argument("--start", choices=["inversion", "noise"], default="inversion",
                        help="inversion keeps background and details (default)")
    parser.add_argument("--detector", choices=["hog", "cnn", "insightface"], default="hog",
                        help="face detector: hog (dlib, official), cnn (dlib, profiles and small or dark faces), "
                             "insightface (needs the package and models/insightface/)")
    parser.add_argument("--color-match", action="store_true", help="match the edit's colours to the original face")
    parser.add_argument("--detail", choices=list(DETAIL_MODES), default=DEFAULT_DETAIL,
                        help="how the edited face goes back into the photo: ratio (default) keeps the photo's own "
                             "full-resolution detail and multiplies it by the edit's smoothed change of light; "
                             "difference adds that change instead; edit pastes the model's own pixels (blurred on "
                             "a large face). A face the edit moved (jaw, expression, head turn) takes its detail "
                             "along; where it cannot, the edit's pixels fill in")
    parser.add_argument("--detail-radius", type=float, default=DEFAULT_DETAIL_RADIUS, metavar="PX",
                        help=f"smoothing of the edit's change, in pixels of a 256 px face (default "
                             f"{DEFAULT_DETAIL_RADIUS:g}; 0 = the change at the model's full resolution; larger keeps "
                             "more of the photo and less of the edit's finer changes)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: a CUDA GPU when torch sees one, else the CPU")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


MODELS_HELP = f"(default: ${MODELS_ENV} or ./{MODELS_DEFAULT})"


def _read_config(path: str | None):
    return None if path is None else json.loads(Path(path).read_text())


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="comfy-diffusionrig", description="DiffusionRig face editing without ComfyUI")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a checkpoint's config and parameter counts")
    info.add_argument("model", help="DiffusionRig checkpoint (.pt or .safetensors)")
    info.add_argument("--config", help="JSON file of the official create_model_and_diffusion kwargs")
    info.set_defaults(func=_cmd_info)

    convert = sub.add_parser("convert", help="convert an official .pt checkpoint to .safetensors (config included)")
    convert.add_argument("model", help="DiffusionRig checkpoint (.pt or .safetensors)")
    convert.add_argument("out", help="output .safetensors path")
    convert.add_argument("--config", help="JSON file of the official create_model_and_diffusion kwargs")
    convert.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="storage precision")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    convert.set_defaults(func=_cmd_convert)

    from .train import command as train_command

    train = sub.add_parser("train", help="train stage 1 or 2 on a prepared dataset (one process, or under "
                                         "torchrun -m comfy_diffusionrig.train)")
    train_command.add_arguments(train)
    train.set_defaults(func=train_command.run)

    prepare = sub.add_parser("prepare-data", help="photos -> a training dataset: align, fit DECA, render buffers, "
                                                  "write shards + index.json + manifest.json (resumable)")
    prepare.add_argument("photos", help="a folder of photos (searched recursively; one folder per identity "
                                        "for --mean-shape) or one photo")
    prepare.add_argument("--out", required=True, help="dataset folder (what train --data reads)")
    prepare.add_argument("--models", default=None, help="models folder with deca/ and flame/ "
                                                        f"{MODELS_HELP}")
    prepare.add_argument("--size", type=int, default=256, help="aligned face size (official: 256)")
    prepare.add_argument("--min-face", type=int, default=64, help="reject faces whose box is smaller (pixels)")
    prepare.add_argument("--detector", choices=["hog", "cnn", "insightface"], default="hog")
    prepare.add_argument("--mean-shape", action="store_true", help="give each identity (folder) its mean DECA "
                                                                   "shape (official --use_meanshape)")
    prepare.add_argument("--shard-size", type=int, default=256, help="photos per shard")
    prepare.add_argument("--workers", type=int, default=1, help="processes (each loads DECA)")
    prepare.add_argument("--shard", default="0/1", help="i/n: run only the shards k with k %% n == i")
    prepare.set_defaults(func=_cmd_prepare_data)

    demo = sub.add_parser("demo", help="offline demo: train, personalize and score a small DiffusionRig on "
                                       "synthetic faces (about 12-15 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--models", default=None,
                      help=f"a ComfyUI-style models folder {MODELS_HELP}; when it "
                           "holds the licensed FLAME, DECA and DiffusionRig files, the demo uses its FLAME head and "
                           "also relights the example photos with your checkpoint")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny run (seconds) that only checks the plumbing; its "
                                                          "numbers mean nothing")
    demo.add_argument("--overwrite", action="store_true", help="run again into an --out folder that holds a finished "
                                                              "demo (an interrupted one resumes without it)")
    demo.set_defaults(func=_cmd_demo)

    assets = sub.add_parser("demo-assets", help="write synthetic stand-ins for FLAME, DECA and DiffusionRig "
                                                "files and a 4x upscaler so every workflow runs without the "
                                                "licensed ones")
    assets.add_argument("--out", required=True,
                        help="folder to fill with flame/, deca/, diffusionrig/ and upscale_models/")
    assets.add_argument("--seed", type=int, default=0)
    assets.add_argument("--overwrite", action="store_true", help="replace files already there")
    assets.set_defaults(func=_cmd_demo_assets)

    relight = sub.add_parser("relight", help="relight the face(s) of a photo (or of every photo in a folder)")
    _edit_arguments(relight, "output image (one photo) or folder (a folder of photos)")
    light = relight.add_mutually_exclusive_group(required=True)
    light.add_argument("--light-from", help="a photo whose light to copy")
    light.add_argument("--light", help="azimuth=..,elevation=..,intensity=..,ambient=..,color=#RRGGBB (degrees; "
                                       "azimuth + = from image right, elevation + = from above)")
    light.add_argument("--light-preset", type=_preset_name, metavar="NAME",
                       help="a named lighting setup: " + ", ".join(LIGHT_PRESETS) + " (case and _ or - do not "
                            "matter: golden_hour, Golden-Hour)")
    light.add_argument("--light-env", metavar="FILE", help="an equirectangular environment map (.hdr, .exr with "
                                                           "OpenEXR, or an 8-bit image); scaled to the presets' level")
    light.add_argument("--preset-file", metavar="FILE", help="a preset JSON (Save Rig Preset, presets/): its light "
                                                             "and, when it holds one, its expression/pose edit")
    relight.add_argument("--mirror", action="store_true", help="with --light-preset or --light: put the key light on "
                                                              "the other side (azimuth -> -azimuth)")
    relight.add_argument("--env-yaw", type=float, default=0.0, help="with --light-env: degrees to turn the "
                                                                     "environment (+ = a front light moves to image right)")
    relight.add_argument("--env-exposure", type=float, default=0.0, help="with --light-env: stops (EV) brighter")
    relight.set_defaults(func=_cmd_relight)

    edit = sub.add_parser("edit", help="change expression, jaw and head pose of the face(s) of a photo")
    _edit_arguments(edit, "output image (one photo) or folder (a folder of photos)")
    edit.add_argument("--expression-from", help="a photo whose expression to copy")
    edit.add_argument("--jaw-from", help="a photo whose jaw pose to copy")
    edit.add_argument("--pose-from", help="a photo whose head pose to copy")
    edit.add_argument("--jaw-open", type=float, default=0.0, help="degrees to open the jaw more (negative closes)")
    edit.add_argument("--yaw", type=float, default=0.0, help="degrees to turn the head (+ = to image right)")
    edit.add_argument("--pitch", type=float, default=0.0, help="degrees to nod (+ = down)")
    edit.add_argument("--roll", type=float, default=0.0, help="degrees to tilt (+ = to image right)")
    edit.add_argument("--expression-strength", type=float, default=1.0, help="0 neutral, 1 as is, >1 stronger")
    edit.set_defaults(func=_cmd_edit)

    sweep = sub.add_parser("sweep", help="frames of one changing parameter (PNG frames + an animated GIF, and an "
                                         "MP4 when ffmpeg is on the PATH)")
    _edit_arguments(sweep, "output folder for the frames")
    for name in ("light_azimuth", "light_elevation", "light_intensity", "jaw_open", "head_yaw", "head_pitch",
                 "head_roll", "expression_strength"):
        sweep.add_argument("--" + name.replace("_", "-"), dest=name, metavar="START:END", help=f"sweep {name}")
    sweep.add_argument("--frames", type=int, default=24, help="number of frames from START to END (default 24)")
    sweep.add_argument("--fps", type=int, default=12, help="GIF / MP4 frame rate")
    sweep.add_argument("--linear", action="store_true", help="constant speed (default: ease in and out)")
    sweep.set_defaults(func=_cmd_sweep)

    video = sub.add_parser("relight-video", help="relight one person through a clip without flicker (a folder of "
                                                 "frames, or a video file when ffmpeg is on the PATH)")
    video.add_argument("clip", help="a folder of frames (in name order) or a video file (needs ffmpeg)")
    video.add_argument("--out", required=True, help="output folder: 00000.png ... (+ relit.mp4 with ffmpeg)")
    clip_light = video.add_mutually_exclusive_group()
    clip_light.add_argument("--light", help="azimuth=..,elevation=..,intensity=..,ambient=..,color=#RRGGBB")
    clip_light.add_argument("--light-preset", type=_preset_name, metavar="NAME",
                            help=f"a named setup: {', '.join(LIGHT_PRESETS)}")
    video.add_argument("--mirror", action="store_true", help="put the key light on image left")
    keyframe = video.add_mutually_exclusive_group()
    keyframe.add_argument("--light-end", help="the light at the last frame, as --light (cross-faded over the clip)")
    keyframe.add_argument("--end-turn", type=float, help="degrees the light turns about the vertical by the last frame")
    video.add_argument("--smooth", type=float, default=2.0, help="temporal smoothing of pose, jaw, expression, "
                                                                 "camera and the crop's landmarks in frames (0 = off; "
                                                                 "default 2)")
    video.add_argument("--face-index", type=int, default=0, help="which face to follow in the first frame with a "
                                                                 "face (0 = largest)")
    video.add_argument("--fps", type=int, default=24, help="frame rate of relit.mp4")
    _run_arguments(video)
    video.set_defaults(func=_cmd_relight_video)
    return parser


_RANGE = re.compile(r"^-?\d*\.?\d+:-?\d*\.?\d+$")


def _join_ranges(argv: list[str]) -> list[str]:
    """`--light-azimuth -60:60` -> `--light-azimuth=-60:60` (argparse takes '-60:60' for an option)."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _RANGE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_ranges(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"comfy-diffusionrig {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

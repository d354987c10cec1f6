"""`comfy-diffusionrig` command line: scripting without ComfyUI."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .presets import LIGHT_PRESETS


def _cmd_info(args) -> int:
    from .checkpoints import load_diffusionrig

    model = load_diffusionrig(args.model, config=_read_config(args.config))
    unet = sum(p.numel() for p in model.denoisingUNet.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    print(json.dumps({"config": model.config.to_dict(), "params_unet": unet, "params_encoder": encoder}, indent=1))
    return 0


def _cmd_convert(args) -> int:
    from .checkpoints import load_diffusionrig, save_diffusionrig

    model = load_diffusionrig(args.model, config=_read_config(args.config))
    out = save_diffusionrig(model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype or 'original precision'})")
    return 0


class _Bar:
    """A one-line text progress bar on stderr: `stage [#####.....] done/total elapsed`."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.stage = None
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage = stage
        filled = int(30 * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{stage:<22} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}  {elapsed:6.0f}s")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")


def _cmd_demo_assets(args) -> int:
    from .synthetic import write_demo_assets

    out = Path(args.out)
    written = write_demo_assets(out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote synthetic stand-ins (not FLAME, not DECA, not DiffusionRig weights, not a trained upscaler) "
          f"into {out}:")
    for path in written.values():
        print(f"  {path}")
    print(f"copy (or point extra_model_paths.yaml at) {out}/flame, {out}/deca, {out}/diffusionrig and "
          f"{out}/upscale_models as ComfyUI/models/flame, models/deca, models/diffusionrig and models/upscale_models")
    return 0


def _cmd_demo(args) -> int:
    from dataclasses import replace

    from .demo import DemoConfig, run_demo
    from .pipeline import default_models_dir

    config = DemoConfig(seed=args.seed)
    if args.quick:
        config = replace(config, subjects=4, views=4, album=6, held_out=2, stage1_steps=30, stage2_steps=10,
                         sample_steps=5)
    bar = _Bar()
    try:
        report = run_demo(args.out, config, models_dir=args.models or default_models_dir(), progress=bar)
    finally:
        bar.close()
    print(Path(args.out, "report.md").read_text())
    print(f"total {report['total_seconds']} s; images in {args.out}")
    return 0


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
    allowed = {"azimuth", "elevation", "intensity", "ambient", "color"}
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in allowed or not value:
            raise ValueError(f"--light: cannot read {part!r}; write e.g. azimuth=45,elevation=20,intensity=0.8,"
                             "ambient=0.5,color=#FFE0C0")
        values[key] = value if key == "color" else float(value)
    return values


def _hex_color(text: str) -> tuple[float, float, float]:
    value = text.strip().lstrip("#")
    if len(value) != 6 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError(f"colour {text!r} is not a hex colour like #FFE0C0")
    return tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def _range(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"a sweep range is START:END (e.g. -60:60), got {text!r}")
    return float(start), float(end)


def _outputs(out: Path, photo: Path, suffix: str, frames: int, many: bool, video: str | None) -> dict:
    """Where the edit of one photo goes: "images" (one per frame), "gif" and "mp4" (sweeps), "pattern"."""
    if not many:
        return {"images": [out], "gif": None, "mp4": None}
    stem = f"{photo.stem}_{suffix}"
    if frames == 1:
        return {"images": [out / f"{stem}.png"], "gif": None, "mp4": None}
    return {"images": [out / f"{stem}_{k:04d}.png" for k in range(frames)], "gif": out / f"{stem}.gif",
            "mp4": out / f"{stem}.mp4" if video else None, "pattern": out / f"{stem}_%04d.png"}


def _run_edits(args, make_edit, suffix: str) -> int:
    from .pipeline import edit_photo, load_models

    photos = _photos(args.photo)
    out = Path(args.out)
    frames = getattr(args, "frames", 1)
    many = len(photos) > 1 or frames > 1
    if not many and out.suffix.lower() not in PHOTO_SUFFIXES:
        raise ValueError(f"--out {out} should be an image file name (e.g. out.png) for one photo")
    video = video_writer() if frames > 1 else None
    plans = [_outputs(out, photo_path, suffix, frames, many, video) for photo_path in photos]
    for plan in plans:  # existing outputs: say so before minutes of sampling, not after
        for path in [*plan["images"], plan["gif"], plan["mp4"]]:
            if path is not None:
                _check_new(path, args.overwrite)
    models = load_models(args.models, args.checkpoint, device=args.device, dtype=args.precision)
    edit = make_edit(models)
    if many:
        out.mkdir(parents=True, exist_ok=True)
    bar = _Bar()
    try:
        for photo_path, plan in zip(photos, plans):
            from .alignment import load_image

            photo = load_image(photo_path)
            result = edit_photo(models, photo, edit, steps=args.steps, seed=args.seed, start=args.start,
                                faces=args.faces, color_match=args.color_match,
                                callback=lambda done, total, name=photo_path.name: bar(name, done, total))
            for path, image in zip(plan["images"], result.photos):
                _save_new(image, path, args.overwrite)
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
    return 0


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
    from .checkpoints import atomic_write

    _check_new(path, overwrite)
    atomic_write(path, write, overwrite=overwrite)


def _save_new(image, path: Path, overwrite: bool) -> None:
    _write_new(path, lambda tmp: image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG")),
               overwrite)


def _reference_rig(models, path: str):
    from .alignment import load_image
    from .pipeline import fit_photo

    return fit_photo(models, load_image(path))


def _cmd_relight(args) -> int:
    def make_edit(models):
        from .lighting import sh_from_direction
        from .rig import copy_from

        if args.light_from:
            reference = _reference_rig(models, args.light_from)
            return lambda rig: copy_from(rig, reference, light=True)
        if args.light_preset:
            from .lighting import preset_light

            preset = preset_light(args.light_preset, mirror=args.mirror)
            return lambda rig: rig.with_light(preset)
        light = _parse_light(args.light)
        color = _hex_color(light.pop("color", "#FFFFFF"))
        sh = sh_from_direction(light.get("azimuth", 45.0), light.get("elevation", 20.0),
                               light.get("intensity", 0.8), light.get("ambient", 0.5), color)
        return lambda rig: rig.with_light(sh)

    return _run_edits(args, make_edit, "relit")


def _cmd_edit(args) -> int:
    def make_edit(models):
        from .rig import copy_from, edit_pose

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
    from .rig import SWEEP_PARAMETERS, sweep, sweep_values

    chosen = [(name, getattr(args, name)) for name in SWEEP_PARAMETERS if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one sweep, e.g. --light-azimuth -60:60 or --head-yaw -30:30")
    parameter, text = chosen[0]
    start, end = _range(text)
    values = sweep_values(start, end, args.frames, ease=not args.linear)
    return _run_edits(args, lambda models: (lambda rig: sweep(rig, parameter, values)), parameter)


def _edit_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("photo", help="a photo, or a folder of photos")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--models", default=None, help="ComfyUI-style models folder with diffusionrig/, deca/, flame/ "
                                                       "(default: $COMFY_DIFFUSIONRIG_MODELS or ./models)")
    parser.add_argument("--checkpoint", default=None, help="file in models/diffusionrig/ (default: the first)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (official: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", choices=["inversion", "noise"], default="inversion",
                        help="inversion keeps background and details (default)")
    parser.add_argument("--faces", choices=["largest", "all"], default="largest", help="which faces to edit")
    parser.add_argument("--color-match", action="store_true", help="match the edit's colours to the original face")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _read_config(path: str | None):
    return None if path is None else json.loads(Path(path).read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfy-diffusionrig", description="DiffusionRig face editing without ComfyUI")
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

    demo = sub.add_parser("demo", help="offline demo: train, personalize and score a small DiffusionRig on "
                                       "synthetic faces (about 7 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--models", default=None,
                      help="a ComfyUI-style models folder (default: $COMFY_DIFFUSIONRIG_MODELS or ./models); when it "
                           "holds the licensed FLAME, DECA and DiffusionRig files, the demo uses its FLAME head and "
                           "also relights the example photos with your checkpoint")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny run (seconds) that only checks the plumbing")
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
    light.add_argument("--light-preset", choices=list(LIGHT_PRESETS), metavar="NAME",
                       help="a named lighting setup: " + ", ".join(LIGHT_PRESETS) + " (key light on image right)")
    relight.add_argument("--mirror", action="store_true", help="with --light-preset: key light on image left")
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
    sweep.add_argument("--frames", type=int, default=24)
    sweep.add_argument("--fps", type=int, default=12, help="GIF / MP4 frame rate")
    sweep.add_argument("--linear", action="store_true", help="constant speed (default: ease in and out)")
    sweep.set_defaults(func=_cmd_sweep)
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

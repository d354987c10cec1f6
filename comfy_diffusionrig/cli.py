"""`comfy-diffusionrig` command line: scripting without ComfyUI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"comfy-diffusionrig {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

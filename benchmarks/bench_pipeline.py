"""Benchmark: photo in -> relit photo out at 256 px, seconds per stage.

Stages: align (detect + 68 landmarks + FFHQ alignment), fit (DECA crop + encode), render
(original and edited buffers), encode (global code), denoise (20 DDIM inversion steps + 20 DDIM steps,
`edit_faces`), paste (paste back into the photo). Models: the official default
DiffusionRig config with deterministic random weights (benchmarks/bench_sample.py), and
DECA + FLAME from the offline demo assets (`comfy-diffusionrig demo-assets`; a synthetic
head of 7168 faces, where FLAME has 9976).

Goal: the whole edit is dominated by the sampler; everything else together under 1 s per face.

    python benchmarks/bench_pipeline.py                 # CPU, fp32 and auto precision
    python benchmarks/bench_pipeline.py --device cuda
    python benchmarks/bench_pipeline.py --steps 2      # quick: only denoise depends on --steps
    python benchmarks/bench_pipeline.py --threads 1    # when another process holds a core: two torch
                                                       # threads on one free core run the small ops 10x slower
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from bench_sample import make_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--photo", default=str(ROOT / "example_images" / "astronaut.png"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per precision (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (default: torch's default, one per core)")
    args = parser.parse_args()

    from comfy_diffusionrig.photo.loading import load_image
    from comfy_diffusionrig.model.checkpoints import for_inference
    from comfy_diffusionrig.cli import main as cli
    from comfy_diffusionrig.face.deca import load_deca
    from comfy_diffusionrig.face.lighting import sh_from_direction
    from comfy_diffusionrig.pipeline import Models, edit_photo

    torch.set_num_threads(args.threads)
    photo = load_image(args.photo)
    light = sh_from_direction(60.0, 20.0, 0.9, 0.45)

    def relight(rig):
        return rig.with_codes(light=light.expand(len(rig), 9, 3).clone())

    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # its list of written files
            assert cli(["demo-assets", "--out", tmp]) == 0
        deca = load_deca(Path(tmp) / "deca" / "deca_model.tar", Path(tmp) / "flame", device=args.device)
        print(f"photo {args.photo} {photo.size[0]}x{photo.size[1]}, {args.steps} DDIM steps, device {args.device}, "
              f"{torch.get_num_threads()} threads")
        print(f"{'precision':>9} | " + " | ".join(f"{s:>7}" for s in
              ("align", "fit", "render", "encode", "denoise", "paste", "other", "total")))
        for precision in args.precision:
            model = for_inference(make_model(args.device), args.device, precision)
            models = Models(model, deca)
            edit_photo(models, photo, relight, steps=2)  # warm-up
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = edit_photo(models, photo, relight, steps=args.steps)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                runs.append((time.perf_counter() - start, result.seconds))
            total, seconds = min(runs, key=lambda r: r[0])
            other = sum(v for k, v in seconds.items() if k != "denoise")
            cells = [seconds.get(k, 0.0) for k in ("align", "fit", "render", "encode", "denoise", "paste")]
            print(f"{precision:>9} | " + " | ".join(f"{v:7.2f}" for v in cells + [other, total]))
        print("denoise = DDIM inversion + sampling (edit_faces); other = everything else (goal: under 1 s per face)")


if __name__ == "__main__":
    main()

"""Benchmark: stage-2 training speed and peak memory of the official default DiffusionRig (256 px).

Runs the real `training.train` loop (p2 loss, Adam, clipping, encoder in batch-stat mode)
for a few steps per variant: full fine-tune or LoRA, with and without gradient
checkpointing, per precision; prints seconds per step, the extrapolated time of the
official 5000 steps, and peak memory (CUDA: max allocated by torch; CPU: process max RSS).
Each variant runs in its own subprocess so that peak memory is its own.

Goal (official recipe, batch 4): 5000 steps in at most 15 minutes on one H100 with at
most 12 GB peak for the full fine-tune, and LoRA within 8 GB.

    python benchmarks/bench_train.py                       # CPU: batch 1, 2 timed steps (several minutes)
    python benchmarks/bench_train.py --device cuda --steps 20
    python benchmarks/bench_train.py --batch 4 --variants full lora16 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from bench_sample import make_model

VARIANTS = {"full": 0, "lora16": 16}  # name: LoRA rank (0 = full fine-tune)
OFFICIAL_STEPS = 5000  # official stage-2 max_steps


def run_one(variant: str, checkpointing: bool, precision: str, batch: int, steps: int, device: str,
            out_file: str) -> None:
    from comfy_diffusionrig.lora import lora_state_dict
    from comfy_diffusionrig.training import TrainConfig, TrainingData, train

    model = make_model(device)
    gen = torch.Generator().manual_seed(7)
    n = max(batch, 4)
    images = torch.rand(n, 3, 256, 256, generator=gen) * 2 - 1
    buffers = torch.rand(n, 9, 256, 256, generator=gen)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def callback(step, total, loss, model):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    config = TrainConfig(steps=steps + 1, batch_size=batch, precision=precision, gradient_checkpointing=checkpointing,
                         lora_rank=VARIANTS[variant])
    start = time.perf_counter()
    model, _ = train(model, TrainingData(images, buffers), config, callback=callback)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step (warm-up) is left out
    result = {"first_s": stamps[0] - start, "per_step_s": sorted(per_step)[len(per_step) // 2],
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if VARIANTS[variant]:
        result["lora_mib"] = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values()) / 2**20
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out_file, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 (official) on CUDA, 1 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up step "
                                                                "(default: 20 on CUDA, 2 on the CPU)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--precision", nargs="+", default=["auto"], help="auto, fp32, bf16, fp16 (one or more)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, ckpt, precision, batch, steps, device, out_file = args.one
        run_one(variant, ckpt == "on", precision, int(batch), int(steps), device, out_file)
        return
    cuda = args.device == "cuda"
    batch = args.batch or (4 if cuda else 1)
    steps = args.steps or (20 if cuda else 2)
    from comfy_diffusionrig.devices import resolve_dtype

    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else f', {torch.get_num_threads()} threads'}, "
          f"official default config 256 px, batch {batch}, {steps} timed steps after 1 warm-up")
    print(f"{'variant':8} {'precision':10} {'ckpt':4} {'trainable':>11} {'first s':>8} {'s/step':>7} "
          f"{'5000 steps':>10} {'peak GiB':>8} {'LoRA MiB':>8}")
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_train_{os.getpid()}.json")
    for precision in args.precision:
        shown = f"{precision}->{str(resolve_dtype(precision, args.device)).split('.')[-1]}" if precision == "auto" \
            else precision
        for variant in args.variants:
            for ckpt in args.checkpointing:
                subprocess.run([sys.executable, __file__, "--one", variant, ckpt, precision, str(batch), str(steps),
                                args.device, tmp], check=True)
                with open(tmp) as f:
                    r = json.load(f)
                os.remove(tmp)
                total_min = r["per_step_s"] * OFFICIAL_STEPS / 60
                total = f"{total_min:.1f} min" if total_min < 120 else f"{total_min / 60:.1f} h"
                lora = f"{r['lora_mib']:.1f}" if "lora_mib" in r else "-"
                print(f"{variant:8} {shown:10} {ckpt:4} {r['trainable']:11,d} {r['first_s']:8.1f} "
                      f"{r['per_step_s']:7.3f} {total:>10} {r['peak_bytes'] / 2**30:8.2f} {lora:>8}", flush=True)
    if batch != 4:
        print(f"(batch {batch}; the official batch is 4: a step costs about {4 / batch:.0f}x as much there)")


if __name__ == "__main__":
    main()

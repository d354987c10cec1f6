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
    python benchmarks/bench_train.py --tiny --json out.json   # plumbing check: a 32 px, 32-channel model

Stage 1 data parallel (`--stage1`): the same loop under torchrun with 1 and 2 processes (gloo
on the CPU, NCCL on GPUs), encoder trained, images per second over all processes and the peak
memory of each process. `--quick` uses a 32 px, 32-channel model and 4 images per process (CPU).

    python benchmarks/bench_train.py --stage1 --quick          # CPU, about a minute
    python benchmarks/bench_train.py --stage1 --processes 1 8  # GPUs: official 256 px, 32 per GPU
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

from bench_sample import TINY, make_model

VARIANTS = {"full": 0, "lora16": 16}  # name: LoRA rank (0 = full fine-tune)
OFFICIAL_STEPS = 5000  # official stage-2 max_steps


def run_one(variant: str, checkpointing: bool, precision: str, batch: int, steps: int, device: str,
            out_file: str, tiny: bool = False) -> None:
    from comfy_diffusionrig.model.lora import lora_state_dict
    from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train

    size = 32 if tiny else 256
    model = make_model(device, size, tiny)
    gen = torch.Generator().manual_seed(7)
    n = max(batch, 4)
    images = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    buffers = torch.rand(n, 9, size, size, generator=gen)
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


def run_stage1_rank(quick: bool, batch_per_process: int, steps: int, out_file: str) -> None:
    """One torchrun rank: stage-1 training steps; rank 0 writes the timing and every rank's peak memory."""
    import torch.distributed as dist

    from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train
    from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    size = 32 if quick else 256
    if quick:
        torch.manual_seed(0)
        model = DiffusionRig(UNetConfig(image_size=32, **TINY)).to(device)
    else:
        model = make_model(device)
    gen = torch.Generator().manual_seed(7)
    n = batch_per_process * world
    data = TrainingData(torch.rand(n, 3, size, size, generator=gen) * 2 - 1, torch.rand(n, 9, size, size, generator=gen))
    stamps = []

    def callback(step, total, loss, model):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(steps=steps + 1, lr=1e-4, batch_size=n, train_encoder=True)  # official stage 1 lr
    train(model, data, config, callback=callback)
    per_step = sorted(b - a for a, b in zip(stamps, stamps[1:]))[(len(stamps) - 1) // 2]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump({"per_step_s": per_step, "images_per_s": n / per_step, "peaks": peaks}, f)
    dist.destroy_process_group()


def stage1(args) -> None:
    quick = args.quick or args.tiny
    batch = args.batch or (4 if quick else 32)  # official stage 1: 32 per GPU
    steps = args.steps or (4 if quick else 10)
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_train_stage1_{os.getpid()}.json")
    print(f"torch {torch.__version__}, stage 1 ({'32 px quick model' if quick else 'official 256 px'}), "
          f"{batch} images per process, {steps} timed steps after 1 warm-up, "
          f"{'NCCL' if torch.cuda.is_available() else 'gloo (CPU, ' + os.environ.get('OMP_NUM_THREADS', '?') + ' threads per process)'}")
    print(f"{'processes':>9} {'s/step':>7} {'images/s':>9} {'peak GiB per process':>22}")
    rows = []
    for processes in args.processes:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                        __file__, "--stage1-rank", "quick" if quick else "full", str(batch), str(steps), tmp],
                       check=True)
        with open(tmp) as f:
            r = json.load(f)
        os.remove(tmp)
        peaks = " ".join(f"{p / 2**30:.2f}" for p in r["peaks"])
        print(f"{processes:9d} {r['per_step_s']:7.3f} {r['images_per_s']:9.1f} {peaks:>22}", flush=True)
        rows.append({"stage": 1, "quick": quick, "processes": processes, "batch_per_process": batch, **r})
        write_json(args.json, rows)


def write_json(path: str | None, rows: list[dict]) -> None:
    """The rows so far (written after every row: a run stopped at its time limit keeps what it measured)."""
    if path:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 (official) on CUDA, 1 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up step "
                                                                "(default: 20 on CUDA, 2 on the CPU)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--precision", nargs="+", default=["auto"], help="auto, fp32, bf16, fp16 (one or more)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--stage1", action="store_true", help="stage-1 data-parallel throughput (torchrun)")
    parser.add_argument("--quick", action="store_true", help="with --stage1: a 32 px model, 4 images per process "
                                                              "(--tiny implies it)")
    parser.add_argument("--tiny", action="store_true", help="stage 2 on a 32 px, 32-channel model: checks the "
                                                             "plumbing, says nothing about speed")
    parser.add_argument("--json", help="also write every row's figures to this JSON file")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2], help="with --stage1")
    parser.add_argument("--one", nargs=8, help=argparse.SUPPRESS)
    parser.add_argument("--stage1-rank", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage1_rank:
        mode, batch, steps, out_file = args.stage1_rank
        run_stage1_rank(mode == "quick", int(batch), int(steps), out_file)
        return
    if args.stage1:
        stage1(args)
        return
    if args.one:
        variant, ckpt, precision, batch, steps, device, out_file, tiny = args.one
        run_one(variant, ckpt == "on", precision, int(batch), int(steps), device, out_file, tiny == "1")
        return
    cuda = args.device == "cuda"
    # (tiny: at least 2, since the encoder's batch-statistics BatchNorm sees 1x1 features at 32 px)
    batch = args.batch or (4 if cuda else 2 if args.tiny else 1)
    steps = args.steps or (20 if cuda else 2)
    from comfy_diffusionrig.core.devices import resolve_dtype

    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else f', {torch.get_num_threads()} threads'}, "
          f"{'tiny (32-channel) config 32 px' if args.tiny else 'official default config 256 px'}, batch {batch}, "
          f"{steps} timed steps after 1 warm-up")
    print(f"{'variant':8} {'precision':10} {'ckpt':4} {'trainable':>11} {'first s':>8} {'s/step':>7} "
          f"{'5000 steps':>10} {'peak GiB':>8} {'LoRA MiB':>8}")
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_train_{os.getpid()}.json")
    rows = []
    for precision in args.precision:
        shown = f"{precision}->{str(resolve_dtype(precision, args.device)).split('.')[-1]}" if precision == "auto" \
            else precision
        for variant in args.variants:
            for ckpt in args.checkpointing:
                subprocess.run([sys.executable, __file__, "--one", variant, ckpt, precision, str(batch), str(steps),
                                args.device, tmp, "1" if args.tiny else "0"], check=True)
                with open(tmp) as f:
                    r = json.load(f)
                os.remove(tmp)
                total_min = r["per_step_s"] * OFFICIAL_STEPS / 60
                total = f"{total_min:.1f} min" if total_min < 120 else f"{total_min / 60:.1f} h"
                lora = f"{r['lora_mib']:.1f}" if "lora_mib" in r else "-"
                print(f"{variant:8} {shown:10} {ckpt:4} {r['trainable']:11,d} {r['first_s']:8.1f} "
                      f"{r['per_step_s']:7.3f} {total:>10} {r['peak_bytes'] / 2**30:8.2f} {lora:>8}", flush=True)
                rows.append({"stage": 2, "variant": variant, "precision": shown, "checkpointing": ckpt,
                             "batch": batch, "tiny": args.tiny, **r, "official_steps_min": total_min})
                write_json(args.json, rows)
    if batch != 4:
        print(f"(batch {batch}; the official batch is 4: a step costs about {4 / batch:.0f}x as much there)")


if __name__ == "__main__":
    main()

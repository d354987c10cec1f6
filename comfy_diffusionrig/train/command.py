"""The train command: stage 1 or 2 on a prepared dataset, in one process or under torchrun.

    comfy-diffusionrig train --data DATASET --stage 1 --out runs/stage1
    torchrun --nproc_per_node 8 -m comfy_diffusionrig.train --data DATASET --stage 1 --out runs/stage1

Under torchrun every rank runs `training.train` (the one training loop) inside a process group
(NCCL on GPUs, gloo on the CPU). `--out` holds train.pt (the resumable checkpoint; running the
same command again resumes it, on any number of processes), loss.csv (step,loss) and, at the
end, model.pt (official state-dict layout, EMA weights when --ema is on) and model.safetensors
(the same weights with the config). SIGINT / SIGTERM stop every rank at the same step after a
checkpoint. Torch is imported inside functions so that the CLI's parser stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

# official scripts/train.py defaults per stage: lr, batch per GPU, max steps, encoder trained
STAGES = {1: {"lr": 1e-4, "batch": 32, "steps": 50_000, "train_encoder": True},
          2: {"lr": 1e-5, "batch": 4, "steps": 5_000, "train_encoder": False}}


class Stopped(Exception):
    """A SIGINT / SIGTERM asked the run to stop (on any rank)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset folder written by prepare-data")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True,
                        help="1: train UNet and encoder on many faces; 2: personalize the UNet (encoder frozen)")
    parser.add_argument("--out", required=True, help="run folder: train.pt, loss.csv, model.pt, model.safetensors")
    parser.add_argument("--init", help="model to start from (.pt or .safetensors); required for stage 2; "
                                       "stage 1 without it starts from scratch")
    parser.add_argument("--config", help="stage 1 from scratch: JSON of the official create_model_and_diffusion "
                                          "kwargs (default: official defaults at the dataset's image size)")
    parser.add_argument("--steps", type=int, help="default: 50000 (stage 1), 5000 (stage 2), official")
    parser.add_argument("--lr", type=float, help="default: 1e-4 (stage 1), 1e-5 (stage 2), official")
    parser.add_argument("--batch", type=int, help="global batch over all processes; default: official per-GPU "
                                                  "batch (32 / 4) times the number of processes. Pass it to "
                                                  "resume on another number of processes")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA rate of the exported weights, e.g. 0.9999 "
                                                               "(default 0: off)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 30 %% slower")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming --out/train.pt")


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from ..model.checkpoints import atomic_write, load_diffusionrig, save_diffusionrig
    from .dataset import load_dataset
    from ..core.devices import resolve_device
    from .loop import TrainConfig, train
    from ..model.unet import DiffusionRig, UNetConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    stop = {"signal": 0}

    def request_stop(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.stage == 2 and not args.init:
            raise ValueError("stage 2 fine-tunes a trained model: pass --init MODEL (a stage-1 result)")
        data = load_dataset(args.data)
        if args.init:
            model = load_diffusionrig(args.init, device=device)
        else:
            config = UNetConfig(image_size=data.images.shape[-1]) if args.config is None else \
                UNetConfig.from_official_kwargs(json.loads(Path(args.config).read_text()))
            torch.manual_seed(args.seed)  # the same initial weights on every rank
            model = DiffusionRig(config).to(device)
        defaults = STAGES[args.stage]
        config = TrainConfig(steps=args.steps or defaults["steps"], lr=args.lr or defaults["lr"],
                             batch_size=args.batch or defaults["batch"] * world, seed=args.seed,
                             precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
                             checkpoint_every=args.checkpoint_every, train_encoder=defaults["train_encoder"],
                             grad_accum=args.grad_accum, ema_rate=args.ema)
        out = Path(args.out)
        checkpoint = out / "train.pt"
        log = _LossLog(out / "loss.csv", checkpoint) if rank == 0 else None

        def callback(step, total, loss, **_):
            if log is not None:
                log.write(step, loss)
                if step == total or step % 50 == 0:
                    print(f"step {step}/{total} loss {loss:.5f}", flush=True)
            asked = torch.tensor([stop["signal"]], device=device)
            if world > 1:
                dist.all_reduce(asked, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if int(asked):
                raise Stopped(int(asked))

        try:
            model, _ = train(model, data, config, checkpoint_path=checkpoint, callback=callback,
                             resume=not args.fresh)
        except Stopped as stopped:
            if rank == 0:
                print(f"stopped by signal {stopped.args[0]}; {checkpoint} holds every completed step: run the "
                      "same command to resume", file=sys.stderr)
            return 128 + stopped.args[0]
        if rank == 0:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            weights.update(state["ema"])
            atomic_write(out / "model.pt", lambda tmp: torch.save(weights, tmp), overwrite=True)
            model.load_state_dict(weights)
            save_diffusionrig(model, out / "model.safetensors", overwrite=True,
                              extra_metadata={"stage": str(args.stage), "steps": str(config.steps),
                                              "train_config": json.dumps(config.to_dict())})
            print(f"wrote {out / 'model.pt'} and {out / 'model.safetensors'}")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if world > 1:
            dist.destroy_process_group()


class _LossLog:
    """step,loss lines. A resumed run rewrites the file from the checkpoint's losses (the log can lag the
    checkpoint by a step when a run is killed between the two writes)."""

    def __init__(self, path: Path, checkpoint: Path):
        self.path, self.checkpoint, self.started = path, checkpoint, False

    def write(self, step: int, loss: float) -> None:
        if not self.started:
            import torch

            self.started = True
            done = []
            if step > 1:  # mmap: only the losses are read, not the weights
                done = torch.load(self.checkpoint, map_location="cpu", weights_only=True, mmap=True)["losses"]
            self.path.write_text("".join(["step,loss\n", *(f"{i},{v:.8g}\n" for i, v in enumerate(done[:step - 1], 1))]))
        with open(self.path, "a") as f:
            f.write(f"{step},{loss:.8g}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy_diffusionrig.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (FileNotFoundError, ValueError) as err:  # as the comfy-diffusionrig CLI reports them
        print(f"comfy_diffusionrig.train: error: {err}", file=sys.stderr)
        return 2


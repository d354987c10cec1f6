"""Benchmark: ddim20 sampling of the official default DiffusionRig (256 px) per precision path.

Prints seconds per image, seconds per UNet call, peak memory and the PSNR of each fast path
against the fp32 result, for batch 1 and 4, on the CPU (and CUDA when available). Each
configuration runs in its own subprocess so that peak memory is its own.

    python benchmarks/bench_sample.py                 # everything (several minutes on 2 cores)
    python benchmarks/bench_sample.py --batch 1 --paths fp32 bf16_cl --steps 20
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

PATHS = {
    # name: (dtype, channels_last, compile)
    "fp32": (torch.float32, False, False),
    "fp32_cl": (torch.float32, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16_cl": (torch.bfloat16, True, False),
    "bf16_cl_compile": (torch.bfloat16, True, True),
    "fp16_cl": (torch.float16, True, False),  # CUDA only
}


def make_model(device):
    """Official default config with deterministic random weights.

    Zero-initialised layers (output convs, attention projections) are re-drawn N(0, 0.02) and
    norm scales 1 + N(0, 0.02), as the parity fixtures do, so every layer contributes.
    """
    from comfy_diffusionrig.unet import DiffusionRig, UNetConfig

    torch.manual_seed(0)
    model = DiffusionRig(UNetConfig())
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif torch.all(p == 1):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval().to(device)


def inputs(batch, device):
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1
    buffers = torch.cat([torch.rand(batch, 3, 256, 256, generator=gen), torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1,
                         torch.rand(batch, 3, 256, 256, generator=gen)], 1)
    noise = torch.randn(1, 3, 256, 256, generator=gen)
    return image.to(device), buffers.to(device), noise.to(device)


def run_one(path: str, batch: int, steps: int, device: str, out_file: str) -> None:
    from comfy_diffusionrig import ddim_sample

    dtype, channels_last, use_compile = PATHS[path]
    model = make_model(device)
    model.denoisingUNet.to(dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    image, buffers, noise = inputs(batch, device)
    calls = []
    fn = model.denoise
    if use_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # lets inductor pre-pack conv weights for oneDNN / cuDNN
        fn = torch.compile(fn)

    def timed(*call_args):
        start = time.perf_counter()
        result = fn(*call_args)
        if device == "cuda":
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
        return result

    model.denoise = timed  # instance attribute: the sampler calls this wrapper
    with torch.inference_mode():
        code = model.encode(image)
        # warm-up through the sampler itself (compilation, allocator, oneDNN primitive cache)
        ddim_sample(model, buffers, code, noise, steps=1)
        warmup_s = calls[0]
        calls.clear()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = ddim_sample(model, buffers, code, noise, steps=steps)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch.save(out.float().cpu(), out_file + ".pt")
    with open(out_file, "w") as f:
        json.dump({"total_s": total, "per_image_s": total / batch, "per_call_s": sorted(calls)[len(calls) // 2],
                   "compile_s": warmup_s - min(calls) if use_compile else 0.0, "peak_bytes": peak,
                   "clamped": float((out.abs() >= 1).float().mean())}, f)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # images in [-1, 1] -> peak-to-peak 1 after /2
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--paths", nargs="+", default=None, help=f"subset of {list(PATHS)}")
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, batch, steps, device, out_file = args.one
        run_one(path, int(batch), int(steps), device, out_file)
        return
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_sample_{os.getpid()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ddim{args.steps}, official default config 256 px")
    print(f"{'device':6} {'path':16} {'batch':>5} {'s/image':>8} {'s/call':>7} {'compile s':>9} {'peak MiB':>9} "
          f"{'PSNR vs fp32':>12} {'clamped':>7}")
    for device in devices:
        paths = args.paths or ([p for p in PATHS if p != "fp16_cl"] if device == "cpu" else list(PATHS))
        for batch in args.batch:
            reference = None
            for path in ["fp32"] + [p for p in paths if p != "fp32"]:
                out_file = f"{tmp}_{device}_{path}_{batch}.json"
                subprocess.run([sys.executable, __file__, "--one", path, str(batch), str(args.steps), device, out_file],
                               check=True)
                with open(out_file) as f:
                    r = json.load(f)
                image = torch.load(out_file + ".pt")
                if reference is None:
                    reference = image
                quality = "reference" if path == "fp32" else f"{psnr(image, reference):.1f} dB"
                if path in paths:
                    print(f"{device:6} {path:16} {batch:5d} {r['per_image_s']:8.2f} {r['per_call_s']:7.3f} "
                          f"{r['compile_s']:9.1f} {r['peak_bytes'] / 2**20:9.0f} {quality:>12} {r['clamped']:7.1%}",
                          flush=True)
                os.remove(out_file)
                os.remove(out_file + ".pt")


if __name__ == "__main__":
    main()

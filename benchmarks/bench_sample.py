"""Benchmark: one edit (inversion + sampling) of the official default DiffusionRig per sampler setting,
and per preset a light try with the inversion cached.

The reference is the official arithmetic: fp32, ddim20 inversion + ddim20 sampling (40 UNet
calls). Every fast setting (precision "auto", DPM-Solver++(2M) at several step counts, with
and without feature caching) is printed next to it with seconds per edit, UNet calls per edit
(full / all), peak memory, the speed-up over the reference and the drift: PSNR of its edit
against the reference edit of the same deterministic-random-weight model (random weights say
nothing about quality: see bench_quality.py for that). Each setting runs in its own
subprocess so that peak memory is its own (CUDA: max allocated by torch; CPU: process max RSS).
A "light try" times the sampling alone from an inversion made once beforehand (what an
interactive relight repeats: `invert_faces` once, then `edit_faces(start=...)` per try); its
edit is bit for bit the whole edit of the same setting.

Then, per preset (official, fast, faster: `SAMPLING_PRESETS`), what iterating on light costs in
ComfyUI: the inversion (`invert_faces`), a light try (`edit_faces` from that `InvertedStart`:
sampling only, what a run after a light change pays when the DiffusionRig Invert node is cached)
and the full edit, their sum (what `edit_faces(start="inversion")` runs, and the first run pays),
with speed-ups over the official fp32 edit of the first table.

    python benchmarks/bench_sample.py                  # 256 px, official size (~10 min on 2 CPU cores)
    python benchmarks/bench_sample.py --size 64 --repeat 3   # quick run, same widths at 64 px
    python benchmarks/bench_sample.py --device cuda --batch 4
    python benchmarks/bench_sample.py --device cuda --compile --repeat 3   # + CUDA graphs (torch.compile)
    python benchmarks/bench_sample.py --settings "official fp32 ddim20"   # the reference, then the light tries
    python benchmarks/bench_sample.py --tiny --json out.json   # plumbing check: a 32 px, 32-channel model
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

from comfy_diffusionrig.model.sampler_presets import SAMPLING_PRESETS

# name: (sampler, steps, cache interval, precision, inversion cached); the first is the reference
SETTINGS = {
    "official fp32 ddim20": ("ddim", 20, 1, "fp32", False),
    "ddim20": ("ddim", 20, 1, "auto", False),
    "ddim20 + cache 2": ("ddim", 20, 2, "auto", False),
    "dpmpp_2m 12": ("dpmpp_2m", 12, 1, "auto", False),
    "dpmpp_2m 10": ("dpmpp_2m", 10, 1, "auto", False),
    "dpmpp_2m 8 (fast)": ("dpmpp_2m", 8, 1, "auto", False),
    "dpmpp_2m 7 (faster)": ("dpmpp_2m", 7, 1, "auto", False),
    "dpmpp_2m 12 + cache 2": ("dpmpp_2m", 12, 2, "auto", False),
    "dpmpp_2m 10 + cache 2": ("dpmpp_2m", 10, 2, "auto", False),
    "faster, light try": ("dpmpp_2m", 7, 1, "auto", True),  # sampling only, from a kept inversion
}
TINY = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
            num_head_channels=16)  # --tiny: widths that only check the plumbing (32 px)


def make_model(device, image_size: int = 256, tiny: bool = False):
    """Official default config (at image_size; tiny: `TINY` widths) with deterministic random weights.

    Zero-initialised layers (output convs, attention projections) are re-drawn N(0, 0.02) and
    norm scales 1 + N(0, 0.02), as the parity fixtures do, so every layer contributes.
    """
    from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

    torch.manual_seed(0)
    widths = TINY if tiny else dict(channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(image_size // 16,))
    model = DiffusionRig(UNetConfig(image_size=image_size, **widths))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif torch.all(p == 1):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval().to(device)


def inputs(batch: int, size: int, device):
    """A random photo [B,3,S,S] and its source and target buffers [B,9,S,S] (rendered|normal|albedo)."""
    gen = torch.Generator().manual_seed(7)

    def buffers():
        return torch.cat([torch.rand(batch, 3, size, size, generator=gen),
                          torch.rand(batch, 3, size, size, generator=gen) * 2 - 1,
                          torch.rand(batch, 3, size, size, generator=gen)], 1).to(device)

    image = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    return image, buffers(), buffers()


def prepared_model(device, size: int, dtype: torch.dtype, tiny: bool = False):
    """`make_model` with its UNet in `dtype` (channels-last below fp32, as the nodes run it)."""
    model = make_model(device, size, tiny)
    model.denoisingUNet.to(dtype)
    if dtype != torch.float32:
        model.to(memory_format=torch.channels_last)
    return model


class Counted:
    """Passes denoiser calls through and counts them."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.config, self.device, self.check_image_size = model.config, model.device, model.check_image_size

    def denoise(self, *args):
        self.calls += 1
        return self.model.denoise(*args)


def run_one(name: str, size: int, batch: int, device: str, precision: str | None, repeat: int,
            out_file: str, compile_unet: bool = False, tiny: bool = False, backend: str = "inductor") -> None:
    from comfy_diffusionrig.core.devices import resolve_dtype
    from comfy_diffusionrig.model.diffusion import sampler_functions
    from comfy_diffusionrig.model.feature_cache import FeatureCache

    sampler, steps, interval, setting_precision, cached = SETTINGS[name]
    dtype = resolve_dtype(setting_precision if setting_precision == "fp32" else precision or "auto", device)
    model = prepared_model(device, size, dtype, tiny)
    sample, invert = sampler_functions(sampler)
    image, source, target = inputs(batch, size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    compiled = compile_unet and interval == 1 and name != next(iter(SETTINGS))
    if compiled:  # CUDA: CUDA graphs replay the ~500 kernel launches of a call (batch 1 is launch-bound)
        mode = None if backend != "inductor" else "reduce-overhead" if device == "cuda" else "default"
        model.denoisingUNet = torch.compile(model.denoisingUNet, backend=backend, mode=mode, dynamic=False)
    with torch.inference_mode():
        code = model.encode(image)
        model.denoise(image, torch.zeros(batch, dtype=torch.int64, device=device), source, code)  # warm-up
        kept = invert(model, image, source, code, steps=steps) if cached else None  # the light try's inversion
        if compiled:  # compiling and graph capture happen in the first calls: one whole edit, untimed
            sample(model, target, code, invert(model, image, source, code, steps=steps), steps=steps)
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(repeat):  # the fastest of `repeat` edits: the least disturbed by other processes
            net = Counted(FeatureCache(model, interval) if interval > 1 else model)
            start = time.perf_counter()
            x_t = kept if cached else invert(net, image, source, code, steps=steps)
            out = sample(net, target, code, x_t, steps=steps)
            sync()
            seconds.append(time.perf_counter() - start)
    full = net.model.full_calls if interval > 1 else net.calls
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch.save(out.float().cpu(), out_file + ".pt")
    with open(out_file, "w") as f:
        json.dump({"seconds": min(seconds), "calls": net.calls, "full_calls": full, "peak_bytes": peak,
                   "dtype": str(dtype).removeprefix("torch.") + ("+compile" if compiled else "")}, f)


def run_try(preset: str, size: int, batch: int, device: str, precision: str, repeat: int, out_file: str,
            tiny: bool = False) -> None:
    """Time the inversion and a light try (sampling from the kept inverted start) with a preset's settings."""
    from comfy_diffusionrig import edit_faces, invert_faces
    from comfy_diffusionrig.core.devices import resolve_dtype

    settings = SAMPLING_PRESETS[preset]
    model = prepared_model(device, size, resolve_dtype(precision, device), tiny)
    image, source, target = inputs(batch, size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        code = model.encode(image)
        model.denoise(image, torch.zeros(batch, dtype=torch.int64, device=device), source, code)  # warm-up
        tries, inversions = [], []
        for _ in range(repeat):
            seconds, start = timed(lambda: invert_faces(model, image, source, code, batch_size=batch, **settings))
            inversions.append(seconds)
            tries.append(timed(lambda: edit_faces(model, None, None, target, code, start=start, batch_size=batch,
                                                  **settings))[0])
    # edit_faces(start="inversion") is exactly these two calls (bit for bit), so the first run's edit costs their sum
    with open(out_file, "w") as f:
        json.dump({"edit": min(inversions) + min(tries), "invert": min(inversions), "try": min(tries),
                   "dtype": str(next(model.denoisingUNet.parameters()).dtype).removeprefix("torch.")}, f)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # images in [-1, 1] -> peak-to-peak 1 after /2
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size (256 = official)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    parser.add_argument("--precision", default="auto", help="precision of the fast settings: auto, bf16, fp16, fp32")
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"subset of {list(SETTINGS)} (the first always runs)")
    parser.add_argument("--repeat", type=int, default=1, help="time each edit this many times, keep the fastest")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet of the uncached fast settings (CUDA: mode reduce-overhead, "
                             "i.e. CUDA graphs); the first edit compiles and is not timed")
    parser.add_argument("--presets", nargs="*", default=None,
                        help="presets whose light try to time (default: all of SAMPLING_PRESETS; none: skip)")
    parser.add_argument("--try", dest="try_", nargs=8, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 32-channel model (default 32 px): checks the "
                                                             "plumbing, says nothing about speed")
    parser.add_argument("--json", help="also write every row's figures to this JSON file")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager: traces the UNet without compiling, for dry runs)")
    parser.add_argument("--one", nargs=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.try_:
        preset, size, batch, device, precision, repeat, out_file, tiny = args.try_
        run_try(preset, int(size), int(batch), device, precision, int(repeat), out_file, tiny == "1")
        return
    if args.one:
        name, size, batch, device, precision, repeat, out_file, compile_unet, tiny, backend = args.one
        run_one(name, int(size), int(batch), device, precision, int(repeat), out_file, compile_unet == "1",
                tiny == "1", backend)
        return
    if args.tiny and args.size == 256:
        args.size = 32
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    reference_name = next(iter(SETTINGS))
    names = [reference_name] + [n for n in (args.settings or SETTINGS) if n != reference_name]
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_sample_{os.getpid()}")
    widths = "tiny (32-channel) widths" if args.tiny else "official default widths"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {widths} at {args.size} px, "
          f"batch {args.batch}, fastest of {args.repeat}; one edit = inversion + sampling; "
          "drift = PSNR against the reference edit")
    print(f"{'device':6} {'setting':24} {'dtype':16} {'calls':>7} {'s/edit':>8} {'speed-up':>8} {'peak MiB':>9} "
          f"{'drift dB':>8}")
    references = {}
    rows = []
    for device in devices:
        reference = ref_seconds = None
        for name in names:
            out_file = f"{tmp}_{device}_{names.index(name)}.json"
            subprocess.run([sys.executable, __file__, "--one", name, str(args.size), str(args.batch), device,
                            args.precision, str(args.repeat), out_file, "1" if args.compile else "0",
                            "1" if args.tiny else "0", args.compile_backend], check=True)
            with open(out_file) as f:
                r = json.load(f)
            edit = torch.load(out_file + ".pt")
            os.remove(out_file)
            os.remove(out_file + ".pt")
            if reference is None:
                reference, ref_seconds = edit, r["seconds"]
                references[device] = ref_seconds
            drift = "reference" if name == reference_name else f"{psnr(edit, reference):.1f}"
            print(f"{device:6} {name:24} {r['dtype']:16} {r['full_calls']:3d}/{r['calls']:<3d} {r['seconds']:8.3f} "
                  f"{ref_seconds / r['seconds']:7.2f}x {r['peak_bytes'] / 2**20:9.0f} {drift:>8}", flush=True)
            rows.append({"device": device, "setting": name, "size": args.size, "batch": args.batch,
                         "tiny": args.tiny, **r, "speed_up": ref_seconds / r["seconds"],
                         "drift_db": None if name == reference_name else psnr(edit, reference)})
            if args.json:  # written after every row: a run stopped at its time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    presets = list(SAMPLING_PRESETS) if args.presets is None else args.presets
    if not presets:
        return
    print(f"\nIterating on light: the full edit (the first run) and a light try with the inversion cached "
          f"(sampling from an InvertedStart: a run after a light change), precision {args.precision}; speed-up over "
          "the official fp32 edit above")
    print(f"{'device':6} {'preset':8} {'dtype':9} {'s/invert':>8} {'s/edit':>8} {'speed-up':>8} {'s/try':>8} "
          f"{'speed-up':>8}")
    for device in devices:
        for preset in presets:
            out_file = f"{tmp}_{device}_try_{preset}.json"
            subprocess.run([sys.executable, __file__, "--try", preset, str(args.size), str(args.batch), device,
                            args.precision, str(args.repeat), out_file, str(int(args.tiny))], check=True)
            with open(out_file) as f:
                r = json.load(f)
            os.remove(out_file)
            ref = references[device]
            print(f"{device:6} {preset:8} {r['dtype']:9} {r['invert']:8.2f} {r['edit']:8.2f} {ref / r['edit']:7.2f}x "
                  f"{r['try']:8.2f} {ref / r['try']:7.2f}x", flush=True)
            rows.append({"device": device, "preset": preset, "size": args.size, "batch": args.batch,
                         "tiny": args.tiny, **r, "speed_up_edit": ref / r["edit"], "speed_up_try": ref / r["try"]})
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

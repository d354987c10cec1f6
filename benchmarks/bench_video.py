"""Benchmark: flicker of a relit clip against a known answer, with and without temporal smoothing.

A synthetic subject of the demo's World moves and talks through a short clip (smoothly varying
head pose, jaw and expression) under light A; the same clip under light B is the ground
truth. A small DiffusionRig is trained on photos of that subject (the demo's training code).
Fitting noise is simulated: every frame's codes are the true ones plus jitter (shape, pose,
jaw, expression, camera, light), as per-frame DECA fits give them. Each variant renders its
buffers, relights the clip A -> B with `edit_faces` (inversion, ddim20) and is scored against
the truth: per-frame PSNR, and the temporal error mean |(out_t - out_t-1) - (truth_t - truth_t-1)|
in 8-bit levels (0 = the clip changes from frame to frame exactly as the truth does).

    python benchmarks/bench_video.py                     # trains once into bench_video_work/ (minutes)
    python benchmarks/bench_video.py --strengths 0 1 2 4 --frames 24
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_diffusionrig.face.buffers import project  # noqa: E402
from comfy_diffusionrig.demo.run import _flame_dir, DemoConfig  # noqa: E402
from comfy_diffusionrig.demo.world import World  # noqa: E402
from comfy_diffusionrig.editing import edit_faces  # noqa: E402
from comfy_diffusionrig.face.lighting import sh_from_direction  # noqa: E402
from comfy_diffusionrig.demo.metrics import psnr  # noqa: E402
from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train  # noqa: E402
from comfy_diffusionrig.model.unet import DiffusionRig  # noqa: E402
from comfy_diffusionrig.video import frame_jitter, smooth_codes  # noqa: E402

LIGHT_A = dict(azimuth_deg=-50.0, elevation_deg=20.0, intensity=0.9, ambient=0.5)
LIGHT_B = dict(azimuth_deg=60.0, elevation_deg=30.0, intensity=0.9, ambient=0.45)
# fitting noise per frame (standard deviations), about what per-frame fits of a still face jitter by
JITTER = {"shape": 0.15, "head_deg": 1.5, "jaw_deg": 1.0, "exp": 0.15, "cam_scale": 0.01, "cam_shift": 0.003,
          "light": 0.03}


def clip_views(world: World, frames: int, light: torch.Tensor, seed: int) -> list[dict]:
    """A talking, turning head: yaw and pitch swing, the jaw opens and closes, the expression drifts."""
    g = torch.Generator().manual_seed(seed)
    exp_a, exp_b = (0.8 * torch.randn(50, generator=g) * torch.linspace(1, 0.1, 50) for _ in range(2))
    views = []
    for t in range(frames):
        s = t / max(frames - 1, 1)
        pose = torch.zeros(6)
        pose[1] = math.radians(20 * math.sin(2 * math.pi * s))  # yaw
        pose[0] = math.radians(5 * math.sin(4 * math.pi * s))  # pitch
        pose[3] = math.radians(6 + 6 * math.sin(6 * math.pi * s))  # jaw: talking
        mix = (1 - math.cos(math.pi * s)) / 2
        views.append({"exp": (1 - mix) * exp_a + mix * exp_b, "pose": pose, "light": light, "cam": world.cam.clone()})
    return views


def true_codes(subject: dict, views: list[dict]) -> dict:
    n = len(views)
    codes = {k: torch.stack([v[k] for v in views]) for k in ("exp", "pose", "cam", "light")}
    return {"shape": subject["shape"].expand(n, -1).clone(), **codes}


def jittered(codes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    noise = lambda like, sd: sd * torch.randn(like.shape, generator=g)  # noqa: E731
    out = {k: v.clone() for k, v in codes.items()}
    out["shape"] += noise(out["shape"], JITTER["shape"])
    out["pose"][:, 0:3] += noise(out["pose"][:, 0:3], math.radians(JITTER["head_deg"]))
    out["pose"][:, 3] += noise(out["pose"][:, 3], math.radians(JITTER["jaw_deg"]))
    out["exp"] += noise(out["exp"], JITTER["exp"]) * torch.linspace(1, 0.2, 50)
    out["cam"][:, 0] *= 1 + noise(out["cam"][:, 0], JITTER["cam_scale"])
    out["cam"][:, 1:] += noise(out["cam"][:, 1:], JITTER["cam_shift"])
    out["light"] += noise(out["light"], JITTER["light"])
    return out


@torch.no_grad()
def render_buffers(world: World, subject: dict, codes: dict, light: torch.Tensor | None = None) -> torch.Tensor:
    """[T, 9, S, S] buffers of per-frame codes (the subject's texture; `light` replaces the codes' light)."""
    verts, _, _ = world.flame(codes["shape"], codes["exp"], codes["pose"])
    albedo = world.texture(subject["tex"].expand(len(verts), -1))
    sh = codes["light"] if light is None else light.expand(len(verts), 9, 3)
    return world.renderer.render_buffers(verts, project(verts, codes["cam"]), albedo, sh, image_size=(world.size,) * 2)


def variant(codes: dict, share_shape: bool, strength: float) -> dict:
    """What the clip path does to per-frame fits: the clip's mean shape, then smoothing over time."""
    out = dict(codes)
    if share_shape:
        out["shape"] = codes["shape"].mean(0, keepdim=True).expand_as(codes["shape"]).clone()
    return smooth_codes(out, strength)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_video_work", help="folder for the trained model (reused)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--views", type=int, default=96, help="training photos of the subject")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seed", type=int, default=None, help="seed of the fitting noise (default: seed + 2)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    config = DemoConfig(seed=args.seed)
    world = World(_flame_dir(None, work, args.seed)[0], config.size, args.seed)
    person = world.subjects(1)[0]
    photos, buffers = world.photograph(person, world.views(args.views))

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = DiffusionRig(config.unet())
    settings = TrainConfig(steps=args.train_steps, lr=config.stage1_lr, batch_size=config.stage1_batch,
                           seed=args.seed, precision="fp32", train_encoder=True,
                           checkpoint_every=max(1, args.train_steps // 10))
    model, losses = train(model, TrainingData(photos, buffers), settings, checkpoint_path=work / "model.pt")
    trained = time.perf_counter() - started
    last_loss = losses[-1] if losses else float("nan")

    light_a = sh_from_direction(**LIGHT_A).float()
    light_b = sh_from_direction(**LIGHT_B).float()
    views_a = clip_views(world, args.frames, light_a, args.seed + 1)
    views_b = [{**v, "light": light_b} for v in views_a]
    clip_a, _ = world.photograph(person, views_a)
    truth, _ = world.photograph(person, views_b)
    truth01 = (truth + 1) / 2
    with torch.no_grad():
        raw_codes = model.encode(clip_a)
    exact = true_codes(person, views_a)
    fitted = jittered(exact, args.seed + 2 if args.noise_seed is None else args.noise_seed)

    rows = [("true codes (no fitting noise)", exact, False, 0.0),
            ("per-frame fits, each its own shape", fitted, False, 0.0),
            ("clip mean shape, strength 0 (no smoothing)", fitted, True, 0.0)]
    rows += [(f"clip mean shape, strength {s:g}", fitted, True, s) for s in args.strengths]
    print(f"clip: {args.frames} frames at {config.size} px; model trained {args.train_steps} steps on "
          f"{args.views} photos of the subject ({trained:.0f} s, last loss {last_loss:.4f}); "
          f"ddim{args.steps} inversion A -> B")
    no_edit = (clip_a + 1) / 2
    no_edit_psnr = float(psnr(no_edit, truth01).mean())
    print(f"the clip under light A itself scores {no_edit_psnr:.2f} dB against the truth under B\n")
    print("| codes | PSNR mean (dB) | PSNR min | temporal error (8-bit levels) | head pose error RMS / jitter (deg) "
          "| per-frame PSNR |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, codes, share, strength in rows:
        t0 = time.perf_counter()
        used = variant(codes, share, strength)
        source = render_buffers(world, person, used)
        target = render_buffers(world, person, used, light_b)
        global_codes = smooth_codes({"code": raw_codes}, strength, keys=("code",))["code"]
        out = edit_faces(model, clip_a, source, target, global_codes, steps=args.steps, batch_size=args.frames)
        out01 = (out.clamp(-1, 1) + 1) / 2
        scores = psnr(out01, truth01)
        temporal = float(((out01[1:] - out01[:-1]) - (truth01[1:] - truth01[:-1])).abs().mean()) * 255
        error = math.degrees(float((used["pose"][:, 0:3] - exact["pose"][:, 0:3]).pow(2).sum(1).mean().sqrt()))
        jitter = math.degrees(frame_jitter(used["pose"][:, 0:3] - exact["pose"][:, 0:3]))
        per_frame = " ".join(f"{float(v):.1f}" for v in scores)
        print(f"| {name} | {float(scores.mean()):.2f} | {float(scores.min()):.2f} | {temporal:.2f} | "
              f"{error:.2f} / {jitter:.2f} | "
              f"{per_frame} |  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

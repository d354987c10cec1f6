"""Benchmark: image quality of each sampler setting on a small DiffusionRig trained here.

Random weights say nothing about quality, so this trains a tiny model on the offline demo's
synthetic world (stage 1 on many subjects, then a stage-2 fine-tune on one new subject's
album; a few minutes on 2 CPU cores, cached in --work), then scores, per sampler setting,
on held-out photos of that subject:
* reconstruction PSNR: invert a photo under its buffers and sample it back under the same;
* edit PSNR: invert a photo, sample under another view's buffers (light, expression, pose),
  compare with the true photo of that view.
Every figure is also given as the difference to the official ddim20 (40 UNet calls per edit).

    python benchmarks/bench_quality.py                 # train (once) and score every setting
    python benchmarks/bench_quality.py --work /tmp/q   # where the trained model is cached

On a shared machine run it with OMP_NUM_THREADS=1: two OpenMP threads on two busy cores
trained ~10x slower here (the training took 18.5 min single-threaded under that load).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench_sample import Counted
from comfy_diffusionrig.model import diffusion as D
from comfy_diffusionrig.demo.run import _flame_dir, DemoConfig
from comfy_diffusionrig.demo.world import World
from comfy_diffusionrig.model.feature_cache import FeatureCache
from comfy_diffusionrig.demo.metrics import psnr
from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train
from comfy_diffusionrig.model.unet import DiffusionRig

# between the quick test config and the full demo: about 4 minutes of training on 2 cores
CONFIG = DemoConfig(subjects=16, views=12, album=20, held_out=12, stage1_steps=600, stage2_steps=200)


def _progress(stage: str):
    def report(step, total, loss, model):
        if step % 50 == 0 or step == total:
            print(f"{stage}: step {step}/{total}, loss {loss:.4f}", flush=True)
    return report


def trained_model(work: Path, config: DemoConfig = CONFIG) -> tuple[DiffusionRig, dict]:
    """The personalized model and held-out data, trained once and cached in work/model.pt."""
    cache = work / "model.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        model = DiffusionRig(config.unet())
        model.load_state_dict(saved.pop("state"))
        return model.eval(), saved
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    flame_dir, _ = _flame_dir(None, work, config.seed)
    world = World(flame_dir, config.size, config.seed)
    images, buffers = zip(*(world.photograph(s, world.views(config.views)) for s in world.subjects(config.subjects)))
    person = world.subjects(1)[0]
    album = TrainingData(*world.photograph(person, world.views(config.album)))
    photos, held_buffers = world.photograph(person, world.views(2 * config.held_out))
    torch.manual_seed(config.seed)
    model = DiffusionRig(config.unet())
    stage1 = TrainConfig(steps=config.stage1_steps, lr=config.stage1_lr, batch_size=config.stage1_batch,
                         seed=config.seed, precision="fp32", train_encoder=True, checkpoint_every=10 ** 9)
    model, _ = train(model, TrainingData(torch.cat(images), torch.cat(buffers)), stage1, callback=_progress("stage 1"))
    stage2 = TrainConfig(steps=config.stage2_steps, lr=config.stage2_lr, batch_size=4, seed=config.seed + 1,
                         precision="fp32", checkpoint_every=10 ** 9)
    model, _ = train(model, album, stage2, callback=_progress("stage 2"))
    data = {"source": photos[0::2], "target": photos[1::2], "source_buffers": held_buffers[0::2],
            "target_buffers": held_buffers[1::2]}
    torch.save({"state": model.state_dict(), **data}, cache)
    print(f"trained in {time.perf_counter() - start:.0f} s, cached in {cache}", flush=True)
    return model.eval(), data


def fixed_point(iterations: int):
    def invert(*args, **kwargs):
        return D.ddim_invert_fixed_point(*args, iterations=iterations, **kwargs)
    return invert


# name: (sample_fn, invert_fn, steps, cache interval)
def second_order(*args, **kwargs):
    return D.dpmpp_2m_invert(*args, order=2, **kwargs)


SETTINGS = {
    "ddim20 (official)": (D.ddim_sample, D.ddim_invert, 20, 1),
    "ddim12": (D.ddim_sample, D.ddim_invert, 12, 1),
    "ddim10": (D.ddim_sample, D.ddim_invert, 10, 1),
    "ddim20, fixed-point inversion k=1": (D.ddim_sample, fixed_point(1), 20, 1),
    "dpmpp_2m 10 on the ddim10 stride": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, "ddim10", 1),
    "dpmpp_2m 20": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 20, 1),
    "dpmpp_2m 12": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 12, 1),
    "dpmpp_2m 10": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 10, 1),
    "dpmpp_2m 8": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 8, 1),
    "dpmpp_2m 6": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 6, 1),
    "dpmpp_2m 10, 2nd-order inversion": (D.dpmpp_2m_sample, second_order, 10, 1),
    "dpmpp_2m 10, fixed-point inversion k=1": (D.dpmpp_2m_sample, fixed_point(1), "logsnr10", 1),
    "dpmpp_2m 10, official DDIM inversion": (D.dpmpp_2m_sample, D.ddim_invert, "logsnr10", 1),
    "ddim20 + cache 2": (D.ddim_sample, D.ddim_invert, 20, 2),
    "ddim20 + cache 3": (D.ddim_sample, D.ddim_invert, 20, 3),
    "ddim12 + cache 2": (D.ddim_sample, D.ddim_invert, 12, 2),
    "dpmpp_2m 12 + cache 2": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 12, 2),
    "dpmpp_2m 10 + cache 2": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 10, 2),
    "dpmpp_2m 8 + cache 2": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 8, 2),
    "dpmpp_2m 10 + cache 3": (D.dpmpp_2m_sample, D.dpmpp_2m_invert, 10, 3),
}


def score(model, data: dict, setting: tuple) -> dict:
    """Reconstruction and edit PSNR (dB, images in [0, 1]) and UNet calls per edit of one setting."""
    sample, invert, steps, interval = setting
    net = Counted(FeatureCache(model, interval) if interval > 1 else model)
    with torch.no_grad():
        code = model.encode(data["source"])
        x_t = invert(net, data["source"], data["source_buffers"], code, steps=steps)
        recon = sample(net, data["source_buffers"], code, x_t, steps=steps)
        calls = net.calls  # one inversion + one sampling: an edit
        full = net.model.full_calls if interval > 1 else calls
        edit = sample(net, data["target_buffers"], code, x_t, steps=steps)
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    return {"recon": float(psnr(to01(recon), to01(data["source"])).mean()),
            "edit": float(psnr(to01(edit), to01(data["target"])).mean()),
            "calls": calls, "full_calls": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_quality"))
    parser.add_argument("--train-only", action="store_true", help="train and cache the model, score nothing")
    args = parser.parse_args()
    model, data = trained_model(args.work)
    if args.train_only:
        return
    print(f"{len(data['source'])} held-out edits at {CONFIG.size} px; PSNR in dB (images in [0, 1]); "
          "calls = UNet calls per edit (inversion + sampling), full = of which full (not cached)")
    print(f"{'setting':40} {'calls':>5} {'full':>5} {'recon':>6} {'d recon':>7} {'edit':>6} {'d edit':>6}")
    reference = None
    for name, setting in SETTINGS.items():
        r = score(model, data, setting)
        reference = reference or r
        print(f"{name:40} {r['calls']:5d} {r['full_calls']:5.0f} {r['recon']:6.2f} "
              f"{r['recon'] - reference['recon']:+7.2f} {r['edit']:6.2f} {r['edit'] - reference['edit']:+6.2f}", flush=True)


if __name__ == "__main__":
    main()

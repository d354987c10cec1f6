"""Benchmark: paste back at full resolution against a known answer (plain, upscaler, detail transfer, + rig motion).

The offline demo's person (its World, its personalized model) is photographed at a high
resolution (--size px, the face filling about a third of the frame), with fine skin and
background detail that no 32 px model can hold, under a light A; the truth is the same person
photographed under a light B (the "light" edit) and, for the "expression & pose" edit, also with
the jaw opened, another expression and the head turned. The photo under A is aligned (FFHQ, from
its true landmarks), edited A -> B by the personalized model (inversion, ddim 20, buffers of the
true rigs), and pasted back into the photo under A in each way:

* plain: the edit's pixels (`paste_back(detail="edit")`, the paste of old);
* upscaler: the workflow paste_back_upscale.json's path: the demo assets' 4x Compact upscaler, then
  the edit's pixels with colour matching (a random-weight stand-in: about a nearest-neighbour 4x);
* ratio / difference at each radius: the photo's own detail with the edit's smoothed change;
* ... + rig motion: the photo's detail moved by the motion between the two rigs (`rig_motion`), the
  edit's pixels where it cannot be trusted.

Scores against the truth at full resolution: PSNR in the face box (the box of the pasted region),
the high-frequency energy of the face against the truth's (1 = as much fine detail as the truth)
and the detail SNR (how close that detail is to the truth's: energy of the truth's detail over the
error of the result's, in dB). "perfect edit" rows paste the true photo under B, aligned like the
source (what a flawless model would give), at the model's size and at 256 px: the loss of paste
back alone.

    python benchmarks/bench_detail.py --demo demo_output            # the demo's report.json and models
    python benchmarks/bench_detail.py --demo demo_output --size 1024 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_diffusionrig.demo.run import DemoConfig, World, demo_file_names  # noqa: E402
from comfy_diffusionrig.demo.synthetic import DEMO_UPSCALER_NAME, compact_upscale, write_demo_upscaler  # noqa: E402
from comfy_diffusionrig.core.imaging import pil_to_tensor, tensor_to_pil  # noqa: E402
from comfy_diffusionrig.editing import edit_faces  # noqa: E402
from comfy_diffusionrig.face.buffers import DECA_CROP_SIZE  # noqa: E402
from comfy_diffusionrig.face.deca import load_deca  # noqa: E402
from comfy_diffusionrig.face.flame import head_id  # noqa: E402
from comfy_diffusionrig.face.lighting import sh_from_direction  # noqa: E402
from comfy_diffusionrig.face.motion import rig_motion  # noqa: E402
from comfy_diffusionrig.face.rig import FaceRig, edit_pose, render_rig  # noqa: E402
from comfy_diffusionrig.face.rig_files import read_rig  # noqa: E402
from comfy_diffusionrig.model.checkpoints import load_diffusionrig  # noqa: E402
from comfy_diffusionrig.photo.alignment import AlignedFace, ffhq_align, ffhq_quad  # noqa: E402
from comfy_diffusionrig.photo.detection import Face  # noqa: E402
from comfy_diffusionrig.photo.paste import paste_faces  # noqa: E402

LIGHTS = [(dict(azimuth_deg=-55.0, elevation_deg=20.0, intensity=0.95, ambient=0.45),
           dict(azimuth_deg=50.0, elevation_deg=35.0, intensity=0.85, ambient=0.5)),
          (dict(azimuth_deg=40.0, elevation_deg=10.0, intensity=0.9, ambient=0.5),
           dict(azimuth_deg=-30.0, elevation_deg=55.0, intensity=1.0, ambient=0.4)),
          (dict(azimuth_deg=0.0, elevation_deg=60.0, intensity=0.8, ambient=0.55),
           dict(azimuth_deg=-70.0, elevation_deg=5.0, intensity=1.0, ambient=0.4))]
POSE_EDIT = dict(jaw_open=10.0, yaw=12.0, pitch=-4.0)  # and a new expression (see pose_edit)
RADII = (0.0, 1.0, 2.0, 4.0, 8.0)
UV_SIZE = 2048  # the fine-detail albedo map (the FLAME texture space is 256 px)


def demo_person(world: World, config: DemoConfig) -> dict:
    """The demo's personalized subject: `run_demo` draws the crowd, one set of views per crowd member, then
    the person, from one generator; drawing the same gives the same person."""
    world.subjects(config.subjects)
    for _ in range(config.subjects):
        world.views(config.views)
    return world.subjects(1)[0]


def fine_detail(person: dict, seed: int) -> dict:
    """What only a high-resolution photo of the person holds: a pore-scale pattern on the albedo
    (multiplicative, band-passed noise in UV space) and a fine texture on the background."""
    g = torch.Generator().manual_seed(seed)

    def band(shape, fine, coarse):
        noise = torch.randn(1, 1, *shape, generator=g)
        return _blur(noise, fine) - _blur(noise, coarse)

    skin = band((UV_SIZE, UV_SIZE), 1.2, 4.0)
    background = band((2048, 2048), 1.0, 3.0)
    return {"skin": (skin / skin.std())[0], "background": (background / background.std())[0]}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def photograph(world: World, deca, person: dict, detail: dict, codes: dict, center: torch.Tensor, size: int) -> Image.Image:
    """The person under `codes` as a size x size photo (2x supersampled; the camera's crop space is the frame),
    the head moved to its FFHQ `center` as the renderer of the rigs moves it."""
    with torch.no_grad():
        geometry = deca.decode(codes, None, None, center)
        albedo = world.texture(codes["tex"])
        albedo = albedo + F.interpolate(person["marks"][None], size=albedo.shape[-2:], mode="bilinear",
                                        align_corners=False)
        albedo = F.interpolate(albedo, size=(UV_SIZE, UV_SIZE), mode="bilinear", align_corners=False)
        albedo = albedo * (1 + 0.12 * detail["skin"])
        big = world.renderer(geometry["verts"], geometry["trans_verts"], albedo, codes["light"],
                             image_size=(2 * size, 2 * size))
        lo, hi = person["background"]
        ramp = torch.linspace(0, 1, 2 * size)[:, None].expand(2 * size, 2 * size)
        texture = F.interpolate(detail["background"][None], size=(2 * size, 2 * size), mode="bilinear",
                                align_corners=False)[0]
        background = (lo[:, None, None] * (1 - ramp) + hi[:, None, None] * ramp) * (1 + 0.06 * texture)
        photo = big["alpha"][0] * big["rendered"][0].clamp(0, 1) + (1 - big["alpha"][0]) * background
        photo = F.avg_pool2d(photo[None], 2)[0].clamp(0, 1)
    return Image.fromarray(np.uint8(np.rint(photo.permute(1, 2, 0).numpy() * 255)))


def landmarks_px(deca, codes: dict, size: int) -> np.ndarray:
    """[68, 2] true landmarks in photo pixels (centres at integers) of `photograph(..., size)` (unedited head)."""
    with torch.no_grad():
        lm = deca.decode(codes)["landmarks2d"][0].double().numpy()
    return (lm + 1) * size / 2 - 0.5


def aligned_rig(codes: dict, center: torch.Tensor, face: AlignedFace, photo_size: int, head: str) -> FaceRig:
    """The rig of an aligned face of the photo: crop space (the photo's frame at 224 px) -> aligned pixels."""
    crop_to_photo = np.diag([photo_size / DECA_CROP_SIZE, photo_size / DECA_CROP_SIZE, 1.0])  # pixel edges
    half = lambda d: np.array([[1, 0, d], [0, 1, d], [0, 0, 1.0]])  # noqa: E731  edges <-> centres
    column = half(0.5) @ face.transform @ half(-0.5) @ crop_to_photo
    tform = torch.tensor(column.T, dtype=torch.float32)[None]  # the renderer's row-vector convention
    return FaceRig({k: v.clone() for k, v in codes.items()}, tform, center.clone(), (face.size, face.size), head)


def align(photo: Image.Image, landmarks: np.ndarray, size: int) -> AlignedFace:
    image, transform = ffhq_align(photo, landmarks, size)
    box = (*landmarks.min(0), *landmarks.max(0))
    return AlignedFace(image, transform, ffhq_quad(landmarks)[0], photo.size, Face(box, landmarks, 1.0, "true"))


def pose_edit(codes: dict, seed: int) -> dict:
    rig = FaceRig(codes, torch.eye(3)[None], torch.zeros(1, 3), (1, 1))
    g = torch.Generator().manual_seed(1000 + seed)
    exp = codes["exp"] + 0.9 * torch.randn(1, 50, generator=g) * torch.linspace(1, 0.1, 50)
    return edit_pose(rig, **POSE_EDIT).with_codes(exp=exp).codes


def scores(result: Image.Image, truth: Image.Image, box: tuple[int, int, int, int], face: np.ndarray,
           hf_sigma: float) -> dict:
    from scipy.ndimage import gaussian_filter

    x0, y0, x1, y1 = box
    a = np.asarray(result, np.float64)[y0:y1, x0:x1] / 255
    b = np.asarray(truth, np.float64)[y0:y1, x0:x1] / 255
    inside = face[y0:y1, x0:x1]
    high = lambda img: img - gaussian_filter(img, (hf_sigma, hf_sigma, 0))  # noqa: E731
    ha, hb = high(a), high(b)
    truth_energy = float((hb[inside] ** 2).mean())
    db = lambda mse: 10 * math.log10(1 / max(mse, 1e-12))  # noqa: E731
    return {"psnr": db(float(((a - b) ** 2).mean())), "face psnr": db(float(((a - b)[inside] ** 2).mean())),
            "hf": float((ha[inside] ** 2).mean()) / truth_energy,
            "detail snr": 10 * math.log10(truth_energy / max(float(((ha - hb)[inside] ** 2).mean()), 1e-12))}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished `comfy-diffusionrig demo` output folder")
    parser.add_argument("--models", default=None, help="the models folder it installed into (default: the "
                                                       "report's)")
    parser.add_argument("--size", type=int, default=512, help="photo size (px)")
    parser.add_argument("--pairs", type=int, default=3, help="light pairs A -> B (up to 3)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--work", default="bench_detail_work", help="where the upscaler and pictures go")
    parser.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    report = json.loads((Path(args.demo) / "report.json").read_text())
    config = DemoConfig(**report["config"])
    quick = config != DemoConfig(seed=config.seed)  # `demo --quick` changes the settings
    models = Path(args.models) if args.models else Path(report["installed"]["models"][0]).parents[1]
    names = demo_file_names(config, quick)
    model = load_diffusionrig(models / "diffusionrig" / names["personalized"])
    deca = load_deca(models / "deca" / "deca_model.tar", models / "flame")
    world = World(models / "flame", config.size, config.seed)
    person = demo_person(world, config)
    installed = read_rig(models / "face_rigs" / names["person"].format(1))
    if not torch.allclose(installed.codes["shape"][0], person["shape"]):
        raise SystemExit("the replayed person is not the demo's: is --models the folder this demo installed into?")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    upscaler = models / "upscale_models" / DEMO_UPSCALER_NAME
    if not upscaler.is_file():
        upscaler = work / DEMO_UPSCALER_NAME
        if not upscaler.is_file():
            write_demo_upscaler(work, config.seed)
    from safetensors.torch import load_file
    up_state = load_file(upscaler)

    n, s = args.size, config.size
    detail = fine_detail(person, config.seed)
    head = head_id(deca.flame)
    hf_sigma = 1.5 * n / 512
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; photo {n}x{n}, model {s} px "
          f"({'quick' if quick else 'full'} demo), {args.pairs} light pair(s), ddim {args.steps}")
    rows: dict[tuple[str, str], list[dict]] = {}
    timing: dict[str, list[float]] = {}

    def add(edit: str, name: str, value: dict) -> None:
        rows.setdefault((edit, name), []).append(value)

    for pair in range(min(args.pairs, len(LIGHTS))):
        light_a, light_b = (sh_from_direction(**v).float()[None] for v in LIGHTS[pair])
        view = world.views(1)[0]
        cam = view["cam"].clone()[None]
        cam[:, 0] /= 1.5  # the FFHQ square spans two thirds of the frame, the face about a third
        cam[:, 1:] += torch.tensor([[0.12, -0.08]]) / cam[:, :1]  # ... off centre
        codes_a = {"shape": person["shape"][None], "tex": person["tex"][None], "exp": view["exp"][None],
                   "pose": view["pose"][None], "cam": cam, "light": light_a}
        with torch.no_grad():
            center = deca.decode(codes_a)["center"]
        photo_a = photograph(world, deca, person, detail, codes_a, center, n)
        lm = landmarks_px(deca, codes_a, n)
        face, face_256 = align(photo_a, lm, s), align(photo_a, lm, 256)
        source = aligned_rig(codes_a, center, face, n, head)
        edits = {"light": {**codes_a, "light": light_b}, "expression & pose": {**pose_edit(codes_a, pair),
                                                                               "light": light_b}}
        for edit, codes_b in edits.items():
            truth = photograph(world, deca, person, detail, codes_b, center, n)
            target = replace(source, codes={k: v.clone() for k, v in codes_b.items()})
            x = pil_to_tensor([face.image]) * 2 - 1
            with torch.no_grad():
                code = model.encode(x)
            edited = tensor_to_pil(edit_faces(model, x, render_rig(deca, source), render_rig(deca, target), code,
                                              steps=args.steps)[0])
            t = time.perf_counter()
            motion = rig_motion(deca, source, target)
            timing.setdefault("rig_motion", []).append(time.perf_counter() - t)
            plain = paste_faces(photo_a, face, edited, detail="edit")
            # scored where every paste owns the pixels: the face region drawn on the model's and on a 256 px grid
            inner = (plain.mask > 0.5) & (paste_faces(photo_a, face_256, face_256.image, detail="edit").mask > 0.5)
            ys, xs = np.nonzero(inner)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            score = lambda image: scores(image, truth, box, inner, hf_sigma)  # noqa: E731
            add(edit, "no edit (the photo under A)", score(photo_a))
            add(edit, "plain paste (detail = edit)", score(plain.image))
            with torch.no_grad():
                big = tensor_to_pil(compact_upscale(up_state, pil_to_tensor([edited]))[0], low=0.0)
            add(edit, "upscaler path (4x Compact, color_match)",
                score(paste_faces(photo_a, face, big, detail="edit", color_match=True).image))
            for mode in ("ratio", "difference"):
                for radius in args.radii:
                    t = time.perf_counter()
                    out = paste_faces(photo_a, face, edited, detail=mode, detail_radius=radius).image
                    timing.setdefault(mode, []).append(time.perf_counter() - t)
                    add(edit, f"{mode} r={radius:g}", score(out))
                    if edit != "light":
                        t = time.perf_counter()
                        moved = paste_faces(photo_a, face, edited, detail=mode, detail_radius=radius, motion=motion)
                        timing.setdefault(f"{mode} + motion", []).append(time.perf_counter() - t)
                        add(edit, f"{mode} r={radius:g} + rig motion", score(moved.image))
                        if pair == 0 and mode == "ratio" and radius == 2.0:
                            moved.image.save(work / f"pasted_{edit.split()[0]}_motion.png")
                            Image.fromarray(np.uint8(moved.edit_mask * 255)).save(work / "motion_mask.png")
            for size in sorted({s, 256}):
                perfect_face = face if size == s else face_256
                perfect = align(truth, lm, size).image  # the truth, framed like the source
                rig_a = aligned_rig(codes_a, center, perfect_face, n, head)
                perfect_motion = rig_motion(deca, rig_a, replace(rig_a, codes=codes_b))
                tag = f"perfect {size} px edit"
                add(edit, f"{tag}: plain", score(paste_faces(photo_a, perfect_face, perfect, detail="edit").image))
                for mode in ("ratio", "difference"):
                    for radius in args.radii:
                        add(edit, f"{tag}: {mode} r={radius:g}",
                            score(paste_faces(photo_a, perfect_face, perfect, detail=mode, detail_radius=radius).image))
                        if edit != "light":
                            add(edit, f"{tag}: {mode} r={radius:g} + rig motion",
                                score(paste_faces(photo_a, perfect_face, perfect, detail=mode, detail_radius=radius,
                                                  motion=perfect_motion).image))
            if pair == 0:
                for name, image in (("source", photo_a), (f"truth_{edit.split()[0]}", truth),
                                    (f"plain_{edit.split()[0]}", plain.image),
                                    (f"ratio_{edit.split()[0]}",
                                     paste_faces(photo_a, face, edited, detail="ratio", detail_radius=2.0).image)):
                    image.crop(box).save(work / f"{name}.png")
        print(f"pair {pair + 1} done", flush=True)

    for edit in ("light", "expression & pose"):
        print(f"\n{edit} edit (mean of {min(args.pairs, len(LIGHTS))} pair(s))\n")
        print("| paste back | PSNR face box (dB) | PSNR face (dB) | HF energy / truth's | detail SNR (dB) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for (kind, name), values in rows.items():
            if kind == edit:
                mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                print(f"| {name} | {mean['psnr']:.2f} | {mean['face psnr']:.2f} | {mean['hf']:.2f} | "
                      f"{mean['detail snr']:.2f} |")
    print("\nseconds per call: " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in timing.items()))


if __name__ == "__main__":
    main()

"""Benchmark: detect + FFHQ-align one photo at 1 MP and 12 MP, HOG vs CNN detector.

Photos are built from the example portraits (a face of about a third of the photo's height on a
plain background), so the figures are repeatable. Prints the median seconds of detection,
alignment (256 px, the official 4096 px render), paste back and their sum, plus the time to
decode the photo from JPEG. Goal on the 2-core CPU: detect + align under 0.5 s at 1 MP and
under 2 s at 12 MP (HOG).

Then, per size, the official recipe's detection (dlib HOG on the full-resolution RGB photo,
upsampled once, + the 68-point predictor) against ours, timed side by side in the same run (on a
shared machine only their ratio means much): whether the box is the official one, the landmark
error and the PSNR of our 256 px crop against the crop of the official landmarks.

    python benchmarks/bench_align.py                  # both sizes, both detectors
    python benchmarks/bench_align.py --sizes 1 --detectors hog --repeat 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_diffusionrig.photo.alignment import align_face, ffhq_align

from comfy_diffusionrig.photo.detection import detect_faces

from comfy_diffusionrig.photo.detector_models import _hog_detector, _shape_predictor

from comfy_diffusionrig.photo.loading import load_image

from comfy_diffusionrig.photo.paste import paste_back

EXAMPLE = Path(__file__).resolve().parents[1] / "example_images" / "grace_hopper.jpg"
SIZES = {1: (1155, 866), 12: (4000, 3000)}  # megapixels -> 4:3 photo


def make_photo(megapixels: int) -> Image.Image:
    width, height = SIZES[megapixels]
    portrait = load_image(EXAMPLE)
    scale = height * 0.9 / portrait.size[1]  # the face is then about a third of the height
    portrait = portrait.resize((round(portrait.size[0] * scale), round(portrait.size[1] * scale)), Image.LANCZOS)
    photo = Image.new("RGB", (width, height), (96, 110, 124))
    photo.paste(portrait, ((width - portrait.size[0]) // 3, (height - portrait.size[1]) // 2))
    return photo


def official_detection(photo: Image.Image) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """scripts/align.py's detection: HOG on the full-resolution RGB photo upsampled once, then the
    predictor on each box -> [(box exclusive, [68, 2] landmarks)]."""
    rgb = np.asarray(photo)
    found = []
    for rect in _hog_detector()(rgb, 1):
        shape = _shape_predictor(None)(rgb, rect)
        found.append(((rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1),
                      np.array([(p.x, p.y) for p in shape.parts()], np.float64)))
    return found


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def compare_official(photos: dict[int, Image.Image], repeat: int) -> None:
    print(f"\n{'photo':>7} {'official':>9} {'ours':>7} {'ratio':>6}   box       landmark err (mean/max px)   crop PSNR")
    for mp, photo in photos.items():
        t_official, official = timed(lambda: official_detection(photo), repeat)
        t_ours, faces = timed(lambda: detect_faces(photo), repeat)
        if not official or not faces:
            print(f"{mp:>5}MP  official found {len(official)} face(s), ours {len(faces)}")
            continue
        box, landmarks = max(official, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        face = faces[0]
        err = np.linalg.norm(face.landmarks - landmarks, axis=1)
        crop_psnr = psnr(align_face(photo, face).image, ffhq_align(photo, landmarks)[0])
        same = "official" if tuple(int(v) for v in face.box) == box else "differs"
        print(f"{mp:>5}MP {t_official:>9.3f} {t_ours:>7.3f} {t_official / t_ours:>5.1f}x   {same:<9} "
              f"{err.mean():>12.2f} / {err.max():<14.2f} {crop_psnr:>9.1f} dB")


def timed(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 12], choices=sorted(SIZES))
    parser.add_argument("--detectors", nargs="+", default=["hog", "cnn"], choices=["hog", "cnn"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-official", action="store_true", help="skip the (slow) official detection")
    args = parser.parse_args()

    print(f"{'photo':>7} {'detector':>8} {'decode':>7} {'detect':>7} {'align':>7} {'paste':>7} "
          f"{'detect+align':>13}   face box")
    for mp in args.sizes:
        photo = make_photo(mp)
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=92)
        decode, _ = timed(lambda: load_image(buf.getvalue()), args.repeat)
        for detector in args.detectors:
            detect_faces(photo, detector=detector)  # load the models outside the timing
            t_detect, faces = timed(lambda: detect_faces(photo, detector=detector), args.repeat)
            if not faces:
                print(f"{mp:>5}MP {detector:>8}  no face found")
                continue
            t_align, aligned = timed(lambda: align_face(photo, faces[0]), args.repeat)
            t_paste, _ = timed(lambda: paste_back(photo, aligned, aligned.image), args.repeat)
            box = tuple(round(v) for v in faces[0].box)
            print(f"{mp:>5}MP {detector:>8} {decode:>7.3f} {t_detect:>7.3f} {t_align:>7.3f} {t_paste:>7.3f} "
                  f"{t_detect + t_align:>13.3f}   {box}")
    if not args.no_official:
        compare_official({mp: make_photo(mp) for mp in args.sizes}, args.repeat)


if __name__ == "__main__":
    main()

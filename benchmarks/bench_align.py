"""Benchmark: detect + FFHQ-align one photo at 1 MP and 12 MP, HOG vs CNN detector.

Photos are built from the example portraits (a face of about a third of the photo's height on a
plain background), so the figures are repeatable. Prints the median seconds of detection,
alignment (256 px, the official 4096 px render), paste back and their sum, plus the time to
decode the photo from JPEG. Goal on the 2-core CPU: detect + align under 0.5 s at 1 MP and
under 2 s at 12 MP (HOG).

    python benchmarks/bench_align.py                  # both sizes, both detectors
    python benchmarks/bench_align.py --sizes 1 --detectors hog --repeat 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from PIL import Image

from comfy_diffusionrig.alignment import align_face, detect_faces, load_image, paste_back

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


if __name__ == "__main__":
    main()

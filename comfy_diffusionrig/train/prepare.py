"""prepare-data: photos -> a training dataset (dataset.py) of aligned faces and rendered buffers.

Each photo is read, its faces detected (exactly one wanted), FFHQ-aligned, fitted by DECA and
rendered into buffers, as the official create_data.py does. The photo list (sorted) is cut into
chunks; chunk k becomes shard-0000k.safetensors plus shard-0000k.json (what happened to each
photo), the report written last, so a chunk with a report is finished and a rerun skips it.
`--shard i/n` runs the chunks k with k % n == i (one machine of n); `--workers N` runs chunks in N
processes. After its chunks every run rewrites index.json (finished shards) and manifest.json
(counts and every rejected photo with its reason) from all the reports in the folder.

mean_shape: every face of an identity (the photo's folder) gets the identity's mean DECA shape
(official --use_meanshape); chunks then hold whole identities so the mean is over all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..model.checkpoints import atomic_write
from .dataset import shard_name, write_index, write_shard
from ..core.conventions import PHOTO_SUFFIXES
from ..core.imaging import pil_to_tensor

MANIFEST = "manifest.json"


SECOND_FACE_SCORE = 0.5  # a second face under this fraction of the best detector score is not a person


@dataclass(frozen=True)
class PrepareConfig:
    """size: aligned face size in pixels; min_face: smallest face box side (pixels of the photo) kept."""

    size: int = 256  # official image size
    min_face: int = 64
    detector: str = "hog"
    mean_shape: bool = False
    shard_size: int = 256


def list_photos(source: str | Path) -> list[Path]:
    """Every photo under `source` (a folder, searched recursively, or one file), sorted."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"no photo or folder at {source}")
    return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def plan_chunks(photos: list[Path], config: PrepareConfig) -> list[list[Path]]:
    """Cut the sorted photos into chunks of at most shard_size; with mean_shape an identity (folder) is never
    split (one larger than shard_size is a chunk of its own)."""
    groups = [[p] for p in photos]
    if config.mean_shape:
        by_folder: dict[Path, list[Path]] = {}
        for p in photos:
            by_folder.setdefault(p.parent, []).append(p)
        groups = list(by_folder.values())
    chunks: list[list[Path]] = []
    for group in groups:
        if chunks and len(chunks[-1]) + len(group) <= config.shard_size:
            chunks[-1].extend(group)
        else:
            chunks.append(list(group))
    return chunks


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in 0..n-1")
    return i, n


def _reject(photo: Path, reason: str) -> dict:
    return {"file": str(photo), "status": "rejected", "reason": reason}


def _align(photo: Path, config: PrepareConfig, models_dir):
    """-> (AlignedFace, None) or (None, reason)."""
    from ..photo.alignment import align_face
    from ..photo.detection import detect_faces
    from ..photo.loading import load_image

    try:
        image = load_image(photo)
    except (ValueError, OSError) as err:
        return None, f"unreadable file ({err})"
    if min(image.size) < config.min_face:
        return None, f"tiny face: the image is {image.size[0]}x{image.size[1]} px, below min_face {config.min_face}"
    faces = detect_faces(image, detector=config.detector, models_dir=models_dir)
    if not faces:
        return None, f"no face found (detector {config.detector})"
    # the official detection (HOG on the RGB photo) finds faint false faces too (astronaut.png: a second box at
    # score 0.12 beside the face's 1.16): only a face at least half as certain as the best counts as a person
    best = max(f.score for f in faces)
    people = [f for f in faces if f.score >= SECOND_FACE_SCORE * best]
    if len(people) > 1:
        return None, f"several faces ({len(people)}): a training photo must show one person"
    face = people[0]
    side = min(face.box[2] - face.box[0], face.box[3] - face.box[1])
    if side < config.min_face:
        return None, f"tiny face: {side:.0f} px, below min_face {config.min_face}"
    return align_face(image, face, size=config.size), None


def prepare_chunk(number: int, photos: list[Path], out: Path, deca, config: PrepareConfig,
                  models_dir=None) -> dict:
    """Align, fit, render and write one chunk as shard `number`; returns (and writes) its report."""
    import numpy as np

    from ..face.rig import fit_faces, render_rig

    rows, aligned = [], []
    for photo in photos:
        face, reason = _align(photo, config, models_dir)
        rows.append(_reject(photo, reason) if face is None else {"file": str(photo), "status": "kept"})
        if face is not None:
            aligned.append((photo, face))
    count = len(aligned)
    if count:
        images = pil_to_tensor([a.image for _, a in aligned])
        rig = fit_faces(deca, images, np.stack([a.landmarks for _, a in aligned]))
        if config.mean_shape:
            shape = rig.codes["shape"].clone()
            folders = [photo.parent for photo, _ in aligned]
            for folder in set(folders):
                rows_of = [i for i, f in enumerate(folders) if f == folder]
                shape[rows_of] = shape[rows_of].mean(0, keepdim=True)
            rig = rig.with_codes(shape=shape)
        write_shard(out, shard_name(number), images * 2 - 1, render_rig(deca, rig))
    report = {"shard": shard_name(number), "count": count, "photos": rows}
    text = json.dumps(report, indent=1)
    atomic_write(out / _report_name(number), lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return report


def _report_name(number: int) -> str:
    return shard_name(number).replace(".safetensors", ".json")


_worker: dict = {}


def _worker_start(deca_file: str, flame_dir: str, models_dir) -> None:
    from ..face.deca import load_deca

    _worker["deca"] = load_deca(deca_file, flame_dir)
    _worker["models_dir"] = models_dir


def _worker_chunk(job: tuple) -> dict:
    number, photos, out, config = job
    return prepare_chunk(number, photos, out, _worker["deca"], config, _worker["models_dir"])


def prepare_data(source: str | Path, out: str | Path, deca_file: str | Path, flame_dir: str | Path,
                 config: PrepareConfig = PrepareConfig(), workers: int = 1, shard: tuple[int, int] = (0, 1),
                 models_dir=None, progress=print) -> dict:
    """Photos under `source` -> dataset folder `out`; returns the manifest. Finished shards are skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    photos = list_photos(source)
    if not photos:
        raise ValueError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) under {source}")
    chunks = plan_chunks(photos, config)
    mine = [(k, chunk) for k, chunk in enumerate(chunks) if k % shard[1] == shard[0]]
    todo = [(k, chunk, out, config) for k, chunk in mine if not (out / _report_name(k)).exists()]
    progress(f"{len(photos)} photos in {len(chunks)} shards; this run: {len(mine)} shards, "
             f"{len(mine) - len(todo)} already done")
    if todo:
        if workers > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # forked torch / dlib state is not safe
            with context.Pool(min(workers, len(todo)), _worker_start,
                              (str(deca_file), str(flame_dir), models_dir)) as pool:
                for report in pool.imap_unordered(_worker_chunk, todo):
                    progress(f"{report['shard']}: {report['count']} faces")
        else:
            _worker_start(str(deca_file), str(flame_dir), models_dir)
            for job in todo:
                report = _worker_chunk(job)
                progress(f"{report['shard']}: {report['count']} faces")
    return write_summary(out, len(chunks), config)


def _read_report(out: Path, number: int) -> dict:
    return json.loads((out / _report_name(number)).read_text())


def write_summary(out: Path, total_shards: int, config: PrepareConfig) -> dict:
    """index.json of the finished shards and manifest.json of every report in the folder."""
    reports = [_read_report(out, k) for k in range(total_shards) if (out / _report_name(k)).exists()]
    write_index(out, [{"file": r["shard"], "count": r["count"]} for r in reports if r["count"]], config.size)
    rows = [row for r in reports for row in r["photos"]]
    manifest = {"shards_total": total_shards, "shards_done": len(reports),
                "photos": len(rows), "kept": sum(r["count"] for r in reports),
                "rejected": [{"file": row["file"], "reason": row["reason"]} for row in rows
                             if row["status"] == "rejected"],
                "config": {"size": config.size, "min_face": config.min_face, "detector": config.detector,
                           "mean_shape": config.mean_shape, "shard_size": config.shard_size}}
    text = json.dumps(manifest, indent=1)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return manifest

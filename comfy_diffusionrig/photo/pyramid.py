"""dlib's HOG detection pyramid, re-derived: which pyramid level and window a face box came from, so that a
face found on a downscaled copy of a big photo can be re-detected at full resolution on a small window
and get the box the official full-resolution run gives (bit-exact: tests/test_alignment.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .detector_models import _hog_detector, require_dlib

HOG_CELL = 8  # dlib scan_fhog_pyramid default cell size (px of a pyramid level)
HOG_BOX_CELLS = 10  # dlib frontal face detector: 80x80 px detection box = 10 cells


_GRID_TOLERANCE = 0.15  # level px off the photo's cell grid a window may start (0.4 lost 3 of 44 official boxes)


def _on_cell_grid(cells):
    """Whether positions given in cells (a number or an array) lie on the cell grid, within _GRID_TOLERANCE
    level pixels."""
    return np.abs(cells - np.round(cells)) * HOG_CELL < _GRID_TOLERANCE


def _pyramid_sizes(size: int, axis: int) -> list[int]:
    """Pixel counts of the pyramid levels along one axis (0: columns, 1: rows) of a photo this size
    in dlib's HOG detection upsampled once: pyramid_up gives 2w+2 columns and 2h+1 rows, each
    level after that floor(5n/6). Level k maps to the photo by (size - 1) / (n_k - 1) px per px."""
    n = 2 * size + 2 if axis == 0 else 2 * size + 1
    sizes = [n]
    while n > HOG_CELL * HOG_BOX_CELLS // 2:
        n = 5 * n // 6
        sizes.append(n)
    return sizes


def _window_axis(lo: float, hi: float, size: int, axis: int, level: int) -> tuple[int, int, list[int]]:
    """A window of one photo axis covering [lo, hi) -> (start, length, sizes of its levels 0..level).

    The start lies on the photo's cell grid of `level` and `level + 1` (within _GRID_TOLERANCE, else
    0); the length (up to a cell more than needed) and level sizes are chosen so that the window's
    levels `level` (resized by us) and `level + 1` (floor(5n/6), by dlib) sample where the photo's do.
    """
    full = _pyramid_sizes(size, axis)
    levels = [k for k in (level, level + 1) if k < len(full)]
    cell = [HOG_CELL * (size - 1) / (full[k] - 1) for k in levels]  # photo px per cell
    first = min(max(int(math.floor(lo)), 0), size - 1)
    candidates = np.arange(first, max(first - int(60 * cell[-1]), 0), -1)
    on_grid = np.ones(len(candidates), bool)
    for c in cell:
        on_grid &= _on_cell_grid(candidates / c)
    start = int(candidates[on_grid][0]) if on_grid.any() else 0
    shortest = min(max(int(math.ceil(hi)) - start, 2), size - start)

    def fit(length: int) -> tuple[float, list[int]]:
        target = [(length - 1) * (full[k] - 1) / (size - 1) for k in range(level + 2) if k < len(full)]
        sizes = [round(t) + 1 for t in target[:level + 1]]
        error = abs(sizes[-1] - 1 - target[level])
        if len(target) > level + 1:  # dlib makes the next level floor(5n/6)
            error = max(error, abs(5 * sizes[-1] // 6 - 1 - target[level + 1]))
        return error * (hi - start) / max(length, 1), sizes  # level px at the far side of the face

    lengths = range(shortest, min(shortest + int(cell[-1]), size - start) + 1)
    length = min(lengths, key=lambda n: fit(n)[0])
    return start, length, fit(length)[1]


def _hog_rect(level: int, cell_x: int, cell_y: int) -> tuple[int, int, int, int]:
    """dlib's box (left, top, right, bottom, inclusive) for a hit at this level and cell, in px of
    the pyramid's base image (dlib's fhog_to_image, then rect_up by `level` 6/5 steps, rounded)."""
    corners = []
    half = HOG_CELL // 2
    for cx, cy in ((cell_x, cell_y), (cell_x + HOG_BOX_CELLS - 1, cell_y + HOG_BOX_CELLS - 1)):
        x, y = cx * HOG_CELL + 1, cy * HOG_CELL + 1  # cell corner, then its centre (away from 0)
        x, y = float(x + (half if x >= 0 else -half)), float(y + (half if y >= 0 else -half))
        for _ in range(level):
            x, y = x * 1.2 + 0.3, y * 1.2 + 0.3  # pyramid_down<6>::point_up
        corners += [_lround(x), _lround(y)]
    return corners[0], corners[1], corners[2], corners[3]


def _lround(value: float) -> int:
    """C's lround: halves away from zero (dlib rounds rectangles with it)."""
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def _hog_cell_of(rect: tuple[int, int, int, int]) -> tuple[int, int, int] | None:
    """(level, cell_x, cell_y) whose _hog_rect is exactly rect, or None."""
    guess = math.log(max(rect[2] - rect[0], 1) / (HOG_CELL * (HOG_BOX_CELLS - 1))) / math.log(1.2)
    for level in range(max(int(guess) - 1, 0), int(guess) + 3):
        pitch = HOG_CELL * 1.2 ** level
        for cx in range(int(rect[0] / pitch) - 2, int(rect[0] / pitch) + 3):
            for cy in range(int(rect[1] / pitch) - 2, int(rect[1] / pitch) + 3):
                if _hog_rect(level, cx, cy) == tuple(rect):
                    return level, cx, cy
    return None


def _official_hog_box(full: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, ...] | None:
    """The box (x0, y0, x1, y1 exclusive) that dlib's HOG detector, run as the official recipe runs
    it (RGB photo, upsampled once), gives the face near `box`; None when it finds none there.

    full: [H, W, 3] uint8 photo; box: a rough box of the face in its pixels (within ~10 %).
    A window reproduces the whole photo's hits on two adjacent pyramid levels only (its pixels sit
    within a fraction of a pixel of the whole photo's pyramid, so the scores agree to a few per
    cent and the best hit's box is the same), so the face's best level is climbed to: down a level
    while the lower of the pair wins, up while the upper one (or a level above the pair) wins; a
    CNN box, smaller than HOG's, is usually a level or two low. A step up is cut from the last
    window when it can be (`_derived_window`), which saves resampling the photo again.
    """
    height, width = full.shape[:2]
    top = min(len(_pyramid_sizes(width, 0)), len(_pyramid_sizes(height, 1))) - 2
    size = max(box[2] - box[0], box[3] - box[1], HOG_CELL * HOG_BOX_CELLS / 2)
    # the level whose 10-cell box is this size: a rough HOG box's face is mostly on it or the next
    level = min(max(int(math.log(size / (HOG_CELL * (HOG_BOX_CELLS - 1) / 2)) / math.log(1.2)), 0), top)
    paired, tried, hit, window = [], set(), None, None
    while 0 <= level <= top and level not in tried and len(tried) < 4:
        tried.add(level)
        # a level up from the last window: a crop of that window's next level (no new resampling chain)
        derived = _derived_window(full, box, window) if window is not None and window.level == level - 1 else None
        hit, window = derived if derived is not None else _window_hit(full, box, level)
        if hit is None:
            break
        if hit[2] in (level, level + 1):
            paired.append(hit)
        level = level - 1 if hit[2] == level else hit[2]
    if paired:
        return max(paired, key=lambda h: h[1])[0]
    return None if hit is None else hit[0]


@dataclass
class _Window:
    """A window's image at pyramid level `level` and where its pixel (0, 0) sits in the photo (photo
    pixels; on the cell grid of that level and the next)."""

    image: np.ndarray
    level: int
    origin: tuple[float, float]  # (x, y)


def _margin(size: float, level: int) -> float:
    """Photo pixels around a rough face box that a hit on levels `level` and `level + 1` reads: one cell of
    filter padding and one of HOG block normalisation each side, plus the rough box's own error (up to
    ~6 % measured)."""
    return 0.1 * size + (2 * HOG_CELL * 1.2 ** (level + 1) + HOG_CELL) / 2


def _window_hit(full: np.ndarray, box: tuple[float, float, float, float],
                level: int) -> tuple[tuple[tuple[float, ...], float, int] | None, _Window]:
    """The official HOG hit on this face from a window true to pyramid levels `level` and
    `level + 1`: ((box, score, level) or None when no hit there overlaps `box`, the window).

    The window gets the room a window a level up needs when one can then be cut from it
    (`_derived_window`: big faces, where resampling the photo again costs most), else the room
    its own two levels need."""
    dlib = require_dlib()
    height, width = full.shape[:2]
    size = max(box[2] - box[0], box[3] - box[1])
    for margin in (_margin(size, level + 1), _margin(size, level)):
        x0, w, cols = _window_axis(box[0] - margin, box[2] + margin, width, 0, level)
        y0, h, rows = _window_axis(box[1] - margin, box[3] + margin, height, 1, level)
        if _next_crop(full.shape, box, level, (float(x0), float(y0)), (rows[-1], cols[-1])) is not None:
            break
    base = np.ascontiguousarray(full[y0:y0 + h, x0:x0 + w])
    for n_rows, n_cols in zip(rows, cols):
        base = dlib.resize_image(base, n_rows, n_cols)
    window = _Window(base, level, (float(x0), float(y0)))
    return _best_hit(full.shape, box, window), window


def _next_crop(shape: tuple[int, ...], box: tuple[float, float, float, float], level: int,
               origin: tuple[float, float], image_hw: tuple[int, int]):
    """Where `_derived_window` cuts the window a level up from a window at `level` with this origin
    (photo px) and image size: ((x, width), (y, height)) in its next level's pixels and the cut's
    origin in photo px, or None when no cut fits."""
    height, width = shape[:2]
    full_rows, full_cols = _pyramid_sizes(height, 1), _pyramid_sizes(width, 0)
    up = level + 1
    if up + 1 >= min(len(full_rows), len(full_cols)):
        return None
    margin = _margin(max(box[2] - box[0], box[3] - box[1]), up)
    crop, cut_origin = [], []
    for axis, (lo, hi), sizes, photo in ((0, (box[0], box[2]), full_cols, width), (1, (box[1], box[3]), full_rows,
                                                                                     height)):
        scale = (sizes[up] - 1) / (photo - 1)  # level px per photo px
        first = round(origin[axis] * scale)  # the window's pixel 0 on this level (a whole pixel)
        found = _crop_axis((lo - margin) * scale, (hi + margin) * scale, first, 5 * image_hw[1 - axis] // 6,
                           (sizes[up + 1] - 1) / (sizes[up] - 1))
        if found is None:
            return None
        crop.append(found)
        cut_origin.append((first + found[0]) / scale)
    return crop, (cut_origin[0], cut_origin[1])


def _derived_window(full: np.ndarray, box: tuple[float, float, float, float],
                    window: _Window) -> tuple[tuple[tuple[float, ...], float, int] | None, _Window] | None:
    """The hit on levels `window.level + 1` and `+ 2` from the window's next level (dlib's own 5/6 step
    of it, which sits on the whole photo's next level) cropped to start on both levels' cell grids and
    sized so that dlib's step after it samples where the photo's does: the same hit as `_window_hit`
    of that level, without resampling the photo again. None when no such crop fits in the window."""
    rows, cols = window.image.shape[:2]
    cut = _next_crop(full.shape, box, window.level, window.origin, (rows, cols))
    if cut is None:
        return None
    ((sx, w), (sy, h)), origin = cut
    image = require_dlib().resize_image(window.image, 5 * rows // 6, 5 * cols // 6)
    derived = _Window(np.ascontiguousarray(image[sy:sy + h, sx:sx + w]), window.level + 1, origin)
    return _best_hit(full.shape, box, derived), derived


def _crop_axis(lo: float, hi: float, origin: int, available: int, ratio: float) -> tuple[int, int] | None:
    """A crop (start, length) along one axis of a level image whose pixel 0 is the photo's level pixel
    `origin`: starting on the level's cell grid and, within _GRID_TOLERANCE, on the next level's (level
    pixels times `ratio` = next level pixels), covering [lo, hi) (level pixels), the length chosen so
    that the next level's last sample lands nearest the photo's. None when none fits."""
    first = min(int(math.floor(lo)), origin + available - 1)
    start = None
    for position in range(first - first % HOG_CELL, origin - 1, -HOG_CELL):
        if _on_cell_grid(position * ratio / HOG_CELL):
            start = position
            break
    if start is None:
        return None
    shortest, longest = max(int(math.ceil(hi)) - start, 2), origin + available - start
    if shortest > longest:
        return None

    def error(length: int) -> float:  # next-level px at the far side of the face
        return abs(5 * length // 6 - 1 - (length - 1) * ratio) * (hi - start) / length

    length = min(range(shortest, min(shortest + 2 * HOG_CELL, longest) + 1), key=error)
    return start - origin, length


def _best_hit(shape: tuple[int, ...], box: tuple[float, float, float, float],
              window: _Window) -> tuple[tuple[float, ...], float, int] | None:
    """dlib's HOG hits in the window (scanned from its level down), mapped to the photo: the one that best
    overlaps `box` as (box, score, level), or None."""
    height, width = shape[:2]
    rects, scores, _ = _hog_detector().run(window.image, 0)
    full_rows, full_cols = _pyramid_sizes(height, 1), _pyramid_sizes(width, 0)
    level = window.level
    best, best_overlap = None, 0.3  # a hit must overlap the rough box by at least this IoU
    for rect, score in zip(rects, scores):
        found = _hog_cell_of((rect.left(), rect.top(), rect.right(), rect.bottom()))
        if found is None or found[0] + level >= min(len(full_rows), len(full_cols)):
            continue
        k = found[0] + level
        cx = found[1] + round(window.origin[0] * (full_cols[k] - 1) / (width - 1) / HOG_CELL)
        cy = found[2] + round(window.origin[1] * (full_rows[k] - 1) / (height - 1) / HOG_CELL)
        left, top, right, bottom = _hog_rect(k, cx, cy)
        # pyramid_down<2>::point_down maps the upsampled photo back to the photo
        candidate = (float(_lround(left / 2 - 1.25)), float(_lround(top / 2 - 0.75)),
                     float(_lround(right / 2 - 1.25) + 1), float(_lround(bottom / 2 - 0.75) + 1))
        overlap = _iou(candidate, box)
        if overlap > best_overlap:
            best, best_overlap = (candidate, float(score), k), overlap
    return best


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

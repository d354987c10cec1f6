"""One error rule for every file this pack reads.

A loader that cannot use a file raises its own `ModelFileError` subclass carrying the path;
the message names the file, says what the file looks like (a Git LFS pointer, a web page,
a truncated archive, another format) and what to do next. `file_kind` sniffs the first and
last bytes for that; `check_finite` refuses NaN/inf weights at load time instead of letting
them fail later with a misleading message.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import torch


class ModelFileError(ValueError):
    """A model or asset file that cannot be used; `path` is the file, the message names it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


# kinds whose advice replaces the loader's own: the file is not what anyone meant to put there
LFS_POINTER = "a Git LFS pointer, not the file itself"
WEB_PAGE = "a web page, not a model file"
EMPTY = "empty (0 bytes)"
_KIND_ADVICE = {
    LFS_POINTER: "fetch the real file with `git lfs pull` (or download it directly)",
    WEB_PAGE: "download it again (the link probably led to a login or error page)",
    EMPTY: "copy or download it again",
}
_ZIP_END = b"PK\x05\x06"  # end-of-central-directory record; a zip cut short has none
_TAIL = 65536 + 22  # the end record sits within the last 64 KiB comment + its own 22 bytes


def file_kind(path: str | os.PathLike) -> str:
    """What the bytes of `path` look like, in words ("a zip archive cut short (truncated)", ...)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if size == 0:
        return EMPTY
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return LFS_POINTER
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:200]:
        return WEB_PAGE
    if head.startswith(b"PK\x03\x04"):
        complete = _ZIP_END in tail
        return "a zip archive (PyTorch checkpoint or .npz)" if complete else "a zip archive cut short (truncated)"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array file"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]})"
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive"
    safetensors = _safetensors_kind(path, head, size)
    if safetensors:
        return safetensors
    try:
        head.decode("ascii")
        return "a text file"
    except UnicodeDecodeError:
        return "binary data of an unknown format"


def _safetensors_kind(path: Path, head: bytes, size: int) -> str | None:
    """"a safetensors file" (or "... cut short (truncated)") when the header says so, else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if 8 + length > size:
        return "a safetensors file cut short (truncated)"
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "a safetensors file with a damaged header"
    return "a safetensors file cut short (truncated)" if 8 + length + end > size else "a safetensors file"


def unreadable(error_type: type[ModelFileError], path: str | os.PathLike, problem: str,
               advice: str) -> ModelFileError:
    """`error_type` saying `path: problem; the file is <kind>: <advice>` (LFS, web page, empty: their own advice)."""
    kind = file_kind(path)
    advice = _KIND_ADVICE.get(kind, advice)
    return error_type(f"{path}: {problem}; the file is {kind}: {advice}", path)


def torch_load_error(cause: BaseException, path: str | os.PathLike, error_type: type[ModelFileError], what: str,
                     advice: str, refused_advice: str | None = None) -> ModelFileError:
    """The error for a file that `torch.load(..., weights_only=True)` could not read (`what`: "DECA checkpoint").

    A global that torch's weights-only unpickler does not allow: refused, naming it, and nothing was run
    (`refused_advice`, default `advice`); anything else: `unreadable`, with `advice`.
    """
    found = re.search(r"GLOBAL ([\w.]+)", str(cause)) if isinstance(cause, pickle.UnpicklingError) else None
    if found:
        return error_type(f"{path}: refused (would run code): its pickle references {found.group(1)}, which a "
                          f"{what} never does, so it was not unpickled; {refused_advice or advice}", path)
    problem = ("its data is not a valid pickle" if isinstance(cause, pickle.UnpicklingError)
               else f"{type(cause).__name__}: {str(cause)[:200]}")
    return unreadable(error_type, path, f"not a readable {what} ({problem})", advice)


def check_finite(arrays: dict, path: str | os.PathLike, error_type: type[ModelFileError], advice: str,
                 dtype: np.dtype | type | None = None) -> None:
    """Raise `error_type` naming the tensors/arrays of `arrays` that hold NaN or infinite values (or,
    with `dtype`, values that become infinite when cast to that float type, as float64 -> float32 does)."""
    bad = [name for name, value in arrays.items() if not _finite(value, dtype)]
    if bad:
        raise error_type(f"{path}: {len(bad)} weight(s) hold NaN or infinite values (first: {bad[:3]}); the file "
                         f"is damaged or came from a run that diverged: {advice}", path)


def _finite(value, dtype) -> bool:
    if torch.is_tensor(value):
        return not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all())
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fc" or not value.size:
        return True
    if dtype is None:
        return bool(np.isfinite(value).all())
    limit = np.finfo(dtype).max
    # min/max compare False on NaN; no temporary copy of a large array
    return bool(value.min() >= -limit and value.max() <= limit)

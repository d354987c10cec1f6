"""Device and precision choice: what "auto" means on the machine at hand."""

from __future__ import annotations

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN can run bf16 convolutions natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" (or a torch float dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        resolved = _DTYPES[dtype.lower()]
    else:
        raise ValueError(f"unknown precision {dtype!r}: use 'auto', 'fp32', 'bf16' or 'fp16'")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported precision {resolved}: use fp32, bf16 or fp16")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn "auto" / "fp32" / "bf16" / "fp16" / a torch dtype into a torch dtype for the UNet.

    "auto": bf16 on CUDA GPUs with native bf16 (Ampere and newer), fp32 on older GPUs (fp16 is
    never picked: it overflows past 65504, the black images other face packs gave on GTX 16xx
    cards; ask for "fp16" to take that risk), bf16 on CPUs with native bf16 support, fp32
    elsewhere. fp16 on CPU is refused: CPUs without AVX512-FP16 emulate it slowly and it
    overflows more easily than bf16.
    """
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    resolved = parse_dtype(dtype)
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU (slow and overflow-prone); use 'bf16' or 'fp32'")
    return resolved


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (a CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N" -> torch.device.

    Asking for CUDA where torch has none is one clear ValueError, not an assertion deep in torch.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU or driver visible"
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} has no CUDA ({build}); use "
                             "--device cpu (or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved

"""Precision selection."""

import pytest
import torch

from comfy_diffusionrig.core.devices import cpu_has_fast_bf16, parse_dtype, resolve_dtype


def test_named_precisions():
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert parse_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unsupported precision"):
        parse_dtype(torch.int64)


def test_auto_on_cpu_follows_hardware():
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") == expected


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_never_picks_fp16(monkeypatch, native_bf16, expected):
    # a GPU without native bf16 (GTX 16xx, V100) gets fp32: fp16 overflows past 65504 (black images);
    # emulated bf16 is slow, so only the native answer counts
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_dtype("auto", "cuda") == expected
    assert asked == [False]

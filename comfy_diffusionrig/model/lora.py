"""Low-rank adapters (LoRA) for personalizing a DiffusionRig UNet with a few MB of weights.

An adapted layer computes `base(x) + (alpha / rank) * up(down(x))`: `down` has the base
layer's kernel, stride and padding and `rank` outputs, `up` is a 1x1 map back (zero at
start, so an injected model starts exactly at its base). Base weights stay frozen.

Target groups (`targets`):
* "attention": the attention `qkv` and `proj_out` (Conv1d 1x1);
* "conv": every Conv2d of the UNet (3x3 in ResBlocks, 1x1 skips, input and output convs);
* "embedding": the Linear layers of the time MLP and of the timestep / global-code FiLMs.
The encoder is never adapted (stage 2 freezes it).

LoRA file (`.safetensors`), stable key names: for an adapted layer whose official weight is
`<name>.weight` (e.g. `denoisingUNet.middle_block.1.qkv.weight`), the file holds
`<name>.lora_down.weight` [rank, in, *kernel] and `<name>.lora_up.weight` [out, rank, 1...]
(Linear: [rank, in] and [out, rank]). It also holds the encoder's BatchNorm statistics
`encoder.*.running_mean|running_var|num_batches_tracked` under their official names: stage-2
training runs the frozen encoder in batch-statistics mode, which updates them, and inference
encodes with them. Metadata: format, rank, alpha, targets (JSON list) and base_config (JSON
`UNetConfig`) of the model it was trained on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, atomic_write, for_inference, load_diffusionrig, read_state_dict
from ..core.devices import parse_dtype
from .unet import DiffusionRig, UNetConfig

LORA_FORMAT = "comfy-diffusionrig-lora"
DEFAULT_TARGETS = ("attention", "conv")
_TARGET_TYPES = {"attention": nn.Conv1d, "conv": nn.Conv2d, "embedding": nn.Linear}
# UNetConfig fields that do not change the weights' shapes or meaning
_TRAINING_ONLY_FIELDS = ("use_checkpoint", "dropout")


class LoRALayer(nn.Module):
    """A Conv1d/Conv2d/Linear (kept as is) plus a trainable low-rank update.

    forward: x -> base(x) + scale * up(down(x)), scale = alpha / rank.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, rank, bias=False, **factory)
            up = nn.Linear(rank, base.out_features, bias=False, **factory)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.groups == 1 and base.padding_mode == "zeros":
            conv = type(base)
            down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                        bias=False, **factory)
            up = conv(rank, base.out_channels, 1, bias=False, **factory)
        else:
            raise TypeError(f"LoRA supports Linear and ungrouped zero-padded Conv1d/Conv2d layers, got {base}")
        # torch's default layer init for down; up starts at zero so the adapted model equals the base
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(up.weight)
        self.base, self.lora_down, self.lora_up = base, down, up
        self.rank, self.alpha = rank, float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (the UNet reads `.weight.dtype` / `.device` of its output conv)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down as a tensor shaped like the base weight, float32."""
        up, down = self.lora_up.weight.float().flatten(1), self.lora_down.weight.float().flatten(1)
        return (up @ down).view(self.base.weight.shape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


@dataclass(frozen=True)
class LoRAInfo:
    """What a LoRA file says about itself (its metadata)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_config: UNetConfig


def _target_of(layer: nn.Module) -> str | None:
    return next((name for name, kind in _TARGET_TYPES.items() if type(layer) is kind), None)


def lora_layers(model: DiffusionRig) -> dict[str, LoRALayer]:
    """Adapted layers by official layer name (e.g. "denoisingUNet.middle_block.1.qkv"), model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def inject_lora(model: DiffusionRig, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
                generator: torch.Generator | None = None) -> list[str]:
    """Wrap the UNet's target layers in `LoRALayer`s, in place; returns the adapted layer names.

    alpha None means alpha = rank (scale 1). Freezes every other parameter of the model; call
    `merge_lora` to fold the adapters back (restoring the official state-dict layout).
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(_TARGET_TYPES))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or targets}; choose from {list(_TARGET_TYPES)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; merge_lora() them first or start from a fresh model")
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)  # only the adapters train
    chosen = [(f"denoisingUNet.{name}", m) for name, m in model.denoisingUNet.named_modules()
              if _target_of(m) in targets]
    for name, layer in chosen:
        model.set_submodule(name, LoRALayer(layer, rank, alpha, generator))
    return [name for name, _ in chosen]


def lora_numel(model: DiffusionRig, rank: int, targets=DEFAULT_TARGETS) -> int:
    """How many adapter weights `inject_lora(model, rank, targets=targets)` would add (sizes checkpoints)."""
    total = 0
    for layer in model.denoisingUNet.modules():
        if _target_of(layer) in targets:
            if isinstance(layer, nn.Linear):
                total += rank * (layer.in_features + layer.out_features)
            else:
                total += rank * (layer.in_channels * math.prod(layer.kernel_size) + layer.out_channels)
    return total


def lora_info(model: DiffusionRig) -> LoRAInfo:
    """Rank, alpha, target groups and base config of the adapters injected in `model`."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("this model has no LoRA adapters; inject_lora() or load_lora() first")
    targets = tuple(t for t in _TARGET_TYPES if any(_target_of(layer.base) == t for layer in layers))
    return LoRAInfo(layers[0].rank, layers[0].alpha, targets, model.config)


def lora_state_dict(model: DiffusionRig) -> dict[str, torch.Tensor]:
    """Adapter weights plus the encoder's BatchNorm statistics, under the documented key names."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach()
        tensors[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach()
    if not tensors:
        raise ValueError("this model has no LoRA adapters; inject_lora() or load_lora() first")
    for name, buffer in model.encoder.named_buffers():
        tensors[f"encoder.{name}"] = buffer.detach()
    return tensors


def load_lora_state_dict(model: DiffusionRig, tensors: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Copy adapter weights and encoder statistics into a model whose adapters are injected; keys must match."""
    expected = lora_state_dict(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [f"{k} {tuple(tensors[k].shape)} {tensors[k].dtype} vs {tuple(v.shape)} {v.dtype}"
                  for k, v in expected.items() if k in tensors and (tensors[k].shape != v.shape or (
                      tensors[k].is_floating_point() != v.is_floating_point() and not k.endswith("num_batches_tracked")))]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not fit this model's adapters: {len(missing)} missing (first: {missing[:2]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:2]}), {len(mismatched)} shape or type mismatches "
            f"(first: {mismatched[:2]}); it was made for a different rank, targets or base model"
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])


def save_lora(model: DiffusionRig, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
              overwrite: bool = False) -> Path:
    """Write the injected adapters (and encoder statistics) as `.safetensors`, atomically.

    dtype None keeps float32; "fp16"/"bf16" halve the file (integer counters are kept).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path must end in .safetensors, got {path.name}")
    info = lora_info(model)
    target = None if dtype is None else parse_dtype(dtype)
    tensors = {}
    for key, value in lora_state_dict(model).items():
        value = value.cpu()
        tensors[key] = (value.to(target) if target is not None and value.is_floating_point() else value).contiguous()
    metadata = {"format": LORA_FORMAT, "rank": str(info.rank), "alpha": repr(info.alpha),
                "targets": json.dumps(list(info.targets)), "base_config": json.dumps(info.base_config.to_dict())}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoRAInfo]:
    """Tensors and metadata of a LoRA file written by `save_lora`."""
    tensors, metadata = read_state_dict(path)
    if metadata.get("format") != LORA_FORMAT:
        raise CheckpointError(
            f"{path} is not a DiffusionRig LoRA (its metadata format is {metadata.get('format')!r}, expected "
            f"{LORA_FORMAT!r}); a full DiffusionRig model loads with load_diffusionrig instead", path
        )
    try:
        info = LoRAInfo(int(metadata["rank"]), float(metadata["alpha"]), tuple(json.loads(metadata["targets"])),
                        UNetConfig.from_dict(json.loads(metadata["base_config"])))
        if info.rank < 1 or not math.isfinite(info.alpha) or not info.targets \
                or not set(info.targets) <= set(_TARGET_TYPES):
            raise ValueError(f"rank {info.rank}, alpha {info.alpha}, targets {list(info.targets)}")
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} has damaged LoRA metadata ({str(err)[:200]}); save the LoRA again",
                              path) from err
    return tensors, info


def _config_differences(a: UNetConfig, b: UNetConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if k not in _TRAINING_ONLY_FIELDS and da[k] != db[k]]


def load_lora(model: DiffusionRig, path: str | os.PathLike) -> DiffusionRig:
    """Inject adapters as described by the LoRA file at `path` and load its weights, in place.

    The model must be the kind of base the LoRA was trained on (same architecture). Call
    `merge_lora(model)` afterwards for inference at the base model's speed.
    """
    tensors, info = read_lora(path)
    differences = _config_differences(info.base_config, model.config)
    if differences:
        raise CheckpointError(
            f"LoRA {path} was trained on a DiffusionRig with a different architecture (LoRA base vs this model: "
            f"{'; '.join(differences[:4])}); load it onto the base model it was trained from"
        )
    inject_lora(model, info.rank, info.alpha, info.targets)
    load_lora_state_dict(model, tensors, source=f"LoRA {path}")
    return model


def merge_lora(model: DiffusionRig, strength: float = 1.0) -> DiffusionRig:
    """Fold every adapter into its base weight (W += strength * scale * up @ down) and unwrap it, in place.

    The merged model has the official state-dict layout and the base model's speed.
    """
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            weight = layer.base.weight
            weight.copy_((weight.float() + strength * layer.delta_weight()).to(weight.dtype))
            model.set_submodule(name, layer.base)
    return model


def is_lora_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoRA file written by `save_lora` (read from its header alone; False for anything
    else, a full model or an unreadable file)."""
    from safetensors import safe_open

    if Path(path).suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == LORA_FORMAT
    except Exception:  # not a readable safetensors file: not a LoRA (loading it says what it is)
        return False


def load_with_lora(checkpoint: str | os.PathLike, lora: str | os.PathLike | None = None, strength: float = 1.0,
                   device="cpu", dtype: torch.dtype | str = torch.float32, run_device=None) -> DiffusionRig:
    """`load_diffusionrig(checkpoint)` with the LoRA file `lora` merged in at `strength` (1 = as trained, 0 =
    the base model, negative pushes away from it): the adapters merge into the fp32 weights, then the UNet is
    cast to `dtype` as `load_diffusionrig` does. lora None: the checkpoint alone."""
    if lora is None:
        return load_diffusionrig(checkpoint, device=device, dtype=dtype, run_device=run_device)
    model = load_lora(load_diffusionrig(checkpoint, device=device), lora)
    return for_inference(merge_lora(model, strength), device, dtype, run_device)

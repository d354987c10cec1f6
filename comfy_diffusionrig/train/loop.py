"""The training loop of both stages: stage 1 (a DiffusionRig, encoder included, on many faces) and stage 2
(personalization: fine-tune it on a small album of one person).

Stage 2 follows the official recipe (scripts/train.py --stage 2 and utils/train_util.py) by default: encoder
parameters frozen but the whole model in train mode, so the encoder's BatchNorm normalises
with batch statistics, updates its running statistics, and re-encodes the global code from
every batch; Adam at lr 1e-5 without weight decay; each step draws `batch_size` distinct
album images afresh (official `np.random.choice(N, B, replace=False)`), t uniform in 0..999
and fresh noise; the p2-weighted noise loss; gradient norm clipped at 1; 5000 steps; mixed
precision on the GPU. `TrainConfig.lora_rank > 0` trains LoRA adapters (lora.py) instead.

Training checkpoints are `torch.save` dicts of plain tensors, numbers, strings and lists
(they load with `weights_only=True`), written atomically, and hold everything needed to
resume bit-identically: "format", "step", "losses", "train_config", "unet_config",
"fingerprints" (album and frozen base, to refuse resuming on other inputs), "model" (full
state dict, official layout, so `load_diffusionrig` reads the file) or "lora"
(`lora_state_dict`), "optimizer", "scaler" (fp16 loss scaler), "ema" ({name: tensor} of the
trained parameters' moving average, empty when off) and "rng" ("cpu", "cuda": rank 0's global
generators dropout draws from; "ranks": [{"cpu", "cuda"}] of every rank; "batches": the generator
of images, t and noise, the same on every rank).

Distributed data parallel: when `torch.distributed` is initialised (torchrun), the same loop
runs on every rank. Each rank draws the whole global batch from the shared generator and takes
its contiguous slice (rank r: items r*B/W .. (r+1)*B/W), split again into `grad_accum`
micro-batches; DistributedDataParallel averages the gradients, so a step equals the
single-process step over the same global batch with grad_accum = W * grad_accum micro-batches
(the encoder's batch statistics are per micro-batch either way; BatchNorm running statistics are
rank 0's, as DDP broadcasts them). Rank 0 writes the checkpoints; every rank reads them, so the
folder must be shared. Resuming on another number of ranks continues the same batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..model.checkpoints import CheckpointError, DiskFullError, atomic_write, disk_full_error, free_bytes, \
    remove_stale_temp_files
from ..core.devices import resolve_dtype
from ..model.diffusion import p2_loss
from ..core.errors import check_finite, unreadable
from ..core.progress import Callback, notify
from ..model.lora import (DEFAULT_TARGETS, inject_lora, load_lora_state_dict, lora_info, lora_layers, lora_numel,
                   lora_state_dict)
from ..model.unet import AttentionBlock, DiffusionRig, ResBlock

TRAIN_FORMAT = "comfy-diffusionrig-train"
# TrainConfig fields a resumed run must share with its checkpoint (the others may change)
_TRAJECTORY_FIELDS = ("lr", "batch_size", "seed", "grad_clip", "precision", "lora_rank", "lora_alpha", "lora_targets",
                      "train_encoder")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")

Preview = Callable[[int, DiffusionRig], None]


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or a checkpoint that does not belong to this run)."""


@dataclass
class TrainingData:
    """Training faces: images [N, 3, H, W] float in [-1, 1] (or uint8 0..255, read as x / 127.5 - 1) and
    buffers [N, 9, H, W] float (rendered|normal|albedo). The loop converts each batch to float32 on
    the model's device, so a large dataset can stay in uint8 / fp16 on the CPU."""

    images: torch.Tensor
    buffers: torch.Tensor

    def __post_init__(self):
        images, buffers = self.images, self.buffers
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"album images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        if buffers.ndim != 4 or buffers.shape[0] != images.shape[0] or buffers.shape[2:] != images.shape[2:]:
            raise ValueError(f"album buffers must be [N, 9, H, W] matching the images {tuple(images.shape)}, "
                             f"got shape {tuple(buffers.shape)}")
        if not buffers.is_floating_point() or not (images.is_floating_point() or images.dtype == torch.uint8):
            raise ValueError(f"album images must be float or uint8 and buffers float, got {images.dtype} and "
                             f"{buffers.dtype}")
        for name, tensor in (("images", images), ("buffers", buffers)):
            if not tensor.is_floating_point():
                continue
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"album {name} contain NaN or infinite values; rebuild the album (a face fit failed?)")
        if images.is_floating_point() and (float(images.min()) < -1.001 or float(images.max()) > 1.001):
            raise ValueError(f"album images must be in [-1, 1], got [{float(images.min()):.3g}, "
                             f"{float(images.max()):.3g}]; convert 0..1 images with x * 2 - 1")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, H, W] float32 in [-1, 1], buffers [B, 9, H, W] float32) of rows idx, on device."""
        images = self.images[idx.to(self.images.device)].to(device, torch.float32)
        if self.images.dtype == torch.uint8:
            images = images / 127.5 - 1
        return images, self.buffers[idx.to(self.buffers.device)].to(device, torch.float32)

    def fingerprint(self) -> list[float]:
        """Size and absolute sums: tells whether a checkpoint was trained on this album."""
        return [float(len(self)), *map(float, self.images.shape[2:]),
                float(self.images.double().abs().sum()), float(self.buffers.double().abs().sum())]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings of either stage; defaults are the official stage-2 ones (train/command.py STAGES
    holds both stages').

    precision: "auto" = bf16 autocast on GPUs with bf16 (fp16 + loss scaling on older ones,
    as official) and on CPUs with native bf16, else fp32; weights and optimizer stay fp32.
    lora_rank 0 fine-tunes the whole UNet (official); LoRA usually wants a ~10x higher lr.
    lora_alpha None = rank. checkpoint_every / preview_every count steps (0: no previews).
    train_encoder: also train the global encoder, as the official stage 1 does (from scratch).
    batch_size is the global batch (all ranks together); grad_accum splits each rank's share
    into that many micro-batches. ema_rate > 0 keeps an exponential moving average of the
    trained parameters in the checkpoint (0: off).
    """

    steps: int = 5000  # official stage-2 max_steps
    lr: float = 1e-5  # official stage-2 learning rate
    batch_size: int = 4  # official stage-2 batch size
    seed: int = 0
    grad_clip: float | None = 1.0  # official auto_scale_grad_clip (gradient norm); None: no clipping
    precision: str = "auto"
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    checkpoint_every: int = 500
    preview_every: int = 0
    train_encoder: bool = False
    grad_accum: int = 1
    ema_rate: float = 0.0

    def __post_init__(self):
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, ok, rule in (
            ("steps", self.steps >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or positive"),
            ("precision", self.precision in _PRECISIONS, f"one of {_PRECISIONS}"),
            ("lora_rank", self.lora_rank >= 0, "0 (full fine-tune) or a positive rank"),
            ("checkpoint_every", self.checkpoint_every >= 1, "at least 1"),
            ("preview_every", self.preview_every >= 0, "0 (off) or positive"),
            ("train_encoder", not (self.train_encoder and self.lora_rank), "False with LoRA (adapters are UNet-only)"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("ema_rate", 0 <= self.ema_rate < 1, "in [0, 1)"),
        ) if not ok]
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(model: DiffusionRig, data: TrainingData, config: TrainConfig | None = None,
          checkpoint_path: str | os.PathLike | None = None, callback: Callback | None = None,
          resume: bool = True, preview: Preview | None = None) -> tuple[DiffusionRig, list[float]]:
    """Fine-tune `model` in place on `data`; returns (model in eval mode, loss of every step).

    The model trains on its own device with float32 weights (converted if needed; LoRA
    adapters are injected when config.lora_rank > 0): pass a copy to keep the original.
    checkpoint_path: written every config.checkpoint_every steps and at the end; when it
    exists and `resume`, training continues from it exactly (resume=False overwrites it).
    callback(step, total, loss=, model=) (`core.progress`) runs after every completed step (step
    counts from 1 to config.steps) and must not change the model; if it raises (a cancel), the last
    completed step is checkpointed and the exception propagates. preview(step, model) runs every
    config.preview_every steps with the model in eval mode, under no_grad, on a private
    RNG, so previews never change the result.
    Under torch.distributed call it on every rank with the same arguments (see the module
    docstring); callback runs on every rank, preview on rank 0 only.
    """
    config = config or TrainConfig()
    device = model.device
    amp_dtype = _autocast_dtype(config.precision, device)
    rank, world = _rank_and_world()
    _check_album(model, data, config, world)
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and rank == 0:
        remove_stale_temp_files(path)  # left by a run that was killed while writing
        _check_writable(path, _checkpoint_bytes_estimate(model, config))
    with torch.inference_mode(False), torch.enable_grad(), _private_rng(config.seed + 1 + rank, device), \
            _checkpointing(model, config.gradient_checkpointing):
        params = _trainable_parameters(model, config)
        names = {id(p): name for name, p in model.named_parameters()}
        ema = [p.detach().clone() for p in params] if config.ema_rate else []
        gen = torch.Generator().manual_seed(config.seed)  # album indices, timesteps and noise (same on every rank)
        opt = torch.optim.Adam(params, lr=config.lr, fused=device.type == "cuda")  # official: Adam, no weight decay
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        fingerprints = {"data": data.fingerprint(), "base": _base_fingerprint(model) if config.lora_rank else []}
        step, losses = 0, []
        if path is not None and resume and path.exists():
            step, losses = _restore(path, model, opt, scaler, gen, ema, params, names, config, fingerprints,
                                    device, rank)

        def save():
            ranks = _gather_rng_states(device, world)  # a collective: every rank saves together
            weights = {"lora": lora_state_dict(model)} if config.lora_rank else {"model": model.state_dict()}
            rng = {**ranks[0], "ranks": ranks, "batches": gen.get_state()}
            state = {"format": TRAIN_FORMAT, "step": step, "losses": list(losses),
                     "train_config": config.to_dict(), "unet_config": model.config.to_dict(),
                     "fingerprints": fingerprints, **weights, "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "ema": {names[id(p)]: e for p, e in zip(params, ema)},
                     "rng": rng}
            _on_rank_zero(lambda: _write_checkpoint(path, state, saved), rank, world)

        batch, saved = config.batch_size, step
        micro = batch // (world * config.grad_accum)
        loss_fn = _LossModule(model)
        if world > 1:
            loss_fn = torch.nn.parallel.DistributedDataParallel(
                loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()  # official: batch-statistics BatchNorm in the frozen encoder, dropout in the UNet
        while step < config.steps:
            idx = torch.randperm(len(data), generator=gen)[:batch]
            t = torch.randint(0, model.config.diffusion_steps, (batch,), generator=gen).to(device)
            noise = torch.randn((batch, *data.images.shape[1:]), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            total = None
            for k in range(config.grad_accum):
                part = slice((rank * config.grad_accum + k) * micro, (rank * config.grad_accum + k + 1) * micro)
                last = k == config.grad_accum - 1
                with loss_fn.no_sync() if world > 1 and not last else nullcontext():
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss = loss_fn(*data.batch(idx[part], device), t[part], noise[part]).mean()
                    scaler.scale(loss / config.grad_accum).backward()
                share = loss.detach() / config.grad_accum
                total = share if total is None else total + share
            if world > 1:
                torch.distributed.all_reduce(total)
                total = total / world
            value = total.item()
            if not math.isfinite(value):
                raise TrainingError(_diverged_message(value, step + 1, config, path, saved))
            if config.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema:
                for average, p in zip(ema, params):
                    average.lerp_(p.detach(), 1 - config.ema_rate)
            step += 1
            losses.append(value)
            if path is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                save()
                saved = step
            try:
                if preview is not None and rank == 0 and config.preview_every and step % config.preview_every == 0:
                    _run_preview(preview, step, model, device)
                notify(callback, step, config.steps, loss=value, model=model)
            except BaseException:
                if path is not None and saved != step:
                    save()  # a cancel keeps every completed step
                raise
    return model.eval(), losses


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype of mixed precision, None for plain fp32 (the weights stay fp32 either way)."""
    dtype = resolve_dtype(precision, device)
    return None if dtype == torch.float32 else dtype


class _LossModule(torch.nn.Module):
    """p2_loss as a module's forward, so that DistributedDataParallel can hook the backward pass."""

    def __init__(self, model: DiffusionRig):
        super().__init__()
        self.model = model

    def forward(self, images, buffers, t, noise):
        return p2_loss(self.model, images, buffers, t, noise)


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rng_states(device: torch.device, world: int) -> list[dict]:
    """[{"cpu", "cuda"}] of every rank's global generators (dropout), rank order."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def _on_rank_zero(write: Callable[[], None], rank: int, world: int) -> None:
    """Run `write` on rank 0 and raise its error on every rank, so that no rank waits on a failed one."""
    error = None
    if rank == 0:
        try:
            write()
        except OSError as err:
            error = err
    if world > 1:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


def _check_album(model: DiffusionRig, data: TrainingData, config: TrainConfig, world: int = 1) -> None:
    if not isinstance(data, TrainingData):
        raise TypeError(f"data must be a TrainingData(images, buffers), got {type(data).__name__}")
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be a multiple of the number of "
                         f"processes ({world}) times grad_accum ({config.grad_accum}); change one of them")
    if len(data) < config.batch_size:
        raise ValueError(
            f"the album has {len(data)} image(s) but batch_size is {config.batch_size}: each step needs "
            f"{config.batch_size} different images (official stage 2); add photos (the paper uses about 20 "
            "per person) or lower batch_size"
        )
    want = model.config.in_channels - 3
    if data.buffers.shape[1] != want:
        raise ValueError(f"album buffers must have {want} channels (rendered|normal|albedo), "
                         f"got {data.buffers.shape[1]}")
    model.check_image_size(*data.images.shape[2:], what="album images")


def _trainable_parameters(model: DiffusionRig, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Make the model trainable in fp32 and freeze all but the UNet (or its LoRA adapters) and, with
    train_encoder, the global encoder; returns what trains."""
    if any(t.is_inference() for t in model.state_dict().values()):
        # ComfyUI runs nodes under inference_mode; such tensors cannot be trained: take plain copies
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.float()
    model.requires_grad_(False)  # official stage 2: only denoisingUNet.* parameters get gradients
    if config.lora_rank:
        if not lora_layers(model):
            inject_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets,
                        generator=torch.Generator().manual_seed(config.seed + 2))
        info = lora_info(model)
        alpha = float(config.lora_rank if config.lora_alpha is None else config.lora_alpha)
        if (info.rank, info.alpha, set(info.targets)) != (config.lora_rank, alpha, set(config.lora_targets)):
            raise ValueError(f"the model already has LoRA adapters (rank {info.rank}, alpha {info.alpha}, targets "
                             f"{list(info.targets)}) that differ from the config; match them or merge_lora() first")
        params = [p for layer in lora_layers(model).values() for p in (layer.lora_down.weight, layer.lora_up.weight)]
    else:
        if lora_layers(model):
            raise ValueError("the model has LoRA adapters but lora_rank is 0: merge_lora(model) before a full "
                             "fine-tune, or set lora_rank to train the adapters")
        params = list(model.denoisingUNet.parameters())
        if config.train_encoder:
            params += list(model.encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def _base_fingerprint(model: DiffusionRig) -> list[float]:
    """Absolute sum of the frozen UNet weights: tells whether a LoRA checkpoint belongs to this base."""
    frozen = [p for p in model.denoisingUNet.parameters() if not p.requires_grad]
    return [float(sum(p.detach().double().abs().sum() for p in frozen))]


@contextmanager
def _private_rng(seed: int, device: torch.device):
    """Seed the global generators (dropout draws from them) for this run; restore the caller's afterwards."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


@contextmanager
def _checkpointing(model: DiffusionRig, enabled: bool):
    """Turn on gradient checkpointing of every ResBlock / AttentionBlock for the duration."""
    blocks = [m for m in model.denoisingUNet.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    before = [m.use_checkpoint for m in blocks]
    for m in blocks:
        m.use_checkpoint = m.use_checkpoint or enabled
    try:
        yield
    finally:
        for m, flag in zip(blocks, before):
            m.use_checkpoint = flag


def _run_preview(preview: Preview, step: int, model: DiffusionRig, device: torch.device) -> None:
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        model.eval()
        try:
            preview(step, model)
        finally:
            model.train()


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def _restore(path: Path, model, opt, scaler, gen, ema, params, names, config: TrainConfig, fingerprints: dict,
             device: torch.device, rank: int = 0) -> tuple[int, list[float]]:
    """Load a training checkpoint into the run's objects after checking it belongs to this run."""
    restart = f"delete {path} or pass resume=False to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise unreadable(CheckpointError, path, f"cannot read the training checkpoint ({type(err).__name__}: "
                         f"{str(err)[:200]})", restart) from err
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{path} is not a DiffusionRig training checkpoint; {restart}", path)
    weights = "lora" if config.lora_rank else "model"
    missing = [k for k in ("step", "losses", "train_config", "unet_config", "fingerprints", weights, "optimizer",
                           "scaler", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"the training checkpoint {path} is damaged: it lacks {missing}; {restart}", path)
    check_finite(state[weights], path, CheckpointError, restart)
    ours = config.to_dict()
    problems = [f"{k} {state['train_config'].get(k)!r} (now {ours[k]!r})" for k in _TRAJECTORY_FIELDS
                if state["train_config"].get(k) != ours[k]]
    unet = {k: v for k, v in model.config.to_dict().items() if k != "use_checkpoint"}
    if {k: v for k, v in state["unet_config"].items() if k != "use_checkpoint"} != unet:
        problems.append("a model of another architecture")
    if not _close(state["fingerprints"]["data"], fingerprints["data"]):
        problems.append("another album")
    if not _close(state["fingerprints"]["base"], fingerprints["base"]):
        problems.append("another base model")
    if state["step"] > config.steps:
        problems.append(f"{state['step']} steps done, more than steps={config.steps}")
    if problems:
        raise TrainingError(f"the training checkpoint {path} cannot be resumed by this run: it has "
                            f"{'; '.join(problems)}. Use the same settings, or {restart}")
    if config.lora_rank:
        load_lora_state_dict(model, state["lora"], source=f"training checkpoint {path}")
    else:
        model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    saved_ema = state.get("ema") or {}
    for p, e in zip(params, ema):
        if names[id(p)] in saved_ema:  # else (EMA switched on now) it starts from the current weights
            e.copy_(saved_ema[names[id(p)]])
    # each rank continues its own dropout stream; a rank the saved run did not have keeps its fresh seed
    ranks = state["rng"].get("ranks") or [state["rng"]]
    if rank < len(ranks):
        torch.set_rng_state(ranks[rank]["cpu"])
        if device.type == "cuda" and ranks[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
    gen.set_state(state["rng"]["batches"])
    return state["step"], list(state["losses"])


def _kept(path: Path, saved: int | None) -> str:
    """What a failed write or a stop leaves: the last checkpoint of this run, or the file as it was."""
    if saved:
        return f"the checkpoint of step {saved} is intact, and running again resumes from it"
    if path.exists():
        return f"{path} is unchanged"
    return "no checkpoint has been written yet"


def _write_error(path: Path, err: OSError, saved: int | None) -> OSError:
    if isinstance(err, DiskFullError):
        return DiskFullError(err.errno, f"{err.strerror}; {_kept(path, saved)}")
    message = (f"cannot write the training checkpoint {path} ({err.strerror or err}); free disk space or choose "
               f"a writable folder; {_kept(path, saved)}")
    return OSError(err.errno, message) if err.errno else OSError(message)


def _checkpoint_bytes_estimate(model: DiffusionRig, config: TrainConfig) -> int:
    """About the size of a training checkpoint: weights (fp32), Adam's two moments of what trains, and
    1 MB for the losses, RNG states and pickle framing."""
    framing = 1 << 20
    weights = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in model.state_dict().values())
    if config.lora_rank:
        encoder = sum(b.numel() * 4 for b in model.encoder.buffers())
        adapters = lora_numel(model, config.lora_rank, config.lora_targets)
        return framing + encoder + 3 * 4 * adapters
    trained = sum(p.numel() for p in model.denoisingUNet.parameters())
    if config.train_encoder:
        trained += sum(p.numel() for p in model.encoder.parameters())
    return framing + weights + 2 * 4 * trained


def _check_writable(path: Path, needed: int) -> None:
    """Fail before training, not after the first checkpoint_every steps, when the folder is unwritable or
    the disk cannot hold a checkpoint (needed: its estimated size in bytes)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if free_bytes(path.parent) < needed:
            raise disk_full_error(path, needed, " before training starts")
    except OSError as err:
        raise _write_error(path, err, None) from err


def _write_checkpoint(path: Path, state: dict, saved: int) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True, size_hint=_tensor_bytes(state))
    except OSError as err:
        raise _write_error(path, err, saved) from err


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _diverged_message(value: float, step: int, config: TrainConfig, path: Path | None, saved: int) -> str:
    kept = (f"the last good checkpoint {path} (step {saved}) is kept" if path is not None and saved
            else _kept(path, saved) if path is not None else "no checkpoint was written")
    return (f"the training loss became {value} at step {step} of {config.steps}, so training stopped; {kept}. "
            f"Lower lr (now {config.lr}), use precision 'bf16' or 'fp32' instead of 'fp16', or check the album "
            "for broken images or buffers")

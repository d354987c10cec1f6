"""The DiffusionRig denoiser: a guided-diffusion UNet with FiLM of a global code, plus the encoder.

Architecture and parameter names follow the official implementation so that its checkpoints
load key-for-key (`denoisingUNet.*`, `encoder.*`). The model is built from a `UNetConfig`
whose defaults are the official `model_and_diffusion_defaults()`; weights are loaded
separately (see `checkpoints.py`).

Tensors: images and noise are [B, 3, H, W] in [-1, 1]; physical buffers are [B, 9, H, W]
(rendered | normal | albedo); the global code is [B, latent_dim]; timesteps are int64 in
0..diffusion_steps-1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .resnet import resnet18, resnet50

# Official default channel multipliers per image size, used when channel_mult is empty.
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Official diffusion kwargs this implementation supports only at their DiffusionRig values.
_FIXED_DIFFUSION_KWARGS = {
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to build a DiffusionRig model; defaults are the official defaults.

    `attention_resolutions` are feature-map resolutions (official convention: 16 means the
    16x16 level of a 256 model); `channel_mult` empty picks the official default per size.
    """

    image_size: int = 256
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] = ()
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    dropout: float = 0.1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    latent_dim: int = 64
    in_channels: int = 12
    encoder_type: str = "resnet18"
    learn_sigma: bool = False
    use_checkpoint: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    p2_gamma: float = 1.0
    p2_k: float = 1.0

    def __post_init__(self):
        if self.encoder_type not in ("resnet18", "resnet50"):
            raise ValueError(f"encoder_type must be 'resnet18' or 'resnet50', got {self.encoder_type!r}")
        if not self.use_scale_shift_norm:
            # the official ResBlock adds a 2*C code projection to C channels without it and fails
            raise ValueError("use_scale_shift_norm=False is not supported: DiffusionRig's FiLM needs scale-shift norm")
        if not self.channel_mult and self.image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {self.image_size}; "
                f"give channel_mult explicitly (defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)})"
            )

    @property
    def channel_mults(self) -> tuple[float, ...]:
        return tuple(self.channel_mult) or _DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_downsample(self) -> tuple[int, ...]:
        """Downsample factors at which attention runs (official: image_size // resolution)."""
        return tuple(self.image_size // int(r) for r in self.attention_resolutions)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        """Inverse of `to_dict`; unknown keys are an error so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields: {sorted(names)}")
        data = dict(data)
        for key in ("channel_mult", "attention_resolutions"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_official_kwargs(cls, kwargs: dict) -> "UNetConfig":
        """Build from the official `create_model_and_diffusion(**kwargs)` dict.

        Accepts the official string forms ("1,2,2", "16"); keys missing from `kwargs` take
        the official defaults. Diffusion options this project does not implement must keep
        their official values.
        """
        kwargs = dict(kwargs)
        for key, expected in _FIXED_DIFFUSION_KWARGS.items():
            value = kwargs.pop(key, expected)
            if value != expected:
                raise ValueError(
                    f"official kwarg {key}={value!r} is not supported (DiffusionRig uses {expected!r}); "
                    "respacing is chosen per call with ddim_sample(steps=...)"
                )
        kwargs.pop("p2_weight", None)  # the p2 loss is always weighted; gamma/k are kept
        mult = kwargs.pop("channel_mult", "")
        if isinstance(mult, str):
            mult = tuple(float(m) if "." in m else int(m) for m in mult.split(",") if m.strip())
        attn = kwargs.pop("attention_resolutions", "16")
        if isinstance(attn, str):
            attn = tuple(int(r) for r in attn.split(",") if r.strip())
        return cls.from_dict({**kwargs, "channel_mult": tuple(mult), "attention_resolutions": tuple(attn)})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, t [B] -> [B, dim] float32: cos half first, then sin (official order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (official behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        if x.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        if x.device.type == "cpu":
            # the CPU kernel takes low-precision input with float32 statistics and parameters
            # natively: bit-identical to the float32 round trip, without two full-size copies
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)  # official: 32 groups, eps 1e-5


def _film(h: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    scale, shift = scale_shift[..., None, None].chunk(2, dim=1)
    return torch.addcmul(shift, h, 1 + scale)


class _Resample(nn.Module):
    """Nearest 2x upsampling or 2x2 average pooling (the ResBlock up/down path)."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by an optional 3x3 conv (used when resblock_updown=False)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """Strided 3x3 conv, or 2x2 average pooling (used when resblock_updown=False)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with timestep FiLM followed by global-code FiLM after its second GroupNorm.

    forward: x [B, C, H, W], emb [B, E], code [B, latent] -> [B, C_out, H', W'].
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 up: bool = False, down: bool = False, latent_dim: int = 64, use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd = _Resample(up)
            self.x_upd = _Resample(up)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, code, use_reentrant=False)
        return self._forward(x, emb, code)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        code_out = self.cond_emb_layers(code).to(h.dtype)
        h = _film(_film(self.out_layers[0](h), emb_out), code_out)
        return self.skip_connection(x) + self.out_layers[1:](h)


class AttentionBlock(nn.Module):
    """Spatial self-attention; `legacy_order` splits heads before q/k/v (official default).

    forward: x [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 legacy_order: bool = True, use_checkpoint: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.legacy_order = legacy_order
        self.use_checkpoint = use_checkpoint
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        heads, ch, length = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.legacy_order:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        # [B*heads, T, ch]; the default scale 1/sqrt(ch) equals the official ch^-1/4 on q and k.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, length))
        return (x + h).reshape(b, c, hgt, wid)


class _Block(nn.ModuleList):
    """A sequence of layers where ResBlocks also receive the embeddings (official TimestepEmbedSequential)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb, code) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """The denoising UNet. forward: x_t [B,3,H,W], t [B], buffers [B,9,H,W], code [B,latent] -> [B,3|6,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc = cfg.num_channels
        emb_dim = mc * 4
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        attn_ds = set(cfg.attention_downsample)
        legacy = not cfg.use_new_attention_order

        def res(cin, cout=None, up=False, down=False):
            return ResBlock(cin, emb_dim, cfg.dropout, cout, up, down, cfg.latent_dim, cfg.use_checkpoint)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, cfg.num_head_channels, legacy, cfg.use_checkpoint)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        mults = cfg.channel_mults
        ch = input_ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(_Block(layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(_Block([down]))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = _Block([res(ch), attn(ch, cfg.num_heads), res(ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(_Block(layers))
        out_conv = nn.Conv2d(input_ch, 6 if cfg.learn_sigma else 3, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), out_conv)

    def forward(self, x: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.forward_split(x, t, buffers, code)[0]

    def forward_split(self, x: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor,
                      shallow: int = 0, deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass split into a shallow path and a deep one, for feature caching.

        The shallow path is the first `shallow` input blocks and the last `shallow` output
        blocks (joined by their skips); the deep path is everything between. Returns
        (output, deep features) where the deep features are the input of output block
        -shallow (before its skip is concatenated). Given `deep` from an earlier call, only
        the shallow path runs. shallow=0 and deep=None is the plain forward pass.
        """
        dtype = self.out[2].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.num_channels).to(dtype))
        code = code.to(dtype)
        h = torch.cat([x, buffers], dim=1).to(dtype)
        split = len(self.output_blocks) - shallow
        skips = []
        for block in self.input_blocks if deep is None else self.input_blocks[:shallow]:
            h = block(h, emb, code)
            skips.append(h)
        if deep is None:
            h = self.middle_block(h, emb, code)
            for block in self.output_blocks[:split]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, code)
            deep = h
        h = deep
        for block in self.output_blocks[split:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, code)
        return self.out(h), deep


def build_encoder(cfg: UNetConfig) -> nn.Module:
    """Global-code encoder: torchvision-layout ResNet-18/50 with fc -> latent_dim."""
    return (resnet18 if cfg.encoder_type == "resnet18" else resnet50)(cfg.latent_dim)


class DiffusionRig(nn.Module):
    """Denoiser (`denoisingUNet`) + global-code encoder (`encoder`), official state-dict layout."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig()
        self.denoisingUNet = UNet(self.config)
        self.encoder = build_encoder(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoisingUNet.out[2].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.denoisingUNet.out[2].weight.device

    def activation_bytes(self, batch: int = 1, training: bool = False) -> int:
        """Estimated peak memory (bytes) of denoising `batch` images at the model's size, beyond its weights,
        for a host that makes room before running the model (ComfyUI's `memory_required`).

        Fitted to peaks traced op by op (every tensor alive at once): the skip connections the UNet keeps, about
        18 bytes per element of a top-level feature map (its ResBlocks' working tensors, GroupNorm in fp32) and
        16 bytes per attention score. The official 256 px model in bf16: 212 MiB per image, traced 208 MiB
        (tests/test_model_handle.py checks smaller ones). training: a training step (fp32, no gradient
        checkpointing) keeps about 14 times that per image, plus gradients and Adam's two moments."""
        cfg, mults = self.config, self.config.channel_mults
        res, ch = cfg.image_size, int(mults[0] * cfg.num_channels)
        top = skips = ch * res * res  # top: a feature map of the top level; skips: elements kept for the way up
        scores = 0
        for level, mult in enumerate(mults):
            ch = int(mult * cfg.num_channels)
            heads = cfg.num_heads if cfg.num_head_channels == -1 else ch // cfg.num_head_channels
            if 2 ** level in cfg.attention_downsample or level == len(mults) - 1:  # the middle block attends too
                scores = max(scores, heads * (res * res) ** 2)
            skips += cfg.num_res_blocks * ch * res * res
            if level != len(mults) - 1:
                res //= 2
                skips += ch * res * res
        element = 4 if training else self.dtype.itemsize
        per_image = skips * element + 18 * top + 16 * scores
        if not training:
            return batch * per_image
        weights = sum(p.numel() for p in self.parameters()) * 4
        return batch * 14 * per_image + 3 * weights

    def check_image_size(self, height: int, width: int, what: str = "image") -> None:
        m = self.config.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ValueError(
                f"{what} is {height}x{width}, but this DiffusionRig model needs a height and width that are "
                f"multiples of {m} (it halves the resolution {len(self.config.channel_mults) - 1} times); "
                f"it was trained at {self.config.image_size}x{self.config.image_size}: resize or align the face "
                f"to that size"
            )

    def encode(self, image: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] (raw, no ImageNet normalisation, as official) -> code [B, latent] float32.

        check_finite=False skips the NaN check, a host sync on a GPU: for callers that checked on the host
        already (training checks its album once, not every step)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encode expects an image tensor [B, 3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        if check_finite:
            _check_finite("image", image)
        weight = self.encoder.conv1.weight
        return self.encoder(image.to(device=weight.device, dtype=weight.dtype)).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Predict the noise: x_t [B,3,H,W], t int64 [B] (0..999), buffers [B,9,H,W], code [B,latent] -> eps [B,3,H,W].

        eps is returned in x_t's dtype.
        """
        out = self.denoisingUNet(x_t, t, buffers, code)
        return out[:, :3].to(x_t.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, t, buffers, code)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values; check the node or image that produced it "
            "(e.g. a failed face fit or a corrupt image) and re-run it"
        )

"""A 3D conditional diffusion UNet in the style of the reference paper (PET, CT and the noisy mask concatenated).

Residual blocks with GroupNorm and SiLU, a sinusoidal timestep embedding with an MLP and scale-shift (FiLM)
conditioning, strided-convolution downsampling and ConvTranspose3d upsampling (3D nearest ``Resize`` is slow on
ONNX Runtime's CUDA provider), attention optional and off by default. The forward signature follows the denoiser
contract of DESIGN.md: ``y = f(x, t)`` with ``x`` ``[B, C_img + 1, D, H, W]`` and ``t`` float32 ``[B]`` holding the
original training timestep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DiffusionUNet3D", "UNetConfig", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of ``DiffusionUNet3D``; recorded in the manifest.

    Attributes:
        image_channels: conditioning channels (PET, CT).
        out_channels: 1, or 2 for learned-sigma models (prediction first, variance interpolation second).
        base_channels: width of the first level.
        channel_mult: width multiplier per level; its length is the number of levels.
        num_res_blocks: residual blocks per level (encoder and decoder).
        groups: GroupNorm groups (must divide every width).
        attention_levels: levels (0-based) with a self-attention block; empty by default.
        dropout: dropout inside residual blocks during training.
    """

    image_channels: int = 2
    out_channels: int = 1
    base_channels: int = 8
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 1
    groups: int = 4
    attention_levels: tuple[int, ...] = field(default_factory=tuple)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.out_channels not in (1, 2):
            raise ValueError(f"out_channels must be 1 or 2 (learned sigma), got {self.out_channels}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"groups={self.groups} must divide every width, got {self.base_channels * m}")
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))

    @property
    def in_channels(self) -> int:
        return self.image_channels + 1

    @property
    def divisor(self) -> int:
        """Patch sides must be multiples of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` with frequencies exp(-ln(max_period)·i/half) (guided-diffusion, MONAI).

    Computed in float32 whatever the network precision: t·freq at t ≈ 999 loses digits in fp16.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over voxels (for low-resolution levels only)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, -1).unbind(1)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
        return x + self.proj(h)


class DiffusionUNet3D(nn.Module):
    """The default diffseg denoiser; see ``UNetConfig``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c0 = config.base_channels
        widths = [c0 * m for m in config.channel_mult]
        self.time_dim = c0 * 4
        self.time_mlp = nn.Sequential(nn.Linear(c0, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim))
        self.stem = nn.Conv3d(config.in_channels, c0, 3, padding=1)

        g, d = config.groups, config.dropout
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = c0
        for level, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(cin, w, self.time_dim, g, d))
                cin = w
            self.down_blocks.append(blocks)
            self.down_attn.append(Attention(w, g) if level in config.attention_levels else nn.Identity())
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv3d(w, w, 3, stride=2, padding=1))

        self.mid = ResBlock(widths[-1], widths[-1], self.time_dim, g, d)

        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            w = widths[level]
            self.upsample.append(nn.ConvTranspose3d(widths[level + 1], w, 2, stride=2))
            blocks = nn.ModuleList()
            cin = 2 * w
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(cin, w, self.time_dim, g, d))
                cin = w
            self.up_blocks.append(blocks)
        self.out_norm = nn.GroupNorm(g, c0)
        self.out_conv = nn.Conv3d(c0, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            h = self.down_attn[level](h)
            if level < len(self.down_blocks) - 1:
                skips.append(h)
                h = self.downsample[level](h)
        h = self.mid(h, emb)
        for up, blocks in zip(self.upsample, self.up_blocks, strict=True):
            h = torch.cat([up(h), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))

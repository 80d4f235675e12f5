"""A diffusers ``UNet2DModel`` as a velocity field ``v(x, t)`` on images ``x: (B, C, H, W)``.

The one module of ``marflow_core`` that imports diffusers (lazily, on construction). Core time
``t in [0, 1]`` (0 = noise, 1 = data) enters the UNet's sinusoidal timestep embedding as
``time_scale * t`` (default 999, the range diffusers' embeddings are tuned for).

Attention uses the plain ``AttnProcessor`` (``attention: "plain"``): diffusers' default fused CPU
kernel (``scaled_dot_product_attention``) has no double backward, which the parameter gradient of a
VJP-based Hutchinson divergence needs. ``attention: "default"`` keeps the fused kernel (fine for
training without MA, for sampling, and for the finite-difference divergence ``hutchinson_fd``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidParameter
from .models import as_batch_time

ATTENTION_KINDS: tuple[str, ...] = ("plain", "default")


@dataclass
class UNetConfig:
    """``UNet2DModel`` size: ``widths`` per resolution level (each level but the last halves the
    resolution), ``attention_levels`` the levels with self-attention, ``layers_per_block`` ResNet
    blocks per level, ``norm_groups`` GroupNorm groups (must divide every width).

    ``attention_head_dim``: channels per attention head (``width / attention_head_dim`` heads in
    each attention layer, the mid block's included), or None for one head over all channels (DDPM's
    attention). ``dropout``: the ResNet blocks' dropout probability. DDPM's CIFAR-10 layout is
    ``widths [128, 256, 256, 256]``, ``attention_levels [1]``, ``layers_per_block 2``,
    ``norm_groups 32``, ``attention_head_dim None``, ``dropout 0.1``.
    """

    widths: list[int] = field(default_factory=lambda: [32, 64])
    attention_levels: list[int] = field(default_factory=lambda: [1])
    layers_per_block: int = 1
    norm_groups: int = 8
    attention: str = "plain"
    time_scale: float = 999.0
    attention_head_dim: int | None = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise InvalidParameter("widths", self.widths, "need at least one level, widths >= 1")
        if self.norm_groups < 1 or any(w % self.norm_groups for w in self.widths):
            raise InvalidParameter("norm_groups", self.norm_groups, f"must divide every width {self.widths}")
        if any(not 0 <= level < len(self.widths) for level in self.attention_levels):
            raise InvalidParameter("attention_levels", self.attention_levels,
                                   f"levels are 0..{len(self.widths) - 1}")
        if self.layers_per_block < 1:
            raise InvalidParameter("layers_per_block", self.layers_per_block, "must be >= 1")
        if self.attention not in ATTENTION_KINDS:
            raise InvalidParameter("attention", self.attention, f"one of {ATTENTION_KINDS}")
        if not self.time_scale > 0:
            raise InvalidParameter("time_scale", self.time_scale, "must be > 0")
        if self.attention_head_dim is not None:
            attended = sorted({self.widths[i] for i in self.attention_levels} | {self.widths[-1]})
            if self.attention_head_dim < 1 or any(w % self.attention_head_dim for w in attended):
                raise InvalidParameter("attention_head_dim", self.attention_head_dim,
                                       f"must be None or divide the width of every attention layer "
                                       f"{attended} (the mid block attends at the last width)")
        if not 0 <= self.dropout < 1:
            raise InvalidParameter("dropout", self.dropout, "must lie in [0, 1)")

    def check_size(self, size: int) -> None:
        """Every downsampling must divide the image side ``size``."""
        factor = 2 ** (len(self.widths) - 1)
        if size % factor:
            raise InvalidParameter("widths", self.widths,
                                   f"{len(self.widths)} levels downsample by {factor}, which does not "
                                   f"divide the image size {size}")


class UNetVelocity(nn.Module):
    """``v(x, t) = UNet(x, time_scale * t)`` for ``x: (B, C, H, W)``, ``t`` scalar or ``(B,)``."""

    def __init__(self, channels: int, size: int, config: UNetConfig | None = None) -> None:
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import AttnProcessor

        self.config = config = config or UNetConfig()
        config.check_size(size)
        levels = range(len(config.widths))
        down = tuple("AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels)
        up = tuple("AttnUpBlock2D" if i in config.attention_levels else "UpBlock2D"
                   for i in reversed(levels))
        self.unet = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels,
            layers_per_block=config.layers_per_block, block_out_channels=tuple(config.widths),
            norm_num_groups=config.norm_groups, down_block_types=down, up_block_types=up,
            attention_head_dim=config.attention_head_dim, dropout=config.dropout)
        if config.attention == "plain":
            for module in self.unet.modules():  # UNet2DModel has no set_attn_processor
                if hasattr(module, "set_processor"):
                    module.set_processor(AttnProcessor())
        self.channels, self.size = channels, size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = as_batch_time(t, x)
        return self.unet(x, self.config.time_scale * t).sample


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

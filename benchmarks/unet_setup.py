"""A small diffusers ``UNet2DModel`` as a velocity field ``v(x, t)``, for the image benchmarks.

Time ``t in [0, 1]`` is passed to the UNet's timestep embedding as ``999 t``. Attention uses the
plain ``AttnProcessor``: the fused CPU kernel has no double backward, which the VJP-based
Hutchinson term of the MA regularizer needs.
"""

from __future__ import annotations

import torch
from torch import nn


class UNetVelocity(nn.Module):
    def __init__(self, size: int = 8, channels: int = 1, widths: tuple[int, ...] = (32, 64)) -> None:
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import AttnProcessor

        self.unet = UNet2DModel(
            sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=widths, norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        for module in self.unet.modules():  # UNet2DModel has no set_attn_processor
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.unet(x, 999 * t).sample

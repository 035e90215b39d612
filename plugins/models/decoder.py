"""The 3D decoder blocks of the model plugins: joining a coarse volume with lifted features, refining,
the residual step between levels and the sizes of the levels.

Parameter shapes do not depend on the output resolution or the number of views, so that a checkpoint of
one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .inputs import _groups, resize3d


class Join(nn.Module):
    """First half of a residual 3D block on joined inputs: the coarser features (reduced by a 1x1x1
    convolution, then upsampled), skip features and any extra channels. The block is split in two
    (``Join``, ``Refine``) so that checkpointing recomputes each half on its own: the finest decoder
    level dominates the memory."""

    def __init__(self, coarse: int, skip: int, extra: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv3d(coarse, cout, 1) if coarse else None
        cin = (cout if coarse else 0) + skip + extra
        self.conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(_groups(cout), cout)
        self.shortcut = nn.Conv3d(cin, cout, 1, bias=False)
        self.act = nn.GELU()

    def joined(self, coarse: torch.Tensor | None, rest: list[torch.Tensor], size: int,
               channels_last: bool = False) -> torch.Tensor:
        parts = ([resize3d(self.reduce(coarse), size)] if self.reduce is not None else []) + list(rest)
        x = torch.cat(parts, dim=1)
        return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x

    def forward(self, coarse: torch.Tensor | None, rest: list[torch.Tensor], size: int,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The activated first convolution and the joined input (which ``Refine`` needs for the shortcut)."""
        x = self.joined(coarse, rest, size, channels_last)
        return self.act(self.norm(self.conv(x))), x


class Refine(nn.Module):
    """Second half of the residual block: ``h = GELU(GN(conv(y)) + shortcut(x))``, and with ``head`` a
    one-channel 1x1x1 head on ``h`` (a residual for the running prediction), returned as ``(h, head(h))``."""

    def __init__(self, channels: int, head: bool = False):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.act = nn.GELU()
        self.head = nn.Conv3d(channels, 1, 1) if head else None
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, y: torch.Tensor, x: torch.Tensor, join: Join):
        h = self.act(self.norm(self.conv(y)) + join.shortcut(x))
        return h if self.head is None else (h, self.head(h))


def residual_block(join: Join, refine: Refine, coarse: torch.Tensor | None, rest: list[torch.Tensor], size: int,
                   channels_last: bool = False, checkpointing: bool = False):
    """``refine(join(...))``. With checkpointing each half is recomputed in the backward pass on its own,
    and the joined input is rebuilt from the (small or already kept) inputs rather than kept."""
    if not (checkpointing and torch.is_grad_enabled()):
        y, x = join(coarse, rest, size, channels_last)
        return refine(y, x, join)

    def first(coarse, rest):
        return join(coarse, rest, size, channels_last)[0]

    def second(y, coarse, rest):
        return refine(y, join.joined(coarse, rest, size, channels_last), join)

    y = checkpoint(first, coarse, rest, use_reentrant=False)
    return checkpoint(second, y, coarse, rest, use_reentrant=False)


def level_sizes(start: int, end: int, levels: int) -> list[int]:
    """Grid sizes of ``levels`` decoder levels growing geometrically from ``start`` to exactly ``end``."""
    sizes = [max(1, round(start * (end / start) ** (i / levels))) for i in range(1, levels + 1)]
    sizes[-1] = end
    return sizes

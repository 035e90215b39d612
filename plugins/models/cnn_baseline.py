"""``cnn_baseline``: an X2CT-GAN-style convolutional generator, the reference the ViT cascade is compared with.

As in X2CT-GAN (Ying et al., CVPR 2019): a 2D CNN encoder per view, every encoder level expanded
from 2D to 3D by replicating it along the view's rays (here the geometry-aware back-projection, which
for PA + lateral parallel beams is X2CT-GAN's repeat-and-permute), the views fused by averaging,
and a 3D U-Net-like decoder that upsamples level by level with those fused skips. No attention.

Parameter-name prefixes (for a stage's ``freeze``): ``encoders.N.`` (one per view, or ``encoders.0.``
when shared), ``decoder.bottleneck.`` (the coarsest level), ``decoder.levels.N.`` (N = 0 finest, each
with ``expand.`` (the 2D projection before the expansion), ``join.`` and ``refine.`` (its residual 3D
block)), ``decoder.head.``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange, reduce

from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl

from .decoder import Join, Refine, residual_block
from .inputs import check_inputs, maybe_checkpoint, resize3d
from .lifting import lift


class Encoder2d(nn.Module):
    """Plain 2D CNN: a stem, then ``levels`` stride-2 residual stages; returns all levels finest first."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                                  nn.InstanceNorm2d(widths[0], affine=True), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                          nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True),
                          nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                          nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True))
            for cin, cout in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class Expand(nn.Module):
    """2D -> 3D for one encoder level: a 1x1 projection, replication along each view's rays, the views' mean."""

    def __init__(self, enc_channels: int, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(enc_channels, channels, 1)

    def forward(self, feats: torch.Tensor, geometry: dict, size: int) -> torch.Tensor:
        b = feats.shape[0]
        f = self.proj(rearrange(feats, "b v c h w -> (b v) c h w"))
        return reduce(lift(rearrange(f, "(b v) c h w -> b v c h w", b=b), geometry, size), "b v c d h w -> b c d h w",
                      "mean")


class CNNLevel(nn.Module):
    """One decoder level: the expanded encoder level joined with the upsampled coarser output, a residual 3D block."""

    def __init__(self, enc_channels: int, coarse: int, cout: int):
        super().__init__()
        self.expand = Expand(enc_channels, cout)
        self.join = Join(coarse, cout, 0, cout)
        self.refine = Refine(cout)

    def units(self) -> list[nn.Module]:
        return [self.expand, self.join, self.refine]

    def forward(self, z: torch.Tensor | None, feats: torch.Tensor, geometry: dict, size: int,
                channels_last: bool = False, checkpointing: bool = False) -> torch.Tensor:
        x = maybe_checkpoint(checkpointing, self.expand, feats, geometry, size)
        return residual_block(self.join, self.refine, z, [x], size, channels_last, checkpointing)


class CNNBaseline(nn.Module):
    """X2CT-GAN-style generator: ``model(xrays [B, V, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]``.

    Options: ``channels`` (encoder width at full image resolution, doubled per level), ``levels``
    (stride-2 encoder stages = decoder upsampling steps), ``share_encoder`` (one encoder for all
    views, which then accepts any number of views in any order; otherwise one encoder per view of
    ``views``, as in X2CT-GAN, and the view count is fixed), ``gradient_checkpointing``,
    ``channels_last``. ``prev``, when given, is upsampled and the network predicts a residual over it.
    """

    uses_prev = True  # refines the previous stage's prediction (checked by testing.check_model)

    def __init__(self, *, resolution: int, views: list[float] = (0.0, 90.0), channels: int = 32, levels: int = 4,
                 share_encoder: bool = False, gradient_checkpointing: bool = False, channels_last: bool = True):
        super().__init__()
        for key, value, low in (("resolution", resolution, 1), ("channels", channels, 1), ("levels", levels, 1)):
            check_int(key, value, low)
        if not isinstance(views, (list, tuple)) or len(views) < 1:
            raise ValueError(f"views must list at least one gantry angle, got {views!r}")
        self.resolution, self.levels = resolution, levels
        self.num_views = None if share_encoder else len(views)
        self.gradient_checkpointing, self.channels_last = bool(gradient_checkpointing), bool(channels_last)
        enc = [channels * 2 ** min(i, 3) for i in range(levels + 1)]  # widths stop doubling after 3 levels
        dec = [max(c // 2, 4) for c in enc]
        self.encoders = nn.ModuleList(Encoder2d(enc) for _ in range(1 if share_encoder else len(views)))
        self.decoder = nn.Module()
        self.decoder.bottleneck = CNNLevel(enc[-1], 0, dec[-1])
        self.decoder.levels = nn.ModuleList(CNNLevel(enc[i], dec[i + 1], dec[i]) for i in range(levels))
        self.decoder.head = nn.Conv3d(dec[0], 1, 1)
        # The head starts at 1/100 of PyTorch's default scale and no bias: the first output is close to
        # 0 (or to prev). At the default scale its first output had 1.5-5x the CT's spread, and one seed
        # in three of the CPU matrix settled on a contrast-inverted volume (benchmarks/RESULTS.md).
        with torch.no_grad():
            self.decoder.head.weight.mul_(0.01)
            self.decoder.head.bias.zero_()

    @property
    def level_sizes(self) -> list[int]:
        """3D grid size per encoder level, finest (= R) first."""
        return [max(1, round(self.resolution / 2 ** i)) for i in range(self.levels + 1)]

    def encode(self, xrays: torch.Tensor) -> list[torch.Tensor]:
        """Per-view features ``[B, V, C_l, h_l, w_l]`` for every level, finest first."""
        b, v = xrays.shape[:2]
        if len(self.encoders) == 1:
            feats = self.encoders[0](rearrange(xrays, "b v c h w -> (b v) c h w"))
            return [rearrange(f, "(b v) c h w -> b v c h w", b=b) for f in feats]
        per_view = [enc(xrays[:, i]) for i, enc in enumerate(self.encoders)]
        return [torch.stack(level, dim=1) for level in zip(*per_view)]

    def checkpointed_modules(self) -> list[nn.Module]:
        """The units that gradient checkpointing recomputes (see ``x2ct_framework.model_info``)."""
        return [u for level in self.decoder.levels for u in level.units()]

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs("cnn_baseline", xrays, geometry, prev, views=self.num_views)
        feats = self.encode(xrays)
        ckpt = self.gradient_checkpointing and self.training
        sizes = self.level_sizes
        z = self.decoder.bottleneck(None, feats[-1], geometry, sizes[-1])
        for i in reversed(range(self.levels)):
            z = self.decoder.levels[i](z, feats[i], geometry, sizes[i], self.channels_last, ckpt)
        out = self.decoder.head(z).contiguous()
        if prev is not None:
            out = out + resize3d(prev.to(out.dtype), self.resolution)
        return out


@hookimpl
def register_models(register):
    register("cnn_baseline", CNNBaseline)

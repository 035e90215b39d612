"""``latent_flow_refiner``: ``flow_refiner``'s flow run on the latent grid of a 3D autoencoder.

At 256^3 a U-Net on every voxel is 8x the 128^3 one per step; MAISI and X-ray2CTPA sample in the latent
space of a 3D autoencoder instead. This model is ``flow_refiner`` (the same base, the same pixel-aligned X-ray
conditioning, the same objective, samplers, per-case seeding and options) with one change: the flow transports
noise to the *latent* of the residual, on a grid ``2**autoencoder_levels`` times coarser per axis, and the
autoencoder's decoder turns the sampled latent back into the residual at the output's resolution.

- **Autoencoder** (``VolumeAutoencoder``, prefix ``autoencoder.``): residual blocks and strided 3x3x3
  convolutions down ``levels`` times to ``latent_channels`` channels; the decoder mirrors it (trilinear up to
  the exact sizes, so any grid size works). It encodes the scaled residual ``r = (ct - base) / residual_scale``
  and is trained with ``autoencoder_weight`` x the L1 of its reconstruction of ``r`` (plus ``latent_weight`` x
  the latent's mean square, which keeps the latent's scale bounded), in the same steps as the flow.
- **Flow**: on ``x1 = stop_grad(encode(r)) / latent_scale`` (``latent_scale``: a running root mean square of the
  latent over training steps, momentum ``latent_momentum``, kept in the weights as buffer
  ``latent_scale_value``, as batch norm keeps its statistics): the flow's loss does not move the encoder, so the
  latent is the autoencoder's alone. The U-Net reads ``[x_t, base pooled to the latent grid, X-ray features at
  the latent grid]`` and predicts ``latent_channels`` velocities.
- **Sampling**: ``flow_refiner``'s sampler on the latent grid, then ``base + residual_scale x decode(latent_scale
  x z)``.

The autoencoder is trained jointly here, in the refiner's own stage (a cascade stage holds one model); the
published route trains it first on many CTs and freezes it, which this model does not do yet. What the latent
buys is sampling: the U-Net runs on ``(R / 2**levels)^3`` voxels (one 25-step sample at 128^3: 15x fewer
multiply-adds than ``flow_refiner``'s at the recipe's widths; a training step's forward costs about the same,
since the autoencoder encodes and decodes at full resolution; benchmarks/results/cpu/sampling/latent_flops.md).
What it risks is detail finer than the latent grid, which only the decoder can restore (docs/models.md,
"Beyond 128^3: a latent variant").
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl

from .flow_refiner import Condition, FlowRefiner, _groups, process_mean
from .inputs import maybe_checkpoint


class _Res3d(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1x1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(_groups(cin), cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, padding=1),
                                  nn.GroupNorm(_groups(cout), cout), nn.SiLU(), nn.Conv3d(cout, cout, 3, padding=1))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def latent_sizes(size: int, levels: int) -> list[int]:
    """The grid sizes from ``size`` down ``levels`` stride-2 convolutions (kernel 3, padding 1: ``ceil(n / 2)``)."""
    sizes = [size]
    for _ in range(levels):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class VolumeAutoencoder(nn.Module):
    """``encode([B, 1, R, R, R]) -> [B, C, L, L, L]`` and ``decode(z, R) -> [B, 1, R, R, R]``, with
    ``L = latent_sizes(R, levels)[-1]``: widths ``width * 2**i`` at level i."""

    def __init__(self, levels: int = 2, width: int = 16, latent_channels: int = 4, checkpointing: bool = False):
        super().__init__()
        self.levels, self.checkpointing = levels, checkpointing
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.enc_stem = nn.Conv3d(1, widths[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList(_Res3d(widths[i], widths[i]) for i in range(levels))
        self.enc_down = nn.ModuleList(nn.Conv3d(widths[i], widths[i + 1], 3, stride=2, padding=1)
                                      for i in range(levels))
        self.enc_out = nn.Sequential(_Res3d(widths[-1], widths[-1]), nn.GroupNorm(_groups(widths[-1]), widths[-1]),
                                     nn.SiLU(), nn.Conv3d(widths[-1], latent_channels, 1))
        self.dec_in = nn.Sequential(nn.Conv3d(latent_channels, widths[-1], 3, padding=1),
                                    _Res3d(widths[-1], widths[-1]))
        self.dec_up = nn.ModuleList(nn.Conv3d(widths[i + 1], widths[i], 3, padding=1) for i in reversed(range(levels)))
        self.dec_blocks = nn.ModuleList(_Res3d(widths[i], widths[i]) for i in reversed(range(levels)))
        self.dec_out = nn.Sequential(nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(),
                                     nn.Conv3d(widths[0], 1, 3, padding=1))

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self.checkpointing and self.training, block, x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc_stem(x)
        for block, down in zip(self.enc_blocks, self.enc_down):
            h = down(self._run(block, h))
        return self.enc_out(h)

    def decode(self, z: torch.Tensor, size: int) -> torch.Tensor:
        sizes = latent_sizes(size, self.levels)[:-1][::-1]  # the finer grids, coarsest first
        h = self.dec_in(z)
        for up, block, s in zip(self.dec_up, self.dec_blocks, sizes):
            h = up(F.interpolate(h, size=(s,) * 3, mode="trilinear", align_corners=False))
            h = self._run(block, h)
        return self.dec_out(h)

    def blocks(self) -> list[nn.Module]:
        return [*self.enc_blocks, *self.dec_blocks]


class LatentFlowRefiner(FlowRefiner):
    """``flow_refiner`` with its flow on an autoencoder's latent grid (``model(xrays, geometry, prev=None)`` ->
    ``[B, 1, R, R, R]``, a seeded sample; ``training_loss``, ``sample``).

    Options (recipe ``[model]``): every ``flow_refiner`` option, and
        autoencoder_levels: stride-2 levels of the autoencoder (default 2: the latent grid is R/4 per axis).
        autoencoder_width: the autoencoder's channels at full resolution (doubling per level; default 16).
        latent_channels: channels of the latent (default 4, as MAISI's and Stable Diffusion's).
        autoencoder_weight: weight of the autoencoder's reconstruction L1 in the objective (default 1).
        latent_weight: weight of the latent's mean square (default 1e-4; keeps its scale bounded).
        latent_momentum: momentum of the running latent scale (default 0.99).
    ``feature_channels`` are the X-ray features at the latent grid; ``widths`` the U-Net's on it. Parameter-name
    prefixes: ``flow_refiner``'s and ``autoencoder.``.
    """

    plugin_name = "latent_flow_refiner"

    def __init__(self, *, resolution: int, autoencoder_levels: int = 2, autoencoder_width: int = 16,
                 latent_channels: int = 4, autoencoder_weight: float = 1.0, latent_weight: float = 1e-4,
                 latent_momentum: float = 0.99, **options):
        for key, value in (("autoencoder_levels", autoencoder_levels), ("autoencoder_width", autoencoder_width),
                           ("latent_channels", latent_channels)):
            check_int(key, value, 1)
        for key, value in (("autoencoder_weight", autoencoder_weight), ("latent_weight", latent_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(latent_momentum, bool) or not isinstance(latent_momentum, (int, float)) \
                or not 0.0 <= latent_momentum < 1.0:
            raise ValueError(f"latent_momentum must be a number in [0, 1), got {latent_momentum!r}")
        self.state_channels = latent_channels  # read by FlowRefiner.__init__ when it builds the U-Net
        super().__init__(resolution=resolution, **options)
        if 2 ** autoencoder_levels > resolution:
            raise ValueError(f"autoencoder_levels = {autoencoder_levels} halves the {resolution}^3 grid below one "
                             f"voxel; use at most {resolution.bit_length() - 1}")
        self.latent_channels = latent_channels
        self.autoencoder_weight, self.latent_weight = float(autoencoder_weight), float(latent_weight)
        self.latent_momentum = float(latent_momentum)
        self._latent_grid = latent_sizes(resolution, autoencoder_levels)[-1]
        self.autoencoder = VolumeAutoencoder(autoencoder_levels, autoencoder_width, latent_channels,
                                             self.gradient_checkpointing)
        self.register_buffer("latent_scale_value", torch.tensor(1.0))
        self.register_buffer("latent_scale_measured", torch.tensor(0.0))

    @property
    def flow_grid(self) -> int:
        return self._latent_grid

    @torch.no_grad()
    def _track_scale(self, z: torch.Tensor) -> None:
        """Move the running scale towards this step's latent RMS (averaged over processes, so every process
        keeps the same scale; the first step sets it)."""
        rms = process_mean(z.detach().float().pow(2).mean()).sqrt().clamp_min(1e-4)
        if bool(self.latent_scale_measured):
            self.latent_scale_value.mul_(self.latent_momentum).add_((1 - self.latent_momentum) * rms)
        else:
            self.latent_scale_value.copy_(rms)
            self.latent_scale_measured.fill_(1.0)

    def flow_target(self, cond: Condition, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Encode the scaled residual; the flow's clean end is the latent (gradient stopped) over its running
        scale; the autoencoder's reconstruction L1 and the latent's mean square join the objective."""
        r = (target - cond.base) / self.residual_scale_value
        z = self.autoencoder.encode(r)
        recon = self.autoencoder.decode(z, self.resolution)
        if self.training:
            self._track_scale(z)
        terms = {"autoencoder": self.autoencoder_weight * F.l1_loss(recon.float(), r),
                 "latent": self.latent_weight * z.float().pow(2).mean()}
        return z.detach().float() / self.latent_scale_value, terms

    def state_shape(self, cond: Condition) -> tuple[int, ...]:
        g = self._latent_grid
        return (cond.base.shape[0], self.latent_channels, g, g, g)

    def finish(self, cond: Condition, x: torch.Tensor) -> torch.Tensor:
        residual = self.autoencoder.decode((x * self.latent_scale_value).to(cond.features.dtype), self.resolution)
        return cond.base + self.residual_scale_value * residual.float()

    def checkpointed_modules(self) -> list[nn.Module]:
        return [*self.unet.blocks(), *self.autoencoder.blocks()]


def _signature() -> inspect.Signature:
    """``LatentFlowRefiner.__init__``'s own options and every ``FlowRefiner`` option by name, so the recipe check
    sees each (a misspelt key is reported before anything trains) and the build context (``resolution``,
    ``gradient_checkpointing``) reaches the options the base class declares."""
    own = inspect.signature(LatentFlowRefiner.__init__).parameters
    base = inspect.signature(FlowRefiner.__init__).parameters
    params = [p for p in own.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [p for n, p in base.items() if n not in own and n != "self"]
    return inspect.Signature(params)


LatentFlowRefiner.__init__.__signature__ = _signature()


@hookimpl
def register_models(register):
    register("latent_flow_refiner", LatentFlowRefiner)

"""``flow_refiner``: a generative stage that refines the previous stage's CT by conditional flow matching.

Two X-rays fit many CTs. A model trained with L1/SSIM returns the average of the CTs that fit, which is
blurred by construction. This model instead learns to *sample* a CT that fits: a rectified flow
(Liu et al. 2022; Lipman et al. 2022, conditional flow matching) transports Gaussian noise to the
residual between the CT and a base volume, conditioned on the X-rays.

- **Base**: the previous stage's prediction ``prev`` (from the cascade, trilinearly resized to the stage's
  resolution), or, when there is none, the model's own coarse estimate (a small 3D head on the X-ray
  features at half the resolution, trained with L1 beside the flow; stage-1 style). The coarse head is
  trained in every case, so every parameter gets a gradient in every step (DDP needs that).
- **Conditioning**: pixel-aligned X-ray features at the stage's resolution: ``vit_cascade``'s shared 2D
  encoder (``layers.ViewEncoder``) and its pixel-aligned skip (``vit_cascade.AlignedSkip``: every encoder
  level sampled at each voxel's projection in every view, a visibility flag, order-independent view fusion
  with angle FiLM). They do not depend on the flow time, so a sampler computes them once per volume.
- **Network**: a small 3D U-Net (``UNet3d``) on ``[x_t, base, features]`` with a sinusoidal time embedding
  (FiLM in every residual block), predicting the velocity; its output convolution starts at zero.
- **Objective** (``training_loss``): with ``x1 = (ct - base) / residual_scale``, noise ``x0`` and time
  ``t`` (logit-normal, as SD3, or uniform), ``x_t = (1 - t) x0 + t x1`` and the loss is the mean squared
  error of the predicted velocity against ``x1 - x0``, plus ``coarse_weight`` times the coarse head's L1.
  The one-step clean estimate ``base + residual_scale (x_t + (1 - t) v)`` is returned under
  ``generative.ESTIMATE`` when ``estimate_losses`` is on, so the recipe's losses are added on it.
- **Sampling** (``sample``): Euler or Heun (2nd order, two network calls per step) from
  ``t = 0`` to 1 in ``steps`` uniform steps, or "sde": Euler-Maruyama of the ODE plus a Langevin term
  ``eps s dt + sqrt(2 eps) dW`` with the score ``s = -(x - t v) / (1 - t)`` the velocity implies and
  ``eps = sde_noise (1 - t)`` (every marginal kept; SiT, Ma et al. 2024); optional classifier-free guidance
  (``cond_drop`` in training, ``guidance`` w > 1 in sampling: ``v = v_uncond + w (v_cond - v_uncond)``,
  twice the network calls).
- **forward** returns one seeded sample per case (``forward_samples > 1``: the mean of that many; the
  mean of samples is closer to the regression answer, smoother and a better PSNR, one sample is sharper):
  case i's noise comes from a generator seeded by its X-rays, angles and ``sample_seed``
  (``generative.case_generators``), so a case gives the same volume in any batch and on any machine.

Parameter-name prefixes (for a stage's ``freeze``): ``encoder.`` (the shared timm encoder), ``lift.`` (angle
embedding and the pixel-aligned features), ``coarse.`` (the coarse head), ``time.`` (time embedding),
``unet.`` (the 3D U-Net). No shape depends on the resolution or the number of views.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.generative import ESTIMATE, case_generators, noise
from x2ct_framework.hookspecs import hookimpl

from .encoder import NORMS, AngleEmbedding, ViewEncoder
from .inputs import check_inputs, maybe_checkpoint, resize3d
from .vit_cascade import Aligned, AlignedSkip

SAMPLERS = ("euler", "heun", "sde")
TIME_SAMPLING = ("logit_normal", "uniform")


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def process_mean(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes of a distributed run (itself in a single process): a statistic the
    model keeps in its weights is then the same on every process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


class TimeEmbedding(nn.Module):
    """Flow time ``t [B]`` in [0, 1] -> ``[B, dim]``: sinusoids of ``1000 t`` (as DDPM's step embedding), an MLP."""

    def __init__(self, dim: int, frequencies: int = 32):
        super().__init__()
        freqs = torch.exp(-math.log(10000.0) * torch.arange(frequencies, dtype=torch.float32) / frequencies)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = 1000.0 * t.float()[:, None] * self.freqs
        return self.mlp(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1))


class ResBlock3d(nn.Module):
    """``x + conv(dropout(SiLU(FiLM_t(GN(conv(SiLU(GN(x))))))))``, with a 1x1x1 shortcut when the width changes
    (DDPM's block; dropout in training only); the second convolution starts at zero, so every block starts as the
    identity."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = float(dropout)
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        return self.skip(x) + h


class UNet3d(nn.Module):
    """A 3D U-Net with a time embedding: ``len(widths)`` levels (strided 3x3x3 convolutions down, trilinear
    up to the skip's exact size, so any grid size works), one residual block per level and side."""

    def __init__(self, cin: int, widths: list[int], emb: int, checkpointing: bool = False, dropout: float = 0.0,
                 cout: int = 1):
        super().__init__()
        self.checkpointing = checkpointing
        self.stem = nn.Conv3d(cin, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock3d(prev, w, emb, dropout))
            if i < len(widths) - 1:
                self.pool.append(nn.Conv3d(w, w, 3, stride=2, padding=1))
            prev = w
        self.mid = ResBlock3d(prev, prev, emb, dropout)
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(ResBlock3d(prev + w, w, emb, dropout))
            prev = w
        self.out_norm = nn.GroupNorm(_groups(prev), prev)
        self.out = nn.Conv3d(prev, cout, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def blocks(self) -> list[nn.Module]:
        return [*self.down, self.mid, *self.up]

    def _block(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self.checkpointing and self.training, block, x, emb)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = self._block(block, h, emb)
            if i < len(self.pool):
                skips.append(h)
                h = self.pool[i](h)
        h = self._block(self.mid, h, emb)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-3:], mode="trilinear", align_corners=False)
            h = self._block(block, torch.cat([h, skip], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


class Condition:
    """What the velocity network reads besides ``x_t`` and ``t``, computed once per volume: the base at the
    output's resolution, the pixel-aligned features and the base on the flow's grid (``grid_base``; the base
    itself unless the flow runs on a coarser grid, as ``latent_flow_refiner``'s does), the coarse estimate."""

    def __init__(self, base: torch.Tensor, features: torch.Tensor, coarse: torch.Tensor, grid_base: torch.Tensor):
        self.base, self.features, self.coarse, self.grid_base = base, features, coarse, grid_base


class FlowRefiner(nn.Module):
    """Conditional rectified flow over the residual to ``prev``: ``model(xrays, geometry, prev=None)`` ->
    ``[B, 1, R, R, R]`` (a seeded sample), ``training_loss`` and ``sample`` (``x2ct_framework.generative``).

    Options (recipe ``[model]``):
        resolution: output size R (from the stage unless set).
        widths: channels of the U-Net's levels, finest first (default ``[16, 32, 64]``).
        emb_dim: time embedding width.
        dropout: dropout in every U-Net block in training (DDPM's regulariser for small data sets; default 0).
        feature_channels: channels of the pixel-aligned X-ray features at R^3.
        encoder, pretrained, pretrained_file, encoder_kwargs, norm, xray_size, full_resolution,
            angle_frequencies, visibility: the shared 2D encoder and pixel-aligned sampling, as ``vit_cascade``
            (``xray_size`` default 0: the dataset's size; ``full_resolution`` default 0: no stride-1 level).
        coarse_weight: weight of the coarse head's L1 in the objective (the base when there is no ``prev``).
        residual_scale: the residual ``ct - base`` is divided by this before the flow, so the flow's target
            ``x1`` has the noise's scale. "auto" (default): the root mean square of the residual over the first
            training batch (all processes together), kept in the weights (buffer ``residual_scale_value``);
            a number: that scale. With a scale far above the residual's, ``x1`` is small against the noise,
            the detail appears only in the last few percent of the flow time, which training rarely draws
            and the sampler crosses in a step or two: samples come out as the mean plus noise. Without a
            cascade the first batch's base is the untrained coarse head, so "auto" then measures the whole
            CT's spread (an overestimate): set a number there.
        time_sampling: "logit_normal" (default; ``t = sigmoid(n)``, ``n ~ N(0, 1)``, more weight mid-way, as
            SD3) or "uniform".
        steps: sampler steps (``sample(steps=None)`` and ``forward``); sampler: "heun" (default), "euler" or
            "sde" (one network call a step, fresh noise from the case's generator every step; ``sde_noise``,
            default 1, scales the Langevin term; 0 is Euler).
        sample_shift: where the sampler's steps lie (SD3's timestep shift, Esser et al. 2024): the noise level
            ``sigma = 1 - t`` of uniform steps becomes ``a sigma / (1 + (a - 1) sigma)``; 1 (default): uniform
            steps; a < 1 spends more of them near the clean end (t = 1), a > 1 near the noise (on the CPU
            refiner neither changed a sample's fine detail by more than 0.03: docs/models.md).
        forward_samples: ``forward`` returns the mean of this many samples (default 1: one sample).
        sample_seed: the base seed of the per-case noise.
        cond_drop: probability, per case in training, of dropping the conditioning (X-ray features and base)
            for classifier-free guidance; guidance: w at sampling (1: off; > 1 needs cond_drop > 0).
        estimate_losses: add the stage's recipe losses on the one-step clean estimate (the trainer does it;
            they pull the estimate towards the average answer, so keep their weights small).
        gradient_checkpointing: recompute each U-Net block in the backward pass (from
            ``train.gradient_checkpointing`` unless set).
    """

    uses_prev = True  # refines the previous stage's prediction (checked by testing.check_model)
    plugin_name = "flow_refiner"  # named in input errors
    state_channels = 1  # channels of the flow's state (a latent variant sets its latent's before __init__)

    def __init__(self, *, resolution: int, widths: list[int] | None = None, emb_dim: int = 128,
                 feature_channels: int = 16, dropout: float = 0.0, encoder: str = "resnet18", pretrained: bool = False,
                 pretrained_file: str = "", encoder_kwargs: dict | None = None, norm: str = "group",
                 xray_size: int = 0, full_resolution: int = 0, angle_frequencies: int = 4, visibility: bool = True,
                 coarse_weight: float = 1.0, residual_scale: float | str = "auto",
                 time_sampling: str = "logit_normal",
                 steps: int = 25, sampler: str = "heun", sde_noise: float = 1.0, sample_shift: float = 1.0,
                 forward_samples: int = 1,
                 sample_seed: int = 0,
                 cond_drop: float = 0.0, guidance: float = 1.0, estimate_losses: bool = False,
                 gradient_checkpointing: bool = False):
        super().__init__()
        widths = list(widths) if widths is not None else [16, 32, 64]
        for key, value, low in (("resolution", resolution, 1), ("emb_dim", emb_dim, 1),
                                ("feature_channels", feature_channels, 1), ("steps", steps, 1),
                                ("forward_samples", forward_samples, 1), ("angle_frequencies", angle_frequencies, 1),
                                ("xray_size", xray_size, 0), ("full_resolution", full_resolution, 0),
                                ("sample_seed", sample_seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ValueError(f"widths must be a list of integers >= 1 (the U-Net's channels, finest first), "
                             f"got {widths!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {', '.join(map(repr, TIME_SAMPLING))}, "
                             f"got {time_sampling!r}")
        if isinstance(sde_noise, bool) or not isinstance(sde_noise, (int, float)) or not sde_noise >= 0:
            raise ValueError(f"sde_noise must be a number >= 0, got {sde_noise!r}")
        if isinstance(sample_shift, bool) or not isinstance(sample_shift, (int, float)) or not sample_shift > 0 \
                or not math.isfinite(sample_shift):
            raise ValueError(f"sample_shift must be a finite number > 0 (1: uniform steps; < 1: more steps near the "
                             f"clean end), got {sample_shift!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
        auto = residual_scale == "auto"
        if not auto and (isinstance(residual_scale, (bool, str)) or not residual_scale > 0):
            raise ValueError(f"residual_scale must be a positive number or \"auto\" (measured on the first "
                             f"training batch), got {residual_scale!r}")
        if not 0.0 <= cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {cond_drop!r}")
        if not coarse_weight >= 0:
            raise ValueError(f"coarse_weight must be >= 0, got {coarse_weight!r}")
        if guidance != 1.0 and cond_drop == 0.0:
            raise ValueError(f"guidance = {guidance} needs a model trained with cond_drop > 0 (classifier-free "
                             f"guidance); set model.cond_drop (e.g. 0.1) or guidance = 1.0")
        self.resolution, self.steps, self.sampler, self.sde_noise = resolution, steps, sampler, float(sde_noise)
        self.sample_shift = float(sample_shift)
        self.forward_samples, self.sample_seed = forward_samples, sample_seed
        self.time_sampling, self.auto_scale = time_sampling, auto
        # the scale travels with the weights (checkpoints, EMA, exports); "auto" holds 1.0 until measured
        self.register_buffer("residual_scale_value", torch.tensor(1.0 if auto else float(residual_scale)))
        self.register_buffer("residual_scale_measured", torch.tensor(0.0 if auto else 1.0))
        self._scale_checked = False
        self.coarse_weight, self.cond_drop, self.guidance = float(coarse_weight), float(cond_drop), float(guidance)
        self.estimate_losses, self.gradient_checkpointing = bool(estimate_losses), bool(gradient_checkpointing)
        self.visibility = bool(visibility)
        angle_dim = 64

        self.encoder = ViewEncoder(encoder, pretrained, pretrained_file, encoder_kwargs, norm, xray_size,
                                   full_resolution)
        self.lift = nn.Module()
        self.lift.angles = AngleEmbedding(angle_dim, angle_frequencies)
        self.lift.aligned = AlignedSkip(self.encoder.channels, feature_channels, angle_dim, self.visibility)
        f = feature_channels
        self.coarse = nn.Sequential(nn.Conv3d(f, f, 3, padding=1), nn.GroupNorm(_groups(f), f), nn.GELU(),
                                    nn.Conv3d(f, 1, 1))
        self.time = TimeEmbedding(emb_dim)
        c = self.state_channels  # the flow's state: [x_t (c), base (1), features (f)] -> c velocities
        self.unet = UNet3d(c + 1 + f, widths, emb_dim, self.gradient_checkpointing, float(dropout), cout=c)

    @property
    def flow_grid(self) -> int:
        """The size of the grid the flow and the X-ray features live on: the output's here."""
        return self.resolution

    @property
    def residual_scale(self) -> float:
        return float(self.residual_scale_value)

    @torch.no_grad()
    def _measure_scale(self, residual: torch.Tensor) -> None:
        """Set the scale to the residual's root mean square (averaged over processes), once."""
        ms = process_mean(residual.detach().double().pow(2).mean())
        self.residual_scale_value.fill_(max(float(ms.sqrt()), 1e-4))
        self.residual_scale_measured.fill_(1.0)

    # ---- conditioning --------------------------------------------------------------------------------
    def aligned_info(self, xrays: torch.Tensor) -> Aligned:
        n = self.encoder.xray_size
        return Aligned(self.encoder.offsets, (n, n) if n > 0 else tuple(xrays.shape[-2:]), self.visibility)

    def condition(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None) -> Condition:
        """Pixel-aligned features at R^3, the coarse estimate, and the base (``prev`` resized, else the coarse
        estimate, detached: the flow models the residual over it, the coarse head learns on its own)."""
        check_inputs(self.plugin_name, xrays, geometry, prev)
        r, g = self.resolution, self.flow_grid
        feats = self.encoder(xrays)
        emb = self.lift.angles(geometry["angles"].to(xrays.device))
        features = self.lift.aligned(feats, geometry, emb, g, self.aligned_info(xrays))
        low = max(1, min(g, r // 2))
        coarse = resize3d(self.coarse(F.adaptive_avg_pool3d(features, low)), r)
        base = (resize3d(prev.to(features.dtype), r) if prev is not None else coarse.detach()).float()
        return Condition(base, features, coarse, base if g == r else F.adaptive_avg_pool3d(base, g))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition, keep: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The predicted velocity at ``x_t`` and times ``t [B]``; ``keep [B]`` (0 or 1) drops the conditioning of
        the cases where it is 0 (classifier-free guidance)."""
        base, features = cond.grid_base, cond.features
        if keep is not None:
            k = keep.to(features.dtype)[:, None, None, None, None]
            base, features = base * k, features * k
        inp = torch.cat([x.to(features.dtype), base.to(features.dtype), features], dim=1)
        return self.unet(inp, self.time(t)).float()

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        v = self.velocity(x, t, cond)
        if self.guidance == 1.0:
            return v
        v0 = self.velocity(x, t, cond, keep=torch.zeros(x.shape[0], device=x.device))
        return v0 + self.guidance * (v - v0)

    # ---- the generative contract ----------------------------------------------------------------------
    def sample_times(self, n: int, device) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(torch.randn(n, device=device))

    def training_loss(self, xrays: torch.Tensor, geometry: dict, ct: torch.Tensor, prev: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Flow-matching loss (velocity MSE) plus ``coarse_weight`` x the coarse head's L1: ``(loss, terms)``;
        with ``estimate_losses`` the terms carry the one-step clean estimate under ``generative.ESTIMATE``."""
        cond = self.condition(xrays, geometry, prev)
        target = resize3d(ct.float(), self.resolution)
        b = target.shape[0]
        if self.training and self.auto_scale and not self._scale_checked:
            if not bool(self.residual_scale_measured):  # once per process: no device sync per step
                self._measure_scale(target - cond.base)
            self._scale_checked = True
        x1, extra = self.flow_target(cond, target)
        x0 = torch.randn_like(x1)
        t = self.sample_times(b, x1.device)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * x1
        keep = (torch.rand(b, device=x1.device) >= self.cond_drop).float() if self.cond_drop > 0 else None
        v = self.velocity(xt, t, cond, keep)
        flow = F.mse_loss(v, x1 - x0)
        coarse = F.l1_loss(cond.coarse.float(), target)
        loss = flow + self.coarse_weight * coarse + sum(extra.values())
        terms: dict[str, torch.Tensor] = {"flow": flow.detach(), "coarse": coarse.detach(),
                                          **{k: v.detach() for k, v in extra.items()}}
        if self.estimate_losses:
            terms[ESTIMATE] = self.finish(cond, xt + (1 - tt) * v)
        return loss, terms

    def flow_target(self, cond: Condition, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The flow's clean end ``x1`` for the target CT, and any weighted loss terms that producing it adds (none
        here: ``x1`` is the scaled residual; a latent variant encodes it and adds its autoencoder's loss)."""
        return (target - cond.base) / self.residual_scale_value, {}

    def state_shape(self, cond: Condition) -> tuple[int, ...]:
        """The shape of the flow's state for a batch: the output's here (one channel at R^3)."""
        return tuple(cond.base.shape)

    def finish(self, cond: Condition, x: torch.Tensor) -> torch.Tensor:
        """The volume ``[B, 1, R, R, R]`` that the flow's clean state ``x`` stands for: the base plus the residual."""
        return cond.base + self.residual_scale_value * x

    def sample(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None, steps: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """One sample per case ``[B, 1, R, R, R]``: ``steps`` (default the model's) Euler or Heun steps of the
        learnt velocity from noise at ``t = 0`` to the residual at ``t = 1``, added to the base."""
        cond = self.condition(xrays, geometry, prev)
        return self._integrate(cond, steps, generator)

    def time_grid(self, steps: int, device=None) -> torch.Tensor:
        """The sampler's ``steps + 1`` times from 0 (noise) to 1 (clean), spaced by ``sample_shift``."""
        a = self.sample_shift
        if a == 1.0:
            return torch.linspace(0.0, 1.0, steps + 1, device=device)
        sigma = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        return (1 - a * sigma / (1 + (a - 1) * sigma)).float()

    def _integrate(self, cond: Condition, steps: int | None,
                   generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"{self.plugin_name}.sample: steps must be >= 1, got {steps}")
        x = noise(self.state_shape(cond), generator, cond.base.device)
        b = x.shape[0]
        ts = self.time_grid(steps, x.device)
        for i in range(steps):
            t0, t1 = ts[i], ts[i + 1]
            dt = t1 - t0
            v = self.guided_velocity(x, t0.expand(b), cond)
            if self.sampler == "sde" and i < steps - 1:
                # Euler-Maruyama of dx = [v + eps s] dt + sqrt(2 eps) dW, s = -(x - t v) / (1 - t) the score the
                # velocity implies and eps = sde_noise (1 - t): a Langevin term that keeps every marginal p_t
                # (SiT, Ma et al. 2024); the last step is the deterministic one to the clean estimate
                eps = self.sde_noise * (1 - t0)
                x = x + dt * (v - self.sde_noise * (x - t0 * v)) \
                    + torch.sqrt(2 * eps * dt) * noise(tuple(x.shape), generator, x.device)
                continue
            if self.sampler == "heun":
                x_euler = x + dt * v
                v = (v + self.guided_velocity(x_euler, t1.expand(b), cond)) / 2
            x = x + dt * v
        return self.finish(cond, x)

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        """One sample per case, its noise seeded by the case (``sample_seed``); with ``forward_samples = n > 1``,
        the mean of samples 0..n-1. The conditioning is computed once for all of them."""
        cond = self.condition(xrays, geometry, prev)
        out = None
        for k in range(self.forward_samples):
            s = self._integrate(cond, None, case_generators(xrays, geometry, self.sample_seed, k))
            out = s if out is None else out + s
        return out / self.forward_samples

    def checkpointed_modules(self) -> list[nn.Module]:
        """The units that gradient checkpointing recomputes (see ``x2ct_framework.model_info``)."""
        return self.unet.blocks()


@hookimpl
def register_models(register):
    register("flow_refiner", FlowRefiner)

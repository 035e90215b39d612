"""Layers shared by the model plugins: input checks, timm encoders, view lifting and fusion, 3D blocks.

Everything here keeps its parameter shapes independent of the output resolution and of the number
of views, so that a checkpoint of one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from torch.utils.checkpoint import checkpoint

from x2ct_framework.errors import CheckpointError, DataError, did_you_mean
from x2ct_framework.physics import backproject, batched, view_frames
from x2ct_framework.physics.drr import detector_rays


class ModelInputError(DataError, ValueError):
    """The X-ray views or their geometry do not have the shapes the model needs."""


def check_inputs(name: str, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None,
                 views: int | None = None) -> tuple[int, int]:
    """Validate ``xrays [B, V, 1, H, W]`` against ``geometry["angles"] [B, V]``; return ``(B, V)``."""
    if not isinstance(xrays, torch.Tensor) or xrays.ndim != 5 or xrays.shape[2] != 1:
        shape = tuple(xrays.shape) if isinstance(xrays, torch.Tensor) else type(xrays).__name__
        raise ModelInputError(f"{name}: xrays must be [B, V, 1, H, W] (batch, views, one channel, height, width), "
                              f"got {shape}")
    b, v = xrays.shape[:2]
    if v < 1:
        raise ModelInputError(f"{name}: xrays hold no views (shape {tuple(xrays.shape)}); at least one is needed")
    if views is not None and v != views:
        raise ModelInputError(f"{name}: built for {views} views (one encoder per view), got {v} views; "
                              f"rebuild it with the recipe's data.views, or set share_encoder = true")
    if not isinstance(geometry, Mapping) or "angles" not in geometry:
        keys = sorted(geometry) if isinstance(geometry, Mapping) else type(geometry).__name__
        raise ModelInputError(f"{name}: geometry must be a dict with 'angles' [B, V] in degrees, got {keys}")
    angles = geometry["angles"]
    if not isinstance(angles, torch.Tensor) or tuple(angles.shape) != (b, v):
        shape = tuple(angles.shape) if isinstance(angles, torch.Tensor) else type(angles).__name__
        raise ModelInputError(f"{name}: geometry['angles'] has shape {shape} but xrays {tuple(xrays.shape)} hold "
                              f"{v} views of {b} cases; expected [B, V] = [{b}, {v}], one angle per view")
    if prev is not None and (prev.ndim != 5 or prev.shape[:2] != (b, 1)):
        raise ModelInputError(f"{name}: prev (the previous stage's prediction) must be [B, 1, D, H, W] with "
                              f"B = {b}, got {tuple(prev.shape)}")
    return b, v


def resize3d(x: torch.Tensor, size: int) -> torch.Tensor:
    """Trilinear resize of ``[B, C, D, H, W]`` to ``size^3`` (a no-op when it already has that size)."""
    if tuple(x.shape[-3:]) == (size,) * 3:
        return x
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)


def maybe_checkpoint(enabled: bool, fn: Callable, *args):
    """Run ``fn(*args)``, recomputing its activations in the backward pass when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---- 2D encoder --------------------------------------------------------------------------------

def _cached_weights(cfg) -> str:
    """A pretrained file already on this machine (Hugging Face or torch hub cache), or ''."""
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
        except ImportError:
            pass
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return str(path)
    return ""


def _missing_weights_message(encoder: str, cfg, reason: str) -> str:
    where = []
    if cfg is not None and cfg.hf_hub_id:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
        where.append(f"put it in the Hugging Face cache ({hub}) with `huggingface-cli download {cfg.hf_hub_id} "
                     f"model.safetensors` on a machine that is online, or download "
                     f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors")
    elif cfg is not None and cfg.url:
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        where.append(f"download {cfg.url} to {target}")
    where.append("set model.pretrained_file = \"/path/to/weights.safetensors\" (a timm state dict, .safetensors "
                 "or .pth) in the recipe")
    return (f"pretrained weights for encoder {encoder!r} are not available ({reason}); "
            + "; or ".join(where) + ", or set model.pretrained = false")


def create_encoder(encoder: str, pretrained: bool = False, pretrained_file: str = "",
                   encoder_kwargs: dict | None = None) -> nn.Module:
    """A timm ``features_only`` 2D encoder for one-channel X-rays, optionally with pretrained weights.

    Pretrained weights come from ``pretrained_file``, else from timm's local caches; when neither has
    them, timm's own loader is tried (it downloads when the machine is online) and a failure is a
    CheckpointError naming the file to place and where.
    """
    import timm

    if not timm.is_model(encoder):
        raise ValueError(f"encoder: unknown timm model {encoder!r}{did_you_mean(encoder, timm.list_models())}")
    kwargs = dict(features_only=True, in_chans=1, **(encoder_kwargs or {}))
    if not (pretrained or pretrained_file):
        return timm.create_model(encoder, pretrained=False, **kwargs)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(encoder)
    path = pretrained_file
    if path:
        if not os.path.isfile(path):
            raise CheckpointError(f"model.pretrained_file: {path} does not exist; place the timm weights for "
                                  f"encoder {encoder!r} there (.safetensors or .pth)")
    else:
        path = _cached_weights(cfg) if cfg is not None else ""
    try:
        if path:
            return timm.create_model(encoder, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise CheckpointError(_missing_weights_message(encoder, cfg, "timm knows no pretrained weights for it"))
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise CheckpointError(_missing_weights_message(encoder, cfg,
                                                           "not in the local cache and HF_HUB_OFFLINE is set"))
        return timm.create_model(encoder, pretrained=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # network, file format or shape errors from timm's loader
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if path:
            raise CheckpointError(f"pretrained weights {path} for encoder {encoder!r} could not be loaded "
                                  f"({reason})") from exc
        raise CheckpointError(_missing_weights_message(encoder, cfg, reason)) from exc


NORMS = ("group", "frozen", "batch")
PATCH_ENCODERS = ("convnext", "vit", "deit", "beit", "eva", "swin", "cait", "levit", "mvit", "pvt", "twins")


def _gn_groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class GroupNormAct(nn.GroupNorm):
    """GroupNorm in place of one of timm's ``BatchNormAct2d`` (which carries its activation and dropout)."""

    def __init__(self, groups: int, channels: int, drop: nn.Module, act: nn.Module):
        super().__init__(groups, channels)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def replace_batch_norm(module: nn.Module, norm: str) -> nn.Module:
    """Make a 2D network independent of the batch composition.

    ``"group"`` replaces every BatchNorm2d (and timm's BatchNormAct2d) by a GroupNorm of the same width
    (its affine weight and bias copied, so timm's zero-init of residual branches carries over);
    ``"frozen"`` turns them into timm's FrozenBatchNorm2d (the running statistics, e.g. of pretrained
    weights, are used in training too); ``"batch"`` keeps BatchNorm (the output of one case then
    depends on the other cases of its batch, and on the number of processes).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
    if norm == "batch":
        return module
    if norm == "frozen":
        from timm.layers import freeze_batch_norm_2d

        return freeze_batch_norm_2d(module)
    from timm.layers import BatchNormAct2d

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            gn = (GroupNormAct(_gn_groups(c), c, m.drop, m.act) if isinstance(m, BatchNormAct2d)
                  else nn.GroupNorm(_gn_groups(c), c))
            if m.affine:
                with torch.no_grad():
                    gn.weight.copy_(m.weight)
                    gn.bias.copy_(m.bias)
            return gn
        for name, child in m.named_children():
            new = convert(child)
            if new is not child:
                setattr(m, name, new)
        return m

    return convert(module)


class FullResolution(nn.Module):
    """Stride-1 features of an X-ray: two 3x3 convolutions with GroupNorm (the encoder's finest level is
    strided, so without these no feature of full image resolution reaches the decoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                                 nn.GroupNorm(_groups(channels), channels), nn.GELU(),
                                 nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                 nn.GroupNorm(_groups(channels), channels), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViewEncoder(nn.Module):
    """One 2D encoder shared by all views: ``[B, V, 1, H, W]`` -> a list of ``[B, V, C_l, h_l, w_l]``.

    Levels are ordered finest first. The input in [0, 1] is normalised with the encoder's pretrained
    mean and standard deviation (averaged over RGB), so pretrained weights see what they expect.

    ``xray_size`` (> 0) resizes every X-ray to that square size first, so the encoder sees the same
    scale in every stage whatever the dataset renders; ``norm`` (see ``replace_batch_norm``);
    ``full_channels`` (> 0) adds a stride-1 level (``full.``) in front of the encoder's levels.
    ``offsets[l]`` is where level l's feature 0 is centred, in input pixels right of the centre that
    ``align_corners=False`` sampling assumes: ``(s - 1) / 2`` for a stride-s CNN with "same" padding
    (a feature j is centred on input pixel ``s * j``), 0 for patch-embedding encoders (ConvNeXt, ViTs).
    """

    def __init__(self, encoder: str, pretrained: bool = False, pretrained_file: str = "",
                 encoder_kwargs: dict | None = None, norm: str = "batch", xray_size: int = 0,
                 full_channels: int = 0):
        super().__init__()
        self.body = replace_batch_norm(create_encoder(encoder, pretrained, pretrained_file, encoder_kwargs), norm)
        self.xray_size = int(xray_size)
        self.full = FullResolution(full_channels) if full_channels > 0 else None
        info = self.body.feature_info
        order = sorted(range(len(info.channels())), key=lambda i: info.reduction()[i])
        self.order = order
        self.channels = ([full_channels] if self.full is not None else []) + [info.channels()[i] for i in order]
        self.reductions = ([1] if self.full is not None else []) + [info.reduction()[i] for i in order]
        patch = encoder.split(".")[0].lower().startswith(PATCH_ENCODERS)
        self.offsets = [0.0 if (patch and r > 1) else (r - 1) / 2 for r in self.reductions]
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
        self.register_buffer("mean", torch.tensor(sum(mean) / len(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(sum(std) / len(std)), persistent=False)

    def resize(self, xrays: torch.Tensor) -> torch.Tensor:
        """X-rays ``[B, V, 1, H, W]`` at ``xray_size`` (unchanged when 0 or already that size)."""
        n = self.xray_size
        if n <= 0 or tuple(xrays.shape[-2:]) == (n, n):
            return xrays
        b = xrays.shape[0]
        x = rearrange(xrays, "b v c h w -> (b v) c h w").float()
        x = F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False, antialias=n < min(x.shape[-2:]))
        return rearrange(x.to(xrays.dtype), "(b v) c h w -> b v c h w", b=b)

    def forward(self, xrays: torch.Tensor) -> list[torch.Tensor]:
        b = xrays.shape[0]
        x = rearrange(self.resize(xrays), "b v c h w -> (b v) c h w")
        feats = self.body((x - self.mean) / self.std)
        feats = [feats[i] for i in self.order]
        first = self.channels[1 if self.full is not None else 0]
        if feats and feats[0].ndim == 4 and feats[0].shape[1] != first:  # NHWC outputs (some ViTs)
            feats = [rearrange(f, "n h w c -> n c h w") for f in feats]
        if self.full is not None:
            feats = [self.full(x)] + feats
        return [rearrange(f, "(b v) c h w -> b v c h w", b=b) for f in feats]


# ---- lifting and fusion ------------------------------------------------------------------------

class AngleEmbedding(nn.Module):
    """Embeds gantry angles (degrees) with Fourier features of ``theta`` and an MLP: ``[B, V] -> [B, V, dim]``."""

    def __init__(self, dim: int, frequencies: int = 4):
        from timm.layers import Mlp  # timm (and torchvision through it) load when a model is built, not listed

        super().__init__()
        self.register_buffer("freqs", torch.arange(1, frequencies + 1, dtype=torch.float32), persistent=False)
        self.mlp = Mlp(2 * frequencies, dim, dim)

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        theta = torch.deg2rad(angles.float())[..., None] * self.freqs
        return self.mlp(torch.cat([torch.cos(theta), torch.sin(theta)], dim=-1))


class ViewFusion(nn.Module):
    """Fuses per-view 3D features of any number of views, independent of their order.

    Each view is modulated by its angle (FiLM: ``x * (1 + gamma) + beta`` from the angle embedding),
    then the views are pooled by their mean and their maximum, and a 1x1x1 projection mixes both.
    """

    def __init__(self, channels: int, angle_dim: int, out: int | None = None):
        super().__init__()
        self.film = nn.Linear(angle_dim, 2 * channels)
        nn.init.trunc_normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)
        self.proj = nn.Conv3d(2 * channels, out or channels, 1)

    def forward(self, lifted: torch.Tensor, angle_emb: torch.Tensor) -> torch.Tensor:
        """``lifted [B, V, C, D, H, W]``, ``angle_emb [B, V, A]`` -> ``[B, C, D, H, W]``."""
        gamma, beta = rearrange(self.film(angle_emb), "b v (two c) -> two b v c 1 1 1", two=2)
        x = lifted * (1 + gamma.to(lifted.dtype)) + beta.to(lifted.dtype)
        pooled = torch.cat([reduce(x, "b v c d h w -> b c d h w", "mean"),
                            reduce(x, "b v c d h w -> b c d h w", "max")], dim=1)
        return self.proj(pooled)

    def points(self, features: torch.Tensor, angle_emb: torch.Tensor) -> torch.Tensor:
        """The same fusion for per-view features at points, ``[B, V, C, N]`` -> ``[B, N, out]`` (its 1x1x1
        projection as a matrix product: a convolution over a ``[N, 1, 1]`` grid is slow on CPU)."""
        gamma, beta = rearrange(self.film(angle_emb), "b v (two c) -> two b v 1 c", two=2)
        x = rearrange(features, "b v c n -> b v n c")
        x = x * (1 + gamma.to(x.dtype)) + beta.to(x.dtype)
        pooled = torch.cat([x.mean(1), x.amax(1)], dim=-1)
        return F.linear(pooled, self.proj.weight.flatten(1).to(pooled.dtype), self.proj.bias.to(pooled.dtype))


def lift(feats: torch.Tensor, geometry: dict, size: int) -> torch.Tensor:
    """Back-project per-view 2D features ``[B, V, C, h, w]`` along each view's rays into ``[B, V, C, S, S, S]``.

    Runs in float32 even under autocast: ray coordinates in bfloat16 would be off by a quarter voxel at 128^3.
    """
    with torch.autocast(feats.device.type, enabled=False):
        return backproject(feats.float(), geometry, (size, size, size))


def voxel_centres(volume_mm: torch.Tensor, size: int) -> torch.Tensor:
    """World coordinates (mm, x y z) of the voxel centres of a ``size^3`` grid over ``volume_mm [B, 3]``:
    ``[B, size^3, 3]`` in ``(d h w)`` order (x along W, y along H, z along D)."""
    ax = (torch.arange(size, device=volume_mm.device, dtype=torch.float32) + 0.5) / size - 0.5
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    unit = torch.stack([x, y, z], -1).reshape(1, -1, 3)
    return unit * volume_mm.float()[:, None, :]


def project_points(points: torch.Tensor, geometry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Where world points ``[B, N, 3]`` (mm) project in every view: ``(uv [B, V, N, 2], visible [B, V, N])``.

    ``uv`` is in ``grid_sample`` coordinates of the detector image (``align_corners=False``: -1 and 1
    are the detector's outer edges; u along columns, v along rows), from the same geometry as the
    DRR projector (``x2ct_framework.physics``); ``visible`` is 1 where the point falls on the detector
    in front of the source.
    """
    b = points.shape[0]
    g = batched(geometry, b, points.device, torch.float32)
    fr = view_frames(g)
    p = points.float()[:, None]                                         # [B, 1, N, 3]
    src = fr["source"][:, :, None]                                      # [B, V, 1, 3]
    rel = p - src
    depth = (rel * fr["ray"][:, :, None]).sum(-1)                       # [B, V, N]
    cone = (g["cone"] > 0.5)[..., None]
    scale = torch.where(cone, g["sdd"][..., None] / depth.clamp_min(1e-3), torch.ones_like(depth))
    base = src - fr["center"][:, :, None]
    cu = (base * fr["u"][:, :, None]).sum(-1) + scale * (rel * fr["u"][:, :, None]).sum(-1)
    cv = (base * fr["v"][:, :, None]).sum(-1) + scale * (rel * fr["v"][:, :, None]).sum(-1)
    uv = torch.stack([cu / (g["detector_mm"][..., :1] / 2), cv / (g["detector_mm"][..., 1:] / 2)], -1)
    visible = (uv.abs() <= 1).all(-1) & (~cone | (depth > 0))
    return uv, visible.float()


def sample_views(feats: list[torch.Tensor], offsets: list[float], image_size: tuple[int, int], uv: torch.Tensor
                 ) -> torch.Tensor:
    """Bilinear samples of every level of per-view feature maps at detector points, summed over levels.

    ``feats`` are ``[B, V, C, h_l, w_l]`` (one C), ``uv [B, V, N, 2]`` from ``project_points``;
    ``offsets[l]`` is level l's centre offset in input pixels (``ViewEncoder.offsets``) over an input
    of ``image_size = (H, W)``: the sample point is shifted by ``2 * offset / W`` so that feature j is
    read where it is centred. Returns ``[B, V, C, N]``; outside the detector the samples are 0.
    """
    b, v = uv.shape[:2]
    h_in, w_in = image_size
    shift_unit = torch.tensor([2.0 / w_in, 2.0 / h_in], device=uv.device)
    grid = rearrange(uv, "b v n two -> (b v) 1 n two")
    out = 0
    with torch.autocast(uv.device.type, enabled=False):
        for f, off in zip(feats, offsets):
            g = grid + off * shift_unit if off else grid
            s = F.grid_sample(rearrange(f.float(), "b v c h w -> (b v) c h w"), g, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
            out = out + s
    return rearrange(out, "(b v) c 1 n -> b v c n", b=b, v=v)


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume [B, C, D, H, W]`` at ``points [B, N, 3]`` in volume coordinates
    (x y z in [-1, 1]: -1 and 1 are the outer faces, so voxel i of n is centred at ``2 (i + 1/2) / n - 1``,
    as ``voxel_centres`` over the volume's size): ``[B, C, N]`` in float32.

    Outside the centres of the outermost voxels the value is held (border padding), so sampling at the
    voxel centres of a finer grid is ``resize3d`` (trilinear, ``align_corners=False``) to that grid.
    """
    grid = points.float()[:, :, None, None, :]                          # [B, N, 1, 1, 3]
    with torch.autocast(points.device.type, enabled=False):
        out = F.grid_sample(volume.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rearrange(out, "b c n 1 1 -> b c n")


def detector_plucker(geometry: dict, batch: int, shape: tuple[int, int], image_size: tuple[int, int] | None = None,
                     offset: float = 0.0, device=None) -> torch.Tensor:
    """Plücker coordinates of the ray through each pixel of an ``h x w`` map over every view's detector:
    ``[B, V, 6, h, w]``: the unit direction ``d`` (source to detector) and the moment ``m = o x d`` of a
    point ``o`` on the ray, divided by half the volume's largest extent so that rays through the
    volume have moments of at most about 1. A ray through the isocentre has zero moment.

    The rays are the DRR projector's (``physics.drr.detector_rays``: cone beam from the source to each
    detector pixel, parallel beam along the central ray through it). Map pixel j is centred
    where ``sample_views`` reads it: at detector grid coordinate ``2 (j + 1/2) / w - 1``, moved back by a
    level's centre ``offset`` (input pixels over an input of ``image_size``, see ``ViewEncoder.offsets``).
    """
    h, w = shape
    g = batched(geometry, batch, device, torch.float32)
    h_in, w_in = image_size or shape
    origin, direction = detector_rays(g, (h, w), (offset / w_in, offset / h_in))
    d = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = (g["volume_mm"].amax(-1) / 2).clamp_min(1e-6)[:, :, None, None, None]
    m = torch.linalg.cross(origin, d, dim=-1) / scale
    return rearrange(torch.cat([d, m], -1), "b v h w c -> b v c h w")


def fourier_features(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[..., A]`` coordinates -> ``[..., 2 A F]``: the sines, then the cosines, of every coordinate times every
    one of the ``F`` frequencies (coordinate-major)."""
    ang = rearrange(coords[..., None] * freqs, "... a f -> ... (a f)")
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class FourierPoints(nn.Module):
    """Fourier features of points in volume coordinates ``[B, N, 3]`` ([-1, 1], as ``sample_volume``):
    ``[B, N, 6 * frequencies]`` (sin and cos of each coordinate at octave-spaced frequencies)."""

    def __init__(self, frequencies: int = 6, max_frequency: float | None = None):
        super().__init__()
        top = max_frequency if max_frequency is not None else 2.0 ** (frequencies - 1)
        freqs = math.pi * torch.logspace(0.0, math.log2(top), frequencies, base=2.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.features = 6 * frequencies

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return fourier_features(points.float(), self.freqs)


class FourierPositions(nn.Module):
    """3D positional encoding of a ``G^3`` grid: sinusoids of the voxel-centre coordinates, projected to ``dim``.

    Coordinates are normalised to [-1, 1], so the same parameters serve any grid size G.
    """

    def __init__(self, dim: int, frequencies: int = 16, max_frequency: float = 32.0):
        super().__init__()
        freqs = math.pi * torch.logspace(0.0, math.log2(max_frequency), frequencies, base=2.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(6 * frequencies, dim)

    def forward(self, g: int) -> torch.Tensor:
        """``[G^3, dim]`` in ``(d h w)`` order."""
        ax = torch.linspace(-1 + 1 / g, 1 - 1 / g, g, device=self.freqs.device)
        zyx = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
        return self.proj(fourier_features(zyx, self.freqs).to(self.proj.weight.dtype))


# ---- transformer -------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient on GPUs).

    With ``kv_pool = r > 1`` the tokens are a ``G^3`` grid in ``(d h w)`` order (``grid = G``) and the keys
    and values come from the grid average-pooled by ``r`` along each axis (spatial-reduction attention, as in
    PVT): every token still attends to the whole volume, at ``1 / r^3`` of the cost (``G^3 x (G/r)^3``
    instead of ``G^6``). The parameters are the same as without pooling (``qkv``, ``proj``), so weights
    move between the two settings.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, kv_pool: int = 1, grid: int | None = None):
        super().__init__()
        if kv_pool > 1 and (grid is None or grid % kv_pool):
            raise ValueError(f"kv_pool = {kv_pool} needs a token grid divisible by it, got grid {grid}")
        self.heads, self.kv_pool, self.grid = heads, kv_pool, grid
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kv_pool == 1:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            dim, g, r = x.shape[-1], self.grid, self.kv_pool
            if x.shape[1] != g**3:
                raise ValueError(f"kv_pool: expected {g}^3 = {g**3} tokens, got {x.shape[1]}")
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:dim], None if b is None else b[:dim])
            grid = rearrange(x, "b (d h w) c -> b c d h w", d=g, h=g, w=g)
            pooled = rearrange(F.avg_pool3d(grid, r), "b c d h w -> b (d h w) c")
            k, v = F.linear(pooled, w[dim:], None if b is None else b[dim:]).chunk(2, dim=-1)
            q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(Mlp(LN(x)))``.
    ``kv_pool`` and ``grid``: see :class:`Attention`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, kv_pool: int = 1,
                 grid: int | None = None):
        from timm.layers import DropPath, Mlp

        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_pool=kv_pool, grid=grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---- 3D convolution ----------------------------------------------------------------------------

def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


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

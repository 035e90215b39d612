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
from x2ct_framework.physics import backproject


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


class ViewEncoder(nn.Module):
    """One 2D encoder shared by all views: ``[B, V, 1, H, W]`` -> a list of ``[B, V, C_l, h_l, w_l]``.

    Levels are ordered finest first. The input in [0, 1] is normalised with the encoder's pretrained
    mean and standard deviation (averaged over RGB), so pretrained weights see what they expect.
    """

    def __init__(self, encoder: str, pretrained: bool = False, pretrained_file: str = "",
                 encoder_kwargs: dict | None = None):
        super().__init__()
        self.body = create_encoder(encoder, pretrained, pretrained_file, encoder_kwargs)
        info = self.body.feature_info
        order = sorted(range(len(info.channels())), key=lambda i: info.reduction()[i])
        self.order = order
        self.channels = [info.channels()[i] for i in order]
        self.reductions = [info.reduction()[i] for i in order]
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.5,)), cfg.get("std", (0.5,))
        self.register_buffer("mean", torch.tensor(sum(mean) / len(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(sum(std) / len(std)), persistent=False)

    def forward(self, xrays: torch.Tensor) -> list[torch.Tensor]:
        b = xrays.shape[0]
        x = rearrange(xrays, "b v c h w -> (b v) c h w")
        feats = self.body((x - self.mean) / self.std)
        feats = [feats[i] for i in self.order]
        if feats and feats[0].ndim == 4 and feats[0].shape[1] != self.channels[0]:  # NHWC outputs (some ViTs)
            feats = [rearrange(f, "n h w c -> n c h w") for f in feats]
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

    def __init__(self, channels: int, angle_dim: int):
        super().__init__()
        self.film = nn.Linear(angle_dim, 2 * channels)
        nn.init.trunc_normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)
        self.proj = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, lifted: torch.Tensor, angle_emb: torch.Tensor) -> torch.Tensor:
        """``lifted [B, V, C, D, H, W]``, ``angle_emb [B, V, A]`` -> ``[B, C, D, H, W]``."""
        gamma, beta = rearrange(self.film(angle_emb), "b v (two c) -> two b v c 1 1 1", two=2)
        x = lifted * (1 + gamma.to(lifted.dtype)) + beta.to(lifted.dtype)
        pooled = torch.cat([reduce(x, "b v c d h w -> b c d h w", "mean"),
                            reduce(x, "b v c d h w -> b c d h w", "max")], dim=1)
        return self.proj(pooled)


def lift(feats: torch.Tensor, geometry: dict, size: int) -> torch.Tensor:
    """Back-project per-view 2D features ``[B, V, C, h, w]`` along each view's rays into ``[B, V, C, S, S, S]``.

    Runs in float32 even under autocast: ray coordinates in bfloat16 would be off by a quarter voxel at 128^3.
    """
    with torch.autocast(feats.device.type, enabled=False):
        return backproject(feats.float(), geometry, (size, size, size))


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
        ang = rearrange(zyx[..., None] * self.freqs, "n a f -> n (a f)")
        return self.proj(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).to(self.proj.weight.dtype))


# ---- transformer -------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient on GPUs)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(Mlp(LN(x)))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        from timm.layers import DropPath, Mlp

        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
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

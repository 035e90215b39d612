"""The view encoder of the model plugins: timm backbones (pretrained weights from the cache), norm swaps,
per-view features, the view-angle embedding and the fusion of views.

Parameter shapes do not depend on the output resolution or the number of views, so that a checkpoint of
one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce

from x2ct_framework.errors import CheckpointError, did_you_mean

from .inputs import _groups


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

"""``vit_cascade``: X-ray views -> back-projected token grid -> 3D transformer -> CT volume."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint

from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import backproject


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTCascade(nn.Module):
    """Hybrid ViT regressor: shared 2D encoder, geometric lifting, 3D transformer, 3D decoder."""

    def __init__(self, *, resolution: int, tokens: int = 24, dim: int = 96, depth: int = 4, heads: int = 4,
                 channels: int = 32, gradient_checkpointing: bool = False):
        super().__init__()
        if tokens < 2 or resolution < tokens:
            raise ValueError(f"tokens must be >= 2 and <= resolution ({resolution}), got {tokens}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.resolution, self.tokens = resolution, tokens
        self.gradient_checkpointing = gradient_checkpointing
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, dim, 3, padding=1), nn.GELU(),
        )
        self.angle_embed = nn.Linear(2, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens**3, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Sequential(
            nn.Conv3d(dim + 1, channels, 3, padding=1), nn.GELU(),
            nn.Conv3d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv3d(channels, 1, 1),
        )

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        b, v = xrays.shape[:2]
        g = self.tokens
        feats = self.encoder(rearrange(xrays, "b v c h w -> (b v) c h w"))
        feats = F.adaptive_avg_pool2d(feats, (g, g))
        feats = rearrange(feats, "(b v) c h w -> b v c h w", b=b)
        lifted = backproject(feats, geometry, (g, g, g))  # [B, V, C, G, G, G]
        theta = torch.deg2rad(geometry["angles"].to(xrays))
        angle = self.angle_embed(torch.stack([torch.cos(theta), torch.sin(theta)], -1))  # [B, V, C]
        lifted = lifted + angle[..., None, None, None]
        fused = lifted.mean(dim=1)  # order-independent over views
        x = rearrange(fused, "b c d h w -> b (d h w) c") + self.pos
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = rearrange(self.norm(x), "b (d h w) c -> b c d h w", d=g, h=g, w=g)
        r = self.resolution
        x = F.interpolate(x, size=(r, r, r), mode="trilinear", align_corners=False)
        base = (F.interpolate(prev, size=(r, r, r), mode="trilinear", align_corners=False)
                if prev is not None else torch.zeros_like(x[:, :1]))
        return base + self.decoder(torch.cat([x, base], dim=1))


@hookimpl
def register_models(register):
    register("vit_cascade", ViTCascade)

"""Attention layers of the model plugins: multi-head attention (scaled_dot_product_attention) and the
transformer block.

Parameter shapes do not depend on the output resolution or the number of views, so that a checkpoint of
one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


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

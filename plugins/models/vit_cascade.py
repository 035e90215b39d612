"""``vit_cascade``: the hybrid ViT cascade that regresses a CT volume from any number of X-ray views.

X-ray views -> shared timm 2D encoder -> each view's features back-projected along its rays into a
G^3 token grid -> views fused (order-independent, with an angle embedding per view) -> 3D
transformer over the G^3 tokens -> 3D decoder that grows a prediction from G^3 to R^3 through
``decoder_levels`` levels, each adding a residual to the upsampled prediction of the level before,
with skip features back-projected from the finer encoder levels. With ``decoder = "implicit"`` the
finest level is a point decoder (an MLP per query point), so the model can be evaluated at any point
and any resolution (``query``, ``predict_volume``).

Parameter shapes depend neither on the output resolution R nor on G nor on the number of views, so
stage k loads stage k-1's checkpoint strictly. Parameter-name prefixes (for a stage's ``freeze``):

- ``encoder.``      the 2D encoder (``encoder.body.`` is the timm network);
- ``lift.``         per-level projections into the token grid, the angle embedding, the view fusion;
- ``transformer.``  positional encoding, blocks (``transformer.blocks.N.``) and final norm;
- ``decoder.``      ``decoder.coarse_head`` and ``decoder.stem`` (at the token grid), then
  ``decoder.levels.N.`` (N = 0 coarsest), each with ``skip.`` (projection and view fusion of the
  back-projected skip), ``join.`` and ``refine.`` (the residual 3D block; ``refine.head`` predicts the
  level's residual); with ``decoder = "implicit"`` the finest level is ``decoder.point.`` instead
  (``proj.``, ``fuse.``, ``mlp.``, ``head.``);
- ``lift.rays.N``   with ``ray_encoding``, the 1x1 convolution adding encoder level N its ray encoding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl

from x2ct_framework.physics import batched

from .attention import Block
from .decoder import Join, level_sizes, Refine, residual_block
from .encoder import NORMS, AngleEmbedding, ViewEncoder, ViewFusion
from .inputs import check_inputs, maybe_checkpoint, ModelInputError, resize3d
from .lifting import (detector_plucker, FourierPoints, FourierPositions, lift, project_points, sample_views,
                      sample_volume, voxel_centres)

DECODERS = ("dense", "implicit")


class SkipLift(nn.Module):
    """Skip features of one encoder level: a 1x1 projection, back-projection into ``size^3``, view fusion."""

    def __init__(self, enc_channels: int, channels: int, angle_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(enc_channels, channels, 1)
        self.fuse = ViewFusion(channels, angle_dim)

    def forward(self, feats: torch.Tensor, geometry: dict, angle_emb: torch.Tensor, size: int) -> torch.Tensor:
        b = feats.shape[0]
        s = self.proj(rearrange(feats, "b v c h w -> (b v) c h w"))
        return self.fuse(lift(rearrange(s, "(b v) c h w -> b v c h w", b=b), geometry, size), angle_emb)


class Aligned:
    """What pixel-aligned sampling needs to know about the encoder input: each level's centre offset
    (input pixels) and the input size, plus whether a visibility flag goes with the features."""

    def __init__(self, offsets: list[float], image_size: tuple[int, int], visibility: bool):
        self.offsets, self.image_size, self.visibility = offsets, image_size, visibility


def sample_aligned(feats: list[torch.Tensor], geometry: dict, size: int, aligned: Aligned) -> torch.Tensor:
    """Every voxel centre of a ``size^3`` grid reads every level of ``feats`` ``[B, V, C, h, w]`` where it
    projects in each view; with ``aligned.visibility`` one more channel says whether the view sees it:
    ``[B, V, C (+1), size, size, size]``."""
    b = feats[0].shape[0]
    vol = batched(geometry, b, feats[0].device)["volume_mm"][:, 0]
    uv, visible = project_points(voxel_centres(vol, size), geometry)
    x = sample_views(feats, aligned.offsets, aligned.image_size, uv)
    if aligned.visibility:
        x = torch.cat([x, visible[:, :, None]], dim=2)
    return rearrange(x, "b v c (d h w) -> b v c d h w", d=size, h=size, w=size)


class AlignedSkip(nn.Module):
    """Pixel-aligned skip features of one decoder level: every encoder level projected to ``channels``
    (1x1), sampled at each voxel's exact projection in every view (centre offsets corrected, with a
    visibility flag), and the views fused."""

    def __init__(self, enc_channels: list[int], channels: int, angle_dim: int, visibility: bool):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in enc_channels)
        self.fuse = ViewFusion(channels + int(visibility), angle_dim, out=channels)

    def forward(self, feats: list[torch.Tensor], geometry: dict, angle_emb: torch.Tensor, size: int,
                aligned: Aligned) -> torch.Tensor:
        b = feats[0].shape[0]
        projected = [rearrange(p(rearrange(f, "b v c h w -> (b v) c h w")), "(b v) c h w -> b v c h w", b=b)
                     for p, f in zip(self.proj, feats)]
        return self.fuse(sample_aligned(projected, geometry, size, aligned), angle_emb)


class DecoderLevel(nn.Module):
    """One decoder level at ``size^3``: skip features lifted from an encoder level, a residual 3D block on
    [upsampled coarser features, skip, running prediction], and a head adding a residual to the prediction."""

    def __init__(self, cin: int, cout: int, enc_channels: list[int], skip_channels: int, angle_dim: int, source: int,
                 aligned: bool = False, visibility: bool = True):
        super().__init__()
        self.source = source
        self.aligned = aligned
        self.skip = (AlignedSkip(enc_channels, skip_channels, angle_dim, visibility) if aligned
                     else SkipLift(enc_channels[source], skip_channels, angle_dim))
        self.join = Join(cin, skip_channels, 1, cout)
        self.refine = Refine(cout, head=True)

    def units(self) -> list[nn.Module]:
        return [self.skip, self.join, self.refine]

    def forward(self, h: torch.Tensor, base: torch.Tensor, feats: list[torch.Tensor], geometry: dict,
                angle_emb: torch.Tensor, size: int, channels_last: bool = False,
                checkpointing: bool = False, aligned: Aligned | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aligned:
            s = maybe_checkpoint(checkpointing, self.skip, feats, geometry, angle_emb, size, aligned)
        else:
            s = maybe_checkpoint(checkpointing, self.skip, feats[self.source], geometry, angle_emb, size)
        h, residual = residual_block(self.join, self.refine, h, [s, base], size, channels_last, checkpointing)
        return h, base + residual


class PointDecoder(nn.Module):
    """The finest decoder level as an implicit decoder: for each 3D query point (world mm) an MLP over

    - the pixel-aligned features of every view: every encoder level projected to ``channels`` (1x1),
      sampled at the point's exact projection (centre offsets corrected, ``sample_views``), with a
      visibility flag, the views fused (angle FiLM, mean + max);
    - the coarser decoder features and the running prediction (or ``prev``), trilinear at the point;
    - Fourier features of the point's position in the volume;

    predicting a residual over the running prediction at the point. No part of it is a grid at the
    output resolution, so the output can be asked for at any resolution, in chunks of points.
    """

    def __init__(self, enc_channels: list[int], coarse: int, channels: int, hidden: int, angle_dim: int,
                 visibility: bool):
        super().__init__()
        self.visibility = visibility
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in enc_channels)
        self.fuse = ViewFusion(channels + int(visibility), angle_dim, out=channels)
        self.pos = FourierPoints()
        self.mlp = nn.Sequential(nn.Linear(channels + coarse + 1 + self.pos.features, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, 1)

    def project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every encoder level ``[B, V, C_l, h, w]`` projected to ``[B, V, channels, h, w]`` (once per forward)."""
        b = feats[0].shape[0]
        return [rearrange(p(rearrange(f, "b v c h w -> (b v) c h w")), "(b v) c h w -> b v c h w", b=b)
                for p, f in zip(self.proj, feats)]

    def forward(self, points: torch.Tensor, maps: list[torch.Tensor], coarse: torch.Tensor, base: torch.Tensor,
                geometry: dict, angle_emb: torch.Tensor, aligned: Aligned, half: torch.Tensor) -> torch.Tensor:
        """``points [B, n, 3]`` (mm, x y z) -> values ``[B, n]``; ``half [B, 3]``: half the volume's extent (mm)."""
        uv, visible = project_points(points, geometry)
        x = sample_views(maps, aligned.offsets, aligned.image_size, uv)              # [B, V, C, n]
        if self.visibility:
            x = torch.cat([x, visible[:, :, None]], dim=2)
        fused = self.fuse.points(x, angle_emb)                                     # [B, n, C]
        unit = points.float() / half[:, None, :]
        at = sample_volume(coarse, unit)                                             # [B, C_coarse, n]
        running = sample_volume(base, unit)[:, 0]                                    # [B, n]
        inp = torch.cat([fused, rearrange(at, "b c n -> b n c"),
                         running[..., None], self.pos(unit)], dim=-1)
        return running + self.head(self.mlp(inp))[..., 0].float()


class Context:
    """What the point decoder needs from one forward pass of the rest of the model."""

    def __init__(self, maps: list[torch.Tensor], coarse: torch.Tensor, base: torch.Tensor, geometry: dict,
                 angle_emb: torch.Tensor, aligned: Aligned, half: torch.Tensor):
        self.maps, self.coarse, self.base = maps, coarse, base
        self.geometry, self.angle_emb, self.aligned = geometry, angle_emb, aligned
        self.half = half  # [B, 3] half the volume's extent in mm (world points -> volume coordinates)


class ViTCascade(nn.Module):
    """Hybrid ViT cascade: ``model(xrays [B, V, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]``.

    Options (recipe ``[model]``):
        resolution: output size R (from the stage unless set).
        tokens: token grid G (G^3 tokens); 24 and 32 are the named presets, any integer >= 2 works.
        dim, depth, heads, mlp_ratio, drop_path: the 3D transformer (width, blocks, heads, MLP width
            factor, stochastic depth rate reached linearly at the last block).
        channels: decoder width at the finest level; each coarser level doubles it.
        decoder_levels: decoder levels between the token grid and R (each with a skip and a head).
        encoder: any timm model name that supports ``features_only`` (CNNs, and ViTs with
            ``encoder_kwargs = { img_size = ... }``); shared by all views.
        pretrained, pretrained_file: load the encoder's pretrained weights from timm's local cache or
            from a file; default off.
        encoder_kwargs: extra keyword arguments for ``timm.create_model``.
        angle_frequencies: Fourier frequencies of the per-view angle embedding.
        gradient_checkpointing: recompute each transformer block, and each part of a decoder level
            (skip lifting, first and second half of its block), in the backward pass (from
            ``train.gradient_checkpointing`` unless set).
        channels_last: run the 3D decoder in channels-last memory format (faster on CPU and GPU).

    Strengthening options (each can be switched off from the recipe for an ablation):
        norm: "group" (default) replaces the encoder's BatchNorm by GroupNorm, "frozen" freezes it (for
            pretrained weights), "batch" keeps it; only "group" and "frozen" make a case's output
            independent of the other cases in its batch and of the number of processes.
        xray_size: every X-ray is resized to this square size before the encoder, so the encoder sees one
            scale in every stage (``recipes/base.toml``: 256, and the data renders 256^2 in every stage);
            default: the ``img_size`` of ``encoder_kwargs``, else 0 (the dataset's size, kept).
        full_resolution: channels of a stride-1 2D level in front of the encoder's levels (default
            ``channels``; 0: none).
        pixel_aligned: every decoder voxel (and every token) samples every encoder level of every view at
            its exact projection, with the strided maps' (s - 1) / 2 pixel centre offset corrected;
            default false (each decoder level back-projects one encoder level resized to the grid): in the
            CPU matrix (24^3, 100 steps) it bought nothing (benchmarks/RESULTS.md) and cost 1.2x per step.
        visibility: with pixel_aligned, a flag channel per view saying whether the view sees the voxel.
        centre_offset: with pixel_aligned, correct each strided level's centre offset (false: sample it as
            if feature j were centred on input pixel s * (j + 1/2), which it is not for "same" padding).
        head_init: "small" (default) starts the coarse head at 1/100 of PyTorch's default scale and zero
            bias, so the first prediction is near 0 (as ``cnn_baseline``'s head); "default" keeps
            PyTorch's init (its first output had 2.3-3.3x the CT's spread).
        decoder: "dense" (default) makes the finest level a 3D convolution block on the R^3 grid;
            "implicit" makes it a ``PointDecoder`` (an MLP per query point, ``decoder.point.``), so the
            model answers ``query(xrays, geometry, points)`` and ``predict_volume(..., resolution)`` at
            any resolution without a dense feature grid there; the forward pass at the stage's
            resolution returns the dense volume (every loss works unchanged), computed in chunks of
            ``point_chunk`` points, each recomputed in the backward pass (torch.utils.checkpoint).
        point_chunk: points per chunk of the implicit decoder (memory against speed).
        ray_encoding: add each encoder level a per-pixel encoding of its view's geometry: the Plücker
            coordinates (direction, moment) of the ray through each feature's centre, through a 1x1
            convolution per level (``lift.rays.N``) that starts at zero. Added to the features rather
            than concatenated to the X-ray, so a pretrained encoder sees the input it was trained on
            (its first convolution keeps its shape and weights) and the model starts as without it;
            every level, the stride-1 one included, gets rays sampled at its own resolution.
        kv_pool: 1 (default) is full self-attention over the G^3 tokens; r > 1 (dividing ``tokens``) takes
            the keys and values from the token grid average-pooled by r per axis (spatial-reduction
            attention, as in PVT): each token still sees the whole volume, and attention costs 1/r^3 as
            much. At 128^3 with 24^3 tokens, global attention is 83% of a training step's FLOPs (4.18 of
            5.05 TFLOP); r = 2 cuts the step to 1.40 TFLOP, r = 3 to 1.03 (benchmarks/RESULTS.md). Same
            parameters as without it: weights load across the two settings.
    """

    uses_prev = True  # refines the previous stage's prediction (checked by testing.check_model)

    def __init__(self, *, resolution: int, tokens: int = 24, dim: int = 256, depth: int = 6, heads: int = 4,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, channels: int = 16, decoder_levels: int = 3,
                 encoder: str = "resnet18", pretrained: bool = False, pretrained_file: str = "",
                 encoder_kwargs: dict | None = None, angle_frequencies: int = 4,
                 gradient_checkpointing: bool = False, channels_last: bool = True, norm: str = "group",
                 xray_size: int | None = None, full_resolution: int | None = None, pixel_aligned: bool = False,
                 visibility: bool = True, centre_offset: bool = True, head_init: str = "small",
                 decoder: str = "dense", point_chunk: int = 65536, ray_encoding: bool = False, kv_pool: int = 1):
        super().__init__()
        for key, value, low in (("resolution", resolution, 1), ("tokens", tokens, 2), ("dim", dim, 1),
                                ("depth", depth, 1), ("heads", heads, 1), ("channels", channels, 1),
                                ("decoder_levels", decoder_levels, 1), ("angle_frequencies", angle_frequencies, 1)):
            check_int(key, value, low)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        if encoder_kwargs is not None and not isinstance(encoder_kwargs, dict):
            raise ValueError(f"encoder_kwargs must be a table of timm.create_model arguments, got {encoder_kwargs!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}")
        if head_init not in ("small", "default"):
            raise ValueError(f"head_init must be 'small' or 'default', got {head_init!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(repr(d) for d in DECODERS)}, got {decoder!r}")
        check_int("point_chunk", point_chunk, 1)
        if not isinstance(ray_encoding, bool):
            raise ValueError(f"ray_encoding must be true or false, got {ray_encoding!r}")
        if not isinstance(kv_pool, int) or isinstance(kv_pool, bool) or kv_pool < 1 or tokens % kv_pool:
            raise ValueError(f"kv_pool must be an integer >= 1 that divides tokens ({tokens}), got {kv_pool!r}; "
                             "set model.kv_pool = 1 for full attention (recipes/base.toml sets 2 for 24^3 tokens)")
        self.kv_pool = kv_pool
        if xray_size is None:
            size = (encoder_kwargs or {}).get("img_size", 0)
            xray_size = size if isinstance(size, int) else 0
        if full_resolution is None:
            full_resolution = channels
        for key, value in (("xray_size", xray_size), ("full_resolution", full_resolution)):
            check_int(key, value, 0)
        self.pixel_aligned, self.visibility = bool(pixel_aligned), bool(visibility)
        self.centre_offset = bool(centre_offset)
        self.decoder_kind, self.point_chunk, self.ray_encoding = decoder, point_chunk, ray_encoding
        self.decoder_levels = decoder_levels
        self.resolution, self.tokens, self.dim = resolution, tokens, dim
        self.gradient_checkpointing, self.channels_last = bool(gradient_checkpointing), bool(channels_last)
        angle_dim = min(dim, 64)

        self.encoder = ViewEncoder(encoder, pretrained, pretrained_file, encoder_kwargs, norm, xray_size,
                                   full_resolution)
        self.lift = nn.Module()
        self.lift.angles = AngleEmbedding(angle_dim, angle_frequencies)
        self.lift.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in self.encoder.channels)
        vis = int(self.pixel_aligned and self.visibility)
        self.lift.fuse = ViewFusion(dim + vis, angle_dim, out=dim)
        if ray_encoding:
            self.lift.rays = nn.ModuleList(nn.Conv2d(6, c, 1) for c in self.encoder.channels)

        self.transformer = nn.Module()
        self.transformer.pos = FourierPositions(dim)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.transformer.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r, kv_pool=kv_pool, grid=tokens)
                                                for r in rates)
        self.transformer.norm = nn.LayerNorm(dim)

        widths = [channels * 2 ** (decoder_levels - i) for i in range(decoder_levels + 1)]
        n_enc = len(self.encoder.channels)
        self.decoder = nn.Module()
        self.decoder.coarse_head = nn.Conv3d(dim, 1, 1)
        self.decoder.stem = nn.Conv3d(dim, widths[0], 1)
        levels = []
        dense = decoder_levels - (decoder == "implicit")  # the implicit decoder replaces the finest level
        for i in range(dense):
            source = min(decoder_levels - 1 - i, n_enc - 1)  # finest decoder level <- finest encoder level
            levels.append(DecoderLevel(widths[i], widths[i + 1], self.encoder.channels, max(widths[i + 1] // 2, 4),
                                       angle_dim, source, self.pixel_aligned, self.visibility))
        self.decoder.levels = nn.ModuleList(levels)
        if decoder == "implicit":
            self.decoder.point = PointDecoder(self.encoder.channels, widths[dense], channels, 4 * channels, angle_dim,
                                              self.visibility)
        for part in (self.lift, self.transformer, self.decoder):  # the encoder keeps timm's (or pretrained) init
            part.apply(_init)
        if head_init == "small":
            # As cnn_baseline's head: the first prediction starts near 0 instead of 2.3-3.3x the CT's spread.
            with torch.no_grad():
                self.decoder.coarse_head.weight.mul_(0.01)
                self.decoder.coarse_head.bias.zero_()
        if ray_encoding:  # the model starts as without the encoding; training decides what it adds
            for conv in self.lift.rays:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    @property
    def level_sizes(self) -> list[int]:
        """Grid sizes of the decoder levels (the implicit decoder's is the last, the output resolution)."""
        return level_sizes(self.tokens, self.resolution, self.decoder_levels)

    def checkpointed_modules(self) -> list[nn.Module]:
        """The units that gradient checkpointing recomputes (see ``x2ct_framework.model_info``)."""
        return [*self.transformer.blocks, *(u for level in self.decoder.levels for u in level.units())]

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training

    def encode(self, xrays: torch.Tensor, geometry: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-view encoder features (finest first; with ``ray_encoding`` plus each level's ray encoding) and
        per-view angle embeddings ``[B, V, A]``."""
        feats = self.encoder(xrays)
        if self.ray_encoding:
            aligned = self.aligned_info(xrays)
            feats = [f + self.ray_features(i, f, xrays, geometry, aligned) for i, f in enumerate(feats)]
        return feats, self.lift.angles(geometry["angles"].to(xrays.device))

    def ray_features(self, level: int, feats: torch.Tensor, xrays: torch.Tensor, geometry: dict,
                     aligned: Aligned | None = None) -> torch.Tensor:
        """The ray encoding of encoder level ``level`` (whose features are ``feats [B, V, C, h, w]``): the
        Plücker coordinates of the ray through each feature's centre (``layers.detector_plucker``), through
        ``lift.rays.<level>``: ``[B, V, C, h, w]``."""
        b, _, _, h, w = feats.shape
        aligned = aligned or self.aligned_info(xrays)
        rays = detector_plucker(geometry, b, (h, w), aligned.image_size, aligned.offsets[level], feats.device)
        out = self.lift.rays[level](rearrange(rays, "b v c h w -> (b v) c h w").to(feats.dtype))
        return rearrange(out, "(b v) c h w -> b v c h w", b=b)

    def aligned_info(self, xrays: torch.Tensor) -> Aligned:
        n = self.encoder.xray_size
        size = (n, n) if n > 0 else tuple(xrays.shape[-2:])
        offsets = self.encoder.offsets if self.centre_offset else [0.0] * len(self.encoder.offsets)
        return Aligned(offsets, size, self.visibility)

    def lift_tokens(self, feats: list[torch.Tensor], geometry: dict, angle_emb: torch.Tensor,
                    aligned: Aligned | None = None) -> torch.Tensor:
        """Project every encoder level to ``dim``, resize it to G x G (antialiased), lift it into G^3 and fuse
        the views: ``[B, dim, G, G, G]``. With ``aligned`` each token centre samples every level where it
        projects (centre offsets corrected, visibility flag); otherwise the levels are summed and
        back-projected."""
        g = self.tokens
        b = feats[0].shape[0]
        planes = []
        for proj, f in zip(self.lift.proj, feats):
            f2 = proj(rearrange(f, "b v c h w -> (b v) c h w")).float()  # antialiased resize has no bf16 CPU kernel
            if tuple(f2.shape[-2:]) != (g, g):
                f2 = nn.functional.interpolate(f2, size=(g, g), mode="bilinear", align_corners=False,
                                               antialias=g < min(f2.shape[-2:]))
            planes.append(rearrange(f2, "(b v) c h w -> b v c h w", b=b))
        if aligned is not None:
            return self.lift.fuse(sample_aligned(planes, geometry, g, aligned), angle_emb)
        return self.lift.fuse(lift(sum(planes), geometry, g), angle_emb)

    def lift_views(self, xrays: torch.Tensor, geometry: dict) -> torch.Tensor:
        """The fused token features ``[B, dim, G, G, G]`` before the transformer (independent of view order)."""
        check_inputs("vit_cascade", xrays, geometry)
        feats, emb = self.encode(xrays, geometry)
        return self.lift_tokens(feats, geometry, emb, self.aligned_info(xrays) if self.pixel_aligned else None)

    def transform(self, grid: torch.Tensor) -> torch.Tensor:
        g = self.tokens
        x = rearrange(grid, "b c d h w -> b (d h w) c") + self.transformer.pos(g).to(grid.dtype)
        for blk in self.transformer.blocks:
            x = maybe_checkpoint(self._checkpointing(), blk, x)
        return rearrange(self.transformer.norm(x), "b (d h w) c -> b c d h w", d=g, h=g, w=g)

    def decode_levels(self, x: torch.Tensor, feats: list[torch.Tensor], geometry: dict, angle_emb: torch.Tensor,
                      prev: torch.Tensor | None = None, aligned: Aligned | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense decoder levels: ``(features, prediction)`` at the last one's size (the token grid when
        there are none). ``prev`` replaces the running prediction at the finest level, R^3."""
        y = self.decoder.coarse_head(x)
        h = self.decoder.stem(x)
        sizes = self.level_sizes
        for i, (level, size) in enumerate(zip(self.decoder.levels, sizes)):
            last = i == len(sizes) - 1
            base = resize3d(prev.to(y.dtype) if last and prev is not None else y, size)
            h, y = level(h, base, feats, geometry, angle_emb, size, self.channels_last, self._checkpointing(),
                         aligned)
        return h, y

    def decode(self, x: torch.Tensor, feats: list[torch.Tensor], geometry: dict, angle_emb: torch.Tensor,
               prev: torch.Tensor | None = None, aligned: Aligned | None = None) -> torch.Tensor:
        return self.decode_levels(x, feats, geometry, angle_emb, prev, aligned)[1].contiguous()

    def trunk(self, xrays: torch.Tensor, geometry: dict
              ) -> tuple[list[torch.Tensor], torch.Tensor, Aligned | None, torch.Tensor]:
        """Encoder, token lifting and transformer: ``(features, angle embeddings, aligned, tokens)``, with
        ``aligned`` None unless ``pixel_aligned`` (what the dense decoder levels take)."""
        feats, emb = self.encode(xrays, geometry)
        aligned = self.aligned_info(xrays) if self.pixel_aligned else None
        return feats, emb, aligned, self.transform(self.lift_tokens(feats, geometry, emb, aligned))

    def context(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> Context:
        """Everything the point decoder reads, from one pass of the encoder, transformer and dense levels."""
        if self.decoder_kind != "implicit":
            raise ValueError("vit_cascade: query and predict_volume need the implicit point decoder; "
                             "set model.decoder = \"implicit\" in the recipe")
        check_inputs("vit_cascade", xrays, geometry, prev)
        feats, emb, aligned, x = self.trunk(xrays, geometry)
        h, y = self.decode_levels(x, feats, geometry, emb, None, aligned)
        base = prev.to(y.dtype) if prev is not None else y
        half = batched(geometry, xrays.shape[0], xrays.device)["volume_mm"][:, 0] / 2
        return Context(self.decoder.point.project(feats), h, base, geometry, emb, aligned or self.aligned_info(xrays),
                       half)

    def query_context(self, ctx: Context, points: torch.Tensor) -> torch.Tensor:
        """Values ``[B, N]`` at world points ``[B, N, 3]`` (mm), ``point_chunk`` points at a time; with
        gradients on, each chunk is recomputed in the backward pass rather than kept."""
        point = self.decoder.point
        out = []
        for start in range(0, points.shape[1], self.point_chunk):
            p = points[:, start:start + self.point_chunk]
            args = (p, ctx.maps, ctx.coarse, ctx.base, ctx.geometry, ctx.angle_emb, ctx.aligned, ctx.half)
            out.append(checkpoint(point, *args, use_reentrant=False) if torch.is_grad_enabled() else point(*args))
        return torch.cat(out, dim=1)

    def query(self, xrays: torch.Tensor, geometry: dict, points: torch.Tensor,
              prev: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted value at any world points ``[B, N, 3]`` (mm, x y z, isocentre at 0; voxel centres
        as ``layers.voxel_centres``): ``[B, N]`` (needs ``decoder = "implicit"``)."""
        if not isinstance(points, torch.Tensor) or points.ndim != 3 or points.shape[-1] != 3 \
                or points.shape[0] != xrays.shape[0]:
            shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
            raise ModelInputError(f"vit_cascade.query: points must be [B, N, 3] (world mm, x y z) with B = "
                                  f"{xrays.shape[0]}, got {shape}")
        return self.query_context(self.context(xrays, geometry, prev), points.to(xrays.device))

    def predict_volume(self, xrays: torch.Tensor, geometry: dict, resolution: int,
                       prev: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction on a ``resolution^3`` grid over the volume, any resolution: ``[B, 1, r, r, r]``
        (needs ``decoder = "implicit"``; only the output, never a feature grid, is held at that size)."""
        check_int("vit_cascade.predict_volume: resolution", resolution, 1)
        ctx = self.context(xrays, geometry, prev)
        b = xrays.shape[0]
        vol = batched(geometry, b, xrays.device)["volume_mm"][:, 0]
        values = self.query_context(ctx, voxel_centres(vol, resolution))
        return rearrange(values, "b (d h w) -> b 1 d h w", d=resolution, h=resolution, w=resolution)

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.decoder_kind == "implicit":  # its context() checks the inputs
            return self.predict_volume(xrays, geometry, self.resolution, prev)
        check_inputs("vit_cascade", xrays, geometry, prev)
        feats, emb, aligned, x = self.trunk(xrays, geometry)
        return self.decode(x, feats, geometry, emb, prev, aligned)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@hookimpl
def register_models(register):
    register("vit_cascade", ViTCascade)

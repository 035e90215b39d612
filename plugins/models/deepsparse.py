"""``deepsparse``: DeepSparse (Lin et al., "DeepSparse: A Foundation Model for Sparse-View CBCT Reconstruction",
IEEE TMI 2026; xmed-lab/DeepSparse), layer for layer and weight-compatible.

The multi-view network of their ``code/models/model_v7.py`` (``Model_mv``) as their configs build it
(``configs/pretrain.yaml``, ``finetune_s1.yaml``, ``scratch_mv.yaml``; ``finetune_s2.yaml`` adds the stage-2
denoisers), with the same module tree so that their checkpoints (``ep_N.pth``, a bare ``state_dict`` written by
their ``train.py``; the pretrained and fine-tuned files of HuggingFace ``HajihajihaJimmy/DeepSparse``) load
unchanged (``weights`` option):

- ``encoder.encoder``: a 2D CNN shared by all views: ``stem`` (3x3 conv, batch norm, leaky ReLU) at
  ``base_channels`` = 16, then ``levels`` = 3 levels of a 2x2 stride-2 convolution (+ batch norm, leaky ReLU)
  and a residual stack widening by ``channel_growth`` = 2 (16, 32, 64, 128 channels); every level's map is kept;
- lifting: each level's per-view maps are sampled at the projections of a ``grid``^3 = 32^3 point grid (their
  ``lr_res``) and max-pooled over views -> four 3D feature grids (128, 64, 32, 16 channels, deepest first);
- ``cb``: per level, a vector quantiser (1x1x1 ``pre_quant``, nearest of ``codebook_size`` = 512 codes updated
  by exponential moving averages, straight-through gradient, 1x1x1 ``post_quant``);
  ``denoise_layers`` (``finetune = true``, their stage 2): per level two residual 3D convolutions;
- ``decoders``: per level a residual 3D stack (``decoder_convs`` = 2) to ``feature_channels`` = 128, each level
  also fed the previous level's output -> one 3D feature grid of 128 channels at 32^3;
- every output voxel: the 3D grid sampled trilinearly, plus every level's 2D maps sampled at its projection in
  every view and max-pooled over views (16 + 32 + 64 + 128 channels), concatenated (368 channels);
- ``point_decoder``: 1x1 convolutions 368 -> 184 -> ``mlp_channels`` [128, 64, 16, 1], every layer after the
  first also fed the 368 input channels again, batch norm and leaky ReLU after every layer (the last too).

At their configuration it has 6,041,419 parameters (7,217,899 with ``finetune = true``), 210 (266) state-dict
entries, measured from their code; 247,808 of them are the codebooks' moving averages (not trained by gradient).

Geometry: their data loader projects points with DIF-Net's ``Geometry.project`` (TIGRE's DSO / DSD) into detector
coordinates ``[-1, 1]`` = the detector's half extent (first coordinate along the projection's rows, second along
its columns), which equal this framework's ``project_points`` coordinates; the feature maps of every level are
sampled there with corners aligned, as theirs. The 32^3 grid lies at their array positions ``i / 32`` (their axes
0, 1, 2 = our H, W and D reversed, docs/models.md) and the output voxels' centres are looked up in it with their
``index_3d`` (corners aligned), both placed in the world by the recipe's geometry, so the network sees each view
as DeepSparse does whichever preset the recipe uses (``c2rv`` is theirs: DSO 800, DSD 1200 mm, 256^2 of 2.4 mm).

Training: their loss adds ``vq_weight`` x (the mean over levels of the quantisers' commitment loss; with
``finetune``: of the denoisers' L1 to the quantised features) to the task's MSE. Here the model hands that
weighted term to the trainer (``auxiliary_losses()``), which adds it to the recipe's losses before the backward
pass, so gradient accumulation, loss scaling and DDP treat it as every other term (logged as ``train/vq``).

CPU-sized variants (their weights then no longer load): ``base_channels``, ``channel_growth``, ``levels``,
``feature_channels``, ``decoder_convs``, ``mlp_channels``, ``codebook_size``, ``grid``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.errors import CheckpointError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import project_points
from x2ct_framework.physics.geometry import batched

from .convert import check_state_keys, read_checkpoint, unwrap_state
from .inputs import ModelInputError, check_inputs, maybe_checkpoint
from .lifting import voxel_centres

HF_REPO = "HajihajihaJimmy/DeepSparse"


# ---- their building blocks (models/conv_utils.py), the same module names ------------------------------------
def _conv(n_dim: str):
    return nn.Conv2d if n_dim == "2d" else nn.Conv3d


def _norm(n_dim: str):
    return nn.BatchNorm2d if n_dim == "2d" else nn.BatchNorm3d


class BasicConv(nn.Module):
    """3x3 convolution, batch norm, leaky ReLU (``conv.{0,1}``)."""

    def __init__(self, cin: int, cout: int, n_dim: str = "2d"):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_dim)(cin, cout, 3, padding=1), _norm(n_dim)(cout), nn.LeakyReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvPool(nn.Module):
    """Their ``Pooling(mode="conv")``: 2x2 stride-2 convolution, batch norm, leaky ReLU (``layer.{0,1}``)."""

    def __init__(self, channels: int, n_dim: str = "2d"):
        super().__init__()
        self.layer = nn.Sequential(_conv(n_dim)(channels, channels, 2, stride=2), _norm(n_dim)(channels),
                                   nn.LeakyReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ResConv(nn.Module):
    """``leaky_relu(x + bn(conv3x3(x)))``."""

    def __init__(self, channels: int, n_dim: str = "2d"):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_dim)(channels, channels, 3, padding=1), _norm(n_dim)(channels))
        self.relu = nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) + x)


class StackedResConv(nn.Module):
    """A ``BasicConv`` to ``cout`` when the width changes (``pre_conv``), then ``count`` ``ResConv`` (``layers``)."""

    def __init__(self, cin: int, cout: int | None = None, count: int = 1, n_dim: str = "2d"):
        super().__init__()
        cout = cout or cin
        self.pre_conv = BasicConv(cin, cout, n_dim).conv if cout != cin else None
        self.layers = nn.Sequential(*[ResConv(cout, n_dim) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_conv is not None:
            x = self.pre_conv(x)
        return self.layers(x)


class ViewCNN(nn.Module):
    """Their ``Encoder_base`` (2D): ``stem`` then ``levels`` x (``ConvPool``, ``StackedResConv`` widening by
    ``growth``); returns every level's map, deepest first (``chs``: their widths in that order)."""

    def __init__(self, base: int, levels: int, growth: float):
        super().__init__()
        self.stem = BasicConv(1, base)
        chs = [base]
        self.layers = nn.ModuleList()
        for _ in range(levels):
            width = int(chs[-1] * growth)
            self.layers.append(nn.Sequential(ConvPool(chs[-1]), StackedResConv(chs[-1], width)))
            chs.append(width)
        self.chs = chs[::-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = [x]
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out[::-1]


class ViewEncoder(nn.Module):
    """Their ``EncoderV_mv`` (keys ``encoder.encoder.*``): the 2D CNN on every view, ``[B, V, 1, H, W]`` -> per
    level ``[B, V, C, h, w]``."""

    def __init__(self, base: int, levels: int, growth: float):
        super().__init__()
        self.encoder = ViewCNN(base, levels, growth)

    def forward(self, projs: torch.Tensor) -> list[torch.Tensor]:
        b, v = projs.shape[:2]
        return [f.unflatten(0, (b, v)) for f in self.encoder(projs.flatten(0, 1))]


# ---- the codebook (models/ema_codebook.py) -------------------------------------------------------------------
class EMAEmbedding(nn.Module):
    """Codes ``weight [K, C]`` with their moving averages; all three are parameters without gradient, as theirs."""

    def __init__(self, count: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        weight = torch.randn(count, dim)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(count), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.clone(), requires_grad=False)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        self.cluster_size.data.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.data.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.weight.shape[0] * self.eps) * n
        self.weight.data.copy_(self.embed_avg / smoothed.unsqueeze(1))


class EMAQuantizer(nn.Module):
    """Their ``EMAVectorQuantizer`` (beta 1, decay 0.99): nearest code per voxel, codes updated by moving averages
    in training, commitment loss ``mse(codes, z)``, straight-through gradient."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.embedding = EMAEmbedding(count, dim)

    def forward(self, z: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = z.shape[:2]
        shape = z.shape[2:]
        z = z.reshape(b, c, -1).transpose(1, 2)  # [b, n, c]
        flat = z.reshape(-1, c)
        w = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", flat, w)
        index = torch.argmin(d, 1)
        zq = F.embedding(index, w).view(z.shape)
        if self.training and update:
            onehot = F.one_hot(index, w.shape[0]).type(z.dtype)
            if dist.is_available() and dist.is_initialized():  # their gather_tensor: the processes' mean
                parts = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, flat.contiguous())
                flat = torch.stack(parts).mean(0)
            self.embedding.ema_update(onehot.sum(0), onehot.transpose(0, 1) @ flat.detach())
        loss = F.mse_loss(zq.detach(), z)
        zq = z + (zq - z).detach()
        return zq.transpose(1, 2).reshape(b, c, *shape), loss


class VQ3d(nn.Module):
    """Their ``WrappedEMAVQ3d``: ``pre_quant`` (1x1x1), quantiser, ``post_quant`` (1x1x1)."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.pre_quant = nn.Conv3d(dim, dim, 1)
        self.post_quant = nn.Conv3d(dim, dim, 1)
        self.codebook = EMAQuantizer(count, dim)
        self.update = True  # their freeze(): False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, loss = self.codebook(self.pre_quant(x), self.update)
        return self.post_quant(x), loss


class PointDecoder(nn.Module):
    """Their ``PointDecoder(residual=True, use_bn=True)``: ``mlps.i`` = 1x1 conv, batch norm, leaky ReLU (every layer,
    the last too); every layer after the first also takes the input again."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Conv1d(widths[i] + (widths[0] if i else 0), widths[i + 1], 1),
                          nn.BatchNorm1d(widths[i + 1]), nn.LeakyReLU(inplace=True))
            for i in range(len(widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, m in enumerate(self.mlps):
            y = m(y if i == 0 else torch.cat([y, x], 1))
        return y


# ---- sampling as theirs (models/utils.py) ----------------------------------------------------------------------
def index_2d(feat: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """``feat [B, C, H, W]`` at ``uv [B, N, 2]`` (first coordinate along H, corners aligned, zeros outside) ->
    ``[B, C, N]``."""
    return F.grid_sample(feat.transpose(2, 3), uv.unsqueeze(2), align_corners=True)[..., 0]


def index_3d(feat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``feat [B, C, X, Y, Z]`` at ``p [B, N, 3]`` in ``[-1, 1]`` (first coordinate along X, corners aligned) ->
    ``[B, C, N]``."""
    return F.grid_sample(feat.transpose(2, 4), p[:, :, None, None], align_corners=True)[:, :, :, 0, 0]


def view_max(feats: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Their ``query_view_feats(fusion="max")``: ``feats [B, V, C, h, w]`` at ``uv [B, V, N, 2]``, max over views."""
    per_view = torch.stack([index_2d(feats[:, i], uv[:, i]) for i in range(feats.shape[1])], -1)
    return F.max_pool2d(per_view, (1, per_view.shape[-1])).squeeze(-1)


class DeepSparse(nn.Module):
    """DeepSparse: ``model(xrays [B, V, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]`` from any number of views.

    Options: ``finetune`` (their ``model.finetune``: the stage-2 ``denoise_layers``; their released stage-2
    checkpoints ``<dataset>+<n>v+s2/ep_400.pth`` have them, ``pretrain/ep_700.pth`` and stage 1 do not),
    ``weights`` (a DeepSparse checkpoint), ``safely_load`` (their ``--safely_load``: load the entries the file
    has, keep the rest fresh, as their stage 2 starts from stage 1), ``freeze_pretrained`` (their ``--freeze_ft``:
    encoder and codebooks not trained, codes not updated), ``vq_weight`` (their ``--vq_w``, 1.0; their scripts: 0.1
    for pretraining and stage 1, 1.0 for stage 2), ``image_size`` (the views' size inside the network; default: as
    given; theirs: 256), ``eval_points`` (voxels per chunk, their ``eval_npoint`` = 100000; in training each
    chunk's batch norm uses that chunk's statistics), ``checkpoint`` (recompute each chunk's point decoding in the
    backward pass, to save memory; batch-norm running statistics then move twice per step), and the CPU-sized variants
    ``base_channels`` (16), ``channel_growth`` (2), ``levels`` (3), ``feature_channels`` (128), ``decoder_convs`` (2),
    ``mlp_channels`` ([128, 64, 16, 1]), ``codebook_size`` (512), ``grid`` (32).
    """

    def __init__(self, *, resolution: int, finetune: bool = False, weights: str = "", safely_load: bool = False,
                 freeze_pretrained: bool = False, vq_weight: float = 1.0, image_size: int = 0,
                 eval_points: int = 100000, checkpoint: bool = False, base_channels: int = 16,
                 channel_growth: float = 2.0, levels: int = 3, feature_channels: int = 128, decoder_convs: int = 2,
                 mlp_channels: list[int] = (128, 64, 16, 1), codebook_size: int = 512, grid: int = 32):
        super().__init__()
        for key, value, low in (("resolution", resolution, 1), ("image_size", image_size, 0),
                                ("eval_points", eval_points, 1), ("base_channels", base_channels, 1),
                                ("levels", levels, 0), ("feature_channels", feature_channels, 1),
                                ("decoder_convs", decoder_convs, 0), ("codebook_size", codebook_size, 1),
                                ("grid", grid, 2)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(channel_growth, (int, float)) or isinstance(channel_growth, bool) or \
                int(base_channels * channel_growth ** max(levels, 1)) < 1 or channel_growth <= 0:
            raise ValueError(f"channel_growth must be a positive number (DeepSparse: 2), got {channel_growth!r}")
        if not isinstance(vq_weight, (int, float)) or isinstance(vq_weight, bool) or vq_weight < 0:
            raise ValueError(f"vq_weight must be a number >= 0 (their --vq_w), got {vq_weight!r}")
        mlp = [int(c) for c in mlp_channels]
        if not mlp or any(c < 1 for c in mlp) or mlp[-1] != 1:
            raise ValueError(f"mlp_channels must be positive widths ending in 1 (DeepSparse: [128, 64, 16, 1]), "
                             f"got {mlp}")
        self.resolution, self.image_size, self.eval_points = resolution, image_size, eval_points
        self.grid, self.vq_weight, self.use_checkpoint = grid, float(vq_weight), checkpoint
        self.is_finetune = bool(finetune)
        self.published = (base_channels, float(channel_growth), levels, feature_channels, decoder_convs, mlp,
                          codebook_size) == (16, 2.0, 3, 128, 2, [128, 64, 16, 1], 512)
        self.encoder = ViewEncoder(base_channels, levels, channel_growth)
        chs = self.encoder.encoder.chs
        self.cb = nn.ModuleList(VQ3d(codebook_size, c) for c in chs)
        if self.is_finetune:
            self.denoise_layers = nn.ModuleList(StackedResConv(c, count=2, n_dim="3d") for c in chs)
        self.decoders = nn.ModuleList(
            StackedResConv(c if i == 0 else c + feature_channels, feature_channels, decoder_convs, "3d")
            for i, c in enumerate(chs))
        width = feature_channels + sum(chs)
        self.point_decoder = PointDecoder([width, width // 2, *mlp])
        self.last_aux_loss: torch.Tensor | None = None  # the last training forward's vq / denoising term
        self._aux_terms: dict[str, torch.Tensor] = {}  # its weighted term, until auxiliary_losses() takes it
        if weights:
            self.load_state_dict(load_deepsparse_checkpoint(weights, self, partial=safely_load), strict=True)
        if freeze_pretrained:
            self.freeze_pretrained()

    def freeze_pretrained(self) -> None:
        """Their ``freeze_ft``: the encoder and the codebooks (with their 1x1x1 layers) are not trained and the codes
        are not updated."""
        for module in (self.encoder, self.cb):
            for p in module.parameters():
                p.requires_grad = False
        for cb in self.cb:
            cb.update = False

    # ---- their forward, split as theirs -------------------------------------------------------------------------
    def encode(self, projs: torch.Tensor, grid_uv: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                           torch.Tensor]:
        """Their ``encode``: ``projs [B, V, 1, H, W]``, the grid's projections ``grid_uv [B, V, G^3, 2]`` -> (per-level
        view maps, deepest first; the 3D features ``[B, feature_channels, G, G, G]``; the auxiliary loss)."""
        feats_2d = self.encoder(projs)
        g = self.grid
        aux, out = 0.0, None
        for i, feats in enumerate(feats_2d):
            lifted = view_max(feats, grid_uv).unflatten(2, (g, g, g))
            if self.is_finetune:  # their dense (all views) and sparse (masked) paths: the same views here
                dense, _ = self.cb[i](lifted)
                x, _ = self.cb[i](lifted)
                x = self.denoise_layers[i](x)
                aux = aux + F.l1_loss(x, dense.detach())
            else:
                x, loss = self.cb[i](lifted)
                aux = aux + loss
            out = self.decoders[i](x if i == 0 else torch.cat([x, out], 1))
        return feats_2d, out, aux / len(feats_2d)

    def forward_points(self, feats_2d: list[torch.Tensor], feats_3d: torch.Tensor, uv: torch.Tensor,
                       p: torch.Tensor) -> torch.Tensor:
        """Their ``forward_points``: intensities ``[B, 1, N]`` at points ``p [B, N, 3]`` (their ``points_ct``, [-1, 1])
        projected to ``uv [B, V, N, 2]``."""
        feats = index_3d(feats_3d, p)
        for f in feats_2d:
            feats = torch.cat([view_max(f, uv), feats], 1)
        return self.point_decoder(feats)

    # ---- the framework's call -----------------------------------------------------------------------------------
    @staticmethod
    def to_theirs(points: torch.Tensor, volume_mm: torch.Tensor) -> torch.Tensor:
        """World points ``[B, N, 3]`` (mm, x y z) -> their array coordinates in [0, 1] (axis 0 = our H, y; axis 1 =
        our W, x; axis 2 = our D reversed, -z)."""
        f = points / volume_mm[:, None, :].to(points) + 0.5  # fractions along x, y, z
        return torch.stack([f[..., 1], f[..., 0], 1.0 - f[..., 2]], -1)

    @staticmethod
    def from_theirs(p: torch.Tensor, volume_mm: torch.Tensor) -> torch.Tensor:
        """Their array coordinates ``[B, N, 3]`` in [0, 1] -> world points (mm, x y z)."""
        f = torch.stack([p[..., 1], p[..., 0], 1.0 - p[..., 2]], -1)
        return (f - 0.5) * volume_mm[:, None, :].to(p)

    def grid_points(self, volume_mm: torch.Tensor) -> torch.Tensor:
        """World positions ``[B, G^3, 3]`` of their low-resolution grid: array coordinates ``(i, j, k) / G``
        (their ``np.mgrid[:G, :G, :G] / G``, i slowest)."""
        ax = torch.arange(self.grid, dtype=torch.float32, device=volume_mm.device) / self.grid
        p = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(1, -1, 3)
        return self.from_theirs(p.expand(volume_mm.shape[0], -1, -1), volume_mm.float())

    @staticmethod
    def detector_points(points: torch.Tensor, geometry: dict) -> torch.Tensor:
        """World points ``[B, N, 3]`` -> their projected points ``[B, V, N, 2]``: (row, column) with -1 and 1 at the
        detector's edges (their ``Geometry.project``; the framework's ``project_points`` in (column, row))."""
        uv, _ = project_points(points, geometry)
        return uv.flip(-1)

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        b, v = check_inputs("deepsparse", xrays, geometry, prev)
        if prev is not None:
            raise ModelInputError("deepsparse: DeepSparse does not take a previous stage's prediction; remove "
                                  "stages.N.cascade for this model")
        x = xrays
        if self.image_size and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x.flatten(0, 1), size=(self.image_size,) * 2, mode="bilinear",
                              align_corners=False).unflatten(0, (b, v))
        low = 2 ** len(self.encoder.encoder.layers)
        if min(x.shape[-2:]) < low:
            raise ModelInputError(f"deepsparse: views of {tuple(x.shape[-2:])} px are smaller than the encoder's "
                                  f"{len(self.encoder.encoder.layers)} stride-2 levels allow ({low} px); set "
                                  f"model.image_size (DeepSparse: 256)")
        vol = batched(geometry, b, xrays.device)["volume_mm"][:, 0].float()
        grid_uv = self.detector_points(self.grid_points(vol), geometry).to(x.dtype)
        feats_2d, feats_3d, aux = self.encode(x, grid_uv)
        points = voxel_centres(vol, self.resolution)
        out = []
        for start in range(0, points.shape[1], self.eval_points):
            chunk = points[:, start:start + self.eval_points]
            uv = self.detector_points(chunk, geometry).to(feats_3d.dtype)
            p = (self.to_theirs(chunk, vol) * 2 - 1).to(feats_3d.dtype)  # their points_ct
            out.append(maybe_checkpoint(self.use_checkpoint, self.forward_points, feats_2d, feats_3d, uv, p))
        r = self.resolution
        volume = torch.cat(out, 2).reshape(b, 1, r, r, r)
        if self.training and torch.is_grad_enabled() and isinstance(aux, torch.Tensor):
            self.last_aux_loss = aux.detach()
            if self.vq_weight and aux.requires_grad:
                self._aux_terms = {"vq": self.vq_weight * aux}
        return volume

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """``{"vq": vq_weight x loss_vq}`` of the last training forward pass (their ``loss + vq_w * loss_vq``), taken
        once: the trainer adds it to the recipe's losses (``x2ct_framework.generative.model_terms``)."""
        terms, self._aux_terms = self._aux_terms, {}
        return terms


def load_deepsparse_checkpoint(path: str | Path, model: nn.Module | None = None,
                               partial: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a DeepSparse checkpoint (their ``train.py`` saves ``model.state_dict()`` (of the module
    inside DDP) as ``logs/<name>/ep_N.pth``; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper and a
    ``module.`` prefix are accepted), checked against ``model`` when given. ``partial``: their ``load_ckpt_safe``
    (the entries ``model`` has, the rest of ``model`` kept), for a stage-1 file into a ``finetune`` model."""
    path = Path(path).expanduser()
    blob = read_checkpoint(
        path, f"{path.resolve()}: DeepSparse checkpoint not found (model.weights of deepsparse). Their released "
              f"weights are on HuggingFace, repository {HF_REPO} (their README: `huggingface-cli download "
              f"{HF_REPO} --local-dir ./logs`): pretrain/ep_700.pth (pretrained, finetune = false) or "
              f"<dataset>+<n>v+s2/ep_400.pth (fine-tuned stage 2, finetune = true; e.g. luna+10v+s2/ep_400.pth); "
              f"put the file at {path.resolve()} or point model.weights at it")
    state = unwrap_state(blob, path, "DeepSparse's state dict (tensors keyed encoder.*, cb.*, decoders.*, "
                                     "point_decoder.*)")
    if model is None:
        return state
    own = model.state_dict()
    if partial:
        kept = {k: v for k, v in state.items() if k in own}
        check_state_keys(kept, {k: own[k] for k in kept}, path, "a DeepSparse checkpoint")
        if not kept:
            raise CheckpointError(f"{path}: no entry of the file is a DeepSparse entry of this model")
        return {**own, **kept}

    def hint(missing: list, unexpected: list) -> str:
        if any(k.startswith("denoise_layers.") for k in unexpected):
            return " (the file is a stage-2 checkpoint with denoise_layers: set finetune = true)"
        if missing and all(k.startswith("denoise_layers.") for k in missing):
            return (" (the file has no denoise_layers, a pretrained or stage-1 checkpoint: set finetune = false, "
                    "or safely_load = true to start their stage 2 from it)")
        if not getattr(model, "published", True):
            return " (the model is a CPU-sized variant: remove its width options)"
        return ""

    check_state_keys(state, own, path, "a DeepSparse checkpoint", hint)
    return state


def convert_checkpoint(source: str | Path, folder: str | Path, stage: str = "deepsparse", **model_options) -> Path:
    """Write a DeepSparse checkpoint as a framework checkpoint folder (``model.safetensors``) for ``x2ct evaluate``.
    Without ``finetune`` in the options it follows the file (stage-2 denoisers present or not)."""
    from x2ct_framework.checkpoint import save_checkpoint

    options = {"resolution": 128, **model_options}
    if "finetune" not in options:
        state = load_deepsparse_checkpoint(source)
        options["finetune"] = any(k.startswith("denoise_layers.") for k in state)
    with torch.device("meta"):
        model = DeepSparse(**options)
    state = load_deepsparse_checkpoint(source, model)
    return save_checkpoint(folder, state, {"stage": stage, "source": str(source), "model": "deepsparse",
                                           "finetune": options["finetune"]})


def main(argv: list[str] | None = None) -> int:
    from .convert import converter_main

    def add_options(p) -> None:
        p.add_argument("--finetune", choices=("auto", "true", "false"), default="auto",
                       help="stage-2 denoise_layers (auto: as the file has them)")

    return converter_main(argv, name="deepsparse", what="DeepSparse's checkpoint (ep_N.pth)",
                          source_help="their checkpoint, e.g. logs/luna+10v+s2/ep_400.pth", stage="deepsparse",
                          convert=convert_checkpoint, add_options=add_options,
                          options=lambda a: {} if a.finetune == "auto" else {"finetune": a.finetune == "true"})


@hookimpl
def register_models(register):
    register("deepsparse", DeepSparse)


if __name__ == "__main__":
    raise SystemExit(main())

"""``difnet``: DIF-Net (Lin et al., "Learning Deep Intensity Field for Extremely Sparse-View CBCT Reconstruction",
MICCAI 2023; xmed-lab/DIF-Net), layer for layer and weight-compatible.

The network of ``code/models/`` in xmed-lab/DIF-Net, rebuilt with the same module tree so that its
checkpoints (``ep_N.pth``, a bare ``state_dict``) load unchanged (``weights`` option):

- ``image_encoder``: a 2D U-Net shared by all views (1 input channel, ``mid_channels`` = 128 output
  channels at the input's resolution): a double 3x3 convolution (no bias, batch norm, ReLU) at 64
  channels, four levels of 2x2 max pooling + double convolution (128, 256, 512, 1024), four levels
  of a 2x2 stride-2 transposed convolution, concatenation with the skip and a double convolution
  (512, 256, 128, 64), then a 1x1 convolution;
- every output voxel is projected into every view; the view's feature map is sampled there
  bilinearly (``grid_sample``, corners aligned, zeros outside the detector);
- ``combine = "max"``: the views' features are max-pooled (any number of views), or ``combine =
  "mlp"``: the ``view_mixer`` (1x1 convolutions over the view axis, V -> V/2 -> 1, each followed by
  leaky ReLU; a fixed number of views, their training script's choice);
- ``point_classifier``: 1x1 convolutions 128 -> 256 -> 64 -> 16 -> 1 where every layer after the
  first also takes the fused feature again (concatenated), leaky ReLU between layers, no output
  activation: the intensity at the point.

At their default configuration (10 views, ``combine = "mlp"``, 128 point features) it has
31,105,694 parameters (31,105,633 with ``combine = "max"``), measured from their code.

Geometry: DIF-Net's data loader projects each point with its circular cone-beam geometry (TIGRE's
DSO / DSD) into detector coordinates ``[-1, 1]`` (corners aligned; first coordinate along the
projection's rows, the detector's vertical axis, second along its columns). Here the points are the
output voxels' centres and the projection is the framework's geometry (``layers.project_points``,
the same one the DRR projector uses), converted to that convention, so the network sees each view
as DIF-Net does whichever preset the recipe uses (``cbct_circular`` is theirs).

CPU-sized variants (their weights then no longer load): ``base_channels`` (64: the U-Net's first
width, doubled per level), ``mid_channels`` (128), ``classifier_channels`` ([256, 64, 16]).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import project_points
from x2ct_framework.physics.geometry import batched

from .inputs import ModelInputError, check_inputs
from .lifting import voxel_centres
from .convert import check_state_keys, read_checkpoint, unwrap_state

COMBINES = ("max", "mlp")


class DoubleConv(nn.Module):
    """(3x3 conv without bias, batch norm, ReLU) twice; ``double_conv.{0,1,3,4}`` hold the weights."""

    def __init__(self, cin: int, cout: int, mid: int | None = None):
        super().__init__()
        mid = mid or cout
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """x2 upsampling (transposed 2x2 convolution, or bilinear), padding to the skip's size, concatenation
    ``[skip, up]``, double convolution."""

    def __init__(self, cin: int, cout: int, bilinear: bool):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cin, cout, cin // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], 1))


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """The 2D U-Net of DIF-Net's ``models/unet.py`` (four levels; ``base`` = 64 there)."""

    def __init__(self, cin: int, cout: int, base: int = 64, bilinear: bool = False):
        super().__init__()
        factor = 2 if bilinear else 1
        c = [base * 2 ** i for i in range(5)]
        self.inc = DoubleConv(cin, c[0])
        self.down1, self.down2, self.down3 = Down(c[0], c[1]), Down(c[1], c[2]), Down(c[2], c[3])
        self.down4 = Down(c[3], c[4] // factor)
        self.up1 = Up(c[4], c[3] // factor, bilinear)
        self.up2 = Up(c[3], c[2] // factor, bilinear)
        self.up3 = Up(c[2], c[1] // factor, bilinear)
        self.up4 = Up(c[1], c[0], bilinear)
        self.outc = OutConv(c[0], cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.down4(x4), x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))


class ViewMixer(nn.Module):
    """1x1 convolutions over the view axis (``[B, V, C, N]`` -> ``[B, 1, C, N]``), leaky ReLU after each."""

    def __init__(self, widths: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 1), nn.LeakyReLU(inplace=True)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PointClassifier(nn.Module):
    """1x1 convolutions ``conv0..convK``; every layer after the first also takes the input feature again."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.count = len(widths) - 1
        for i in range(self.count):
            extra = widths[0] if i else 0
            self.add_module(f"conv{i}", nn.Conv1d(widths[i] + extra, widths[i + 1], 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        y = feature
        for i in range(self.count):
            y = self._modules[f"conv{i}"](y if i == 0 else torch.cat([y, feature], 1))
            if i != self.count - 1:
                y = F.leaky_relu(y)
        return y


def sample_at(feat: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """DIF-Net's ``index_2d``: ``feat [B, C, H, W]`` at ``uv [B, N, 2]`` (first coordinate along H, second along W,
    corners aligned, zeros outside) -> ``[B, C, N]``."""
    return F.grid_sample(feat.transpose(2, 3), uv.unsqueeze(2), align_corners=True)[..., 0]


class DIFNet(nn.Module):
    """DIF-Net: ``model(xrays [B, V, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]``.

    Options: ``combine`` ("max": any view count, the default here; "mlp": their training script's view
    mixer, built for ``num_views`` views), ``num_views`` (10, "mlp" only), ``image_size`` (the views'
    size inside the network, a multiple of 16; default: as given; their data: 256), ``weights`` (a
    DIF-Net checkpoint, ``ep_N.pth``), ``eval_points`` (points per chunk when decoding, their
    ``eval_npoint`` = 100000), and the CPU-sized variants ``base_channels``, ``mid_channels``,
    ``classifier_channels``; ``bilinear`` is their U-Net's alternative upsampling (off, as they train).
    """

    def __init__(self, *, resolution: int, combine: str = "max", num_views: int = 10, image_size: int = 0,
                 weights: str = "", eval_points: int = 100000, base_channels: int = 64, mid_channels: int = 128,
                 classifier_channels: list[int] = (256, 64, 16), bilinear: bool = False):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {list(COMBINES)} (max: views max-pooled, any view count; "
                             f"mlp: DIF-Net's view mixer for num_views views), got {combine!r}")
        for key, value, low in (("resolution", resolution, 1), ("num_views", num_views, 2),
                                ("image_size", image_size, 0), ("eval_points", eval_points, 1),
                                ("base_channels", base_channels, 1), ("mid_channels", mid_channels, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x poolings), got {image_size}; "
                             f"DIF-Net's projections are 256^2")
        widths = [int(c) for c in classifier_channels]
        if not widths or any(c < 1 for c in widths):
            raise ValueError(f"classifier_channels must be positive widths (DIF-Net: [256, 64, 16]), got {widths}")
        self.resolution, self.image_size, self.combine = resolution, image_size, combine
        self.num_views, self.eval_points = num_views, eval_points
        self.published = (base_channels, mid_channels, widths, bilinear) == (64, 128, [256, 64, 16], False)
        self.image_encoder = UNet(1, mid_channels, base_channels, bilinear)
        if combine == "mlp":
            self.view_mixer = ViewMixer([num_views, num_views // 2, 1])
        self.point_classifier = PointClassifier([mid_channels, *widths, 1])
        if weights:
            self.load_state_dict(load_difnet_checkpoint(weights, self))

    # ---- their forward, split as theirs ---------------------------------------------------------------------
    def encode(self, projs: torch.Tensor) -> torch.Tensor:
        """``projs [B, V, 1, H, W]`` -> per-view feature maps ``[B, V, C, H, W]``."""
        b, v = projs.shape[:2]
        feats = self.image_encoder(projs.flatten(0, 1))
        return feats.unflatten(0, (b, v))

    def forward_points(self, feats: torch.Tensor, proj_points: torch.Tensor) -> torch.Tensor:
        """Intensities ``[B, 1, N]`` at points projected to ``proj_points [B, V, N, 2]`` (their convention)."""
        v = feats.shape[1]
        per_view = torch.stack([sample_at(feats[:, i], proj_points[:, i]) for i in range(v)], -1)  # B, C, N, V
        if self.combine == "max":
            fused = per_view.amax(-1)
        else:
            fused = self.view_mixer(per_view.permute(0, 3, 1, 2)).squeeze(1)
        return self.point_classifier(fused)

    # ---- the framework's call ------------------------------------------------------------------------------
    def detector_points(self, points: torch.Tensor, geometry: dict, image_hw: tuple[int, int]) -> torch.Tensor:
        """World points ``[B, N, 3]`` (mm) -> DIF-Net's projected points ``[B, V, N, 2]``: (row, column) in
        ``[-1, 1]`` with corners aligned on an ``image_hw`` feature map."""
        uv, _ = project_points(points, geometry)  # (u along columns, v along rows), outer edges at -1 and 1
        h, w = image_hw
        return torch.stack([uv[..., 1] * (h / max(h - 1, 1)), uv[..., 0] * (w / max(w - 1, 1))], -1)

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        b, v = check_inputs("difnet", xrays, geometry, prev)
        if self.combine == "mlp" and v != self.num_views:
            raise ModelInputError(f"difnet: combine = \"mlp\" mixes exactly num_views = {self.num_views} views, got "
                                  f"{v}; set model.num_views = {v} (their weights need their view count) or "
                                  f"combine = \"max\" for any view count")
        if prev is not None:
            raise ModelInputError("difnet: DIF-Net does not take a previous stage's prediction; remove "
                                  "stages.N.cascade for this model")
        x = xrays
        if self.image_size and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x.flatten(0, 1), size=(self.image_size,) * 2, mode="bilinear",
                              align_corners=False).unflatten(0, (b, v))
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ModelInputError(f"difnet: views of {tuple(x.shape[-2:])} px do not pass the U-Net's four poolings; "
                                  f"set model.image_size to a multiple of 16 (DIF-Net: 256)")
        feats = self.encode(x)
        r = self.resolution
        vol = batched(geometry, b, xrays.device)["volume_mm"][:, 0]
        points = voxel_centres(vol, r)
        out = []
        for start in range(0, points.shape[1], self.eval_points):
            chunk = self.detector_points(points[:, start:start + self.eval_points], geometry, feats.shape[-2:])
            out.append(self.forward_points(feats, chunk.to(feats.dtype)))
        return torch.cat(out, 2).reshape(b, 1, r, r, r)


def load_difnet_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a DIF-Net checkpoint (their ``train.py`` saves ``model.state_dict()`` as ``ep_N.pth``; a
    ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper and a ``module.`` prefix are accepted), checked against
    ``model`` when given."""
    path = Path(path).expanduser()
    blob = read_checkpoint(
        path, f"{path}: DIF-Net checkpoint not found (model.weights of difnet). Train DIF-Net with its "
              f"scripts/train.sh (xmed-lab/DIF-Net) or use a released one, and point model.weights at "
              f"logs/<name>/ep_<N>.pth")
    state = unwrap_state(blob, path, "DIF-Net's state dict (tensors keyed image_encoder.*, point_classifier.*)")
    if model is None:
        return state
    own = model.state_dict()
    def hint(missing: list, unexpected: list) -> str:
        if any(k.startswith("view_mixer.") for k in unexpected):
            return " (the file has a view mixer: set combine = \"mlp\" and num_views to its view count)"
        if any(k.startswith("view_mixer.") for k in missing):
            return " (the file has no view mixer: set combine = \"max\")"
        if not getattr(model, "published", True):
            return " (the model is a CPU-sized variant: remove base_channels / mid_channels / classifier_channels)"
        return ""

    check_state_keys(state, own, path, "a DIF-Net checkpoint", hint)
    return state


def convert_checkpoint(source: str | Path, folder: str | Path, stage: str = "difnet", **model_options) -> Path:
    """Write a DIF-Net checkpoint as a framework checkpoint folder (``model.safetensors``) for ``x2ct evaluate``.
    Without options the model is theirs as trained by ``scripts/train.sh`` (10 views, ``combine = "mlp"``)."""
    from x2ct_framework.checkpoint import save_checkpoint

    options = {"resolution": 128, "combine": "mlp", "num_views": 10, **model_options}
    model = DIFNet(**options)
    state = load_difnet_checkpoint(source, model)
    return save_checkpoint(folder, state, {"stage": stage, "source": str(source), "model": "difnet",
                                           "combine": options["combine"], "num_views": options["num_views"]})


def main(argv: list[str] | None = None) -> int:
    from .convert import converter_main

    def add_options(p) -> None:
        p.add_argument("--combine", default="mlp", choices=COMBINES, help="their --combine (train.sh: mlp)")
        p.add_argument("--num-views", type=int, default=10, help="their --num_views (train.sh: 10)")

    return converter_main(argv, name="difnet", what="DIF-Net's checkpoint (ep_N.pth)",
                          source_help="their checkpoint, e.g. logs/dif-net/ep_400.pth", stage="difnet",
                          convert=convert_checkpoint, add_options=add_options,
                          options=lambda a: {"combine": a.combine, "num_views": a.num_views})

@hookimpl
def register_models(register):
    register("difnet", DIFNet)


if __name__ == "__main__":
    raise SystemExit(main())

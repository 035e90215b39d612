"""``x2ctgan``: X2CT-GAN's two-view generator (Ying et al., CVPR 2019), layer for layer and weight-compatible.

The network is the one X2CT-GAN's ``multiview2500`` experiment trains
(``multiview_network_denseUNetFuse_transposed`` in kylekma/X2CT), rebuilt here with the same module
tree, so its released generator checkpoints load unchanged (``weights`` option):

- two view branches ``view1Model`` (PA) and ``view2Model`` (lateral), each a 2D DenseNet encoder:
  a 7x7 stem (reflection padding, 64 channels), then five levels of a stride-2 3x3 convolution, a
  dense block (6, 12, 24, 16, 6 layers, growth 32, bottleneck 4x growth) and, except on the last
  level, a 1x1 transition that halves the channels; the last level ends in global average pooling;
- per level a 2D->3D link (``linker_layerN``): 1x1 convolution, the feature map replicated along the
  view's rays, one 3^3 convolution; the pooled code goes through a fully connected bottleneck
  (``base_link``: linear to 256 x 4^3, dropout 0.5, ReLU);
- per branch a 3D decoder of transposed-convolution upsampling units (channels 256, 128, 64, 32, 16,
  16), each level joining the link of the same level; after every level's join the two branches are
  brought to the CT's axis order, averaged, and the average is fed back into both branches and into
  a third, fused decoder, whose output (ReLU) is the CT;
- instance normalisation without affine parameters (with running statistics, as theirs), biases on
  the convolutions, weights drawn from N(0, 0.02) and biases 0.

Evaluation mode (``eval_norm``): X2CT-GAN's ``test.py`` and ``visual.py`` call ``eval()`` and then put
every InstanceNorm back into train mode ("instance norm in training mode is better"), so their
published numbers normalise each case by its own statistics. With ``eval_norm = "per_case"``
(default) the instance norms do the same after ``eval()`` (validation, ``x2ct evaluate``,
``predict`` and exports all call it), without updating the running statistics;
``eval_norm = "running"`` uses the stored running statistics instead (plain PyTorch ``eval()``).

With the published sizes (two 128^2 views, 128^3 output) it has 61.74 M parameters. The view
branches' last decoder blocks and output heads (``viewNModel.decoder_layer-1``, ``.decoder_layer``)
are part of the checkpoint but never reach the fused CT; they are computed only with
``view_outputs = true`` (then ``self.view_outputs`` holds both volumes, in the CT's axis order).

Layout: X2CT-GAN learned from its stored images: the CT with the head at slice 0 (as the framework's),
the PA view as it lies (head at row 0) and the lateral from 270 degrees mirrored left-right
(``x2ctgan_h5``'s defaults; docs/data.md cites their code). The model turns each detector-frame view
into that layout by its gantry angle (PA at 0 degrees: as it is; lateral at 270: columns reversed;
lateral at 90, its mirror: as it is), so published weights see what they were trained on.

CPU-sized variants (the weights then no longer load): ``width_divisor`` divides every channel width
(stem, growth rate, decoder channels), ``encoder_blocks`` sets the dense layers per level.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl

from .inputs import ModelInputError, check_two_views
from .convert import check_state_keys, read_checkpoint, unwrap_state

ENCODER_BLOCKS = (6, 12, 24, 16, 6)
VIEW_DECODER_BLOCKS = (1, 2, 2, 2, 2, 0)
FUSED_DECODER_BLOCKS = (1, 1, 1, 1, 1, 0)
DECODER_CHANNELS = (16, 16, 32, 64, 128, 256)
# X2CT-GAN's CTOrder_Xray1 / CTOrder_Xray2: the permutation that takes the CT's [B, C, D, H, W] to
# each view's [B, C, ray, rows, columns] (the view's feature volume after the 2D->3D replication)
VIEW1_ORDER = (0, 1, 3, 2, 4)
VIEW2_ORDER = (0, 1, 4, 2, 3)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=lambda i: order[i]))


EVAL_NORMS = ("per_case", "running")


class _CaseStatistics:
    """Instance norm whose evaluation mode is declared: ``per_case`` normalises each case by its own statistics
    (X2CT-GAN's ``test.py`` / ``visual.py`` put every InstanceNorm back into train mode after ``eval()``), without
    touching the running statistics; ``running`` uses the stored running statistics (plain ``eval()``)."""

    eval_norm = "per_case"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_norm == "per_case":
            return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


class CaseInstanceNorm2d(_CaseStatistics, nn.InstanceNorm2d):
    pass


class CaseInstanceNorm3d(_CaseStatistics, nn.InstanceNorm3d):
    pass


def norm2d(channels: int) -> nn.Module:
    return CaseInstanceNorm2d(channels, affine=False, track_running_stats=True)


def norm3d(channels: int) -> nn.Module:
    return CaseInstanceNorm3d(channels, affine=False, track_running_stats=True)


class DenseLayer(nn.Sequential):
    """Pre-activation bottleneck layer: norm-ReLU-1x1 conv to ``bn_size * growth``, norm-ReLU-3x3 conv to ``growth``;
    its output is concatenated to its input."""

    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.add_module("norm1", norm2d(cin))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(cin, bn_size * growth, 1))
        self.add_module("norm2", norm2d(bn_size * growth))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth, growth, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.conv_block = nn.Sequential(*(DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x)


class Link2dTo3d(nn.Module):
    """1x1 conv + norm + ReLU in 2D, replication of ``[N, C, H, W]`` to ``[N, C, H, H, W]``, 3^3 conv + norm + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.compress_block = nn.Sequential(nn.Conv2d(cin, cout, 1), norm2d(cout), nn.ReLU(inplace=True))
        self.conv_block = nn.Sequential(nn.Conv3d(cout, cout, 3, padding=1), norm3d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.compress_block(x)
        n, c, h, w = f.shape
        return self.conv_block(f.unsqueeze(2).expand(n, c, h, h, w))


class _TransposedBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1),
                                   norm3d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Upsample3d(nn.Module):
    """x2 upsampling by a 3^3 transposed convolution + norm + ReLU (their ``Upsample_3DUnit``, transposed mode)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = _TransposedBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def conv3d_unit(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1), norm3d(cout), nn.ReLU(inplace=True)]


class ViewBranch(nn.Module):
    """One view: DenseNet encoder, 2D->3D links, bottleneck and a decoder whose join (``decoder_compress_layerN``)
    is separate from the rest of the level (``decoder_layerN``), so the fused features can enter between them."""

    def __init__(self, image_size: int, stem: int, encoder_blocks: tuple[int, ...], growth: int, bn_size: int,
                 decoder_channels: tuple[int, ...], decoder_blocks: tuple[int, ...]):
        super().__init__()
        levels = len(encoder_blocks)
        self.levels = levels
        self.begin_size = image_size // 2 ** levels
        self.decoder_channels = list(decoder_channels)
        self.encoder_layer = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(1, stem, 7), norm2d(stem),
                                           nn.ReLU(inplace=True))
        widths = [stem]
        c = stem
        for i, layers in enumerate(encoder_blocks):
            mods: list[nn.Module] = [norm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, stride=2, padding=1),
                                     DenseBlock(layers, c, growth, bn_size)]
            c = c + layers * growth
            if i == levels - 1:
                mods.append(nn.AdaptiveAvgPool2d(1))
            else:
                mods += [norm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1)]
                c = c // 2
            widths.append(c)
            self.add_module(f"encoder_layer{i}", nn.Sequential(*mods))
        self.base_link = nn.Sequential(nn.Linear(widths[-1], self.begin_size ** 3 * decoder_channels[-1]),
                                       nn.Dropout(0.5), nn.ReLU(inplace=True))
        for i, cin in enumerate(widths[:-1]):
            self.add_module(f"linker_layer{i}", nn.Sequential(Link2dTo3d(cin, decoder_channels[i])))
        for i in range(levels):
            cin, cout = decoder_channels[i + 1], decoder_channels[i]
            compress: list[nn.Module] = []
            body: list[nn.Module] = []
            if i != levels - 1:
                compress = conv3d_unit(2 * cin, cin)
                for _ in range(decoder_blocks[i + 1]):
                    body += conv3d_unit(cin, cin)
            body.append(Upsample3d(cin, cout))
            self.add_module(f"decoder_compress_layer{i}", nn.Sequential(*compress))
            self.add_module(f"decoder_layer{i}", nn.Sequential(*body))
        c0 = decoder_channels[0]
        self.add_module("decoder_compress_layer-1", nn.Sequential(*conv3d_unit(2 * c0, c0)))
        body = []
        for _ in range(decoder_blocks[0]):
            body += conv3d_unit(c0, c0)
        self.add_module("decoder_layer-1", nn.Sequential(*body))
        self.decoder_layer = nn.Sequential(nn.Conv3d(c0, 1, 7, padding=3), nn.ReLU(inplace=True))

    def layer(self, name: str) -> nn.Module:
        return self._modules[name]

    def encode(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The 3D link of every level (finest first) and the bottleneck volume ``[B, C, s, s, s]``."""
        x = self.encoder_layer(image)
        links = []
        for i in range(self.levels):
            links.append(self.layer(f"linker_layer{i}")(x))
            x = self.layer(f"encoder_layer{i}")(x)
        z = self.base_link(x.flatten(1))
        s = self.begin_size
        return links, z.view(z.shape[0], self.decoder_channels[-1], s, s, s)


class X2CTGAN(nn.Module):
    """X2CT-GAN's generator: ``model(xrays [B, 2, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]``.

    Options: ``image_size`` (the views' size inside the network, a multiple of 32 and at least 64;
    default: the stage's resolution; inputs of another size are resized bilinearly, as X2CT-GAN's
    order-1 ``zoom``), ``weights`` (a generator checkpoint of the X2CT-GAN release, ``NN_net_G.pth``,
    or a plain state dict), ``view_outputs``, ``eval_norm`` (``per_case``: X2CT-GAN's test mode, default;
    ``running``), and the CPU-sized variants ``width_divisor`` and ``encoder_blocks``. The output is resized to
    the stage's ``resolution`` when it differs from ``image_size``: averaged over each output voxel's footprint
    when smaller (anti-aliased), trilinear when larger.
    """

    # one branch per fixed view of one fixed geometry (X2CT-GAN's): the angles only pick each view's layout and
    # other angles are refused, so the output does not follow a changed geometry (the contract kit's declaration)
    uses_geometry = False

    def __init__(self, *, resolution: int, image_size: int = 0, weights: str = "", view_outputs: bool = False,
                 width_divisor: int = 1, encoder_blocks: list[int] = ENCODER_BLOCKS, eval_norm: str = "per_case"):
        super().__init__()
        if eval_norm not in EVAL_NORMS:
            raise ValueError(f"eval_norm must be one of {list(EVAL_NORMS)} (per_case: X2CT-GAN's test script, each "
                             f"case normalised by its own statistics; running: the stored running statistics), "
                             f"got {eval_norm!r}")
        for key, value, low in (("resolution", resolution, 1), ("image_size", image_size, 0),
                                ("width_divisor", width_divisor, 1)):
            check_int(key, value, low)
        blocks = tuple(encoder_blocks)
        if len(blocks) != len(ENCODER_BLOCKS) or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ValueError(f"encoder_blocks must be {len(ENCODER_BLOCKS)} integers >= 1 (dense layers per "
                             f"encoder level; X2CT-GAN: {list(ENCODER_BLOCKS)}), got {list(encoder_blocks)!r}")
        size = image_size or resolution
        if size < 64 or size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and at least 64 (five stride-2 levels down to "
                             f"a 2^3 or larger bottleneck), got {size}; set model.image_size = 128 (X2CT-GAN's)")
        self.resolution, self.image_size = resolution, size
        self.keep_view_outputs = bool(view_outputs)
        self.view_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        d = width_divisor
        stem, growth = max(64 // d, 2), max(32 // d, 1)
        dec = tuple(max(c // d, 1) for c in DECODER_CHANNELS)
        self.published = d == 1 and blocks == ENCODER_BLOCKS
        branch = dict(image_size=size, stem=stem, encoder_blocks=blocks, growth=growth, bn_size=4,
                      decoder_channels=dec, decoder_blocks=VIEW_DECODER_BLOCKS)
        self.view1Model = ViewBranch(**branch)
        self.view2Model = ViewBranch(**branch)
        levels = len(blocks)
        self.levels = levels
        for i in range(levels):
            cin, cout = dec[i + 1], dec[i]
            mods: list[nn.Module] = []
            if i != levels - 1:
                mods = conv3d_unit(2 * cin, cin)
                for _ in range(FUSED_DECODER_BLOCKS[i + 1]):
                    mods += conv3d_unit(cin, cin)
            mods.append(Upsample3d(cin, cout))
            self.add_module(f"decoder_layer{i}", nn.Sequential(*mods))
        mods = conv3d_unit(2 * dec[0], dec[0])
        for _ in range(FUSED_DECODER_BLOCKS[0]):
            mods += conv3d_unit(dec[0], dec[0])
        self.add_module("decoder_layer-1", nn.Sequential(*mods))
        self.decoder_layer = nn.Sequential(nn.Conv3d(dec[0], 1, 7, padding=3), nn.ReLU(inplace=True))
        self.reset_parameters()
        self.set_eval_norm(eval_norm)
        if weights:
            self.load_state_dict(load_x2ctgan_checkpoint(weights, self))

    def set_eval_norm(self, mode: str) -> None:
        """How every instance norm behaves once ``eval()`` is called: ``per_case`` (default, X2CT-GAN's test mode)
        or ``running``. Training is unaffected; ``self.eval_norm`` declares the mode for reports and exports."""
        if mode not in EVAL_NORMS:
            raise ValueError(f"eval_norm must be one of {list(EVAL_NORMS)}, got {mode!r}")
        self.eval_norm = mode
        for m in self.modules():
            if isinstance(m, _CaseStatistics):
                m.eval_norm = mode

    def reset_parameters(self) -> None:
        """X2CT-GAN's ``init_weights('normal')``: convolution and linear weights N(0, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def layer(self, name: str) -> nn.Module:
        return self._modules[name]

    # ---- layout -----------------------------------------------------------------------------------------
    @staticmethod
    def _view_flips(geometry: dict, index: int) -> list[int]:
        """Image axes (of ``[B, 1, H, W]``) to reverse so that view ``index`` looks like X2CT-GAN's stored image."""
        angles = torch.as_tensor(geometry["angles"])[:, index].detach()
        if isinstance(angles, FakeTensor):  # shapes only (FLOP counting): flips do not change them
            return [] if index == 0 else [3]
        angles = angles.double().cpu() % 360.0
        if not torch.allclose(angles, angles[:1].expand_as(angles), atol=1e-3):
            raise ModelInputError(f"x2ctgan: view {index + 1} has different gantry angles across the batch "
                                  f"({angles.tolist()}); the network has one branch per fixed view")
        a = float(angles[0])

        def near(target: float) -> bool:
            return min(abs(a - target), 360.0 - abs(a - target)) < 1e-3

        if index == 0 and near(0.0):
            return []
        if index == 1 and near(270.0):
            return [3]
        if index == 1 and near(90.0):
            return []
        wanted = "a PA view at 0 degrees" if index == 0 else "a lateral view at 270 (X2CT-GAN's) or 90 degrees"
        raise ModelInputError(f"x2ctgan: view {index + 1} is at {a:g} degrees; X2CT-GAN's generator takes {wanted} "
                              f"(set data.views = [0, 270])")

    def _prepare(self, image: torch.Tensor, flips: list[int]) -> torch.Tensor:
        if flips:
            image = image.flip(flips)
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        return image

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        check_two_views("x2ctgan", "X2CT-GAN's generator", xrays, geometry, prev, "vit_cascade")
        b1, b2 = self.view1Model, self.view2Model
        links1, z1 = b1.encode(self._prepare(xrays[:, 0], self._view_flips(geometry, 0)))
        links2, z2 = b2.encode(self._prepare(xrays[:, 1], self._view_flips(geometry, 1)))
        to_ct1, to_ct2 = _inverse(VIEW1_ORDER), _inverse(VIEW2_ORDER)
        fused = None
        for i in range(self.levels - 1, -2, -1):
            if i == self.levels - 1:
                z1, z2 = b1.layer(f"decoder_compress_layer{i}")(z1), b2.layer(f"decoder_compress_layer{i}")(z2)
            else:
                z1 = b1.layer(f"decoder_compress_layer{i}")(torch.cat((z1, links1[i + 1]), 1))
                z2 = b2.layer(f"decoder_compress_layer{i}")(torch.cat((z2, links2[i + 1]), 1))
            avg = (z1.permute(*to_ct1) + z2.permute(*to_ct2)) / 2
            z1, z2 = avg.permute(*VIEW1_ORDER), avg.permute(*VIEW2_ORDER)
            fused = self.layer(f"decoder_layer{i}")(avg if fused is None else torch.cat((avg, fused), 1))
            if i >= 0 or self.keep_view_outputs:
                z1, z2 = b1.layer(f"decoder_layer{i}")(z1), b2.layer(f"decoder_layer{i}")(z2)
        if self.keep_view_outputs:
            self.view_outputs = (b1.decoder_layer(z1).permute(*to_ct1), b2.decoder_layer(z2).permute(*to_ct2))
        out = self.decoder_layer(fused)  # X2CT-GAN's CT has the head at slice 0, as the framework's
        if out.shape[-1] > self.resolution:  # smaller stage: average over each output voxel's footprint (no aliasing)
            out = F.adaptive_avg_pool3d(out, (self.resolution,) * 3)
        elif out.shape[-1] < self.resolution:
            out = F.interpolate(out, size=(self.resolution,) * 3, mode="trilinear", align_corners=True)
        return out


def load_x2ctgan_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The generator state dict from an X2CT-GAN checkpoint file, checked against ``model`` when given.

    X2CT-GAN saves ``{'iters', 'epoch', 'state_dict', 'lr'}`` with ``torch.save`` as
    ``checkpoint/<epoch>/<epoch>_net_G.pth``; a bare state dict is accepted too, and a ``module.``
    prefix (DataParallel) is removed. Checkpoints from before PyTorch 0.4.1 lack the instance norms'
    ``num_batches_tracked``; those are filled in.
    """
    path = Path(path).expanduser()
    blob = read_checkpoint(
        path, f"{path}: X2CT-GAN generator checkpoint not found (model.weights of x2ctgan). Download the X2CT-GAN "
              f"release (kylekma/X2CT, 'trained models') and point model.weights at "
              f"save_models/multiView_CTGAN/LIDC256/d2_multiview2500/checkpoint/90/90_net_G.pth")
    state = unwrap_state(blob, path, "X2CT-GAN's checkpoint dict with a 'state_dict' of tensors (or a bare state "
                         "dict)", wrappers=("state_dict",), allow_empty=True)
    if model is None:
        return state
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    check_state_keys(state, own, path, "an X2CT-GAN multiview generator", lambda *_: "" if getattr(
        model, "published", True) else (" (the model is a CPU-sized variant: remove width_divisor / encoder_blocks to "
                                         "load published weights)"))
    return state


def convert_checkpoint(source: str | Path, folder: str | Path, stage: str = "x2ctgan", **model_options) -> Path:
    """Write X2CT-GAN's generator checkpoint as a framework checkpoint folder (``model.safetensors``), so that
    ``x2ct evaluate FOLDER --recipe recipes/benchmarks/x2ctgan_lidc.toml`` scores their published weights."""
    from x2ct_framework.checkpoint import save_checkpoint

    model = X2CTGAN(**{"resolution": 128, **model_options})  # the published sizes unless told otherwise
    state = load_x2ctgan_checkpoint(source, model)
    return save_checkpoint(folder, state, {"stage": stage, "source": str(source), "model": "x2ctgan"})


def main(argv: list[str] | None = None) -> int:
    from .convert import converter_main

    return converter_main(argv, name="x2ctgan", what="X2CT-GAN's generator checkpoint (NN_net_G.pth)",
                          source_help="their generator checkpoint, e.g. .../checkpoint/90/90_net_G.pth",
                          stage="x2ctgan", convert=convert_checkpoint)

@hookimpl
def register_models(register):
    register("x2ctgan", X2CTGAN)


if __name__ == "__main__":
    raise SystemExit(main())

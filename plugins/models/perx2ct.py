"""``perx2ct``: PerX2CT (Kyung et al., "Perspective Projection-Based 3D CT Reconstruction from Biplanar X-rays",
ICASSP 2023; dek924/PerX2CT), layer for layer and weight-compatible.

The network of ``configs/PerX2CT.yaml`` in dek924/PerX2CT (``INRAEZoomModel``), rebuilt with the same module tree
so that its released checkpoint (``PerX2CT.ckpt``, a PyTorch Lightning checkpoint) loads through the converter
(``weights`` option):

- ``encoder.network_fn.cond_encoder.model``: torchvision's ResNet-101 (ImageNet weights when trained from scratch)
  cut after ``layer2`` (``layer3``, ``layer4``, ``avgpool`` and ``fc`` removed), shared by both views. A view in
  [0, 1] is repeated to three channels and normalised with ImageNet's mean and standard deviation; ``conv1`` and
  ``bn1`` are frozen when the ImageNet weights are used (their ``encoder_freeze_layer = layer1``). ``layer2``
  gives 512 channels at 1/8 of the input (16^2 for their 128^2 views), which is their ``latent_dim``, so no
  projection follows (another ``latent_dim`` adds their 3x3 ``conv2`` + ``bn2`` + ReLU);
- every output slice is decoded from a coarse grid of 3D points (``R / 4`` per side: the centres of 4 x 4 voxel
  blocks of the slice). Each point is projected into each view by PerX2CT's camera: a pinhole one volume side
  from the isocentre (the volume spans [-1/2, 1/2]^3), field of view 60 degrees, the PA camera on the +H side and
  the lateral camera on the +W side; the view's feature map is sampled there (bilinear, corners aligned, zeros
  outside). The point's positional encoding (the point itself, then sin and cos at frequencies 2^0 .. 2^9: 63
  values) and the two views' features (2 x 512) make a 1087-channel map of the slice (their ``DummyNeRF`` maps
  1087 to 1087 channels and so is the identity; ``encoder.axis_emb`` is their slice-axis embedding of width 0);
- ``decoder``: taming-transformers' ``Decoder`` (the VQGAN decoder): a 3x3 convolution 1087 -> 512, a middle of
  two ResNet blocks around a self-attention block, three levels of three ResNet blocks (512, 256, 128 channels,
  self-attention after each block at the coarsest level) with nearest x2 upsampling and a 3x3 convolution
  between them, GroupNorm(32) + swish + a 3x3 convolution to 3 channels, no output activation. Their evaluation
  reads channel 1 (``x_rec[:, 1:2]``); so does this model.

At their configuration (two 128^2 views, 128^3) the generator has 42,555,715 parameters (1,444,928 in the
ResNet, 41,110,787 in the decoder) in 287 state-dict entries, as their code builds it. Their checkpoint also
holds their training loss's modules (``loss.*``: LPIPS's VGG16 and a PatchGAN discriminator whose weight is 0);
the converter drops them.

Layout: PerX2CT's data are X2CT-GAN's (Plastimatch, ``2_xraypro.py``, with a 700 mm source-axis distance: the
``perx2ct`` preset): the CT ``[d0, d1, d2]`` is the framework's ``[D, H, W]``, their PA input is the stored
``xray1`` mirrored back (the view at 0 degrees, columns reversed) and their lateral input is the stored ``xray2``
transposed and turned upside down (the view at 270 degrees, transposed). The model turns each detector-frame view
into that layout by its gantry angle; a lateral at 90 degrees is mirrored to stand in for 270 (exact for a
parallel beam). Their camera is fixed (it does not read the recipe's distances), as in their code: at the
isocentre plane it covers 2 tan(30 deg) = 1.155 volume sides (369.5 mm for their 320 mm CT), as the 700 / 949 mm
DRRs cover 368.8 mm, but its source is 1 volume side (320 mm) away instead of 700 mm (docs/models.md).

Output volume: PerX2CT decodes 2D slices, every slice alone; ``slice_axis`` picks the slices that make the volume
(``axial``: along D, the default here; ``coronal``: along H; ``sagittal``: along W). Their test script
reconstructs each axis's slices and scores each stack against the CT separately.

CPU-sized variants (their weights then no longer load): ``backbone`` (any torchvision ResNet), ``latent_dim``,
``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``multires``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from x2ct_framework.errors import CheckpointError, check_int
from x2ct_framework.hookspecs import hookimpl

from .inputs import ModelInputError, check_two_views, maybe_checkpoint
from .convert import check_state_keys, read_checkpoint, unwrap_state

SLICE_AXES = ("axial", "coronal", "sagittal")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# their dataset's camera poses (pitch, yaw) in radians: x2ct_nerf/data/base.py, mapping_camera_type2pose
PA_POSE = (0.0, 0.0)
LATERAL_POSE = (math.pi / 2, math.pi / 2)


# ---- the image encoder ------------------------------------------------------------------------------------------
def _resnet_url(backbone: str) -> str:
    import torchvision.models as tvm

    enum = getattr(tvm, {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
                         "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights"}[backbone])
    return enum.IMAGENET1K_V1.url  # torchvision's `pretrained=True` weights, as their torchvision 0.9 loads them


class CondEncoder(nn.Module):
    """Their ``ResNetEncoder``: a torchvision ResNet up to ``feature_layer`` (``model.*``), then, when its width is
    not ``latent_dim``, a 3x3 convolution without bias, batch norm and ReLU (``conv2``, ``bn2``)."""

    LAYERS = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, backbone: str, latent_dim: int, feature_layer: str, pretrained: str):
        super().__init__()
        import torchvision.models as tvm

        if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            raise ValueError(f"backbone must be a torchvision ResNet (PerX2CT: resnet101), got {backbone!r}")
        if feature_layer not in self.LAYERS:
            raise ValueError(f"feature_layer must be one of {list(self.LAYERS)} (PerX2CT: layer2), "
                             f"got {feature_layer!r}")
        device = torch.empty(0).device  # the default device (meta when only shapes are wanted)
        with torch.device("meta"):  # built without storage, cut, then given storage: the cut layers cost nothing
            self.model = getattr(tvm, backbone)(weights=None)
        del self.model.fc, self.model.avgpool
        self.feature_layer = feature_layer
        for name in self.LAYERS[self.LAYERS.index(feature_layer) + 1:]:
            delattr(self.model, name)
        if device.type != "meta":
            self.model.to_empty(device=device)
            for m in self.model.modules():  # torchvision's ResNet initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                    m.reset_running_stats()
        if pretrained != "random":
            from x2ct_plugins.losses.vgg import load_torchvision_state

            state = load_torchvision_state(pretrained, _resnet_url(backbone), f"perx2ct {backbone} ImageNet weights",
                                           option="pretrained", where="the recipe's [model] table")
            own = self.model.state_dict()
            missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
            if missing:
                raise CheckpointError(f"model.pretrained = {pretrained!r} is not a torchvision {backbone} state dict: "
                                      f"{len(missing)} entries missing or of another shape ({', '.join(missing[:4])})")
            self.model.load_state_dict({k: state[k] for k in own})  # layer3, layer4, fc: cut, as theirs
        last = getattr(self.model, feature_layer)[-1]
        width = [m for n, m in last.named_modules() if n.startswith("conv")][-1].out_channels
        self.project = width != latent_dim
        if self.project:
            self.conv2 = nn.Conv2d(width, latent_dim, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(latent_dim)
            self.relu = nn.ReLU()
        if pretrained != "random":  # their encoder_freeze_layer = "layer1": everything before layer1 is frozen
            for name, p in self.model.named_parameters():
                if "layer1" in name:
                    break
                p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.output_ch = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 1 or 3, H, W]`` in [0, 1] -> ``[B, latent_dim, H / 8, W / 8]`` (at ``layer2``)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for name in self.LAYERS:
            x = getattr(m, name)(x)
            if name == self.feature_layer:
                break
        if self.project:
            x = self.relu(self.bn2(self.conv2(x)))
        return x.float()


def camera_world2cam(pitch: float, yaw: float) -> torch.Tensor:
    """PerX2CT's input camera for a pose ``(pitch, yaw)``: its position on the unit sphere (pitch clamped away from
    the poles by 1e-5, a zero first coordinate replaced by 1e-5, as theirs), looking at the origin, world "up" along
    the second axis; ``[4, 4]`` world -> camera, computed in float32 step by step as theirs (their lateral pose's
    cos(pi / 2) is -4.4e-8 in float32, not 0)."""
    f32 = dict(dtype=torch.float32, device="cpu")
    phi = torch.tensor(pitch, **f32).clamp(1e-5, math.pi - 1e-5)
    theta = torch.tensor(yaw, **f32)
    origin = torch.stack([torch.sin(phi) * torch.cos(theta), torch.cos(phi), torch.sin(phi) * torch.sin(theta)])
    if origin[0] == 0:
        origin[0] = 1e-5

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True)

    forward = unit(-origin)
    left = unit(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], **f32), forward))
    up = unit(torch.linalg.cross(forward, left))
    rotation, translation = torch.eye(4, **f32), torch.eye(4, **f32)
    rotation[:3, :3] = torch.stack((-left, up, -forward), -1)  # camera axes as columns
    translation[:3, 3] = origin
    return torch.inverse(translation @ rotation)


def perspective_grid(points: torch.Tensor, world2cam: torch.Tensor, fov_deg: float) -> torch.Tensor:
    """Their ``convert_feature_from2d_to3d``'s projection: ``points [B, N, 3]`` (the volume in [-1/2, 1/2]^3) ->
    ``grid_sample`` coordinates ``[B, N, 2]`` (x along columns, y along rows, corners aligned)."""
    m = world2cam.to(points)
    cam = points @ m[:3, :3].T + m[:3, 3]
    uv = -cam[..., :2] / cam[..., 2:3]
    xy = uv / math.tan(math.radians(fov_deg) / 2)
    return torch.stack([xy[..., 0], -xy[..., 1]], -1)


def positional_encoding(x: torch.Tensor, multires: int) -> torch.Tensor:
    """NeRF's encoding as theirs: ``[x, sin(x f_0), cos(x f_0), ..., sin(x f_{L-1}), cos(x f_{L-1})]``,
    ``f_k = 2^k`` (``2 ** linspace(0, L - 1, L)``)."""
    out = [x]
    for freq in 2.0 ** torch.linspace(0.0, multires - 1, multires):
        out += [torch.sin(x * freq), torch.cos(x * freq)]
    return torch.cat(out, -1)


class DummyNeRF(nn.Module):
    """Their ``DummyNeRF``: a linear map when the widths differ, else the identity (PerX2CT: 1087 -> 1087)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        if cin != cout:
            self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if hasattr(self, "linear") else x


class PerspectiveINRNet(nn.Module):
    def __init__(self, cond_encoder: CondEncoder, nerf: DummyNeRF):
        super().__init__()
        self.cond_encoder, self.nerf = cond_encoder, nerf


class INREncoder(nn.Module):
    """Their ``INREncoderZoomAxisInAlign`` at test time (no zoom): slice points -> ``[B, z_channels, F, F]``."""

    def __init__(self, cond_encoder: CondEncoder, views: int, multires: int, axis_emb_dim: int):
        super().__init__()
        self.multires, self.axis_emb_dim = multires, axis_emb_dim
        cin = 3 + 6 * multires + axis_emb_dim + views * cond_encoder.output_ch
        self.z_channels = 3 + 6 * multires + views * cond_encoder.output_ch
        self.network_fn = PerspectiveINRNet(cond_encoder, DummyNeRF(cin, self.z_channels))
        self.axis_emb = nn.Embedding(3, axis_emb_dim)  # sagittal, coronal, axial

    def forward(self, points: torch.Tensor, axis: int, view_feats: list[torch.Tensor],
                world2cams: list[torch.Tensor], fov: float, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``points [B, F*F, 3]`` (rows first) of one slice per case, ``view_feats`` per view ``[B, C, h, w]``."""
        b, n, _ = points.shape
        latent = [F.grid_sample(f, perspective_grid(points, m, fov).unsqueeze(2), mode="bilinear",
                                padding_mode="zeros", align_corners=True)[..., 0].transpose(1, 2)
                  for f, m in zip(view_feats, world2cams)]
        emb = self.axis_emb(torch.full((b, n), axis, dtype=torch.long, device=points.device))
        x = torch.cat([positional_encoding(points, self.multires), emb, *latent], -1)
        out = self.network_fn.nerf(x)
        return out.transpose(1, 2).reshape(b, -1, *grid_hw)


# ---- taming-transformers' Decoder (VQGAN) ------------------------------------------------------------------------
def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.dropout = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels with 1x1 convolutions ``q``, ``k``, ``v``, ``proj_out``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * int(c) ** -0.5, 2)  # [b, query, key]
        out = torch.bmm(v, w.transpose(1, 2))  # the same products in the same order as theirs
        return x + self.proj_out(out.reshape(b, c, hh, ww))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming-transformers' ``Decoder`` (``taming/modules/diffusionmodules/model.py``), ``resamp_with_conv``."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, dropout: float = 0.0):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ---- the model ---------------------------------------------------------------------------------------------------
class PerX2CT(nn.Module):
    """PerX2CT: ``model(xrays [B, 2, 1, H, W], geometry, prev=None) -> [B, 1, R, R, R]`` (PA at 0 degrees, lateral at
    270 or 90).

    Options: ``slice_axis`` ("axial", "coronal", "sagittal": the slices decoded to make the volume), ``weights``
    (their ``PerX2CT.ckpt``), ``pretrained`` ("imagenet": torchvision's ResNet weights from its cache, as their
    training starts; "random"; or a path to a torchvision ResNet state dict; unused when ``weights`` is given),
    ``image_size`` (views resized to it, their 128), ``fov`` (60), ``slice_chunk`` (slices decoded at once, each
    chunk recomputed in the backward pass when ``gradient_checkpointing``), and the CPU-sized variants
    ``backbone``, ``latent_dim``, ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``decoder_resolution``, ``multires``, ``axis_emb_dim``.
    """

    # their camera is fixed (two poses, one volume side away, 60 degrees): the angles only pick each view's layout
    uses_geometry = False

    def __init__(self, *, resolution: int, slice_axis: str = "axial", weights: str = "", pretrained: str = "imagenet",
                 image_size: int = 128, fov: float = 60.0, slice_chunk: int = 16, gradient_checkpointing: bool = False,
                 backbone: str = "resnet101", feature_layer: str = "layer2", latent_dim: int = 512, ch: int = 128,
                 ch_mult: list[int] = (1, 2, 4), num_res_blocks: int = 2, attn_resolutions: list[int] = (32,),
                 decoder_resolution: int = 128, multires: int = 10, axis_emb_dim: int = 0):
        super().__init__()
        if slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {list(SLICE_AXES)} (the slices PerX2CT decodes to make the "
                             f"volume; the default here: axial), got {slice_axis!r}")
        for key, value, low in (("resolution", resolution, 1), ("image_size", image_size, 8),
                                ("slice_chunk", slice_chunk, 1), ("latent_dim", latent_dim, 1), ("ch", ch, 32),
                                ("num_res_blocks", num_res_blocks, 0), ("decoder_resolution", decoder_resolution, 1),
                                ("multires", multires, 0), ("axis_emb_dim", axis_emb_dim, 0)):
            check_int(key, value, low)
        mult = tuple(int(m) for m in ch_mult)
        if not mult or any(m < 1 or (ch * m) % 32 for m in mult):
            raise ValueError(f"ch_mult must be positive and ch * m a multiple of 32 (GroupNorm of 32 groups); "
                             f"PerX2CT: ch = 128, ch_mult = [1, 2, 4]; got ch = {ch}, ch_mult = {list(ch_mult)}")
        self.up_factor = 2 ** (len(mult) - 1)
        if resolution % self.up_factor:
            raise ValueError(f"resolution {resolution} must be a multiple of {self.up_factor} (the decoder upsamples "
                             f"each slice's {resolution // self.up_factor or 1}^2 point grid {self.up_factor}x)")
        if not 0 < fov < 180:
            raise ValueError(f"fov must be in (0, 180) degrees (PerX2CT: 60), got {fov}")
        if pretrained not in ("imagenet", "random") and not weights and not Path(pretrained).expanduser().is_file():
            raise CheckpointError(f"model.pretrained = {pretrained!r}: no such file; use \"imagenet\" (torchvision's "
                                  f"cache), \"random\", or a path to a torchvision {backbone} state dict")
        self.resolution, self.slice_axis, self.image_size = resolution, slice_axis, image_size
        self.fov, self.slice_chunk = float(fov), slice_chunk
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.published = (backbone, feature_layer, latent_dim, ch, mult, num_res_blocks, tuple(attn_resolutions),
                          decoder_resolution, multires, axis_emb_dim) == (
                              "resnet101", "layer2", 512, 128, (1, 2, 4), 2, (32,), 128, 10, 0)
        cond = CondEncoder(backbone, latent_dim, feature_layer, "random" if weights else pretrained)
        self.encoder = INREncoder(cond, 2, multires, axis_emb_dim)
        self.decoder = Decoder(ch=ch, out_ch=3, ch_mult=mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=tuple(int(a) for a in attn_resolutions), resolution=decoder_resolution,
                               z_channels=self.encoder.z_channels)
        self.register_buffer("pa_cam", camera_world2cam(*PA_POSE).float(), persistent=False)
        self.register_buffer("lateral_cam", camera_world2cam(*LATERAL_POSE).float(), persistent=False)
        if weights:
            self.load_state_dict(load_perx2ct_checkpoint(weights, self))

    # ---- layout ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _lateral_mirrored(geometry: dict) -> bool:
        """Check the views' angles (PA at 0, lateral at 270 or 90); True when the lateral is at 90 (mirrored)."""
        angles = torch.as_tensor(geometry["angles"]).detach()
        if isinstance(angles, FakeTensor):
            return False
        angles = angles.double().cpu() % 360.0

        def near(a: torch.Tensor, target: float) -> bool:
            d = (a - target).abs()
            return bool(torch.minimum(d, 360.0 - d).max() < 1e-3)

        if not near(angles[:, 0], 0.0):
            raise ModelInputError(f"perx2ct: view 1 is at {angles[:, 0].tolist()} degrees; PerX2CT's first view is the "
                                  f"PA at 0 degrees (set data.views = [0, 270])")
        if near(angles[:, 1], 270.0):
            return False
        if near(angles[:, 1], 90.0):
            return True
        raise ModelInputError(f"perx2ct: view 2 is at {angles[:, 1].tolist()} degrees; PerX2CT's second view is the "
                              f"lateral at 270 degrees (their data) or 90 (set data.views = [0, 270])")

    def their_views(self, xrays: torch.Tensor, geometry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Detector-frame views ``[B, 2, 1, H, W]`` -> PerX2CT's PA and lateral inputs ``[B, 1, S, S]``: the PA with
        its columns reversed, the lateral (the view from 270 degrees) transposed."""
        pa, lat = xrays[:, 0], xrays[:, 1]
        if self._lateral_mirrored(geometry):
            lat = lat.flip(-1)
        pa, lat = pa.flip(-1), lat.transpose(-1, -2)
        out = []
        for x in (pa, lat):
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > self.image_size)
            out.append(x)
        return out[0], out[1]

    def slice_points(self, axis: str, index: torch.Tensor, device) -> torch.Tensor:
        """PerX2CT's points of slices ``index [S]`` along ``axis``: ``[S, F*F, 3]`` in [-1/2, 1/2]^3 (their world:
        axes D, H, W), the centres of ``up_factor``^2 voxel blocks, rows first."""
        r, step = self.resolution, self.up_factor
        f = r // step
        # their arithmetic, in float32: voxel index i -> (i - (R - 1) / 2) / R, every step-th index shifted to its
        # block's centre by ((w[step] - w[0]) * (step - 1) / step) / 2
        world = (torch.linspace(0, r - 1, r, device=device) - (r - 1) / 2) / r
        grid = world[::step] + ((world[min(step, r - 1)] - world[0]) * (step - 1) / step) / 2 if step > 1 else world
        rows, cols = torch.meshgrid(grid, grid, indexing="ij")
        s = world[index.to(device)][:, None].expand(-1, f * f)
        rows, cols = rows.reshape(1, -1).expand_as(s), cols.reshape(1, -1).expand_as(s)
        coords = {"axial": (s, rows, cols), "coronal": (rows, s, cols), "sagittal": (rows, cols, s)}[axis]
        return torch.stack(coords, -1)

    def decode_slices(self, feats: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, axis: str) -> torch.Tensor:
        """Slices ``index [S]`` along ``axis`` of every case: ``[B, S, R, R]`` (channel 1 of their decoder)."""
        b, s = feats[0].shape[0], index.numel()
        points = self.slice_points(axis, index, feats[0].device)  # S, N, 3
        points = points.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * s, -1, 3)
        per = [f.repeat_interleave(s, 0) for f in feats]
        f = self.resolution // self.up_factor
        z = self.encoder(points, SLICE_AXES[::-1].index(axis), per, [self.pa_cam, self.lateral_cam], self.fov, (f, f))
        dec = self.decoder(z)
        return dec[:, 1].reshape(b, s, *dec.shape[-2:])

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        check_two_views("perx2ct", "PerX2CT", xrays, geometry, prev, "difnet / vit_cascade")
        pa, lat = self.their_views(xrays, geometry)
        cond = self.encoder.network_fn.cond_encoder
        feats = (cond(pa), cond(lat))
        r = self.resolution
        chunks = []
        for start in range(0, r, self.slice_chunk):
            index = torch.arange(start, min(start + self.slice_chunk, r))
            chunks.append(maybe_checkpoint(self.gradient_checkpointing,
                                           lambda a, b, i=index: self.decode_slices((a, b), i, self.slice_axis),
                                           *feats))
        slices = torch.cat(chunks, 1)  # B, R (slice index), rows, cols
        if slices.shape[-1] != r:
            raise ModelInputError(f"perx2ct: the decoder gave {slices.shape[-1]}^2 slices for resolution {r}")
        vol = {"axial": slices, "coronal": slices.permute(0, 2, 1, 3), "sagittal": slices.permute(0, 2, 3, 1)}
        return vol[self.slice_axis].unsqueeze(1)


# ---- their checkpoint --------------------------------------------------------------------------------------------
def load_perx2ct_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The generator's state dict of a PerX2CT checkpoint (their ``PerX2CT.ckpt``: a PyTorch Lightning checkpoint whose
    ``state_dict`` holds ``encoder.*``, ``decoder.*`` and their training loss's ``loss.*``; a bare state dict is
    accepted too). ``loss.*`` (LPIPS and the discriminator, training only) is dropped; the rest is checked against
    ``model`` when given, naming missing, unexpected and reshaped keys."""
    path = Path(path).expanduser()
    blob = read_checkpoint(
        path, f"{path}: PerX2CT checkpoint not found (model.weights of perx2ct). Download PerX2CT.ckpt from the "
              f"pretrained-weights link of dek924/PerX2CT's README (a Google Drive folder) on a machine that is online "
              f"and put it at {path.absolute()}, or point model.weights at where it is",
        "; PerX2CT's PerX2CT.ckpt is a PyTorch Lightning checkpoint with a 'state_dict'")
    state = unwrap_state(blob, path, "PerX2CT's state dict (tensors keyed encoder.*, decoder.*)")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if model is None:
        return state
    own = model.state_dict()
    check_state_keys(state, own, path, "a PerX2CT checkpoint", lambda *_: "" if getattr(model, "published", True) else (
        " (the model is a CPU-sized variant: remove backbone / latent_dim / ch / ch_mult / num_res_blocks / "
        "attn_resolutions / multires from the recipe)"))
    return state


def convert_checkpoint(source: str | Path, folder: str | Path, stage: str = "perx2ct", **model_options) -> Path:
    """Write PerX2CT's checkpoint as a framework checkpoint folder (``model.safetensors``) for ``x2ct evaluate``.
    Without options the model is theirs (``configs/PerX2CT.yaml``, 128^3)."""
    from x2ct_framework.checkpoint import save_checkpoint

    options = {"resolution": 128, "pretrained": "random", **model_options}
    with torch.device("meta"):
        model = PerX2CT(**options)
    state = load_perx2ct_checkpoint(source, model)
    return save_checkpoint(folder, state, {"stage": stage, "source": str(source), "model": "perx2ct"})


def main(argv: list[str] | None = None) -> int:
    from .convert import converter_main

    return converter_main(argv, name="perx2ct", what="PerX2CT's checkpoint (PerX2CT.ckpt)",
                          source_help="their checkpoint, e.g. checkpoints/PerX2CT.ckpt", stage="perx2ct",
                          convert=convert_checkpoint)

@hookimpl
def register_models(register):
    register("perx2ct", PerX2CT)


if __name__ == "__main__":
    raise SystemExit(main())

"""``lpips``: learned perceptual distance (the lpips package) on 2.5D slices of the volumes.

The volumes are cut into a few slices along each of the three axes (as in ``vgg``); each grey slice
is repeated to three channels, mapped from [0, 1] to [-1, 1] and compared by ``lpips.LPIPS``; the
loss is the mean distance over slices and cases. The same 2.5D LPIPS is the usual evaluation
metric of X-ray-to-CT papers.

Weights: LPIPS' calibrated linear layers ship inside the lpips package (always used). The backbone
(``net = "alex"`` or ``"vgg"``) comes from ``weights``:
- ``"imagenet"`` (default): torchvision's cache, ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth``
  or ``vgg16-397923af.pth`` (``~/.cache/torch/hub/checkpoints/`` unless ``TORCH_HOME`` is set),
  downloaded there when online; offline and absent, the error names the file and where to put it;
- a path to a torchvision state dict of that backbone (``features.N.weight`` keys);
- ``"random"``: a random backbone, only when asked for explicitly (tests).

Recipe::

    losses = { lpips = { weight = 0.1, net = "alex", slices = 3 } }

This module is named ``lpips_loss`` so that it does not shadow the ``lpips`` package.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import CheckpointError, check_int
from x2ct_framework.hookspecs import hookimpl
from x2ct_plugins.losses.vgg import VGG16_URL, SliceSampler, load_torchvision_state, parse_slices

BACKBONES = {"alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "vgg": VGG16_URL}


def load_backbone(module: nn.Module, net: str, weights: str) -> None:
    """Load torchvision ``features.N.*`` weights into an ``lpips.LPIPS`` module's backbone (``net.sliceK.N.*``)."""
    state = load_torchvision_state(weights, BACKBONES[net], f"lpips loss ({net} backbone)")
    if state is None:
        return
    own = module.net.state_dict()
    picked, missing = {}, []
    for key, value in own.items():
        _, index, param = key.split(".", 2)  # sliceK.N.weight
        source = state.get(f"features.{index}.{param}")
        if source is None or source.shape != value.shape:
            missing.append(f"features.{index}.{param}")
        else:
            picked[key] = source
    if missing:
        raise CheckpointError(f"lpips loss: weights {weights!r} are not a torchvision {net} state dict "
                              f"(missing or mis-shaped: {missing[:3]})")
    module.net.load_state_dict(picked)


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between 2.5D slices of ``pred`` and ``target`` (values in [0, 1]).

    Options: ``net`` "alex" or "vgg"; ``slices`` per axis (int or [D, H, W]); ``min_size``: slices
    whose shorter side is smaller are upsampled (bilinear) to it, since AlexNet needs about 32 pixels
    or more; ``weights`` "imagenet", a file path or "random" (see the module docstring);
    ``random_slices`` and ``display_window`` (HU) as ``vgg.SliceSampler`` says; ``hu_window`` from the data.
    """

    def __init__(self, net: str = "alex", slices: int | list[int] = 3, min_size: int = 64,
                 weights: str = "imagenet", random_slices: bool = False, display_window: list[float] = (),
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"net: unknown LPIPS backbone {net!r}; choose from {', '.join(map(repr, BACKBONES))}")
        check_int("min_size", min_size, 0)
        if not isinstance(weights, str) or not weights:
            raise ValueError(f"weights must be \"imagenet\", \"random\" or a file path, got {weights!r}")
        import lpips

        self.counts = parse_slices(slices)
        self.sampler = SliceSampler(self.counts, random_slices, display_window, hu_window)
        self.min_size = min_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" from inside lpips
            self.lpips = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        load_backbone(self.lpips, net, weights)
        for p in self.lpips.parameters():
            p.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.lpips.eval()  # fixed network, dropout off
        return self

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        short = min(images.shape[-2:])
        if not self.min_size or short >= self.min_size:
            return images
        scale = self.min_size / short
        size = [max(self.min_size, round(s * scale)) for s in images.shape[-2:]]
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.dim() != 5 or pred.shape != target.shape or pred.shape[1] != 1:
            raise ValueError(f"lpips loss expects pred and target [B, 1, D, H, W] of the same shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        values = []
        for sp, st in self.sampler.pairs(pred, target, self.training):
            sp, st = self._resize(sp), self._resize(st.detach())
            d = self.lpips(sp.expand(-1, 3, -1, -1), st.expand(-1, 3, -1, -1), normalize=True)
            values.append(d.flatten())
        return torch.cat(values).mean()


@hookimpl
def register_losses(register):
    register("lpips", LPIPSLoss)

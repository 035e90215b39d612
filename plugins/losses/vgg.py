"""``vgg``: 2.5D perceptual loss, distances between VGG16 features of CT slices.

The user's plan's stage-2 term ``0.1 * VGG`` ("texture preservation"). VGG16 sees 2D RGB images, so the
volumes are cut into a few slices along each of the three axes (2.5D); each grey slice is repeated
to three channels, normalised with the ImageNet mean and std, and passed through VGG16's
convolutional layers up to the deepest chosen layer. The loss is the mean over the chosen layers of
the L1 (or L2) distance between the features of the predicted and the target slices.

Weights (``weights``):
- ``"imagenet"`` (default): torchvision's ImageNet VGG16, read from torchvision's standard cache
  ``<torch hub dir>/checkpoints/vgg16-397923af.pth`` (``~/.cache/torch/hub/checkpoints/`` unless
  ``TORCH_HOME`` is set) and downloaded there when the machine is online. Offline and absent, the
  error names that file and the URL to fetch it from;
- a path to a ``.pth``/``.pt``/``.safetensors`` file holding a torchvision VGG16 state dict
  (``features.N.weight`` keys; absolute or relative to the working directory);
- ``"random"``: random initialisation, only when asked for explicitly (tests, benchmarks).

Recipe::

    losses = { vgg = 0.1 }
    losses = { vgg = { weight = 0.1, layers = ["relu2_2", "relu3_3"], slices = [4, 4, 4] } }
    losses = { vgg = { weight = 0.1, random_slices = true, display_window = [-1000, 1000] } }

The weight helpers here (``slices_25d``, ``load_torchvision_state``) are shared with ``lpips``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import CheckpointError
from x2ct_framework.hookspecs import hookimpl

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# index of each ReLU in torchvision's vgg16().features
VGG16_LAYERS = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27, "relu5_3": 29,
}
DISTANCES = ("l1", "l2")


def parse_slices(slices: int | list[int]) -> tuple[int, int, int]:
    """Slices per axis (D, H, W) from an int (same for every axis) or a list of three ints."""
    counts = [slices] * 3 if isinstance(slices, int) and not isinstance(slices, bool) else list(slices)
    if len(counts) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise ValueError(f"slices must be an integer >= 0 or a list of three such integers (D, H, W), got {slices!r}")
    if sum(counts) == 0:
        raise ValueError("slices: at least one axis needs one slice or more")
    return counts[0], counts[1], counts[2]


def slice_positions(size: int, n: int) -> list[int]:
    """``n`` evenly spaced slice indices at the centres of ``n`` equal bins of ``size``."""
    return [min(size - 1, int((i + 0.5) * size / n)) for i in range(n)]


def random_positions(size: int, n: int) -> list[int]:
    """``n`` slice indices, one drawn uniformly in each of ``n`` equal bins of ``size`` (stratified)."""
    lows = [int(i * size / n) for i in range(n)]
    highs = [max(lo + 1, int((i + 1) * size / n)) for i, lo in enumerate(lows)]
    return [min(size - 1, int(torch.randint(lo, hi, ()).item())) for lo, hi in zip(lows, highs)]


def slices_25d(volume: torch.Tensor, counts: tuple[int, int, int],
               positions: tuple[list[int], list[int], list[int]] | None = None) -> list[torch.Tensor]:
    """Slices of ``volume`` [B, C, D, H, W]: one ``[B * n, C, h, w]`` tensor per axis with n > 0, at
    ``positions`` (per axis) or evenly spaced."""
    out = []
    d, h, w = volume.shape[2:]
    pos = positions or (slice_positions(d, counts[0]) if counts[0] else [],
                        slice_positions(h, counts[1]) if counts[1] else [],
                        slice_positions(w, counts[2]) if counts[2] else [])
    if counts[0]:
        out.append(rearrange(volume[:, :, pos[0]], "b c n h w -> (b n) c h w"))
    if counts[1]:
        out.append(rearrange(volume[:, :, :, pos[1]], "b c d n w -> (b n) c d w"))
    if counts[2]:
        out.append(rearrange(volume[:, :, :, :, pos[2]], "b c d h n -> (b n) c d h"))
    return out


class SliceSampler:
    """Where a 2.5D loss cuts its slices, and through which display window it looks at them.

    ``random_slices``: in training mode one slice per bin drawn at random each step (so the loss sees
    the whole volume over the steps, not the same few slices); evaluation mode keeps the bin centres.
    ``display_window`` ``[low, high]`` in HU: the volumes (in [0, 1] over the data's ``hu_window``) are
    re-windowed to it and clipped before slicing, as a reader would look at them (e.g. [-1000, 1000]
    shows lungs and soft tissue that the [-1000, 3000] training window compresses into a fifth of the
    range); empty: the data's own window.
    """

    def __init__(self, counts: tuple[int, int, int], random_slices: bool = False, display_window=(),
                 hu_window=DEFAULT_HU_WINDOW):
        display_window = list(display_window or ())
        if display_window and (len(display_window) != 2 or not float(display_window[1]) > float(display_window[0])):
            raise ValueError(f"display_window must be [low, high] in HU with high > low, or [], got {display_window}")
        if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
            raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
        self.counts, self.random = counts, bool(random_slices)
        self.display = [float(x) for x in display_window]
        self.hu = (float(hu_window[0]), float(hu_window[1]))

    def window(self, x: torch.Tensor) -> torch.Tensor:
        if not self.display:
            return x
        (lo, hi), (dlo, dhi) = self.hu, self.display
        return ((x * (hi - lo) + lo - dlo) / (dhi - dlo)).clamp(0.0, 1.0)

    def pairs(self, pred: torch.Tensor, target: torch.Tensor, training: bool) -> list[tuple[torch.Tensor, ...]]:
        """``(pred slices, target slices)`` per axis, at the same positions."""
        positions = None
        if self.random and training:
            positions = tuple(random_positions(n, c) if c else [] for n, c in zip(pred.shape[2:], self.counts))
        return list(zip(slices_25d(self.window(pred), self.counts, positions),
                        slices_25d(self.window(target), self.counts, positions)))


def load_torchvision_state(weights: str, url: str, what: str, option: str = "weights",
                           where: str = "the recipe's loss table") -> dict[str, torch.Tensor] | None:
    """State dict for ``weights``: "random" -> None, "imagenet" -> torchvision's cache, else a file path.

    "imagenet" reads ``<torch hub dir>/checkpoints/<file name of url>``, downloading it when absent
    and the machine is online; when it cannot be had the error says which file to put where.
    """
    if weights == "random":
        return None
    if weights == "imagenet":
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        path = cache / Path(url).name
        if not path.is_file():
            try:
                cache.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except Exception as exc:
                raise CheckpointError(
                    f"{what}: pretrained ImageNet weights are not in torchvision's cache and could not be "
                    f"downloaded ({type(exc).__name__}: {exc}). Place the file {path.name} (from {url}) at "
                    f"{path}, or set {option} = \"/path/to/{path.name}\" in {where}") from exc
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{what}: {option} file {str(path)!r} not found (absolute path or relative to "
                                  f"{Path.cwd()}); use {option} = \"imagenet\" for torchvision's cache")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what}: could not read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: {path} does not hold a state dict")
    return state


def vgg16_features(last: int, weights: str, what: str = "vgg loss") -> nn.Sequential:
    """torchvision's VGG16 ``features[:last + 1]``, weights loaded as ``load_torchvision_state`` says."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)[: last + 1]
    state = load_torchvision_state(weights, VGG16_URL, what)
    if state is not None:
        own = features.state_dict()
        picked = {k: state[f"features.{k}"] for k in own if f"features.{k}" in state}
        missing = [f"features.{k}" for k in own if k not in picked]
        wrong = [f"features.{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in picked.items()
                 if v.shape != own[k].shape]
        if missing or wrong:
            raise CheckpointError(f"{what}: weights {weights!r} are not a torchvision VGG16 state dict "
                                  f"(missing: {missing[:3]}, wrong shapes: {wrong[:3]})")
        features.load_state_dict(picked)
    for p in features.parameters():
        p.requires_grad_(False)
    return features.eval()


class VGGPerceptualLoss(nn.Module):
    """Perceptual distance of 2.5D slices through a frozen VGG16.

    Options: ``layers`` VGG16 ReLU names (``relu1_1`` ... ``relu5_3``); ``layer_weights`` one weight
    per layer (default: equal, summing to 1); ``slices`` per axis (int or [D, H, W]); ``distance``
    "l1" or "l2"; ``weights`` "imagenet", a file path or "random" (see the module docstring);
    ``random_slices`` and ``display_window`` (HU) as ``SliceSampler`` says; ``hu_window`` from the data.
    """

    def __init__(self, layers: list[str] = ("relu1_2", "relu2_2", "relu3_3"), layer_weights: list[float] = (),
                 slices: int | list[int] = 3, distance: str = "l1", weights: str = "imagenet",
                 random_slices: bool = False, display_window: list[float] = (),
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("layers: choose at least one VGG16 layer")
        unknown = [n for n in layers if n not in VGG16_LAYERS]
        if unknown:
            raise ValueError(f"layers: unknown VGG16 layer(s) {unknown}; choose from {', '.join(VGG16_LAYERS)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: each layer may appear once, got {layers}")
        layer_weights = [float(w) for w in layer_weights] or [1.0 / len(layers)] * len(layers)
        if len(layer_weights) != len(layers) or any(w < 0 for w in layer_weights):
            raise ValueError(f"layer_weights: expected {len(layers)} numbers >= 0 (one per layer), got {layer_weights}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")
        if not isinstance(weights, str) or not weights:
            raise ValueError(f"weights must be \"imagenet\", \"random\" or a file path, got {weights!r}")
        self.counts = parse_slices(slices)
        self.sampler = SliceSampler(self.counts, random_slices, display_window, hu_window)
        order = sorted(layers, key=VGG16_LAYERS.get)
        self.taps = [VGG16_LAYERS[n] for n in order]
        self.layer_weights = [layer_weights[layers.index(n)] for n in order]
        self.distance = distance
        self.features = vgg16_features(self.taps[-1], weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # a fixed feature extractor
        return self

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """VGG16 features at the chosen layers of grey images [N, 1, h, w] in [0, 1]."""
        x = (images.expand(-1, 3, -1, -1) - self.mean.to(images)) / self.std.to(images)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.dim() != 5 or pred.shape != target.shape or pred.shape[1] != 1:
            raise ValueError(f"vgg loss expects pred and target [B, 1, D, H, W] of the same shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        dist = F.l1_loss if self.distance == "l1" else F.mse_loss
        total, n_axes = pred.new_zeros(()), 0
        for sp, st in self.sampler.pairs(pred, target, self.training):
            with torch.no_grad():  # the target's features need no backward pass
                ft = self.feature_maps(st)
            fp = self.feature_maps(sp)
            total = total + sum(w * dist(a, b) for w, a, b in zip(self.layer_weights, fp, ft))
            n_axes += 1
        return total / n_axes


@hookimpl
def register_losses(register):
    register("vgg", VGGPerceptualLoss)

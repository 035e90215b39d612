"""Metrics that see sharpness, distributions and uncertainty (for generative reconstruction).

- :class:`HighFrequencyEnergy` (``hf_energy_ratio``): 3D power-spectrum energy above a radial frequency
  cutoff, prediction over target. A regression model that averages the plausible CTs scores well below 1;
  a sample as sharp as real anatomy scores near 1; noise or invented detail pushes it above 1.
- :class:`EdgeSharpness` (``edge_sharpness``): mean gradient magnitude on the bone and vessel boundaries of
  the target, prediction over target.
- :class:`LPIPS3` (``lpips3``): LPIPS over slices of the three axes; with a random-initialised backbone,
  named as such, when the ImageNet weights are not on the machine.
- :class:`SetDistance` (``fid3d``, ``kid3d``): Fréchet and kernel distances between the feature
  distributions of the predicted and the target volumes of a whole split, the statistics computed by
  torch-fidelity, from a pluggable 3D feature extractor (a seeded random-initialised 3D CNN by default).
- :class:`UncertaintyCalibration` (``uncertainty_spearman``, ``uncertainty_coverage``): how the model's
  per-voxel standard deviation (``batch["pred_std"]``) relates to its absolute error.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import DataError, PluginError
from x2ct_framework.evaluation.anatomy_metrics import (GENERIC_NAMES, STRUCTURE_LABEL_NAMES, _isin, dilate, erode,
                                                       label_codes)
from x2ct_framework.evaluation.metrics import (LPIPS, THRESHOLDS, Metric, _masked_mean, _spacing_zyx, body_mask,
                                               threshold_mask, to_hu)


# ---- high-frequency energy --------------------------------------------------------------------
def radial_frequency(shape: Sequence[int], device=None) -> torch.Tensor:
    """|f| in cycles per voxel of every bin of an ``fftn`` of ``shape`` (0 to sqrt(3)/2)."""
    axes = [torch.fft.fftfreq(n, device=device, dtype=torch.float64) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``|FFT|^2`` (unnormalised, float64) of each volume ``[B, 1, D, H, W]``: ``[B, D, H, W]``, its bins'
    frequencies given by :func:`radial_frequency`."""
    return torch.fft.fftn(x.reshape(x.shape[0], *x.shape[-3:]).double(), dim=(-3, -2, -1)).abs() ** 2


def high_frequency_energy(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Sum of |FFT|^2 over the bins with |f| > ``cutoff`` (cycles/voxel) of each volume ``[B, 1, D, H, W]``."""
    keep = radial_frequency(x.shape[-3:], x.device) > cutoff
    return (power_spectrum(x) * keep).flatten(1).sum(1)


class HighFrequencyEnergy(Metric):
    """Energy of the 3D power spectrum above ``cutoff`` cycles/voxel (0.25 = half the Nyquist frequency),
    prediction over target; 1 is ideal, below 1 = smoother than the target, above 1 = more fine structure
    or noise than the target. NaN where the target has no energy above the cutoff."""

    unit = "ratio"

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, cutoff: float = 0.25):
        super().__init__(hu_window)
        if not 0 < float(cutoff) < math.sqrt(3) / 2:
            raise ValueError(f"cutoff must be in (0, 0.866) cycles per voxel, got {cutoff!r}")
        self.cutoff = float(cutoff)

    def compute(self, pred, target, batch):
        ep, et = high_frequency_energy(pred, self.cutoff), high_frequency_energy(target, self.cutoff)
        return torch.where(et > 0, ep / et.clamp_min(1e-300), torch.full_like(et, math.nan)).float()


# ---- edge sharpness ---------------------------------------------------------------------------
# Label names whose codes (read from the conventions at run time) make up each edge structure.
EDGE_LABEL_NAMES = {
    "bone": GENERIC_NAMES["bone"] + STRUCTURE_LABEL_NAMES["spine"] + STRUCTURE_LABEL_NAMES["ribs"]
    + ("sternum", "clavicle", "clavicles", "scapula", "scapulae", "cortical_bone", "trabecular_bone"),
    "vessel": GENERIC_NAMES["vessel"] + STRUCTURE_LABEL_NAMES["great_vessels"] + STRUCTURE_LABEL_NAMES["lung_vessels"],
    "lung": STRUCTURE_LABEL_NAMES["lungs"],
}


def gradient_magnitude(hu: torch.Tensor, spacing_zyx: torch.Tensor) -> torch.Tensor:
    """|grad| in HU/mm (central differences inside, one-sided at the faces) of ``[B, 1, D, H, W]``."""
    out = torch.zeros_like(hu, dtype=torch.float64)
    for i, dim in enumerate((2, 3, 4)):
        g = torch.gradient(hu.double(), dim=dim)[0] / spacing_zyx[:, i].double().reshape(-1, 1, 1, 1, 1)
        out += g**2
    return out.sqrt()


class EdgeSharpness(Metric):
    """Mean gradient magnitude over the boundary band of the target's bone and vessel regions (voxels
    within one voxel of a boundary: dilation minus erosion of each region), prediction over target.
    Regions from the batch's ``labels`` (the codes ``EDGE_LABEL_NAMES`` finds in the conventions: bone 3 and
    vessel 4, and finer bone or vessel codes once defined) or the HU thresholds of the target inside the
    body. 1 = edges as steep as the target's; a blurred prediction scores below 1. NaN without edges."""

    unit = "ratio"
    uses_body = True

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, structures: list[str] = ("bone", "vessel"),
                 band: int = 1):
        super().__init__(hu_window)
        bad = [s for s in structures if s not in THRESHOLDS]
        if bad or not structures:
            raise ValueError(f"structures must be among {', '.join(THRESHOLDS)}, got {list(structures)}")
        if int(band) < 1:
            raise ValueError(f"band must be >= 1 voxel, got {band!r}")
        self.structures, self.band = tuple(structures), int(band)

    def boundary(self, target_hu: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is not None:
            labels = labels.to(target_hu.device).reshape(target_hu.shape)
        body = batch.get("body")
        body = body.reshape(target_hu.shape).bool() if body is not None else body_mask(target_hu, labels)
        edge = torch.zeros_like(body, dtype=torch.bool)
        for s in self.structures:
            codes = label_codes(EDGE_LABEL_NAMES.get(s, (s,))) if labels is not None else []
            region = _isin(labels, codes) if codes else threshold_mask(target_hu, s, THRESHOLDS) & body
            edge |= dilate(region, self.band) & ~erode(region, self.band)
        return edge

    def compute(self, pred, target, batch):
        p, t = to_hu(pred, self.hu_window), to_hu(target, self.hu_window)
        sp = _spacing_zyx(batch, p.shape[0], p.device)
        edge = self.boundary(t, batch)
        gp, gt = _masked_mean(gradient_magnitude(p, sp), edge), _masked_mean(gradient_magnitude(t, sp), edge)
        return torch.where(gt > 0, gp / gt.clamp_min(1e-300), torch.full_like(gt, math.nan)).float()


# ---- LPIPS over three axes, random backbone offline --------------------------------------------
class LPIPS3(LPIPS):
    """LPIPS on ``slices`` evenly spaced slices along each of the three axes (as ``lpips``). When the
    trunk's ImageNet weights are not on the machine, the trunk is random-initialised from ``seed``
    (``backbone = "random"``) and the metric says so in its unit ("random backbone"): such values compare
    only with values from the same seed, never with published LPIPS."""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, net: str = "alex", slices: int = 8,
                 min_size: int = 64, backbone_path: str | None = None, backbone: str = "auto", seed: int = 0,
                 chunk: int = 32):
        if backbone not in ("auto", "imagenet", "random"):
            raise ValueError(f'backbone must be "auto", "imagenet" or "random", got {backbone!r}')
        self.note = ""
        if backbone != "random":
            try:
                super().__init__(hu_window, net, slices, min_size, backbone_path, False, chunk)
                self.backbone = "imagenet"
                return
            except PluginError as exc:
                if backbone == "imagenet":
                    raise
                self.note = (f"lpips3 uses a random-initialised {net} backbone (seed {seed}): {exc}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            super().__init__(hu_window, net, slices, min_size, None, True, chunk)
        self.backbone, self.unit = "random", "random backbone"
        self.note = self.note or f"lpips3 uses a random-initialised {net} backbone (seed {seed}), as asked"


# ---- FID / KID on 3D features -----------------------------------------------------------------
class RandomFeatures(nn.Module):
    """A small CNN with seeded random weights over ``dims`` spatial axes (2: slices, 3: volumes): four stride-2
    3x3(x3) convolutions (16, 32, 64, 128 channels, LeakyReLU), global average and max pooling -> 256 features.
    A fixed random network is a legitimate (if weaker) feature space for distribution distances; it is no
    pretrained medical encoder."""

    def __init__(self, dims: int = 3, seed: int = 0, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.axes = tuple(range(2, 2 + dims))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            layers, c_in = [], 1
            for c in channels:
                layers += [conv(c_in, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
                c_in = c
            self.body = nn.Sequential(*layers)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x * 2 - 1)
        return torch.cat([f.mean(self.axes), f.amax(self.axes)], 1)


class RandomFeatures3D(RandomFeatures):
    """``fid3d``'s volume features: :class:`RandomFeatures` over three axes."""

    def __init__(self, seed: int = 0, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__(3, seed, channels)


def build_extractor(extractor: str = "random3d", weights: str | None = None, seed: int = 0) -> nn.Module:
    """The feature extractor of ``fid3d``/``kid3d``: ``"random3d"`` (:class:`RandomFeatures3D`) or
    ``"package.module:factory"``, a callable returning an ``nn.Module`` that maps ``[B, 1, D, H, W]`` in
    [0, 1] to ``[B, F]``; ``weights`` is a state-dict file loaded into it."""
    if extractor == "random3d":
        model = RandomFeatures3D(seed)
    else:
        mod, _, attr = extractor.partition(":")
        if not mod or not attr:
            raise ValueError(f'extractor must be "random3d" or "package.module:factory", got {extractor!r}')
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"feature extractor {extractor!r} cannot be imported: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise PluginError(f"feature extractor {extractor!r} returned {type(model).__name__}, expected an nn.Module")
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise PluginError(f"feature extractor weights not found: {file}; put the state-dict file there or "
                              f"change the metric option weights")
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def _fidelity():
    try:
        import torch_fidelity.metric_fid as fid
        import torch_fidelity.metric_kid as kid
    except ImportError as exc:
        raise PluginError("fid3d/kid3d need torch-fidelity: pip install 'x2ct-framework[generative-metrics]' "
                          "(or pip install torch-fidelity)") from exc
    return fid, kid


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``[N, F]`` (torch-fidelity's statistics)."""
    fid, _ = _fidelity()
    sa = fid.fid_features_to_statistics(a.double().cpu())
    sb = fid.fid_features_to_statistics(b.double().cpu())
    return float(fid.fid_statistics_to_metric(sa, sb, False)[fid.KEY_METRIC_FID])


def kid_from_features(a: torch.Tensor, b: torch.Tensor, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0) -> float:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel, averaged over random subsets of
    ``min(subset_size, N)`` features) by torch-fidelity."""
    _, kid = _fidelity()
    size = min(int(subset_size), len(a), len(b))
    if size < 2:
        return math.nan
    out = kid.kid_features_to_metric(a.double().cpu(), b.double().cpu(), kid_subset_size=size, kid_subsets=subsets,
                                     rng_seed=seed, verbose=False)
    return float(out[kid.KEY_METRIC_KID_MEAN])


class SetDistance(Metric):
    """``kind = "fid"`` or ``"kid"`` between the predicted and the target volumes of the whole evaluated set.

    A set-level metric: each call extracts features (returning NaN per case) and :meth:`result` gives
    the one number for everything seen since :meth:`reset`; ``x2ct evaluate`` reports it with ``n`` = the
    number of cases and no interval. Lower is better, 0 = the same feature distribution.
    """

    higher_is_better = False
    per_set = True

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, kind: str = "fid", extractor: str = "random3d",
                 weights: str | None = None, seed: int = 0, kid_subset_size: int = 1000, kid_subsets: int = 100):
        super().__init__(hu_window)
        if kind not in ("fid", "kid"):
            raise ValueError(f'kind must be "fid" or "kid", got {kind!r}')
        _fidelity()
        self.kind, self.seed = kind, int(seed)
        self.kid_subset_size, self.kid_subsets = int(kid_subset_size), int(kid_subsets)
        self.extractor = build_extractor(extractor, weights, seed)
        self.unit = "random features" if extractor == "random3d" and not weights else ""
        self.note = (f"{kind}3d: features of a random-initialised 3D CNN (seed {seed}); comparable only with "
                     f"the same extractor and seed") if self.unit else ""
        self.reset()

    def reset(self) -> None:
        self.features: dict[str, list[torch.Tensor]] = {"pred": [], "target": []}

    def compute(self, pred, target, batch):
        self.extractor.to(pred.device)
        self.features["pred"].append(self.extractor(pred.float()).double().cpu())
        self.features["target"].append(self.extractor(target.float().clamp(0, 1)).double().cpu())
        return torch.full((pred.shape[0],), math.nan, device=pred.device)

    def result(self) -> float:
        if not self.features["pred"]:
            return math.nan
        a, b = torch.cat(self.features["pred"]), torch.cat(self.features["target"])
        if self.kind == "fid":
            return fid_from_features(a, b) if len(a) > 1 else math.nan
        return kid_from_features(a, b, self.kid_subset_size, self.kid_subsets, self.seed)


# ---- uncertainty calibration ------------------------------------------------------------------
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1D tensor, ties sharing their average rank (float64)."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1D tensors (Pearson of average ranks); NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def calibrated_coverage(samples: int, k: float = 2.0) -> float:
    """The ``uncertainty_coverage`` a perfectly calibrated sampler scores with ``samples`` draws per case: the
    mean of K draws errs by N(0, s^2 (1 + 1/K)) and their standard deviation (n - 1) is s chi_{K-1} / sqrt(K - 1),
    independent of it, so |error| <= k std holds with probability P(|t_{K-1}| <= k / sqrt(1 + 1/K)): 0.899 for
    K = 8 at k = 2, 0.954 only as K grows. A lower coverage is over-confident, a higher one under-confident."""
    from scipy import stats

    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2 (a spread needs two draws), got {samples!r}")
    return float(2 * stats.t.cdf(k / math.sqrt(1 + 1 / samples), samples - 1) - 1)


class UncertaintyCalibration(Metric):
    """How the model's per-voxel standard deviation ``batch[std_key]`` (``[B, 1, D, H, W]`` on the same [0, 1]
    scale as the prediction) relates to the absolute error |prediction - target|, over ``region``
    (``"body"`` or ``"all"`` voxels). ``kind = "spearman"``: Spearman rank correlation (1 = the std ranks the
    errors perfectly, 0 = unrelated); ``kind = "coverage"``: the fraction of voxels with
    |error| <= ``k`` std (0.954 for Gaussian errors and a known std at k = 2; with a std and a mean from K
    samples a calibrated sampler scores :func:`calibrated_coverage`, 0.899 for K = 8). NaN without a std map."""

    uses_body = True

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, kind: str = "spearman",
                 std_key: str = "pred_std", region: str = "body", k: float = 2.0):
        super().__init__(hu_window)
        if kind not in ("spearman", "coverage"):
            raise ValueError(f'kind must be "spearman" or "coverage", got {kind!r}')
        if region not in ("body", "all"):
            raise ValueError(f'region must be "body" or "all", got {region!r}')
        self.kind, self.std_key, self.region, self.k = kind, std_key, region, float(k)
        self.unit = "" if kind == "spearman" else "fraction"

    def compute(self, pred, target, batch):
        std = batch.get(self.std_key)
        b = pred.shape[0]
        if std is None:
            return torch.full((b,), math.nan, device=pred.device)
        std = torch.as_tensor(std).to(pred.device)
        if std.numel() != pred.numel():
            raise DataError(f"{self.std_key}: expected a standard deviation map of shape {tuple(pred.shape)} "
                            f"(one value per voxel), got {tuple(std.shape)}")
        std = std.reshape(pred.shape).double()
        err = (pred.double() - target.double()).abs()
        if self.region == "body":
            mask = batch.get("body")
            if mask is None:
                labels = batch.get("labels")
                mask = body_mask(to_hu(target, self.hu_window),
                                 None if labels is None else labels.to(pred.device).reshape(pred.shape))
            mask = mask.reshape(pred.shape).bool()
        else:
            mask = torch.ones_like(pred, dtype=torch.bool)
        vals = []
        for i in range(b):
            m = mask[i].flatten()
            e, s = err[i].flatten()[m], std[i].flatten()[m]
            if e.numel() < 2:
                vals.append(math.nan)
            elif self.kind == "spearman":
                vals.append(spearman(s, e))
            else:
                vals.append(float((e <= self.k * s).double().mean()))
        return torch.tensor(vals, dtype=torch.float32, device=pred.device)


__all__ = ["HighFrequencyEnergy", "EdgeSharpness", "LPIPS3", "SetDistance", "UncertaintyCalibration",
           "RandomFeatures", "RandomFeatures3D", "build_extractor", "fid_from_features", "kid_from_features",
           "spearman", "rankdata",
           "radial_frequency", "high_frequency_energy", "gradient_magnitude"]

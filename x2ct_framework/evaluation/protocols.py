"""Named metric protocols: every convention that changes a number, fixed under one name.

A published number is comparable only with numbers computed the same way (intensity range, peak,
2D or 3D, window). A protocol fixes all of it; every number the framework reports is keyed
``<protocol>/<metric>`` so it always says which one it used.

- ``default``: this framework's protocol (see ``DEFAULT_CONVENTIONS``).
- ``x2ctgan``: X2CT-GAN's published evaluation code (kylekma/X2CT, ``3DGAN/test.py`` with
  ``lib/utils/metrics_np.py``), reproduced step by step (see ``X2CTGAN_CONVENTIONS``).
- ``sparc``: SPARC's per-volume metrics (HORIZONHealthcare/SPARC, ``src/utils/train_common.py``
  ``case_metrics``), over [-1024, 1024] HU (see ``SPARC_CONVENTIONS``); its per-volume table has the
  columns of SPARC's ``results/reconstruction/*.csv``.
- ``c2rv``: the few-view CBCT protocol of C²RV / DIF-Gaussian / DeepSparse (xmed-lab), DIF-Net's with
  the SSIM's data range made explicit (see ``C2RV_CONVENTIONS``).

Both are registered through the ``register_protocols`` hook (this module is the core plugin
``protocols``), exactly as a plugin registers its own: ``factory(hu_window, **options)`` returns a
:class:`Protocol` (or a ``{metric: callable}`` dict). Every registered protocol can be named in
``eval.protocols``, ``x2ct evaluate --protocol``, the report and the benchmark matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from x2ct_framework.errors import PluginError, X2CTError
from x2ct_framework.evaluation.metrics import (DEFAULT_HU_WINDOW, LABELS, LPIPS, MAE, PSNR, RMSE, SSIM,
                                              LandmarkDistance, Metric, StructureMetric, _check_pair, body_mask,
                                              psnr_slices, to_hu)
from x2ct_framework.evaluation.anatomy_metrics import (CONTRAST_STRUCTURES, ContrastRetention, HeldOutView,
                                                       StructureContrast)
from x2ct_framework.evaluation.sharpness_metrics import (LPIPS3, EdgeSharpness, HighFrequencyEnergy, SetDistance,
                                                         UncertaintyCalibration)
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.ssim import ssim as _ssim

DEFAULT_CONVENTIONS = [
    "intensity: the recipe's HU window (default [-1000, 3000] HU) scaled to [0, 1]; the prediction is "
    "clipped to the window",
    "psnr: 3D, over the whole volume, peak = window width (data range 1 on the [0, 1] scale)",
    "psnr_slices: PSNR of every 2D slice, averaged over the slices of each axis, then over the three axes",
    "ssim: 3D, Gaussian window of 11 taps with sigma 1.5, valid region, data range 1",
    "ssim2d: 2D per slice with the same window, averaged over slices and the three axes",
    "mae_hu, rmse_hu: in HU over the whole volume",
    "lpips: AlexNet LPIPS on 8 evenly spaced slices per axis (2.5D), slices repeated to RGB on [-1, 1] "
    "and upsampled to at least 64 pixels; only when the trunk's ImageNet weights are on the machine",
    "lung/bone/vessel_psnr and _mae: inside the reference region (labels 2/3/4, else HU thresholds "
    "lung [-1000, -400), bone [400, inf), vessel [150, 400) inside the body); _dice: HU-thresholded "
    "prediction vs the reference region",
    "landmark_mm: mean distance between centroids of left lung, right lung, bone and vessel",
    "psnr_lung, ssim_lung, psnr_soft, ssim_soft: PSNR (peak = window width) and 3D SSIM with both volumes "
    "clipped to the lung window [-1350, 150] HU or the soft-tissue window [-160, 240] HU",
    "contrast_<structure>: (mean HU inside - mean HU in a 2-voxel shell around it, inside the body) of the "
    "prediction over the target's, for lungs, heart, chambers, great vessels, lung vessels, spine, ribs (labels "
    "where the conventions name them, else thresholds and geometry); contrast_retention: their mean per case",
    "heldout_view_psnr, heldout_view_ncc: DRRs of prediction and target from 45 and 135 degrees (angles of the "
    "batch's views skipped) in the batch's geometry, PSNR with data range 1 / mean normalised cross-correlation",
    "hf_energy_ratio: 3D power-spectrum energy above 0.25 cycles/voxel, prediction over target (1 ideal); "
    "edge_sharpness: mean gradient magnitude on the bone and vessel boundaries, prediction over target",
    "lpips3: lpips on 8 slices per axis; with a seeded random backbone, said in its unit, when the ImageNet "
    "weights are absent",
    "fid3d, kid3d: over the whole split (n = cases, no interval), features of a seeded random 3D CNN unless "
    "another extractor is set; statistics by torch-fidelity",
    "uncertainty_spearman, uncertainty_coverage: Spearman correlation of batch['pred_std'] with |error|, "
    "fraction of body voxels with |error| <= 2 std; NaN when the model gives no std",
    "aggregate: mean over cases (NaN cases skipped, n reported), sample std, 95% percentile bootstrap "
    "interval of the mean",
]

X2CTGAN_HU_OFFSET = 1024.0  # LIDC volumes stored as HU + 1024
X2CTGAN_CT_RANGE = (0.0, 2500.0)  # CT_MIN_MAX of 3DGAN/experiment/multiview2500/*.yml
X2CTGAN_PEAK = 4095.0  # PIXEL_MAX in 3DGAN/test.py

X2CTGAN_CONVENTIONS = [
    "intensity: HU + 1024 clipped to [0, 2500] and divided by 2500 (CT_MIN_MAX = [0, 2500]); the "
    "prediction clipped to [0, 1]",
    "mae0, mse0, cosine: on the [0, 1] scale, per case, in float64",
    "ssim: scikit-image SSIM of every 2D slice (uniform 7x7 window, sample covariance, data range 1), "
    "averaged over the slices of each axis, then over the three axes",
    "psnr (their PSNR-avg): both volumes multiplied by 2500 and truncated to integers, PSNR of every 2D "
    "slice with a peak of 4095 (a slice with zero error scores 100 dB), averaged over slices and the three axes",
    "psnr_3d: the same integers, one PSNR over the whole volume with a peak of 4095",
    "mae, mse: on the integer [0, 2500] scale",
    "a case whose cosine similarity is NaN or above 1 is left out of every x2ctgan number, as test.py does",
]


# ---- X2CT-GAN's metrics -----------------------------------------------------------------------
def to_x2ctgan01(x01: torch.Tensor, hu_window: Sequence[float], hu_offset: float = X2CTGAN_HU_OFFSET,
                 ct_range: Sequence[float] = X2CTGAN_CT_RANGE) -> torch.Tensor:
    """[0, 1] of ``hu_window`` -> X2CT-GAN's [0, 1] (HU + offset clipped to ``ct_range``), float32 [B, D, H, W]."""
    hu = to_hu(x01.double(), hu_window)  # float64 in, float64 out
    a, b = float(ct_range[0]), float(ct_range[1])
    v = ((hu + hu_offset).clamp(a, b) - a) / (b - a)
    return v.reshape(v.shape[0], *v.shape[-3:]).float()


def x2ctgan_integers(v01: torch.Tensor, ct_range: Sequence[float] = X2CTGAN_CT_RANGE) -> torch.Tensor:
    """``tensor_back_to_unMinMax(v, 0, 2500).astype(np.int32)``: float32 product, then truncation."""
    a, b = float(ct_range[0]), float(ct_range[1])
    return torch.trunc(v01.float() * (b - a) + a).to(torch.int64).double()


X2CTGAN_KINDS = {
    # kind: (higher_is_better, unit, doc)
    "mae0": (False, "", "MAE on [0, 1]"),
    "mse0": (False, "", "MSE on [0, 1]"),
    "cosine": (True, "", "cosine similarity on [0, 1]"),
    "ssim": (True, "", "2D slice SSIM averaged over three axes"),
    "psnr": (True, "dB", "2D slice PSNR on integers [0, 2500], peak 4095, averaged over three axes"),
    "psnr_3d": (True, "dB", "3D PSNR on integers [0, 2500], peak 4095"),
    "mae": (False, "", "MAE on integers [0, 2500]"),
    "mse": (False, "", "MSE on integers [0, 2500]"),
}


class X2CTGANMetric(Metric):
    """One of X2CT-GAN's evaluation numbers (``kind``), computed as its ``3DGAN/test.py`` does."""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, kind: str = "psnr",
                 hu_offset: float = X2CTGAN_HU_OFFSET, ct_range: list[float] = X2CTGAN_CT_RANGE,
                 peak: float = X2CTGAN_PEAK):
        super().__init__(hu_window)
        if kind not in X2CTGAN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(X2CTGAN_KINDS)}, got {kind!r}")
        self.kind, self.hu_offset, self.ct_range, self.peak = kind, float(hu_offset), tuple(ct_range), float(peak)
        self.higher_is_better, self.unit, _ = X2CTGAN_KINDS[kind]

    def __call__(self, pred, target, batch=None):
        _check_pair(pred, target)
        with torch.no_grad():
            return self.compute(pred.detach(), target.detach(), batch or {})

    def compute(self, pred, target, batch):
        real = to_x2ctgan01(target, self.hu_window, self.hu_offset, self.ct_range)
        gen = to_x2ctgan01(pred, self.hu_window, self.hu_offset, self.ct_range).clamp(0, 1)
        k = self.kind
        if k in ("mae0", "mse0", "cosine"):
            r, g = real.double().flatten(1), gen.double().flatten(1)
            if k == "mae0":
                return (r - g).abs().mean(1)
            if k == "mse0":
                return ((r - g) ** 2).mean(1)
            return (r * g).sum(1) / (g.norm(dim=1) * r.norm(dim=1))
        if k == "ssim":
            return _ssim(real.double()[:, None], gen.double()[:, None], data_range=1.0, mode="2d", win_size=7,
                         window="uniform", sample_covariance=True)
        ri, gi = x2ctgan_integers(real, self.ct_range), x2ctgan_integers(gen, self.ct_range)
        if k == "psnr":
            return psnr_slices(ri, gi, self.peak, zero_mse_value=100.0)
        se = ((ri - gi) ** 2).flatten(1)
        if k == "psnr_3d":
            mse = se.mean(1)
            val = 20.0 * torch.log10(self.peak / torch.sqrt(mse.clamp_min(1e-10)))
            return torch.where(mse == 0, torch.full_like(val, 100.0), val)
        if k == "mae":
            return (ri - gi).abs().flatten(1).mean(1)
        return se.mean(1)


def _x2ctgan_factory(kind: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, hu_offset: float = X2CTGAN_HU_OFFSET,
                ct_range: list[float] = X2CTGAN_CT_RANGE, peak: float = X2CTGAN_PEAK):
        return X2CTGANMetric(hu_window, kind, hu_offset, ct_range, peak)

    factory.__name__ = f"x2ctgan_{kind}"
    factory.__doc__ = f"X2CT-GAN protocol: {X2CTGAN_KINDS[kind][2]}."
    return factory


X2CTGAN_METRICS = {f"x2ctgan_{k}": _x2ctgan_factory(k) for k in X2CTGAN_KINDS}


# ---- protocols --------------------------------------------------------------------------------
@dataclass
class Protocol:
    """A named set of metrics with fixed conventions.

    ``metrics`` maps the metric's short name to a callable ``(pred, target, batch) -> [B]``;
    ``groups`` names the report section of each ("global", "window", "structure", "contrast", "view",
    "sharpness", "uncertainty", "set", "landmark");
    ``primary`` is the metric that ranks cases (worst first); ``notes`` records what was left out
    and why (for example LPIPS without its weights); ``exclude`` marks cases the protocol drops.
    """

    name: str
    conventions: list[str]
    metrics: dict[str, Callable]
    groups: dict[str, str]
    primary: str
    notes: list[str] = field(default_factory=list)
    exclude: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    # a per-volume table in the authors' layout: (file name, {column: metric}); its first column is the case
    per_volume: tuple[str, dict[str, str]] | None = None

    def key(self, metric: str) -> str:
        return f"{self.name}/{metric}"

    def set_metrics(self) -> dict[str, Callable]:
        """Metrics scored over the whole evaluated set (``per_set``): each call adds to them, ``result()`` ends."""
        return {m: fn for m, fn in self.metrics.items() if getattr(fn, "per_set", False)}

    def reset(self) -> None:
        for fn in self.set_metrics().values():
            fn.reset()

    def set_results(self) -> dict[str, float]:
        """``{"<protocol>/<metric>": value}`` of the set-level metrics over everything scored since ``reset``."""
        return {self.key(m): float(fn.result()) for m, fn in self.set_metrics().items()}

    def higher_is_better(self, metric: str) -> bool:
        return getattr(self.metrics[metric], "higher_is_better", True)

    def unit(self, metric: str) -> str:
        return getattr(self.metrics[metric], "unit", "")

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """``{"<protocol>/<metric>": [B] float64 on the CPU}``; excluded cases are NaN."""
        users = [fn for fn in self.metrics.values() if getattr(fn, "uses_body", False)]
        if users and "body" not in batch:  # one body mask per batch for all structure metrics
            labels = batch.get("labels")
            target_hu = to_hu(target.detach(), users[0].hu_window)
            batch = {**batch, "body": body_mask(target_hu, None if labels is None else labels.to(target.device))}
        out = {m: fn(pred, target, batch).detach().double().cpu() for m, fn in self.metrics.items()}
        if self.exclude is not None:
            drop = self.exclude(out)
            out = {m: torch.where(drop, torch.full_like(v, float("nan")), v) for m, v in out.items()}
        return {self.key(m): v for m, v in out.items()}


def _default(hu_window: Sequence[float], lpips: str | bool = "auto", structures: bool = True,
             anatomy: bool = True, sharpness: bool = True) -> Protocol:
    metrics: dict[str, Callable] = {
        "psnr": PSNR(hu_window),
        "psnr_slices": PSNR(hu_window, slices=True),
        "ssim": SSIM(hu_window, mode="3d"),
        "ssim2d": SSIM(hu_window, mode="2d"),
        "mae_hu": MAE(hu_window),
        "rmse_hu": RMSE(hu_window),
    }
    groups = dict.fromkeys(metrics, "global")
    notes: list[str] = []
    if lpips:
        try:
            metrics["lpips"] = LPIPS(hu_window)
            groups["lpips"] = "global"
        except PluginError as exc:
            if lpips != "auto":
                raise
            notes.append(f"lpips left out: {exc}")
    if structures:
        for s in LABELS:
            for kind in ("psnr", "mae", "dice"):
                metrics[f"{s}_{kind}"] = StructureMetric(hu_window, structure=s, kind=kind)
                groups[f"{s}_{kind}"] = "structure"
        metrics["landmark_mm"] = LandmarkDistance(hu_window)
        groups["landmark_mm"] = "landmark"
    if anatomy:
        _anatomy_metrics(hu_window, metrics, groups)
    if sharpness:
        _sharpness_metrics(hu_window, metrics, groups, notes, lpips)
    return Protocol("default", DEFAULT_CONVENTIONS, metrics, groups, primary="psnr", notes=notes)


def _anatomy_metrics(hu_window: Sequence[float], metrics: dict, groups: dict) -> None:
    """Windowed PSNR/SSIM, per-structure contrast retention and held-out-view consistency (issue 27)."""
    for w in ("lung", "soft"):
        metrics[f"psnr_{w}"], groups[f"psnr_{w}"] = PSNR(hu_window, window=w), "window"
        metrics[f"ssim_{w}"], groups[f"ssim_{w}"] = SSIM(hu_window, mode="3d", window=w), "window"
    shared = StructureContrast(hu_window)
    metrics["contrast_retention"] = ContrastRetention(hu_window, "mean", shared=shared)
    groups["contrast_retention"] = "contrast"
    for s in CONTRAST_STRUCTURES:
        metrics[f"contrast_{s}"] = ContrastRetention(hu_window, s, shared=shared)
        groups[f"contrast_{s}"] = "contrast"
    for kind in ("psnr", "ncc"):
        metrics[f"heldout_view_{kind}"] = HeldOutView(hu_window, kind=kind)
        groups[f"heldout_view_{kind}"] = "view"


def _sharpness_metrics(hu_window: Sequence[float], metrics: dict, groups: dict, notes: list[str],
                       lpips: str | bool) -> None:
    """Sharpness, perceptual, distribution and uncertainty metrics. ``lpips`` governs ``lpips3`` as it does
    ``lpips``: off leaves it out, on needs the ImageNet trunk, auto falls back to a seeded random trunk."""
    metrics["hf_energy_ratio"], groups["hf_energy_ratio"] = HighFrequencyEnergy(hu_window), "sharpness"
    metrics["edge_sharpness"], groups["edge_sharpness"] = EdgeSharpness(hu_window), "sharpness"
    if lpips:
        lp = LPIPS3(hu_window, backbone="auto" if lpips == "auto" else "imagenet")
        metrics["lpips3"], groups["lpips3"] = lp, "sharpness"
        if lp.note:
            notes.append(lp.note)
    try:
        for kind in ("fid", "kid"):
            m = SetDistance(hu_window, kind=kind)
            metrics[f"{kind}3d"], groups[f"{kind}3d"] = m, "set"
        notes.append(m.note.replace("kid3d", "fid3d and kid3d"))
    except PluginError as exc:  # torch-fidelity is an optional extra
        notes.append(f"fid3d and kid3d left out: {exc}")
    for kind in ("spearman", "coverage"):
        metrics[f"uncertainty_{kind}"] = UncertaintyCalibration(hu_window, kind=kind)
        groups[f"uncertainty_{kind}"] = "uncertainty"


def _x2ctgan(hu_window: Sequence[float]) -> Protocol:
    metrics = {k: X2CTGANMetric(hu_window, k) for k in X2CTGAN_KINDS}
    notes = []
    lo, hi = float(hu_window[0]), float(hu_window[1])
    a, b = X2CTGAN_CT_RANGE
    if lo > -1000.0 or hi < b - X2CTGAN_HU_OFFSET:
        notes.append(f"the recipe's HU window [{lo:g}, {hi:g}] does not cover X2CT-GAN's range "
                     f"[{a - X2CTGAN_HU_OFFSET:g}, {b - X2CTGAN_HU_OFFSET:g}] HU; values outside it were lost "
                     f"before scoring, so these numbers are not directly comparable")
    elif lo > a - X2CTGAN_HU_OFFSET:
        notes.append(f"the recipe's window starts at {lo:g} HU, so air below it scores as {lo:g} HU "
                     f"({lo + X2CTGAN_HU_OFFSET:g} on X2CT-GAN's [0, 2500] scale) in both volumes")

    def exclude(values: dict[str, torch.Tensor]) -> torch.Tensor:
        c = values["cosine"]
        return torch.isnan(c) | (c > 1)

    return Protocol("x2ctgan", X2CTGAN_CONVENTIONS, metrics, dict.fromkeys(metrics, "global"), primary="psnr",
                    notes=notes, exclude=exclude)


X2CTGAN_SETTING = {"hu_window": (-1024.0, 1476.0), "resolution": 128, "resize": "linear"}


def x2ctgan_setting_deviations(hu_window: Sequence[float], resolution: int, resize: str | None) -> list[str]:
    """How the evaluated data differs from X2CT-GAN's test setting (their published row): one sentence each."""
    out = []
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if (lo, hi) != X2CTGAN_SETTING["hu_window"]:
        out.append(f"HU window [{lo:g}, {hi:g}] instead of X2CT-GAN's [-1024, 1476] (stored [0, 2500]); the same "
                   f"pair of volumes scores differently (SSIM 0.739 instead of 0.615 on one LIDC case with "
                   f"[-1000, 3000])")
    if int(resolution) != X2CTGAN_SETTING["resolution"]:
        out.append(f"resolution {resolution}^3 instead of X2CT-GAN's 128^3")
    if resize is not None and resize != X2CTGAN_SETTING["resize"]:
        out.append(f"targets resampled by {resize!r} instead of X2CT-GAN's linear zoom (order 1); area averaging "
                   f"smooths the target and flatters PSNR/SSIM (about +0.14 dB, +0.008 SSIM)")
    elif resize is None:
        out.append("the dataset does not say how it resampled the target (X2CT-GAN: linear zoom, order 1)")
    return [f"NOT X2CT-GAN's setting: {d}; these numbers do not compare with its published table" for d in out]


# ---- SPARC and the xmed-lab few-view CBCT protocol ------------------------------------------------
SPARC_HU = (-1024.0, 1024.0)

SPARC_CONVENTIONS = [
    "intensity: both volumes in HU rounded to integers (SPARC scores int16 volumes), clipped to [-1024, 1024]",
    "psnr_db: 3D over the whole volume, -10 log10(MSE / 2048^2) with the MSE floored at 1e-12",
    "ssim: 3D SSIM of the volumes normalised to [0, 1] over [-1024, 1024] (scikit-image's defaults: uniform "
    "7-tap window, sample covariance, valid region) with data_range = 1",
    "per-volume table sparc.csv: columns ct_path, psnr_db, ssim as in SPARC's results/reconstruction/*.csv",
]

C2RV_CONVENTIONS = [
    "intensity: the recipe's HU window scaled to [0, 1] (set it to the dataset's preprocessing window, e.g. "
    "the one the authors normalised their CTs with); the prediction clipped to [0, 1]",
    "psnr: 3D over the whole volume, data_range = 1 (skimage peak_signal_noise_ratio(image, output, data_range=1))",
    "ssim: 3D SSIM with data_range = 1 given explicitly (scikit-image's uniform 7-tap window, sample "
    "covariance); DIF-Net's own evaluate.py left data_range out, which older scikit-image took as 2 for float "
    "volumes and which inflates SSIM (xmed-lab/DIF-Gaussian#4)",
    "per-volume table c2rv.csv: columns name, psnr, ssim",
]


def _window_notes(name: str, hu_window: Sequence[float], needed: Sequence[float]) -> list[str]:
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if lo > needed[0] or hi < needed[1]:
        return [f"the recipe's HU window [{lo:g}, {hi:g}] does not cover {name}'s [{needed[0]:g}, {needed[1]:g}] HU; "
                f"values outside it were lost before scoring, so these numbers are not directly comparable"]
    return []


class SPARCMetric(Metric):
    """SPARC's ``case_metrics``: ``kind`` "psnr_db" or "ssim" over [-1024, 1024] HU."""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, kind: str = "psnr_db",
                 hu_range: Sequence[float] = SPARC_HU):
        super().__init__(hu_window)
        if kind not in ("psnr_db", "ssim"):
            raise ValueError(f"kind must be 'psnr_db' or 'ssim', got {kind!r}")
        self.kind, self.hu_range = kind, (float(hu_range[0]), float(hu_range[1]))
        self.unit = "dB" if kind == "psnr_db" else ""

    def __call__(self, pred, target, batch=None):
        _check_pair(pred, target)
        with torch.no_grad():  # the prediction is clipped in HU, not to the recipe's window first
            return self.compute(pred.detach(), target.detach(), batch or {})

    def compute(self, pred, target, batch):
        lo, hi = self.hu_range
        rec = torch.round(to_hu(pred.double(), self.hu_window)).clamp(lo, hi)
        tgt = torch.round(to_hu(target.double(), self.hu_window)).clamp(lo, hi)
        if self.kind == "psnr_db":
            mse = ((rec - tgt) ** 2).flatten(1).mean(1) / (hi - lo) ** 2
            return -10.0 * torch.log10(mse.clamp_min(1e-12))
        rec_n, tgt_n = (rec - lo) / (hi - lo), (tgt - lo) / (hi - lo)
        return _ssim(tgt_n[:, None] if tgt_n.dim() == 4 else tgt_n, rec_n[:, None] if rec_n.dim() == 4 else rec_n,
                     data_range=1.0, mode="3d", win_size=7, window="uniform", sample_covariance=True)


class C2RVMetric(Metric):
    """The xmed-lab CBCT evaluation: ``kind`` "psnr" or "ssim" on [0, 1], the prediction clipped, data range 1."""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, kind: str = "psnr"):
        super().__init__(hu_window)
        if kind not in ("psnr", "ssim"):
            raise ValueError(f"kind must be 'psnr' or 'ssim', got {kind!r}")
        self.kind = kind
        self.unit = "dB" if kind == "psnr" else ""

    def compute(self, pred, target, batch):  # pred already clipped to [0, 1] by Metric.__call__
        p, t = pred.double(), target.double()
        if self.kind == "psnr":
            mse = ((p - t) ** 2).flatten(1).mean(1)
            return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20))
        return _ssim(t, p, data_range=1.0, mode="3d", win_size=7, window="uniform", sample_covariance=True)


def _sparc(hu_window: Sequence[float]) -> Protocol:
    metrics = {k: SPARCMetric(hu_window, k) for k in ("psnr_db", "ssim")}
    return Protocol("sparc", SPARC_CONVENTIONS, metrics, dict.fromkeys(metrics, "global"), primary="psnr_db",
                    notes=_window_notes("SPARC", hu_window, SPARC_HU),
                    per_volume=("sparc.csv", {"ct_path": "", "psnr_db": "psnr_db", "ssim": "ssim"}))


def _c2rv(hu_window: Sequence[float]) -> Protocol:
    metrics = {k: C2RVMetric(hu_window, k) for k in ("psnr", "ssim")}
    return Protocol("c2rv", C2RV_CONVENTIONS, metrics, dict.fromkeys(metrics, "global"), primary="psnr",
                    per_volume=("c2rv.csv", {"name": "", "psnr": "psnr", "ssim": "ssim"}))


# Built-in protocols; registered by this module (the core plugin ``protocols``) through ``register_protocols``.
PROTOCOLS: dict[str, Callable[..., Protocol]] = {"default": _default, "x2ctgan": _x2ctgan, "sparc": _sparc,
                                                 "c2rv": _c2rv}
PROTOCOL_NAMES = tuple(PROTOCOLS)


@hookimpl
def register_protocols(register):
    for name, factory in PROTOCOLS.items():
        register(name, factory)


def _registry():
    from x2ct_framework.plugins import get_plugin_manager

    return get_plugin_manager().registry("protocol")


def protocol_names() -> list[str]:
    """Every protocol a recipe or ``--protocol`` may name: the registry's (built-ins always among them)."""
    try:
        names = _registry().names()
    except X2CTError:  # a registry that cannot be built is reported by the command that needs it
        names = []
    return list(dict.fromkeys([*PROTOCOL_NAMES, *names]))


def check_names(names: Sequence[str]) -> str | None:
    """The recipe check of ``eval.protocols`` (it lives in the schema): a problem sentence, or None."""
    from x2ct_framework.config.schema import protocol_names as check

    return check(list(names))


def as_protocol(name: str, made: Any, source: str) -> Protocol:
    """A protocol factory's result as a :class:`Protocol` named ``name``; a plain ``{metric: callable}``
    dict becomes one whose metrics are all in the report's global table, ranked by the first."""
    if isinstance(made, dict) and made and all(callable(f) for f in made.values()):
        return Protocol(name, [f"metrics of protocol {name!r} from {source}, as their plugin defines them"],
                        dict(made), dict.fromkeys(made, "global"), primary=next(iter(made)))
    if not isinstance(made, Protocol):
        raise PluginError(f"protocol {name!r} ({source}) returned {type(made).__name__}, expected a Protocol "
                          f"(x2ct_framework.evaluation.protocols.Protocol) or a dict of metric callables")
    if made.name != name:
        raise PluginError(f"protocol {name!r} ({source}) returned a Protocol named {made.name!r}; its name must "
                          f"be the registered one, which keys its numbers")
    if made.primary not in made.metrics:
        raise PluginError(f"protocol {name!r} ({source}): primary metric {made.primary!r} is not one of its metrics "
                          f"({', '.join(made.metrics)})")
    return made


def build_protocol(name: str, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, *, where: str = "protocol",
                   context: dict | None = None, **options) -> Protocol:
    """Build protocol ``name`` of the registry for data scaled from ``hu_window``; an unknown name lists the
    known ones. ``context`` values reach a factory only when it declares them (for example ``lpips``)."""
    reg = _registry()
    hw = tuple(float(v) for v in hu_window)
    made = reg.create(name, options, where=where, context=context, hu_window=hw)
    return as_protocol(name, made, reg.get(name).source)


__all__ = ["Protocol", "PROTOCOLS", "PROTOCOL_NAMES", "build_protocol", "protocol_names", "check_names",
           "as_protocol", "X2CTGANMetric", "X2CTGAN_METRICS", "SPARCMetric", "C2RVMetric",
           "SPARC_CONVENTIONS", "C2RV_CONVENTIONS",
           "to_x2ctgan01", "x2ctgan_integers", "DEFAULT_CONVENTIONS", "X2CTGAN_CONVENTIONS"]

"""The metric library: metric classes and functions (registered by :mod:`.builtin_metrics`).

Every metric is built as ``factory(**options)`` and called as ``metric(pred, target, batch) -> [B]``
(one value per case). ``pred`` and ``target`` are ``[B, 1, D, H, W]`` in [0, 1] after the recipe's HU
window ``hu_window`` (a context value the factory receives), so a metric can convert back to HU.
The prediction is clipped to [0, 1] first (a CT outside the recipe's window is not representable).

Each metric object carries ``higher_is_better`` and ``unit`` for tables and worst-case selection.
A value that cannot be computed for a case (a structure absent from it, no landmark found) is NaN;
aggregates skip NaN and report how many cases counted.

Structure regions (lung, bone, vessel) come from the batch's ``labels`` (2 lung, 3 bone, 4 vessel)
when present, otherwise from HU thresholds on the target inside the body (see ``THRESHOLDS``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from x2ct_framework.errors import DataError, PluginError
from x2ct_framework.ssim import ssim as _ssim

from x2ct_framework.conventions import DEFAULT_HU_WINDOW, NOT_BODY_LABELS, PLANES, hu_to_unit, unit_to_hu
from x2ct_framework.conventions import STRUCTURE_LABELS as LABELS
# HU ranges [low, high) that define a structure when the data has no labels, and that define the
# predicted structure for Dice and landmarks. Lung: aerated parenchyma inside the body; bone:
# cortical and dense trabecular bone; vessel: contrast-enhanced blood (CTPA) below bone density.
THRESHOLDS = {"lung": (-1000.0, -400.0), "bone": (400.0, math.inf), "vessel": (150.0, 400.0)}
BODY_HU = -500.0  # body outline threshold when no labels are given (lungs are filled in per slice)
# Named display windows (HU) that ``window`` options accept besides [low, high]: the lung window and the
# soft-tissue (mediastinal) window of chest CT reading.
WINDOWS: dict[str, tuple[float, float]] = {"lung": (-1350.0, 150.0), "soft": (-160.0, 240.0)}


# ---- conversions and masks --------------------------------------------------------------------
def to_hu(x01: torch.Tensor, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> torch.Tensor:
    """[0, 1] after the HU window -> HU (float32, or float64 for float64 input)."""
    x = x01 if x01.dtype == torch.float64 else x01.float()
    return unit_to_hu(x, hu_window)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise DataError(f"metric: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                        f"the dataset's CT must be at the stage resolution")
    if pred.dim() != 5:
        raise DataError(f"metric: expected volumes [B, 1, D, H, W], got shape {tuple(pred.shape)}")


def _check_window(hu_window: Sequence[float], name: str = "hu_window") -> tuple[float, float]:
    if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
        raise ValueError(f"{name} must be [low, high] with high > low, got {list(hu_window)}")
    return float(hu_window[0]), float(hu_window[1])


def _spacing_zyx(batch: dict, b: int, device, default: float = 1.0) -> torch.Tensor:
    """Voxel size in mm per case in index order (z, y, x) = (D, H, W); the batch stores (x, y, z)."""
    sp = batch.get("spacing") if isinstance(batch, dict) else None
    if sp is None:
        return torch.full((b, 3), float(default), device=device)
    sp = torch.as_tensor(sp, dtype=torch.float32, device=device).reshape(-1, 3)
    if sp.shape[0] == 1 and b > 1:
        sp = sp.expand(b, 3)
    return sp.flip(-1)


def _body_from_threshold(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` [D, H, W] with holes filled per axial slice."""
    from scipy.ndimage import binary_fill_holes, label

    comp, n = label(mask)
    if n > 1:
        sizes = np.bincount(comp.ravel())[1:]
        mask = comp == (int(np.argmax(sizes)) + 1)
    out = np.empty_like(mask)
    for z in range(mask.shape[0]):
        out[z] = binary_fill_holes(mask[z])
    return out


def body_mask(target_hu: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Body region [B, 1, D, H, W].

    With labels: every labelled voxel except ``NOT_BODY_LABELS`` (the scanner table of the
    framework's phantom). Without: the target above ``BODY_HU``, its largest connected component
    (which drops a separate table and stray voxels), holes filled per axial slice (the lungs).
    """
    if labels is not None:
        labels = labels.reshape(target_hu.shape)
        return (labels > 0) & ~torch.isin(labels, torch.tensor(NOT_BODY_LABELS, device=labels.device,
                                                                dtype=labels.dtype))
    m = (target_hu > BODY_HU).cpu().numpy()
    filled = np.stack([_body_from_threshold(c[0])[None] for c in m])
    return torch.from_numpy(filled).to(target_hu.device)


def threshold_mask(hu: torch.Tensor, structure: str, thresholds: dict | None = None) -> torch.Tensor:
    lo, hi = (thresholds or THRESHOLDS)[structure]
    return (hu >= lo) & (hu < hi)


def structure_masks(pred_hu: torch.Tensor, target_hu: torch.Tensor, batch: dict, structure: str,
                    thresholds: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted mask, reference mask) of ``structure``, both inside the target's body.

    The reference is ``labels == LABELS[structure]`` when the batch has labels, else the target's
    HU threshold; the prediction is always its HU threshold (restricted to the same body region).
    A precomputed ``batch["body"]`` mask is used when present (protocols compute it once per batch).
    """
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if labels is not None:
        labels = labels.to(target_hu.device).reshape(target_hu.shape)
    body = batch.get("body") if isinstance(batch, dict) else None
    body = body.reshape(target_hu.shape).bool() if body is not None else body_mask(target_hu, labels)
    pred_mask = threshold_mask(pred_hu, structure, thresholds) & body
    if labels is not None:
        ref = labels == LABELS[structure]
    else:
        ref = threshold_mask(target_hu, structure, thresholds) & body
    return pred_mask, ref


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` per case; NaN where the mask is empty."""
    m = mask.flatten(1).to(values.dtype)
    n = m.sum(1)
    s = (values.flatten(1) * m).sum(1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


# ---- plain functions --------------------------------------------------------------------------
def psnr_slices(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
                zero_mse_value: float = 100.0) -> torch.Tensor:
    """PSNR of every 2D slice, averaged over the slices of each axis and then over the three axes."""
    se = (pred.double() - target.double()) ** 2
    se = se.reshape(se.shape[0], *se.shape[-3:])
    out = []
    for dims in ((2, 3), (1, 3), (1, 2)):  # slices along D, H, W
        mse = se.mean(dim=dims)
        val = 20.0 * torch.log10(data_range / torch.sqrt(mse.clamp_min(1e-10)))
        out.append(torch.where(mse == 0, torch.full_like(val, zero_mse_value), val).mean(1))
    return torch.stack(out).mean(0)


def dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice per case; NaN when both masks are empty (the structure is absent)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    denom = a.sum(1) + b.sum(1)
    return torch.where(denom > 0, 2 * (a * b).sum(1) / denom.clamp_min(1), torch.full_like(denom, float("nan")))


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """Centroid per case in voxel indices (z, y, x) of a [B, 1, D, H, W] mask; NaN when empty."""
    b = mask.shape[0]
    m = mask.reshape(b, *mask.shape[-3:]).float()
    grids = torch.meshgrid(*[torch.arange(n, device=m.device, dtype=torch.float32) for n in m.shape[1:]],
                           indexing="ij")
    n = m.flatten(1).sum(1)
    coords = torch.stack([(m * g).flatten(1).sum(1) for g in grids], dim=1) / n.clamp_min(1)[:, None]
    return torch.where(n[:, None] > 0, coords, torch.full_like(coords, float("nan")))


# ---- metric classes ---------------------------------------------------------------------------
class Metric:
    """Base: pred/target in [0, 1] of ``hu_window``; subclasses implement ``compute`` -> [B]."""

    higher_is_better = True
    unit = ""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW):
        self.hu_window = _check_window(hu_window)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        _check_pair(pred, target)
        with torch.no_grad():
            return self.compute(pred.detach().clamp(0, 1), target.detach(), batch or {})

    def compute(self, pred, target, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ``window`` (an option of PSNR, SSIM, MAE, RMSE) is the HU range both volumes are clipped to before
    # scoring; it is kept apart from SSIM's filter window (``win_size``, ``window_kind``).
    # A named window (``"lung"``, ``"soft"``, see ``WINDOWS``) stands for its HU range.
    def _clip_range(self, window: Sequence[float] | str | None) -> tuple[float, float]:
        if isinstance(window, str):
            if window not in WINDOWS:
                raise ValueError(f"window must be [low, high] HU or one of {', '.join(map(repr, WINDOWS))}, "
                                 f"got {window!r}")
            return WINDOWS[window]
        return self.hu_window if window is None else _check_window(window, "window")

    def _clipped_hu(self, x01: torch.Tensor, clip_hu: tuple[float, float]) -> torch.Tensor:
        return to_hu(x01, self.hu_window).clamp(*clip_hu)


class PSNR(Metric):
    """PSNR in dB over the whole volume after clipping both volumes to ``window`` (HU).

    ``window`` defaults to the recipe's ``hu_window``; ``peak`` (HU) defaults to the window width, so
    by default this is PSNR with data range 1 in the [0, 1] scale. ``slices = true`` averages 2D slice
    PSNRs over the three axes instead (slice PSNR reads 4-5 dB higher than 3D PSNR).
    """

    unit = "dB"

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, window: list[float] | str | None = None,
                 peak: float | None = None, slices: bool = False):
        super().__init__(hu_window)
        self.clip_hu = self._clip_range(window)
        self.peak = float(peak) if peak is not None else self.clip_hu[1] - self.clip_hu[0]
        if not self.peak > 0:
            raise ValueError(f"peak must be > 0 HU, got {peak!r}")
        self.slices = slices

    def compute(self, pred, target, batch):
        p, t = self._clipped_hu(pred, self.clip_hu), self._clipped_hu(target, self.clip_hu)
        if self.slices:
            return psnr_slices(p, t, self.peak).float()
        mse = ((p.double() - t.double()) ** 2).flatten(1).mean(1)
        return (10.0 * torch.log10(self.peak**2 / mse.clamp_min(1e-20))).float()


class SSIM(Metric):
    """SSIM on the [0, 1] scale of ``window`` (default the recipe's): ``mode = "3d"`` (Gaussian 11-tap,
    sigma 1.5) or ``"2d"`` (per slice, averaged over the slices of each axis, then over the axes).

    ``axes`` picks slicing planes for 2D mode (axial, coronal, sagittal). ``window_kind``, ``win_size``
    and ``sample_covariance`` select scikit-image's other conventions (X2CT-GAN: uniform, 7, true).
    """

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, mode: str = "3d",
                 window: list[float] | str | None = None, win_size: int = 11, sigma: float = 1.5,
                 window_kind: str = "gaussian", sample_covariance: bool = False,
                 axes: list[str] = PLANES):
        super().__init__(hu_window)
        if mode not in ("3d", "2d"):
            raise ValueError(f'mode must be "3d" or "2d", got {mode!r}')
        unknown = [a for a in axes if a not in PLANES]
        if unknown or not axes:
            raise ValueError(f"axes must be a non-empty list of {', '.join(PLANES)}, got {list(axes)}")
        self.clip_hu = self._clip_range(window)
        self.mode, self.win_size, self.sigma = mode, int(win_size), float(sigma)
        self.window_kind, self.sample_covariance = window_kind, bool(sample_covariance)
        self.axes = tuple(PLANES.index(a) for a in axes)
        from x2ct_framework.ssim import check_window

        check_window(self.win_size, self.sigma, window_kind)

    def compute(self, pred, target, batch):
        p = hu_to_unit(to_hu(pred, self.hu_window), self.clip_hu)
        t = hu_to_unit(to_hu(target, self.hu_window), self.clip_hu)
        if min(p.shape[-3:]) < self.win_size:
            raise DataError(f"SSIM window of {self.win_size} voxels does not fit volume {tuple(p.shape[-3:])}")
        return _ssim(p, t, data_range=1.0, mode=self.mode, win_size=self.win_size, sigma=self.sigma,
                     window=self.window_kind, sample_covariance=self.sample_covariance, slice_axes=self.axes).float()


class MAE(Metric):
    """Mean absolute error in HU over the whole volume (both clipped to ``window``, default the recipe's)."""

    higher_is_better = False
    unit = "HU"

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, window: list[float] | str | None = None):
        super().__init__(hu_window)
        self.clip_hu = self._clip_range(window)

    def compute(self, pred, target, batch):
        return (self._clipped_hu(pred, self.clip_hu) - self._clipped_hu(target, self.clip_hu)).abs().flatten(1).mean(1)


class RMSE(MAE):
    """Root-mean-square error in HU over the whole volume."""

    def compute(self, pred, target, batch):
        d = self._clipped_hu(pred, self.clip_hu).double() - self._clipped_hu(target, self.clip_hu).double()
        return (d**2).flatten(1).mean(1).sqrt().float()


class Cosine(Metric):
    """Cosine similarity of the flattened volumes on the [0, 1] scale."""

    def compute(self, pred, target, batch):
        p, t = pred.double().flatten(1), target.double().flatten(1)
        return ((p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))).float()


class StructureMetric(Metric):
    """A score inside one structure (``lung``, ``bone`` or ``vessel``).

    ``kind``: ``psnr`` (dB, peak = recipe window width, over the reference region), ``mae`` (HU over the
    reference region) or ``dice`` (the predicted structure by HU threshold vs the reference region).
    ``thresholds`` overrides the HU range [low, high) of this structure.
    """

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, structure: str = "bone",
                 kind: str = "psnr", thresholds: list[float] | None = None):
        super().__init__(hu_window)
        if structure not in LABELS:
            raise ValueError(f"structure must be one of {', '.join(LABELS)}, got {structure!r}")
        if kind not in ("psnr", "mae", "dice"):
            raise ValueError(f'kind must be "psnr", "mae" or "dice", got {kind!r}')
        self.structure, self.kind = structure, kind
        self.thresholds = dict(THRESHOLDS)
        if thresholds is not None:
            if len(thresholds) != 2 or not thresholds[1] > thresholds[0]:
                raise ValueError(f"thresholds must be [low, high] HU with high > low, got {thresholds}")
            self.thresholds[structure] = (float(thresholds[0]), float(thresholds[1]))
        self.higher_is_better = kind != "mae"
        self.uses_body = True
        self.unit = {"psnr": "dB", "mae": "HU", "dice": ""}[kind]

    def compute(self, pred, target, batch):
        p, t = to_hu(pred, self.hu_window), to_hu(target, self.hu_window)
        pm, ref = structure_masks(p, t, batch, self.structure, self.thresholds)
        if self.kind == "dice":
            return dice(pm, ref)
        if self.kind == "mae":
            return _masked_mean((p - t).abs(), ref)
        mse = _masked_mean((p.double() - t.double()) ** 2, ref)
        peak = self.hu_window[1] - self.hu_window[0]
        return (10.0 * torch.log10(peak**2 / mse.clamp_min(1e-20))).float()


class LandmarkDistance(Metric):
    """Mean distance in mm between landmarks located in the prediction and in the target.

    Landmarks are the centroids of the left lung, right lung (split at the volume's mid-sagittal
    plane), bone and vessel regions (reference: labels or target thresholds; prediction: HU
    thresholds inside the body). A landmark counts only where both are found; a case with none is
    NaN. ``spacing`` comes from the batch (mm, x y z), else ``default_spacing``.
    """

    higher_is_better = False
    unit = "mm"
    uses_body = True

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, default_spacing: float = 1.0,
                 structures: list[str] = ("lung", "bone", "vessel")):
        super().__init__(hu_window)
        bad = [s for s in structures if s not in LABELS]
        if bad:
            raise ValueError(f"structures must be among {', '.join(LABELS)}, got {bad}")
        self.default_spacing, self.structures = float(default_spacing), tuple(structures)

    def landmarks(self, pred_hu, target_hu, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred, target) landmark positions in voxels, [B, L, 3] (z, y, x), NaN where not found."""
        pl, tl = [], []
        w = pred_hu.shape[-1]
        for s in self.structures:
            pm, ref = structure_masks(pred_hu, target_hu, batch, s)
            if s == "lung":
                half = torch.zeros_like(pm)
                half[..., : w // 2] = True
                for side in (half, ~half):
                    pl.append(centroid(pm & side))
                    tl.append(centroid(ref & side))
            else:
                pl.append(centroid(pm))
                tl.append(centroid(ref))
        return torch.stack(pl, 1), torch.stack(tl, 1)

    def compute(self, pred, target, batch):
        p, t = to_hu(pred, self.hu_window), to_hu(target, self.hu_window)
        pl, tl = self.landmarks(p, t, batch)
        sp = _spacing_zyx(batch, p.shape[0], p.device, self.default_spacing)[:, None, :]
        dist = (((pl - tl) * sp) ** 2).sum(-1).sqrt()  # [B, L], NaN where missing
        ok = ~torch.isnan(dist)
        n = ok.sum(1)
        s = torch.where(ok, dist, torch.zeros_like(dist)).sum(1)
        return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


# ---- LPIPS on 2.5D slices ---------------------------------------------------------------------
_LPIPS_TRUNKS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


def lpips_trunk_file(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of LPIPS's trunk (the standard torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_TRUNKS[net].rsplit("/", 1)[-1]


def load_lpips(net: str = "alex", backbone_path: str | None = None, random_backbone: bool = False):
    """An ``lpips.LPIPS`` network built without any download.

    The linear calibration layers ship inside the ``lpips`` package; the trunk's ImageNet weights are
    read from ``backbone_path`` or torchvision's cache. A missing file raises a PluginError naming
    the exact file and where to put it. ``random_backbone`` (tests only) skips the trunk weights.
    """
    if net not in _LPIPS_TRUNKS:
        raise ValueError(f"net must be one of {', '.join(_LPIPS_TRUNKS)}, got {net!r}")
    try:
        import lpips
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise PluginError("the lpips metric needs the lpips package: pip install lpips") from exc
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not lin.is_file():
        raise PluginError(f"LPIPS calibration weights not found: {lin} (reinstall the lpips package)")
    state = None
    if not random_backbone:
        file = Path(backbone_path).expanduser() if backbone_path else lpips_trunk_file(net)
        if not file.is_file():
            url = _LPIPS_TRUNKS[net]
            raise PluginError(
                f"LPIPS ({net}) needs the ImageNet weights of its trunk, which are not on this machine: "
                f"{file} is missing. Download {url} and place it at {lpips_trunk_file(net)} (torchvision's "
                f"cache, TORCH_HOME), or pass its path as the lpips metric option backbone_path.")
        state = torch.load(file, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips's pretrained= argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if state is not None:
        own = {}
        for slice_name, part in model.net.named_children():
            for idx, module in part.named_children():
                for pname, _ in module.named_parameters():
                    own[f"{slice_name}.{idx}.{pname}"] = state[f"features.{idx}.{pname}"]
        model.net.load_state_dict(own, strict=True)
    return model.eval().requires_grad_(False)


class LPIPS(Metric):
    """LPIPS on 2.5D slices: ``slices`` evenly spaced slices per axis (axial, coronal, sagittal), each
    repeated to 3 channels on [-1, 1] and upsampled to at least ``min_size`` pixels; the mean over all
    slices. Lower is better. Needs the trunk's ImageNet weights (see ``load_lpips``)."""

    higher_is_better = False

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, net: str = "alex", slices: int = 8,
                 min_size: int = 64, backbone_path: str | None = None, random_backbone: bool = False,
                 chunk: int = 32):
        super().__init__(hu_window)
        if slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        self.slices, self.min_size, self.chunk = int(slices), int(min_size), int(chunk)
        self.model = load_lpips(net, backbone_path, random_backbone)

    def slices_25d(self, vol: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] -> [B, 3 * slices, S, S] stack of axial, coronal and sagittal slices."""
        out = []
        for axis in range(3):
            n = vol.shape[2 + axis]
            idx = torch.linspace(0, n - 1, min(self.slices, n) + 2)[1:-1].round().long().to(vol.device)
            sl = vol.index_select(2 + axis, idx).movedim(2 + axis, 1).squeeze(2)  # [B, k, a, b]
            size = max(self.min_size, *sl.shape[-2:])
            out.append(F.interpolate(sl, size=(size, size), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1)

    def compute(self, pred, target, batch):
        self.model.to(pred.device)
        p, t = self.slices_25d(pred.float()), self.slices_25d(target.float().clamp(0, 1))
        b, k = p.shape[:2]
        p = rearrange(p, "b k h w -> (b k) 1 h w").expand(-1, 3, -1, -1) * 2 - 1
        t = rearrange(t, "b k h w -> (b k) 1 h w").expand(-1, 3, -1, -1) * 2 - 1
        vals = torch.cat([self.model(p[i:i + self.chunk], t[i:i + self.chunk]).flatten()
                          for i in range(0, p.shape[0], self.chunk)])
        return rearrange(vals, "(b k) -> b k", b=b).mean(1)

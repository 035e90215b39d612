"""Metrics that look where the anatomy is: per-structure contrast retention and held-out-view consistency.

- :class:`ContrastRetention`: for each labelled structure, its contrast against a surrounding shell
  (mean HU inside minus mean HU in the shell) in the prediction over the same contrast in the target.
  1 = all contrast kept, 0 = the structure is flat against its surroundings. Structure regions come
  from the label codes of :mod:`x2ct_framework.conventions` read at run time (finer codes such as
  heart chambers, great vessels, spine or ribs are used when the conventions name them), else from
  HU thresholds and simple geometry on the target (see ``CONTRAST_STRUCTURES``).
- :class:`HeldOutView`: DRRs of the prediction and of the target from gantry angles the model never
  saw, in the batch's own geometry through the framework's projector, compared by PSNR or NCC. Only
  a model that uses its X-rays can improve it beyond what the input views already pin down.

The windowed PSNR/SSIM (lung and soft-tissue windows) are the ``window`` option of
:class:`~x2ct_framework.evaluation.metrics.PSNR` and :class:`~x2ct_framework.evaluation.metrics.SSIM`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from x2ct_framework import conventions
from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.evaluation.metrics import THRESHOLDS, Metric, body_mask, threshold_mask, to_hu

# ---- structures -------------------------------------------------------------------------------
CONTRAST_STRUCTURES = ("lungs", "heart", "chambers", "great_vessels", "lung_vessels", "spine", "ribs")

# Label names (values of ``conventions.LABEL_NAMES``) that make up each structure when the conventions
# define them. A structure none of whose names is defined falls back to its rule in ``_fallback``.
STRUCTURE_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "lungs": ("lung", "lungs", "lung_left", "lung_right", "left_lung", "right_lung"),
    "heart": ("heart", "myocardium", "heart_chambers", "chambers", "cardiac_chambers", "blood_pool",
              "left_ventricle", "right_ventricle", "left_atrium", "right_atrium", "epicardial_fat"),
    "chambers": ("heart_chambers", "chambers", "cardiac_chambers", "blood_pool", "left_ventricle",
                 "right_ventricle", "left_atrium", "right_atrium"),
    "great_vessels": ("great_vessels", "great_vessel", "aorta", "pulmonary_trunk", "pulmonary_artery",
                      "pulmonary_arteries", "vena_cava", "superior_vena_cava", "inferior_vena_cava"),
    "lung_vessels": ("lung_vessels", "lung_vessel", "pulmonary_vessels", "pulmonary_vessel", "vessel_tree"),
    "spine": ("spine", "vertebra", "vertebrae", "vertebral_body"),
    "ribs": ("rib", "ribs", "rib_cage"),
}
GENERIC_NAMES = {"vessel": ("vessel", "vessels"), "bone": ("bone", "bones")}
CHAMBER_HU = 100.0  # blood pool above muscle (50 HU) inside the heart when no chamber code exists
SPINE_HALF_WIDTH = 0.08  # spine fallback: bone within this fraction of the body's width from its midline


def label_codes(names: Sequence[str]) -> list[int]:
    """Codes of ``conventions.LABEL_NAMES`` whose name is one of ``names`` (read at call time)."""
    wanted = {n.lower() for n in names}
    return [int(c) for c, n in getattr(conventions, "LABEL_NAMES", {}).items() if str(n).lower() in wanted]


def _isin(labels: torch.Tensor, codes: Sequence[int]) -> torch.Tensor:
    return torch.isin(labels, torch.tensor(list(codes), device=labels.device, dtype=labels.dtype))


def dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary dilation of ``mask`` [B, 1, D, H, W] by a (2k+1)^3 cube."""
    if k <= 0:
        return mask.bool()
    x = mask.float()
    for kernel in ((2 * k + 1, 1, 1), (1, 2 * k + 1, 1), (1, 1, 2 * k + 1)):  # a cube is separable: 3 passes
        x = F.max_pool3d(x, kernel, stride=1, padding=tuple(c // 2 for c in kernel))
    return x > 0.5


def erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary erosion by a (2k+1)^3 cube (outside the volume counts as inside)."""
    return ~dilate(~mask.bool(), k)


def _fill_slices(mask: torch.Tensor) -> torch.Tensor:
    """Holes filled in every axial slice of ``mask`` [B, 1, D, H, W]."""
    from scipy.ndimage import binary_fill_holes

    m = mask.detach().cpu().numpy()
    out = np.zeros_like(m)
    for b in range(m.shape[0]):
        for z in range(m.shape[2]):
            if m[b, 0, z].any():
                out[b, 0, z] = binary_fill_holes(m[b, 0, z])
    return torch.from_numpy(out).to(mask.device)


def structure_regions(target_hu: torch.Tensor, labels: torch.Tensor | None, body: torch.Tensor,
                      chamber_hu: float = CHAMBER_HU, spine_half_width: float = SPINE_HALF_WIDTH
                      ) -> dict[str, tuple[torch.Tensor, str]]:
    """Each structure of ``CONTRAST_STRUCTURES`` as (mask [B, 1, D, H, W], how it was found).

    With labels, a structure is the union of its codes (``STRUCTURE_LABEL_NAMES``) when the conventions
    define any; otherwise: chambers = heart voxels of the target at or above ``chamber_hu``; lung vessels
    = vessel voxels inside the lungs' outline (holes of the lung mask filled per axial slice); great
    vessels = the other vessel voxels; spine = bone within ``spine_half_width`` of the body's width from its
    midline and behind its centre; ribs = the other bone outside that band. Without labels the generic
    regions (lung, vessel, bone) are the HU thresholds of ``metrics.THRESHOLDS`` inside the body, heart and
    chambers are absent, and great vessels include the contrast-filled heart chambers.
    """
    out: dict[str, tuple[torch.Tensor, str]] = {}
    empty = torch.zeros_like(body, dtype=torch.bool)

    def coded(name: str) -> list[int]:
        return label_codes(STRUCTURE_LABEL_NAMES[name]) if labels is not None else []

    def generic(kind: str) -> tuple[torch.Tensor, str]:
        codes = label_codes(GENERIC_NAMES[kind]) if labels is not None else []
        if codes:
            return _isin(labels, codes), f"label {'/'.join(map(str, codes))}"
        return threshold_mask(target_hu, kind, THRESHOLDS) & body, f"HU {list(THRESHOLDS[kind])} in the body"

    codes = coded("lungs")
    out["lungs"] = ((_isin(labels, codes), f"label {'/'.join(map(str, codes))}") if codes else
                    (threshold_mask(target_hu, "lung", THRESHOLDS) & body, "HU threshold"))
    codes = coded("heart")
    out["heart"] = (_isin(labels, codes), f"label {'/'.join(map(str, codes))}") if codes else (empty, "absent")
    codes = coded("chambers")
    if codes:
        out["chambers"] = (_isin(labels, codes), f"label {'/'.join(map(str, codes))}")
    elif coded("heart"):
        out["chambers"] = (out["heart"][0] & (target_hu >= chamber_hu), f"heart >= {chamber_hu:g} HU")
    else:
        out["chambers"] = (empty, "absent")
    vessels, how = generic("vessel")
    lv, gv = coded("lung_vessels"), coded("great_vessels")
    inside = None
    if not lv or not gv:
        inside = _fill_slices(out["lungs"][0])
    out["lung_vessels"] = ((_isin(labels, lv), f"label {'/'.join(map(str, lv))}") if lv else
                           (vessels & inside, f"{how}, inside the lungs' outline"))
    out["great_vessels"] = ((_isin(labels, gv), f"label {'/'.join(map(str, gv))}") if gv else
                            (vessels & ~inside, f"{how}, outside the lungs' outline"))
    bone, how = generic("bone")
    sp, rb = coded("spine"), coded("ribs")
    band = None
    if not sp or not rb:
        band, behind = _midline_band(body, spine_half_width)
    out["spine"] = ((_isin(labels, sp), f"label {'/'.join(map(str, sp))}") if sp else
                    (bone & band & behind, f"{how}, midline band behind the body's centre"))
    out["ribs"] = ((_isin(labels, rb), f"label {'/'.join(map(str, rb))}") if rb else
                   (bone & ~band, f"{how}, outside the midline band"))
    return out


def _midline_band(body: torch.Tensor, half_width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per case: columns within ``half_width`` of the body's width from its centre column, and rows behind
    (posterior to) its centre row; both [B, 1, D, H, W]."""
    b, _, d, h, w = body.shape
    m = body.reshape(b, d, h, w).float()
    cols = torch.arange(w, device=body.device, dtype=torch.float32)
    rows = torch.arange(h, device=body.device, dtype=torch.float32)
    n = m.flatten(1).sum(1).clamp_min(1)
    cx = (m.sum((1, 2)) * cols).sum(1) / n
    cy = (m.sum((1, 3)) * rows).sum(1) / n
    has = m.sum((1, 2)) > 0  # [B, W]: columns the body reaches
    width = torch.where(has, cols, torch.full_like(cols, float("nan")))
    span = (torch.nan_to_num(width, nan=-1).amax(1) - torch.nan_to_num(width, nan=float(w)).amin(1) + 1).clamp_min(1)
    band = (cols[None] - cx[:, None]).abs() <= half_width * span[:, None]  # [B, W]
    behind = rows[None] >= cy[:, None]  # [B, H]
    return (band[:, None, None, None, :].expand_as(body), behind[:, None, None, :, None].expand_as(body))


# ---- contrast retention -----------------------------------------------------------------------
class StructureContrast:
    """Contrasts and retention of every structure for one (prediction, target) pair, computed once per batch
    and shared by the per-structure metrics of a protocol."""

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, shell: int = 2, min_contrast: float = 20.0,
                 chamber_hu: float = CHAMBER_HU):
        if int(shell) < 1:
            raise ValueError(f"shell must be >= 1 voxel, got {shell!r}")
        if not float(min_contrast) > 0:
            raise ValueError(f"min_contrast must be > 0 HU, got {min_contrast!r}")
        self.hu_window = tuple(float(v) for v in hu_window)
        self.shell, self.min_contrast, self.chamber_hu = int(shell), float(min_contrast), float(chamber_hu)
        self._key = None
        self._value: dict[str, torch.Tensor] = {}

    def contrast(self, hu: torch.Tensor, region: torch.Tensor, shell: torch.Tensor) -> torch.Tensor:
        """Mean HU inside ``region`` minus mean HU in ``shell``, per case; NaN where either is empty."""
        from x2ct_framework.evaluation.metrics import _masked_mean

        return _masked_mean(hu.double(), region) - _masked_mean(hu.double(), shell)

    def __call__(self, pred01: torch.Tensor, target01: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """``{"<structure>": retention [B], "<structure>/target": target contrast (HU), ...}``."""
        labels = batch.get("labels")
        # The same tensor objects (alive, unchanged since) as the last call: the protocol's other structures.
        # Weak references, not addresses: a later batch may reuse freed memory at the same address.
        key = [x for x in (pred01, target01, labels) if isinstance(x, torch.Tensor)]
        if self._key is not None and len(key) == len(self._key) and all(
                ref() is x and x._version == v for (ref, v), x in zip(self._key, key)):
            return self._value
        p, t = to_hu(pred01.clamp(0, 1), self.hu_window), to_hu(target01, self.hu_window)
        if labels is not None:
            labels = labels.to(t.device).reshape(t.shape)
        body = batch.get("body")
        body = body.reshape(t.shape).bool() if body is not None else body_mask(t, labels)
        out = {}
        for name, (region, _) in structure_regions(t, labels, body, self.chamber_hu).items():
            region = region & body if labels is None else region
            shell = dilate(region, self.shell) & ~region & body
            ct, cp = self.contrast(t, region, shell), self.contrast(p, region, shell)
            ok = ct.abs() >= self.min_contrast
            out[name] = torch.where(ok, cp / torch.where(ok, ct, torch.ones_like(ct)), torch.full_like(ct, math.nan))
            out[f"{name}/target"], out[f"{name}/pred"] = ct, cp
        self._key, self._value = [(weakref.ref(x), x._version) for x in key], out
        return out


class ContrastRetention(Metric):
    """Contrast retention of one structure (``structure``), or the mean over the structures a case has
    (``structure = "mean"``): (mean HU inside - mean HU in a ``shell``-voxel shell around it, inside the
    body) of the prediction over the same of the target, on the target's regions. 1 = all contrast kept,
    0 = flat; NaN where the structure is absent or its target contrast is below ``min_contrast`` HU."""

    unit = "ratio"
    uses_body = True

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, structure: str = "mean", shell: int = 2,
                 min_contrast: float = 20.0, chamber_hu: float = CHAMBER_HU, shared: StructureContrast | None = None):
        super().__init__(hu_window)
        if structure != "mean" and structure not in CONTRAST_STRUCTURES:
            raise ValueError(f"structure must be \"mean\" or one of {', '.join(CONTRAST_STRUCTURES)}, "
                             f"got {structure!r}")
        self.structure = structure
        self.shared = shared or StructureContrast(hu_window, shell, min_contrast, chamber_hu)

    def __call__(self, pred, target, batch=None):
        from x2ct_framework.evaluation.metrics import _check_pair

        _check_pair(pred, target)
        with torch.no_grad():  # the shared computation is keyed on the caller's tensor objects (not copies)
            values = self.shared(pred, target, batch or {})
        if self.structure != "mean":
            return values[self.structure].float()
        stack = torch.stack([values[s] for s in CONTRAST_STRUCTURES])
        ok = ~torch.isnan(stack)
        n = ok.sum(0)
        s = torch.where(ok, stack, torch.zeros_like(stack)).sum(0)
        return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, math.nan)).float()


# ---- held-out-view consistency ----------------------------------------------------------------
def _angle_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference of gantry angles in degrees, modulo 360 (0 to 180)."""
    return ((a - b + 180.0) % 360.0 - 180.0).abs()


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Zero-mean normalised cross-correlation of images ``[..., h, w]`` -> ``[...]``; NaN when one is flat."""
    a = a.double().flatten(-2)
    b = b.double().flatten(-2)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


class HeldOutView(Metric):
    """Consistency with X-ray views the model never saw.

    The prediction and the target are both rendered (``physics.drr``) from the gantry ``angles`` (degrees)
    in the batch's own ``geometry`` (copies of its first view turned to each angle); angles within
    ``tolerance`` degrees of one of the batch's views are skipped. ``kind = "psnr"``: PSNR of the DRRs over
    all held-out pixels, data range 1 (DRRs lie in [0, 1]); ``kind = "ncc"``: normalised cross-correlation per
    view, averaged over the views. NaN when the batch has no geometry or no angle is left.
    ``det_size`` (0: the batch's X-ray size) and ``drr_options`` (keyword arguments of ``physics.drr``)
    set how the DRRs are rendered.
    """

    def __init__(self, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, angles: list[float] = (45.0, 135.0),
                 kind: str = "psnr", det_size: int = 0, drr_options: dict | None = None, tolerance: float = 0.5):
        super().__init__(hu_window)
        if kind not in ("psnr", "ncc"):
            raise ValueError(f'kind must be "psnr" or "ncc", got {kind!r}')
        if (not isinstance(angles, (list, tuple)) or not angles
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in angles)):
            raise ValueError(f"angles must be a non-empty list of gantry angles in degrees, got {angles!r}")
        if isinstance(det_size, bool) or not isinstance(det_size, int) or det_size < 0:
            raise ValueError(f"det_size must be an integer >= 0 (0: the X-rays' size), got {det_size!r}")
        self.angles, self.kind, self.det_size = [float(a) for a in angles], kind, det_size
        self.drr_options, self.tolerance = dict(drr_options or {}), float(tolerance)
        self.unit = "dB" if kind == "psnr" else ""

    def held_out(self, angles_seen: torch.Tensor) -> list[float]:
        """The metric's angles that are not within ``tolerance`` of any seen angle ``[V]``."""
        seen = angles_seen.detach().double().cpu()
        return [a for a in self.angles if bool((_angle_gap(torch.tensor(a, dtype=torch.float64), seen)
                                                > self.tolerance).all())]

    def det_shape(self, batch: dict, g: dict) -> tuple[int, int]:
        if self.det_size:
            return self.det_size, self.det_size
        if isinstance(batch.get("xrays"), torch.Tensor):
            return tuple(batch["xrays"].shape[-2:])
        rows, cols = g["detector_px"][0, 0].tolist()
        return int(rows), int(cols)

    def views(self, pred: torch.Tensor, target: torch.Tensor, batch: dict
              ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per case the (prediction, target) DRRs ``[V, 1, h, w]`` of its held-out angles, or None."""
        from x2ct_framework.physics import batched, drr

        b = pred.shape[0]
        if "geometry" not in batch:
            return [None] * b
        g = batched(batch["geometry"], b, pred.device)
        shape = self.det_shape(batch, g)
        out = []
        for i in range(b):
            angles = self.held_out(g["angles"][i])
            if not angles:
                out.append(None)
                continue
            n = len(angles)
            gi = {k: t[i:i + 1, :1].expand(1, n, *t.shape[2:]).clone() for k, t in g.items()}
            gi["angles"] = torch.tensor(angles, device=pred.device, dtype=gi["angles"].dtype)[None]
            both = torch.cat([pred[i:i + 1], target[i:i + 1]]).float()
            d = drr(both, gi, self.hu_window, det_shape=shape, **self.drr_options)
            out.append((d[0], d[1]))
        return out

    def compute(self, pred, target, batch):
        vals = []
        for pair in self.views(pred, target, batch):
            if pair is None:
                vals.append(math.nan)
            elif self.kind == "psnr":
                mse = float(((pair[0].double() - pair[1].double()) ** 2).mean())
                vals.append(10.0 * math.log10(1.0 / max(mse, 1e-20)))
            else:
                vals.append(float(torch.nanmean(ncc(pair[0][:, 0], pair[1][:, 0]))))
        return torch.tensor(vals, dtype=torch.float32, device=pred.device)


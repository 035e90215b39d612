"""Data that checks its own geometry: the framework's DRRs of each case's CT against the X-rays it stores.

A dataset that stores X-rays beside a CT hands out both, plus the geometry it declares for each
view, with the stored images already turned into the detector frame (``physics.geometry``). If that
declaration is right, the stored view and the framework's DRR of the CT at the declared angle are
the same picture (up to the intensity mapping of the tool that made the stored one). For every view
of the first cases this module correlates the stored view with the DRR under all 8 flips/rotations
of the square image, and at the declared angle and the opposite one (a lateral from 90 degrees and
one from 270 degrees mirrored differ only through the cone beam's magnification). When another
(angle, orientation) fits clearly better than the declared one in every case, the check fails and
names the recipe setting that fixes it.

A head-feet flip of the CT and every view together keeps them consistent with each other, so the
DRR comparison cannot see it. The anatomy can: every case's CT is also read for which end its head
is at (:func:`head_end`: the trachea's air column, a single small midline tube of air inside the
body, continues the lungs' air towards the head, while towards the feet the lungs end on the
diaphragm domes and the liver). The framework's CTs have the head at slice 0 (and so the head
towards row 0 of every view); when the conclusive cases say otherwise, the check fails naming the
dataset's setting that flips CT and views back (``head_feet_fixes()`` of the dataset when it has one).

Used by ``x2ct check-data RECIPE`` (table, overlay PNG, exit status 2 on a mismatch) and by
:func:`x2ct_framework.testing.check_stored_geometry` for third-party datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import DataError
from x2ct_framework.physics import ORIENTATIONS, compose_orientation, drr, to_stored

MARGIN = 0.002  # correlation by which another orientation must beat the declared one, in every case checked ...
RESIDUAL_RATIO = 3.0  # ... leaving at most a third of the declared one's shortfall from 1
MIN_FIT = 0.5  # below this even the best candidate does not look like the CT's DRR


def clearly_better(candidate: float, declared: float) -> bool:
    """A lateral from 270 degrees mirrored and one from 90 differ by a few thousandths at small sizes (0.026 on
    a 320 px chest DRR), so "clearly" is relative: well above the declared fit and much closer to 1."""
    return candidate - declared > MARGIN and (1.0 - declared) >= RESIDUAL_RATIO * (1.0 - candidate)


class GeometryMismatch(DataError):
    """The stored X-rays do not show the CT in the geometry the dataset declares."""


@dataclass
class ViewFit:
    case: str
    view: int
    angle: float
    declared: float  # correlation of the stored view with the DRR at the declared angle, as declared
    best_angle: float
    best_orientation: str  # the stored-image transform that fits best (identity = as declared)
    best: float
    scores: dict[tuple[float, str], float] = field(default_factory=dict)


@dataclass
class AnatomyFit:
    case: str
    slices: int  # the CT's length along D
    lungs: tuple[int, int]  # first and last slice holding the lungs' (and airways') air, -1 when none
    tube_first: int  # slices of a single midline air tube (the trachea) at the slice-0 end of that air
    tube_last: int  # ... and at the last-slice end

    @property
    def verdict(self) -> str:
        """``head first`` (the trachea at the slice-0 end), ``feet first`` or ``inconclusive``."""
        need = max(2, round(0.03 * self.slices))
        if self.tube_first >= need and self.tube_last == 0:
            return "head first"
        if self.tube_last >= need and self.tube_first == 0:
            return "feet first"
        return "inconclusive"


AIR_HU = -400.0  # lung parenchyma and airways lie below, every tissue above
BODY_HU = -500.0


def _body(hu: np.ndarray) -> np.ndarray:
    """Per axial slice, the largest connected region above ``BODY_HU`` with its holes filled (no table, no air)."""
    import scipy.ndimage as ndi

    out = np.zeros(hu.shape, bool)
    for z, tissue in enumerate(hu > BODY_HU):
        lab, n = ndi.label(tissue)
        if n:
            biggest = int(np.argmax(ndi.sum(tissue, lab, range(1, n + 1)))) + 1
            out[z] = ndi.binary_fill_holes(lab == biggest)
    return out


def head_end(hu: np.ndarray | torch.Tensor, case: str = "") -> AnatomyFit:
    """Which end of a CT ``[D, H, W]`` (HU) the head is at, from the airways.

    The largest connected body of air inside the body is the lungs with their airways. Walking into it
    from each end along D, the slices where it is one small region (under 3 % of the body's section)
    near the body's midline (within 10 % of its width) are the trachea; that run exists only at the
    head end, since towards the feet the lungs end as two lateral bases on the diaphragm domes. A CT
    without lungs, or whose scan starts below the trachea, is inconclusive.
    """
    import scipy.ndimage as ndi

    hu = hu.detach().cpu().numpy() if isinstance(hu, torch.Tensor) else np.asarray(hu)
    hu = hu.astype(np.float32, copy=False)
    d = hu.shape[0]
    body = _body(hu)
    air = (hu < AIR_HU) & body
    lab, n = ndi.label(air)
    if n == 0 or air.sum() < 0.005 * body.sum():
        return AnatomyFit(case, d, (-1, -1), 0, 0)
    lungs = lab == int(np.argmax(ndi.sum(air, lab, range(1, n + 1)))) + 1
    present = np.nonzero(lungs.any((1, 2)))[0]
    lo, hi = int(present.min()), int(present.max())

    def tube(z: int) -> bool:
        section = lungs[z]
        if ndi.label(section)[1] != 1:
            return False
        columns = np.nonzero(body[z].any(0))[0]
        width = columns.max() - columns.min() + 1
        centre = np.nonzero(section.any(0))[0].mean()
        return (abs(centre - (columns.max() + columns.min()) / 2) < 0.1 * width
                and section.sum() < 0.03 * body[z].sum())

    def run(slices) -> int:
        count = 0
        for z in slices:
            if not tube(z):
                break
            count += 1
        return count

    return AnatomyFit(case, d, (lo, hi), run(range(lo, hi + 1)), run(range(hi, lo - 1, -1)))


@dataclass
class CheckResult:
    fits: list[ViewFit]
    problems: list[str]
    fixes: list[str]
    images: list[tuple[str, int, np.ndarray, np.ndarray]] = field(default_factory=list)
    stored: bool = True  # False: the dataset renders its X-rays from the CT, there was nothing to compare
    anatomy: list[AnatomyFit] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        rows = ["| case | view | angle | declared | best fit | best | verdict |", "|---|---|---|---|---|---|---|"]
        for f in self.fits:
            same = f.best_orientation == "identity" and f.best_angle == f.angle
            verdict = "ok" if same or not clearly_better(f.best, f.declared) else "MISMATCH"
            alt = f"{f.best_orientation} at {f.best_angle:g}"
            rows.append(f"| {f.case} | {f.view} | {f.angle:g} | {f.declared:.3f} | {alt} | {f.best:.3f} | {verdict} |")
        if self.anatomy:
            rows += ["", "| case | lungs' air (slices) | trachea at slice 0 | trachea at the last slice | head |",
                     "|---|---|---|---|---|"]
            for a in self.anatomy:
                span = "none" if a.lungs[0] < 0 else f"{a.lungs[0]}-{a.lungs[1]} of {a.slices}"
                rows.append(f"| {a.case} | {span} | {a.tube_first} | {a.tube_last} | {a.verdict} |")
        return "\n".join(rows)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else 0.0


def _opposite(angle: float) -> float:
    return float((angle + 180.0) % 360.0)


def fit_views(ct01: torch.Tensor, xrays: torch.Tensor, geometry: dict, hu_window: Sequence[float],
              case: str = "", mu_water: float | None = None) -> tuple[list[ViewFit], list[np.ndarray]]:
    """Per view of one case, the correlation of its stored view with the DRR under each (angle, orientation)."""
    size = int(xrays.shape[-1])
    g = {k: torch.as_tensor(v)[None] for k, v in geometry.items()}
    kwargs = {} if mu_water is None else {"mu_water": mu_water}
    with torch.no_grad():
        rendered = drr(ct01[None].float(), g, tuple(hu_window), det_shape=(size, size), **kwargs)[0]
        flipped = dict(g)
        flipped["angles"] = (g["angles"] + 180.0) % 360.0
        opposite = drr(ct01[None].float(), flipped, tuple(hu_window), det_shape=(size, size), **kwargs)[0]
    fits, renders = [], []
    for v in range(xrays.shape[0]):
        angle = float(g["angles"][0, v])
        stored = xrays[v, 0].float()
        scores: dict[tuple[float, str], float] = {}
        for a, image in ((angle, rendered[v, 0]), (_opposite(angle), opposite[v, 0])):
            for code in ORIENTATIONS:
                scores[(a, code)] = correlation(to_stored(image, code), stored)
        (best_angle, best_code), best = max(scores.items(), key=lambda kv: kv[1])
        fits.append(ViewFit(case, v, angle, scores[(angle, "identity")], best_angle, best_code, best, scores))
        renders.append(rendered[v, 0].numpy())
    return fits, renders


def check_anatomy(anatomy: Sequence[AnatomyFit], head_feet_fixes: Sequence[str] | None = None
                  ) -> tuple[list[str], list[str]]:
    """Problems and fixes when the conclusive cases all have the head at the last slice (none at slice 0)."""
    verdicts = [a.verdict for a in anatomy]
    if "feet first" not in verdicts or "head first" in verdicts:
        return [], []
    flipped = [a for a in anatomy if a.verdict == "feet first"]
    cases = ", ".join(f"{a.case} (trachea over slices {a.lungs[1] - a.tube_last + 1}-{a.lungs[1]} of {a.slices}, "
                      f"lungs from slice {a.lungs[0]})" for a in flipped[:3])
    problem = (f"head-feet: the CT's head is at its last slice, not at slice 0 as the framework's orientation "
               f"requires (the trachea's air column continues the lungs towards the last slice in {cases}); the "
               f"stored X-rays follow the CT, so the CT and every view are flipped head-feet together")
    fixes = list(head_feet_fixes) if head_feet_fixes else [
        "the dataset's CT orientation (flip the CT along D and every view's rows together: the head goes to "
        "slice 0 and to row 0 of each view)"]
    return [problem], fixes


def check_items(items: Sequence[dict], hu_window: Sequence[float], declared: Sequence[str] | None = None,
                orientation_key: str = "data.orientation", views_key: str = "data.views",
                mu_water: float | None = None, head_feet_fixes: Sequence[str] | None = None,
                anatomy: bool = True) -> CheckResult:
    """Check dataset items (``ct``, ``xrays``, ``geometry``, ``case_id``); ``declared`` is each view's stored
    orientation as the dataset was told it (identity when unknown), used to name the fix; ``head_feet_fixes``
    the dataset's settings that flip its CT and views head-feet, named when the anatomy says the head is at
    the last slice."""
    if not items:
        raise DataError("check-data: the dataset gave no cases to check")
    fits: list[ViewFit] = []
    images = []
    anatomies: list[AnatomyFit] = []
    lo_hu, hi_hu = float(hu_window[0]), float(hu_window[1])
    for i, item in enumerate(items):
        missing = [k for k in ("ct", "xrays", "geometry") if k not in item]
        if missing:
            raise DataError(f"check-data: case {item.get('case_id', i)!r} has no {', '.join(missing)}; the check needs "
                            f"a dataset that hands out the CT beside its stored X-rays")
        case = str(item.get("case_id", i))
        f, renders = fit_views(item["ct"], item["xrays"], item["geometry"], hu_window, case, mu_water)
        fits += f
        images += [(case, v, renders[v], item["xrays"][v, 0].numpy()) for v in range(len(f))]
        if anatomy and lo_hu < AIR_HU < hi_hu:  # the window must hold the air / tissue thresholds
            ct = item["ct"][0] if item["ct"].dim() == 4 else item["ct"]
            anatomies.append(head_end(lo_hu + ct.float() * (hi_hu - lo_hu), case))
    n_views = max(f.view for f in fits) + 1
    problems, fixes = [], []
    declared = list(declared) if declared and len(declared) == n_views else ["identity"] * n_views
    new_orient, new_views = list(declared), [None] * n_views
    for v in range(n_views):
        per = [f for f in fits if f.view == v]
        angle = per[0].angle
        top = max(f.best for f in per)
        if top < MIN_FIT:
            problems.append(f"view {v} ({angle:g} degrees): no orientation of the stored image looks like the CT's "
                            f"DRR (best correlation {top:.3f} < {MIN_FIT}); check the geometry preset, the HU window "
                            f"and that the images belong to these CTs")
            continue
        # the candidate that fits clearly better than the declared one in every case
        candidates = [k for k in per[0].scores if k != (angle, "identity")
                      and all(clearly_better(f.scores[k], f.declared) for f in per)]
        if not candidates:
            continue
        best_angle, code = max(candidates, key=lambda k: sum(f.scores[k] for f in per))
        mean_best = np.mean([f.scores[(best_angle, code)] for f in per])
        mean_declared = np.mean([f.declared for f in per])
        fix_code = compose_orientation(code, declared[v] if v < len(declared) else "identity")
        new_orient[v] = fix_code
        if best_angle != angle:
            new_views[v] = best_angle
        source = f"from {best_angle:g} degrees " if best_angle != angle else ""
        problems.append(f"view {v} ({angle:g} degrees, declared orientation {declared[v]!r}): the stored image fits "
                        f"the CT's DRR {source}"
                        f"as {fix_code!r} (correlation {mean_best:.3f}) better than as declared ({mean_declared:.3f})")
    if problems and any(o != d for o, d in zip(new_orient, declared)):
        fixes.append(f"{orientation_key} = [{', '.join(repr(o).replace(chr(39), chr(34)) for o in new_orient)}]")
    if any(a is not None for a in new_views):
        angles = [a if a is not None else per_angle for a, per_angle in
                  zip(new_views, [next(f.angle for f in fits if f.view == v) for v in range(n_views)])]
        fixes.append(f"{views_key} = [{', '.join(format(a, 'g') for a in angles)}]")
    if not problems:  # a head-feet flip is judged on views that agree with the CT
        problems, fixes = check_anatomy(anatomies, head_feet_fixes)
    return CheckResult(fits, problems, fixes, images, anatomy=anatomies)


def check_dataset_geometry(dataset, cases: int = 3, hu_window: Sequence[float] | None = None) -> CheckResult:
    """Check the first ``cases`` items of a dataset (its ``hu_window`` and ``orientation`` attributes when present)."""
    n = min(cases, len(dataset))
    items = [dataset[i] for i in range(n)]
    window = hu_window or getattr(dataset, "hu_window", None) or DEFAULT_HU_WINDOW
    fixer = getattr(dataset, "head_feet_fixes", None)
    return check_items(items, window, getattr(dataset, "orientation", None),
                       mu_water=getattr(dataset, "mu_water", None), head_feet_fixes=fixer() if fixer else None)


def stores_xrays(dataset) -> bool:
    """Whether a dataset serves X-rays read from files (``stores_xrays``; else a ``geometry_check`` attribute
    says so) rather than DRRs it renders from the CT itself."""
    declared = getattr(dataset, "stores_xrays", None)
    if declared is not None:
        return bool(declared)
    return hasattr(dataset, "geometry_check")


def guard_stored_geometry(dataset, cases: int = 2) -> CheckResult | None:
    """Before training: check a dataset that says it serves stored X-rays (``geometry_check`` attribute "error" or
    "warn"; "off" or no attribute skips). "error" raises :class:`GeometryMismatch` naming the fix; "warn" logs it."""
    policy = getattr(dataset, "geometry_check", "off")
    if policy == "off" or not len(dataset):
        return None
    result = check_dataset_geometry(dataset, cases)
    if result.ok:
        return result
    fix = f"; fix: set {' and '.join(result.fixes)}" if result.fixes else ""
    message = ("the stored X-rays do not show the CT in the declared geometry (x2ct check-data RECIPE shows the "
               "table and an overlay): " + "; ".join(result.problems) + fix)
    if policy == "warn":
        import logging

        logging.getLogger("x2ct_framework.datacheck").warning("%s (data.check_geometry = \"warn\")", message)
        return result
    raise GeometryMismatch(message + '; data.check_geometry = "warn" trains anyway')


def write_overlay(result: CheckResult, path: Path) -> Path:
    """One row per case, one tile per view: the framework's DRR in magenta, the stored view in green."""
    from PIL import Image

    def unit(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        return (a - a.min()) / (a.max() - a.min() + 1e-12)

    cases = list(dict.fromkeys(c for c, *_ in result.images))
    views = max(v for _, v, *_ in result.images) + 1
    size = result.images[0][2].shape[-1]
    canvas = np.zeros((len(cases) * size, views * size, 3), np.uint8)
    for case, v, rendered, stored in result.images:
        r = cases.index(case)
        d, s = unit(rendered), unit(stored)
        tile = np.stack([d, s, d], -1)
        canvas[r * size:(r + 1) * size, v * size:(v + 1) * size] = (tile * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)
    return path


def check_data(recipe_path: str, overrides: Sequence[str] = (), cases: int = 3, split: str = "train",
               stage_index: int = 1, out: str = "") -> tuple[CheckResult, Path | None]:
    """Build the recipe's dataset for ``split`` at stage ``stage_index`` and check its first ``cases``."""
    from x2ct_framework.config.build import build_dataset, load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    load_recipe_plugins(recipe)
    all_stages = stages(recipe)
    if not 1 <= stage_index <= len(all_stages):
        raise DataError(f"check-data: --stage {stage_index} is not a stage of {recipe.path} (1..{len(all_stages)})")
    stage = all_stages[stage_index - 1]
    dataset = build_dataset(recipe, stage, split)
    if not stores_xrays(dataset):
        return CheckResult([], [], [], stored=False), None
    window = recipe["data"].get("hu_window") or getattr(dataset, "hu_window", None)
    result = check_dataset_geometry(dataset, cases, window)
    folder = Path(out) if out else Path(recipe["output_dir"]) / recipe.name
    png = write_overlay(result, folder / "check_data.png")
    return result, png

"""Statistics of the synthetic chest phantom, per version, to set beside a real chest CT.

``python -m x2ct_framework.phantom_stats [--resolution 128] [--seeds 20] [--versions 1 2]`` prints one
table (median over seeds, with the spread across seeds for the body size) and can write it as JSON.
Every number is measured on the rendered grid and its labels, the same way for every version:

- median HU per tissue: lung, fat, soft tissue (label 1), heart muscle (heart label below 150 HU),
  cardiac blood pool (heart label at 150 HU or more), contrast vessels, bone (all), bone interior
  (bone voxels whose six neighbours are bone: cancellous bone at this voxel size) and bone surface
  (the other bone voxels: the cortical shell with its partial volume);
- lung volume (mL, the lung label) and lung height (mm, apex to the deepest recess);
- rib cross-sections per mid-thoracic axial slice: 2D connected bone components in the axial slices
  at 40-50 % of the lung height, leaving out those within 40 mm of the body's midline (spine,
  sternum) and those larger than 700 mm^2 (scapulae, humeri), averaged over those slices;
- vessel tree: segments the renderer paints in the pulmonary trees, the thinnest one's diameter, the
  vessel share of the lungs (%), and vessel cross-sections per mid-thoracic slice inside the lungs;
- body width and depth (mm) at the mid-thoracic slice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch

from x2ct_framework import conventions as C
from x2ct_framework import phantom as ph

TREE_LABELS = (C.VESSEL, C.P_LUNG_ARTERY, C.P_LUNG_VEIN)


@contextlib.contextmanager
def _count_tree_segments(record: dict):
    """Count the tube segments painted with a minimum radius into the vessel codes (the pulmonary trees)."""
    original = ph._Canvas.tube

    def tube(self, points, radii, value, label, min_radius=0.0):
        if min_radius > 0 and label in TREE_LABELS:
            for r0, r1 in zip(radii[:-1], radii[1:]):
                if max(r0, r1) >= min_radius:
                    record["segments"] += 1
                    record["min_radius"] = min(record["min_radius"], float(min(r0, r1)))
        return original(self, points, radii, value, label, min_radius)

    from x2ct_framework import phantom_v2

    batch = phantom_v2._PartCanvas.segments

    def segments(self, segs, value, part, chunk=1024):
        if part in TREE_LABELS:
            for _a, _b, r0, r1 in segs:
                record["segments"] += 1
                record["min_radius"] = min(record["min_radius"], float(min(r0, r1)))
        return batch(self, segs, value, part, chunk)

    ph._Canvas.tube, phantom_v2._PartCanvas.segments = tube, segments
    try:
        yield record
    finally:
        ph._Canvas.tube, phantom_v2._PartCanvas.segments = original, batch


def _components_2d(mask: torch.Tensor):
    from scipy import ndimage

    lab, n = ndimage.label(mask.numpy())
    return lab, n


def case_statistics(version: int, seed: int, resolution: int = 128, volume_mm: float = 320.0) -> dict:
    """The statistics of one case (see the module's description)."""
    from scipy import ndimage

    record = {"segments": 0, "min_radius": math.inf}
    t0 = time.perf_counter()
    with _count_tree_segments(record):
        hu, labels = ph.chest_phantom(resolution, seed, version=version, volume_mm=volume_mm)
    seconds = time.perf_counter() - t0
    vox = volume_mm / resolution
    out: dict[str, float] = {"seconds": seconds}

    def med(mask):
        return float(hu[mask].median()) if mask.any() else math.nan

    heart = labels == C.HEART
    bone = labels == C.BONE
    interior = torch.from_numpy(ndimage.binary_erosion(bone.numpy()))
    out.update({"hu_lung": med(labels == C.LUNG), "hu_fat": med(labels == C.FAT), "hu_soft": med(labels == C.SOFT),
                "hu_heart": med(heart), "blood_share_of_heart_pct": 100.0 * float((heart & (hu >= 150)).sum())
                / max(float(heart.sum()), 1.0),
                "hu_myocardium": med(heart & (hu < 150)), "hu_blood_pool": med(heart & (hu >= 150)),
                "hu_vessel": med(labels == C.VESSEL), "hu_bone": med(bone), "hu_bone_interior": med(interior),
                "hu_bone_surface": med(bone & ~interior),
                "bone_interior_fraction": float(interior.sum()) / max(float(bone.sum()), 1.0)})
    lung = labels == C.LUNG
    zs = lung.flatten(1).any(1).nonzero().flatten()
    out["lung_ml"] = float(lung.sum()) * vox**3 / 1000.0
    out["lung_height_mm"] = float(zs.max() - zs.min() + 1) * vox
    lo = int(zs.min() + 0.4 * (zs.max() - zs.min()))
    hi = max(int(zs.min() + 0.5 * (zs.max() - zs.min())), lo + 1)
    ribs, vessels, widths, depths = [], [], [], []
    xs = (torch.arange(resolution) + 0.5) * vox
    for k in range(lo, hi):
        body = (labels[k] != C.BACKGROUND) & (labels[k] != C.TABLE)
        cols, rows = body.any(0).nonzero().flatten(), body.any(1).nonzero().flatten()
        widths.append(float(cols.max() - cols.min() + 1) * vox)
        depths.append(float(rows.max() - rows.min() + 1) * vox)
        mid_x = float(xs[cols].mean())
        lab, n = _components_2d(bone[k])
        count = 0
        for j in range(1, n + 1):
            comp = torch.from_numpy(lab == j)
            area = float(comp.sum()) * vox**2
            cx = float(xs[comp.nonzero()[:, 1]].mean())
            if area <= 700.0 and abs(cx - mid_x) > 40.0:
                count += 1
        ribs.append(count)
        # vessel cross-sections inside the lungs: vessel components that touch lung voxels
        near_lung = torch.from_numpy(ndimage.binary_dilation(lung[k].numpy(), iterations=1))
        lab, n = _components_2d(labels[k] == C.VESSEL)
        touching = set(torch.from_numpy(lab)[near_lung].unique().tolist()) - {0}
        vessels.append(len(touching))
    thorax = lung | ((labels == C.VESSEL) & torch.from_numpy(ndimage.binary_dilation(lung.numpy(), iterations=1)))
    out.update({"ribs_per_slice": statistics.mean(ribs), "lung_vessels_per_slice": statistics.mean(vessels),
                "vessel_share_of_lung_pct": 100.0 * float((thorax & ~lung).sum()) / max(float(thorax.sum()), 1.0),
                "tree_segments": float(record["segments"]),
                "thinnest_vessel_mm": 2.0 * record["min_radius"],
                "body_width_mm": statistics.mean(widths), "body_depth_mm": statistics.mean(depths)})
    return out


def version_statistics(version: int, seeds=range(20), resolution: int = 128) -> dict:
    """Median over cases of every statistic, plus the spread of body width and depth (std / mean, %)."""
    cases = [case_statistics(version, s, resolution) for s in seeds]
    out = {k: statistics.median(c[k] for c in cases) for k in cases[0]}
    for k in ("body_width_mm", "body_depth_mm", "lung_ml"):
        vals = [c[k] for c in cases]
        out[k + "_cv_pct"] = 100.0 * statistics.pstdev(vals) / statistics.mean(vals)
        out[k + "_min"], out[k + "_max"] = min(vals), max(vals)
    out["cases"] = len(cases)
    return out


ROWS = [("hu_lung", "lung, median HU"), ("hu_fat", "fat, median HU"), ("hu_soft", "soft tissue (label 1), median HU"),
        ("hu_heart", "heart (label 5), median HU"), ("blood_share_of_heart_pct", "blood pool share of the heart, %"),
        ("hu_myocardium", "heart muscle (< 150 HU), median HU"), ("hu_blood_pool", "cardiac blood pool, median HU"),
        ("hu_vessel", "contrast vessels, median HU"), ("hu_bone", "bone, median HU"),
        ("hu_bone_interior", "bone interior (cancellous), median HU"),
        ("hu_bone_surface", "bone surface (cortex), median HU"), ("lung_ml", "lung volume, mL"),
        ("lung_height_mm", "lung height, mm"), ("ribs_per_slice", "rib cross-sections per mid-thoracic slice"),
        ("lung_vessels_per_slice", "lung vessel cross-sections per mid-thoracic slice"),
        ("vessel_share_of_lung_pct", "vessel share of the lungs, %"), ("tree_segments", "pulmonary tree segments"),
        ("thinnest_vessel_mm", "thinnest tree vessel, diameter mm"), ("body_width_mm", "body width, mm"),
        ("body_width_mm_cv_pct", "body width spread across cases (std/mean), %"),
        ("body_depth_mm", "body depth, mm"), ("body_depth_mm_cv_pct", "body depth spread across cases (std/mean), %"),
        ("bone_interior_fraction", "bone interior share of bone voxels"),
        ("lung_ml_cv_pct", "lung volume spread across cases (std/mean), %"), ("seconds", "seconds per case")]


def table(stats: dict[int, dict]) -> str:
    versions = sorted(stats)
    lines = ["| statistic | " + " | ".join(f"v{v}" for v in versions) + " |",
             "|---|" + "---:|" * len(versions)]
    for key, name in ROWS:
        cells = []
        for v in versions:
            val = stats[v].get(key, math.nan)
            cells.append(f"{val:.2f}" if key in ("seconds",) else f"{val:.1f}" if abs(val) < 100 else f"{val:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Statistics of the synthetic chest phantom per version.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--versions", type=int, nargs="+", default=list(ph.PHANTOM_VERSIONS))
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stats = {v: version_statistics(v, range(args.seeds), args.resolution) for v in args.versions}
    print(f"{args.seeds} cases per version at {args.resolution}^3 over 320 mm")
    print(table(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=1)


if __name__ == "__main__":
    main()

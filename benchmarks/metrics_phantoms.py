"""The new metrics on chest phantoms at 64^3 (x2ctgan cone beam, views 0 and 90): the target itself, the target
blurred (Gaussian sigma 1.5 voxels) and the voxel-wise mean of four other phantoms; the table of docs/evaluation.md.

    OMP_NUM_THREADS=1 python -m benchmarks.metrics_phantoms
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from x2ct_framework.evaluation.protocols import build_protocol
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.physics import make_geometry

HU = (-1000.0, 3000.0)
KEYS = ["psnr", "ssim", "psnr_lung", "ssim_lung", "psnr_soft", "ssim_soft", "contrast_retention", "contrast_lungs",
        "contrast_heart", "contrast_chambers", "contrast_great_vessels", "contrast_lung_vessels", "contrast_spine",
        "contrast_ribs", "heldout_view_psnr", "heldout_view_ncc", "hf_energy_ratio", "edge_sharpness", "lpips3"]


def to01(hu: torch.Tensor) -> torch.Tensor:
    return ((hu.clamp(*HU) - HU[0]) / (HU[1] - HU[0])).float()


def main(n: int = 64) -> None:
    cases = [chest_phantom(n, s) for s in range(6)]
    target = torch.stack([to01(hu) for hu, _ in cases[:2]])[:, None]
    labels = torch.stack([lab for _, lab in cases[:2]])[:, None]
    blind = to01(torch.stack([hu for hu, _ in cases[2:]]).mean(0))[None, None].expand(2, 1, n, n, n).contiguous()
    blur = torch.stack([to01(torch.tensor(gaussian_filter(hu.numpy().astype(np.float64), 1.5)).float())
                        for hu, _ in cases[:2]])[:, None]
    g = make_geometry([0, 90], "x2ctgan")
    batch = {"labels": labels, "geometry": {k: v[None].expand(2, *v.shape) for k, v in g.items()},
             "xrays": torch.zeros(2, 2, 1, 64, 64)}
    proto = build_protocol("default", HU, lpips="auto")
    rows = {}
    for name, pred in (("target", target), ("blur_s1.5", blur), ("blind_mean_of_4", blind)):
        proto.reset()
        t0 = time.perf_counter()
        out = proto(pred, target, batch)
        wall = time.perf_counter() - t0
        rows[name] = {k: out[f"default/{k}"].mean().item() for k in KEYS}
        rows[name]["fid3d"] = proto.set_results()["default/fid3d"]
        rows[name]["seconds_per_case"] = wall / 2
    print("| metric | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in [*KEYS, "fid3d", "seconds_per_case"]:
        print(f"| {k} | " + " | ".join(f"{rows[r][k]:.3f}" for r in rows) + " |")
    print("notes:", *proto.notes, sep="\n- ")


if __name__ == "__main__":
    main()

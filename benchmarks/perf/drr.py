"""DRR projector speed: PA + lateral 128^2 views of a chest-sized CT (512x512x133) and of a 128^3 volume.

Beside ``x2ct_framework.physics.project`` the same run times a plain reference: cone-beam ray
marching with ``torch.nn.functional.grid_sample`` (trilinear, 500 samples a ray over the volume's
extent), forward and forward+backward, in the X2CT-GAN geometry (source-isocentre 541 mm,
source-detector 949 mm, 500 mm detector) at 128^2 pixels. ``ratio`` = ours / reference (median wall
time); ``rel_diff`` is the mean absolute difference between the two images over the reference's mean,
to show both compute the same line integrals.

Run: ``python -m benchmarks.perf.drr`` (``--quick`` for fewer repeats). Targets on 2 CPU cores: the
512x512x133 pair under 150 ms, the 128^3 pair under 15 ms (forward).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from benchmarks.perf.common import machine, markdown_table, timeit
from x2ct_framework.physics import make_geometry, project, view_frames
from x2ct_framework.physics.geometry import batched

CASES = [  # name, [D, H, W], volume (x, y, z) mm, forward target ms
    ("chest 512x512x133", (133, 512, 512), (358.4, 358.4, 332.5), 150.0),
    ("cube 128^3", (128, 128, 128), (320.0, 320.0, 320.0), 15.0),
]
DET = (128, 128)
SAMPLES = 500


def reference_project(mu: torch.Tensor, geometry: dict, det_shape=DET, samples: int = SAMPLES) -> torch.Tensor:
    """Ray marching: ``samples`` trilinear samples per ray, evenly spaced over the volume's bounding sphere."""
    g = batched(geometry, 1, mu.device, mu.dtype)
    fr = view_frames(g)
    h, w = det_shape
    cu = (torch.arange(w, dtype=mu.dtype) + 0.5 - w / 2) * (g["detector_mm"][..., 0:1] / w)
    rv = (torch.arange(h, dtype=mu.dtype) + 0.5 - h / 2) * (g["detector_mm"][..., 1:2] / h)
    pix = (fr["center"][:, :, None, None] + cu[:, :, None, :, None] * fr["u"][:, :, None, None]
           + rv[:, :, :, None, None] * fr["v"][:, :, None, None])  # [1, V, h, w, 3]
    src = fr["source"][:, :, None, None]
    direction = pix - src
    direction = direction / direction.norm(dim=-1, keepdim=True)
    ext = g["volume_mm"][0, 0]
    radius = float(ext.norm()) / 2
    sid = float(g["sid"][0, 0])
    step = 2 * radius / samples
    t = sid - radius + (torch.arange(samples, dtype=mu.dtype) + 0.5) * step
    points = src[..., None, :] + t[:, None] * direction[..., None, :]  # [1, V, h, w, S, 3]
    grid = (points / (ext / 2))[0]  # x, y, z order = W, H, D as grid_sample expects
    v = grid.shape[0]
    out = F.grid_sample(mu.expand(v, -1, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # [V, C, h, w, S]
    return (out.sum(-1) * step)[None]


def chest_like(shape, generator) -> torch.Tensor:
    """A smooth random attenuation volume (about water, 0.02 / mm) of the given shape."""
    d, h, w = shape
    coarse = torch.rand(1, 1, max(2, d // 8), max(2, h // 8), max(2, w // 8), generator=generator)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False) * 0.03


def run(quick: bool = False) -> list[dict]:
    repeat, warmup = (3, 1) if quick else (9, 2)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape, volume_mm, target in CASES:
        mu = chest_like(shape, gen)
        g = make_geometry([0.0, 90.0], "x2ctgan", volume_mm=volume_mm, detector_px=DET[0])
        ours = project(mu, g, DET)
        ref = reference_project(mu, g)
        rel = float((ours - ref).abs().mean() / ref.abs().mean())
        leaf = mu.clone().requires_grad_(True)

        def fwd_bwd(fn):
            def step():
                leaf.grad = None
                fn(leaf).sum().backward()
            return step

        timings = {
            "forward": (timeit(lambda: project(mu, g, DET), repeat, warmup),
                        timeit(lambda: reference_project(mu, g), max(2, repeat // 3), 1)),
            "forward+backward": (timeit(fwd_bwd(lambda m: project(m, g, DET)), repeat, warmup),
                                 timeit(fwd_bwd(lambda m: reference_project(m, g)), max(2, repeat // 3), 1)),
        }
        for mode, (t_ours, t_ref) in timings.items():
            ms, ref_ms = 1000 * t_ours["median_s"], 1000 * t_ref["median_s"]
            rows.append({
                "volume": name, "views": "PA+lateral 128^2", "mode": mode, "ours_ms": ms,
                "ours_min_ms": 1000 * t_ours["min_s"], "reference_ms": ref_ms, "ratio": ms / ref_ms,
                "speedup": ref_ms / ms, "rel_diff": rel,
                "target_ms": target if mode == "forward" else math.nan,
                "meets_target": (ms < target) if mode == "forward" else "",
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {machine()}; load average {load} (other processes share these cores)\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

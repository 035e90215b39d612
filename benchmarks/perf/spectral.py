"""Spectral simulator cost beside the monoenergetic projection of the same CT, in the same run.

One chest phantom (``chest_pa`` materials: M = 5 without contrast, 6 with the CTPA scheme) at R^3,
PA + lateral at R^2 in the X2CT-GAN geometry. ``mono`` is today's DRR (HU -> attenuation -> one
projected channel, ``drr.drr``); each spectral row is the whole chain of a preset (HU -> M material
densities projected as M channels of one ``project`` call, per-bin exponentials, scatter, blur, noise, display
processing). ``ratio`` = the median over interleaved (mono, spectral) pairs of spectral / mono; the
budget is M + 0.5 (M projections plus half a projection for everything else). Forward and
forward+backward (gradient to the CT).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.spectral [--resolution 128] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.perf.common import machine, markdown_table
from x2ct_framework.conventions import hu_to_unit
from x2ct_framework.physics import drr, make_geometry, resolve_xray, simulate
from x2ct_framework.physics.spectral import energy_bins


def run(quick: bool = False, resolution: int = 128) -> list[dict]:
    from x2ct_framework.phantom import chest_phantom

    repeat, warmup = (5, 1) if quick else (9, 2)
    hu, _ = chest_phantom(resolution, seed=7)
    ct = hu_to_unit(hu)[None, None].float()
    geo = make_geometry([0.0, 90.0], "x2ctgan")
    det = (resolution, resolution)
    presets = {"chest_pa": ("chest_pa", False), "chest_pa + contrast (CTPA)": ({"preset": "chest_pa",
                                                                                 "contrast": True}, True),
               "portable_ap": ("portable_ap", False), "fluoro": ("fluoro", False)}
    rows = []
    for mode in ("forward", "forward+backward"):
        leaf = ct.clone().requires_grad_(mode != "forward")

        def step(fn):
            if mode == "forward":
                with torch.no_grad():
                    fn(ct)
            else:
                leaf.grad = None
                fn(leaf).sum().backward()

        def mono(x):
            return drr(x, geo, det_shape=det)

        for name, (spec, contrast) in presets.items():
            p = resolve_xray(spec)
            m = 6 if contrast else 5  # materials.scheme_materials
            bins = int(energy_bins(p, ["water"])[0].shape[0])
            gen = torch.Generator().manual_seed(0)

            def spectral(x, spec=spec, gen=gen):
                return simulate(x, geo, spec, det_shape=det, generator=gen)

            # interleaved (mono, spectral) pairs: a busy machine slows both alike
            for _ in range(warmup):
                step(mono)
                step(spectral)
            t_mono, t_spec = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                step(mono)
                t1 = time.perf_counter()
                step(spectral)
                t_mono.append(t1 - t0)
                t_spec.append(time.perf_counter() - t1)
            ratio = statistics.median(b / a for a, b in zip(t_mono, t_spec))
            rows.append({"mode": mode, "preset": name, "materials_M": m, "energy_bins": bins,
                         "mono_ms": 1e3 * statistics.median(t_mono), "spectral_ms": 1e3 * statistics.median(t_spec),
                         "ratio": ratio, "budget": m + 0.5, "within_budget": ratio <= m + 0.5})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    rows = run(quick=args.quick, resolution=args.resolution)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {machine()}; load average {load}; {args.resolution}^3 chest phantom, PA + lateral "
          f"{args.resolution}^2, x2ctgan geometry\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

"""A generative run's samples gallery on its test split: target, the regression it refines, one sample, the mean of
K samples and their per-voxel standard deviation, for the first N test cases (the figure the run report draws as
``samples.png``, for any run folder, without rescoring the whole split).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.samples_gallery benchmarks/out/matrix/cpu_refiner/refiner-s0
docs/images/refiner_samples.png --cases 2 --samples 8``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.samples_gallery", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder of a generative model (or its checkpoint folder)")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--cases", type=int, default=2, help="the first N test cases")
    parser.add_argument("--samples", type=int, default=8, help="samples per case")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    from x2ct_framework.evaluation import evaluate as ev_mod
    from x2ct_framework.evaluation.report import plot_samples
    from x2ct_framework.runs import resolve_target

    target = resolve_target(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        ev = ev_mod.evaluate(target, args.split, ["default"], max_cases=args.cases, keep_first=args.cases, n_boot=100,
                             worst=0, out_dir=tmp, progress=False, lpips="off", samples=args.samples)
    first = [ev.kept[i] for i in sorted(ev.kept) if i < args.cases]
    if not first or "sample" not in first[0]:
        parser.error(f"{args.run}: not a generative model's run (no samples to draw)")
    print(plot_samples(first, ev.info["hu_window"], Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run: python benchmarks/results/cpu/cpu_refiner_v5/paired.py benchmarks/out/matrix/cpu_refiner
         [--cells A B ...] [--pairs REF:CELL ...] [--case-pairs REF:CELL ...] [--stored CELL=FOLDER ...]
         [--case-metrics M ...]

Cells of a generative matrix side by side: every cell's mean [95 % t over runs], the differences paired by seed
(a regression's values stand for its single sample too), and the protocol metrics (the mean of 8 for generative
cells) paired case by case with the two-level bootstrap; all through the matrix runner's own result files and
statistics. The defaults are this folder's comparison (refiner_long_drop against refiner_long and the regression);
`../cpu_refiner_v6/README.md` gives that folder's arguments. `--stored CELL=FOLDER` reads a cell's runs from a
committed results folder's per_seed.csv / per_case.csv (`benchmarks.variants.tables.read_tables`, 6 significant
digits) instead of the output folder: a cell whose run folders are gone pairs with new runs of the same machine."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.variants.runner import read_result, result_path
from benchmarks.variants.tables import read_tables
from benchmarks.variants.stats import (as_one_sample, hierarchical_bootstrap, interval, paired,
                                       per_case_pairs)
from benchmarks.variants.stats import fmt_interval as fmt

REGRESSIONS = ("vit", "blind_mean")  # cells with one prediction: it is their single sample too
METRICS = ["psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3", "uncertainty_spearman",
           "uncertainty_coverage", "samples/diversity_hu", "one_sample/psnr", "one_sample/ssim",
           "one_sample/hf_energy_ratio", "one_sample/edge_sharpness", "one_sample/lpips3"]
CASE_METRICS = ("psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3")

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--cells", nargs="+", default=["vit", "refiner", "refiner_long", "refiner_long_drop"])
parser.add_argument("--pairs", nargs="+", default=["refiner_long:refiner_long_drop", "vit:refiner_long_drop"])
parser.add_argument("--case-pairs", nargs="+", default=["refiner_long:refiner_long_drop", "vit:refiner_long_drop",
                                                        "blind_mean:refiner_long_drop"])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--stored", nargs="+", default=[], metavar="CELL=FOLDER")
parser.add_argument("--case-metrics", nargs="+", default=list(CASE_METRICS))
args = parser.parse_args()
stored = dict(s.split("=", 1) for s in args.stored)
pairs = [p.split(":") for p in args.pairs]
case_pairs = [p.split(":") for p in args.case_pairs]
names = {*args.cells, *(c for p in pairs + case_pairs for c in p)}
runs = {c: ([r for r in read_tables(Path(stored[c]), c) if r["seed"] in args.seeds] if c in stored
            else [read_result(result_path(args.out, c, s)) for s in args.seeds]) for c in names}
paired_runs = {c: as_one_sample(r) if c in REGRESSIONS else r for c, r in runs.items()}

print("| cell | " + " | ".join(METRICS) + " |")
for c in args.cells:
    cols = [fmt(i) if (i := interval([r["metrics"].get(m) for r in runs[c]]))["n"] == len(args.seeds) else "-"
            for m in METRICS]
    print(f"| {c} | " + " | ".join(cols) + " |")
print()
for a, b in pairs:
    print(f"## {b} - {a}, by seed")
    for m in METRICS:
        d = paired(paired_runs[a], paired_runs[b], m)
        if d["n"] == len(args.seeds):
            seeds = (f"per seed {[round(r['metrics'][m], 4) for r in runs[b]]} vs "
                     f"{[round(r['metrics'][m], 4) for r in paired_runs[a]]}")
            print(f"  {m}: {fmt(d, '+')}  {seeds}")
print("## case-paired (two-level bootstrap), protocol metrics (the mean of 8 for generative cells; one_sample/*: "
      "one sample)")
for a, b in case_pairs:
    for m in args.case_metrics:
        print(f"  {b} - {a} {m}: {fmt(hierarchical_bootstrap(per_case_pairs(paired_runs[a], paired_runs[b], m)), '+')}")

"""Run: python benchmarks/results/cpu/cpu_refiner_v5/paired.py benchmarks/out/matrix/cpu_refiner

refiner_long_drop against refiner_long (and the regression): every cell's mean [95 % t over runs], the differences
paired by seed, and the protocol metrics (the mean of 8 for generative cells) paired case by case with the
two-level bootstrap; all through the matrix runner's own result files and statistics."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.variants.runner import read_result, result_path
from benchmarks.variants.stats import (as_one_sample, hierarchical_bootstrap, interval, paired,
                                       per_case_pairs)
from benchmarks.variants.stats import fmt_interval as fmt

out = Path(sys.argv[1])
SEEDS = (0, 1, 2)
CELLS = ["vit", "refiner", "refiner_long", "refiner_long_drop"]
METRICS = ["psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3", "uncertainty_spearman",
           "uncertainty_coverage", "samples/diversity_hu", "one_sample/psnr", "one_sample/ssim",
           "one_sample/hf_energy_ratio", "one_sample/edge_sharpness", "one_sample/lpips3"]
runs = {c: [read_result(result_path(out, c, s)) for s in SEEDS] for c in [*CELLS, "blind_mean"]}

print("| cell | " + " | ".join(METRICS) + " |")
for c in CELLS:
    cols = [fmt(i) if (i := interval([r["metrics"].get(m) for r in runs[c]]))["n"] == len(SEEDS) else "-"
            for m in METRICS]
    print(f"| {c} | " + " | ".join(cols) + " |")
print()
for a, b in (("refiner_long", "refiner_long_drop"), ("vit", "refiner_long_drop")):
    print(f"## {b} - {a}, by seed")
    ref = as_one_sample(runs[a]) if a == "vit" else runs[a]
    for m in METRICS:
        d = paired(ref, runs[b], m)
        if d["n"] == len(SEEDS):
            seeds = (f"per seed {[round(r['metrics'][m], 4) for r in runs[b]]} vs "
                     f"{[round(r['metrics'][m], 4) for r in ref]}")
            print(f"  {m}: {fmt(d, '+')}  {seeds}")
print("## case-paired (two-level bootstrap), protocol metrics (the mean of 8 for generative cells)")
for a, b in (("refiner_long", "refiner_long_drop"), ("vit", "refiner_long_drop"), ("blind_mean", "refiner_long_drop")):
    for m in ("psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3"):
        print(f"  {b} - {a} {m}: {fmt(hierarchical_bootstrap(per_case_pairs(runs[a], runs[b], m)), '+')}")

"""Run: python benchmarks/results/cpu/cpu_refiner_v6/paired.py benchmarks/out/matrix/cpu_refiner RESCORE_CELL

The rescore cell (refiner_long_drop's weights sampled another way) against refiner_long_drop (the same weights,
the matrix's sampler) and against the regression: every cell's mean [95 % t over the 3 runs], the differences
paired by seed, and the protocol metrics (the mean of 8 for generative cells) paired case by case with the
two-level bootstrap; all through the matrix runner's own result files and statistics."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.variants.runner import read_result, result_path
from benchmarks.variants.stats import (as_one_sample, hierarchical_bootstrap, interval, paired,
                                       per_case_pairs)
from benchmarks.variants.stats import fmt_interval as fmt

out, rescore = Path(sys.argv[1]), sys.argv[2]
SEEDS = (0, 1, 2)
CELLS = ["vit", "refiner_long_drop", rescore]
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
for a, b in (("refiner_long_drop", rescore), ("vit", rescore), ("vit", "refiner_long_drop")):
    print(f"## {b} - {a}, by seed")
    ref = as_one_sample(runs[a]) if a == "vit" else runs[a]
    for m in METRICS:
        d = paired(ref, runs[b], m)
        if d["n"] == len(SEEDS):
            seeds = (f"per seed {[round(r['metrics'][m], 4) for r in runs[b]]} vs "
                     f"{[round(r['metrics'][m], 4) for r in ref]}")
            print(f"  {m}: {fmt(d, '+')}  {seeds}")
print("## case-paired (two-level bootstrap over runs, then cases)")
for a, b in (("refiner_long_drop", rescore), ("vit", rescore), ("blind_mean", rescore)):
    ref = as_one_sample(runs[a]) if a in ("vit", "blind_mean") else runs[a]
    for m in ("psnr", "hf_energy_ratio", "edge_sharpness", "lpips3", "one_sample/psnr", "one_sample/hf_energy_ratio",
              "one_sample/edge_sharpness", "one_sample/lpips3"):
        pairs = per_case_pairs(ref, runs[b], m)
        if pairs and all(pairs):
            print(f"  {b} - {a} {m}: {fmt(hierarchical_bootstrap(pairs), '+')}")

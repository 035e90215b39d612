"""Run: python benchmarks/results/cpu/cpu_refiner_v5/paired.py benchmarks/out/matrix/cpu_refiner

refiner_long_drop against refiner_long (and the regression): seed-paired t intervals from per_seed.csv, and
case-paired two-level bootstrap for the protocol metrics from the results' per-case values."""
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from benchmarks.variants.stats import interval, hierarchical_bootstrap

out = Path(sys.argv[1])
rows = list(csv.DictReader(open(out / "per_seed.csv")))
def vals(cell, m):
    r = {int(x["seed"]): float(x[m]) for x in rows if x["cell"] == cell and x[m] not in ("", None)}
    return [r[s] for s in sorted(r)]
cells = ["vit", "refiner", "refiner_long", "refiner_long_drop"]
ms = ["psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3", "uncertainty_spearman", "uncertainty_coverage",
      "samples/diversity_hu", "one_sample/psnr", "one_sample/ssim", "one_sample/hf_energy_ratio",
      "one_sample/edge_sharpness", "one_sample/lpips3"]
print("| cell | " + " | ".join(ms) + " |")
for c in cells:
    cols = []
    for m in ms:
        v = vals(c, m)
        if len(v) == 3:
            i = interval(v)
            cols.append(f"{i['mean']:.4g} [{i['ci_low']:.4g}, {i['ci_high']:.4g}]")
        else:
            cols.append("-")
    print(f"| {c} | " + " | ".join(cols) + " |")
print()
for a, b in (("refiner_long", "refiner_long_drop"), ("vit", "refiner_long_drop")):
    print(f"## {b} - {a}, by seed")
    for m in ms:
        x, y = vals(a, m), vals(b, m)
        if a == "vit" and m.startswith("one_sample/"):
            x = vals(a, m.split("/", 1)[1])
        if len(x) == 3 and len(y) == 3:
            d = [q - p for p, q in zip(x, y)]
            i = interval(d)
            seeds = f"per seed {[round(v, 4) for v in y]} vs {[round(v, 4) for v in x]}"
            print(f"  {m}: {i['mean']:+.4g} [{i['ci_low']:+.4g}, {i['ci_high']:+.4g}]  {seeds}")
res = out / "results"
def per_case(cell, m):
    groups = []
    for s in (0, 1, 2):
        d = json.load(open(res / cell / f"seed{s}.json"))["per_case"]["metrics"][m]
        groups.append(d)
    return groups
print("## case-paired (two-level bootstrap), protocol metrics (the mean of 8 for generative cells)")
for a, b in (("refiner_long", "refiner_long_drop"), ("vit", "refiner_long_drop"), ("blind_mean", "refiner_long_drop")):
    for m in ("psnr", "ssim", "hf_energy_ratio", "edge_sharpness", "lpips3"):
        ga, gb = per_case(a, m), per_case(b, m)
        diff = [[q - p for p, q in zip(x, y) if p is not None and q is not None] for x, y in zip(ga, gb)]
        i = hierarchical_bootstrap(diff)
        print(f"  {b} - {a} {m}: {i['mean']:+.4g} [{i['ci_low']:+.4g}, {i['ci_high']:+.4g}]")

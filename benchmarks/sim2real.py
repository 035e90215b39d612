"""Sim-to-real robustness: vit_cascade trained on (a) ideal DRRs and (b) style-randomised DRRs, each tested on
held-out phantoms rendered (i) ideal and (ii) through realistic presets and processing that training never drew.

Data: ``--train``/``--test`` chest phantoms (``chest_phantom``, disjoint seeds) written as NIfTI cases under
``<out>/data`` with ``train.txt``/``val.txt``/``test.txt``, read by ``ct_folder``. Training
(``recipes/benchmarks/sim2real.toml``): arm ``ideal`` renders today's DRRs; arm ``style`` draws a style per
(seed, epoch, item) from ``STYLE`` (kVp 70-110, no copper, gamma 0.85-1.15, equalisation up to 0.2, ...).
Test renderings: ``ideal``, and ``TEST_PRESETS``: ``chest_pa`` (120 kVp + 0.1 mm Cu, grid, equalisation
0.3: kVp, copper and equalisation outside the training ranges), ``portable_ap`` (90 kVp, SPR 1.5, gamma 1.1,
unsharp 1.0, equalisation 0.5) and ``fluoro`` (75 kVp + 0.3 mm Cu, gamma 1.3, heel). PSNR / SSIM
(default protocol) per cell, mean and a 95 % t-interval over the seeds.

Run (the exact matrix; CPU, about 2-4 minutes per training on 2 cores at these sizes)::

    python -m benchmarks.sim2real --seeds 0 1 2                 # 6 trainings, 24 evaluations
    python -m benchmarks.sim2real --seeds 0 --epochs 2 --dry-run  # print the commands only

Writes ``<out>/results.json`` and ``<out>/results.md`` (the table for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "benchmarks" / "sim2real.toml"
STYLE = {"kvp": [70, 110], "mas": [0.5, 4.0], "spr": [0.3, 1.2], "grid": 0.5, "focal_spot_mm": [0.6, 1.2],
         "detector_blur_mm": [0.1, 0.5], "electronic_noise": [0.0, 4.0], "gamma": [0.85, 1.15],
         "unsharp_amount": [0.0, 0.8], "equalize": [0.0, 0.2]}
TEST_PRESETS = ("chest_pa", "portable_ap", "fluoro")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_data(folder: Path, n_train: int, n_val: int, n_test: int, resolution: int = 48) -> None:
    """Phantom CTs as NIfTI cases with split lists (test seeds far from the training seeds)."""
    import nibabel as nib
    import numpy as np

    from x2ct_framework.phantom import chest_phantom

    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(n_train), "val": range(5000, 5000 + n_val), "test": range(9000, 9000 + n_test)}
    for split, seeds in splits.items():
        names = []
        for s in seeds:
            name = f"phantom{s:05d}"
            path = folder / f"{name}.nii.gz"
            if not path.exists():
                hu, _ = chest_phantom(resolution, seed=s)
                sp = 320.0 / resolution
                nib.save(nib.Nifti1Image(hu.permute(2, 1, 0).numpy().astype(np.int16), np.diag([-sp, -sp, -sp, 1.0])),
                         str(path))
            names.append(name)
        (folder / f"{split}.txt").write_text("\n".join(names) + "\n")


def plan(out: Path, seeds: list[int], epochs: int | None) -> list[tuple[str, list[str], Path | None]]:
    """(label, command, summary.json it writes or None) for every training and evaluation."""
    py = [sys.executable, "-m", "x2ct_framework.cli"]
    steps = []
    for seed in seeds:
        for arm in ("ideal", "style"):
            name = f"{arm}_s{seed}"
            sets = [f"name={json.dumps(name)}", f"seed={seed}", f"output_dir={json.dumps(str(out / 'runs'))}",
                    f"data.root={json.dumps(str(out / 'data'))}", f"data.cache_dir={json.dumps(str(out / 'cache'))}"]
            if arm == "style":
                sets.append(f"data.augment={toml_value({'style': STYLE})}")
            if epochs:
                sets.append(f"stages.stage1.epochs={epochs}")
            steps.append((f"train {name}", py + ["run", str(RECIPE)] + [a for s in sets for a in ("--set", s)], None))
            for test in ("ideal",) + TEST_PRESETS:
                dest = out / "eval" / name / test
                cmd = py + ["evaluate", str(out / "runs" / name), "--split", "test", "--protocol", "default",
                            "--out", str(dest), "--bootstrap", "200", "--worst", "0", "--no-progress"]
                if test != "ideal":
                    cmd += ["--set", f"data.xray={json.dumps(test)}"]
                steps.append((f"evaluate {name} on {test}", cmd, dest / "summary.json"))
    return steps


def table(out: Path, seeds: list[int]) -> tuple[list[dict], str]:
    rows = []
    for arm in ("ideal", "style"):
        for test in ("ideal",) + TEST_PRESETS:
            row = {"trained on": arm, "tested on": test}
            for metric in ("psnr", "ssim"):
                vals = []
                for seed in seeds:
                    f = out / "eval" / f"{arm}_s{seed}" / test / "summary.json"
                    if f.is_file():
                        vals.append(json.loads(f.read_text())["protocols"]["default"]["metrics"][metric]["mean"])
                mean = statistics.fmean(vals) if vals else math.nan
                half = T975.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals)) \
                    if len(vals) > 1 else math.nan
                row[metric] = mean
                row[f"{metric}_ci95"] = half
                row["seeds"] = len(vals)
            rows.append(row)
    lines = ["| trained on | tested on | PSNR (dB) | SSIM | seeds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trained on']} | {r['tested on']} | {r['psnr']:.2f} ± {r['psnr_ci95']:.2f} | "
                     f"{r['ssim']:.3f} ± {r['ssim_ci95']:.3f} | {r['seeds']} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sim2real"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=24, help="training phantoms")
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--test", type=int, default=8, help="held-out test phantoms")
    parser.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs (0: keep)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    steps = plan(out, args.seeds, args.epochs or None)
    if args.dry_run:
        for label, cmd, _ in steps:
            print(f"# {label}\n" + " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd))
        return 0
    write_data(out / "data", args.train, args.val, args.test)
    for label, cmd, summary in steps:
        if summary is not None and summary.is_file():
            continue
        print(f"[sim2real] {label}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    rows, md = table(out, args.seeds)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

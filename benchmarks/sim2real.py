"""Sim-to-real robustness: vit_cascade trained on (a) ideal DRRs and (b) style-randomised DRRs, each tested on
held-out phantoms rendered (i) ideal and (ii) through realistic presets and processing that training never drew.

Data: ``--train``/``--test`` chest phantoms (``chest_phantom``, disjoint seeds) written as NIfTI cases under
``<out>/data`` with ``train.txt``/``val.txt``/``test.txt``, read by ``ct_folder``. Training
(``recipes/benchmarks/sim2real.toml``): arm ``ideal`` renders today's DRRs; arm ``style`` draws a style per
(seed, epoch, item) from ``STYLE`` (kVp 70-110, no copper, gamma 0.85-1.15, equalisation up to 0.2, ...).
Test renderings: ``ideal``, and ``TEST_PRESETS``: ``chest_pa`` (120 kVp + 0.1 mm Cu, grid, equalisation
0.3: kVp, copper and equalisation outside the training ranges), ``portable_ap`` (90 kVp, SPR 1.5, gamma 1.1,
unsharp 1.0, equalisation 0.5) and ``fluoro`` (75 kVp + 0.3 mm Cu, gamma 1.3, heel). PSNR / SSIM
(default protocol) per cell, mean and a 95 % t-interval over the seeds, beside the blind-mean floor (the
training CTs' voxel-wise mean as every prediction, ``benchmarks.variants.runner.blind_mean``).

Run (the exact matrix; CPU, about 2-4 minutes per training on 2 cores at these sizes)::

    python -m benchmarks.sim2real --seeds 0 1 2                 # 6 trainings, 24 evaluations
    python -m benchmarks.sim2real --seeds 0 --epochs 2 --dry-run  # print the commands only
    python -m benchmarks.sim2real --seeds 0 1 2 --figure docs/images/sim2real.png  # and the figure

Writes ``<out>/results.json`` and ``<out>/results.md`` (the tables for RESULTS.md: each cell's mean and
interval, the floor, and style minus ideal paired by seed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
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
    """(label, command, the file whose presence means it is done) for every training and evaluation."""
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
            # a finished run writes its report last: its presence marks the training as done
            steps.append((f"train {name}", py + ["run", str(RECIPE)] + [a for s in sets for a in ("--set", s)],
                          out / "runs" / name / "report.md"))
            for test in ("ideal",) + TEST_PRESETS:
                dest = out / "eval" / name / test
                cmd = py + ["evaluate", str(out / "runs" / name), "--split", "test", "--protocol", "default",
                            "--out", str(dest), "--bootstrap", "200", "--worst", "0", "--no-progress"]
                if test != "ideal":
                    cmd += ["--set", f"data.xray={json.dumps(test)}"]
                steps.append((f"evaluate {name} on {test}", cmd, dest / "summary.json"))
    return steps


def blind_floor(out: Path, seed: int) -> dict:
    """The floor: the training CTs' voxel-wise mean scored as every test case's prediction (it ignores the
    X-rays, so one evaluation serves every rendering), with the recipe of the run ``ideal_s<seed>``;
    written to ``<out>/eval/blind_mean.json`` once."""
    dest = out / "eval" / "blind_mean.json"
    if dest.is_file():
        return json.loads(dest.read_text())
    from benchmarks.variants.runner import blind_mean
    from x2ct_framework.evaluation.evaluate import evaluate
    from x2ct_framework.runs import Target, resolve_target

    run_dir = out / "runs" / f"ideal_s{seed}"
    found = resolve_target(run_dir)
    target = Target(found.recipe, found.stage, run_dir / "blind_mean", run_dir)
    ev = evaluate(target, "test", ["default"], n_boot=0, worst=0, progress=False, model=blind_mean(found.recipe))
    proto = ev.protocols[0]
    result = {m: ev.summary[proto.key(m)]["mean"] for m in ("psnr", "ssim")}
    result["cases"] = ev.info["cases"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    return result


def _metric(out: Path, arm: str, seed: int, test: str, metric: str) -> float | None:
    f = out / "eval" / f"{arm}_s{seed}" / test / "summary.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())["protocols"]["default"]["metrics"][metric]["mean"]


def _mean_ci(vals: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(vals) if vals else math.nan
    half = T975.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    return mean, half


def paired(out: Path, seeds: list[int]) -> tuple[list[dict], str]:
    """Style-randomised minus ideal training, per test rendering, paired by seed (the arms of a seed share
    the data and the seed), mean and 95 % t-interval over the seeds."""
    rows = []
    lines = ["| tested on | PSNR: style - ideal (dB) | SSIM: style - ideal | seeds |", "|---|---|---|---|"]
    for test in ("ideal",) + TEST_PRESETS:
        row = {"tested on": test}
        for metric in ("psnr", "ssim"):
            diffs = []
            for seed in seeds:
                a, b = _metric(out, "style", seed, test, metric), _metric(out, "ideal", seed, test, metric)
                if a is not None and b is not None:
                    diffs.append(a - b)
            row[metric], row[f"{metric}_ci95"] = _mean_ci(diffs)
            row["seeds"] = len(diffs)
        rows.append(row)
        lines.append(f"| {test} | {row['psnr']:+.2f} ± {row['psnr_ci95']:.2f} | {row['ssim']:+.3f} ± "
                     f"{row['ssim_ci95']:.3f} | {row['seeds']} |")
    return rows, "\n".join(lines)


def table(out: Path, seeds: list[int], floor: dict | None = None) -> tuple[list[dict], str]:
    rows = []
    for arm in ("ideal", "style"):
        for test in ("ideal",) + TEST_PRESETS:
            row = {"trained on": arm, "tested on": test}
            for metric in ("psnr", "ssim"):
                vals = [v for v in (_metric(out, arm, seed, test, metric) for seed in seeds) if v is not None]
                row[metric], row[f"{metric}_ci95"] = _mean_ci(vals)
                row["seeds"] = len(vals)
            rows.append(row)
    lines = ["| trained on | tested on | PSNR (dB) | SSIM | seeds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trained on']} | {r['tested on']} | {r['psnr']:.2f} ± {r['psnr_ci95']:.2f} | "
                     f"{r['ssim']:.3f} ± {r['ssim_ci95']:.3f} | {r['seeds']} |")
    if floor is not None:
        rows.append({"trained on": "nothing (blind mean)", "tested on": "any", "psnr": floor["psnr"],
                     "ssim": floor["ssim"], "seeds": 0})
        lines.append(f"| nothing: the training CTs' mean (floor) | any | {floor['psnr']:.2f} | {floor['ssim']:.3f} "
                     "| - |")
    return rows, "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    """PSNR and SSIM per test rendering, the two training arms side by side with their 95 % intervals over
    the seeds, the blind-mean floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = ("ideal",) + TEST_PRESETS
    floor = next((r for r in rows if r["seeds"] == 0), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, unit in zip(axes, ("psnr", "ssim"), ("PSNR (dB)", "SSIM")):
        for k, (arm, colour) in enumerate((("ideal", "#4c72b0"), ("style", "#dd8452"))):
            cells = [next(r for r in rows if r["trained on"] == arm and r["tested on"] == t) for t in tests]
            x = [i + (k - 0.5) * 0.38 for i in range(len(tests))]
            ax.bar(x, [c[metric] for c in cells], width=0.36, color=colour,
                   yerr=[c[f"{metric}_ci95"] if math.isfinite(c[f"{metric}_ci95"]) else 0 for c in cells],
                   capsize=3, label=f"trained on {'ideal DRRs' if arm == 'ideal' else 'style-randomised DRRs'}")
        if floor is not None:
            ax.axhline(floor[metric], color="0.3", linestyle="--", linewidth=1, label="blind mean (floor)")
        ax.set_xticks(range(len(tests)), [f"tested on\n{t}" for t in tests], fontsize=8)
        ax.set_ylabel(unit)
        values = [r[metric] for r in rows if math.isfinite(r[metric])]
        pad = (3.0, 1.5) if metric == "psnr" else (0.08, 0.05)
        ax.set_ylim(min(values) - pad[0], max(values) + pad[1])
    axes[0].legend(fontsize=7, loc="lower left")
    seeds = max(r["seeds"] for r in rows)
    fig.suptitle(f"vit_cascade on held-out phantoms, mean and 95 % interval over {seeds} seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _child_cpu_s() -> float:
    """CPU seconds (user + system) of the finished subprocesses so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sim2real"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=24, help="training phantoms")
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--test", type=int, default=8, help="held-out test phantoms")
    parser.add_argument("--epochs", type=int, default=0, help="override the recipe's epochs (0: keep)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--figure", default="", help="also draw the table as a figure at this path (PNG)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    steps = plan(out, args.seeds, args.epochs or None)
    if args.dry_run:
        for label, cmd, _ in steps:
            print(f"# {label}\n" + " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd))
        return 0
    t0 = time.perf_counter()
    write_data(out / "data", args.train, args.val, args.test)
    print(f"[sim2real] phantoms written: {time.perf_counter() - t0:.0f} s", flush=True)
    for label, cmd, done in steps:
        if done.is_file():
            continue
        print(f"[sim2real] {label}", flush=True)
        t0, c0 = time.perf_counter(), _child_cpu_s()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"[sim2real] {label}: {time.perf_counter() - t0:.0f} s wall, {_child_cpu_s() - c0:.0f} CPU-s",
              flush=True)
    rows, md = table(out, args.seeds, blind_floor(out, args.seeds[0]))
    diff_rows, diff_md = paired(out, args.seeds)
    md += "\n\n" + diff_md
    (out / "results.json").write_text(json.dumps({"cells": rows, "style_minus_ideal": diff_rows}, indent=2))
    (out / "results.md").write_text(md + "\n")
    if args.figure:
        figure(rows, Path(args.figure))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

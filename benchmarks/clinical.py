"""Clinical scores of finished runs: the evaluators (pe_detectability, organ_consistency, distribution) on each run
folder's test split, one table row per run.

    OMP_NUM_THREADS=1 python -m benchmarks.clinical RUN [RUN ...] --pe-fraction 0.5 --out benchmarks/out/clinical

For every run folder (its last trained stage's best checkpoint, scored as ``x2ct evaluate`` does, under the cheap
``c2rv`` protocol beside the evaluators) the evaluation is written to ``OUT/<run name>/`` (per_case.csv with the
evaluators' columns, summary.json, summary.md) and the rows to ``OUT/clinical.md`` and ``OUT/clinical.csv``.

``--pe-fraction F`` sets ``data.pe_fraction`` (phantom version 2): a fraction F of the training and test phantoms
gets pulmonary emboli, drawn per case. A run trained without emboli is then scored on phantoms with emboli: the
generated arm asks whether the reconstruction carries a clot the model never saw in training, the real-CT arm is
the reference classifier on the true volumes, the X-ray arm what the two input views alone allow. The reference
classifier is trained once per data setting and cached (``$X2CT_CACHE_DIR/evaluators``): runs that share data
share it. ``--set KEY=VALUE`` passes any other recipe override (as ``x2ct evaluate --set``), ``--option
EVALUATOR.KEY=VALUE`` an evaluator option (TOML value), e.g. ``--option pe_detectability.epochs=20``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import tomllib
from pathlib import Path

EVALUATORS = ("pe_detectability", "organ_consistency", "distribution")
# (column, evaluator, summary key) of the table; a number absent from a run's results is "n/a"
COLUMNS = [
    ("AUC real CT", "pe_detectability", "auc_real"),
    ("AUC generated CT", "pe_detectability", "auc_generated"),
    ("AUC X-ray alone", "pe_detectability", "auc_xray"),
    ("AUC generated - real", "pe_detectability", "auc_generated_minus_real"),
    ("sens. generated", "pe_detectability", "sensitivity_generated"),
    ("spec. generated", "pe_detectability", "specificity_generated"),
    ("Dice lung", "organ_consistency", "lung_dice"),
    ("Dice vessel", "organ_consistency", "vessel_dice"),
    ("Dice heart", "organ_consistency", "heart_dice"),
    ("Dice bone", "organ_consistency", "bone_dice"),
    ("Dice embolus", "organ_consistency", "embolus_dice"),
    ("|HU error| vessel", "organ_consistency", "abs_vessel_hu_error"),
    ("fid3d", "distribution", "fid3d"),
    ("kid3d", "distribution", "kid3d"),
    ("fid25d", "distribution", "fid25d"),
]


def fmt(entry: dict | None) -> str:
    if not entry or not math.isfinite(entry.get("value", math.nan)):
        return "n/a"
    v, lo, hi = entry["value"], entry.get("ci_low", math.nan), entry.get("ci_high", math.nan)
    spec = ".3g" if 0 < abs(v) < 0.01 else ".3f" if abs(v) < 100 else ".1f"
    text = f"{v:{spec}}"
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:{spec}}, {hi:{spec}}]"
    return text


def evaluator_options(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        name, _, option = key.partition(".")
        if not name or not option or not value:
            raise SystemExit(f"--option {pair!r}: expected EVALUATOR.KEY=VALUE, e.g. pe_detectability.epochs=20")
        out.setdefault(name, {})[option] = tomllib.loads(f"v = {value}")["v"]
    return out


def score_run(run: Path, args, out: Path) -> dict:
    from x2ct_framework.evaluation.evaluate import evaluate
    from x2ct_framework.runs import resolve_target

    overrides = list(args.set) + [f"eval.evaluators={json.dumps(list(args.evaluators))}"]
    if args.pe_fraction is not None:
        overrides.append(f"data.pe_fraction={args.pe_fraction}")
    for name, table in evaluator_options(args.option).items():
        for key, value in table.items():
            overrides.append(f"eval.evaluator_options.{name}.{key}={json.dumps(value)}")
    target = resolve_target(str(run), None, overrides, None, "best")
    t0 = time.perf_counter()
    ev = evaluate(target, args.split, ["c2rv"], max_cases=args.max_cases, n_boot=args.bootstrap, worst=0,
                  out_dir=out / run.name, progress=False, evaluators=list(args.evaluators))
    row = {"run": run.name, "cases": ev.info["cases"], "seconds": round(time.perf_counter() - t0, 1)}
    for r in ev.evaluators:
        res = r.result
        if res is None or res.skipped:
            row[f"{r.name}:skipped"] = res.skipped if res is not None else r.skipped
            continue
        for key, entry in res.summary.items():
            row[f"{r.name}/{key}"] = entry
        row[f"{r.name}:notes"] = res.notes
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clinical", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (runs/<name>)")
    p.add_argument("--evaluators", nargs="+", default=list(EVALUATORS))
    p.add_argument("--pe-fraction", type=float, default=None,
                   help="set data.pe_fraction (phantoms with pulmonary emboli in this fraction of cases)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--option", action="append", default=[], metavar="EVALUATOR.KEY=VALUE",
                   help="evaluator option, e.g. pe_detectability.epochs=20")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--max-cases", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/clinical"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        print(f"scoring {run} ...", flush=True)
        rows.append(score_run(run, args, args.out))
        print(f"  {rows[-1]['cases']} cases in {rows[-1]['seconds']} s", flush=True)
    header = ["run", "cases"] + [c for c, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with (args.out / "clinical.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "cases", *[f"{e}/{k}" for _, e, k in COLUMNS],
                    *[f"{e}/{k}:ci_low" for _, e, k in COLUMNS], *[f"{e}/{k}:ci_high" for _, e, k in COLUMNS]])
        for row in rows:
            cells = [fmt(row.get(f"{e}/{k}")) for _, e, k in COLUMNS]
            lines.append(f"| {row['run']} | {row['cases']} | " + " | ".join(cells) + " |")
            get = [row.get(f"{e}/{k}") or {} for _, e, k in COLUMNS]
            w.writerow([row["run"], row["cases"], *[g.get("value", "") for g in get],
                        *[g.get("ci_low", "") for g in get], *[g.get("ci_high", "") for g in get]])
    notes = []
    for row in rows:
        for key, value in row.items():
            if key.endswith(":skipped"):
                notes.append(f"- {row['run']}: {key.split(':')[0]} SKIPPED: {value}")
            elif key.endswith(":notes"):
                notes += [f"- {row['run']}: {key.split(':')[0]}: {n}" for n in value]
    text = "\n".join([f"# Clinical scores ({args.split} split)", "",
                      "Values with 95% patient-level bootstrap intervals (FID: over cases; KID: none). "
                      f"Command: python -m benchmarks.clinical {' '.join(sys.argv[1:] if argv is None else argv)}",
                      "", *lines, "", "Notes:", "", *notes]) + "\n"
    (args.out / "clinical.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paired differences between two evaluations, case by case, from their per-volume tables.

    python -m benchmarks.compare EVAL_A EVAL_B [--columns c2rv/psnr pe_detectability/score_generated ...]

``EVAL_A`` and ``EVAL_B`` are evaluation folders (``x2ct evaluate --out``, or ``<run>/eval/<stage>-<split>``)
or their ``per_case.csv`` files, or any per-volume CSV (a published table such as SPARC's
``results/reconstruction/*.csv``: ``--id-b ct_path --map psnr_db=sparc/psnr_db``). Rows are paired on the
case id; for every numeric column both tables share, the mean difference B - A over the pairs where both are
defined, with a 95% percentile bootstrap interval over the pairs (``--bootstrap`` resamples). When both tables
carry ``pe_detectability/label`` and a score column, the AUC difference of that score is paired the same way.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from x2ct_framework.evaluation.evaluators import cluster_weights, percentile_interval, weighted_auc

LABEL = "pe_detectability/label"
SCORES = ("pe_detectability/score_generated", "pe_detectability/score_real", "pe_detectability/score_xray")


def read_table(path: str | Path, id_column: str = "case_id", rename: dict[str, str] | None = None
               ) -> dict[str, dict[str, float]]:
    """``{case id: {column: value}}`` of a per-volume CSV (a folder means its ``per_case.csv``); empty or
    non-numeric cells are NaN. A missing file or id column is a SystemExit naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "per_case.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: no per-volume table there (an evaluation folder holds per_case.csv)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if id_column not in (reader.fieldnames or []):
            raise SystemExit(f"{path}: no id column {id_column!r} (columns: {', '.join(reader.fieldnames or [])})")
        table = {}
        for row in reader:
            values = {}
            for k, v in row.items():
                if k == id_column:
                    continue
                try:
                    values[(rename or {}).get(k, k)] = float(v) if v not in ("", None) else math.nan
                except ValueError:
                    continue
            table[str(row[id_column])] = values
    return table


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], columns: list[str] | None = None,
            n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per shared column: ``column, n, mean_a, mean_b, diff (B - A), ci_low, ci_high``."""
    cases = [c for c in a if c in b]
    if not cases:
        raise SystemExit(f"no case is in both tables (A has e.g. {', '.join(list(a)[:3])}; B has "
                         f"{', '.join(list(b)[:3])}); check the id columns")
    shared = [k for k in a[cases[0]] if k in b[cases[0]]]
    if columns:
        missing = [c for c in columns if c not in shared]
        if missing:
            raise SystemExit(f"column(s) {', '.join(missing)} not in both tables (shared: {', '.join(shared)})")
        shared = list(columns)
    w = cluster_weights(cases, n_boot, seed)
    rows = []
    for col in shared:
        va = np.array([a[c].get(col, math.nan) for c in cases])
        vb = np.array([b[c].get(col, math.nan) for c in cases])
        ok = np.isfinite(va) & np.isfinite(vb)
        if not ok.any():
            continue
        d = vb - va
        wm = w[:, ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (wm * d[ok]).sum(1) / wm.sum(1)
        lo, hi = percentile_interval(boot)
        rows.append({"column": col, "n": int(ok.sum()), "mean_a": float(va[ok].mean()), "mean_b": float(vb[ok].mean()),
                     "diff": float(d[ok].mean()), "ci_low": lo, "ci_high": hi})
    if LABEL in a[cases[0]] and LABEL in b[cases[0]]:
        y = np.array([a[c][LABEL] for c in cases])
        for col in SCORES:
            if col not in shared:
                continue
            sa = np.array([a[c][col] for c in cases])
            sb = np.array([b[c][col] for c in cases])
            ok = np.isfinite(sa) & np.isfinite(sb) & np.isfinite(y)
            if not ok.any():
                continue
            ones = np.ones((1, int(ok.sum())))
            auc_a = float(weighted_auc(y[ok], sa[ok], ones)[0])
            auc_b = float(weighted_auc(y[ok], sb[ok], ones)[0])
            boot = weighted_auc(y[ok], sb[ok], w[:, ok]) - weighted_auc(y[ok], sa[ok], w[:, ok])
            lo, hi = percentile_interval(boot)
            rows.append({"column": f"AUC of {col}", "n": int(ok.sum()), "mean_a": auc_a, "mean_b": auc_b,
                         "diff": auc_b - auc_a, "ci_low": lo, "ci_high": hi})
    return rows


def markdown(rows: list[dict], name_a: str, name_b: str) -> str:
    lines = [f"| column | n pairs | A: {name_a} | B: {name_b} | B - A [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['column']}` | {r['n']} | {r['mean_a']:.4g} | {r['mean_b']:.4g} | "
                     f"{r['diff']:+.4g} [{r['ci_low']:+.4g}, {r['ci_high']:+.4g}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="evaluation folder or per-volume CSV (A)")
    p.add_argument("b", help="evaluation folder or per-volume CSV (B)")
    p.add_argument("--columns", nargs="+", help="columns to compare (default every numeric column both share)")
    p.add_argument("--id-a", default="case_id")
    p.add_argument("--id-b", default="case_id")
    p.add_argument("--map", nargs="+", default=[], metavar="B_COLUMN=A_COLUMN",
                   help="rename B's columns to A's (a published table's names)")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    rename = dict(m.split("=", 1) for m in args.map)
    rows = compare(read_table(args.a, args.id_a), read_table(args.b, args.id_b, rename), args.columns,
                   args.bootstrap)
    print(markdown(rows, str(args.a), str(args.b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The matrix's tables: ``matrix.md``, ``matrix.csv``, ``per_seed.csv`` and ``matrix.png`` from the result files."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from benchmarks.variants.runner import (calibration_dir, cell_recipe, hash_kind, read_result, result_path, run_hash,
                                        run_name)
from benchmarks.variants.spec import REPO, Cell, Matrix
from benchmarks.variants.stats import (hierarchical_bootstrap, interval, median, overlap, paired, per_case_pairs,
                                       verdict)


def cell_steps(matrix: Matrix, cell: Cell, out: Path) -> int | None:
    """The cell's optimizer-step budget: the matrix's, or its calibrated one under a wall-time budget."""
    cell = matrix.trained_cell(cell)  # a rescore cell's runs are its trained cell's
    if cell.kind != "train":
        return matrix.budget.get("steps") or matrix.budget["epochs"]
    if "steps" in matrix.budget:
        return matrix.budget["steps"]
    cal = read_result(calibration_dir(out) / f"{cell.name}.json")
    return int(cal["steps"]) if cal else None


def expected_keys(matrix: Matrix, out: Path, extra: list[str] = ()) -> dict[tuple[str, int], str | None]:
    """The hash every (cell, seed) result must carry to belong to the current definition of the matrix."""
    keys: dict[tuple[str, int], str | None] = {}
    for cell in matrix.cells:
        steps = cell_steps(matrix, cell, out)
        for seed in matrix.seeds:
            recipe = None if steps is None else cell_recipe(matrix, cell, seed, out, steps, list(extra))
            keys[cell.name, seed] = None if recipe is None else run_hash(recipe, matrix, hash_kind(cell))
    return keys


def collect(matrix: Matrix, out: Path, keys: dict[tuple[str, int], str | None],
            accept_stale: bool = False) -> tuple[dict[str, list[dict]], list[str]]:
    """The finished results of each cell that match the current definition; the names of stale ones.

    ``accept_stale`` counts stale results too (still named): for tables over runs that an earlier code version
    made, when the hash changed for a reason that does not change the run (a recipe key added at its default).
    """
    found: dict[str, list[dict]] = {}
    stale: list[str] = []
    for cell in matrix.cells:
        rows = []
        for seed in matrix.seeds:
            r = read_result(result_path(out, cell.name, seed))
            if r is None:
                continue
            if r.get("key") != keys.get((cell.name, seed)):
                stale.append(run_name(cell.name, seed))
                if not accept_stale:
                    continue
            rows.append(r)
        found[cell.name] = rows
    return found, stale


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"


def _mean_ci(s: dict, digits: int = 4) -> str:
    if s["n"] == 0:
        return "n/a"
    if not math.isfinite(s["ci_low"]):
        return f"{_f(s['mean'], digits)}"
    return f"{_f(s['mean'], digits)} [{_f(s['ci_low'], digits)}, {_f(s['ci_high'], digits)}]"


def summarize(matrix: Matrix, found: dict[str, list[dict]]) -> list[dict]:
    """One summary row per cell: per metric the interval over seeds, plus cost columns."""
    rows = []
    for cell in matrix.cells:
        res = found.get(cell.name, [])
        metrics: list[str] = []
        for r in res:
            metrics.extend(m for m in r.get("metrics", {}) if m not in metrics)
        row = {"cell": cell.name, "question": cell.question, "note": cell.note, "seeds": [r["seed"] for r in res],
               "metrics": {m: interval([r["metrics"].get(m) for r in res]) for m in metrics},
               "higher_is_better": next((r.get("higher_is_better", {}) for r in res), {}),
               "units": next((r.get("units", {}) for r in res), {}),
               "time_per_step_s": interval([r.get("time_per_step_s") for r in res]),
               "median_step_s": median([r.get("time_per_step_s") for r in res]),
               "peak_mem_mib": max((r.get("peak_mem_mib") or float("nan") for r in res), default=float("nan")),
               "mem_kind": next((r.get("mem_kind") for r in res), ""),
               "params": next((r.get("params") for r in res), None),
               "kind": cell.kind,
               "step_flops": next((r.get("cost", {}).get("step_flops_total") for r in res
                                   if r.get("cost", {}).get("step_flops_total") is not None), None),
               "steps": next((r.get("steps") for r in res), None), "epochs": next((r.get("epochs") for r in res), None),
               "notes": sorted({n for r in res for n in r.get("notes", [])}),
               "load_avg": [x for r in res for x in r.get("load_avg", [])],
               "devices": sorted({r["device"] for r in res if r.get("device")})}
        rows.append(row)
    return rows


# the columns of per_seed.csv and per_case.csv before the metrics (per_seed.csv ends with "device")
PER_SEED_FIELDS = ("cell", "seed", "data_seed", "steps", "time_per_step_s", "peak_mem_mib", "params", "step_flops")
PER_CASE_FIELDS = ("cell", "seed", "data_seed", "case_id")


def write_tables(matrix: Matrix, out: Path, plot: bool = True, extra: list[str] = (),
                 accept_stale: bool = False) -> dict[str, Path]:
    """``matrix.md``, ``matrix.csv``, ``per_seed.csv`` and ``matrix.png`` from the result files.

    Only results of the current definition count (their hash matches); older ones are named as stale
    (``accept_stale``: counted all the same, and named as such).
    """
    out = Path(out)
    found, stale = collect(matrix, out, expected_keys(matrix, out, extra), accept_stale)
    rows = summarize(matrix, found)
    by_name = {r["cell"]: r for r in rows}
    ref = by_name[matrix.reference]
    shown = [m for m in matrix.eval["metrics"] if any(m in r["metrics"] for r in rows)]
    all_metrics: list[str] = []
    for r in rows:
        all_metrics.extend(m for m in r["metrics"] if m not in all_metrics)
    files = {"md": out / "matrix.md", "csv": out / "matrix.csv", "per_seed": out / "per_seed.csv",
             "per_case": out / "per_case.csv"}

    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        head = ["cell", "question", "seeds", "steps", "epochs"]
        for m in all_metrics:
            head += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", f"{m}_std"]
        head += ["median_time_per_step_s", "peak_mem_mib", "mem_kind", "params", "devices"]
        w.writerow(head)
        for r in rows:
            line = [r["cell"], r["question"], len(r["seeds"]), r["steps"], r["epochs"]]
            for m in all_metrics:
                s = r["metrics"].get(m, interval([]))
                line += [_csv(s["mean"]), _csv(s["ci_low"]), _csv(s["ci_high"]), _csv(s["std"])]
            line += [_csv(r["median_step_s"]), _csv(r["peak_mem_mib"]), r["mem_kind"], r["params"],
                     "; ".join(r["devices"])]
            w.writerow(line)
    with files["per_seed"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*PER_SEED_FIELDS, *all_metrics, "device"])
        for cell in matrix.cells:
            for r in found.get(cell.name, []):
                w.writerow([cell.name, r["seed"], "" if r.get("data_seed") is None else r["data_seed"], r.get("steps"),
                            _csv(r.get("time_per_step_s")), _csv(r.get("peak_mem_mib")), r.get("params"),
                            _csv((r.get("cost") or {}).get("step_flops_total")),
                            *[_csv(r["metrics"].get(m)) for m in all_metrics], r.get("device", "")])
    with (out / "per_case.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*PER_CASE_FIELDS, *all_metrics])
        for cell in matrix.cells:
            for r in found.get(cell.name, []):
                pc = r.get("per_case")
                if not pc:
                    continue
                for j, cid in enumerate(pc["case_ids"]):
                    w.writerow([cell.name, r["seed"], "" if r.get("data_seed") is None else r["data_seed"], cid,
                                *[_csv((pc["metrics"].get(m) or [None] * (j + 1))[j]) for m in all_metrics]])

    files["md"].write_text(markdown(matrix, rows, ref, shown, found, stale, accept_stale))
    if plot and any(r["seeds"] for r in rows):
        files["png"] = plot_matrix(matrix, rows, found, shown, out / "matrix.png")
        curves = plot_curves(matrix, rows, found, out / "curves.png")
        if curves is not None:
            files["curves"] = curves
    return files


def read_tables(folder: Path, cell: str) -> list[dict]:
    """A cell's runs read back from the ``per_seed.csv`` and ``per_case.csv`` that :func:`write_tables` wrote, as
    result-like dicts (``seed``, ``data_seed``, ``steps``, ``metrics``, ``per_case``; values to the CSVs' 6
    significant digits), so a committed results folder pairs with new runs (``stats.paired``,
    ``stats.per_case_pairs``) after its run folders are gone. Raises ``FileNotFoundError`` / ``ValueError``
    naming the file when the folder lacks the tables or the cell."""
    folder = Path(folder)
    seeds_csv, cases_csv = folder / "per_seed.csv", folder / "per_case.csv"
    for f in (seeds_csv, cases_csv):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file; a matrix's results folder holds per_seed.csv and "
                                    f"per_case.csv (written by python -m benchmarks.variants)")

    def num(v: str) -> float | None:
        return float(v) if v not in ("", None) else None

    skip = {*PER_SEED_FIELDS, *PER_CASE_FIELDS, "device"}  # every column that is not a metric
    rows = []
    with seeds_csv.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["cell"] != cell:
                continue
            rows.append({"cell": cell, "seed": int(r["seed"]),
                         "data_seed": int(r["data_seed"]) if r.get("data_seed") else None,
                         "steps": int(r["steps"]) if r.get("steps") else None,
                         "metrics": {k: v for k, v in ((k, num(v)) for k, v in r.items() if k not in skip)
                                     if v is not None}})
    if not rows:
        raise ValueError(f"{seeds_csv}: no rows of cell {cell!r}; its cells: "
                         f"{sorted({r['cell'] for r in csv.DictReader(seeds_csv.open(newline=''))})}")
    cases: dict[int, list[dict]] = {}
    with cases_csv.open(newline="") as f:
        for r in csv.DictReader(f):
            if r["cell"] == cell:
                cases.setdefault(int(r["seed"]), []).append(r)
    for row in rows:
        got = cases.get(row["seed"], [])
        if got:
            names = [k for k in got[0] if k not in skip]
            row["per_case"] = {"case_ids": [r["case_id"] for r in got],
                               "metrics": {m: [float(r[m]) if r[m] != "" else float("nan") for r in got]
                                           for m in names if any(r[m] != "" for r in got)}}
    return rows


def _csv(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def budget_text(matrix: Matrix) -> str:
    b = matrix.budget
    if "steps" in b:
        text = (f"{b['steps']} optimizer steps per trained stage in {b['epochs']} epochs of "
                f"{b['steps'] // b['epochs']} steps (cells with budget_scale s train s x that)")
        own = [f"{c.name}: {stage} x {f:g}" for c in matrix.cells for stage, f in c.stage_budget_scale.items()]
        return text + (f"; per-stage factors on top: {', '.join(own)}" if own else "")
    return (f"{b['wall_s']:g} s of training per trained stage, converted to optimizer steps per cell from a "
            f"{b['calibration_steps']}-step timed run, in {b['epochs']} epochs")


def markdown(matrix: Matrix, rows: list[dict], ref: dict, shown: list[str], found: dict[str, list[dict]],
             stale: list[str] = (), accept_stale: bool = False) -> str:
    proto = matrix.eval["protocol"]
    units = next((r["units"] for r in rows if r["units"]), {})
    hib = next((r["higher_is_better"] for r in rows if r["higher_is_better"]), {})
    lines = [f"# Quality matrix `{matrix.name}`", ""]
    if matrix.description:
        lines += [matrix.description.strip(), ""]
    try:
        base = matrix.base.relative_to(REPO)
    except ValueError:
        base = matrix.base
    lines += [f"- matrix: `{_rel(matrix.path)}`; base recipe `{base}`; seeds {matrix.seeds}",
              f"- budget: {budget_text(matrix)}",
              f"- evaluation: protocol `{proto}` on the `{matrix.eval['split']}` split, the `{matrix.eval['which']}` "
              f"checkpoint of the last stage (by its `select_best`); each seed's value is the mean over cases",
              "- cells show mean over seeds [95% Student-t interval over seeds]; s/step is the median over seeds of "
              "the training loop's time per optimizer step (data loading included, so the very first run also pays for "
              "making the data when the dataset caches it; validation and checkpoint writing excluded)", ""]
    cols = ["cell", *[f"{m}{' (' + units[m] + ')' if units.get(m) else ''}{'' if hib.get(m, True) else ' ↓'}"
                      for m in shown], "steps", "s/step", "peak MiB", "params (M)", "GFLOP/step", "train TFLOP",
            "seeds", "device"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"`{r['cell']}`" + (" (ref)" if r is ref else "")]
        cells += [_mean_ci(r["metrics"].get(m, interval([]))) for m in shown]
        flops = r.get("step_flops")
        cells += [_f(r["steps"]), _f(r["median_step_s"], 3), _f(r["peak_mem_mib"], 4),
                  _f(r["params"] / 1e6, 3) if r["params"] else ("0" if r.get("kind") != "train" else "n/a"),
                  _f(flops / 1e9, 3) if flops is not None else "n/a",
                  _f(flops * r["steps"] / 1e12, 3) if flops is not None and r["steps"] is not None else "n/a",
                  str(len(r["seeds"])), "; ".join(r["devices"]) or "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    mem_kind = next((r["mem_kind"] for r in rows if r["mem_kind"]), "")
    loads = [x for r in rows for x in r["load_avg"]]
    load = (f" The machine's 1-minute load average around the runs was {min(loads):.1f} to {max(loads):.1f} on "
            f"{os.cpu_count()} logical CPUs (above that count, other work slowed s/step)." if loads else "")
    lines += ["", f"↓ lower is better. Peak memory: {mem_kind or 'n/a'} (the whole process while training, "
              f"including Python and the libraries). Parameters: the model's (a loss's trainable parts, such as "
              f"the adversarial critic, are not counted).{load}", ""]
    # comparison with the reference, seed by seed
    key_metrics = [m for m in matrix.eval["compare"] if any(m in r["metrics"] for r in rows)]
    lines += [f"## Against the reference `{ref['cell']}`", "",
              "Per-seed difference (cell - reference; same seed) with its 95% t-interval, then the verdict: "
              "**better** / **worse** when that interval excludes 0, *unclear* when it does not; *overlap* / "
              "*apart*: whether the two cells' own intervals overlap (the stricter reading: *apart* is strong "
              "evidence).", ""]
    cols = ["cell", "question", *[f"Δ {m}" for m in key_metrics]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r is ref:
            continue
        cells = [f"`{r['cell']}`", r["question"]]
        for m in key_metrics:
            d = paired(found.get(ref["cell"], []), found.get(r["cell"], []), m)
            v = verdict(d, hib.get(m, True))
            o = overlap(r["metrics"].get(m, interval([])), ref["metrics"].get(m, interval([])))
            shown_v = f"**{v}**" if v in ("better", "worse") else f"*{v}*"
            cells.append(f"{_signed(d)} {shown_v}" + {"yes": ", overlap", "no": ", apart"}.get(o, ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += floor_section(matrix, rows, found, key_metrics, hib)
    lines += paired_case_section(matrix, rows, ref, found, key_metrics, hib)
    lines += curve_section(matrix, rows, ref, found)
    notes = list(matrix.notes) + [f"`{r['cell']}`: {r['note']}" for r in rows if r["note"]]
    notes += [f"`{c.name}` trains nothing: it scores the runs of `{c.of}` (the same weights, seed by seed) with "
              f"{', '.join(f'`{o}`' for o in c.eval_set)} at evaluation; its cost columns are `{c.of}`'s training"
              for c in matrix.cells if c.kind == "rescore" and c.name in {r["cell"] for r in rows}]
    proto_notes = sorted({n for r in rows for n in r["notes"]})
    if notes or proto_notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [f"- protocol: {n}" for n in proto_notes]
    missing = [r["cell"] for r in rows if len(r["seeds"]) < len(matrix.seeds)]
    if missing:
        lines += ["", f"Incomplete cells (fewer seeds than {len(matrix.seeds)}): {', '.join(missing)}."]
    if stale and accept_stale:
        lines += ["", f"Counted although their hash differs from the current definition (`--tables-only "
                      f"--accept-stale`: made by an earlier code version of the same cell): {', '.join(stale)}."]
    elif stale:
        lines += ["", f"Not counted (made by an earlier definition of their cell; the next run redoes them): "
                      f"{', '.join(stale)}."]
    if any(r["seeds"] for r in rows):
        lines += ["", "![matrix](matrix.png)"]
    return "\n".join(lines).rstrip() + "\n"


def _boot(d: dict) -> str:
    if d["n"] == 0 or not math.isfinite(d["mean"]):
        return "n/a"
    return f"{d['mean']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"


def floor_section(matrix: Matrix, rows: list[dict], found: dict, metrics: list[str], hib: dict) -> list[str]:
    """Every cell's gain over the blind mean, case by case on the same data, with a two-level bootstrap interval."""
    if not matrix.floor:
        return []
    floor = found.get(matrix.floor, [])
    lines = ["", f"## Gain over the blind mean `{matrix.floor}`", "",
             "Per test case: cell - blind mean (the training split's mean CT, scored as every case's prediction; "
             "the same data seed, so the same cases), averaged over cases and runs; 95% interval from a "
             "two-level bootstrap (runs, each its own training and data seed, then cases within a run). "
             "**below floor**: the interval does not lie above 0 (for ↓ metrics: below 0): the cell is not "
             "shown to beat a prediction that ignores the X-rays.", ""]
    cols = ["cell", *[f"gain {m}" for m in metrics]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["cell"] == matrix.floor:
            continue
        cells = [f"`{r['cell']}`"]
        for m in metrics:
            d = hierarchical_bootstrap(per_case_pairs(floor, found.get(r["cell"], []), m))
            better = hib.get(m, True)
            beats = d["n"] > 0 and (d["ci_low"] > 0 if better else d["ci_high"] < 0)
            cells.append(_boot(d) + ("" if beats or d["n"] == 0 else " **below floor**"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_case_section(matrix: Matrix, rows: list[dict], ref: dict, found: dict, metrics: list[str],
                        hib: dict) -> list[str]:
    """Cell - reference per test case (same seed, same case), two-level bootstrap interval."""
    lines = ["", f"## Against the reference `{ref['cell']}`, case by case", "",
             "Per test case: cell - reference on the same run seed and case, averaged; 95% two-level bootstrap "
             "interval (runs, then cases). **better** / **worse** when the interval excludes 0.", ""]
    cols = ["cell", *[f"Δ {m}" for m in metrics], "cases"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ref_rows = found.get(ref["cell"], [])
    for r in rows:
        if r is ref or r["cell"] == matrix.floor:
            continue
        cells = [f"`{r['cell']}`"]
        n_cases = 0
        for m in metrics:
            d = hierarchical_bootstrap(per_case_pairs(ref_rows, found.get(r["cell"], []), m))
            n_cases = max(n_cases, d.get("cases", 0))
            v = verdict({**d, "n": max(d["n"], 2) if d["n"] else 0}, hib.get(m, True))
            cells.append(_boot(d) + (f" **{v}**" if v in ("better", "worse") else ""))
        cells.append(str(n_cases))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _at(curve: list[list[float]], step: float) -> float:
    """The curve's value at ``step`` (linear between validation points; NaN before the first)."""
    pts = sorted(curve)
    if not pts or step < pts[0][0]:
        return float("nan")
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0) if s1 > s0 else v1
    return pts[-1][1]


def plateau_rows(matrix: Matrix, rows: list[dict], found: dict) -> list[dict]:
    """Per trained cell: the mean validation value at 50 %, 75 % and 100 % of its steps, and the last quarter's gain."""
    out = []
    for r in rows:
        runs = [x for x in found.get(r["cell"], []) if x.get("curve")]
        if not runs:
            continue
        vals = {q: interval([_at(x["curve"], q * x["curve"][-1][0]) for x in runs]) for q in (0.5, 0.75, 1.0)}
        gain = interval([_at(x["curve"], x["curve"][-1][0]) - _at(x["curve"], 0.75 * x["curve"][-1][0])
                         for x in runs])
        out.append({"cell": r["cell"], "values": vals, "gain": gain, "runs": len(runs)})
    return out


def curve_section(matrix: Matrix, rows: list[dict], ref: dict, found: dict) -> list[str]:
    key, limit = matrix.eval["curve"], matrix.eval["plateau_db"]
    table = plateau_rows(matrix, rows, found)
    if not table:
        return []
    lines = ["", f"## Budget: validation `{key}` over training", "",
             f"Plateau criterion: the reference's `{key}` gains less than {limit:g} over the last quarter of its "
             f"budget (mean over runs; the 95% t-interval beside it). Each run's curve is its own validation "
             f"split, under its own complete schedule.", ""]
    lines += ["| cell | at 50 % | at 75 % | at 100 % | last-quarter gain | runs |", "|---|---|---|---|---|---|"]
    for t in table:
        v = t["values"]
        lines.append(f"| `{t['cell']}` | {_mean_ci(v[0.5])} | {_mean_ci(v[0.75])} | {_mean_ci(v[1.0])} | "
                     f"{_mean_ci(t['gain'])} | {t['runs']} |")
    refrow = next((t for t in table if t["cell"] == ref["cell"]), None)
    if refrow is not None and math.isfinite(refrow["gain"]["mean"]):
        ok = refrow["gain"]["mean"] < limit
        lines += ["", f"Reference `{ref['cell']}`: last-quarter gain {refrow['gain']['mean']:+.3g} -> "
                      + ("**plateau reached** by this criterion." if ok else
                         "**still climbing**: the budget measures speed of convergence, not what the designs reach.")]
    lines += ["", "![validation curves](curves.png)"]
    return lines


def plot_curves(matrix: Matrix, rows: list[dict], found: dict, path: Path) -> Path | None:
    """Validation curves: each run thin, each cell's mean over runs thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = matrix.eval["curve"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for i, r in enumerate(rows):
        runs = [x["curve"] for x in found.get(r["cell"], []) if x.get("curve")]
        if not runs:
            continue
        color = f"C{i % 10}"
        for c in runs:
            ax.plot([p[0] for p in c], [p[1] for p in c], color=color, alpha=0.25, lw=0.8)
        steps = sorted({p[0] for c in runs for p in c})
        mean = [sum(_at(c, s_) for c in runs) / len(runs) for s_ in steps]
        ax.plot(steps, mean, color=color, lw=2, label=r["cell"])
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(f"matrix {matrix.name}: validation {key} (thin: runs, thick: mean over runs)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _signed(d: dict) -> str:
    if d["n"] == 0:
        return "n/a"
    if not math.isfinite(d["ci_low"]):
        return f"{d['mean']:+.3g}"
    return f"{d['mean']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def plot_matrix(matrix: Matrix, rows: list[dict], found: dict, shown: list[str], path: Path) -> Path:
    """One panel per metric (and time per step): each cell's seeds as dots, mean and interval as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in shown][:6] + ["time_per_step_s"]
    n = len(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels) + 1.2, 0.38 * n + 1.6), sharey=True,
                             squeeze=False)
    names = [r["cell"] for r in rows]
    clipped = False
    for ax, m in zip(axes[0], panels):
        seen: list[float] = []  # seeds and means: the axis spans these, so one wide interval does not hide the rest
        bars: list[tuple[int, float, float, str]] = []
        for y, r in enumerate(rows):
            s = r["time_per_step_s"] if m == "time_per_step_s" else r["metrics"].get(m, interval([]))
            pts = [x.get("time_per_step_s") if m == "time_per_step_s" else x["metrics"].get(m)
                   for x in found.get(r["cell"], [])]
            pts = [p for p in pts if p is not None and math.isfinite(p)]
            color = "tab:red" if r["cell"] == matrix.reference else "tab:blue"
            if pts:
                ax.plot(pts, [y] * len(pts), "o", ms=3, color="0.55", zorder=1)
                seen += pts
            if s["n"] and math.isfinite(s["mean"]):
                lo = s["mean"] - s["ci_low"] if math.isfinite(s["ci_low"]) else 0
                hi = s["ci_high"] - s["mean"] if math.isfinite(s["ci_high"]) else 0
                ax.errorbar([s["mean"]], [y], xerr=[[lo], [hi]], fmt="s", ms=5, color=color, capsize=3, zorder=2)
                seen.append(s["mean"])
                bars.append((y, s["mean"] - lo, s["mean"] + hi, color))
        if seen:
            span = (max(seen) - min(seen)) or abs(max(seen)) or 1.0
            left, right = min(seen) - 0.08 * span, max(seen) + 0.08 * span
            ax.set_xlim(left, right)
            for y, a, b, color in bars:  # an interval wider than the axis ends in an arrow at the edge
                if a < left:
                    ax.plot([left], [y], "<", ms=6, color=color, clip_on=False, zorder=3)
                    clipped = True
                if b > right:
                    ax.plot([right], [y], ">", ms=6, color=color, clip_on=False, zorder=3)
                    clipped = True
        lower = m == "time_per_step_s" or not next((r["higher_is_better"].get(m, True) for r in rows
                                                     if r["higher_is_better"]), True)
        ax.set_title(("s / step" if m == "time_per_step_s" else m) + (" (lower is better)" if lower else ""),
                     fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(n))
    axes[0][0].set_yticklabels(names, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"matrix {matrix.name}: mean and 95% interval over seeds {matrix.seeds} (dots: seeds; red: "
                 f"reference" + ("; arrows: the interval goes on beyond the axis" if clipped else "") + ")", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



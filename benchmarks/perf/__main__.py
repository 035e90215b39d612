"""``python -m benchmarks.perf [--quick] [--only NAME ...] [--out DIR]``: every performance benchmark.

Runs the modules of this package (``drr``, ``model``, ``losses``, ``evaluation``, ``train``, ``startup``,
``data``, ``spectral``), each ``run(quick) -> list[dict]`` with its reference measured in the same process, and
writes one ``perf.json`` (rows, machine, date, command, seconds per module) and ``perf.md`` (one markdown
table per module) into ``benchmarks/out/perf/`` unless ``--out``. A module that is missing or fails
is recorded with its error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.perf.common import markdown_table

MODULES = ("drr", "model", "losses", "evaluation", "train", "startup", "data", "spectral")
TITLES = {"drr": "DRR projector and data rendering", "model": "Model step", "losses": "Loss terms",
          "evaluation": "Evaluation protocols",
          "train": "Training at CPU scale (end to end, data vs model, framework overhead)",
          "startup": "Command start-up (whole process) beside the torch import",
          "data": "Data at scale (prepare throughput, items/s from the prepared cache beside a model step)",
          "spectral": "Spectral X-ray simulator beside the monoenergetic DRR (M materials, energy bins, ratio)"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "perf"


def columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def run_all(names: list[str], quick: bool, log=print) -> dict:
    """Run each benchmark module; returns ``{name: {"rows", "seconds", "error"}}``."""
    results = {}
    for name in names:
        t0 = time.perf_counter()
        entry = {"rows": [], "seconds": 0.0, "error": None, "load_avg": [os.getloadavg()[0]]}
        log(f"[perf] {name} ...", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.perf.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.perf.{name}":
                raise
            entry["error"] = f"benchmarks/perf/{name}.py does not exist"
        else:
            try:
                entry["rows"] = module.run(quick=quick)
            except Exception as exc:  # one broken benchmark must not hide the others' numbers
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()
        entry["seconds"] = time.perf_counter() - t0
        entry["load_avg"].append(os.getloadavg()[0])
        log(f"[perf] {name}: {len(entry['rows'])} rows in {entry['seconds']:.1f} s"
            + (f"; ERROR {entry['error']}" if entry["error"] else ""), flush=True)
        results[name] = entry
    return results


def to_markdown(report: dict) -> str:
    lines = [f"# Performance suite ({'quick' if report['quick'] else 'full'})", "",
             f"- date: {report['date']}", f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             "- every row carries its reference measured in the same process; `ratio` is defined per module "
             "(see each module's docstring)", ""]
    for name, entry in report["modules"].items():
        load = entry.get("load_avg") or []
        lines += [f"## {TITLES.get(name, name)} (`benchmarks/perf/{name}.py`, {entry['seconds']:.0f} s"
                  + (f"; load average {load[0]:.1f} -> {load[-1]:.1f}" if load else "") + ")", ""]
        if entry["error"]:
            lines += [f"Not measured: {entry['error']}", ""]
        if entry["rows"]:
            lines += [markdown_table(entry["rows"], columns(entry["rows"])), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these modules")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder for perf.json and perf.md")
    args = parser.parse_args(argv)
    from benchmarks.variants import machine_description

    names = list(args.only or MODULES)
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    modules = run_all(names, args.quick, log=lambda *a, **k: print(*a, **k, file=sys.stderr))
    report = {"date": started, "machine": machine_description(), "quick": args.quick,
              "command": "python -m benchmarks.perf" + (" --quick" if args.quick else "")
              + (f" --only {' '.join(names)}" if args.only else ""), "modules": modules}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    (out / "perf.md").write_text(md)
    print(md)
    print(f"written: {out / 'perf.json'}, {out / 'perf.md'}", file=sys.stderr)
    return 1 if any(e["error"] for e in modules.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The future-work quality matrix: recipe variants side by side, same data, same budget, several seeds.

``python -m benchmarks.variants benchmarks/matrix/cpu.toml`` trains every cell of the matrix once
per seed under one fixed budget, scores each run with one evaluation protocol, and writes
``matrix.md``, ``matrix.csv``, ``per_seed.csv`` and ``matrix.png`` into the output folder
(``benchmarks/out/matrix/<name>/`` unless ``--out``). Each value is the mean over seeds with a 95%
Student-t interval over seeds; every cell is also compared with the reference cell seed by seed.

A matrix is a TOML file (see ``benchmarks/README.md``)::

    name = "cpu"
    base = "../../recipes/stage2_extended.toml"   # relative to the matrix file
    set = ["model.dim=64"]                         # overrides for every cell (--set syntax)
    seeds = [0, 1, 2]
    reference = "baseline"
    [budget]
    steps = 60        # optimizer steps per trained stage (or wall_s = seconds of training per stage)
    epochs = 10       # the budget is cut into this many epochs (validation and best-checkpoint points)
    [eval]
    protocol = "default"
    [[cells]]
    name = "baseline"
    question = "the seed's stage 2"
    set = []
    budget_scale = 1.0

Resuming: each finished (cell, seed) writes ``results/<cell>/seed<N>.json`` atomically, tagged with
a hash of everything that determines it (the resolved recipe, the budget, the evaluation). A rerun
skips every result whose hash still matches and continues an interrupted training run from its last
checkpoint (``--resume`` of the trainer), so an interrupted matrix never redoes finished work.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUNNER_VERSION = 1  # part of every result's hash: bump when the way a cell is run or scored changes
DEFAULT_METRICS = ["psnr", "ssim", "mae_hu", "bone_dice", "vessel_dice", "lung_dice", "landmark_mm"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30; larger df use a Cornish-Fisher expansion.
T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the 95% two-sided Student-t critical value."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def interval(values: list[float]) -> dict[str, float]:
    """Mean, sample std and the 95% t-interval of the mean over seeds; NaN values are skipped.

    With one value the interval is undefined (NaN): one seed says nothing about seed-to-seed spread.
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    nan = float("nan")
    if n == 0:
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = sum(v) / n
    if n == 1:
        return {"mean": mean, "std": nan, "ci_low": nan, "ci_high": nan, "n": 1}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


# ---- the matrix file -------------------------------------------------------------------------
@dataclass
class Cell:
    name: str
    question: str = ""
    set: list[str] = field(default_factory=list)
    budget_scale: float = 1.0
    note: str = ""
    recipe: Path | None = None  # the cell's own base recipe (default: the matrix's base)


@dataclass
class Matrix:
    path: Path
    name: str
    base: Path
    description: str = ""
    set: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    reference: str = ""
    budget: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)


_TOP = {"name": str, "description": str, "base": str, "set": list, "seeds": list, "reference": str,
        "budget": dict, "eval": dict, "notes": list, "cells": list}
_BUDGET = {"steps": int, "wall_s": (int, float), "epochs": int, "calibration_steps": int}
_EVAL = {"protocol": str, "split": str, "which": str, "metrics": list, "compare": list, "max_cases": int,
         "batch_size": int}
HASHED_EVAL = ("protocol", "split", "which", "max_cases", "batch_size")  # what changes a result (not its display)
_CELL = {"name": str, "question": str, "recipe": str, "set": list, "budget_scale": (int, float), "note": str}


def _typecheck(table: dict, spec: dict, where: str, problems: list[str]) -> None:
    from x2ct_framework.errors import did_you_mean

    for k, v in table.items():
        if k not in spec:
            problems.append(f"{where}{k}: unknown key{did_you_mean(k, spec)} (known: {', '.join(spec)})")
        elif isinstance(v, bool) or not isinstance(v, spec[k]):
            kinds = spec[k] if isinstance(spec[k], tuple) else (spec[k],)
            problems.append(f"{where}{k}: expected {' or '.join(t.__name__ for t in kinds)}, got {v!r}")


def load_matrix(path: str | Path) -> Matrix:
    """Read and check a matrix TOML file; every problem is reported at once (RecipeError)."""
    from x2ct_framework.errors import RecipeError

    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError([f"matrix file not found: {path}"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{path}: not valid TOML: {exc}"]) from exc
    p: list[str] = []
    w = f"{path}: "
    _typecheck(data, _TOP, w, p)
    for key in ("name", "base"):
        if key not in data:
            p.append(f"{w}{key}: required key is missing")
    if isinstance(data.get("name"), str) and not NAME_RE.match(data["name"]):
        p.append(f"{w}name: expected letters, digits, '_', '-' or '.', got {data['name']!r}")
    base = path.parent / str(data.get("base", ""))
    if isinstance(data.get("base"), str) and not base.is_file():
        p.append(f"{w}base: recipe not found: {base.resolve()}")
    for key in ("set", "notes"):
        if not all(isinstance(s, str) for s in data.get(key, []) or []):
            p.append(f"{w}{key}: expected an array of strings")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        p.append(f"{w}seeds: expected a non-empty array of distinct integers, got {seeds!r}")
    budget = data.get("budget", {})
    if isinstance(budget, dict):
        _typecheck(budget, _BUDGET, f"{w}budget -> ", p)
        if ("steps" in budget) == ("wall_s" in budget):
            p.append(f"{w}budget: set exactly one of steps (optimizer steps per trained stage) or wall_s "
                     f"(seconds of training per trained stage)")
        epochs = budget.setdefault("epochs", 1)
        budget.setdefault("calibration_steps", 4)
        if isinstance(epochs, int) and epochs < 1:
            p.append(f"{w}budget -> epochs: expected an integer >= 1, got {epochs}")
        steps = budget.get("steps")
        if isinstance(steps, int) and isinstance(epochs, int) and epochs >= 1 and (steps < 1 or steps % epochs):
            p.append(f"{w}budget -> steps: expected a positive multiple of budget.epochs ({epochs}), got {steps}")
        if "wall_s" in budget and isinstance(budget["wall_s"], (int, float)) and budget["wall_s"] <= 0:
            p.append(f"{w}budget -> wall_s: expected a positive number of seconds, got {budget['wall_s']}")
    ev = data.get("eval", {})
    if isinstance(ev, dict):
        _typecheck(ev, _EVAL, f"{w}eval -> ", p)
        ev.setdefault("protocol", "default")
        ev.setdefault("split", "test")
        ev.setdefault("which", "best")
        ev.setdefault("metrics", list(DEFAULT_METRICS))
        ev.setdefault("compare", ["psnr", "ssim"])
        ev.setdefault("max_cases", 0)
        ev.setdefault("batch_size", 0)
        if ev["split"] not in ("train", "val", "test"):
            p.append(f"{w}eval -> split: expected train, val or test, got {ev['split']!r}")
    cells: list[Cell] = []
    raw_cells = data.get("cells", [])
    if not raw_cells:
        p.append(f"{w}cells: expected at least one [[cells]] table")
    for i, c in enumerate(raw_cells if isinstance(raw_cells, list) else []):
        cw = f"{w}cells -> {i + 1} -> "
        if not isinstance(c, dict):
            p.append(f"{cw[:-4]}: expected a table")
            continue
        _typecheck(c, _CELL, cw, p)
        name = c.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            p.append(f"{cw}name: expected letters, digits, '_', '-' or '.', got {name!r}")
            continue
        if not all(isinstance(s, str) for s in c.get("set", [])):
            p.append(f"{cw}set: expected an array of --set style strings (\"key=value\")")
        scale = c.get("budget_scale", 1.0)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            if scale <= 0:
                p.append(f"{cw}budget_scale: expected a positive number, got {scale}")
            elif isinstance(budget, dict) and isinstance(budget.get("epochs"), int):
                e = budget["epochs"] * scale
                if abs(e - round(e)) > 1e-9 or round(e) < 1:
                    p.append(f"{cw}budget_scale: budget.epochs ({budget['epochs']}) x {scale} = {e:g} must be a "
                             f"whole number of epochs >= 1")
        own = None
        if isinstance(c.get("recipe"), str):
            own = (path.parent / c["recipe"]).resolve()
            if not own.is_file():
                p.append(f"{cw}recipe: recipe not found: {own}")
        cells.append(Cell(name=name, question=c.get("question", ""), set=list(c.get("set", [])),
                          budget_scale=float(scale) if isinstance(scale, (int, float)) else 1.0,
                          note=c.get("note", ""), recipe=own))
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        p.append(f"{w}cells: cell names must be unique, repeated: {', '.join(dup)}")
    ref = data.get("reference", names[0] if names else "")
    if names and ref not in names:
        p.append(f"{w}reference: {ref!r} is not a cell (cells: {', '.join(names)})")
    if p:
        raise RecipeError(p)
    return Matrix(path=path, name=data["name"], base=base.resolve(), description=data.get("description", ""),
                  set=list(data.get("set", [])), seeds=list(seeds), reference=ref, budget=dict(budget),
                  eval=dict(ev), notes=list(data.get("notes", [])), cells=cells)


# ---- one run: recipe, hash, training, evaluation ---------------------------------------------
def run_name(cell: str, seed: int) -> str:
    return f"{cell}-s{seed}"


def _trained_stages(recipe) -> list[int]:
    """0-based positions of the stages a run of ``recipe`` trains."""
    return list(range(recipe["train"]["start_stage"] - 1, len(recipe["stages"])))


def cell_recipe(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str] = ()):
    """The resolved recipe of one (cell, seed): base (or the cell's recipe) + matrix set + cell set + --set + budget.

    The budget's overrides come last so no cell can escape it: every trained stage gets
    ``budget.epochs x budget_scale`` epochs of ``steps / budget.epochs`` optimizer steps each.
    """
    from x2ct_framework.config.recipe import load_recipe

    overrides = [*matrix.set, *cell.set, *extra]
    base = cell.recipe or matrix.base
    first = load_recipe(base, overrides)
    epochs = round(matrix.budget["epochs"] * cell.budget_scale)
    per_epoch = steps // matrix.budget["epochs"]
    fixed = [f"seed={seed}", f'output_dir="{out.as_posix()}"', f'name="{run_name(cell.name, seed)}"',
             f"train.max_steps_per_epoch={per_epoch}", "train.trackers=[]", "train.progress=false",
             "eval.preview=false", "eval.report=false"]
    for i in _trained_stages(first):
        fixed += [f"stages.{i + 1}.epochs={epochs}", f"stages.{i + 1}.checkpoint_every=0"]
    return load_recipe(base, [*overrides, *fixed])


def run_hash(recipe, matrix: Matrix) -> str:
    """What determines a result: the resolved recipe (wherever it is written), the evaluation, the runner."""
    data = copy.deepcopy(recipe.data)
    data.pop("output_dir", None)
    blob = json.dumps({"recipe": data, "eval": {k: matrix.eval[k] for k in HASHED_EVAL},
                       "runner": RUNNER_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_budget(recipe, steps_per_epoch: int) -> None:
    """The data must hold enough cases for ``steps_per_epoch`` full optimizer steps in every trained stage."""
    from x2ct_framework.config.build import build_dataset, stages
    from x2ct_framework.errors import RecipeError

    train = recipe["train"]
    all_stages = stages(recipe)
    for i in _trained_stages(recipe):
        st = all_stages[i]
        opts = st.options
        per_step = (opts["batch_size"] or train["batch_size"]) * (opts["grad_accum"] or train["grad_accum"])
        n = len(build_dataset(recipe, st, "train"))
        if n < steps_per_epoch * per_step:
            raise RecipeError([f"{recipe.path}: budget: {steps_per_epoch} optimizer steps per epoch of {st.name} "
                               f"need {steps_per_epoch * per_step} training cases (batch x grad_accum = {per_step}), "
                               f"the train split has {n}; raise the data's case count or budget.epochs"])


def _peak_memory_mib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"


def _make_clock():
    from x2ct_framework.hookspecs import hookimpl

    class Clock:
        def __init__(self) -> None:
            self.stages: list[dict[str, Any]] = []

        @hookimpl
        def on_stage_start(self, trainer, stage):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            trainer._bench_side = 0.0
            self.stages.append({"stage": stage.name, "t0": time.perf_counter(), "t1": None})

        @hookimpl
        def on_epoch_end(self, trainer, stage, epoch, metrics):
            self.stages[-1]["t1"] = time.perf_counter()
            self.stages[-1]["side_s"] = trainer._bench_side

    return Clock()


def _timed_trainer_class():
    """The trainer with its validation and checkpoint writing timed, so time per step counts training only."""
    from x2ct_framework.training.trainer import Trainer

    missing = [m for m in ("validate", "save_checkpoints") if not callable(getattr(Trainer, m, None))]
    if missing:  # the trainer changed: time per step would silently include validation or checkpointing
        raise RuntimeError(f"benchmarks.variants times Trainer.validate and Trainer.save_checkpoints, which the "
                           f"trainer no longer has ({', '.join(missing)}); update _timed_trainer_class")

    class TimedTrainer(Trainer):
        _bench_side = 0.0

        def validate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().validate(*args, **kwargs)
            finally:
                self._bench_side += time.perf_counter() - t0

        def save_checkpoints(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().save_checkpoints(*args, **kwargs)
            finally:
                self._bench_side += time.perf_counter() - t0

    return TimedTrainer


def train_and_time(recipe, resume: bool) -> dict[str, Any]:
    """Train ``recipe`` (continuing an interrupted run with ``resume``); time per step, memory, parameters."""
    from x2ct_framework import checkpoint as ckpt
    from x2ct_framework.plugins import get_plugin_manager

    pm = get_plugin_manager()
    run_dir = Path(recipe["output_dir"]) / recipe.name
    names = [recipe["stages"][i]["name"] for i in _trained_stages(recipe)]

    def steps_done() -> int:
        return sum(int(ckpt.load_state(run_dir / n / "last").get("step", 0)) for n in names
                   if ckpt.exists(run_dir / n / "last"))

    before = steps_done() if resume else 0
    clock = _make_clock()
    name = f"benchmarks.variants.clock.{id(clock)}"
    pm.register_object(clock, name)
    try:
        trainer = _timed_trainer_class()(recipe, resume=resume)
        trainer.run()
        model = trainer.model
    finally:
        pm.unregister(name)
    peak, kind = _peak_memory_mib()
    loop_s = sum(st["t1"] - st["t0"] - st.get("side_s", 0.0) for st in clock.stages if st["t1"] is not None)
    total = steps_done()
    timed = total - before  # a resumed run times only the steps it trained itself
    return {"steps": total, "steps_timed": timed, "loop_s": loop_s, "peak_mem_mib": peak, "mem_kind": kind,
            "resumed": bool(before), "time_per_step_s": loop_s / timed if timed > 0 and loop_s > 0 else float("nan"),
            "params": sum(p.numel() for p in model.parameters()) if model is not None else None}


def evaluate_run(recipe, matrix: Matrix) -> dict[str, Any]:
    """Score the run's last stage (its ``eval.which`` checkpoint) with the matrix's protocol."""
    from x2ct_framework.evaluation.evaluate import evaluate, resolve_target

    run_dir = Path(recipe["output_dir"]) / recipe.name
    last = recipe["stages"][-1]["name"]
    target = resolve_target(run_dir / last / matrix.eval["which"], recipe_path=run_dir / "recipe.toml")
    ev = evaluate(target, matrix.eval["split"], [matrix.eval["protocol"]], batch_size=matrix.eval["batch_size"],
                  max_cases=matrix.eval["max_cases"], n_boot=0, worst=0, progress=False, lpips="auto")
    proto = ev.protocols[0]
    metrics = {m: ev.summary[proto.key(m)]["mean"] for m in proto.metrics}
    return {"metrics": metrics, "higher_is_better": {m: proto.higher_is_better(m) for m in proto.metrics},
            "units": {m: proto.unit(m) for m in proto.metrics}, "cases": ev.info["cases"], "notes": list(proto.notes)}


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def result_path(out: Path, cell: str, seed: int) -> Path:
    return out / "results" / cell / f"seed{seed}.json"


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_cell(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str] = ()) -> dict:
    """Train and score one (cell, seed) in this process and write its result file atomically."""
    from x2ct_framework.config.build import load_recipe_plugins

    out = Path(out)
    recipe = cell_recipe(matrix, cell, seed, out, steps, extra)
    load_recipe_plugins(recipe)
    check_budget(recipe, steps // matrix.budget["epochs"])
    key = run_hash(recipe, matrix)
    run_dir = out / recipe.name
    stamp = run_dir / "matrix_key.txt"
    resume = stamp.is_file() and stamp.read_text().strip() == key
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a run of an older definition of this cell: start over
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key + "\n")
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    timing = train_and_time(recipe, resume=resume)
    timing["load_avg"] = [load_before, os.getloadavg()[0]]  # other work on the machine slows s/step
    train_wall = time.perf_counter() - t0
    saved = read_result(run_dir / "timing.json")
    if timing["steps_timed"] == 0 and saved:  # training had finished before (the evaluation was cut short)
        timing = saved
    else:
        _atomic_json(run_dir / "timing.json", timing)
    scores = evaluate_run(recipe, matrix)
    if timing["params"] is None:  # every stage had finished before: count the model's parameters here
        from x2ct_framework.config.build import build_model, stages

        timing["params"] = sum(p.numel() for p in build_model(recipe, stages(recipe)[-1]).parameters())
    stage = recipe["stages"][-1]
    batch = (stage["batch_size"] or recipe["train"]["batch_size"]) * (stage["grad_accum"] or recipe["train"]["grad_accum"])
    result = {"cell": cell.name, "seed": seed, "key": key, "finished": _dt.datetime.now().isoformat(timespec="seconds"),
              "budget_steps": steps, "epochs": recipe["stages"][-1]["epochs"], "batch": batch,
              "train_wall_s": train_wall, "eval_wall_s": time.perf_counter() - t0 - train_wall,
              "resolution": stage["resolution"], "run_dir": str(run_dir), **timing, **scores}
    _atomic_json(result_path(out, cell.name, seed), result)
    return result


# ---- wall-time budgets ------------------------------------------------------------------------
def calibrate(matrix: Matrix, cell: Cell, out: Path, extra: list[str], isolate: bool) -> int:
    """Steps per trained stage that fit ``budget.wall_s`` for this cell, from a short timed run (cached)."""
    cal_steps = matrix.budget["calibration_steps"]
    recipe = cell_recipe(matrix, cell, matrix.seeds[0], out / "calibration", cal_steps * matrix.budget["epochs"], extra)
    key = run_hash(recipe, matrix) + f"-wall{matrix.budget['wall_s']}"
    path = out / "calibration" / f"{cell.name}.json"
    old = read_result(path)
    if old and old.get("key") == key:
        return int(old["steps"])
    one = dataclasses.replace(cell, budget_scale=1.0 / matrix.budget["epochs"])
    spec_steps = cal_steps * matrix.budget["epochs"]
    if isolate:
        res = _run_isolated(matrix, one, matrix.seeds[0], out / "calibration", spec_steps, extra, out / "logs")
    else:
        res = run_cell_training_only(matrix, one, matrix.seeds[0], out / "calibration", spec_steps, extra)
    t = res["time_per_step_s"]
    epochs = matrix.budget["epochs"]
    steps = max(epochs, int(matrix.budget["wall_s"] / t) // epochs * epochs)
    _atomic_json(path, {"key": key, "time_per_step_s": t, "steps": steps, "wall_s": matrix.budget["wall_s"]})
    return steps


def run_cell_training_only(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str]) -> dict:
    recipe = cell_recipe(matrix, cell, seed, out, steps, extra)
    run_dir = Path(recipe["output_dir"]) / recipe.name
    shutil.rmtree(run_dir, ignore_errors=True)
    return train_and_time(recipe, resume=False)


# ---- the matrix: plan, isolation, resume ------------------------------------------------------
def _run_isolated(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str], logs: Path,
                  training_only: bool = False) -> dict:
    """Run one (cell, seed) in a fresh Python process (clean peak memory, a crash stays contained)."""
    logs.mkdir(parents=True, exist_ok=True)
    spec = {"matrix": str(matrix.path), "cell": cell.name, "budget_scale": cell.budget_scale, "seed": seed,
            "out": str(out), "steps": steps, "extra": list(extra), "training_only": training_only}
    log = logs / f"{run_name(cell.name, seed)}{'-calibration' if training_only or out.name == 'calibration' else ''}.log"
    cmd = [sys.executable, "-m", "benchmarks.variants", "--run-one", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise CellFailed(f"{run_name(cell.name, seed)} failed (exit {rc}); log {log}:\n{tail}")
    if out.name == "calibration":
        return read_result(out / f"{run_name(cell.name, seed)}.timing.json") or {}
    res = read_result(result_path(out, cell.name, seed))
    if res is None:
        raise CellFailed(f"{run_name(cell.name, seed)} wrote no result file; log {log}")
    return res


class CellFailed(RuntimeError):
    pass


def _run_one(spec_text: str) -> int:
    """Child-process entry: run one (cell, seed) described by a JSON spec."""
    spec = json.loads(spec_text)
    matrix = load_matrix(spec["matrix"])
    base = matrix.cell(spec["cell"])
    cell = dataclasses.replace(base, budget_scale=spec["budget_scale"])
    out = Path(spec["out"])
    if out.name == "calibration":
        res = run_cell_training_only(matrix, cell, spec["seed"], out, spec["steps"], spec["extra"])
        _atomic_json(out / f"{run_name(cell.name, spec['seed'])}.timing.json", res)
    else:
        run_cell(matrix, cell, spec["seed"], out, spec["steps"], spec["extra"])
    return 0


@dataclass
class Plan:
    cell: Cell
    seed: int
    steps: int
    done: dict | None = None


def default_out(matrix: Matrix) -> Path:
    return REPO / "benchmarks" / "out" / "matrix" / matrix.name


def run_matrix(matrix: Matrix, out: Path | None = None, *, only: list[str] | None = None,
               seeds: list[int] | None = None, extra: list[str] = (), isolate: bool = True, rerun: list[str] = (),
               plot: bool = True, log=print) -> dict[str, Any]:
    """Run every unfinished (cell, seed), then write the tables; returns what was run, skipped and failed."""
    out = Path(out or default_out(matrix)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = [c for c in matrix.cells if not only or c.name in only]
    unknown = sorted(set(only or []) - {c.name for c in matrix.cells})
    if unknown:
        from x2ct_framework.errors import RecipeError

        raise RecipeError([f"--only: no cell named {', '.join(unknown)} in {matrix.path} "
                           f"(cells: {', '.join(c.name for c in matrix.cells)})"])
    seeds = list(seeds or matrix.seeds)
    status = {"ran": [], "skipped": [], "failed": {}}
    todo: list[Plan] = []
    for cell in cells:
        try:
            steps = (calibrate(matrix, cell, out, list(extra), isolate) if "wall_s" in matrix.budget
                     else matrix.budget["steps"])
        except CellFailed as exc:
            status["failed"][cell.name] = str(exc)
            continue
        for seed in seeds:
            key = run_hash(cell_recipe(matrix, cell, seed, out, steps, list(extra)), matrix)
            old = read_result(result_path(out, cell.name, seed))
            if old and old.get("key") == key and cell.name not in rerun:
                status["skipped"].append(run_name(cell.name, seed))
                continue
            if cell.name in rerun:  # train again from scratch (a finished run folder would only be re-scored)
                shutil.rmtree(out / run_name(cell.name, seed), ignore_errors=True)
            todo.append(Plan(cell, seed, steps))
    # seed by seed across the cells: a change in machine load spreads over all cells instead of a few,
    # and a cut-short matrix leaves complete seeds rather than complete cells
    order = {c.name: i for i, c in enumerate(cells)}
    todo.sort(key=lambda j: (seeds.index(j.seed), order[j.cell.name]))
    log(f"matrix {matrix.name}: {len(cells)} cells x {len(seeds)} seeds; {len(status['skipped'])} finished earlier, "
        f"{len(todo)} to run; output {out}")
    t_start = time.perf_counter()
    for i, job in enumerate(todo):
        name = run_name(job.cell.name, job.seed)
        t0 = time.perf_counter()
        try:
            if isolate:
                res = _run_isolated(matrix, job.cell, job.seed, out, job.steps, list(extra), out / "logs")
            else:
                res = run_cell(matrix, job.cell, job.seed, out, job.steps, list(extra))
        except CellFailed as exc:
            status["failed"][name] = str(exc)
            log(f"  [{i + 1}/{len(todo)}] {name}: FAILED\n{exc}")
            continue
        status["ran"].append(name)
        spent = time.perf_counter() - t_start
        eta = spent / (i + 1) * (len(todo) - i - 1)
        m = res.get("metrics", {})
        log(f"  [{i + 1}/{len(todo)}] {name}: {time.perf_counter() - t0:.0f} s, {res.get('steps')} steps, "
            f"{res.get('time_per_step_s', float('nan')):.3f} s/step, psnr {m.get('psnr', float('nan')):.2f}, "
            f"ssim {m.get('ssim', float('nan')):.3f}; about {eta / 60:.1f} min left")
    status["tables"] = write_tables(matrix, out, plot=plot, extra=list(extra))
    status["out"] = out
    return status


# ---- tables -----------------------------------------------------------------------------------
def cell_steps(matrix: Matrix, cell: Cell, out: Path) -> int | None:
    """The cell's optimizer-step budget: the matrix's, or its calibrated one under a wall-time budget."""
    if "steps" in matrix.budget:
        return matrix.budget["steps"]
    cal = read_result(out / "calibration" / f"{cell.name}.json")
    return int(cal["steps"]) if cal else None


def expected_keys(matrix: Matrix, out: Path, extra: list[str] = ()) -> dict[tuple[str, int], str | None]:
    """The hash every (cell, seed) result must carry to belong to the current definition of the matrix."""
    keys: dict[tuple[str, int], str | None] = {}
    for cell in matrix.cells:
        steps = cell_steps(matrix, cell, out)
        for seed in matrix.seeds:
            keys[cell.name, seed] = (None if steps is None else
                                     run_hash(cell_recipe(matrix, cell, seed, out, steps, list(extra)), matrix))
    return keys


def collect(matrix: Matrix, out: Path, keys: dict[tuple[str, int], str | None]) -> tuple[dict[str, list[dict]], list[str]]:
    """The finished results of each cell that match the current definition; the names of stale ones."""
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
                continue
            rows.append(r)
        found[cell.name] = rows
    return found, stale


def paired(ref: list[dict], other: list[dict], metric: str) -> dict[str, float]:
    """Interval of the per-seed difference ``other - ref`` over the seeds both have."""
    a = {r["seed"]: r["metrics"].get(metric) for r in ref}
    diffs = [o["metrics"].get(metric) - a[o["seed"]] for o in other
             if o["seed"] in a and o["metrics"].get(metric) is not None and a[o["seed"]] is not None]
    return interval(diffs)


def verdict(diff: dict[str, float], higher_is_better: bool) -> str:
    if diff["n"] < 2 or not math.isfinite(diff["ci_low"]):
        return "n/a"
    if diff["ci_low"] > 0:
        return "better" if higher_is_better else "worse"
    if diff["ci_high"] < 0:
        return "worse" if higher_is_better else "better"
    return "unclear"


def overlap(a: dict, b: dict) -> str:
    if not (math.isfinite(a["ci_low"]) and math.isfinite(b["ci_low"])):
        return "n/a"
    return "yes" if a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"] else "no"


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
               "median_step_s": _median([r.get("time_per_step_s") for r in res]),
               "peak_mem_mib": max((r.get("peak_mem_mib") or float("nan") for r in res), default=float("nan")),
               "mem_kind": next((r.get("mem_kind") for r in res), ""),
               "params": next((r.get("params") for r in res), None),
               "steps": next((r.get("steps") for r in res), None), "epochs": next((r.get("epochs") for r in res), None),
               "notes": sorted({n for r in res for n in r.get("notes", [])}),
               "load_avg": [x for r in res for x in r.get("load_avg", [])]}
        rows.append(row)
    return rows


def write_tables(matrix: Matrix, out: Path, plot: bool = True, extra: list[str] = ()) -> dict[str, Path]:
    """``matrix.md``, ``matrix.csv``, ``per_seed.csv`` and ``matrix.png`` from the result files.

    Only results of the current definition count (their hash matches); older ones are named as stale.
    """
    out = Path(out)
    found, stale = collect(matrix, out, expected_keys(matrix, out, extra))
    rows = summarize(matrix, found)
    by_name = {r["cell"]: r for r in rows}
    ref = by_name[matrix.reference]
    shown = [m for m in matrix.eval["metrics"] if any(m in r["metrics"] for r in rows)]
    all_metrics: list[str] = []
    for r in rows:
        all_metrics.extend(m for m in r["metrics"] if m not in all_metrics)
    files = {"md": out / "matrix.md", "csv": out / "matrix.csv", "per_seed": out / "per_seed.csv"}

    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        head = ["cell", "question", "seeds", "steps", "epochs"]
        for m in all_metrics:
            head += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", f"{m}_std"]
        head += ["median_time_per_step_s", "peak_mem_mib", "mem_kind", "params"]
        w.writerow(head)
        for r in rows:
            line = [r["cell"], r["question"], len(r["seeds"]), r["steps"], r["epochs"]]
            for m in all_metrics:
                s = r["metrics"].get(m, interval([]))
                line += [_csv(s["mean"]), _csv(s["ci_low"]), _csv(s["ci_high"]), _csv(s["std"])]
            line += [_csv(r["median_step_s"]), _csv(r["peak_mem_mib"]), r["mem_kind"], r["params"]]
            w.writerow(line)
    with files["per_seed"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "seed", "steps", "time_per_step_s", "peak_mem_mib", "params", *all_metrics])
        for cell in matrix.cells:
            for r in found.get(cell.name, []):
                w.writerow([cell.name, r["seed"], r.get("steps"), _csv(r.get("time_per_step_s")),
                            _csv(r.get("peak_mem_mib")), r.get("params"),
                            *[_csv(r["metrics"].get(m)) for m in all_metrics]])

    files["md"].write_text(markdown(matrix, rows, ref, shown, found, stale))
    if plot and any(r["seeds"] for r in rows):
        files["png"] = plot_matrix(matrix, rows, found, shown, out / "matrix.png")
    return files


def _median(values: list) -> float:
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return float("nan")
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _csv(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def budget_text(matrix: Matrix) -> str:
    b = matrix.budget
    if "steps" in b:
        return (f"{b['steps']} optimizer steps per trained stage in {b['epochs']} epochs of {b['steps'] // b['epochs']} "
                f"steps (cells with budget_scale s train s x that)")
    return (f"{b['wall_s']:g} s of training per trained stage, converted to optimizer steps per cell from a "
            f"{b['calibration_steps']}-step timed run, in {b['epochs']} epochs")


def markdown(matrix: Matrix, rows: list[dict], ref: dict, shown: list[str], found: dict[str, list[dict]],
             stale: list[str] = ()) -> str:
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
                      for m in shown], "steps", "s/step", "peak MiB", "params (M)", "seeds"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"`{r['cell']}`" + (" (ref)" if r is ref else "")]
        cells += [_mean_ci(r["metrics"].get(m, interval([]))) for m in shown]
        cells += [_f(r["steps"]), _f(r["median_step_s"], 3), _f(r["peak_mem_mib"], 4),
                  _f(r["params"] / 1e6, 3) if r["params"] else "n/a", str(len(r["seeds"]))]
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
    notes = list(matrix.notes) + [f"`{r['cell']}`: {r['note']}" for r in rows if r["note"]]
    proto_notes = sorted({n for r in rows for n in r["notes"]})
    if notes or proto_notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [f"- protocol: {n}" for n in proto_notes]
    missing = [r["cell"] for r in rows if len(r["seeds"]) < len(matrix.seeds)]
    if missing:
        lines += ["", f"Incomplete cells (fewer seeds than {len(matrix.seeds)}): {', '.join(missing)}."]
    if stale:
        lines += ["", f"Not counted (made by an earlier definition of their cell; the next run redoes them): "
                      f"{', '.join(stale)}."]
    if any(r["seeds"] for r in rows):
        lines += ["", "![matrix](matrix.png)"]
    return "\n".join(lines).rstrip() + "\n"


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
        ax.set_title(("s / step" if m == "time_per_step_s" else m) + (" (lower is better)" if lower else ""), fontsize=9)
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


# ---- command line -----------------------------------------------------------------------------
def dry_run(matrix: Matrix, out: Path, extra: list[str], check: bool, log=print) -> int:
    """Resolve (and with ``check`` build) every cell's recipe without training."""
    from x2ct_framework.config.build import build_losses, build_model, load_recipe_plugins, stages

    steps = matrix.budget.get("steps") or matrix.budget["epochs"] * matrix.budget["calibration_steps"]
    log(f"matrix {matrix.name}: base {matrix.base}, seeds {matrix.seeds}, budget: {budget_text(matrix)}")
    for cell in matrix.cells:
        recipe = cell_recipe(matrix, cell, matrix.seeds[0], out, steps, extra)
        load_recipe_plugins(recipe)
        st = stages(recipe)[-1]
        tokens = recipe["model"].get("tokens")
        line = (f"  {cell.name:<16} {recipe['model']['name']}{f' {tokens}^3 tokens' if tokens else ''}, "
                f"{st.resolution}^3, views "
                f"{recipe['data'].get('views', '?')}, losses {', '.join(f'{k}' for k, v in st.options['losses'].items() if v.get('weight', 1))}, "
                f"{st.options['epochs']} epochs")
        if check:
            check_budget(recipe, steps // matrix.budget["epochs"])
            model = build_model(recipe, st)
            build_losses(recipe, st)
            line += f", {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params"
        log(line)
    return 0


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.splitlines()[0])
    parser.add_argument("matrix", nargs="?", help="matrix TOML file (benchmarks/matrix/cpu.toml, gpu.toml)")
    parser.add_argument("--out", help="output folder (default benchmarks/out/matrix/<name>)")
    parser.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds (default: the matrix's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every cell (changes every cell's hash: all rerun)")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="CELL", help="redo these cells even if finished")
    parser.add_argument("--dry-run", action="store_true", help="resolve every cell's recipe and print the plan")
    parser.add_argument("--check", action="store_true", help="with --dry-run: also build every cell's model and losses")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the finished results")
    parser.add_argument("--in-process", action="store_true",
                        help="run cells in this process (faster start; peak memory is then the whole process')")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from x2ct_framework.run import report_errors

    if args.run_one:
        return report_errors(_run_one, args.run_one)
    if not args.matrix:
        parser.error("the matrix file is required")

    def go() -> int:
        matrix = load_matrix(args.matrix)
        out = Path(args.out).resolve() if args.out else default_out(matrix)
        if args.dry_run:
            return dry_run(matrix, out, args.overrides, args.check)
        if args.tables_only:
            files = write_tables(matrix, out, plot=args.plot, extra=args.overrides)
            print(f"tables: {files['md']}")
            return 0
        t0 = time.perf_counter()
        status = run_matrix(matrix, out, only=args.only, seeds=args.seeds, extra=args.overrides,
                            isolate=not args.in_process, rerun=args.rerun, plot=args.plot)
        print(f"\n{files_line(status)}; {len(status['ran'])} runs in {(time.perf_counter() - t0) / 60:.1f} min, "
              f"{len(status['skipped'])} skipped (finished earlier), {len(status['failed'])} failed")
        print(f"machine: {machine_description()}")
        for name, msg in status["failed"].items():
            print(f"failed: {name}: {msg.splitlines()[0]}", file=sys.stderr)
        return 1 if status["failed"] else 0

    return report_errors(go)


def files_line(status: dict) -> str:
    t = status.get("tables", {})
    return "tables: " + ", ".join(str(p) for p in t.values())


if __name__ == "__main__":
    sys.exit(main())

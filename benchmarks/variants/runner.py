"""Running the matrix: each (cell, seed)'s recipe and hash, training and scoring it, resume, parallel dispatch.

A (cell, seed) runs in a fresh Python process (clean peak memory; a crash stays contained) unless
``isolate=False``. With ``workers > 1`` several such processes run at once, each in a *slot* that
owns a device (``CUDA_VISIBLE_DEVICES``) or a share of the CPU threads (``OMP_NUM_THREADS``); what a
run computes does not depend on the slot, so results, hashes and tables are those of a serial run.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.variants.spec import HASHED_EVAL, REPO, Cell, Matrix, load_matrix
from benchmarks.variants.timing import device_label, train_and_time, trained_stages

RUNNER_VERSION = 2  # part of every result's hash: bump when the way a cell is run or scored changes
CELL, CALIBRATION = "cell", "calibration"  # what a child process runs: a whole (cell, seed), or a timed calibration


def run_name(cell: str, seed: int) -> str:
    return f"{cell}-s{seed}"


def cell_recipe(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str] = (),
                scoring: bool = False):
    """The resolved recipe of one (cell, seed): base (or the cell's recipe) + matrix set + cell set + --set + budget.

    The budget's overrides come last so no cell can escape it: every trained stage gets
    ``budget.epochs x budget_scale`` epochs of ``steps / budget.epochs`` optimizer steps each, times the
    cell's ``stage_budget_scale`` factor for that stage's name (1 for the stages it does not name).
    A rescore cell's recipe is its trained cell's (the same run folder); with ``scoring``, its ``eval_set``
    on top (the recipe it is scored with).
    """
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.errors import RecipeError

    if cell.kind == "rescore":  # the trained cell's recipe and run folder: nothing of its own is trained
        return cell_recipe(matrix, matrix.trained_cell(cell), seed, out, steps,
                           [*extra, *(cell.eval_set if scoring else ())])
    overrides = [*matrix.set, *cell.set, *extra]
    base = cell.recipe or matrix.base
    first = load_recipe(base, overrides)
    per_epoch = steps // matrix.budget["epochs"]
    trackers = json.dumps(list(matrix.trackers))
    fixed = [f"seed={seed}", f'output_dir="{out.as_posix()}"', f'name="{run_name(cell.name, seed)}"',
             f"train.max_steps_per_epoch={per_epoch}", f"train.trackers={trackers}", "train.progress=false",
             "eval.preview=false", "eval.report=false"]
    data_seed = matrix.data_seed(seed)
    if data_seed is not None:
        fixed.append(f"{matrix.data_seed_key}={data_seed}")
    trained = trained_stages(first)
    names = [first["stages"][i]["name"] for i in trained]
    unknown = sorted(set(cell.stage_budget_scale) - set(names))
    if unknown:
        raise RecipeError([f"{matrix.path}: cell {cell.name!r}: stage_budget_scale names {', '.join(unknown)}, "
                           f"not a trained stage of {base} (trained stages: {', '.join(names) or 'none'})"])
    for i, name in zip(trained, names):
        own = round(matrix.budget["epochs"] * cell.budget_scale * cell.stage_budget_scale.get(name, 1.0))
        fixed += [f"stages.{i + 1}.epochs={own}", f"stages.{i + 1}.checkpoint_every=0"]
    return load_recipe(base, [*overrides, *fixed])


def run_hash(recipe, matrix: Matrix, kind: str = "train") -> str:
    """What determines a result: the resolved recipe (wherever it is written), the evaluation, the runner.

    Trackers only watch a run: they are hashed as none, so turning them on redoes nothing.
    """
    data = copy.deepcopy(recipe.data)
    data.pop("output_dir", None)
    data["train"]["trackers"] = []
    what = {"recipe": data, "eval": {k: matrix.eval[k] for k in HASHED_EVAL}, "runner": RUNNER_VERSION}
    if kind != "train":
        what["kind"] = kind
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_kind(cell: Cell) -> str:
    """The part of a cell's definition outside its recipe that changes its result."""
    if cell.kind == "rescore":
        return "rescore-" + json.dumps(list(cell.eval_set))
    return f"sart-{cell.iterations}" if cell.kind == "sart" else cell.kind


def check_budget(recipe, steps_per_epoch: int) -> None:
    """The data must hold enough cases for ``steps_per_epoch`` full optimizer steps in every trained stage."""
    from x2ct_framework.config.build import build_dataset, stages
    from x2ct_framework.errors import RecipeError

    train = recipe["train"]
    all_stages = stages(recipe)
    for i in trained_stages(recipe):
        st = all_stages[i]
        opts = st.options
        per_step = (opts["batch_size"] or train["batch_size"]) * (opts["grad_accum"] or train["grad_accum"])
        n = len(build_dataset(recipe, st, "train"))
        if n < steps_per_epoch * per_step:
            raise RecipeError([f"{recipe.path}: budget: {steps_per_epoch} optimizer steps per epoch of {st.name} "
                               f"need {steps_per_epoch * per_step} training cases (batch x grad_accum = {per_step}), "
                               f"the train split has {n}; raise the data's case count or budget.epochs"])


def evaluate_run(recipe, matrix: Matrix, model=None, overrides: list[str] = ()) -> dict[str, Any]:
    """Score the run's last stage (its ``eval.which`` checkpoint, or ``model``) with the matrix's protocol.

    Besides each metric's mean over cases, the per-case values are kept (``per_case``; a generative model's
    single sample under ``one_sample/<metric>`` too): the tables pair them case by case with the reference and
    the floor on the same data. ``overrides`` (a rescore cell's
    ``eval_set``) change the run's recipe for this scoring only.
    """
    from x2ct_framework.evaluation.evaluate import evaluate
    from x2ct_framework.runs import Target, resolve_target

    run_dir = Path(recipe["output_dir"]) / recipe.name
    last = recipe["stages"][-1]["name"]
    if model is None:
        target = resolve_target(run_dir / last / matrix.eval["which"], recipe_path=run_dir / "recipe.toml",
                                overrides=list(overrides))
    else:
        from x2ct_framework.config.build import stages

        target = Target(recipe, stages(recipe)[-1], run_dir / "blind_mean", run_dir)
    ev = evaluate(target, matrix.eval["split"], [matrix.eval["protocol"]], batch_size=matrix.eval["batch_size"],
                  max_cases=matrix.eval["max_cases"], n_boot=0, worst=0, progress=False, lpips="auto", model=model)
    proto = ev.protocols[0]
    metrics = {m: ev.summary[proto.key(m)]["mean"] for m in proto.metrics}
    higher = {m: proto.higher_is_better(m) for m in proto.metrics}
    units = {m: proto.unit(m) for m in proto.metrics}

    def column(key: str) -> list[float | None]:
        return [None if not math.isfinite(float(x)) else float(x) for x in ev.values[key]]

    per_case = {"case_ids": list(ev.case_ids), "metrics": {m: column(proto.key(m)) for m in proto.metrics}}
    if ev.info.get("samples"):  # a generative model: the metrics above score the mean of its samples
        from x2ct_framework.evaluation.evaluate import DIVERSITY, ONE_SAMPLE

        for m in proto.metrics:
            key, name = f"{ONE_SAMPLE}{proto.key(m)}", f"one_sample/{m}"
            if key in ev.summary:
                metrics[name] = ev.summary[key]["mean"]
                higher[name], units[name] = higher[m], units[m]
            if key in ev.values:  # its per-case values too, so single samples pair case by case
                per_case["metrics"][name] = column(key)
        metrics[DIVERSITY], higher[DIVERSITY], units[DIVERSITY] = ev.summary[DIVERSITY]["mean"], True, "HU"
    return {"metrics": metrics, "higher_is_better": higher, "units": units, "cases": ev.info["cases"],
            "notes": list(proto.notes), "per_case": per_case}


class MeanVolume:
    """The blind-mean predictor: the voxel-wise mean of the training split's CTs, whatever the X-rays show."""

    def __init__(self, mean):
        self.mean = mean  # [1, 1, D, H, W] in [0, 1] after the HU window

    def to(self, device):
        self.mean = self.mean.to(device)
        return self

    def eval(self):
        return self

    def __call__(self, xrays, geometry, prev=None):
        return self.mean.to(xrays.device).expand(xrays.shape[0], *self.mean.shape[1:]).clone()


def blind_mean(recipe) -> MeanVolume:
    """The voxel-wise mean CT of the last stage's training split (the data every trained cell learns from)."""
    from x2ct_framework.config.build import build_dataset, stages

    dataset = build_dataset(recipe, stages(recipe)[-1], "train")
    total = None
    for i in range(len(dataset)):
        ct = dataset[i]["ct"].double()
        total = ct if total is None else total + ct
    return MeanVolume((total / len(dataset)).float()[None])


def step_cost(recipe) -> dict[str, Any]:
    """Parameters and FLOPs of one training step (forward + backward, the recipe's batch) of the last stage's
    model, counted on a freshly built model and a real batch of the training split (None when not countable)."""
    from torch.utils.data import default_collate

    from x2ct_framework.config.build import build_dataset, build_model, stages
    from x2ct_framework.model_info import step_flops

    st = stages(recipe)[-1]
    model = build_model(recipe, st)
    params = sum(p.numel() for p in model.parameters())
    batch_size = st.options["batch_size"] or recipe["train"]["batch_size"]
    try:
        dataset = build_dataset(recipe, st, "train")
        batch = default_collate([dataset[i % len(dataset)] for i in range(batch_size)])
        flops = step_flops(model.train(), batch["xrays"].float(), batch["geometry"])
    except Exception as exc:  # noqa: BLE001 - a model the counter cannot trace still gets its row
        return {"params": params, "step_flops": None, "flops_note": f"{type(exc).__name__}: {exc}"[:200]}
    return {"params": params, "step_flops": flops, "batch": batch_size}


def val_curve(run_dir: Path, stage: str, key: str) -> list[list[float]]:
    """``[[step, value], ...]`` of ``key`` from the stage's validation log (``metrics.jsonl``)."""
    path = Path(run_dir) / stage / "metrics.jsonl"
    points = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return points
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "val" and isinstance(row.get(key), (int, float)):
            points.append([int(row.get("step", 0)), float(row[key])])
    return points


def atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
    if cell.kind in ("blind_mean", "sart"):
        return run_reference(matrix, cell, seed, out, steps, recipe)
    if cell.kind == "rescore":
        return run_rescore(matrix, cell, seed, out, steps, recipe)
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
    timing["device"] = device_label()
    train_wall = time.perf_counter() - t0
    saved = read_result(run_dir / "timing.json")
    if timing["steps_timed"] == 0 and saved:  # training had finished before (the evaluation was cut short)
        timing = saved
    else:
        atomic_json(run_dir / "timing.json", timing)
    scores = evaluate_run(recipe, matrix)
    if timing["params"] is None:  # every stage had finished before: count the model's parameters here
        from x2ct_framework.config.build import build_model, stages

        timing["params"] = sum(p.numel() for p in build_model(recipe, stages(recipe)[-1]).parameters())
    stage = recipe["stages"][-1]
    train = recipe["train"]
    batch = (stage["batch_size"] or train["batch_size"]) * (stage["grad_accum"] or train["grad_accum"])
    cost = step_cost(recipe)
    cost["step_flops_total"] = (cost["step_flops"] * (stage["grad_accum"] or train["grad_accum"])
                                if cost.get("step_flops") is not None else None)
    curve = val_curve(run_dir, stage["name"], matrix.eval["curve"])
    result = {"cell": cell.name, "seed": seed, "data_seed": matrix.data_seed(seed), "key": key,
              "kind": cell.kind, "cost": cost, "curve": curve,
              "finished": _dt.datetime.now().isoformat(timespec="seconds"),
              "budget_steps": steps, "epochs": recipe["stages"][-1]["epochs"], "batch": batch,
              "train_wall_s": train_wall, "eval_wall_s": time.perf_counter() - t0 - train_wall,
              "resolution": stage["resolution"], "run_dir": str(run_dir), **timing, **scores}
    atomic_json(result_path(out, cell.name, seed), result)
    return result


def sart_model(recipe, iterations: int):
    """The analytic reference: SART from each test case's own X-rays, inverted with the dataset's intensity mapping."""
    from x2ct_framework.config.build import build_dataset, stages
    from x2ct_framework.physics.iterative import SARTReconstruction

    stage = stages(recipe)[-1]
    dataset = build_dataset(recipe, stage, "test")
    probe = getattr(dataset, "dataset", dataset)  # a wrapped dataset exposes the rendering options beneath
    missing = [k for k in ("hu_window", "mu_water", "beer_lambert") if not hasattr(probe, k)]
    style = getattr(probe, "xray", None)
    if missing or getattr(style, "uses_lines", False):
        why = (f"lacks {', '.join(missing)}" if missing else
               "renders spectral or style-randomised radiographs (data.xray), which SART cannot invert")
        raise ValueError(f"a sart cell needs a dataset whose X-rays are the framework's ideal DRR (it reads hu_window, "
                         f"mu_water and beer_lambert to invert them); {type(probe).__name__} {why}")
    return SARTReconstruction(stage.resolution, hu_window=tuple(probe.hu_window), mu_water=probe.mu_water,
                              beer_lambert=probe.beer_lambert, iterations=iterations)


def run_reference(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, recipe) -> dict:
    """A reference row, nothing trained: the training split's mean CT as every test prediction (``blind_mean``),
    or SART from each test case's own views (``sart``)."""
    key = run_hash(recipe, matrix, hash_kind(cell))
    t0 = time.perf_counter()
    model = blind_mean(recipe) if cell.kind == "blind_mean" else sart_model(recipe, cell.iterations)
    scores = evaluate_run(recipe, matrix, model=model)
    result = {"cell": cell.name, "seed": seed, "data_seed": matrix.data_seed(seed), "key": key, "kind": cell.kind,
              "finished": _dt.datetime.now().isoformat(timespec="seconds"), "budget_steps": 0, "epochs": 0,
              "steps": 0, "train_wall_s": 0.0, "eval_wall_s": time.perf_counter() - t0, "params": 0,
              "time_per_step_s": float("nan"), "cost": {"params": 0, "step_flops": 0, "step_flops_total": 0},
              "curve": [], "resolution": recipe["stages"][-1]["resolution"], "device": device_label(), **scores}
    atomic_json(result_path(out, cell.name, seed), result)
    return result


# what a rescore cell's result takes from its trained cell's: the training is the same, so is its cost
TRAINING_FIELDS = ("cost", "curve", "budget_steps", "epochs", "batch", "steps", "steps_timed", "time_per_step_s",
                   "train_wall_s", "params", "peak_mem_mib", "mem_kind", "resolution", "run_dir", "device",
                   "load_avg")


def run_rescore(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, recipe) -> dict:
    """Score the finished run of cell ``cell.of`` (this seed) again, with ``cell.eval_set`` applied at evaluation
    only: the same weights, nothing trained. The trained cell's result must be finished and current."""
    source = matrix.trained_cell(cell)
    src = read_result(result_path(out, source.name, seed))
    if src is None or src.get("key") != run_hash(recipe, matrix, hash_kind(source)):
        why = "has no finished result" if src is None else "has a result of an earlier definition of that cell"
        raise CellFailed(f"{run_name(cell.name, seed)}: rescore cell {cell.name!r} scores the runs of "
                         f"{source.name!r}, and {run_name(source.name, seed)} {why} in {out}; run that cell "
                         f"first (--only {source.name} {cell.name})")
    key = run_hash(recipe, matrix, hash_kind(cell))
    t0 = time.perf_counter()
    scores = evaluate_run(recipe, matrix, overrides=cell.eval_set)
    result = {**{k: src[k] for k in TRAINING_FIELDS if k in src}, "cell": cell.name, "seed": seed,
              "data_seed": matrix.data_seed(seed), "key": key, "kind": cell.kind, "rescore_of": source.name,
              "source_key": src["key"], "eval_set": list(cell.eval_set),
              "finished": _dt.datetime.now().isoformat(timespec="seconds"),
              "eval_wall_s": time.perf_counter() - t0, **scores}
    atomic_json(result_path(out, cell.name, seed), result)
    return result


def run_calibration(matrix: Matrix, cell: Cell, seed: int, out: Path, steps: int, extra: list[str]) -> dict:
    """Train (without scoring) a short run of ``cell`` from scratch; its timing only."""
    recipe = cell_recipe(matrix, cell, seed, out, steps, extra)
    run_dir = Path(recipe["output_dir"]) / recipe.name
    shutil.rmtree(run_dir, ignore_errors=True)
    return train_and_time(recipe, resume=False)


# ---- wall-time budgets ------------------------------------------------------------------------
def calibration_dir(out: Path) -> Path:
    return out / "calibration"


def calibrate(matrix: Matrix, cell: Cell, out: Path, extra: list[str], isolate: bool) -> int:
    """Steps per trained stage that fit ``budget.wall_s`` for this cell, from a short timed run (cached)."""
    cal_steps = matrix.budget["calibration_steps"]
    where = calibration_dir(out)
    recipe = cell_recipe(matrix, cell, matrix.seeds[0], where, cal_steps * matrix.budget["epochs"], extra)
    key = run_hash(recipe, matrix) + f"-wall{matrix.budget['wall_s']}"
    path = where / f"{cell.name}.json"
    old = read_result(path)
    if old and old.get("key") == key:
        return int(old["steps"])
    one = dataclasses.replace(cell, budget_scale=1.0 / matrix.budget["epochs"])
    job = Job(one, matrix.seeds[0], cal_steps * matrix.budget["epochs"], mode=CALIBRATION)
    if isolate:
        res = run_isolated(matrix, job, out, extra)
    else:
        res = run_calibration(matrix, one, job.seed, where, job.steps, extra)
    t = res["time_per_step_s"]
    epochs = matrix.budget["epochs"]
    steps = max(epochs, int(matrix.budget["wall_s"] / t) // epochs * epochs)
    atomic_json(path, {"key": key, "time_per_step_s": t, "steps": steps, "wall_s": matrix.budget["wall_s"]})
    return steps


# ---- one job in a child process -----------------------------------------------------------------
@dataclass
class Job:
    cell: Cell
    seed: int
    steps: int
    mode: str = CELL  # CELL or CALIBRATION

    @property
    def name(self) -> str:
        return run_name(self.cell.name, self.seed) + ("-calibration" if self.mode == CALIBRATION else "")


@dataclass
class Slot:
    """Where a child process runs: its environment (device, thread budget) and its label."""

    index: int = 0
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    label: str = ""


class CellFailed(RuntimeError):
    pass


def run_isolated(matrix: Matrix, job: Job, out: Path, extra: list[str], slot: Slot | None = None) -> dict:
    """Run one job in a fresh Python process (clean peak memory, a crash stays contained)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = {"matrix": str(matrix.path), "cell": job.cell.name, "budget_scale": job.cell.budget_scale,
            "seed": job.seed, "out": str(out), "steps": job.steps, "extra": list(extra), "mode": job.mode}
    log = logs / f"{job.name}.log"
    cmd = [sys.executable, "-m", "benchmarks.variants", "--run-one", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if slot is not None:
        env.update(slot.env)
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise CellFailed(f"{job.name} failed (exit {rc}); log {log}:\n{tail}")
    if job.mode == CALIBRATION:
        return read_result(calibration_dir(out) / f"{run_name(job.cell.name, job.seed)}.timing.json") or {}
    res = read_result(result_path(out, job.cell.name, job.seed))
    if res is None:
        raise CellFailed(f"{job.name} wrote no result file; log {log}")
    return res


def run_one(spec_text: str) -> int:
    """Child-process entry: run one job described by a JSON spec (see :func:`run_isolated`)."""
    spec = json.loads(spec_text)
    matrix = load_matrix(spec["matrix"])
    cell = dataclasses.replace(matrix.cell(spec["cell"]), budget_scale=spec["budget_scale"])
    out = Path(spec["out"])
    if spec.get("mode", CELL) == CALIBRATION:
        where = calibration_dir(out)
        res = run_calibration(matrix, cell, spec["seed"], where, spec["steps"], spec["extra"])
        atomic_json(where / f"{run_name(cell.name, spec['seed'])}.timing.json", res)
    else:
        run_cell(matrix, cell, spec["seed"], out, spec["steps"], spec["extra"])
    return 0


# ---- slots: devices and thread budgets ----------------------------------------------------------
def make_slots(workers: int = 1, devices: str = "auto", per_device: int = 1,
               threads_per_worker: int = 0) -> list[Slot]:
    """The parallel slots of a run.

    ``devices``: ``auto`` (every visible GPU, else the CPU), ``cpu``, or GPU ids ``0,1,2,3``. With GPUs
    there are ``len(devices) x per_device`` slots (``workers`` caps them), each pinned to its GPU
    through ``CUDA_VISIBLE_DEVICES``; on the CPU there are ``workers`` slots. Every slot gets
    ``threads_per_worker`` threads (0: the logical CPUs shared evenly).
    """
    from x2ct_framework.errors import RecipeError

    if devices == "auto":
        ids = _visible_gpus()
    elif devices == "cpu":
        ids = []
    else:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids):
            raise RecipeError([f"--devices: expected auto, cpu or GPU ids such as 0,1,2,3, got {devices!r}"])
    if workers < 0 or per_device < 1 or threads_per_worker < 0:
        raise RecipeError(["--workers, --per-device and --threads-per-worker: expected positive integers "
                           f"(got {workers}, {per_device}, {threads_per_worker})"])
    n = (len(ids) * per_device if ids else 1) if workers == 0 else workers
    if ids:
        n = min(n, len(ids) * per_device)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n)
    slots = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "X2CT_MATRIX_SLOT": str(i)}
        if ids:
            gpu = ids[i % len(ids)]
            env["CUDA_VISIBLE_DEVICES"] = gpu
            label = f"cuda:{gpu}"
        else:
            if devices == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            label = f"cpu x{threads}"
        slots.append(Slot(i, env, label))
    return slots


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``K/N`` (1-based): this process runs every N-th job of the plan starting at the K-th."""
    from x2ct_framework.errors import RecipeError

    if not text:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise RecipeError([f"--shard: expected K/N with 1 <= K <= N (this node's share of the jobs), got {text!r}"])
    return k, n


# ---- the matrix: plan, resume, dispatch ---------------------------------------------------------
def default_out(matrix: Matrix) -> Path:
    return REPO / "benchmarks" / "out" / "matrix" / matrix.name


def run_matrix(matrix: Matrix, out: Path | None = None, *, only: list[str] | None = None,
               seeds: list[int] | None = None, extra: list[str] = (), isolate: bool = True, rerun: list[str] = (),
               plot: bool = True, log=print, slots: list[Slot] | None = None,
               shard: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Run every unfinished (cell, seed), then write the tables; returns what was run, skipped and failed.

    ``slots`` (see :func:`make_slots`) run that many jobs at once, each in its own process;
    ``shard = (k, n)`` keeps the k-th of every n jobs of the plan (one share per node).
    """
    from benchmarks.variants.tables import write_tables

    out = Path(out or default_out(matrix)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    slots = slots or [Slot()]
    if len(slots) > 1 and not isolate:
        raise ValueError("parallel slots run each job in its own process: isolate must be true")
    wanted = set(only or [c.name for c in matrix.cells])
    wanted |= {c.of for c in matrix.cells if c.name in wanted and c.kind == "rescore"}  # a rescore needs its runs
    cells = [c for c in matrix.cells if c.name in wanted]
    unknown = sorted(set(only or []) - {c.name for c in matrix.cells})
    if unknown:
        from x2ct_framework.errors import RecipeError

        raise RecipeError([f"--only: no cell named {', '.join(unknown)} in {matrix.path} "
                           f"(cells: {', '.join(c.name for c in matrix.cells)})"])
    seeds = list(seeds or matrix.seeds)
    status: dict[str, Any] = {"ran": [], "skipped": [], "failed": {}}
    todo: list[Job] = []
    for cell in cells:
        trains = matrix.trained_cell(cell)
        try:
            steps = (calibrate(matrix, trains, out, list(extra), isolate)
                     if "wall_s" in matrix.budget and trains.kind == "train"
                     else matrix.budget.get("steps") or matrix.budget["epochs"])
        except CellFailed as exc:
            status["failed"][cell.name] = str(exc)
            continue
        for seed in seeds:
            key = run_hash(cell_recipe(matrix, cell, seed, out, steps, list(extra)), matrix, hash_kind(cell))
            old = read_result(result_path(out, cell.name, seed))
            if old and old.get("key") == key and cell.name not in rerun:
                status["skipped"].append(run_name(cell.name, seed))
                continue
            todo.append(Job(cell, seed, steps))
    # a rescore scores its trained cell's weights: when those are trained (or re-scored) again, so is it
    again = {(j.cell.name, j.seed): j.steps for j in todo}
    for cell in cells:
        for seed in seeds:
            name = run_name(cell.name, seed)
            if cell.kind == "rescore" and (cell.of, seed) in again and name in status["skipped"]:
                status["skipped"].remove(name)
                todo.append(Job(cell, seed, again[cell.of, seed]))
    # seed by seed across the cells: a change in machine load spreads over all cells instead of a few,
    # and a cut-short matrix leaves complete seeds rather than complete cells
    order = {c.name: i for i, c in enumerate(cells)}
    todo.sort(key=lambda j: (seeds.index(j.seed), order[j.cell.name]))
    k, n = shard
    todo = todo[k - 1::n]
    # rescore jobs score finished runs: they wait until every training job has ended (a second phase)
    phases = [[j for j in todo if j.cell.kind != "rescore"], [j for j in todo if j.cell.kind == "rescore"]]
    for job in todo:
        if job.cell.name in rerun:  # train again from scratch (a finished run folder would only be re-scored)
            shutil.rmtree(out / run_name(job.cell.name, job.seed), ignore_errors=True)
    where = f"; {len(slots)} parallel slots ({', '.join(s.label for s in slots)})" if len(slots) > 1 else ""
    log(f"matrix {matrix.name}: {len(cells)} cells x {len(seeds)} seeds; {len(status['skipped'])} finished earlier, "
        f"{len(todo)} to run{f' (shard {k}/{n})' if n > 1 else ''}; output {out}{where}")
    t_start = time.perf_counter()
    lock = threading.Lock()
    finished = [0]

    def one(job: Job, slot: Slot) -> None:
        t0 = time.perf_counter()
        try:
            if isolate:
                res = run_isolated(matrix, job, out, list(extra), slot if len(slots) > 1 else None)
            else:
                res = run_cell(matrix, job.cell, job.seed, out, job.steps, list(extra))
        except CellFailed as exc:
            with lock:
                status["failed"][job.name] = str(exc)
                finished[0] += 1
                log(f"  [{finished[0]}/{len(todo)}] {job.name}: FAILED\n{exc}")
            return
        with lock:
            status["ran"].append(job.name)
            finished[0] += 1
            i = finished[0]
            eta = (time.perf_counter() - t_start) / i * (len(todo) - i)
            m = res.get("metrics", {})
            log(f"  [{i}/{len(todo)}] {job.name}: {time.perf_counter() - t0:.0f} s, {res.get('steps')} steps, "
                f"{res.get('time_per_step_s', float('nan')):.3f} s/step, psnr {m.get('psnr', float('nan')):.2f}, "
                f"ssim {m.get('ssim', float('nan')):.3f}, {res.get('device', '?')}; about {eta / 60:.1f} min left")

    for phase in phases:
        if phase:
            _dispatch(phase, slots, one, status, lock, log)
    status["tables"] = write_tables(matrix, out, plot=plot, extra=list(extra))
    status["out"] = out
    return status


def _dispatch(todo: list[Job], slots: list[Slot], one, status: dict, lock: threading.Lock, log) -> None:
    """Run ``todo`` on the slots (one job per slot at a time) and return when all have ended."""
    if len(slots) == 1:
        for job in todo:
            one(job, slots[0])
    else:
        jobs: queue.Queue = queue.Queue()
        for job in todo:
            jobs.put(job)

        def worker(slot: Slot) -> None:
            while True:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    one(job, slot)
                except Exception as exc:  # noqa: BLE001 - a thread must not drop a job without a word
                    with lock:
                        status["failed"][job.name] = f"{type(exc).__name__}: {exc}"
                        log(f"  {job.name}: FAILED in slot {slot.index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(s,), name=f"matrix-slot-{s.index}") for s in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

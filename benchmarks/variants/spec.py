"""The matrix file: its schema (the framework's own recipe schema types), loading and the checks across keys.

Errors read like recipe errors, ``file: dotted -> key: what was expected, got what``, all reported at once.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from x2ct_framework.config.document import Recipe
from x2ct_framework.config.schema import REQUIRED, ArrayOf, Table, Value, _check, at_least_one, positive
from x2ct_framework.errors import RecipeError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_METRICS = ["psnr", "ssim", "mae_hu", "bone_dice", "vessel_dice", "lung_dice", "landmark_mm"]
HASHED_EVAL = ("protocol", "split", "which", "max_cases", "batch_size")  # what changes a result (not its display)
CELL_KINDS = ("train", "blind_mean", "sart", "rescore")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _name(v: str) -> str | None:
    return None if NAME_RE.match(v) else "expected letters, digits, '_', '-' or '.'"


def _seeds(v: list) -> str | None:
    return None if v and len(set(v)) == len(v) else "expected a non-empty array of distinct integers"


def _data_seeds(v: list) -> str | None:
    return None if len(set(v)) == len(v) else "expected distinct integers"


def _stage_scales(v: Any) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and _number(f) and f > 0 for k, f in v.items())
    return None if ok else "expected a table of stage name = positive number, e.g. { refiner = 2 }"


CELL = Table({
    "name": Value("str", REQUIRED, "cell name (letters, digits, _ - .)", check=_name),
    "question": Value("str", "", "what the cell asks, shown in the tables"),
    "recipe": Value("str", "", "the cell's own base recipe (relative to the matrix file); default: base"),
    "set": Value("list[str]", [], "--set style overrides of this cell (\"key=value\")"),
    "budget_scale": Value("number", 1.0, "the cell trains budget_scale x the budget's epochs", check=positive),
    "stage_budget_scale": Value("any", {}, "per-stage factors on budget_scale, by stage name (e.g. { refiner = 2 }): "
                                "that stage trains budget.epochs x budget_scale x factor epochs, the others "
                                "budget.epochs x budget_scale (steps budgets only)", check=_stage_scales),
    "note": Value("str", "", "a note shown under the tables"),
    "kind": Value("str", "train", "train: train the recipe and score it; blind_mean: no training, the voxel-wise "
                  "mean CT of the training split is scored as every case's prediction (the floor a model that "
                  "ignores its X-rays reaches without learning anything); sart: no training, an analytic "
                  "reconstruction (SART through the projector and its adjoint, x2ct_framework.physics.iterative) "
                  "of every test case from its own views (the reference for 4+ views); rescore: no training, the "
                  "finished runs of the trained cell `of` scored again with the overrides `eval_set` applied at "
                  "evaluation only (another sampler, other test X-rays: the same weights)", choices=CELL_KINDS),
    "iterations": Value("int", 10, "sart cells: full passes over the views", check=positive),
    "of": Value("str", "", "rescore cells: the trained cell whose runs (the same weights, seed by seed) are scored"),
    "eval_set": Value("list[str]", [], "rescore cells: --set style overrides applied when scoring only "
                      "(e.g. \"stages.refiner.model.sample_shift=3\")"),
})

MATRIX = Table({
    "name": Value("str", REQUIRED, "matrix name (the default output folder)", check=_name),
    "description": Value("str", "", "free text shown at the top of matrix.md"),
    "base": Value("str", REQUIRED, "base recipe of every cell (relative to the matrix file)"),
    "set": Value("list[str]", [], "overrides for every cell (--set syntax)"),
    "seeds": Value("list[int]", [0, 1, 2], "random seeds; every cell runs once per seed", check=_seeds),
    "data_seeds": Value("list[int]", [], "one data seed per training seed (same order): run i trains with seeds[i] "
                        "on the data drawn with data_seeds[i] (set at data_seed_key), so intervals cover both "
                        "sources of variation; [] = the recipe's data seed for every run", check=_data_seeds),
    "data_seed_key": Value("str", "data.seed", "the recipe key that receives the data seed"),
    "floor": Value("str", "", "the blind_mean cell every cell's gain is measured against (per case, same data "
                   "seed); '' = the first blind_mean cell, if any"),
    "reference": Value("str", "", "the cell the others are compared with; default: the first"),
    "trackers": Value("list[str]", [], "Accelerate trackers of every run (tensorboard, wandb, ...); [] = none. "
                      "Not part of a result's hash"),
    "notes": Value("list[str]", [], "notes shown under the tables"),
    "budget": Table({
        "steps": Value("any", None, "optimizer steps per trained stage (a multiple of epochs)"),
        "wall_s": Value("any", None, "or: seconds of training per trained stage (calibrated per cell)"),
        "epochs": Value("int", 1, "the budget is cut into this many epochs (validation points)", check=at_least_one),
        "calibration_steps": Value("int", 4, "steps per epoch of the timed calibration run (wall_s budgets)",
                                   check=at_least_one),
    }, "the fixed training budget of every cell"),
    "eval": Table({
        "protocol": Value("str", "default", "metric protocol that scores every run"),
        "split": Value("str", "test", "split scored", choices=("train", "val", "test")),
        "which": Value("str", "best", "checkpoint of the last stage that is scored (best or last)"),
        "metrics": Value("list[str]", list(DEFAULT_METRICS), "metrics shown in the tables"),
        "compare": Value("list[str]", ["psnr", "ssim"], "metrics compared with the reference seed by seed"),
        "max_cases": Value("int", 0, "cases scored; 0 = the whole split", check=lambda v: None if v >= 0 else
                           "expected an integer >= 0"),
        "batch_size": Value("int", 0, "evaluation batch; 0 = the recipe's", check=lambda v: None if v >= 0 else
                            "expected an integer >= 0"),
        "curve": Value("str", "val/psnr", "the validation value whose curve over training is plotted and tested "
                       "for a plateau"),
        "plateau_db": Value("number", 0.2, "the plateau criterion: the reference cell's curve gains less than this "
                            "over the last quarter of its budget"),
    }, "how every run is scored"),
    "cells": ArrayOf(CELL, "the cells: one recipe variant each", min_items=1),
})


@dataclass
class Cell:
    name: str
    question: str = ""
    set: list[str] = field(default_factory=list)
    budget_scale: float = 1.0
    note: str = ""
    stage_budget_scale: dict[str, float] = field(default_factory=dict)
    recipe: Path | None = None  # the cell's own base recipe (default: the matrix's base)
    kind: str = "train"
    iterations: int = 10  # sart cells: full passes over the views
    of: str = ""  # rescore cells: the trained cell whose runs are scored again
    eval_set: list[str] = field(default_factory=list)  # rescore cells: overrides at evaluation only


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
    trackers: list[str] = field(default_factory=list)
    data_seeds: list[int] = field(default_factory=list)
    data_seed_key: str = "data.seed"
    floor: str = ""

    def data_seed(self, seed: int) -> int | None:
        """The data seed run with training seed ``seed`` (None: the recipe's own)."""
        return self.data_seeds[self.seeds.index(seed)] if self.data_seeds and seed in self.seeds else None

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)

    def trained_cell(self, cell: Cell) -> Cell:
        """The cell whose training (recipe, budget, run folder) ``cell`` uses: its own, or a rescore cell's ``of``."""
        return self.cell(cell.of) if cell.kind == "rescore" else cell


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_matrix(path: str | Path) -> Matrix:
    """Read and check a matrix TOML file; every problem is reported at once (RecipeError)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError([f"matrix file not found: {path}"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{path}: not valid TOML: {exc}"]) from exc
    doc = Recipe(raw, path)
    p: list[str] = []
    data = _check(MATRIX, raw, (), doc, p)
    if not isinstance(data, dict):
        raise RecipeError(p)
    base = path.parent / data["base"] if isinstance(data.get("base"), str) else None
    if base is not None and not base.is_file():
        p.append(f"{doc.where('base')}: recipe not found: {base.resolve()}")
    budget = data.get("budget") if isinstance(data.get("budget"), dict) else {}
    given = {k for k in ("steps", "wall_s") if budget.get(k) is not None}
    for key, kind in (("steps", "an integer"), ("wall_s", "a number")):
        v = budget.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) if key == "steps" else _number(v)):
            p.append(f"{doc.where('budget', key)}: expected {kind}, got {v!r}")
            budget[key] = None
    budget = {k: v for k, v in budget.items() if v is not None}
    if len(given) != 1:
        p.append(f"{doc.where('budget')}: set exactly one of steps (optimizer steps per trained stage) or wall_s "
                 f"(seconds of training per trained stage)")
    epochs = budget.get("epochs", 1)
    steps = budget.get("steps")
    if isinstance(steps, int) and isinstance(epochs, int) and epochs >= 1 and (steps < 1 or steps % epochs):
        p.append(f"{doc.where('budget', 'steps')}: expected a positive multiple of budget.epochs ({epochs}), "
                 f"got {steps}")
    if "wall_s" in budget and budget["wall_s"] <= 0:
        p.append(f"{doc.where('budget', 'wall_s')}: expected a positive number of seconds, got {budget['wall_s']}")
    cells: list[Cell] = []
    for i, c in enumerate(data.get("cells") if isinstance(data.get("cells"), list) else []):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not NAME_RE.match(c["name"]):
            continue  # the schema has named the problem
        scale = c.get("budget_scale", 1.0)
        per_stage = c.get("stage_budget_scale", {})
        per_stage = per_stage if _stage_scales(per_stage) is None else {}
        if per_stage and "wall_s" in budget:
            p.append(f"{doc.where('cells', i, 'stage_budget_scale')}: per-stage budgets need a steps budget "
                     f"(budget.steps), not budget.wall_s")
        if _number(scale) and scale > 0 and isinstance(epochs, int):  # every trained stage: whole epochs
            counts = [(doc.where("cells", i, "budget_scale"), f"budget.epochs ({epochs}) x {scale}", epochs * scale)]
            counts += [(doc.where("cells", i, "stage_budget_scale", stage),
                        f"budget.epochs ({epochs}) x budget_scale ({scale}) x {factor}", epochs * scale * factor)
                       for stage, factor in per_stage.items()]
            for where, product, e in counts:
                if abs(e - round(e)) > 1e-9 or round(e) < 1:
                    p.append(f"{where}: {product} = {e:g} must be a whole number of epochs >= 1")
        own = None
        if isinstance(c.get("recipe"), str) and c["recipe"]:
            own = (path.parent / c["recipe"]).resolve()
            if not own.is_file():
                p.append(f"{doc.where('cells', i, 'recipe')}: recipe not found: {own}")
        cells.append(Cell(name=c["name"], question=c.get("question", ""), set=list(c.get("set", [])),
                          budget_scale=float(scale) if _number(scale) else 1.0, note=c.get("note", ""), recipe=own,
                          stage_budget_scale={k: float(f) for k, f in per_stage.items()},
                          kind=c.get("kind", "train"), iterations=int(c.get("iterations", 10)),
                          of=c.get("of", "") if isinstance(c.get("of"), str) else "",
                          eval_set=list(c.get("eval_set", [])) if isinstance(c.get("eval_set"), list) else []))
        if c.get("kind") == "rescore":
            written = raw["cells"][i] if isinstance(raw.get("cells"), list) else {}  # the keys in the file
            given = [k for k in ("set", "recipe", "budget_scale", "stage_budget_scale") if k in written]
            if given:
                p.append(f"{doc.where('cells', i)}: a rescore cell trains nothing: its recipe and budget are those "
                         f"of its cell `of`; remove {', '.join(given)} (overrides at evaluation go in eval_set)")
            if not c.get("eval_set"):
                p.append(f"{doc.where('cells', i, 'eval_set')}: a rescore cell needs the overrides it scores with, "
                         f"e.g. eval_set = [\"stages.refiner.model.sample_shift=3\"]")
        elif c.get("of") or c.get("eval_set"):
            p.append(f"{doc.where('cells', i)}: `of` and `eval_set` belong to rescore cells (kind = \"rescore\"), "
                     f"this cell's kind is {c.get('kind', 'train')!r}")
    names = [c.name for c in cells]
    kinds = {c.name: c.kind for c in cells}
    for i, c in enumerate(cells):
        if c.kind == "rescore" and kinds.get(c.of) != "train":
            what = f"a {kinds[c.of]} cell" if c.of in kinds else "not a cell"
            p.append(f"{doc.where('cells', i, 'of')}: a rescore cell scores the runs of a trained cell; {c.of!r} is "
                     f"{what} (trained cells: {', '.join(n for n, k in kinds.items() if k == 'train') or 'none'})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        p.append(f"{doc.where('cells')}: cell names must be unique, repeated: {', '.join(dup)}")
    ref = data.get("reference") or (names[0] if names else "")
    if names and ref not in names:
        p.append(f"{doc.where('reference')}: {ref!r} is not a cell (cells: {', '.join(names)})")
    if data.get("data_seeds") and isinstance(data.get("seeds"), list) and len(data["data_seeds"]) != len(data["seeds"]):
        p.append(f"{doc.where('data_seeds')}: expected one data seed per training seed ({len(data['seeds'])}), "
                 f"got {len(data['data_seeds'])}")
    floors = [c.name for c in cells if c.kind == "blind_mean"]
    floor = data.get("floor") or (floors[0] if floors else "")
    if floor and floor not in floors:
        p.append(f"{doc.where('floor')}: {floor!r} is not a blind_mean cell (blind_mean cells: "
                 f"{', '.join(floors) or 'none'})")
    if ref in floors:
        p.append(f"{doc.where('reference')}: the reference must be a trained cell, {ref!r} is the blind mean")
    if p:
        raise RecipeError(p)
    return Matrix(path=path, name=data["name"], base=base.resolve(), description=data["description"],
                  set=list(data["set"]), seeds=list(data["seeds"]), reference=ref, budget=budget,
                  eval=dict(data["eval"]), notes=list(data["notes"]), cells=cells, trackers=list(data["trackers"]),
                  data_seeds=list(data["data_seeds"]), data_seed_key=data["data_seed_key"], floor=floor)

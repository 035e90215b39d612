"""The recipe schema: every key the core understands, its type, default and meaning.

Component tables (``[data]``, ``[model]``, each loss) are open here: their options are checked
against the plugin factory's signature when the component is built (``x2ct validate`` does that
for every component without training). Validation fills defaults in place, so the resolved recipe
written to the run folder holds every value the run used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from x2ct_framework.errors import RecipeError, did_you_mean
from x2ct_framework.config.document import Key, Recipe, format_key

REQUIRED = object()


@dataclass
class Value:
    kind: str  # int, float, number, str, bool, list[int], list[float], list[str], list, any
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # returns a problem or None


@dataclass
class Table:
    fields: dict
    doc: str = ""
    open: bool = False  # open tables (component options) accept any key


@dataclass
class Component:
    """A ``name = "..."`` table whose other keys are the plugin's options."""

    doc: str = ""
    required: bool = True


@dataclass
class ArrayOf:
    item: Table
    doc: str = ""
    min_items: int = 0


@dataclass
class Losses:
    """``{ l1 = 1.0, ssim = 0.5 }`` or a table per term with ``weight``, options and a schedule."""

    doc: str = ""


def positive(v: Any) -> str | None:
    return None if v > 0 else "expected a positive number"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "expected a number >= 0"


def at_least_one(v: Any) -> str | None:
    return None if v >= 1 else "expected an integer >= 1"


def optimizer_name(v: Any) -> str | None:
    from x2ct_framework.config.optim import OPTIMIZERS

    if v.lower() in OPTIMIZERS:
        return None
    return f"unknown optimizer{did_you_mean(v.lower(), OPTIMIZERS)} (known: {', '.join(sorted(OPTIMIZERS))})"


def metric_key(v: Any) -> str | None:
    return None if v.startswith("val/") else 'expected a validation metric such as "val/psnr" or "val/loss"'


def protocol_names(v: Any) -> str | None:
    """Names of metric protocols; the list of known ones is the evaluation package's."""
    from x2ct_framework.evaluation.protocols import check_names

    return check_names(v)


STAGE = Table(
    {
        "name": Value("str", "", "stage name; defaults to stageN"),
        "resolution": Value("int", REQUIRED, "output volume size R (R^3 voxels)", check=positive),
        "epochs": Value("int", REQUIRED, "epochs of this stage", check=non_negative),
        "lr": Value("number", 1e-4, "peak learning rate (at train.reference_batch when lr_scaling is set)",
                    check=positive),
        "min_lr": Value("number", 1e-6, "final learning rate of the cosine schedule", check=non_negative),
        "warmup_steps": Value("int", 0, "linear warm-up in optimizer steps", check=non_negative),
        "optimizer": Value("str", "adamw", "torch.optim optimizer by name (adamw, adam, sgd, radam, ...)",
                           check=optimizer_name),
        "optimizer_options": Table({}, "extra optimizer arguments, e.g. betas = [0.9, 0.95]", open=True),
        "weight_decay": Value("number", 0.01, "weight decay", check=non_negative),
        "scheduler": Value("str", "cosine", "learning-rate schedule per optimizer step: cosine lr -> min_lr, "
                           "constant, or linear_decay (lr for constant_epochs, then linear to min_lr; all after "
                           "the warm-up)", choices=("cosine", "constant", "linear_decay")),
        "constant_epochs": Value("int", 0, "epochs at the full lr before linear_decay starts (X2CT-GAN: 50 of 100)",
                                 check=non_negative),
        "batch_size": Value("int", 0, "per-device batch size; 0 takes train.batch_size", check=non_negative),
        "grad_accum": Value("int", 0, "gradient accumulation steps; 0 takes train.grad_accum", check=non_negative),
        "checkpoint_every": Value("int", 0, "periodic checkpoint every N epochs; 0 = off", check=non_negative),
        "val_every": Value("int", 1, "validate every N epochs (and after the last)", check=at_least_one),
        "select_best": Value("str", "val/psnr", "validation metric that picks the best checkpoint", check=metric_key),
        "best_mode": Value("str", "auto", "max or min of select_best; auto = min for losses and errors "
                           "(loss, mae, mse, lpips), max otherwise", choices=("auto", "max", "min")),
        "freeze": Value("list[str]", [], "parameter-name prefixes that are not trained in this stage"),
        "cascade": Value("bool", False, "feed the previous stage's prediction (its best model, frozen) to this "
                         "stage's model as prev; otherwise stages are chained by weights only"),
        "losses": Losses("loss terms and weights"),
        "model": Table({}, "model options that override [model] for this stage", open=True),
        "data": Table({}, "data options that override [data] for this stage", open=True),
    }
)

SCHEMA = Table(
    {
        "name": Value("str", REQUIRED, "experiment name; the run folder is output_dir/name"),
        "description": Value("str", "", "free text"),
        "seed": Value("int", 0, "global random seed"),
        "output_dir": Value("str", "runs", "parent folder of run folders (relative to the working directory)"),
        "plugins": Value("list[str]", [], "extra plugin modules or .py files (relative to the recipe)"),
        "data": Component("dataset plugin and its options"),
        "model": Component("model plugin and its options"),
        "train": Table(
            {
                "start_stage": Value("int", 1, "first stage to train (1-based)", check=at_least_one),
                "init_from": Value("str", "", "checkpoint folder that initialises the first trained stage "
                                   "(relative to the working directory)"),
                "init_from_recipe": Value("str", "", "the recipe that produces init_from, named in the error "
                                          "when it is missing (relative to this recipe)"),
                "batch_size": Value("int", 2, "per-device batch size", check=at_least_one),
                "grad_accum": Value("int", 1, "gradient accumulation steps", check=at_least_one),
                "lr_scaling": Value("str", "none", "how lr follows the global batch (per-device batch x processes x "
                                    "grad_accum): none, linear or sqrt in global_batch / reference_batch",
                                    choices=("none", "linear", "sqrt")),
                "reference_batch": Value("int", 0, "global batch at which the stages' lr values hold (lr_scaling)",
                                         check=non_negative),
                "mixed_precision": Value("str", "no", "Accelerate mixed precision", choices=("no", "fp16", "bf16")),
                "gradient_checkpointing": Value("bool", False, "recompute activations in the backward pass"),
                "max_grad_norm": Value("number", 1.0, "gradient clipping; 0 = off", check=non_negative),
                "max_nonfinite_steps": Value("int", 10, "optimizer steps skipped for a non-finite loss or gradient "
                                             "before a stage stops", check=non_negative),
                "ema": Table(
                    {
                        "enabled": Value("bool", False, "keep an exponential moving average of the weights for "
                                         "validation, best and the next stage"),
                        "decay": Value("number", 0.999, "EMA decay per optimizer step",
                                       check=lambda v: None if 0 < v < 1 else "expected 0 < decay < 1"),
                    }
                ),
                "num_workers": Value("int", 0, "data-loader worker processes", check=non_negative),
                "log_every": Value("int", 10, "log training metrics every N optimizer steps", check=at_least_one),
                "max_steps_per_epoch": Value("int", 0, "cap optimizer steps per epoch; 0 = full epoch",
                                             check=non_negative),
                "trackers": Value("list[str]", ["tensorboard"], "Accelerate trackers (tensorboard, wandb, mlflow, "
                                  "...); [] or [\"none\"] for none"),
                "progress": Value("bool", True, "show a progress bar on the main process"),
            }
        ),
        "eval": Table(
            {
                "metrics": Value("list[str]", ["psnr", "ssim"], "validation metrics (registry names)"),
                "preview": Value("bool", True, "write slice previews at each validation"),
                "protocols": Value("list[str]", ["default", "x2ctgan"],
                                   "metric protocols of the final evaluation and report (default, x2ctgan)",
                                   check=protocol_names),
                "split": Value("str", "test", "split scored at the end of a run", choices=("train", "val", "test")),
                "report": Value("bool", True, "evaluate the last stage's best checkpoint and write report.md "
                                              "at the end of a run"),
                "max_cases": Value("int", 0, "cases scored for the report; 0 = the whole split", check=non_negative),
                "bootstrap": Value("int", 1000, "bootstrap resamples of the 95% interval", check=non_negative),
                "worst_cases": Value("int", 3, "slice pictures of the N worst cases", check=non_negative),
                "gallery": Value("int", 2, "cases in the report's slice gallery", check=non_negative),
                "lpips": Value("str", "auto", "LPIPS in the default protocol: auto = when its weights are present",
                               choices=("auto", "on", "off")),
            }
        ),
        "stages": ArrayOf(STAGE, "the progressive stages, coarse to fine", min_items=1),
    }
)

_KIND_CHECK = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "list[float]": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "any": lambda v: True,
}
_KIND_WORDS = {"int": "an integer", "float": "a float", "number": "a number", "str": "a string",
               "bool": "true or false", "list": "an array", "list[int]": "an array of integers",
               "list[float]": "an array of numbers", "list[str]": "an array of strings", "any": "a value"}


def _default(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


def _check(spec: Any, value: Any, key: Key, recipe: Recipe, problems: list[str]) -> Any:
    where = recipe.where(*key)
    if isinstance(spec, Value):
        if not _KIND_CHECK[spec.kind](value):
            problems.append(f"{where}: expected {_KIND_WORDS[spec.kind]}, got {value!r}")
            return value
        if spec.choices and value not in spec.choices:
            problems.append(f"{where}: expected one of {', '.join(map(repr, spec.choices))}, got {value!r}"
                            f"{did_you_mean(value, spec.choices)}")
        elif spec.check is not None:
            msg = spec.check(value)
            if msg:
                problems.append(f"{where}: {msg}, got {value!r}")
        if spec.kind == "float" or (spec.kind == "number" and isinstance(spec.default, float)):
            value = float(value)
        return value
    if isinstance(spec, Component):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table with name = \"...\", got {value!r}")
        elif not isinstance(value.get("name"), str):
            problems.append(f"{recipe.where(*key, 'name')}: expected the plugin name as a string, got "
                            f"{value.get('name')!r}")
        return value
    if isinstance(spec, Losses):
        return _check_losses(value, key, recipe, problems)
    if isinstance(spec, ArrayOf):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            problems.append(f"{where}: expected an array of tables ([[{key[-1]}]]), got {value!r}")
            return value
        if len(value) < spec.min_items:
            problems.append(f"{where}: expected at least {spec.min_items} item(s), got none")
        return [_check(spec.item, v, key + (i,), recipe, problems) for i, v in enumerate(value)]
    if isinstance(spec, Table):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {value!r}")
            return value
        if spec.open:
            return value
        for k in value:
            if k not in spec.fields:
                problems.append(f"{recipe.where(*key, k)}: unknown key{did_you_mean(k, spec.fields)} "
                                f"(known: {', '.join(spec.fields)})")
        out = {}
        for k, sub in spec.fields.items():
            if k in value:
                out[k] = _check(sub, value[k], key + (k,), recipe, problems)
            elif isinstance(sub, Value):
                if sub.default is REQUIRED:
                    problems.append(f"{recipe.where(*key, k)}: required key is missing ({sub.doc})")
                else:
                    out[k] = _default(sub.default)
            elif isinstance(sub, Component):
                if sub.required:
                    problems.append(f"{recipe.where(*key, k)}: required table is missing ({sub.doc})")
            elif isinstance(sub, Table):
                out[k] = _check(sub, {}, key + (k,), recipe, problems)
            elif isinstance(sub, Losses):
                out[k] = {}
            elif isinstance(sub, ArrayOf) and sub.min_items:
                problems.append(f"{recipe.where(*key, k)}: required array of tables is missing ({sub.doc})")
        for k in value:
            if k not in spec.fields:
                out[k] = value[k]
        return out
    raise TypeError(spec)


LOSS_TERM_KEYS = ("name", "weight", "schedule", "start_epoch", "end_epoch")


def _check_losses(value: Any, key: Key, recipe: Recipe, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{recipe.where(*key)}: expected a table of loss terms such as "
                        f"{{ l1 = 1.0, ssim = 0.5 }}, got {value!r}")
        return value
    out = {}
    for name, term in value.items():
        where = recipe.where(*key, name)
        if isinstance(term, (int, float)) and not isinstance(term, bool):
            term = {"weight": float(term)}
        if not isinstance(term, dict):
            problems.append(f"{where}: expected a weight (number) or a table with weight and options, got {term!r}")
            continue
        term = dict(term)
        weight = term.setdefault("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            problems.append(f"{recipe.where(*key, name, 'weight')}: expected a number >= 0, got {weight!r}")
        schedule = term.setdefault("schedule", "constant")
        if schedule not in ("constant", "linear"):
            problems.append(f"{recipe.where(*key, name, 'schedule')}: expected \"constant\" or \"linear\" "
                            f"(linear warm-up from start_epoch to end_epoch), got {schedule!r}")
        out[name] = term
    return out


def validate_recipe(recipe: Recipe) -> Recipe:
    """Check the whole recipe against the schema, fill defaults in place, report all problems."""
    problems: list[str] = []
    data = _check(SCHEMA, recipe.data, (), recipe, problems)
    if problems:
        raise RecipeError(problems)
    for i, stage in enumerate(data["stages"]):
        if not stage["name"]:
            stage["name"] = f"stage{i + 1}"
    names = [s["name"] for s in data["stages"]]
    if len(set(names)) != len(names):
        problems.append(f"{recipe.where('stages')}: stage names must be unique, got {names}")
    if data["train"]["lr_scaling"] != "none" and not data["train"]["reference_batch"]:
        problems.append(f"{recipe.where('train', 'reference_batch')}: lr_scaling = "
                        f"{data['train']['lr_scaling']!r} needs the global batch at which the lr values hold")
    if data["train"]["start_stage"] > len(data["stages"]):
        problems.append(f"{recipe.where('train', 'start_stage')}: the recipe has {len(data['stages'])} stage(s), "
                        f"got start_stage = {data['train']['start_stage']}")
    # [data] hu_window is also handed to models, losses and metrics: check it here so that the error names it.
    window = data["data"].get("hu_window")
    if window is not None and not (isinstance(window, list) and len(window) == 2 and _KIND_CHECK["list[float]"](window)
                                   and window[0] < window[1]):
        problems.append(f"{recipe.where('data', 'hu_window')}: expected [low, high] in HU with low < high, got {window!r}")
    if problems:
        raise RecipeError(problems)
    recipe.data = data
    return recipe


def describe(spec: Any = SCHEMA, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) rows for the documentation."""
    rows = []
    if isinstance(spec, ArrayOf):
        return describe(spec.item, prefix + ".N")
    if isinstance(spec, Table):
        for k, sub in spec.fields.items():
            dotted = f"{prefix}.{k}" if prefix else k
            if isinstance(sub, Value):
                default = "required" if sub.default is REQUIRED else repr(sub.default)
                rows.append((dotted, sub.kind, default, sub.doc))
            elif isinstance(sub, (Component, Losses)) or (isinstance(sub, Table) and sub.open):
                rows.append((dotted, "table", "", sub.doc))
            else:
                rows.extend(describe(sub, dotted))
    return rows


def format_where(recipe: Recipe, key: Key) -> str:
    return f"{recipe.origin(key)}: {format_key(key)}"

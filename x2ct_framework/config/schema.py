"""The recipe schema: every key the core understands, its type, default and meaning.

Component tables (``[data]``, ``[model]``, each loss) are open here: their names and options are
checked against the registries by ``config/build.py: component_problems``, in the same pass
(``config/recipe.py: check_all``). Validation fills defaults in place, so the resolved recipe written
to the run folder holds every value the run used. Names a registry holds (optimizers, schedules,
protocols) are checked against the plugin registries, never against ``training/`` or ``evaluation/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable

from x2ct_framework.errors import RecipeError, X2CTError, did_you_mean
from x2ct_framework.config.document import Key, Recipe
from x2ct_framework.registry import name_list

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
    return None if v > 0 and math.isfinite(v) else "expected a positive number"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 and math.isfinite(v) else "expected a number >= 0"


def run_name(v: Any) -> str | None:
    """The run folder is output_dir/name: a non-empty relative path that stays below output_dir."""
    if not v.strip():
        return "expected a non-empty name (the run folder is output_dir/name)"
    if "\0" in v or any(ord(c) < 0x20 for c in v):
        return "expected a name without control characters"
    if PurePosixPath(v).is_absolute() or PureWindowsPath(v).is_absolute() or PureWindowsPath(v).drive \
            or v.startswith("~"):
        return "expected a relative name (the run folder is output_dir/name), not an absolute path"
    parts = [p for p in v.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        return "expected a name below output_dir, without '..'"
    if not parts:
        return "expected a name that names a folder below output_dir"
    return None


RESERVED_STAGE_NAMES = ("eval", "report")  # folders of the run folder that are not stages


def stage_name(v: Any) -> str | None:
    """A stage's checkpoints live in output_dir/name/<stage>: one plain folder name (empty: stageN)."""
    from x2ct_framework.safepaths import name_problem

    if v == "":
        return None
    problem = name_problem(v, single=True)
    if problem:
        return f"{problem} (the stage's folder in the run folder)"
    if v.startswith("."):
        return "expected a folder name that does not start with '.'"
    if v in RESERVED_STAGE_NAMES or v.endswith((".tmp", ".old")):
        return f"expected a name other than {', '.join(RESERVED_STAGE_NAMES)} or *.tmp/*.old (used by the run folder)"
    return None


def at_least_one(v: Any) -> str | None:
    return None if v >= 1 else "expected an integer >= 1"


def optimizer_name(v: Any) -> str | None:
    """An optimizer of the registry (torch.optim's by lower-case name, and plugins' ``register_optimizers``)."""
    from x2ct_framework.config.optim import optimizer_names

    names = optimizer_names()
    if v in names or v.lower() in names:
        return None
    from x2ct_framework.plugins import failed_note

    return f"unknown optimizer{did_you_mean(v.lower(), names)} (known: {', '.join(names)}){failed_note()}"


def scheduler_spec(v: Any) -> str | None:
    """A schedule of the registry by name, or a table ``{ name = "...", <its options> }`` checked against it."""
    from x2ct_framework.config.optim import build_schedule, schedule_names

    if not (isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("name"), str))):
        return 'expected a schedule name or a table { name = "step", every = 1000, gamma = 0.5 }'
    name = v if isinstance(v, str) else v["name"]
    names = schedule_names()
    if name not in names:
        from x2ct_framework.plugins import failed_note

        return f"unknown schedule {name!r}{did_you_mean(name, names)} (known: {', '.join(names)}){failed_note()}"
    try:
        build_schedule(v, 100, 1.0, 0.0, 0)
    except X2CTError as exc:
        return str(exc).replace("scheduler: ", "", 1)
    return None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: Any) -> str | None:
    """The ``torch.compile`` mode of a ``train.compile`` value; None means eager."""
    if value is False or value in ("", "no", "off", "false"):
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"train.compile: expected false, true or one of {', '.join(map(repr, COMPILE_MODES))}, "
                     f"got {value!r}")


def compile_setting(v: Any) -> str | None:
    """Schema check of ``train.compile``: a problem or None."""
    try:
        compile_mode(v)
    except ValueError as exc:
        return str(exc).split(": ", 1)[1].split(", got")[0]
    return None


def protocol_names(v: Any) -> str | None:
    """Names of metric protocols: the protocol registry's (the built-ins register there as a core plugin)."""
    from x2ct_framework.plugins import failed_note, registry

    if not v:  # the final evaluation and the report score under these: at least one
        return "expected at least one protocol (default, x2ctgan, or a plugin's); set eval.report = false to skip " \
               "the final evaluation instead"
    try:
        known = registry("protocol").names()
    except X2CTError:  # a registry that cannot be built is reported by the command that needs it
        known = []
    builtin = ("default", "x2ctgan", "sparc", "c2rv")  # the built-ins first, in this order, then plugins' by name
    known = sorted(known, key=lambda n: (builtin.index(n) if n in builtin else len(builtin), n))
    bad = [n for n in v if n not in known]
    if not bad:
        return None
    hint = did_you_mean(bad[0], known)
    return f"unknown protocol(s) {', '.join(map(repr, bad))}{hint}; expected some of {', '.join(known)}{failed_note()}"


def evaluator_names(v: Any) -> str | None:
    """Names of evaluators: the evaluator registry's (the built-ins register there as a core plugin)."""
    from x2ct_framework.plugins import failed_note, registry

    try:
        known = registry("evaluator").names()
    except X2CTError:
        known = []
    bad = [n for n in v if n not in known]
    if not bad:
        return None
    hint = did_you_mean(bad[0], known)
    return (f"unknown evaluator(s) {', '.join(map(repr, bad))}{hint}; available: {', '.join(known) or 'none'}"
            f"{failed_note()}")


STAGE = Table(
    {
        "name": Value("str", "", "stage name, the stage's folder in the run folder; defaults to stageN",
                      check=stage_name),
        "resolution": Value("int", REQUIRED, "output volume size R (R^3 voxels)", check=positive),
        "epochs": Value("int", REQUIRED, "epochs of this stage", check=non_negative),
        "lr": Value("number", 1e-4, "peak learning rate (at train.reference_batch when lr_scaling is set)",
                    check=positive),
        "min_lr": Value("number", 1e-6, "final learning rate of the cosine schedule", check=non_negative),
        "warmup_steps": Value("int", 0, "linear warm-up in optimizer steps", check=non_negative),
        "optimizer": Value("str", "adamw", "optimizer by registry name: torch.optim's (adamw, adam, sgd, radam, "
                           "...) or a plugin's (register_optimizers)", check=optimizer_name),
        "optimizer_options": Table({}, "extra optimizer arguments, e.g. betas = [0.9, 0.95]", open=True),
        "weight_decay": Value("number", 0.01, "weight decay", check=non_negative),
        "scheduler": Value("any", "cosine", "learning-rate schedule per optimizer step, after the warm-up, by "
                           "registry name (cosine lr -> min_lr, constant, linear lr -> min_lr, linear_decay, step, "
                           "or a plugin's) or a table { name = \"step\", every = 1000, gamma = 0.5 } with its options",
                           check=scheduler_spec),
        "constant_epochs": Value("int", 0, "epochs at the full lr before linear_decay starts (X2CT-GAN: 50 of 100)",
                                 check=non_negative),
        "batch_size": Value("int", 0, "per-device batch size; 0 takes train.batch_size", check=non_negative),
        "grad_accum": Value("int", 0, "gradient accumulation steps; 0 takes train.grad_accum", check=non_negative),
        "checkpoint_every": Value("int", 0, "periodic checkpoint every N epochs; 0 = off", check=non_negative),
        "val_every": Value("int", 1, "validate every N epochs (and after the last)", check=at_least_one),
        "select_best": Value("str", "val/psnr", "validation metric that picks the best checkpoint", ),
        "best_mode": Value("str", "auto", "max or min of select_best; auto = the metric's higher_is_better "
                           "(min for val/loss, mae, landmark_mm, lpips)", choices=("auto", "max", "min")),
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
        "name": Value("str", REQUIRED, "experiment name; the run folder is output_dir/name (a relative path "
                      "below output_dir, no '..')", check=run_name),
        "description": Value("str", "", "free text"),
        "seed": Value("int", 0, "global random seed"),
        "output_dir": Value("str", "runs", "parent folder of run folders (relative to the working directory)"),
        "plugins": Value("list[str]", [], "extra plugin modules or .py files (relative to the recipe)"),
        "plugin_options": Table({}, "options of hook plugins, one table per plugin ([plugin_options.<name>]), "
                                "checked against the options the plugin declares (x2ct_options)", open=True),
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
                "compile": Value("any", False, "torch.compile the model: false, true (default mode), or a mode "
                                 "(\"reduce-overhead\", \"max-autotune\", ...); falls back to eager with a message "
                                 "when compiling fails", check=compile_setting),
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
                "tracker_options": Table({}, "per tracker of train.trackers, the keyword arguments its "
                                         "initialisation takes (Accelerate's init_kwargs), e.g. "
                                         "[train.tracker_options.wandb] entity, tags, name", open=True),
                "progress": Value("bool", True, "show a progress bar on the main process"),
            }
        ),
        "eval": Table(
            {
                "metrics": Value("list[str]", ["psnr", "ssim"], "validation metrics (registry names)"),
                "preview": Value("bool", True, "write slice previews at each validation"),
                "protocols": Value("list[str]", ["default", "x2ctgan"],
                                   "metric protocols of the final evaluation and report (registry names: "
                                   "default, x2ctgan, or a plugin's register_protocols)",
                                   check=protocol_names),
                "evaluators": Value("list[str]", [], "evaluators of the final evaluation and x2ct evaluate, which "
                                    "score the whole split (pe_detectability, organ_consistency, distribution, or a "
                                    "plugin's register_evaluators); [] = none", check=evaluator_names),
                "evaluator_options": Table({}, "per evaluator of eval.evaluators, the options its factory takes, "
                                           "e.g. [eval.evaluator_options.pe_detectability] epochs = 40", open=True),
                "split": Value("str", "test", "split scored at the end of a run", choices=("train", "val", "test")),
                "report": Value("bool", True, "evaluate the last stage's best checkpoint and write report.md "
                                              "at the end of a run"),
                "max_cases": Value("int", 0, "cases scored for the report; 0 = the whole split", check=non_negative),
                "bootstrap": Value("int", 1000, "bootstrap resamples of the 95% interval", check=non_negative),
                "worst_cases": Value("int", 3, "slice pictures of the N worst cases", check=non_negative),
                "gallery": Value("int", 2, "cases in the report's slice gallery", check=non_negative),
                "lpips": Value("str", "auto", "LPIPS in the default protocol: auto = when its weights are present",
                               choices=("auto", "on", "off")),
                "protocol_options": Table({}, "per protocol of eval.protocols, the options its factory takes, e.g. "
                                          "[eval.protocol_options.lab] body_hu = -400", open=True),
                "metric_options": Table({}, "per metric of eval.metrics, the options its factory takes, e.g. "
                                        "[eval.metric_options.psnr] slices = true", open=True),
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
    "list[float]": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v),
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
                                f"(known: {name_list(list(spec.fields))})")
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
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0 \
                or not math.isfinite(weight):
            problems.append(f"{recipe.where(*key, name, 'weight')}: expected a number >= 0, got {weight!r}")
        schedule = term.setdefault("schedule", "constant")
        if schedule not in ("constant", "linear"):
            problems.append(f"{recipe.where(*key, name, 'schedule')}: expected \"constant\" or \"linear\" "
                            f"(linear warm-up from start_epoch to end_epoch), got {schedule!r}")
        out[name] = term
    return out


def _non_finite(data: Any, key: Key = ()) -> list[Key]:
    """Keys holding nan or inf anywhere in the recipe (component options included)."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [key]
    if isinstance(data, dict):
        return [k for name, v in data.items() for k in _non_finite(v, key + (name,))]
    if isinstance(data, list):
        return [k for i, v in enumerate(data) for k in _non_finite(v, key + (i,))]
    return []


def _check_plugin_options(data: dict, recipe: Recipe, problems: list[str]) -> None:
    """``[plugin_options.<name>]``: each table checked against the plugin's ``x2ct_options`` parameters (same
    messages as component options) and completed with its defaults."""
    import inspect

    from x2ct_framework.plugins import OPTIONS_DECLARATION, get_plugin_manager
    from x2ct_framework.registry import Entry, check_options

    pm = get_plugin_manager()
    for name, table in data["plugin_options"].items():
        where = recipe.where("plugin_options", name)
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table of the plugin's options, got {table!r}")
            continue
        found = pm.find_plugin(name)
        if found is None:
            loaded = [n for n, _ in pm.pm.list_name_plugin()]
            problems.append(f"{where}: no loaded plugin is called {name!r}{did_you_mean(name, loaded)} (loaded: "
                            f"{name_list(loaded)}); name it in plugins or install it")
            continue
        known, plugin = found
        declare = getattr(plugin, OPTIONS_DECLARATION, None)
        if not callable(declare):
            problems.append(f"{where}: plugin {known!r} declares no options (it has no {OPTIONS_DECLARATION}() "
                            f"function), so this table would be ignored")
            continue
        entry = Entry(name, declare, known, pm.distributions.get(known, "?"))
        try:
            check_options(entry, table, where, "plugin")
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        for p in inspect.signature(declare).parameters.values():
            if p.name not in table and p.default is not p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                table[p.name] = list(p.default) if isinstance(p.default, tuple) else _default(p.default)
        try:
            declare(**table)  # the plugin's own checks of the values
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: plugin {known!r} rejected its options: {exc}")


def schema_problems(recipe: Recipe) -> tuple[Any, list[str]]:
    """The recipe's data checked against the schema, defaults filled (as far as the data allows), and every
    problem found: the types, the values, the keys that depend on each other, ``[plugin_options]``.

    The recipe's plugins must be loaded first (``config/recipe.py: check_all``), so that names checked
    against a registry (protocols, optimizers, schedules) include the ones they register."""
    problems: list[str] = []
    # Every number of a recipe is meant to be finite: nan passes ">= 0" and inf passes "positive".
    bad = _non_finite(recipe.data)
    for key in bad:
        problems.append(f"{recipe.where(*key)}: expected a finite number, got {_get(recipe.data, key)!r}")
    found: list[str] = []
    data = _check(SCHEMA, recipe.data, (), recipe, found)
    # a non-finite value's own message is enough: no second one from its check
    problems += [p for p in found if not any(p.startswith(recipe.where(*key) + ":") for key in bad)]
    try:
        _cross_key_problems(data, recipe, problems)
    except (KeyError, TypeError, AttributeError, IndexError):  # malformed tables: the schema said why
        pass
    return data, problems


def _cross_key_problems(data: dict, recipe: Recipe, problems: list[str]) -> None:
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
    _check_plugin_options(data, recipe, problems)
    trackers = [t for t in data["train"]["trackers"] if t != "none"]
    for name, table in data["train"]["tracker_options"].items():
        where = recipe.where("train", "tracker_options", name)
        if name not in trackers:
            problems.append(f"{where}: {name!r} is not one of train.trackers ({', '.join(trackers) or 'none'})"
                            f"{did_you_mean(name, trackers)}; add it there or remove these options")
        elif not isinstance(table, dict):
            problems.append(f"{where}: expected a table of the tracker's keyword arguments, got {table!r}")
    for key, names in (("protocol_options", data["eval"]["protocols"]), ("metric_options", data["eval"]["metrics"]),
                       ("evaluator_options", data["eval"]["evaluators"])):
        for name, table in data["eval"][key].items():
            where = recipe.where("eval", key, name)
            listed = f"eval.{key.split('_')[0]}s"
            if name not in names:
                problems.append(f"{where}: {name!r} is not one of {listed} ({', '.join(names) or 'none'})"
                                f"{did_you_mean(name, names)}; add it there or remove these options")
            elif not isinstance(table, dict):
                problems.append(f"{where}: expected a table of the factory's options, got {table!r}")
    # [data] hu_window is also handed to models, losses and metrics: check it here so that the error names it.
    hu_window = data["data"].get("hu_window")
    if hu_window is not None and not (isinstance(hu_window, list) and len(hu_window) == 2
                                      and _KIND_CHECK["list[float]"](hu_window) and hu_window[0] < hu_window[1]):
        problems.append(f"{recipe.where('data', 'hu_window')}: expected [low, high] in HU with low < high, "
                        f"got {hu_window!r}")


def validate_recipe(recipe: Recipe) -> Recipe:
    """The schema alone: check the recipe, fill defaults in place, report all problems. ``load_recipe``
    runs it together with the other checks (``config/recipe.py: check_all``)."""
    data, problems = schema_problems(recipe)
    if problems:
        raise RecipeError(problems)
    recipe.data = data
    return recipe


def _get(data: Any, key: Key) -> Any:
    for k in key:
        data = data[k]
    return data


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

"""Recipe checks that need more than the schema, run before anything trains.

:func:`~x2ct_framework.config.recipe.load_recipe` runs them with the schema and the component checks in
one pass (every stage's ``select_best``, every tracker), so a misspelt ``select_best`` in stage 3, a
tracker whose package is missing or a plugin tracker's misspelt option is reported with every other
problem before anything trains. :func:`check_freeze` checks a stage's ``freeze`` prefixes against its
built model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch.nn as nn

from x2ct_framework.config.document import Recipe
from x2ct_framework.errors import RecipeError, did_you_mean
from x2ct_framework.plugins import TRACKER_PACKAGES, failed_note, get_plugin_manager
from x2ct_framework.registry import check_options, name_list



def known_trackers() -> dict[str, str]:
    try:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    except ImportError:  # an older accelerate: the names it has always had
        return dict(TRACKER_PACKAGES)
    return {name: TRACKER_PACKAGES.get(name, name) for name in LOGGER_TYPE_TO_CLASS}


def _installed(name: str, package: str) -> bool:
    import accelerate.utils

    probe = getattr(accelerate.utils, f"is_{name}_available", None)
    if callable(probe):
        return bool(probe())
    return importlib.util.find_spec(package) is not None


# What a plugin tracker's factory may declare besides its [train.tracker_options.<name>] table.
TRACKER_CONTEXT = ("logging_dir", "run_name")


def plugin_trackers():
    """The registry of plugin trackers (``register_trackers``)."""
    return get_plugin_manager().registry("tracker")


def unknown_tracker(where: str, name: str, builtin: Iterable[str], plugins: Iterable[str]) -> str:
    builtin, plugins = sorted(builtin), sorted(plugins)
    return (f"{where}: unknown tracker {name!r}{did_you_mean(name, builtin + plugins)} (built-in: "
            f"{', '.join(builtin)}; from plugins: {name_list(plugins)}; or [] for none){failed_note()}")


def tracker_problems(recipe: Recipe) -> list[str]:
    """Every ``train.trackers`` name: accelerate's (its package installed) or a plugin's (options checked)."""
    known = known_trackers()
    registry = plugin_trackers()
    problems = []
    for i, name in enumerate(recipe["train"]["trackers"]):
        where = recipe.where("train", "trackers", i)
        if name == "none":
            continue
        if name in registry:
            entry = registry.get(name)
            if name in known:
                problems.append(f"{where}: tracker {name!r} is both accelerate's built-in tracker and one registered "
                                f"by {entry.source}; the plugin must rename it")
                continue
            options = recipe["train"]["tracker_options"].get(name, {})
            try:
                check_options(entry, options, recipe.where("train", "tracker_options", name), "tracker",
                              supplied=set(TRACKER_CONTEXT))
            except RecipeError as exc:
                problems.extend(exc.problems)
        elif name not in known:
            problems.append(unknown_tracker(where, name, known, registry.names()))
        elif not _installed(name, known[name]):
            problems.append(f"{where}: tracker {name!r} needs the package {known[name]!r}, which is not installed "
                            f"(pip install {known[name]}), or remove it from train.trackers")
    return problems


def select_best_problems(recipe: Recipe) -> list[str]:
    """Every stage's ``select_best`` must be a metric that validation measures."""
    known = [f"val/{m}" for m in recipe["eval"]["metrics"]] + ["val/loss"]
    problems = []
    for i, stage in enumerate(recipe["stages"]):
        metric = stage["select_best"]
        if metric not in known:
            problems.append(f"{recipe.where('stages', i, 'select_best')}: {metric!r} is not measured"
                            f"{did_you_mean(metric, known)}; validation gives {', '.join(known)} (eval.metrics)")
    return problems


def check_recipe(recipe: Recipe) -> None:
    """The checks that need no component built: every stage's select_best, the trackers."""
    problems = select_best_problems(recipe) + tracker_problems(recipe)
    if problems:
        raise RecipeError(problems)


def check_freeze(model: nn.Module, prefixes: list[str], where: str) -> None:
    """Each ``freeze`` prefix must match a parameter, and something must be left to train."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise RecipeError([f"{where}: {', '.join(map(repr, unknown))} matches no parameter of the model "
                           f"(top-level modules: {', '.join(tops)})"])
    if names and all(any(n.startswith(f) for f in prefixes) for n in names):
        raise RecipeError([f"{where}: every parameter is frozen; nothing would train"])

"""The names a plugin takes from the framework's core, in one place.

The plugin API is the modules ``x2ct_framework.__all__`` names plus this module. The classes and
functions below live in the core (``evaluation/``, ``config/``, ``training/``, ``plugins.py``), which
may be reorganised; importing them from here keeps a plugin working when they move:

- ``Metric``: the metric base class (``hu_window``, ``higher_is_better``, ``unit``);
- ``Protocol``, ``build_protocol``: a named set of metrics with the conventions its numbers follow;
- ``plugin_options``, ``declared_options``: a hook plugin's ``[plugin_options.<name>]`` table;
- ``load_recipe``, ``check_recipe``, ``Trainer``: load a recipe (every check in one pass) and train it,
  for a plugin package's own tests;
- ``create_component``: build a registered component by name, options checked as a recipe's are (for a
  plugin that wraps another component);
- ``Evaluator``, ``EvaluatorResult``, ``EvaluationContext``, ``EvaluatorSkipped``, ``summary_entry``: the
  evaluator contract (``register_evaluators``), with ``cluster_weights``, ``bootstrap_mean`` and ``roc_auc`` for
  patient-level intervals;
- ``report_errors``: run a command-line entry point and turn framework errors into a message and an
  exit status (as ``x2ct`` does).

They load on first use, so ``import x2ct_framework.api`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it (the framework's private layout; plugins import from here)
_HOMES = {
    "Metric": "x2ct_framework.evaluation.metrics",
    "Protocol": "x2ct_framework.evaluation.protocols",
    "build_protocol": "x2ct_framework.evaluation.protocols",
    "plugin_options": "x2ct_framework.plugins",
    "declared_options": "x2ct_framework.plugins",
    "load_recipe": "x2ct_framework.config.recipe",
    "check_recipe": "x2ct_framework.config.checks",
    "Trainer": "x2ct_framework.training.trainer",
    "report_errors": "x2ct_framework.run",
    "create_component": "x2ct_framework.plugins",
    "Evaluator": "x2ct_framework.evaluation.evaluators",
    "EvaluatorResult": "x2ct_framework.evaluation.evaluators",
    "EvaluationContext": "x2ct_framework.evaluation.evaluators",
    "EvaluatorSkipped": "x2ct_framework.evaluation.evaluators",
    "summary_entry": "x2ct_framework.evaluation.evaluators",
    "cluster_weights": "x2ct_framework.evaluation.evaluators",
    "bootstrap_mean": "x2ct_framework.evaluation.evaluators",
    "roc_auc": "x2ct_framework.evaluation.evaluators",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

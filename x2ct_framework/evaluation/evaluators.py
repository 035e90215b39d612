"""Evaluators: components that score a whole split, beside the per-case metric protocols.

A metric protocol scores each case alone. An evaluator sees every ``(prediction, target, batch)`` of the
split, in case order, and scores what needs the whole set: a classifier's AUC over the cases, a
segmenter's agreement per structure, a distance between the generated and the real distributions.

Contract (``register_evaluators(register)``, ``register(name, factory)``)::

    evaluator = factory(**options)          # options from [eval.evaluator_options.<name>]
    evaluator.start(context)                # an EvaluationContext: split, window, seed, datasets, cache ...
    evaluator.update(pred, target, batch)   # every batch of the split, in case order
    result = evaluator.result()             # an EvaluatorResult

``EvaluatorResult.per_case`` maps a column to one value per case (NaN: not scored); each column is written
to ``per_case.csv`` as ``<evaluator>/<column>``. ``summary`` maps a number's name to a
:func:`summary_entry` (value, 95% interval, n, unit, direction). ``skipped`` says why the evaluator could
not run (a missing library or weights): it is written into the report and the JSON, never dropped.

The statistics shared by the built-ins live here too: the ROC AUC (Mann-Whitney, ties counted half),
patient-level (cluster) bootstrap weights, the percentile interval, Youden's operating point.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from x2ct_framework.errors import DataError, PluginError, X2CTError


# ---- the contract ------------------------------------------------------------------------------
@dataclass
class EvaluationContext:
    """What an evaluator may know about the evaluation it is part of.

    ``dataset(split)`` builds another split of the same data at the same stage (the training split for a
    reference classifier); ``data_key`` identifies the data and recipe (a classifier cached under it is
    retrained when it changes); ``cache_dir`` is where an evaluator keeps what it trains.
    """

    split: str = "test"
    hu_window: tuple[float, float] = (-1000.0, 3000.0)
    resolution: int = 0
    seed: int = 0
    n_boot: int = 1000
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dataset: Callable[[str], Any] | None = None
    data_key: str = ""
    cache_dir: Path | None = None
    out_dir: Path | None = None
    batch_size: int = 4
    progress: bool = False

    def other_split(self, split: str):
        if self.dataset is None:
            raise DataError(f"this evaluation has no access to the {split!r} split (no dataset builder in its "
                            f"context); evaluate through x2ct evaluate or pass EvaluationContext(dataset=...)")
        return self.dataset(split)


def summary_entry(value: float, ci: Sequence[float] | None = None, n: int = 0, unit: str = "",
                  higher_is_better: bool | None = True, note: str = "") -> dict[str, Any]:
    """One summary number: ``value``, its 95% interval ``ci`` (NaN when none), ``n`` cases, ``unit``,
    direction (None: neither) and a ``note`` (for example the arm or the resampling)."""
    lo, hi = (math.nan, math.nan) if ci is None else (float(ci[0]), float(ci[1]))
    return {"value": float(value), "ci_low": lo, "ci_high": hi, "n": int(n), "unit": unit,
            "higher_is_better": higher_is_better, "note": note}


@dataclass
class EvaluatorResult:
    """What an evaluator gives back: per-case columns, summary numbers, the conventions it followed, notes,
    and ``skipped`` (why it did not run; then the rest is empty)."""

    per_case: dict[str, Sequence[float]] = field(default_factory=dict)
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    conventions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None


class Evaluator:
    """Base class of an evaluator (a plugin may also write the three methods without it)."""

    name = ""

    def start(self, context: EvaluationContext) -> None:
        self.context = context

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def result(self) -> EvaluatorResult:
        raise NotImplementedError


class EvaluatorSkipped(X2CTError):
    """Raised by a factory or ``start`` when the evaluator cannot run here (a library or weights are absent);
    the evaluation goes on and records the message as the reason."""

    exit_code = 3


@dataclass
class EvaluatorRun:
    """One evaluator of an evaluation: its name, the plugin that gave it, the object and, at the end, its result."""

    name: str
    source: str
    evaluator: Any = None
    result: EvaluatorResult | None = None
    skipped: str | None = None


def _registry():
    from x2ct_framework.plugins import get_plugin_manager

    return get_plugin_manager().registry("evaluator")


def evaluator_names() -> list[str]:
    """Every evaluator a recipe or ``--evaluators`` may name."""
    try:
        return _registry().names()
    except X2CTError:
        return []


def build_evaluators(names: Sequence[str], options: dict[str, dict] | None = None, *,
                     where: Callable[[str], str] | str = "--evaluators") -> list[EvaluatorRun]:
    """Build each named evaluator with its options (``{name: table}``); an unknown name is a RecipeError that
    names ``where`` and lists the available evaluators. A factory raising :class:`EvaluatorSkipped` gives a
    skipped run carrying its reason."""
    reg = _registry()
    runs = []
    for name in dict.fromkeys(names):
        at = where(name) if callable(where) else where
        entry = reg.get(name, at)
        try:
            made = reg.create(name, (options or {}).get(name, {}), where=at)
        except EvaluatorSkipped as exc:
            runs.append(EvaluatorRun(name, entry.source, skipped=str(exc)))
            continue
        for method in ("start", "update", "result"):
            if not callable(getattr(made, method, None)):
                raise PluginError(f"evaluator {name!r} ({entry.source}) built a {type(made).__name__} without a "
                                  f"{method}() method; an evaluator has start(context), update(pred, target, batch) "
                                  f"and result()")
        try:
            made.name = name
        except AttributeError:
            pass
        runs.append(EvaluatorRun(name, entry.source, made))
    return runs


def start_evaluators(runs: list[EvaluatorRun], context: EvaluationContext) -> None:
    for run in runs:
        if run.evaluator is None:
            continue
        try:
            run.evaluator.start(context)
        except EvaluatorSkipped as exc:
            run.evaluator, run.skipped = None, str(exc)


def update_evaluators(runs: list[EvaluatorRun], pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
    for run in runs:
        if run.evaluator is not None:
            with torch.no_grad():
                run.evaluator.update(pred, target, batch)


def finish_evaluators(runs: list[EvaluatorRun], n_cases: int) -> dict[str, np.ndarray]:
    """Each evaluator's result, checked; returns the per-case columns ``{"<evaluator>/<column>": [n]}``."""
    columns: dict[str, np.ndarray] = {}
    for run in runs:
        if run.evaluator is None:
            run.result = EvaluatorResult(skipped=run.skipped or "not run")
            continue
        result = run.evaluator.result()
        check_result(run.name, run.source, result, n_cases)
        run.result = result
        for col, values in result.per_case.items():
            columns[f"{run.name}/{col}"] = np.asarray(values, dtype=np.float64)
    return columns


def check_result(name: str, source: str, result: Any, n_cases: int) -> None:
    """An evaluator's result keeps the contract: an EvaluatorResult, per-case columns of ``n_cases`` numbers,
    summary entries with a value and an interval. Raises PluginError naming the evaluator otherwise."""
    what = f"evaluator {name!r} ({source})"
    if not isinstance(result, EvaluatorResult):
        raise PluginError(f"{what}: result() returned {type(result).__name__}, expected an EvaluatorResult "
                          f"(x2ct_framework.api.EvaluatorResult)")
    for col, values in result.per_case.items():
        if not isinstance(col, str) or not col or "/" in col:
            raise PluginError(f"{what}: per-case column {col!r} must be a non-empty name without '/'")
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"{what}: per-case column {col!r} is not numeric: {exc}") from exc
        if arr.shape != (n_cases,):
            raise PluginError(f"{what}: per-case column {col!r} has shape {arr.shape}, expected one value per case "
                              f"({n_cases},), in the order the cases were given (NaN for a case not scored)")
    for key, entry in result.summary.items():
        if not isinstance(entry, dict) or not {"value", "ci_low", "ci_high", "n"} <= set(entry):
            raise PluginError(f"{what}: summary {key!r} must be a dict with value, ci_low, ci_high and n "
                              f"(x2ct_framework.api.summary_entry builds one)")


def data_key(*parts: Any) -> str:
    """A short content key of JSON-able ``parts`` (the data options, the stage, an evaluator's options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- statistics --------------------------------------------------------------------------------
def roc_auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """The area under the ROC curve: the probability that a positive case scores above a negative one, ties
    counted half (the Mann-Whitney U over n_pos * n_neg). NaN when a class is absent."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y > 0.5], s[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    return float(_pair_matrix(pos, neg).mean())


def _pair_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """1 where a positive scores above a negative, 0.5 on ties, 0 below: ``[n_pos, n_neg]``."""
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def cluster_weights(groups: Sequence[Any], n_boot: int, seed: int = 0) -> np.ndarray:
    """Bootstrap weights ``[n_boot, n_cases]``: each resample draws the groups (patients) with replacement and
    counts every case of a drawn group once per draw, so the cases of one patient stay together."""
    groups = list(groups)
    uniq = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = np.array([uniq[g] for g in groups])
    k = len(uniq)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, k, size=(n_boot, k))
    counts = np.zeros((n_boot, k))
    np.add.at(counts, (np.repeat(np.arange(n_boot), k), drawn.ravel()), 1.0)
    return counts[:, gid]


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The AUC under each row of case ``weights`` ``[B, n]`` (a bootstrap resample); NaN where a class is absent."""
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    pair = _pair_matrix(s[y], s[~y])
    wp, wn = weights[:, y], weights[:, ~y]
    num = np.einsum("bi,ij,bj->b", wp, pair, wn)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return float(lo), float(hi)


def youden_threshold(labels: Sequence[float], scores: Sequence[float]) -> float:
    """The score threshold (``score >= t`` is positive) that maximises sensitivity + specificity - 1; the lowest
    such threshold on ties. NaN when a class is absent."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or (~y).all():
        return math.nan
    best, best_t = -np.inf, math.nan
    for t in np.unique(s):
        sens = float((s[y] >= t).mean())
        spec = float((s[~y] < t).mean())
        if sens + spec - 1 > best + 1e-12:
            best, best_t = sens + spec - 1, float(t)
    return best_t


def bootstrap_mean(values: Sequence[float], weights: np.ndarray) -> tuple[float, tuple[float, float], int]:
    """Mean of the finite ``values``, its percentile interval under the resample ``weights`` and the count."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    n = int(ok.sum())
    if n == 0:
        return math.nan, (math.nan, math.nan), 0
    w = weights[:, ok]
    den = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(den > 0, (w * v[ok]).sum(1) / np.where(den > 0, den, 1.0), np.nan)
    return float(v[ok].mean()), percentile_interval(means), n


def batch_column(batch: dict, key: str, n: int) -> list[Any] | None:
    """``batch["study"][key]`` (or ``batch[key]``) as a list of ``n`` values, or None when absent."""
    study = batch.get("study")
    value = study.get(key) if isinstance(study, dict) else None
    if value is None:
        value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist() if value.numel() == n else None
    if isinstance(value, (int, float, bool, np.number, str)):
        return [value] if n == 1 else None
    return list(value) if len(value) == n else None


def case_ids_of(batch: dict, start: int, n: int) -> list[str]:
    ids = batch.get("case_id")
    return [str(c) for c in ids] if ids is not None else [f"case{start + i:04d}" for i in range(n)]


__all__ = ["Evaluator", "EvaluatorResult", "EvaluationContext", "EvaluatorSkipped", "EvaluatorRun", "summary_entry",
           "build_evaluators", "evaluator_names", "start_evaluators", "update_evaluators", "finish_evaluators",
           "check_result", "data_key", "roc_auc", "weighted_auc", "cluster_weights", "percentile_interval",
           "youden_threshold", "bootstrap_mean", "batch_column", "case_ids_of"]

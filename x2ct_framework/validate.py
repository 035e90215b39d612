"""``x2ct validate``: the contract checks of :mod:`x2ct_framework.testing`, run on a recipe's real components.

Per stage, without training: one item of every split through the dataset checks (keys, shapes at
the stage resolution, [0, 1] ranges, the recipe's views); one batch of the train split through the
model (the target's shape, finite, depends on the X-rays; each view, the geometry and ``prev`` change
the output; a case's output does not depend on the other cases); every loss term on that prediction
(scalar, finite, differentiable w.r.t. the prediction; what it needs from the batch); every
validation metric (one finite value per case). For the last stage, every protocol of
``eval.protocols`` on a validation batch; once, every plugin tracker built. Each problem names the
stage, the component and the plugin that registered it; all are reported at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from x2ct_framework.errors import PluginError
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.testing.checks import _check_item, perturbation_checks, protocol_checks
from x2ct_framework.testing.contract import _Contract

SPLITS = ("train", "val", "test")


def _source(kind: str, name: str) -> str:
    reg = get_plugin_manager().registry(kind)
    return reg.get(name).source if name in reg else "unknown plugin"


def _error(exc: BaseException) -> str:
    return f"raised {type(exc).__name__}: {exc}"


def check_stage(recipe, stage, datasets: dict[str, Any], model: torch.nn.Module, losses, metrics: dict[str, Any],
                batch_size: int = 2) -> list[str]:
    """Every broken contract of one stage's components, each a sentence naming the component and its plugin."""
    problems: list[str] = []
    first: dict[str, Any] = {}  # item 0 of each split, reused in the batch (a dataset may read it from disk)
    from x2ct_framework.config.build import data_options, model_options

    data = data_options(recipe, stage)
    data_name = data["name"]
    data_src = f"dataset {data_name!r} ({_source('dataset', data_name)})"
    views = data.get("views")
    for split, ds in datasets.items():
        if ds is None:
            continue
        if len(ds) == 0:
            if split != "test":
                problems.append(f"{stage.name}: {data_src}: the {split} split has no cases")
            continue
        c = _Contract(data_src)
        try:
            item = first[split] = ds[0]
        except Exception as exc:
            problems.append(f"{stage.name}: {data_src}: {split}[0] {_error(exc)}")
            continue
        _check_item(item, 0, c, stage.resolution, views, require_ct=split != "test" or "ct" in item)
        problems += [f"{stage.name}: {data_src}, {split} split, {f}" for f in c.failed]
    train = datasets.get("train")
    if problems or train is None or len(train) == 0:
        return problems
    n = min(batch_size, len(train))
    try:
        batch = default_collate([first["train"], *(train[i] for i in range(1, n))])
    except Exception as exc:
        return problems + [f"{stage.name}: {data_src}: {n} train items do not collate into a batch ({_error(exc)}); "
                           f"every item must have the same shapes (resize to the stage resolution)"]
    model_name = model_options(recipe, stage)["name"]
    model_src = f"model {model_name!r} ({_source('model', model_name)})"
    target = batch["ct"].float()
    xrays = batch["xrays"].float().clone().requires_grad_(True)
    model.train()
    try:
        pred = model(xrays, batch["geometry"])
    except Exception as exc:
        return problems + [f"{stage.name}: {model_src} {_error(exc)} on a batch of the train split"]
    if not isinstance(pred, torch.Tensor) or tuple(pred.shape) != tuple(target.shape):
        shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        return problems + [f"{stage.name}: {model_src} returned {shape}, expected the target's shape "
                           f"{tuple(target.shape)} ([B, 1, R, R, R] at the stage resolution {stage.resolution})"]
    if not torch.isfinite(pred).all():
        problems.append(f"{stage.name}: {model_src} returned NaN or infinite values")
    (pred.float() - target).abs().mean().backward(retain_graph=True)
    if xrays.grad is None or not bool(xrays.grad.abs().sum() > 0):
        problems.append(f"{stage.name}: {model_src}: the output does not depend (differentiably) on the X-rays "
                        f"(a detach() or no_grad between the images and the output?)")
    problems += _perturbations(stage, model, model_src, batch)
    for term in losses.terms:
        name = stage.options["losses"][term.name].get("name", term.name)
        where = f"{stage.name}: loss term {term.name!r} ({_source('loss', name)})"
        leaf = pred.detach().float().clone().requires_grad_(True)
        try:
            value = term.module(leaf, target, batch)
        except KeyError as exc:
            problems.append(f"{where} needs batch key {exc} that {data_src} does not give "
                            f"(it gives {', '.join(map(str, batch))})")
            continue
        except Exception as exc:
            problems.append(f"{where} {_error(exc)}")
            continue
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{where} returned {got}, expected a scalar tensor")
            continue
        if not torch.isfinite(value):
            problems.append(f"{where} returned {value.item()}, expected a finite value")
            continue
        if not value.requires_grad:
            problems.append(f"{where}: the value does not depend differentiably on the prediction (detached?), "
                            f"so it would train nothing")
            continue
        value.backward()
        if leaf.grad is None or not torch.isfinite(leaf.grad).all():
            problems.append(f"{where}: the gradient w.r.t. the prediction is missing or not finite")
    with torch.no_grad():
        clipped = pred.detach().float().clamp(0, 1)
        for name, metric in metrics.items():
            where = f"metric {name!r} ({_source('metric', name)})"
            try:
                out = metric(clipped, target, batch)
            except Exception as exc:
                problems.append(f"{where} {_error(exc)}")
                continue
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n,):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                problems.append(f"{where} returned {got}, expected one value per case [{n}]")
            elif not torch.isfinite(out.float()).all():
                problems.append(f"{where} returned NaN or infinite values")
    model.zero_grad(set_to_none=True)
    return problems


def _perturbations(stage, model: torch.nn.Module, model_src: str, batch: dict) -> list[str]:
    """The kit's perturbation checks on the real model and batch: each view, the geometry, ``prev`` (a cascading
    stage, or a model declaring ``uses_prev``) change the output; a case's output ignores the other cases."""
    c = _Contract(model_src)
    r = stage.resolution
    low = max(1, r // 2)
    was_training = model.training
    model.eval()
    try:
        perturbation_checks(c, model, batch["xrays"].float(), batch["geometry"], prev_shape=(1, low, low, low),
                            check_prev=bool(stage.options.get("cascade")) or getattr(model, "uses_prev", False))
    finally:
        model.train(was_training)
    return [f"{stage.name}: {model_src}: {f}" for f in c.failed]


def check_protocols(recipe, stage, model: torch.nn.Module, dataset, batch_size: int = 2) -> list[str]:
    """Every protocol of ``eval.protocols``, built as the final evaluation builds it (window, options, context),
    scoring the model's prediction of a batch of ``dataset``: ``check_protocol``'s checks, each problem named."""
    from x2ct_framework.evaluation.protocols import build_protocol
    from x2ct_framework.runs import hu_window_of

    if dataset is None or len(dataset) == 0:
        return []
    n = min(batch_size, len(dataset))
    batch = default_collate([dataset[i] for i in range(n)])
    if "ct" not in batch:
        return []
    model.eval()
    with torch.no_grad():
        pred = model(batch["xrays"].float(), batch["geometry"]).float().clamp(0, 1)
    target = batch["ct"].float()
    offered = {"lpips": {"auto": "auto", "on": True, "off": False}[recipe["eval"]["lpips"]],
               "resolution": stage.resolution, "seed": recipe["seed"]}
    problems = []
    for name in recipe["eval"]["protocols"]:
        where = f"protocol {name!r} ({_source('protocol', name)})"
        c = _Contract(where)
        proto = None
        with c.check("builds"):
            proto = build_protocol(name, hu_window_of(recipe, stage),
                                   where=recipe.where("eval", "protocol_options", name), context=offered,
                                   **recipe["eval"]["protocol_options"].get(name, {}))
        if proto is not None:
            protocol_checks(c, proto, pred, target, batch)
        problems += [f"{where}: {f}" for f in c.failed]
    model.train()
    return problems


def check_evaluators(recipe, stage) -> tuple[list[str], list[str]]:
    """Every evaluator of ``eval.evaluators`` built from its options, and its ``check(context)`` when it has one
    (``pe_detectability`` reads a training item's study label): ``(problems, notes)``; a skipped evaluator is a
    note with its reason, not a problem."""
    from x2ct_framework.config.build import build_dataset
    from x2ct_framework.errors import X2CTError
    from x2ct_framework.evaluation.evaluators import EvaluationContext, build_evaluators
    from x2ct_framework.runs import hu_window_of

    names = recipe["eval"]["evaluators"]
    if not names:
        return [], []
    options = recipe["eval"]["evaluator_options"]
    try:
        runs = build_evaluators(names, options, where=lambda n: recipe.where("eval", "evaluator_options", n)
                                if n in options else recipe.where("eval", "evaluators"))
    except X2CTError as exc:
        return [str(exc)], []
    problems, notes = [], []
    ctx = EvaluationContext(split=recipe["eval"]["split"], hu_window=tuple(hu_window_of(recipe, stage)),
                            resolution=stage.resolution, seed=recipe["seed"],
                            dataset=lambda split: build_dataset(recipe, stage, split))
    for run in runs:
        if run.evaluator is None:
            notes.append(f"evaluator {run.name!r} will be skipped: {run.skipped}")
            continue
        check = getattr(run.evaluator, "check", None)
        if callable(check):
            try:
                check(ctx)
            except X2CTError as exc:
                problems.append(f"evaluator {run.name!r} ({run.source}): {exc}")
    return problems, notes


def check_trackers(recipe) -> list[str]:
    """Every plugin tracker of ``train.trackers`` built from its options in a scratch folder, then finished."""
    import tempfile

    from x2ct_framework.config.build import build_trackers
    from x2ct_framework.errors import X2CTError

    with tempfile.TemporaryDirectory(prefix="x2ct-validate-") as tmp:
        try:
            built = build_trackers(recipe, tmp)
        except X2CTError as exc:
            return [str(exc)]
        problems = []
        for tracker, entry in built:
            try:
                tracker.finish()
            except Exception as exc:
                problems.append(f"tracker {tracker.name!r} ({entry.source}): finish() {_error(exc)}")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PluginError(f"x2ct validate found {len(problems)} problem(s) that would break or silently spoil "
                          f"training:\n{lines}")

"""``x2ct validate``: the contract checks of :mod:`x2ct_framework.testing`, run on a recipe's real components.

Per stage, without training: one item of every split through the dataset checks (keys, shapes at
the stage resolution, [0, 1] ranges, the recipe's views); one batch of the train split through the
model (the target's shape, finite, depends on the X-rays); every loss term on that prediction
(scalar, finite, differentiable w.r.t. the prediction; what it needs from the batch); every
validation metric (one finite value per case). Each problem names the stage, the component and
the plugin that registered it; all are reported at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from x2ct_framework.errors import PluginError
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.testing import _check_item, _Contract

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


def raise_problems(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PluginError(f"x2ct validate found {len(problems)} problem(s) that would break or silently spoil "
                          f"training:\n{lines}")

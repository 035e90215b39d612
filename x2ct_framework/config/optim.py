"""Optimizers by name and the learning-rate schedule, stepped once per optimizer update."""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

import torch

from x2ct_framework.errors import RecipeError, did_you_mean

# Every torch.optim optimizer that steps without a closure, by lower-case name (adamw, adam, sgd, radam, ...).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name.lower(): cls for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    and name not in ("LBFGS", "SparseAdam")
}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   options: dict[str, Any], where: str = "optimizer") -> torch.optim.Optimizer:
    """``torch.optim.<name>(params, lr=..., weight_decay=..., **options)``; bad options name the recipe key."""
    cls = OPTIMIZERS.get(name.lower())
    if cls is None:
        raise RecipeError([f"{where}: unknown optimizer {name!r}{did_you_mean(name.lower(), OPTIMIZERS)}"])
    accepted = inspect.signature(cls).parameters
    kwargs = {"lr": lr, **({"weight_decay": weight_decay} if "weight_decay" in accepted else {})}
    for k, v in options.items():
        if k not in accepted or k in ("params", "lr"):
            raise RecipeError([f"{where}_options -> {k}: not an option of torch.optim.{cls.__name__}"
                               f"{did_you_mean(k, accepted)}"])
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError([f"{where}_options: torch.optim.{cls.__name__} refused them: {exc}"]) from exc


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int = 0, kind: str = "cosine",
          constant_steps: int = 0) -> float:
    """Learning rate of optimizer update ``step`` (0-based) out of ``total``: linear warm-up, then the schedule.

    The warm-up rises to ``lr`` over ``warmup`` updates. ``cosine`` then falls from ``lr`` at update
    ``warmup`` to ``min_lr`` at update ``total - 1``, so the last update uses exactly ``min_lr``;
    ``constant`` stays at ``lr``; ``linear_decay`` (X2CT-GAN's, after CycleGAN: ``niter`` epochs
    constant, ``niter_decay`` epochs linear) stays at ``lr`` for ``constant_steps`` updates, then falls
    linearly to ``min_lr``, reached one update after the last (so the last update still learns).
    """
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    if kind == "linear_decay":
        start = max(constant_steps, warmup)
        if step < start:
            return lr
        span = max(1, total - start)
        return lr - (lr - min_lr) * min(1.0, (step - start + 1) / (span + 1))
    span = max(1, total - 1 - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


class Schedule:
    """``LambdaLR`` factor for :func:`lr_at` (the scheduler is stepped once per optimizer update)."""

    def __init__(self, total: int, lr: float, min_lr: float, warmup: int, kind: str, constant_steps: int = 0):
        self.total, self.lr, self.min_lr, self.warmup, self.kind = total, lr, min_lr, warmup, kind
        self.constant_steps = constant_steps

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.lr, self.min_lr, self.warmup, self.kind, self.constant_steps) / self.lr


def lr_factor(mode: str, global_batch: int, reference_batch: int) -> float:
    """How the recipe's lr follows the global batch: none, linear or sqrt in global / reference."""
    if mode == "none" or not reference_batch:
        return 1.0
    ratio = global_batch / reference_batch
    return ratio if mode == "linear" else math.sqrt(ratio)

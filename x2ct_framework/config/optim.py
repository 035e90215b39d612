"""Optimizers and learning-rate schedules by name, through the registries, stepped once per optimizer update.

This module is also the core plugin ``optim``: it registers every ``torch.optim`` optimizer that
steps without a closure (``adamw``, ``adam``, ``sgd``, ``radam``, ...) through ``register_optimizers``
and the built-in schedules (``cosine``, ``constant``, ``linear``, ``linear_decay``, ``step``) through
``register_schedules``. A plugin adds its own through the same hooks (see docs/plugins.md).
"""

from __future__ import annotations

import inspect
import json
import math
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch

from x2ct_framework.errors import RecipeError, did_you_mean
from x2ct_framework.hookspecs import hookimpl

# Every torch.optim optimizer that steps without a closure, by lower-case name (adamw, adam, sgd, radam, ...).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name.lower(): cls for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    and name not in ("LBFGS", "SparseAdam")
}


def _registry(kind: str):
    from x2ct_framework.plugins import get_plugin_manager

    return get_plugin_manager().registry(kind)


def optimizer_names() -> list[str]:
    """The optimizers a recipe may name: the registry's (the built-ins are always among them)."""
    try:
        return sorted(set(OPTIMIZERS) | set(_registry("optimizer").names()))
    except Exception:  # a registry that cannot be built is reported by the command that needs it
        return sorted(OPTIMIZERS)


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   options: dict[str, Any], where: str = "optimizer") -> torch.optim.Optimizer:
    """The registry's optimizer ``name`` (``torch.optim.<name>`` for the built-ins) with ``lr``,
    ``weight_decay`` and the recipe's ``optimizer_options``; bad options name the recipe key."""
    reg = _registry("optimizer")
    key = name if name in reg else name.lower()
    if key not in reg:
        names = optimizer_names()
        raise RecipeError([f"{where}: unknown optimizer {name!r}{did_you_mean(name.lower(), names)} "
                           f"(known: {', '.join(names)})"])
    entry = reg.get(key)
    cls = entry.factory
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return reg.create(key, options, where=f"{where}_options", params=params, lr=lr, weight_decay=weight_decay)
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


# ---- schedules --------------------------------------------------------------------------------
def _progress(step: int, total: int, warmup: int) -> float:
    """0 at update ``warmup``, 1 at update ``total - 1`` (the last)."""
    span = max(1, total - 1 - warmup)
    return min(1.0, max(0.0, (step - warmup) / span))


def cosine(total: int, lr: float, min_lr: float, warmup: int) -> Callable[[int], float]:
    """Cosine from ``lr`` at the end of the warm-up to ``min_lr`` at the last update."""
    return lambda step: min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * _progress(step, total, warmup)))


def constant(total: int, lr: float, min_lr: float, warmup: int) -> Callable[[int], float]:
    """``lr`` throughout (after the warm-up)."""
    return lambda step: lr


def linear(total: int, lr: float, min_lr: float, warmup: int) -> Callable[[int], float]:
    """Straight line from ``lr`` at the end of the warm-up to ``min_lr`` at the last update."""
    return lambda step: lr + (min_lr - lr) * _progress(step, total, warmup)


def linear_decay(total: int, lr: float, min_lr: float, warmup: int, constant_fraction: float = 0.5,
                 constant_steps: int = 0, final_lr: float = 0.0, rule: str = "to_last") -> Callable[[int], float]:
    """``lr`` for the first part of training, then a straight line to ``final_lr`` (default 0).

    The constant part is ``constant_steps`` updates when set, else ``constant_fraction`` of them
    (constant for N of E epochs: ``constant_fraction = N / E``), as pix2pix-style trainers do.
    ``rule = "to_last"`` reaches ``final_lr`` at the last update; ``rule = "cyclegan"`` is the rule of
    X2CT-GAN's (CycleGAN's) trainer, ``1 - (s + 1 - constant) / (total - constant + 1)`` after the
    constant part, which stops one step short of ``final_lr``.
    """
    if not 0.0 <= constant_fraction <= 1.0:
        raise ValueError(f"constant_fraction must be in [0, 1], got {constant_fraction}")
    if constant_steps < 0:
        raise ValueError(f"constant_steps must be >= 0, got {constant_steps}")
    if rule not in ("to_last", "cyclegan"):
        raise ValueError(f"rule must be 'to_last' or 'cyclegan', got {rule!r}")
    flat = max(warmup, constant_steps if constant_steps else warmup + round(constant_fraction * (total - warmup)))

    def fn(step: int) -> float:
        if step < flat:
            return lr
        if rule == "cyclegan":
            return lr + (final_lr - lr) * min(1.0, (step - flat + 1) / (total - flat + 1))
        return lr + (final_lr - lr) * _progress(step, total, flat)

    return fn


def with_constant_epochs(kind: str | dict, constant_steps: int, min_lr: float) -> str | dict:
    """A stage's ``constant_epochs`` (as updates) applied to ``scheduler = "linear_decay"``: X2CT-GAN's rule,
    constant for those updates, then linear towards ``min_lr``. Other schedules are returned unchanged."""
    if constant_steps and kind == "linear_decay":
        return {"name": "linear_decay", "constant_steps": int(constant_steps), "final_lr": float(min_lr),
                "rule": "cyclegan"}
    return kind


def step(total: int, lr: float, min_lr: float, warmup: int, every: int = 1000,
         gamma: float = 0.1) -> Callable[[int], float]:
    """``lr`` multiplied by ``gamma`` every ``every`` updates after the warm-up, never below ``min_lr``."""
    if every < 1:
        raise ValueError(f"every must be >= 1 (optimizer updates), got {every}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return lambda s: max(min_lr, lr * gamma ** (max(0, s - warmup) // every))


SCHEDULES = {"cosine": cosine, "constant": constant, "linear": linear, "linear_decay": linear_decay, "step": step}


def schedule_names() -> list[str]:
    try:
        return sorted(set(SCHEDULES) | set(_registry("schedule").names()))
    except Exception:
        return sorted(SCHEDULES)


def schedule_spec(kind: str | dict) -> tuple[str, dict]:
    """A recipe's ``scheduler``: a name, or a table ``{ name = "step", every = 500, gamma = 0.5 }``."""
    if isinstance(kind, dict):
        opts = dict(kind)
        return str(opts.pop("name", "")), opts
    return str(kind), {}


@lru_cache(maxsize=64)
def _schedule_fn(name: str, factory: Callable, options_json: str, total: int, lr: float, min_lr: float, warmup: int,
                 where: str):
    # ``factory`` is part of the key so that a plugin replacing a schedule name is never served a stale one.
    return _registry("schedule").create(name, json.loads(options_json), where=where, total=total, lr=lr,
                                        min_lr=min_lr, warmup=warmup)


def build_schedule(kind: str | dict, total: int, lr: float, min_lr: float, warmup: int = 0,
                   where: str = "scheduler") -> Callable[[int], float]:
    """``lr(step)`` of the registry's schedule with the linear warm-up in front; errors name ``where``."""
    name, options = schedule_spec(kind)
    entry = _registry("schedule").get(name, where)
    fn = _schedule_fn(name, entry.factory, json.dumps(options, sort_keys=True), int(total), float(lr), float(min_lr),
                      int(warmup), where)

    def with_warmup(s: int) -> float:
        if warmup and s < warmup:
            return lr * (s + 1) / warmup
        return float(fn(s))

    return with_warmup


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int = 0, kind: str | dict = "cosine",
          constant_steps: int = 0) -> float:
    """Learning rate of optimizer update ``step`` (0-based) out of ``total``: linear warm-up, then the schedule.

    The warm-up rises to ``lr`` over ``warmup`` updates. ``cosine`` then falls from ``lr`` at update
    ``warmup`` to ``min_lr`` at update ``total - 1``, so the last update uses exactly ``min_lr``;
    ``constant`` stays at ``lr``; ``linear_decay`` (X2CT-GAN's, after CycleGAN: ``niter`` epochs
    constant, ``niter_decay`` epochs linear) stays at ``lr`` for ``constant_steps`` updates, then falls
    linearly to ``min_lr``, reached one update after the last (so the last update still learns).
    """
    return build_schedule(with_constant_epochs(kind, constant_steps, min_lr), total, lr, min_lr, warmup)(step)


class Schedule:
    """``LambdaLR`` factor for :func:`lr_at` (the scheduler is stepped once per optimizer update).

    Its attributes are plain values, so the scheduler's state stays storable in a checkpoint.
    """

    def __init__(self, total: int, lr: float, min_lr: float, warmup: int, kind: str | dict, constant_steps: int = 0):
        kind = with_constant_epochs(kind, constant_steps, min_lr)
        self.total, self.lr, self.min_lr, self.warmup, self.kind = total, lr, min_lr, warmup, kind
        build_schedule(kind, total, lr, min_lr, warmup)  # unknown names and bad options fail here

    def __call__(self, step: int) -> float:
        return build_schedule(self.kind, self.total, self.lr, self.min_lr, self.warmup)(step) / self.lr


def lr_factor(mode: str, global_batch: int, reference_batch: int) -> float:
    """How the recipe's lr follows the global batch: none, linear or sqrt in global / reference."""
    if mode == "none" or not reference_batch:
        return 1.0
    ratio = global_batch / reference_batch
    return ratio if mode == "linear" else math.sqrt(ratio)


# ---- the core plugin ``optim`` ----------------------------------------------------------------
@hookimpl
def register_optimizers(register):
    for name, cls in sorted(OPTIMIZERS.items()):
        register(name, cls)


@hookimpl
def register_schedules(register):
    for name, factory in SCHEDULES.items():
        register(name, factory)

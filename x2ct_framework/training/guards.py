"""Checks the training loop makes so that a stage never ends "done" without having trained.

- :func:`check_batch`: a dataset item without the target CT (``ct``) stops with a message naming the
  dataset and split (exit status 2), not a ``KeyError`` from inside the loop.
- :func:`check_trained`: a stage in which every optimizer update so far was skipped (a loss that is
  always NaN, with ``train.max_nonfinite_steps`` above the number of updates) stops with exit status 3
  before ``best`` could be written from the untrained model.
- :func:`check_validation`: a validation whose loss or ``select_best`` metric is not finite stops with
  exit status 3; the last good checkpoint is kept (nothing is written from that epoch).
- :class:`NonFiniteGuard`: the one owner of non-finite training values: a micro-batch's loss (every process
  agrees), the update's gradient norm, the count of skipped updates and its limit
  (``train.max_nonfinite_steps``). Its verdict is part of the :class:`Update` value the optimizer step returns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.errors import DataError, X2CTError

REQUIRED_KEYS = ("xrays", "geometry", "ct")


class TrainingDiverged(X2CTError):
    """Too many non-finite losses or gradients, no update at all, or a non-finite validation (exit status 3);
    the last good checkpoint is kept."""

    exit_code = 3


def check_batch(batch: Any, dataset: str | Callable[[], str], split: str) -> None:
    """The batch holds what training needs; otherwise a DataError naming the dataset (or ``dataset()``)."""
    if isinstance(batch, dict) and all(k in batch for k in REQUIRED_KEYS):
        return
    dataset = dataset() if callable(dataset) else dataset
    got = f"keys {', '.join(map(repr, batch))}" if isinstance(batch, dict) else type(batch).__name__
    missing = [k for k in REQUIRED_KEYS if not isinstance(batch, dict) or k not in batch]
    raise DataError(f"dataset {dataset!r} ({split} split) gave items without {', '.join(map(repr, missing))} "
                    f"(it gave {got}); training needs 'xrays', 'geometry' and the target CT 'ct' "
                    f"(see docs/plugins.md, dataset contract)")


def last_good(last: Path) -> str:
    """A sentence naming the last good checkpoint of a stage (or saying there is none yet)."""
    if ckpt.exists(last):
        try:
            return f"The last good checkpoint is {last} (epoch {ckpt.load_state(last).get('epoch')})"
        except X2CTError:
            pass
    return "No checkpoint of this stage was written yet"


def updates_done(pos: dict) -> int:
    """Optimizer updates that were applied in the stage so far (steps minus the skipped ones)."""
    return int(pos.get("step", 0)) - int(pos.get("nonfinite", 0))


def check_trained(stage_name: str, pos: dict, last: str) -> None:
    """Stop a stage whose every optimizer update so far was skipped."""
    if pos.get("step", 0) > 0 and updates_done(pos) <= 0:
        raise TrainingDiverged(
            f"{stage_name}: every one of its {pos['step']} optimizer updates so far was skipped (the loss or the "
            f"gradient was never finite); the model has not trained, so no checkpoint of this epoch is written "
            f"and 'best' is not taken from it. {last}. Check the loss terms and their weights, the data, and try a "
            f"lower lr or mixed_precision = \"no\".")


def check_validation(stage_name: str, metrics: dict[str, float], select_best: str, last: str) -> None:
    """Stop when validation is not finite (the loss, or the metric that picks ``best``)."""
    bad = {k: v for k, v in metrics.items() if k in ("val/loss", select_best) and not math.isfinite(v)}
    loss = metrics.get("val/loss")
    if bad and list(bad) == [select_best] and select_best != "val/loss" and loss is not None and math.isfinite(loss):
        raise TrainingDiverged(
            f"{stage_name}: the select_best metric {select_best} is {bad[select_best]} while the validation loss is "
            f"finite ({loss:.4g}): the weights are fine, the metric gives no number on this validation data (for "
            f"example a per-structure metric on cases without label maps, or a metric that is undefined here). "
            f"{last}. Choose another select_best for this stage (for example \"val/loss\" or \"val/psnr\") or fix "
            f"the metric.")
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingDiverged(
            f"{stage_name}: validation is not finite ({shown}); the weights have probably diverged, so nothing of "
            f"this epoch is written. {last}. Try a lower lr, a larger warmup_steps, max_grad_norm, or "
            f"mixed_precision = \"bf16\" or \"no\".")


@dataclass(frozen=True)
class Update:
    """One optimizer update as it happened: its learning rate, the clipped gradient's norm (None when skipped),
    and whether it was skipped and why. EMA, critics, logging and hooks read this one value."""

    lr: float
    grad_norm: float | None = None
    skipped: bool = False
    why: str = ""  # "non-finite loss" or "non-finite gradient" when skipped


class NonFiniteGuard:
    """Non-finite losses and gradients, in one place: ``loss_ok`` before a backward (every process agrees, so all
    skip a bad update together), ``verdict`` at the update (why it must be skipped, or ""), ``skipped`` to count
    it against ``limit`` (``train.max_nonfinite_steps``; past it the stage stops with exit status 3)."""

    def __init__(self, accelerator: Any, limit: int):
        self.acc, self.limit = accelerator, limit
        self.bad_loss = False  # a micro-batch of the update in progress had a non-finite loss (no backward)

    def loss_ok(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process; a bad one marks the update in progress for skipping."""
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.acc.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = bool(flag.item())
        self.bad_loss = self.bad_loss or not ok
        return ok

    def verdict(self, grad_norm: Any) -> str:
        """Why the update in progress must be skipped ("" when it may step); the next update starts clean."""
        why = ("non-finite loss" if self.bad_loss else
               "non-finite gradient" if grad_norm is None or not torch.isfinite(torch.as_tensor(grad_norm)).item()
               else "")
        self.bad_loss = False
        return why

    def skipped(self, count: int, stage_name: str, epoch: int, step: int, last: Path) -> None:
        """The ``count``-th skipped update of a stage: a warning, or past the limit a :class:`TrainingDiverged`."""
        if count > self.limit:
            raise TrainingDiverged(
                f"{stage_name}: the loss or gradient was not finite at {count} optimizer steps "
                f"(limit train.max_nonfinite_steps = {self.limit}); stopped at epoch {epoch + 1}, step {step + 1}. "
                + (f"The last good checkpoint is {last} (epoch {ckpt.load_state(last)['epoch']}). "
                   if ckpt.exists(last) else "No checkpoint of this stage was written yet. ")
                + "Try a lower lr, a larger warmup_steps, max_grad_norm, or mixed_precision = \"bf16\" or \"no\".")
        warnings.warn(f"{stage_name}: non-finite loss or gradient at epoch {epoch + 1}, step {step + 1}; "
                      f"update skipped ({count} of at most {self.limit})", RuntimeWarning, stacklevel=3)

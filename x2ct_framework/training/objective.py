"""The objective of a stage: its loss terms -> one total to back-propagate, and what is logged of it.

The weighted sum itself is :class:`x2ct_framework.config.build.LossSet` (built from the stage's
``losses`` table). Here: the running sums of the total and of each term between two log rows
(``train/loss``, ``train/<term>``, ``train/grad_norm``). Whether a loss is finite is the
:class:`~x2ct_framework.training.guards.NonFiniteGuard`'s question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from x2ct_framework.config.build import LossSet


class Loss(NamedTuple):
    """The objective on one micro-batch: the weighted total to back-propagate and each term's value (detached)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Objective:
    """The stage's losses on a prediction, with the sums logged since the last row."""

    def __init__(self, losses: LossSet, accelerator: Accelerator):
        self.losses, self.acc = losses, accelerator
        self.sums: dict[str, float] = {}  # train/loss and train/<term>, summed over micro-batches
        self.micro_batches = 0  # micro-batches in the sums
        self.grad_norm_sum, self.grad_norms = 0.0, 0  # over the updates that stepped
        self.updates = 0  # optimizer updates (stepped or skipped) since the last row
        self.update_values: dict[str, float] = {}  # this process's sums for the update in progress
        self.update_micro_batches = 0

    def __call__(self, pred: torch.Tensor, batch: dict, epoch: int) -> Loss:
        """(total, {term: value}) of the stage's losses on ``pred`` against ``batch["ct"]``."""
        return Loss(*self.losses(pred, batch["ct"], batch, epoch=epoch))

    def record(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Add a back-propagated micro-batch's total and terms to the logged sums."""
        self.micro_batches += 1
        self.update_micro_batches += 1
        self._add("train/loss", loss.detach().float().item())
        for k, v in terms.items():
            self._add(f"train/{k}", v.float().item())

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.update_values[key] = self.update_values.get(key, 0.0) + value

    def record_update(self, grad_norm: float | None) -> None:
        """An optimizer update finished (``grad_norm`` None: it was skipped)."""
        self.updates += 1
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm
            self.grad_norms += 1

    def take_update(self) -> dict[str, float]:
        """This process's mean total and terms over the micro-batches of the update just finished."""
        n = max(self.update_micro_batches, 1)
        out = {k: v / n for k, v in self.update_values.items()}
        self.update_values, self.update_micro_batches = {}, 0
        return out

    def take_row(self) -> dict[str, float]:
        """The means since the last row (over micro-batches and processes); the sums start again."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / max(self.micro_batches, 1) for k in keys], dtype=torch.float64)
        if self.acc.num_processes > 1 and keys:
            values = self.acc.reduce(values.to(self.acc.device), "mean").cpu()
        row = dict(zip(keys, values.tolist()))
        if self.grad_norms:
            row["train/grad_norm"] = self.grad_norm_sum / max(self.updates, 1)
        self.sums, self.micro_batches = {}, 0
        self.grad_norm_sum, self.grad_norms, self.updates = 0.0, 0, 0
        return row

"""Critics: the trainable parts of loss terms (e.g. the adversarial discriminator), in one place.

A loss term with trainable parts exposes ``trainable_parts()``, ``configure_optimizer(params)`` and
``parts_loss(pred_detached, target, batch, *, epoch, step)``. The trainer reads them generically:
a critic is frozen while the model's objective is back-propagated (gradients still reach the
prediction through it), then its own objective is back-propagated and its optimizer steps whenever
gradients sync. Its weights and optimizer go into ``last`` (key ``parts`` of the trainer state) for
``--resume``, and the mean of its objective is logged as ``train/<term>/parts_loss``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

from x2ct_framework.errors import CheckpointError


class Critic:
    """The trainable parts of one loss term and their own optimizer."""

    def __init__(self, name: str, loss: torch.nn.Module, accelerator: Accelerator):
        self.name, self.loss, self.acc = name, loss, accelerator
        self.module: torch.nn.Module = loss.trainable_parts()
        self.module.to(accelerator.device)
        self.optimizer = accelerator.prepare_optimizer(loss.configure_optimizer(self.module.parameters()))
        self.pending = False  # gradients accumulated since the last step of its optimizer
        self.total, self.count = 0.0, 0  # sum and count of its objective since the last log row

    def freeze(self, frozen: bool) -> None:
        self.module.requires_grad_(not frozen)

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict, epoch: int, step: int) -> None:
        """Backpropagate the parts' objective for this micro-batch; step their optimizer when gradients sync."""
        self.freeze(False)
        with self.acc.autocast():
            objective = self.loss.parts_loss(pred.detach(), target, batch, epoch=epoch, step=step)
        if objective is not None:
            if torch.isfinite(objective.detach()).item():
                self.acc.backward(objective)
                self.pending = True
                self.total += objective.detach().float().item()
                self.count += 1
            else:
                warnings.warn(f"loss term {self.name!r}: non-finite objective of its trainable parts at step "
                              f"{step}; skipped", RuntimeWarning, stacklevel=3)
        if self.acc.sync_gradients and self.pending:
            if self.acc.num_processes > 1:  # the parts are not wrapped in DDP: average their gradients here
                for p in self.module.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(self.acc.num_processes)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = False
        self.freeze(True)

    def take_mean(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])


class Critics:
    """Every critic of a stage's losses: set-up, freeze, update, log, save and restore together."""

    def __init__(self, losses, accelerator: Accelerator):
        self.items = [Critic(t.name, t.module, accelerator) for t in losses.trainable()]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def freeze(self) -> None:
        """Before the model's objective: the critics pass gradients to the prediction but do not collect them."""
        for critic in self.items:
            critic.freeze(True)

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict, epoch: int, step: int) -> None:
        for critic in self.items:
            critic.update(pred, target, batch, epoch, step)

    def log_values(self) -> dict[str, float]:
        """``train/<term>/parts_loss``: the mean objective of each critic since the last call."""
        out = {}
        for critic in self.items:
            mean = critic.take_mean()
            if mean is not None:
                out[f"train/{critic.name}/parts_loss"] = mean
        return out

    def state_dict(self) -> dict:
        return {critic.name: critic.state_dict() for critic in self.items}

    def load_state_dict(self, state: dict, folder: Path | str) -> None:
        for critic in self.items:
            if critic.name not in state:
                raise CheckpointError(f"cannot resume from {folder}: it has no state for the trainable parts of "
                                      f"loss term {critic.name!r}")
            critic.load_state_dict(state[critic.name])

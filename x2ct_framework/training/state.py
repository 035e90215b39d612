"""Everything stateful of one training stage, with ``state_dict()`` / ``load_state_dict()``.

:class:`StageState` holds the model, optimizer, scheduler, EMA, critics, objective, data and the
progress (epoch, step, position in the epoch, skipped updates, best so far). Its
:meth:`~StageState.state_dict` is the trainer state of a checkpoint (``trainer.safetensors`` +
``trainer.json``, written by :mod:`x2ct_framework.checkpoint`, never pickled) and
:meth:`~StageState.summary` its ``state.json``; :meth:`~StageState.restore` continues from one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.errors import CheckpointError
from x2ct_framework.stage import Stage
from x2ct_framework.training.critics import Critics
from x2ct_framework.training.guards import NonFiniteGuard
from x2ct_framework.training.objective import Objective
from x2ct_framework.training.sampling import StageData, rng_state, set_rng_state

if TYPE_CHECKING:
    from x2ct_framework.training.cascade import PreviousStages


def best_mode(metric: str, mode: str, metrics: dict[str, Any]) -> str:
    """``max`` or ``min`` for ``select_best = metric``; ``auto`` reads the metric's ``higher_is_better``.

    ``metrics`` are the built metric objects by name (``eval.metrics``); ``val/loss`` is lower-is-better.
    A metric without the attribute counts as higher-is-better, as in evaluation.
    """
    if mode != "auto":
        return mode
    name = metric.split("/", 1)[-1]
    if metric == "val/loss":
        return "min"
    return "max" if getattr(metrics.get(name), "higher_is_better", True) else "min"


@dataclass
class Best:
    """The best validation value of ``metric`` so far (``mode`` max or min) and its epoch (1-based)."""

    metric: str
    mode: str
    value: float | None = None
    epoch: int | None = None

    def improved(self, value: float | None, epoch: int) -> bool:
        """Whether ``value`` beats the best so far; if so it becomes the best."""
        if value is None or not math.isfinite(value):
            return False
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.epoch = value, epoch
        return better


@dataclass
class SyncPoint:
    """The stage right after the last finished optimizer update, where a Ctrl-C save continues from.

    ``consistent`` is False while an update is in progress (the weights change before the position).
    """

    rng: dict | None = None
    batch_in_epoch: int = 0
    consistent: bool = True


class EMA:
    """An exponential moving average of the model's weights and buffers (``[train.ema]``).

    Validation, ``best`` and the next stage use its weights; ``last`` keeps both.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def to(self, device) -> "EMA":
        self.averaged.to(device)
        return self

    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


class EpochClock:
    """Seconds spent in the current epoch on training steps, validation and checkpoint writes."""

    KINDS = ("train", "validate", "save")

    def __init__(self):
        self.seconds = dict.fromkeys(self.KINDS, 0.0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.KINDS, 0.0)

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - t0

    def columns(self) -> dict[str, float]:
        """``time/train_s``, ``time/validate_s``, ``time/save_s`` for the metrics row of the epoch."""
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


class StageState:
    """One stage's components and progress; what a checkpoint saves and ``--resume`` restores."""

    def __init__(self, *, stage: Stage, recipe_name: str, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer, scheduler, ema: EMA | None, critics: Critics, objective: Objective, data: StageData,
                 metrics: dict[str, Any], best: Best, total_steps: int, guard: NonFiniteGuard,
                 previous: PreviousStages | None = None):
        self.stage, self.recipe_name, self.acc = stage, recipe_name, accelerator
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.critics, self.objective, self.data, self.metrics = critics, objective, data, metrics
        self.total_steps = total_steps
        self.guard = guard  # non-finite losses and gradients: skips, their count and limit
        self.previous = previous  # the frozen earlier stages that give a cascading stage its prev
        # progress (saved in the checkpoint)
        self.epoch = 0  # epochs finished = the 0-based epoch in progress
        self.step = 0  # optimizer updates finished in this stage
        self.batch_in_epoch = 0  # micro-batches of the epoch in progress already trained
        self.nonfinite = 0  # updates skipped for a non-finite loss or gradient
        self.best = best
        # within the run (not saved)
        self.validation: dict[str, float] = {}  # the latest validation's values
        self.sync_point = SyncPoint()
        self.clock = EpochClock()
        self.logbook: Any = None  # the stage's Logbook and progress bar, set by the trainer
        self.bar: Any = None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and become ``best``: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "nonfinite": self.nonfinite, "best": asdict(self.best)}

    def model_weights(self, collective: bool = True) -> dict[str, torch.Tensor]:
        """The raw model's weights; ``collective=False`` reads them without the other processes."""
        if collective:
            return self.acc.get_state_dict(self.model)
        return self.acc.unwrap_model(self.model).state_dict()

    def weights(self, collective: bool = True) -> dict[str, torch.Tensor]:
        """What ``model.safetensors`` holds: the EMA's weights when there is one, else the model's."""
        return self.ema.module.state_dict() if self.ema is not None else self.model_weights(collective)

    def state_dict(self, interrupted: bool = False) -> dict[str, Any]:
        """The trainer state; ``interrupted``: at the last sync point, read without collectives."""
        acc = self.acc
        position = self.position()
        if interrupted:
            position["batch_in_epoch"] = self.sync_point.batch_in_epoch
            rng = [self.sync_point.rng or rng_state()]
        else:
            rng = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        state = {"position": position, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng, "parts": self.critics.state_dict()}
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            state["model"] = self.model_weights(collective=not interrupted)  # model.safetensors holds the EMA
        return state

    def summary(self, *, complete: bool, interrupted: bool = False) -> dict[str, Any]:
        """``state.json``: which stage, how far, the latest validation, the best so far."""
        stage = self.stage
        out = {"stage": stage.name, "stage_index": stage.index, "recipe": self.recipe_name,
               "resolution": stage.resolution, "epoch": self.epoch, "step": self.step,
               "batch_in_epoch": self.sync_point.batch_in_epoch if interrupted else self.batch_in_epoch,
               "metrics": self.validation, "best": asdict(self.best), "complete": complete}
        if interrupted:
            out["interrupted"] = True
        if getattr(self, "schedule", None):
            out["schedule"] = dict(self.schedule)  # what --resume compares (training/resume_schedule.py)
        out["weights"] = "ema" if self.ema is not None else "model"
        return out

    def load_state_dict(self, state: dict[str, Any], weights: dict[str, torch.Tensor], folder: Path | str) -> None:
        """Continue from a trainer state (and the checkpoint's weights when it holds no raw model)."""
        acc = self.acc
        raw = state["model"] if "model" in state else weights
        unwrapped = acc.unwrap_model(self.model)
        report = ckpt.fit_report(unwrapped.state_dict(), raw)
        if any(report.values()):
            misfits = (report["missing"] + report["unexpected"] + report["mismatched"])[:3]
            raise CheckpointError(f"cannot resume from {folder}: its weights do not fit this stage's model "
                                  f"({'; '.join(misfits)}); was the recipe's model changed?")
        unwrapped.load_state_dict(raw)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"cannot resume from {folder}: the recipe keeps an EMA (train.ema) but the "
                                      f"checkpoint has none")
            self.ema.load_state_dict(state["ema"])
        self.critics.load_state_dict(state.get("parts", {}), folder)
        rngs = state["rng"]
        set_rng_state(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0])
        position = state["position"]
        for key in ("epoch", "step", "batch_in_epoch", "nonfinite"):
            if key in position:
                setattr(self, key, position[key])
        if "best" in position:
            self.best = Best(**position["best"])

    def restore(self, folder: Path | str) -> None:
        """Continue from the checkpoint folder ``folder`` (a ``last`` written by this stage)."""
        summary = ckpt.load_state(folder)
        state = ckpt.load_trainer_state(folder)
        self.load_state_dict(state, ckpt.load_weights(folder) if "model" not in state else {}, folder)
        self.validation = summary.get("metrics", {})

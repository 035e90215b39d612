"""Lifecycle hooks without training: a stand-in trainer and the hooks called in a run's order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage
from x2ct_framework.testing.registration import make_stage


# ---- lifecycle hooks without training ------------------------------------------------------------------
class FakeAccelerator:
    """What a hook reads from ``trainer.accelerator`` on one process; ``log`` calls are kept in ``logged``."""

    is_main_process = True
    is_local_main_process = True
    process_index = 0
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict]] = []

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((step, dict(values)))

    def wait_for_everyone(self) -> None:
        pass


class FakeTrainer:
    """A stand-in for the trainer in hook tests: ``recipe``, ``run_dir``, ``accelerator``, ``pm``, ``print``.

    ``calls`` records every hook called through :func:`run_hooks` as ``(hook name, kwargs)``.
    """

    def __init__(self, recipe: Any = None, run_dir: str | Path | None = None):
        self.recipe = recipe if recipe is not None else {"name": "fake", "seed": 0}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.accelerator = FakeAccelerator()
        self.pm = get_plugin_manager()
        self.calls: list[tuple[str, dict]] = []

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call ``hook`` on every registered plugin (skipped when the framework has no such hook)."""
        if not hasattr(self.pm.pm.hook, hook):
            return
        self.calls.append((hook, kwargs))
        getattr(self.pm.hook, hook)(trainer=self, **kwargs)


def run_hooks(trainer: FakeTrainer | None = None, *, stages: Sequence[Stage] | None = None, epochs: int = 2,
              steps_per_epoch: int = 2, val_every: int = 1,
              metrics: Callable[[Stage, int], dict] | None = None) -> FakeTrainer:
    """Call the lifecycle hooks in the order a run calls them, with made-up metrics, and no training.

    Per stage: ``on_stage_start``; per epoch (``epoch`` 0-based) ``on_train_step_end`` after every
    optimizer update, ``on_validation_end`` in validation epochs, ``on_checkpoint_saved`` (``last``,
    then ``best``), ``on_epoch_end``; then ``on_stage_end``; finally ``on_run_end``. Hooks the framework
    does not define are skipped. ``metrics(stage, epoch)`` gives the validation metrics
    (default: a PSNR rising by one per epoch). Register the plugin under test first (:func:`registered`).
    """
    trainer = trainer or FakeTrainer()
    stages = list(stages) if stages is not None else [make_stage()]
    metrics = metrics or (lambda stage, epoch: {"val/loss": 1.0 / (epoch + 1), "val/psnr": 20.0 + epoch})
    results: dict[str, dict] = {}
    step = 0
    for stage in stages:
        trainer.call("on_stage_start", stage=stage)
        last: dict = {}
        for epoch in range(epochs):
            for _ in range(steps_per_epoch):
                step += 1
                trainer.call("on_train_step_end", stage=stage, step=step,
                             metrics={"train/loss": 1.0 / step, "train/lr": 1e-4})
            if (epoch + 1) % val_every == 0 or epoch == epochs - 1:
                last = dict(metrics(stage, epoch))
                trainer.call("on_validation_end", stage=stage, epoch=epoch, metrics=last)
            folder = (trainer.run_dir / stage.name) if trainer.run_dir is not None else Path(stage.name)
            trainer.call("on_checkpoint_saved", stage=stage, path=folder / "last", kind="last")
            trainer.call("on_checkpoint_saved", stage=stage, path=folder / "best", kind="best")
            trainer.call("on_epoch_end", stage=stage, epoch=epoch, metrics=last)
        trainer.call("on_stage_end", stage=stage, metrics=last)
        results[stage.name] = last
    trainer.call("on_run_end", results=results)
    return trainer

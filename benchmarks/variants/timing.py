"""How long a run trained: from the trainer's logged time columns, peak memory, the device that ran it.

The trainer writes ``time/train_s``, ``time/validate_s`` and ``time/save_s`` into each epoch row of a
stage's ``metrics.jsonl``; time per step is the sum of ``time/train_s`` over the epochs this process
trained, divided by their optimizer steps (validation and checkpoint writing excluded). Nothing of
the trainer is overridden. A logbook without those columns (a trainer older than them) is timed by
the hooks alone, from ``on_stage_start`` to the last ``on_epoch_end``, validation and checkpoints
included; ``timing_source`` in the result says which.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

TRAIN_S, VALIDATE_S, SAVE_S = "time/train_s", "time/validate_s", "time/save_s"


def trained_stages(recipe) -> list[int]:
    """0-based positions of the stages a run of ``recipe`` trains."""
    return list(range(recipe["train"]["start_stage"] - 1, len(recipe["stages"])))


def peak_memory_mib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"


def device_label() -> str:
    """The device this process trains on, as the table shows it: ``cuda:2 (NVIDIA H200)`` or ``cpu (4 threads)``."""
    import torch

    slot = os.environ.get("X2CT_MATRIX_SLOT")
    tail = f", worker {slot}" if slot else ""
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return f"cuda:{visible or torch.cuda.current_device()} ({torch.cuda.get_device_name()}{tail})"
    return f"cpu ({torch.get_num_threads()} threads{tail})"


def logged_seconds(stage_dir: Path, first_epoch: int = 0) -> dict[str, float] | None:
    """Sums of the time columns over the stage's epoch rows after ``first_epoch``; None without the columns."""
    from x2ct_framework.training.logbook import Logbook

    rows = [r for r in Logbook(stage_dir).rows() if TRAIN_S in r and r.get("epoch", 0) > first_epoch]
    if not rows:
        return None
    by_epoch = {r.get("epoch"): r for r in rows}  # one row per epoch (the last written wins)
    return {k: sum(float(r.get(k) or 0.0) for r in by_epoch.values()) for k in (TRAIN_S, VALIDATE_S, SAVE_S)}


def _make_clock():
    from x2ct_framework.hookspecs import hookimpl

    class Clock:
        """Stage wall time between hooks; the peak-memory counter starts at each stage."""

        def __init__(self) -> None:
            self.stages: list[dict[str, Any]] = []

        @hookimpl
        def on_stage_start(self, trainer, stage):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.stages.append({"stage": stage.name, "t0": time.perf_counter(), "t1": None})

        @hookimpl
        def on_epoch_end(self, trainer, stage, epoch, metrics):
            self.stages[-1]["t1"] = time.perf_counter()

    return Clock()


def train_and_time(recipe, resume: bool) -> dict[str, Any]:
    """Train ``recipe`` (continuing an interrupted run with ``resume``); time per step, memory, parameters."""
    from x2ct_framework import checkpoint as ckpt
    from x2ct_framework.plugins import get_plugin_manager
    from x2ct_framework.training.trainer import Trainer

    pm = get_plugin_manager()
    run_dir = Path(recipe["output_dir"]) / recipe.name
    names = [recipe["stages"][i]["name"] for i in trained_stages(recipe)]

    def position() -> dict[str, tuple[int, int]]:
        out = {}
        for n in names:
            state = ckpt.load_state(run_dir / n / "last") if ckpt.exists(run_dir / n / "last") else {}
            out[n] = (int(state.get("epoch", 0)), int(state.get("step", 0)))
        return out

    before = position() if resume else {n: (0, 0) for n in names}
    clock = _make_clock()
    hook_name = f"benchmarks.variants.clock.{id(clock)}"
    pm.register_object(clock, hook_name)
    try:
        trainer = Trainer(recipe, resume=resume)
        trainer.run()
        model = trainer.model
    finally:
        pm.unregister(hook_name)
    peak, kind = peak_memory_mib()
    after = position()
    timed = sum(after[n][1] - before[n][1] for n in names)  # a resumed run times only the steps it trained itself
    logged = [logged_seconds(run_dir / n, before[n][0]) for n in names if after[n][1] > before[n][1]]
    if logged and all(s is not None for s in logged):
        loop_s = sum(s[TRAIN_S] for s in logged)
        source = "logged"
    else:
        loop_s = sum(st["t1"] - st["t0"] for st in clock.stages if st["t1"] is not None)
        source = "clock (validation and checkpoints included)"
    total = sum(s for _, s in after.values())
    return {"steps": total, "steps_timed": timed, "loop_s": loop_s, "timing_source": source,
            "peak_mem_mib": peak, "mem_kind": kind, "resumed": any(s for _, s in before.values()),
            "time_per_step_s": loop_s / timed if timed > 0 and loop_s > 0 else float("nan"),
            "params": sum(p.numel() for p in model.parameters()) if model is not None else None}

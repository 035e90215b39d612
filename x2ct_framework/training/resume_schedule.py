"""``--resume`` keeps the training schedule, or says how it changes.

What a stage's schedule depends on besides the recipe (the number of processes, and with it the
global batch, the updates per epoch and the total updates of the learning-rate schedule) is saved in
each checkpoint's ``state.json`` under ``schedule``. A resume with other values (say a 2-process
run continued with 1 process: the global batch halves, the updates per epoch double and the
learning rate climbs back up the cosine) is refused, naming every difference, unless the user allows
it by name: ``--allow-change schedule.processes`` (or ``schedule`` for all of them). When allowed,
the schedule is recomputed for the new values and the change is logged.
"""

from __future__ import annotations

from typing import Any

from x2ct_framework.errors import CheckpointError

KEYS = {"processes": "processes", "global_batch": "global batch", "batch_size": "batch per process",
        "grad_accum": "gradient accumulation steps", "steps_per_epoch": "updates per epoch",
        "total_steps": "total updates"}


CHECKED = ("processes", "global_batch", "steps_per_epoch")  # total_steps also follows stages.N.epochs (recipe.toml)


def schedule_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, now) for every schedule value that differs (none for a checkpoint that saved none)."""
    if not isinstance(saved, dict):
        return []
    return [(k, saved.get(k), now.get(k)) for k in KEYS if k in saved and saved.get(k) != now.get(k)]


def _allowed(key: str, changed: set[str], allowed: list[str] | tuple[str, ...]) -> bool:
    allowed = [s.strip() for s in allowed]
    if key not in CHECKED or any(a in ("schedule", f"schedule.{key}") for a in allowed):
        return True
    # what follows from an allowed cause: fewer processes, or a batch size the recipe comparison let through
    if "processes" in changed and any(a in ("schedule", "schedule.processes") for a in allowed):
        return True
    return key != "processes" and any("batch_size" in a or "grad_accum" in a or a in ("train",) for a in allowed)


def check_schedule(stage_name: str, where: str, saved: dict[str, Any] | None, now: dict[str, Any],
                   allowed: list[str] | tuple[str, ...]) -> list[str]:
    """Refuse a resume that trains on another schedule unless every change is allowed; returns the log lines."""
    changes = schedule_changes(saved, now)
    if not changes:
        return []
    lines = [f"  schedule.{k} ({KEYS[k]}): {old} -> {new}" for k, old, new in changes]
    changed = {k for k, _, _ in changes}
    refused = [k for k, _, _ in changes if not _allowed(k, changed, allowed)]
    if refused:
        flags = " ".join(f"--allow-change schedule.{k}" for k in refused)
        raise CheckpointError(
            f"--resume: stage {stage_name} would continue on another schedule than {where} was trained on:\n"
            + "\n".join(lines)
            + "\nThe run would not be the one it was (other batches, another learning-rate curve). Resume with the "
              f"same number of processes and batch, or, if you mean it, allow it: {flags} (the schedule is then "
              f"recomputed for the new values and the change logged)")
    return [f"[{stage_name}] --resume with the schedule changes allowed by --allow-change; the learning-rate "
            f"schedule is recomputed for them:"] + lines

"""``--resume`` with a changed recipe: what changed, whether it changes training, and the refusal.

A run folder's ``recipe.toml`` describes the checkpoints in it. Resuming with a recipe that trains
differently would mix two recipes in one run and leave a ``recipe.toml`` that describes neither,
so :func:`check_resume` compares the resolved recipe with the run folder's and refuses every change
that affects training (model, data, losses, optimizer, schedule, batch, seed, epochs, ...) with a
readable diff, unless the user allows the key (``--allow-change stages.1.lr``; a table allows
everything under it). Keys that only change what is reported (``description``, ``eval`` except
``eval.metrics``, ``train.progress``, ``train.trackers``, ``train.log_every``, ``output_dir``) may
change freely. Changes to stages that have not started yet are allowed too: the recipe describes
them and nothing was trained with the old values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.document import Recipe
from x2ct_framework.errors import CheckpointError, RecipeError

# dotted keys (or prefixes) whose value does not change what is trained
REPORTING_ONLY = ("description", "output_dir", "eval.preview", "eval.protocols", "eval.split", "eval.report",
                  "eval.max_cases", "eval.bootstrap", "eval.worst_cases", "eval.gallery", "eval.lpips",
                  "train.progress", "train.trackers", "train.log_every")

_MISSING = object()


def flatten(data: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Leaf values by key path; array items of tables get their 0-based index."""
    out: dict[tuple, Any] = {}
    if isinstance(data, dict):
        if not data and prefix:
            out[prefix] = {}
        for k, v in data.items():
            out.update(flatten(v, prefix + (k,)))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, prefix + (i,)))
    else:
        out[prefix] = data
    return out


def dotted(key: tuple) -> str:
    """``stages.1.lr`` style (1-based array positions, as ``--set`` takes them)."""
    return ".".join(str(k + 1) if isinstance(k, int) else str(k) for k in key)


def _normalise(allowed: str, stage_names: list[str]) -> str:
    parts = allowed.strip().split(".")
    if len(parts) > 1 and parts[0] == "stages" and parts[1] in stage_names:
        parts[1] = str(stage_names.index(parts[1]) + 1)
    return ".".join(parts)


def _covered(key: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def stage_status(run_dir: Path, stage_names: list[str]) -> dict[str, str]:
    """``done``, ``in progress`` or ``not started`` for each stage, from its ``last`` checkpoint."""
    out = {}
    for name in stage_names:
        last = run_dir / name / "last"
        if not ckpt.exists(last):
            out[name] = ("in progress" if any(ckpt.exists(p) for p in (run_dir / name).glob("*")
                                              if not p.name.endswith(".tmp")) else "not started")
            continue
        try:
            out[name] = "done" if ckpt.load_state(last).get("complete") else "in progress"
        except CheckpointError:
            out[name] = "in progress"
    return out


def recipe_changes(saved: dict, now: dict) -> list[tuple[tuple, Any, Any]]:
    """(key, saved value, new value) for every leaf that differs."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(set(a) | set(b), key=lambda k: tuple(map(str, k)))
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING)]


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else repr(v)


def check_resume(recipe: Recipe, run_dir: Path, allowed: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Refuse a resume whose recipe trains differently from the run folder's; returns the allowed changes
    that affect training (to be logged)."""
    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        return []
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"--resume: the run folder's recipe {path} cannot be read ({exc}); it describes the "
                              f"checkpoints there, so the run cannot be continued safely") from exc
    now = tomllib.loads(recipe.to_run_toml())
    names_now = [s["name"] for s in now.get("stages", [])]
    names_saved = [s.get("name") for s in saved.get("stages", []) if isinstance(s, dict)]
    status = stage_status(Path(run_dir), names_saved)
    prefixes = [_normalise(a, names_now) for a in allowed]
    refused, accepted = [], []
    for key, old, new in recipe_changes(saved, now):
        name = dotted(key)
        if _covered(name, REPORTING_ONLY):
            continue
        if key[:1] == ("stages",) and len(key) > 2 and isinstance(key[1], int):
            i = key[1]
            stage = names_saved[i] if i < len(names_saved) else None
            if stage is None or status.get(stage) == "not started" and (i < len(names_now) and names_now[i] == stage):
                continue  # a stage nothing was trained for yet
        line = f"  {name}: {_show(old)} -> {_show(new)}"
        (accepted if _covered(name, prefixes) else refused).append(line)
    if refused:
        keys = " ".join(f"--allow-change {line.split(':')[0].strip()}" for line in refused[:4])
        raise RecipeError([
            f"--resume: the recipe differs from the one {run_dir} was trained with ({path}) in what it trains:\n"
            + "\n".join(refused)
            + "\nResuming would continue the run with another recipe and leave a recipe.toml that describes neither. "
              f"Resume with the recipe as it was, start a new run beside it (--set name=...), start again "
              f"(--overwrite), or, if you mean it, allow the change: {keys}"])
    return accepted


def optimizer_settings(optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group (lr, weight decay, betas, ...), without the parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def keep_current_settings(optimizer, scheduler, settings: list[dict[str, Any]], schedule) -> None:
    """After a resume, use the recipe's optimizer settings and schedule, not the checkpoint's.

    ``optimizer.load_state_dict`` restores the saved param-group settings and ``LambdaLR.load_state_dict``
    the saved ``base_lrs`` and schedule; with an unchanged recipe they are equal to the current ones and
    nothing changes. With a change allowed by ``--allow-change`` (say ``stages.1.lr``) the run then
    trains with what it logs and writes into recipe.toml. ``schedule`` is a fresh schedule object (the
    scheduler's own was overwritten by the checkpoint's values).
    """
    groups = optimizer.param_groups
    if len(settings) != len(groups):
        return
    same = all(all(g.get(k) == v for k, v in s.items() if k not in ("lr", "initial_lr"))
               for g, s in zip(groups, settings))
    base = [s.get("initial_lr", s["lr"]) for s in settings]
    old_schedule = getattr(scheduler, "lr_lambdas", [None])[0]
    if same and list(scheduler.base_lrs) == base and vars(old_schedule) == vars(schedule):
        return
    for g, s in zip(groups, settings):
        g.update({k: v for k, v in s.items() if k != "lr"})
    scheduler.base_lrs = base
    scheduler.lr_lambdas = [schedule for _ in groups]
    for g, b in zip(groups, base):
        g["lr"] = b * schedule(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]

"""Run folders, checkpoints and export folders: find the recipe, stage and checkpoint folder a path names.

Used by training (the cascade's earlier stages), ``x2ct evaluate``, ``x2ct predict`` and the
benchmarks; it only reads files and builds nothing heavier than the recipe. The read side of an
export folder (``x2ct export``, written by ``export.py``) is here too: :func:`is_export`,
:func:`read_config`, :func:`export_target`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ct_framework.checkpoint import STATE, WEIGHTS, resolve
from x2ct_framework.config.build import data_options, load_recipe_plugins, stages
from x2ct_framework.config.recipe import Recipe, load_recipe
from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import CheckpointError, RecipeError
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage



@dataclass
class Target:
    """What to evaluate: a recipe, one of its stages, and the checkpoint folder of that stage."""

    recipe: Recipe
    stage: Stage
    checkpoint: Path
    run_dir: Path | None


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint folder (or its ``.old`` copy left by a crash during the atomic replace)."""
    return (resolve(path) / WEIGHTS).is_file()


def _stage_named(recipe: Recipe, name: str, where: str) -> Stage:
    all_stages = stages(recipe)
    for s in all_stages:
        if s.name == name:
            return s
    raise RecipeError([f"{where}: stage {name!r} is not in recipe {recipe.path} "
                       f"(its stages: {', '.join(s.name for s in all_stages)})"])


def resolve_target(path: str | Path, recipe_path: str | Path | None = None, overrides: list[str] = (),
                   stage: str | None = None, which: str = "best") -> Target:
    """Find the recipe, stage and checkpoint folder from a checkpoint folder or a run folder.

    A run folder (``runs/<name>``, holding ``recipe.toml``) evaluates ``<stage>/<which>`` of its last
    stage that has one (or ``stage``). A checkpoint folder (holding ``model.safetensors``) takes its
    stage from ``state.json`` or its parent folder's name, and its recipe from ``--recipe`` or the run
    folder above it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if is_export(path):  # an exported model carries its own recipe
        return export_target(path, list(overrides))
    if path.is_file():
        if path.name == WEIGHTS:
            path = path.parent
        else:
            raise CheckpointError(f"{path}: expected a checkpoint folder (holding {WEIGHTS}) or a run folder "
                                  f"(holding recipe.toml), got a file")
    run_dir: Path | None
    ckpt: Path | None = None
    stage_name = stage
    if _is_checkpoint(path):
        path = ckpt = resolve(path)
        run_dir = path.parent.parent if (path.parent.parent / "recipe.toml").is_file() else None
        if stage_name is None:
            try:
                stage_name = json.loads((path / STATE).read_text()).get("stage")
            except (OSError, json.JSONDecodeError):
                stage_name = None
            stage_name = stage_name or path.parent.name
    elif (path / "recipe.toml").is_file():
        run_dir = path
    else:
        raise CheckpointError(f"{path}: neither a checkpoint folder (no {WEIGHTS}) nor a run folder (no recipe.toml)")
    from_run_folder = recipe_path is None
    if recipe_path is None:
        if run_dir is None:
            raise RecipeError([f"{path}: the checkpoint is not inside a run folder with recipe.toml; "
                               f"pass the recipe that built it with --recipe"])
        recipe_path = run_dir / "recipe.toml"
    # A run folder's recipe is data: its plugins are imported only when allowed (see load_recipe_plugins).
    recipe = load_recipe(recipe_path, list(overrides), run_folder=run_dir if from_run_folder else None)
    load_recipe_plugins(recipe)
    all_stages = stages(recipe)
    if ckpt is None:
        assert run_dir is not None
        if stage_name is not None:
            chosen = _stage_named(recipe, stage_name, "--stage")
        else:
            done = [s for s in all_stages if _is_checkpoint(run_dir / s.name / which)]
            if not done:
                raise CheckpointError(f"{run_dir}: no stage has a {which!r} checkpoint yet "
                                      f"(looked for {run_dir}/<stage>/{which}/{WEIGHTS})")
            chosen = done[-1]
        ckpt = resolve(run_dir / chosen.name / which)
        if not _is_checkpoint(ckpt):
            raise CheckpointError(f"{ckpt}: checkpoint not found ({WEIGHTS} missing); train stage {chosen.name} first")
    else:
        names = [s.name for s in all_stages]
        chosen = _stage_named(recipe, stage_name, str(ckpt)) if stage_name in names or stage else all_stages[-1]
    return Target(recipe, chosen, ckpt, run_dir)


def data_options_with_defaults(recipe: Recipe, stage: Stage) -> dict[str, Any]:
    """The stage's data options, completed with the dataset plugin's own keyword defaults, so what
    the data used is known even for options the recipe left out (views, geometry, hu_window, ...)."""
    opts = data_options(recipe, stage)
    reg = get_plugin_manager().registry("dataset")
    if opts.get("name") not in reg:
        return opts
    factory = reg.get(opts["name"]).factory
    try:
        params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters
    except (TypeError, ValueError):
        return opts
    out = {k: p.default for k, p in params.items()
           if k not in ("self", "split", "stage") and p.default is not inspect.Parameter.empty}
    out.update(opts)
    return out


def hu_window_of(recipe: Recipe, stage: Stage) -> tuple[float, float]:
    """The HU window that scales the stage's data to [0, 1]: the recipe's, else the dataset's default."""
    hw = data_options_with_defaults(recipe, stage).get("hu_window") or DEFAULT_HU_WINDOW
    return float(hw[0]), float(hw[1])


# ---- export folders (written by x2ct_framework.export) ---------------------------------------------
CONFIG = "config.json"
FORMAT = "x2ct-framework-export"
FORMAT_VERSION = 1


def is_export(path: str | Path) -> bool:
    """A folder written by :func:`export` (its ``config.json`` says so)."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such exported model folder")
    if not is_export(folder):
        raise CheckpointError(f"{folder}: not an exported model (no {CONFIG} with format {FORMAT!r}); "
                              f"write one with `x2ct export RUN_OR_CHECKPOINT {folder}`")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG}: format version {cfg['format_version']} is newer than this "
                              f"framework reads ({FORMAT_VERSION}); upgrade x2ct-framework")
    return cfg


def export_target(folder: str | Path, overrides: list[str] = ()):
    """The :class:`x2ct_framework.runs.Target` of an export folder (its recipe, stage and weights)."""
    folder = Path(folder)
    cfg = read_config(folder)
    recipe = load_recipe(folder / cfg["recipe"], list(overrides), run_folder=folder)  # data, like a run folder
    chosen = [s for s in stages(recipe) if s.name == cfg["stage"]["name"]]
    if not chosen:
        raise CheckpointError(f"{folder / CONFIG}: stage {cfg['stage']['name']!r} is not in {folder / cfg['recipe']}")
    return Target(recipe, chosen[0], folder, None)

"""The cascade: a stage with ``cascade = true`` receives the previous stage's prediction as ``prev``.

By default stages are chained by weights only (stage k starts from stage k-1's best checkpoint).
With ``stages.N.cascade = true`` the previous stage's best model is also kept, frozen, beside stage
N's model: it reconstructs the volume at its own (coarser) resolution from the same X-rays, and
stage N's model gets that volume as ``model(xrays, geometry, prev=...)`` (``vit_cascade`` and
``cnn_baseline`` refine a residual over it). If the previous stage cascades too, its own previous
stage runs first, and so on: the chain is the one the stages were trained with.

The frozen stages see the X-rays at the size they were trained on (the stage's ``data.image_size``,
else its resolution; a bilinear resize when the current stage renders larger ones). Their weights
come from ``<run>/<stage>/best`` (or ``train.init_from`` when training starts right after that
stage). Before a recipe's first stage, the previous stage is ``train.init_from`` itself, built with
the ``recipe.toml`` of the run folder that trained it: the seed's ``stage2_extended`` (one stage,
initialised from ``runs/stage1/stage1/best``) cascades from stage 1 that way.

The trainer, ``x2ct evaluate`` and ``x2ct predict`` all build the chain with :func:`previous_stages`,
so a checkpoint is always scored with the ``prev`` it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import build_model, data_options, stages
from x2ct_framework.errors import CheckpointError, RecipeError
from x2ct_framework.config.recipe import Recipe
from x2ct_framework.runs import resolve_target
from x2ct_framework.stage import Stage


def image_size(recipe: Recipe, stage: Stage) -> int:
    """The X-ray size a stage's data renders: its ``data.image_size``, else its resolution."""
    return int(data_options(recipe, stage).get("image_size") or stage.resolution)


def resize_xrays(xrays: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, V, 1, H, W]`` X-rays resized to ``size^2`` (bilinear, antialiased when shrinking)."""
    b, v, c, h, w = xrays.shape
    if (h, w) == (size, size):
        return xrays
    flat = xrays.reshape(b * v, c, h, w)
    out = F.interpolate(flat.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < max(h, w))
    return out.to(xrays.dtype).reshape(b, v, c, size, size)


class PreviousStages(nn.Module):
    """The frozen models of the earlier stages, in order; ``forward`` returns the last one's volume."""

    def __init__(self, models: list[nn.Module], sizes: list[int], names: list[str]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.sizes, self.names = list(sizes), list(names)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PreviousStages:
        return super().train(False)  # always in eval mode: dropout off, normalisation frozen

    @torch.no_grad()
    def forward(self, xrays: torch.Tensor, geometry: dict) -> torch.Tensor:
        prev = None
        for model, size in zip(self.models, self.sizes):
            args = (resize_xrays(xrays, size), geometry)
            prev = model(*args) if prev is None else model(*args, prev=prev)
        return prev

    def describe(self) -> str:
        return " -> ".join(f"{n} ({s}^2 X-rays)" for n, s in zip(self.names, self.sizes))


def _stage_where(recipe: Recipe, stage: Stage) -> str:
    return recipe.where("stages", stage.index - 1, "cascade")


def _link_before(recipe: Recipe, stage: Stage, run_dir: Path | None) -> tuple[Recipe, Stage, Path, Path | None]:
    """The stage before ``stage``: (its recipe, the stage, its best checkpoint, its run folder).

    Within a recipe it is the stage before, at ``<run>/<stage>/best`` (or ``train.init_from`` when
    training starts right after it). Before a recipe's first stage it is ``train.init_from``, a best
    checkpoint inside the run folder that made it (whose ``recipe.toml`` builds its model).
    """

    train = recipe["train"]
    where = _stage_where(recipe, stage)
    if stage.index > 1:
        before = stages(recipe)[stage.index - 2]
        tried = []
        if run_dir is not None:
            path = Path(run_dir) / before.name / "best"
            if ckpt.exists(path):
                return recipe, before, path, run_dir
            tried.append(str(path))
        if train["init_from"] and before.index == train["start_stage"] - 1:
            path = Path(train["init_from"])
            if ckpt.exists(path):
                return recipe, before, path, run_dir
            tried.append(f"{path} ({recipe.where('train', 'init_from')})")
        raise CheckpointError(f"{where}: the cascade needs {before.name}'s best checkpoint and found none (looked "
                              f"at {', '.join(tried) or 'no run folder'}); train {before.name} first")
    if not train["init_from"]:
        raise RecipeError([f"{where}: {stage.name} is the recipe's first stage, so its previous stage must come "
                           f"from train.init_from (a best checkpoint inside the run folder that trained it); "
                           f"set train.init_from, or cascade = false"])
    path = Path(train["init_from"])
    if not ckpt.exists(path):
        raise CheckpointError(f"{where}: the cascade loads the previous stage from {path} "
                              f"({recipe.where('train', 'init_from')}), which holds no checkpoint")
    if not (path.parent.parent / "recipe.toml").is_file():
        raise CheckpointError(f"{where}: the cascade needs the recipe of the model in {path} and found no "
                              f"{path.parent.parent / 'recipe.toml'}; point train.init_from at a "
                              f"<run>/<stage>/best folder")
    target = resolve_target(path)
    return target.recipe, target.stage, target.checkpoint, target.run_dir


def previous_stages(recipe: Recipe, stage: Stage, run_dir: Path | None,
                    device: torch.device | str = "cpu") -> PreviousStages | None:
    """The frozen chain that feeds ``stage`` its ``prev``; ``None`` when the stage does not cascade."""
    if not stage.options.get("cascade", False):
        return None
    links = []
    cur_recipe, cur_stage, cur_run = recipe, stage, run_dir
    while cur_stage.options.get("cascade", False):  # walk back while the stages cascade
        link = _link_before(cur_recipe, cur_stage, cur_run)
        if any(link[2].resolve() == seen[2].resolve() for seen in links):
            raise RecipeError([f"{_stage_where(recipe, stage)}: the cascade loops back to {link[2]}"])
        links.insert(0, link)
        cur_recipe, cur_stage, _, cur_run = link
    models, sizes, names = [], [], []
    for link_recipe, earlier, path, _ in links:
        model = build_model(link_recipe, earlier)
        try:
            ckpt.load_into(model, path, strict=True)
        except CheckpointError as exc:
            raise CheckpointError(f"the cascade of {stage.name} ({_stage_where(recipe, stage)}) loads {earlier.name} "
                                  f"from {path}: {exc}") from exc
        models.append(model)
        sizes.append(image_size(link_recipe, earlier))
        names.append(f"{earlier.name} from {path}")
    return PreviousStages(models, sizes, names).to(device)


class CascadeModel(nn.Module):
    """A stage's model together with the chain that feeds it: ``model(xrays, geometry)`` end to end."""

    def __init__(self, previous: PreviousStages, model: nn.Module):
        super().__init__()
        self.previous, self.model = previous, model

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        if prev is None:
            prev = self.previous(xrays, geometry)
        return self.model(xrays, geometry, prev=prev)

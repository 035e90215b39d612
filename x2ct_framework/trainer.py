"""The progressive trainer: one readable loop over stages, epochs and batches on Accelerate."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from .build import build_dataset, build_losses, build_metrics, build_model, load_recipe_plugins, stages
from .checkpoint import load_into, save_checkpoint
from .errors import CheckpointError
from .plugins import get_plugin_manager
from .recipe import Recipe
from .stage import Stage
from .viz import save_preview


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int = 0) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``: linear warm-up then cosine."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out


class LossParts:
    """The trainable parts of one loss term (e.g. a discriminator) and their own optimizer.

    Read generically through the loss contract: ``trainable_parts()``, ``configure_optimizer(params)``
    and ``parts_loss(pred_detached, target, batch, *, epoch, step)``.
    """

    def __init__(self, name: str, loss: torch.nn.Module, accelerator: Accelerator):
        self.name, self.loss, self.acc = name, loss, accelerator
        self.module: torch.nn.Module = loss.trainable_parts()
        self.module.to(accelerator.device)
        self.optimizer = accelerator.prepare_optimizer(loss.configure_optimizer(self.module.parameters()))
        self.pending = False
        self.last: float | None = None

    def freeze(self, frozen: bool) -> None:
        self.module.requires_grad_(not frozen)

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict, epoch: int, step: int) -> None:
        """Backpropagate the parts' objective for this micro-batch; step their optimizer when gradients sync."""
        self.freeze(False)
        with self.acc.autocast():
            objective = self.loss.parts_loss(pred.detach(), target, batch, epoch=epoch, step=step)
        if objective is not None:
            self.acc.backward(objective)
            self.pending = True
            self.last = objective.detach().float().item()
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

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])


class Trainer:
    """Runs the recipe's stages in order; each stage starts from the previous stage's best."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None):
        self.recipe = recipe
        train = recipe["train"]
        # cpu=True when no GPU is visible makes torchrun-started processes use gloo (MULTI_CPU).
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=train["grad_accum"], mixed_precision=train["mixed_precision"],
            cpu=not torch.cuda.is_available())
        self.run_dir = Path(recipe["output_dir"]) / recipe.name
        self.pm = get_plugin_manager()
        load_recipe_plugins(recipe)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def write_run_info(self) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.toml").write_text(self.recipe.to_toml())
        env = {"x2ct_framework": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
               "platform": platform.platform(), "processes": self.accelerator.num_processes,
               "device": str(self.accelerator.device), "mixed_precision": self.accelerator.mixed_precision,
               "plugins": dict(self.pm.distributions)}
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=2))

    def run(self) -> dict[str, Any]:
        self.write_run_info()
        all_stages = stages(self.recipe)
        start = self.recipe["train"]["start_stage"]
        results = {}
        prev_best: Path | None = Path(self.recipe["train"]["init_from"]) if self.recipe["train"]["init_from"] else None
        if prev_best is None and start > 1:
            prev_best = self.run_dir / all_stages[start - 2].name / "best"
            if not (prev_best / "model.safetensors").is_file():
                raise CheckpointError(
                    f"stage {start} ({all_stages[start - 1].name}) starts from {prev_best}, which does not exist; "
                    f"train {all_stages[start - 2].name} first (this recipe with --set train.start_stage={start - 1}) "
                    f"or set train.init_from to a checkpoint folder")
        for stage in all_stages[start - 1:]:
            results[stage.name] = self.train_stage(stage, init_from=prev_best)
            prev_best = self.run_dir / stage.name / "best"
        if self.is_main:
            self.pm.hook.on_run_end(trainer=self, results=results)
        self.print(f"outputs: {self.run_dir.resolve()}")
        return results

    def train_stage(self, stage: Stage, init_from: Path | None = None) -> dict[str, float]:
        acc, recipe, opts = self.accelerator, self.recipe, stage.options
        train = recipe["train"]
        set_seed(recipe["seed"] + stage.index)
        model = build_model(recipe, stage)
        if init_from is not None:
            load_into(model, init_from, strict=False)
        losses = build_losses(recipe, stage)
        metrics = build_metrics(recipe)
        batch_size = opts["batch_size"] or train["batch_size"]
        g = torch.Generator().manual_seed(recipe["seed"] + stage.index)
        train_dl = DataLoader(build_dataset(recipe, stage, "train"), batch_size=batch_size, shuffle=True,
                              generator=g, num_workers=train["num_workers"], drop_last=False)
        val_dl = DataLoader(build_dataset(recipe, stage, "val"), batch_size=batch_size, shuffle=False,
                            num_workers=train["num_workers"])
        params = [p for n, p in model.named_parameters() if not any(n.startswith(f) for f in opts["freeze"])]
        optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
        model, optimizer, train_dl, val_dl = acc.prepare(model, optimizer, train_dl, val_dl)
        losses = losses.to(acc.device)
        loss_parts = [LossParts(t.name, t.module, acc) for t in losses.trainable()]
        steps_per_epoch = math.ceil(len(train_dl) / train["grad_accum"])
        if train["max_steps_per_epoch"]:
            steps_per_epoch = min(steps_per_epoch, train["max_steps_per_epoch"])
        total_steps = steps_per_epoch * opts["epochs"]
        stage_dir = self.run_dir / stage.name
        if self.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
        self.print(f"[{stage.name}] {opts['epochs']} epochs x {steps_per_epoch} steps, resolution "
                   f"{stage.resolution}^3, global batch {batch_size * acc.num_processes * train['grad_accum']}")
        self.pm.hook.on_stage_start(trainer=self, stage=stage)
        step, best, last_metrics = 0, -math.inf, {}
        log_path = stage_dir / "metrics.jsonl"
        bar = tqdm(total=total_steps, desc=stage.name, disable=not (self.is_main and train["progress"]),
                   dynamic_ncols=True)
        for epoch in range(opts["epochs"]):
            model.train()
            epoch_steps = 0
            for batch in train_dl:
                with acc.accumulate(model):
                    for lp in loss_parts:
                        lp.freeze(True)  # the generator objective reaches the parts' input only
                    pred = model(batch["xrays"], batch["geometry"])
                    loss, parts = losses(pred, batch["ct"], batch, epoch=epoch)
                    acc.backward(loss)
                    if acc.sync_gradients and train["max_grad_norm"]:
                        acc.clip_grad_norm_(model.parameters(), train["max_grad_norm"])
                    lr = cosine_lr(step, total_steps, opts["lr"], opts["min_lr"], opts["warmup_steps"])
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad()
                    for lp in loss_parts:
                        lp.update(pred, batch["ct"], batch, epoch, step)
                if acc.sync_gradients:
                    step += 1
                    epoch_steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                    if self.is_main and (step % train["log_every"] == 0 or step == total_steps):
                        row = {"stage": stage.name, "epoch": epoch, "step": step, "lr": lr,
                               "train/loss": loss.item(), **{f"train/{k}": v.item() for k, v in parts.items()},
                               **{f"train/{lp.name}/parts_loss": lp.last for lp in loss_parts if lp.last is not None}}
                        with log_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    if epoch_steps >= steps_per_epoch:
                        break
            if (epoch + 1) % opts["val_every"] == 0 or epoch + 1 == opts["epochs"]:
                last_metrics = self.validate(model, val_dl, metrics, stage, epoch)
                if self.is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps({"stage": stage.name, "epoch": epoch, "step": step, **last_metrics}) + "\n")
                score = last_metrics.get(opts["select_best"], -math.inf)
                state = {"stage": stage.name, "epoch": epoch + 1, "step": step, "metrics": last_metrics}
                if self.is_main:
                    unwrapped = acc.unwrap_model(model)
                    trainer_state = {"parts": {lp.name: lp.state_dict() for lp in loss_parts}}
                    save_checkpoint(stage_dir / "last", unwrapped, state, trainer_state)
                    if score > best:
                        best = score
                        save_checkpoint(stage_dir / "best", unwrapped, state, trainer_state)
            self.pm.hook.on_epoch_end(trainer=self, stage=stage, epoch=epoch, metrics=last_metrics)
        bar.close()
        acc.wait_for_everyone()
        self.pm.hook.on_stage_end(trainer=self, stage=stage, metrics=last_metrics)
        self.print(f"[{stage.name}] " + ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
        return last_metrics

    @torch.no_grad()
    def validate(self, model, val_dl, metrics: dict, stage: Stage, epoch: int) -> dict[str, float]:
        acc = self.accelerator
        model.eval()
        sums: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
        first = None
        for batch in val_dl:
            pred = model(batch["xrays"], batch["geometry"]).clamp(0, 1)
            for name, fn in metrics.items():
                sums[name].append(acc.gather_for_metrics(fn(pred, batch["ct"], batch)))
            if first is None:
                first = (pred[0], batch["ct"][0], batch["xrays"][0])
        out = {f"val/{k}": torch.cat(v).mean().item() for k, v in sums.items()}
        if self.is_main and self.recipe["eval"]["preview"] and first is not None:
            save_preview(self.run_dir / stage.name / "previews" / f"epoch{epoch + 1:04d}.png", *first[:2],
                         xrays=first[2], title=f"{stage.name} epoch {epoch + 1}: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
        return out


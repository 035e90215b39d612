"""The progressive trainer: one readable loop over stages, epochs and batches on Accelerate.

Read top to bottom: :meth:`Trainer.run` walks the recipe's stages (stage k starts from stage k-1's
``best``); :meth:`Trainer.train_stage` builds the stage's components, restores an interrupted stage
with ``--resume``, and runs the epoch loop (accumulate -> backward -> clip -> step -> schedule ->
EMA -> log), validating, checkpointing and plotting as it goes. Plugins see the named events of
``hookspecs.py``; nothing else is overridable.

Exact resume: the data order of epoch ``e`` depends only on the seed, the stage and ``e``, and a
checkpoint holds the optimizer, scheduler, scaler, EMA, trainable loss parts and every process's
RNG states, so a run killed mid-stage and resumed with ``--resume`` ends with the same weights as an
uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from x2ct_framework import __version__
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import (build_dataset, build_losses, build_metrics, build_model, load_recipe_plugins, model_options,
                    stages)
from x2ct_framework.datacheck import guard_stored_geometry
from x2ct_framework.training.cascade import PreviousStages, previous_stages
from x2ct_framework.errors import CheckpointError, RecipeError, X2CTError
from x2ct_framework.training.logbook import Logbook
from x2ct_framework.config.optim import Schedule, lr_at, lr_factor, make_optimizer
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.config.recipe import Recipe
from x2ct_framework.stage import Stage
from x2ct_framework.viz import save_preview

LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "lpips", "error", "nmse")


class TrainingDiverged(X2CTError):
    """Too many non-finite losses or gradients in a stage; the last good checkpoint is kept."""

    exit_code = 3


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int = 0) -> float:
    """Learning rate of optimizer update ``step`` (see :func:`x2ct_framework.config.optim.lr_at`)."""
    return lr_at(step, total, lr, min_lr, warmup)


class EpochSampler(Sampler[int]):
    """A shuffle whose order depends only on (seed, epoch), so a resumed run sees the same batches.

    ``limit`` keeps the first cases of each epoch's order (``train.max_steps_per_epoch``).
    """

    def __init__(self, size: int, seed: int, limit: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self.limit = min(limit, size) if limit else size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g)[: self.limit].tolist())

    def __len__(self) -> int:
        return self.limit


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_mode(metric: str, mode: str) -> str:
    if mode != "auto":
        return mode
    name = metric.split("/", 1)[-1].lower()
    return "min" if any(word in name for word in LOWER_IS_BETTER) else "max"


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """The recipe as flat scalar key/values for trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flat_config(v, f"{prefix}.{i + 1}"))
    elif isinstance(data, (bool, int, float, str)):
        out[prefix] = data
    else:
        out[prefix] = str(data)
    return out


class StopRequest:
    """Ctrl-C (SIGINT) during training asks for a stop at the next consistent point instead of raising at once.

    The loop then saves ``last`` and raises ``KeyboardInterrupt``; a second Ctrl-C raises at once. With
    several processes the request is shared at every optimizer update so that all stop together.
    """

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping at the next optimizer update (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def now(self, acc: Accelerator) -> bool:
        if acc.num_processes == 1:
            return self.requested
        if not acc.sync_gradients:
            return False
        flag = torch.tensor([float(self.requested)], device=acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class LossParts:
    """The trainable parts of one loss term (e.g. a discriminator) and their own optimizer.

    Read generically through the loss contract: ``trainable_parts()``, ``configure_optimizer(params)``
    and ``parts_loss(pred_detached, target, batch, *, epoch, step)``. The parts are frozen while the
    model's objective is back-propagated (gradients still reach the prediction through them), then
    their own objective is back-propagated and their optimizer steps whenever gradients sync.
    """

    def __init__(self, name: str, loss: torch.nn.Module, accelerator: Accelerator):
        self.name, self.loss, self.acc = name, loss, accelerator
        self.module: torch.nn.Module = loss.trainable_parts()
        self.module.to(accelerator.device)
        self.optimizer = accelerator.prepare_optimizer(loss.configure_optimizer(self.module.parameters()))
        self.pending = False
        self.total, self.count = 0.0, 0

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
                              f"{step}; skipped", RuntimeWarning, stacklevel=2)
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


class Trainer:
    """Runs the recipe's stages in order; each stage starts from the previous stage's best."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None, resume: bool = False):
        self.recipe, self.resume = recipe, resume
        train = recipe["train"]
        self.run_dir = Path(recipe["output_dir"]) / recipe.name
        trackers = [t for t in train["trackers"] if t != "none"]
        _allow_new_precision(train["mixed_precision"])
        # cpu=True when no GPU is visible makes torchrun-started processes use gloo (MULTI_CPU).
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=train["grad_accum"], mixed_precision=train["mixed_precision"],
            cpu=not torch.cuda.is_available(), log_with=trackers or None, rng_types=[],
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        self.trackers = bool(trackers) and accelerator is None
        self.pm = get_plugin_manager()
        load_recipe_plugins(recipe)
        self.model: torch.nn.Module | None = None  # the stage's unwrapped model, for hooks
        self.previous: PreviousStages | None = None  # the frozen earlier stages of a cascading stage
        self._info_written = False

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def write_run_info(self) -> None:
        self._info_written = True
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.toml").write_text(self.recipe.to_run_toml())
        acc = self.accelerator
        self.pm.load_entry_points()  # loaded lazily: make sure "plugins" lists the installed ones too
        env = {"x2ct_framework": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
               "platform": platform.platform(), "processes": acc.num_processes,
               "distributed": str(acc.distributed_type), "device": str(acc.device),
               "mixed_precision": acc.mixed_precision, "plugins": dict(self.pm.distributions)}
        (self.run_dir / "environment.json").write_text(json.dumps(env, indent=2))

    # ---- the run: stages in order --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        recipe, train = self.recipe, self.recipe["train"]
        # recipe.toml describes the folder's checkpoints (evaluate rebuilds the model from it): over
        # existing ones it is rewritten only with this run's first checkpoint, so a run that fails early
        # leaves the folder as it was.
        if not any(ckpt.exists(p) for p in self.run_dir.glob("*/last")):
            self.write_run_info()
        if self.trackers:
            self.accelerator.init_trackers(recipe.name, config=flat_config(recipe.data))
        all_stages = stages(recipe)
        start = train["start_stage"]
        prev_best = self._first_init(all_stages, start)
        results = {}
        try:
            for stage in all_stages[start - 1:]:
                last = self.run_dir / stage.name / "last"
                resume_from = None
                if self.resume and ckpt.exists(last):
                    state = ckpt.load_state(last)
                    if state.get("complete"):
                        self.print(f"[{stage.name}] finished earlier ({ckpt.resolve(last)}); skipping")
                        results[stage.name] = state.get("metrics", {})
                        prev_best = self.run_dir / stage.name / "best"
                        continue
                    resume_from = ckpt.resolve(last)
                results[stage.name] = self.train_stage(stage, init_from=prev_best, resume_from=resume_from)
                prev_best = self.run_dir / stage.name / "best"
        finally:
            if self.trackers:
                self.accelerator.end_training()
        if self.is_main:
            self.pm.hook.on_run_end(trainer=self, results=results)
        self.print(f"outputs: {self.run_dir.resolve()}")
        return results

    def _first_init(self, all_stages: list[Stage], start: int) -> Path | None:
        """The checkpoint the first trained stage starts from; a missing one says what to run first."""
        recipe, train = self.recipe, self.recipe["train"]
        stage = all_stages[start - 1]
        if train["init_from"]:
            path = Path(train["init_from"])
            if not ckpt.exists(path):
                maker = self._init_recipe_hint(path)
                raise CheckpointError(
                    f"{stage.name} of {recipe.path.name} starts from {path} ({recipe.where('train', 'init_from')}), "
                    f"which does not exist or holds no checkpoint (expected {path / ckpt.WEIGHTS}). "
                    + (f"Make it first with:\n  accelerate launch -m x2ct_framework.run {maker}\n" if maker else "")
                    + "or point train.init_from at an existing checkpoint folder (--set train.init_from=PATH).")
            return path
        if start == 1:
            return None
        path = self.run_dir / all_stages[start - 2].name / "best"
        if not ckpt.exists(path):
            raise CheckpointError(
                f"{stage.name} (train.start_stage = {start}) starts from {path}, which does not exist. Train "
                f"{all_stages[start - 2].name} first:\n  accelerate launch -m x2ct_framework.run {_shown(recipe.path)} "
                f"--set train.start_stage={start - 1}\nor set train.init_from to a checkpoint folder.")
        return path

    def _init_recipe_hint(self, path: Path) -> str:
        train = self.recipe["train"]
        if train["init_from_recipe"]:
            return _shown(self.recipe.base_dir / train["init_from_recipe"])
        # runs/<name>/<stage>/best was made by the recipe called <name>.toml beside this one, if any.
        guess = self.recipe.base_dir / f"{path.parent.parent.name}.toml"
        return _shown(guess) if guess.is_file() else ""

    # ---- one stage -------------------------------------------------------------------------------
    def train_stage(self, stage: Stage, init_from: Path | None = None,
                    resume_from: Path | None = None) -> dict[str, float]:
        acc, recipe, opts, train = self.accelerator, self.recipe, stage.options, self.recipe["train"]
        where = lambda *k: recipe.where("stages", stage.index - 1, *k)  # noqa: E731
        seed = recipe["seed"] + stage.index
        set_seed(seed)
        accum = opts["grad_accum"] or train["grad_accum"]
        acc.gradient_accumulation_steps = accum
        stage_dir = self.run_dir / stage.name
        log = Logbook(stage_dir)

        # components
        model = build_model(recipe, stage)
        if init_from is not None and resume_from is None:
            report = ckpt.load_into(model, init_from, strict=False)
            skipped = report["missing"] + report["mismatched"]
            total = len(model.state_dict())
            if 2 * (total - len(skipped)) < total:
                raise CheckpointError(
                    f"{init_from} does not fit {stage.name}'s model {model_options(recipe, stage)['name']!r}: only "
                    f"{total - len(skipped)} of its {total} tensors match ({len(report['unexpected'])} unexpected, "
                    f"e.g. {'; '.join((report['unexpected'] + skipped)[:3])}); is it a checkpoint of another model?")
            self.print(f"[{stage.name}] initialised from {init_from}"
                       + (f" ({len(skipped)} tensors kept fresh: {'; '.join(skipped[:3])}"
                          f"{' ...' if len(skipped) > 3 else ''})" if skipped else ""))
        self.previous = previous_stages(recipe, stage, self.run_dir, acc.device)
        if self.previous is not None:
            self.print(f"[{stage.name}] cascade: prev comes from {self.previous.describe()}, frozen")
        params = self._trainable(model, opts["freeze"], where("freeze"))
        losses = build_losses(recipe, stage).to(acc.device)
        metrics = build_metrics(recipe)
        batch_size = opts["batch_size"] or train["batch_size"]
        global_batch = batch_size * acc.num_processes * accum
        scale = lr_factor(train["lr_scaling"], global_batch, train["reference_batch"])
        lr, min_lr = opts["lr"] * scale, opts["min_lr"] * scale
        train_set = build_dataset(recipe, stage, "train")
        guard_stored_geometry(train_set)  # stored X-rays must show the CT in the declared geometry
        val_set = build_dataset(recipe, stage, "val")
        cap = train["max_steps_per_epoch"] * accum * batch_size * acc.num_processes
        sampler = EpochSampler(len(train_set), seed, limit=cap)
        workers_seed = torch.Generator()  # reseeded each epoch: worker seeds follow (seed, epoch) too
        train_dl = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=train["num_workers"],
                              generator=workers_seed)
        val_dl = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=train["num_workers"])
        optimizer = make_optimizer(opts["optimizer"], params, lr, opts["weight_decay"], opts["optimizer_options"],
                                   where("optimizer"))
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train["ema"]["decay"]), use_buffers=True)
               if train["ema"]["enabled"] else None)
        # The scheduler is not handed to accelerate.prepare, which would step it once per process.
        model, optimizer, train_dl, val_dl = acc.prepare(model, optimizer, train_dl, val_dl)
        if ema is not None:
            ema.to(acc.device)
        loss_parts = [LossParts(t.name, t.module, acc) for t in losses.trainable()]
        steps_per_epoch = math.ceil(len(train_dl) / accum)
        total_steps = steps_per_epoch * opts["epochs"]
        scheduler = LambdaLR(optimizer.optimizer,
                             Schedule(total_steps, lr, min_lr, opts["warmup_steps"], opts["scheduler"],
                                      steps_per_epoch * opts["constant_epochs"]))
        metric = opts["select_best"]
        mode = best_mode(metric, opts["best_mode"])
        known = [f"val/{m}" for m in metrics] + ["val/loss"]
        if metric not in known:
            raise RecipeError([f"{where('select_best')}: {metric!r} is not measured; validation gives "
                               f"{', '.join(known)} (eval.metrics)"])
        self.model = acc.unwrap_model(model)

        # position in the stage (restored on resume)
        pos = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "nonfinite": 0,
               "best": {"metric": metric, "mode": mode, "value": None, "epoch": None}}
        last_metrics: dict[str, float] = {}
        if resume_from is not None:
            saved = ckpt.load_state(resume_from).get("resolution", stage.resolution)
            if saved != stage.resolution:
                raise CheckpointError(f"cannot resume {stage.name} from {resume_from}: it was trained at {saved}^3 and "
                                      f"the recipe now says {stage.resolution}^3 ({where('resolution')})")
            last_metrics = self._restore(resume_from, model, optimizer, scheduler, ema, loss_parts, pos)
            self.print(f"[{stage.name}] resuming from {resume_from}: epoch {pos['epoch']} of {opts['epochs']}, "
                       f"step {pos['step']} of {total_steps}")
            if self.is_main:
                log.truncate(pos["epoch"], pos["step"])
        elif self.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            for f in (log.jsonl, log.csv):
                f.unlink(missing_ok=True)
        acc.wait_for_everyone()

        self.print(f"[{stage.name}] {opts['epochs']} epochs x {steps_per_epoch} optimizer steps, resolution "
                   f"{stage.resolution}^3, {len(train_set)} train / {len(val_set)} val cases")
        self.print(f"[{stage.name}] global batch {global_batch} = per-device batch {batch_size} x "
                   f"{acc.num_processes} process(es) x grad_accum {accum}; {opts['optimizer']} lr {lr:g} -> {min_lr:g} "
                   f"({opts['scheduler']}, warm-up {opts['warmup_steps']} steps; lr_scaling {train['lr_scaling']}"
                   + (f" from reference batch {train['reference_batch']}, x{scale:g}" if scale != 1 else "")
                   + f"); mixed precision {acc.mixed_precision}; best by {metric} ({mode})")
        self.pm.hook.on_stage_start(trainer=self, stage=stage)
        bar = tqdm(total=total_steps, initial=pos["step"], desc=stage.name, dynamic_ncols=True,
                   disable=not (self.is_main and train["progress"]))
        window = {"count": 0}  # sums of the logged quantities since the last log row
        at_sync = {"rng": None, "batch_in_epoch": pos["batch_in_epoch"], "consistent": True}
        stop = StopRequest()
        try:
            for epoch in range(pos["epoch"], opts["epochs"]):
                model.train()
                train_dl.set_epoch(epoch)
                sampler.set_epoch(epoch)
                workers_seed.manual_seed(seed * 1_000_003 + epoch)
                loader = acc.skip_first_batches(train_dl, pos["batch_in_epoch"]) if pos["batch_in_epoch"] else train_dl
                at_sync.update(rng=None, batch_in_epoch=pos["batch_in_epoch"])
                bad_window = False
                for batch in loader:
                    pos["batch_in_epoch"] += 1
                    with acc.accumulate(model):
                        for lp in loss_parts:
                            lp.freeze(True)  # the model's objective reaches the parts' input only
                        pred = self.forward(model, batch)
                        loss, terms = losses(pred, batch["ct"], batch, epoch=epoch)
                        if self._all_finite(loss):
                            acc.backward(loss)
                            self._add(window, loss, terms)
                        else:
                            bad_window = True
                        if acc.sync_gradients:
                            at_sync["consistent"] = False  # weights change before the position does
                            lr_now = optimizer.param_groups[0]["lr"]
                            norm = acc.clip_grad_norm_(model.parameters(), train["max_grad_norm"] or math.inf) \
                                if not bad_window else None
                            if bad_window or not torch.isfinite(torch.as_tensor(norm)).item():
                                optimizer.zero_grad(set_to_none=True)
                                self._nonfinite(stage, pos, epoch, train["max_nonfinite_steps"])
                            else:
                                optimizer.step()
                                window["grad_norm"] = window.get("grad_norm", 0.0) + float(norm)
                            scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                        if not bad_window:
                            for lp in loss_parts:
                                lp.update(pred, batch["ct"], batch, epoch, pos["step"])
                    if acc.sync_gradients:
                        if ema is not None and not bad_window:
                            ema.update_parameters(acc.unwrap_model(model))
                        bad_window = False
                        pos["step"] += 1
                        window["syncs"] = window.get("syncs", 0) + 1
                        bar.update(1)
                        if pos["step"] % train["log_every"] == 0 or pos["step"] == total_steps:
                            row = self._log_train(stage, log, window, loss_parts, epoch, pos["step"], lr_now)
                            bar.set_postfix(loss=f"{row.get('train/loss', float('nan')):.4f}")
                        at_sync.update(rng=rng_state(), batch_in_epoch=pos["batch_in_epoch"], consistent=True)
                    if stop.now(acc):
                        raise KeyboardInterrupt
                pos["epoch"], pos["batch_in_epoch"] = epoch + 1, 0
                at_sync.update(rng=None, batch_in_epoch=0)
                done = epoch + 1
                if done % opts["val_every"] == 0 or done == opts["epochs"]:
                    last_metrics = self.validate(ema.module if ema is not None else model, val_dl, metrics, losses,
                                                 stage, done, batch_xrays=True)
                    self._log(stage, log, {"kind": "val", "stage": stage.name, "epoch": done, "step": pos["step"],
                                           **last_metrics}, pos["step"])
                    improved = self._improved(pos["best"], last_metrics.get(metric), done)
                else:
                    improved = False
                self._save(stage, "last", model, optimizer, scheduler, ema, loss_parts, pos, last_metrics,
                           complete=done == opts["epochs"], best=improved,
                           periodic=bool(opts["checkpoint_every"]) and done % opts["checkpoint_every"] == 0)
                self.pm.hook.on_epoch_end(trainer=self, stage=stage, epoch=epoch, metrics=last_metrics)
                if stop.now(acc):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            stop.restore()
            if at_sync["consistent"]:
                self._save_interrupted(stage, model, optimizer, scheduler, ema, loss_parts, pos, at_sync, last_metrics)
            else:
                self.print(f"[{stage.name}] interrupted inside an optimizer update; the last checkpoint "
                           f"({self.run_dir / stage.name / 'last'}) is kept; continue with --resume")
            raise
        stop.restore()
        bar.close()
        acc.wait_for_everyone()
        if self.is_main:
            log.write_csv()
            log.plot(stage_dir / "curves.png", title=f"{recipe.name}: {stage.name}")
        self.pm.hook.on_stage_end(trainer=self, stage=stage, metrics=last_metrics)
        best = pos["best"]
        self.print(f"[{stage.name}] done: " + ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items())
                   + (f"; best {metric} {best['value']:.4f} at epoch {best['epoch']}" if best["value"] is not None
                      else ""))
        return last_metrics

    # ---- pieces of the loop ----------------------------------------------------------------------
    def _trainable(self, model: torch.nn.Module, prefixes: list[str], where: str) -> list[torch.nn.Parameter]:
        names = [n for n, _ in model.named_parameters()]
        unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise RecipeError([f"{where}: {', '.join(map(repr, unknown))} matches no parameter of the model "
                               f"(top-level modules: {', '.join(tops)})"])
        params = []
        for n, p in model.named_parameters():
            if any(n.startswith(f) for f in prefixes):
                p.requires_grad_(False)
            elif p.requires_grad:
                params.append(p)
        if not params:
            raise RecipeError([f"{where}: every parameter is frozen; nothing would train"])
        return params

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (they must agree to skip a step together)."""
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _nonfinite(self, stage: Stage, pos: dict, epoch: int, limit: int) -> None:
        pos["nonfinite"] += 1
        last = self.run_dir / stage.name / "last"
        if pos["nonfinite"] > limit:
            raise TrainingDiverged(
                f"{stage.name}: the loss or gradient was not finite at {pos['nonfinite']} optimizer steps "
                f"(limit train.max_nonfinite_steps = {limit}); stopped at epoch {epoch + 1}, step {pos['step'] + 1}. "
                + (f"The last good checkpoint is {last} (epoch {ckpt.load_state(last)['epoch']}). "
                   if ckpt.exists(last) else "No checkpoint of this stage was written yet. ")
                + "Try a lower lr, a larger warmup_steps, max_grad_norm, or mixed_precision = \"bf16\" or \"no\".")
        warnings.warn(f"{stage.name}: non-finite loss or gradient at epoch {epoch + 1}, step {pos['step'] + 1}; "
                      f"update skipped ({pos['nonfinite']} of at most {limit})", RuntimeWarning, stacklevel=2)

    def _add(self, window: dict, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        window["count"] += 1
        window["train/loss"] = window.get("train/loss", 0.0) + loss.detach().float().item()
        for k, v in terms.items():
            window[f"train/{k}"] = window.get(f"train/{k}", 0.0) + v.float().item()

    def _log_train(self, stage: Stage, log: Logbook, window: dict, loss_parts: list[LossParts], epoch: int,
                   step: int, lr: float) -> dict:
        """Average the window over its micro-batches (and processes) and write one row."""
        acc = self.accelerator
        count, syncs = window.pop("count"), window.pop("syncs", 1)
        norm = window.pop("grad_norm", None)
        keys = sorted(window)
        values = torch.tensor([window[k] / max(count, 1) for k in keys], dtype=torch.float64)
        if acc.num_processes > 1 and keys:
            values = acc.reduce(values.to(acc.device), "mean").cpu()
        row = {"kind": "train", "stage": stage.name, "epoch": epoch + 1, "step": step, "lr": lr,
               **dict(zip(keys, values.tolist()))}
        if norm is not None:
            row["train/grad_norm"] = norm / syncs
        for lp in loss_parts:
            mean = lp.take_mean()
            if mean is not None:
                row[f"train/{lp.name}/parts_loss"] = mean
        window.clear()
        window["count"] = 0
        self._log(stage, log, row, step)
        return row

    def _log(self, stage: Stage, log: Logbook, row: dict, step: int) -> None:
        if self.is_main:
            log.append(row)
        if self.trackers:
            self.accelerator.log({f"{stage.name}/{k}": v for k, v in row.items()
                                  if isinstance(v, (int, float)) and k not in ("epoch", "step")}, step=step)

    @staticmethod
    def _improved(best: dict, value: float | None, epoch: int) -> bool:
        if value is None or not math.isfinite(value):
            return False
        old = best["value"]
        better = old is None or (value > old if best["mode"] == "max" else value < old)
        if better:
            best["value"], best["epoch"] = value, epoch
        return better

    # ---- validation ------------------------------------------------------------------------------
    def forward(self, model, batch: dict) -> torch.Tensor:
        """The stage's model on a batch; with ``cascade``, the earlier stages' prediction is its ``prev``."""
        if self.previous is None:
            return model(batch["xrays"], batch["geometry"])
        return model(batch["xrays"], batch["geometry"], prev=self.previous(batch["xrays"], batch["geometry"]))

    @torch.no_grad()
    def validate(self, model, val_dl, metrics: dict, losses, stage: Stage, epoch: int,
                 batch_xrays: bool = True) -> dict[str, float]:
        """Metrics over the whole validation split, gathered across processes; a preview of its first case."""
        acc = self.accelerator
        model.eval()
        values: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        loss_n = torch.zeros((), dtype=torch.float64, device=acc.device)
        first = None
        for batch in val_dl:
            with acc.autocast():
                pred = self.forward(model, batch).float()
                loss, _ = losses(pred, batch["ct"], batch, epoch=epoch - 1)
            n = pred.shape[0]
            loss_sum += loss.double() * n
            loss_n += n
            pred = pred.clamp(0, 1)
            for name, fn in metrics.items():
                values[name].append(acc.gather_for_metrics(fn(pred, batch["ct"], batch).float()))
            if first is None:
                first = (pred[0], batch["ct"][0], batch["xrays"][0] if batch_xrays else None)
        out = {f"val/{k}": torch.cat(v).mean().item() for k, v in values.items() if v}
        if acc.num_processes > 1:
            loss_sum, loss_n = acc.reduce(loss_sum, "sum"), acc.reduce(loss_n, "sum")
        out["val/loss"] = (loss_sum / loss_n.clamp_min(1)).item()
        if self.is_main and self.recipe["eval"]["preview"] and first is not None:
            save_preview(self.run_dir / stage.name / "previews" / f"epoch{epoch:04d}.png", first[0], first[1],
                         xrays=first[2], title=f"{stage.name} epoch {epoch}: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
        model.train()
        return out

    # ---- checkpoints -----------------------------------------------------------------------------
    def _trainer_state(self, model, optimizer, scheduler, ema, loss_parts, pos, rng) -> dict:
        acc = self.accelerator
        state = {"position": dict(pos), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng, "parts": {lp.name: lp.state_dict() for lp in loss_parts}}
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        if ema is not None:
            state["ema"] = ema.state_dict()
            state["model"] = acc.get_state_dict(model)  # raw weights; model.safetensors holds the EMA
        return state

    def _save(self, stage, kind, model, optimizer, scheduler, ema, loss_parts, pos, metrics, *, complete: bool,
              best: bool, periodic: bool) -> None:
        """Write ``last`` (full trainer state) and, when due, ``best`` (weights) and a periodic copy of ``last``."""
        acc = self.accelerator
        rng = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        weights = ema.module.state_dict() if ema is not None else acc.get_state_dict(model)
        trainer_state = self._trainer_state(model, optimizer, scheduler, ema, loss_parts, pos, rng)
        if not self._info_written:
            self.write_run_info()
        if self.is_main:
            stage_dir = self.run_dir / stage.name
            state = {"stage": stage.name, "stage_index": stage.index, "recipe": self.recipe.name,
                     "resolution": stage.resolution, "epoch": pos["epoch"], "step": pos["step"], "batch_in_epoch": pos["batch_in_epoch"],
                     "metrics": metrics, "best": pos["best"], "complete": complete,
                     "weights": "ema" if ema is not None else "model"}
            path = ckpt.save_checkpoint(stage_dir / kind, weights, state, trainer_state)
            self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind=kind)
            if best:
                path = ckpt.save_checkpoint(stage_dir / "best", weights, state)
                self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind="best")
            if periodic:
                path = ckpt.copy_checkpoint(stage_dir / kind, stage_dir / f"epoch{pos['epoch']:04d}")
                self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind="periodic")
        acc.wait_for_everyone()

    def _save_interrupted(self, stage, model, optimizer, scheduler, ema, loss_parts, pos, at_sync, metrics) -> None:
        """Ctrl-C: save ``last`` at the last finished optimizer update, without collectives, then stop."""
        acc = self.accelerator
        if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            self.print(f"[{stage.name}] interrupted; no checkpoint written ({acc.distributed_type} needs all "
                       f"processes to save); --resume continues from the last epoch's checkpoint")
            return
        if not self._info_written:
            self.write_run_info()
        if not self.is_main:
            return
        pos = dict(pos, batch_in_epoch=at_sync["batch_in_epoch"])
        rng = [at_sync["rng"] or rng_state()]
        weights = (ema.module.state_dict() if ema is not None else acc.unwrap_model(model).state_dict())
        state_t = self._trainer_state(model, optimizer, scheduler, ema, loss_parts, pos, rng)
        if ema is not None:
            state_t["model"] = acc.unwrap_model(model).state_dict()
        state = {"stage": stage.name, "stage_index": stage.index, "recipe": self.recipe.name,
                 "resolution": stage.resolution, "epoch": pos["epoch"],
                 "step": pos["step"], "batch_in_epoch": pos["batch_in_epoch"], "metrics": metrics,
                 "best": pos["best"], "complete": False, "interrupted": True,
                 "weights": "ema" if ema is not None else "model"}
        path = ckpt.save_checkpoint(self.run_dir / stage.name / "last", weights, state, state_t)
        print(f"[{stage.name}] interrupted at epoch {pos['epoch'] + 1}, step {pos['step']}; saved {path}. "
              f"Continue with the same command and --resume.", file=sys.stderr, flush=True)

    def _restore(self, folder: Path, model, optimizer, scheduler, ema, loss_parts, pos) -> dict:
        acc = self.accelerator
        state = ckpt.load_state(folder)
        ts = ckpt.load_trainer_state(folder)
        raw = ts["model"] if "model" in ts else ckpt.load_weights(folder)
        unwrapped = acc.unwrap_model(model)
        report = ckpt.fit_report(unwrapped.state_dict(), raw)
        if any(report.values()):
            raise CheckpointError(f"cannot resume from {folder}: its weights do not fit this stage's model "
                                  f"({'; '.join((report['missing'] + report['unexpected'] + report['mismatched'])[:3])})"
                                  f"; was the recipe's model changed?")
        unwrapped.load_state_dict(raw)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if "scaler" in ts and acc.scaler is not None:
            acc.scaler.load_state_dict(ts["scaler"])
        if ema is not None:
            if "ema" not in ts:
                raise CheckpointError(f"cannot resume from {folder}: the recipe keeps an EMA (train.ema) but the "
                                      f"checkpoint has none")
            ema.load_state_dict(ts["ema"])
        for lp in loss_parts:
            if lp.name not in ts.get("parts", {}):
                raise CheckpointError(f"cannot resume from {folder}: it has no state for the trainable parts of "
                                      f"loss term {lp.name!r}")
            lp.load_state_dict(ts["parts"][lp.name])
        rngs = ts["rng"]
        set_rng_state(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0])
        pos.update({k: v for k, v in ts["position"].items() if k in pos})
        return state.get("metrics", {})


def _allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one state per process; a second recipe in the same single process may change precision."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision \
            and PartialState().distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it (for commands to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

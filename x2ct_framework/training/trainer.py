"""The progressive trainer: one readable loop over stages, epochs and batches on Accelerate.

Read top to bottom: :meth:`Trainer.run` walks the recipe's stages (stage k starts from stage k-1's
``best``); :meth:`Trainer.train_stage` sets a stage up (:meth:`Trainer.setup_stage`, which restores an
interrupted stage with ``--resume``), calls :meth:`Trainer.train_step` once per batch, and ends each
epoch (:meth:`Trainer.end_epoch`: validate, checkpoint, log). ``train_step`` is predict -> objective
-> backward, then at a sync boundary: non-finite guard, optimizer update, critic updates, EMA, log.

The pieces live beside this module: :mod:`.state` (everything stateful of a stage, its checkpoint
state), :mod:`.objective` (losses -> total, logged sums), :mod:`.critics` (trainable parts of
losses), :mod:`.sampling` (data order, RNG states), :mod:`.interrupt` (Ctrl-C), :mod:`.logbook`
(metrics files) and :mod:`.cascade` (earlier stages feeding ``prev``). Plugins see the named
events of ``hookspecs.py``; nothing else is overridable.

Exact resume: the data order of epoch ``e`` depends only on the seed, the stage and ``e``, and a
checkpoint holds the optimizer, scheduler, scaler, EMA, critics and every process's RNG states, so
a run killed mid-stage and resumed with ``--resume`` ends with the same weights as an
uninterrupted run (bit for bit on CPU).
"""

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
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from x2ct_framework import __version__, atomic, safepaths
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import (build_dataset, build_losses, build_metrics, build_model,
                                         builtin_tracker_names, data_options, load_recipe_plugins, model_options,
                                         stages)
from x2ct_framework.config.checks import check_freeze
from x2ct_framework.config.optim import Schedule, lr_factor, make_optimizer
from x2ct_framework.datacheck import guard_stored_geometry
from x2ct_framework.config.recipe import Recipe, check_all
from x2ct_framework.errors import CheckpointError, RecipeError, X2CTError
from x2ct_framework.generative import is_generative, model_terms
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage
from x2ct_framework.training.cascade import previous_stages
from x2ct_framework.training.compile import compile_model
from x2ct_framework.training.critics import Critics
from x2ct_framework.training.generative import generative_objective
from x2ct_framework.training.guards import (NonFiniteGuard, Update, check_batch, check_trained,
                                            check_validation, last_good)
from x2ct_framework.training.interrupt import StopRequest
from x2ct_framework.training.logbook import Logbook
from x2ct_framework.training.objective import Loss, Objective
from x2ct_framework.training.precision import apply_launcher_precision
from x2ct_framework.training.resume_schedule import check_schedule
from x2ct_framework.training.recipe_diff import keep_current_settings, optimizer_settings
from x2ct_framework.training.runfolder import RunFolder
from x2ct_framework.training.sampling import StageData, rng_state
from x2ct_framework.training.scaleout import check_distributed
from x2ct_framework.training.state import EMA, Best, StageState, SyncPoint, best_mode
from x2ct_framework.training.trackers import PREVIEW, Trackers, png_image
from x2ct_framework.viz import save_preview


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


def trainable_parameters(model: torch.nn.Module, prefixes: list[str], where: str) -> list[torch.nn.Parameter]:
    """The parameters to train: ``prefixes`` (``stages.N.freeze``) are frozen, each must match one."""
    check_freeze(model, prefixes, where)
    params = []
    for n, p in model.named_parameters():
        if any(n.startswith(f) for f in prefixes):
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    if not params:
        raise RecipeError([f"{where}: every parameter is frozen; nothing would train"])
    return params


class Trainer:
    """Runs the recipe's stages in order; each stage starts from the previous stage's best."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None, resume: bool = False,
                 overwrite: bool = False, allow_changes: list[str] | tuple[str, ...] = ()):
        if not recipe.checked:  # built from Python without load_recipe: the same checks, in one pass
            check_all(recipe)
        self.recipe, self.resume = recipe, resume
        train = recipe["train"]
        self.run_dir = Path(recipe["output_dir"]) / recipe.name
        self.folder = RunFolder(self.run_dir, Path(recipe["output_dir"]), resume=resume, overwrite=overwrite,
                                recipe=recipe, allow_changes=allow_changes)
        trackers = [t for t in train["trackers"] if t != "none"]
        launcher_note = apply_launcher_precision(recipe) if accelerator is None else None
        _allow_new_precision(train["mixed_precision"])
        # cpu=True when no GPU is visible makes torchrun-started processes use gloo (MULTI_CPU). Plugin trackers
        # join log_with when the run starts (training/trackers.py).
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=train["grad_accum"], mixed_precision=train["mixed_precision"],
            cpu=not torch.cuda.is_available(), log_with=builtin_tracker_names(recipe) or None, rng_types=[],
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        check_distributed(self.accelerator)  # FSDP / DeepSpeed are refused (see training/scaleout.py)
        self.trackers = bool(trackers) and accelerator is None
        self.tracking: Trackers | None = None  # started trackers (main process: accelerate's and the plugins')
        # The trackers' step is the run's: a stage's step plus the updates of the stages before it in this run,
        # so it only increases (wandb drops rows whose step goes back).
        self.tracker_step_offset = 0
        self.pm = get_plugin_manager()
        if launcher_note:
            self.print(launcher_note)
        load_recipe_plugins(recipe)
        self.pm.load_entry_points()  # the end-of-run hooks (report) also when every stage is skipped on --resume
        self.model: torch.nn.Module | None = None  # the stage's unwrapped model, for hooks
        self.state: StageState | None = None  # the stage in progress (model, optimizer, progress, ...)
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
        atomic.write_text(self.run_dir / "recipe.toml", self.recipe.to_run_toml())  # temporary name, then rename
        acc = self.accelerator
        self.pm.load_entry_points()  # loaded lazily: make sure "plugins" lists the installed ones too
        env = {"x2ct_framework": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
               "platform": platform.platform(), "processes": acc.num_processes,
               "distributed": str(acc.distributed_type), "device": str(acc.device),
               "mixed_precision": acc.mixed_precision, "plugins": dict(self.pm.distributions)}
        atomic.write_text(self.run_dir / "environment.json", json.dumps(env, indent=2))

    # ---- the run: stages in order --------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.folder.open(self.accelerator)  # checked, locked, surveyed (see training/runfolder.py)
        try:
            return self._run()
        finally:
            self.folder.close()

    def _run(self) -> dict[str, Any]:
        recipe, train = self.recipe, self.recipe["train"]
        # recipe.toml describes the folder's checkpoints (evaluate rebuilds the model from it): over
        # existing ones it is rewritten only with this run's first checkpoint, so a run that fails early
        # leaves the folder as it was.
        started = time.time()
        if not self.folder.occupied:
            self.write_run_info()
        all_stages = stages(recipe)
        start = train["start_stage"]
        prev_best = self._first_init(all_stages, start)
        results = {}
        try:
            if self.trackers:
                self.tracking = Trackers(self.accelerator)
                self.tracking.start(recipe, self.run_dir, flat_config(recipe.data))
            for stage in all_stages[start - 1:]:
                last = self.run_dir / stage.name / "last"
                resume_from = None
                if self.resume and ckpt.exists(last):
                    state = ckpt.load_state(last)
                    if state.get("complete"):
                        self.print(f"[{stage.name}] finished earlier ({ckpt.resolve(last)}); skipping")
                        results[stage.name] = state.get("metrics", {})
                        prev_best = self.run_dir / stage.name / "best"
                        self.tracker_step_offset += int(state.get("step", 0))
                        continue
                    resume_from = ckpt.resolve(last)
                results[stage.name] = self.train_stage(stage, init_from=prev_best, resume_from=resume_from)
                prev_best = self.run_dir / stage.name / "best"
            if self.is_main:
                self.pm.hook.on_run_end(trainer=self, results=results)  # the report, among others
                if self.tracking is not None:
                    self.tracking.log_run_end(results, *self._final_files(results, started), recipe["eval"]["split"])
        finally:
            if self.tracking is not None:
                self.tracking.finish()
                self.tracking = None
        self.print(f"outputs: {self.run_dir.resolve()}")
        return results

    def _final_files(self, results: dict[str, Any], since: float) -> tuple[Path | None, Path | None]:
        """The report and the final evaluation's summary.json, when this run wrote them (for the trackers)."""
        if not self.recipe["eval"]["report"] or not results:
            return None, None
        last = list(results)[-1]
        candidates = (self.run_dir / "report.md",
                      self.run_dir / "eval" / f"{last}-{self.recipe['eval']['split']}" / "summary.json")
        found = [p if p.is_file() and p.stat().st_mtime >= since - 1 else None for p in candidates]
        return found[0], found[1]

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
        """Set the stage up, train it epoch by epoch (one :meth:`train_step` per batch), return its metrics."""
        acc, opts = self.accelerator, stage.options
        st = self.setup_stage(stage, init_from, resume_from)
        self.pm.hook.on_stage_start(trainer=self, stage=stage)
        st.bar = tqdm(total=st.total_steps, initial=st.step, desc=stage.name, dynamic_ncols=True,
                      disable=not (self.is_main and self.recipe["train"]["progress"]))
        first_epoch = st.epoch
        with StopRequest() as stop:
            try:
                for _ in range(st.epoch, opts["epochs"]):
                    self.train_epoch(st, stop)
                    self.end_epoch(st)
                    if stop.agreed(acc):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                st.bar.close()
                self.save_interrupted(st)
                raise
        st.bar.close()
        if resume_from is not None and first_epoch >= opts["epochs"]:  # resumed with fewer epochs than were done:
            self.save_checkpoints(st, complete=True, best=False, periodic=False)  # mark the stage complete
        acc.wait_for_everyone()
        if self.is_main:
            st.logbook.write_csv()
            st.logbook.plot(self.run_dir / stage.name / "curves.png", title=f"{self.recipe.name}: {stage.name}")
        self.pm.hook.on_stage_end(trainer=self, stage=stage, metrics=st.validation)
        best = st.best
        self.tracker_step_offset += st.step  # the next stage's tracker rows follow this one's
        self.print(f"[{stage.name}] done: " + ", ".join(f"{k} {v:.4f}" for k, v in st.validation.items())
                   + (f"; best {best.metric} {best.value:.4f} at epoch {best.epoch}" if best.value is not None
                      else ""))
        return st.validation

    def train_epoch(self, st: StageState, stop: StopRequest) -> None:
        """The batches of epoch ``st.epoch``, after the first ``st.batch_in_epoch`` when resuming mid-epoch."""
        acc = self.accelerator
        st.model.train()
        st.clock.reset()
        st.sync_point = SyncPoint(batch_in_epoch=st.batch_in_epoch)
        st.skip_update = False
        with st.clock.timing("train"):
            for batch in st.data.epoch(acc, st.epoch, skip=st.batch_in_epoch):
                self.train_step(st, batch)
                if stop.agreed(acc):
                    raise KeyboardInterrupt

    def train_step(self, st: StageState, batch: dict) -> None:
        """One micro-batch: predict -> objective -> backward; every ``grad_accum`` of them, an update."""
        acc = self.accelerator
        check_batch(batch, lambda: data_options(self.recipe, st.stage)["name"], "train")
        st.batch_in_epoch += 1
        update = None  # the optimizer update this micro-batch completes, if it completes one
        with acc.accumulate(st.model):
            st.critics.freeze()  # the model's objective reaches the critics' input only
            if is_generative(self.model):  # the model owns its objective (x2ct_framework.generative)
                loss, pred = generative_objective(self, st, batch)
            else:
                pred = self.predict(st, st.model, batch)
                loss = st.objective(pred, batch, epoch=st.epoch)
                extra = model_terms(acc.unwrap_model(st.model))  # the model's own terms (auxiliary_losses)
                if extra:
                    loss = Loss(loss.total + sum(v.to(loss.total.dtype).reshape(()) for v in extra.values()),
                                {**loss.terms, **{k: v.detach().reshape(()) for k, v in extra.items()}})
            if st.guard.loss_ok(loss.total):  # every process agrees, so all skip a bad update together
                acc.backward(loss.total)
                st.objective.record(*loss)
            if acc.sync_gradients:
                update = self.optimizer_update(st)  # non-finite guard, clip, step, schedule
            if not (st.guard.bad_loss if update is None else update.skipped):
                st.critics.update(pred, batch["ct"], batch, st.epoch, st.step)
        if update is not None:
            if st.ema is not None and not update.skipped:
                st.ema.update(acc.unwrap_model(st.model))
            self.finish_update(st, update)  # position, log row, on_train_step_end

    def optimizer_update(self, st: StageState) -> Update:
        """Clip and step, or skip an update whose loss or gradient is not finite; then the lr schedule."""
        acc, train = self.accelerator, self.recipe["train"]
        st.sync_point.consistent = False  # the weights change before the position does
        lr = st.optimizer.param_groups[0]["lr"]
        norm = None if st.guard.bad_loss else acc.clip_grad_norm_(st.model.parameters(),
                                                                  train["max_grad_norm"] or math.inf)
        why = st.guard.verdict(norm)
        if why:
            st.optimizer.zero_grad(set_to_none=True)
            st.nonfinite += 1
            st.guard.skipped(st.nonfinite, st.stage.name, st.epoch, st.step, self.run_dir / st.stage.name / "last")
            update = Update(lr, None, skipped=True, why=why)
        else:
            st.optimizer.step()
            update = Update(lr, float(norm))
        st.objective.record_update(update.grad_norm)
        st.scheduler.step()
        st.optimizer.zero_grad(set_to_none=True)
        return update

    def finish_update(self, st: StageState, update: Update) -> None:
        """After an optimizer update: advance the position, log when due, mark the sync point, call hooks."""
        train = self.recipe["train"]
        st.step += 1
        st.bar.update(1)
        values = {"lr": update.lr, **st.objective.take_update()}
        if update.grad_norm is not None:
            values["train/grad_norm"] = update.grad_norm
        if st.step % train["log_every"] == 0 or st.step == st.total_steps:
            row = self.log_train(st, update)
            st.bar.set_postfix(loss=f"{row.get('train/loss', float('nan')):.4f}")
        st.sync_point = SyncPoint(rng=rng_state(), batch_in_epoch=st.batch_in_epoch)
        self.pm.hook.on_train_step_end(trainer=self, stage=st.stage, step=st.step, metrics=values)

    def end_epoch(self, st: StageState) -> None:
        """Validate when due, write the checkpoints, log the epoch's timing, call ``on_epoch_end``."""
        stage, opts = st.stage, st.stage.options
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        st.sync_point = SyncPoint()
        done = st.epoch
        improved = False
        last = last_good(self.run_dir / stage.name / "last")
        check_trained(stage.name, {"step": st.step, "nonfinite": st.nonfinite}, last)  # no best from an untrained model
        if done % opts["val_every"] == 0 or done == opts["epochs"]:
            with st.clock.timing("validate"):
                st.validation = self.validate(st)
            check_validation(stage.name, st.validation, st.best.metric, last)
            self.log(st, {"kind": "val", "stage": stage.name, "epoch": done, "step": st.step, **st.validation})
            self.pm.hook.on_validation_end(trainer=self, stage=stage, epoch=done - 1, metrics=st.validation)
            improved = st.best.improved(st.validation.get(st.best.metric), done)
        with st.clock.timing("save"):
            self.save_checkpoints(st, complete=done == opts["epochs"], best=improved,
                                  periodic=bool(opts["checkpoint_every"]) and done % opts["checkpoint_every"] == 0)
        self.log(st, {"kind": "epoch", "stage": stage.name, "epoch": done, "step": st.step, **st.clock.columns()})
        self.pm.hook.on_epoch_end(trainer=self, stage=stage, epoch=done - 1, metrics=st.validation)

    # ---- set-up ----------------------------------------------------------------------------------
    def setup_stage(self, stage: Stage, init_from: Path | None, resume_from: Path | None) -> StageState:
        """Build the stage's components (from ``init_from``), or restore them from ``resume_from``."""
        acc, recipe, opts, train = self.accelerator, self.recipe, stage.options, self.recipe["train"]
        where = lambda *k: recipe.where("stages", stage.index - 1, *k)  # noqa: E731
        seed = recipe["seed"] + stage.index
        set_seed(seed)
        accum = opts["grad_accum"] or train["grad_accum"]
        acc.gradient_accumulation_steps = accum
        stage_dir = safepaths.inside(self.run_dir, stage.name)  # a plain name below the run folder

        model = build_model(recipe, stage)
        other = self._other_model(stage, init_from) if init_from is not None and resume_from is None else None
        if other:  # a generative refiner after a regression cascade: the cascade feeds it, its weights do not
            self.print(f"[{stage.name}] starts fresh: {init_from} holds another model ({other})")
            init_from = None
        if init_from is not None and resume_from is None:
            self._initialise(model, stage, init_from)
        previous = previous_stages(recipe, stage, self.run_dir, acc.device)
        if previous is not None:
            self.print(f"[{stage.name}] cascade: prev comes from {previous.describe()}, frozen")
        params = trainable_parameters(model, opts["freeze"], where("freeze"))
        losses = build_losses(recipe, stage).to(acc.device)
        metrics = build_metrics(recipe)
        batch_size = opts["batch_size"] or train["batch_size"]
        global_batch = batch_size * acc.num_processes * accum
        scale = lr_factor(train["lr_scaling"], global_batch, train["reference_batch"])
        lr, min_lr = opts["lr"] * scale, opts["min_lr"] * scale
        train_set = build_dataset(recipe, stage, "train")
        guard_stored_geometry(train_set)  # stored X-rays must show the CT in the declared geometry
        data = StageData(train_set, build_dataset(recipe, stage, "val"),
                         batch_size=batch_size, num_workers=train["num_workers"], seed=seed,
                         limit=train["max_steps_per_epoch"] * accum * batch_size * acc.num_processes,
                         # X-ray styles on the accelerator; on a CPU, in the loader workers when there are any
                         render_on_batch=acc.device.type != "cpu" or not train["num_workers"])
        optimizer = make_optimizer(opts["optimizer"], params, lr, opts["weight_decay"], opts["optimizer_options"],
                                   where("optimizer"))
        ema = EMA(model, train["ema"]["decay"]) if train["ema"]["enabled"] else None
        # The scheduler is not handed to accelerate.prepare, which would step it once per process.
        model, optimizer, data.train, data.val = acc.prepare(model, optimizer, data.train, data.val)
        compile_model(acc.unwrap_model(model), train["compile"], log=self.print)
        if ema is not None:
            ema.to(acc.device)
        critics = Critics(losses, acc)
        steps_per_epoch = math.ceil(len(data.train) / accum)
        total_steps = steps_per_epoch * opts["epochs"]
        scheduler = LambdaLR(optimizer.optimizer,
                             Schedule(total_steps, lr, min_lr, opts["warmup_steps"], opts["scheduler"],
                                      steps_per_epoch * opts["constant_epochs"]))
        metric = opts["select_best"]  # measured by validation: checked with the recipe (config/checks.py)
        mode = best_mode(metric, opts["best_mode"], metrics)
        st = StageState(stage=stage, recipe_name=recipe.name, accelerator=acc, model=model, optimizer=optimizer,
                        scheduler=scheduler, ema=ema, critics=critics, objective=Objective(losses, acc), data=data,
                        metrics=metrics, best=Best(metric, mode), total_steps=total_steps,
                        guard=NonFiniteGuard(acc, train["max_nonfinite_steps"]), previous=previous)
        st.logbook = Logbook(stage_dir)
        st.schedule = {"processes": acc.num_processes, "global_batch": global_batch, "batch_size": batch_size,
                       "grad_accum": accum, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        self.model, self.state = acc.unwrap_model(model), st

        if resume_from is None:
            self.folder.before_fresh_stage(stage.name)  # never over checkpoints this run did not write
        if resume_from is not None:
            saved_state = ckpt.load_state(resume_from)
            for line in check_schedule(stage.name, str(resume_from), saved_state.get("schedule"), st.schedule,
                                       self.folder.allow_changes):  # processes, global batch, updates per epoch
                self.print(line)
            saved = saved_state.get("resolution", stage.resolution)
            if saved != stage.resolution:
                raise CheckpointError(f"cannot resume {stage.name} from {resume_from}: it was trained at {saved}^3 and "
                                      f"the recipe now says {stage.resolution}^3 ({where('resolution')})")
            settings = optimizer_settings(st.optimizer)
            st.restore(resume_from)
            keep_current_settings(st.optimizer, st.scheduler, settings,  # what is logged is what is used
                                  Schedule(total_steps, lr, min_lr, opts["warmup_steps"], opts["scheduler"]))
            self.print(f"[{stage.name}] resuming from {resume_from}: epoch {st.epoch} of {opts['epochs']}, "
                       f"step {st.step} of {total_steps}")
            if self.is_main:
                st.logbook.truncate(st.epoch, st.step)
        elif self.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            for f in (st.logbook.jsonl, st.logbook.csv):
                f.unlink(missing_ok=True)
        acc.wait_for_everyone()

        self.print(f"[{stage.name}] {opts['epochs']} epochs x {steps_per_epoch} optimizer steps, resolution "
                   f"{stage.resolution}^3, {len(data.train_set)} train / {len(data.val_set)} val cases")
        self.print(f"[{stage.name}] global batch {global_batch} = per-device batch {batch_size} x "
                   f"{acc.num_processes} process(es) x grad_accum {accum}; {opts['optimizer']} lr {lr:g} -> {min_lr:g} "
                   f"({opts['scheduler']}, warm-up {opts['warmup_steps']} steps; lr_scaling {train['lr_scaling']}"
                   + (f" from reference batch {train['reference_batch']}, x{scale:g}" if scale != 1 else "")
                   + f"); mixed precision {acc.mixed_precision}; best by {metric} ({st.best.mode})")
        return st

    def _other_model(self, stage: Stage, init_from: Path) -> str | None:
        """The name of the model in ``init_from`` when it is not this stage's model (the recipe that made it
        says), else None."""
        from x2ct_framework.runs import resolve_target

        mine = model_options(self.recipe, stage)["name"]
        try:
            target = resolve_target(init_from)
            theirs = model_options(target.recipe, target.stage)["name"]
        except (X2CTError, OSError, ValueError):
            return None  # no readable recipe beside it: _initialise decides from the tensors
        return theirs if theirs != mine else None

    def _initialise(self, model: torch.nn.Module, stage: Stage, init_from: Path) -> None:
        """Load the previous stage's (or ``train.init_from``'s) weights; refuse a checkpoint of another model."""
        report = ckpt.load_into(model, init_from, strict=False)
        skipped = report["missing"] + report["mismatched"]
        total = len(model.state_dict())
        if 2 * (total - len(skipped)) < total:
            raise CheckpointError(
                f"{init_from} does not fit {stage.name}'s model {model_options(self.recipe, stage)['name']!r}: only "
                f"{total - len(skipped)} of its {total} tensors match ({len(report['unexpected'])} unexpected, "
                f"e.g. {'; '.join((report['unexpected'] + skipped)[:3])}); is it a checkpoint of another model?")
        self.print(f"[{stage.name}] initialised from {init_from}"
                   + (f" ({len(skipped)} tensors kept fresh: {'; '.join(skipped[:3])}"
                      f"{' ...' if len(skipped) > 3 else ''})" if skipped else ""))

    # ---- pieces of the step ----------------------------------------------------------------------
    def predict(self, st: StageState, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The stage's model on a batch; with ``cascade``, the earlier stages' prediction is its ``prev``."""
        if st.previous is None:
            return model(batch["xrays"], batch["geometry"])
        return model(batch["xrays"], batch["geometry"], prev=st.previous(batch["xrays"], batch["geometry"]))

    def log_train(self, st: StageState, update: Update) -> dict:
        """One ``train`` row: the means since the last row (over micro-batches and processes), lr, critics."""
        row = {"kind": "train", "stage": st.stage.name, "epoch": st.epoch + 1, "step": st.step, "lr": update.lr,
               **st.objective.take_row(), **st.critics.log_values()}
        self.log(st, row)
        return row

    def tracker_step(self, st: StageState) -> int:
        """The trackers' step: the run's optimizer updates (this stage's plus those of the stages before it)."""
        return self.tracker_step_offset + st.step

    def log(self, st: StageState, row: dict) -> None:
        """A row to ``metrics.jsonl`` (main process) and to the trackers (``<stage>/<key>``, at tracker_step)."""
        if self.is_main:
            st.logbook.append(row)
        if self.tracking is not None:
            self.tracking.log({f"{st.stage.name}/{k}": v for k, v in row.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"},
                              step=self.tracker_step(st))

    # ---- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, st: StageState) -> dict[str, float]:
        """Metrics of the EMA (or model) over the whole validation split, gathered across processes; a preview."""
        acc, model, epoch = self.accelerator, st.eval_model, st.epoch
        model.eval()
        values: dict[str, list[torch.Tensor]] = {name: [] for name in st.metrics}
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        loss_n = torch.zeros((), dtype=torch.float64, device=acc.device)
        first = None
        for batch in st.data.val:
            check_batch(batch, lambda: data_options(self.recipe, st.stage)["name"], "val")
            with acc.autocast():
                pred = self.predict(st, model, batch).float()
                loss, _ = st.objective(pred, batch, epoch=epoch - 1)
            n = pred.shape[0]
            loss_sum += loss.double() * n
            loss_n += n
            pred = pred.clamp(0, 1)
            for name, fn in st.metrics.items():
                values[name].append(acc.gather_for_metrics(fn(pred, batch["ct"], batch).float()))
            if first is None:
                first = (pred[0], batch["ct"][0], batch["xrays"][0])
        out = {f"val/{k}": torch.cat(v).mean().item() for k, v in values.items() if v}
        if acc.num_processes > 1:
            loss_sum, loss_n = acc.reduce(loss_sum, "sum"), acc.reduce(loss_n, "sum")
        out["val/loss"] = (loss_sum / loss_n.clamp_min(1)).item()
        if self.is_main and self.recipe["eval"]["preview"] and first is not None:
            path = save_preview(self.run_dir / st.stage.name / "previews" / f"epoch{epoch:04d}.png", first[0],
                                first[1], xrays=first[2], title=f"{st.stage.name} epoch {epoch}: "
                                + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
            if self.tracking is not None:
                self.tracking.log_images({f"{st.stage.name}/{PREVIEW}": [png_image(path)]}, step=self.tracker_step(st))
        model.train()
        return out

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoints(self, st: StageState, *, complete: bool, best: bool, periodic: bool) -> None:
        """Write ``last`` (full trainer state) and, when due, ``best`` (weights) and a periodic copy of ``last``."""
        weights, trainer_state = st.weights(), st.state_dict()
        if not self._info_written:
            self.write_run_info()
        if self.is_main:
            stage, stage_dir = st.stage, self.run_dir / st.stage.name
            summary = st.summary(complete=complete)
            path = ckpt.save_checkpoint(stage_dir / "last", weights, summary, trainer_state)
            self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind="last")
            if best:
                path = ckpt.save_checkpoint(stage_dir / "best", weights, summary)
                self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind="best")
            if periodic:
                path = ckpt.copy_checkpoint(stage_dir / "last", stage_dir / f"epoch{st.epoch:04d}")
                self.pm.hook.on_checkpoint_saved(trainer=self, stage=stage, path=path, kind="periodic")
        self.accelerator.wait_for_everyone()

    def save_interrupted(self, st: StageState) -> None:
        """Ctrl-C: save ``last`` at the last finished optimizer update, without collectives, then stop."""
        acc, stage = self.accelerator, st.stage
        if not st.sync_point.consistent:
            self.print(f"[{stage.name}] interrupted inside an optimizer update; the last checkpoint "
                       f"({self.run_dir / stage.name / 'last'}) is kept; continue with --resume")
            return
        if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            self.print(f"[{stage.name}] interrupted; no checkpoint written ({acc.distributed_type} needs all "
                       f"processes to save); --resume continues from the last epoch's checkpoint")
            return
        if not self._info_written:
            self.write_run_info()
        if not self.is_main:
            return
        path = ckpt.save_checkpoint(self.run_dir / stage.name / "last", st.weights(collective=False),
                                    st.summary(complete=False, interrupted=True), st.state_dict(interrupted=True))
        print(f"[{stage.name}] interrupted at epoch {st.epoch + 1}, step {st.step}; saved {path}. "
              f"Continue with the same command and --resume.", file=sys.stderr, flush=True)


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

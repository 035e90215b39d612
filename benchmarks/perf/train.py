"""Training at CPU scale: end-to-end throughput, data pipeline vs model step, the framework's own overhead.

The recipe is the stage-2 recipe at CPU scale exactly as the CPU quality matrix trains it (its base
recipe, its overrides and its reference cell, ``benchmarks/matrix/cpu.toml``). Each row carries
its reference, measured in the same process:

- ``train_e2e``: samples/s of the trainer's loop (``x2ct_framework.training.trainer.Trainer``; data loading
  included, validation and checkpoint writing excluded) against a bare PyTorch loop over the same
  model, data loader, loss modules, AdamW and gradient clipping (``ratio`` = trainer / bare time
  per step, so 1.0 means no cost over hand-written code).
- ``data_cold_vs_model`` / ``data_warm_vs_model``: samples/s of the training DataLoader alone (first
  pass: every case made and rendered; second pass: from the dataset's memory cache) against
  samples/s of the model step alone (forward, loss, backward, optimizer step on a batch already in
  memory); ``ratio`` = data / model must stay above 1 so the data is never the bottleneck.
- ``overhead_*``: the framework's own per-step code, each as a share of the model step: plugin
  dispatch (hook calls and registry look-ups, amortised over the steps they serve), loss assembly
  (``LossSet`` with the recipe's terms replaced by constants, so only the assembly is timed) and the
  trainer's per-step bookkeeping (finite check, logged sums). Target: under 2% together.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.perf.common import machine, markdown_table, timeit

CPU_MATRIX = Path(__file__).resolve().parents[1] / "matrix" / "cpu.toml"
COLUMNS = ["benchmark", "ours", "reference", "unit", "ratio", "share_pct", "note"]


def cpu_stage2_recipe(out: Path, steps: int, matrix_path: Path = CPU_MATRIX, extra: list[str] = ()):
    """The CPU matrix's reference cell as a one-epoch recipe of ``steps`` optimizer steps."""
    from benchmarks.variants import cell_recipe, load_matrix

    matrix = load_matrix(matrix_path)
    matrix = dataclasses.replace(matrix, budget={**matrix.budget, "steps": steps, "epochs": 1})
    cell = dataclasses.replace(matrix.cell(matrix.reference), budget_scale=1.0)
    return cell_recipe(matrix, cell, 0, out, steps, list(extra))


def _parts(recipe):
    from x2ct_framework.config.build import build_dataset, build_losses, build_model, load_recipe_plugins, stages

    load_recipe_plugins(recipe)
    stage = stages(recipe)[-1]
    torch.manual_seed(0)
    model = build_model(recipe, stage)
    losses = build_losses(recipe, stage)
    data = build_dataset(recipe, stage, "train")
    opts = stage.options
    batch = opts["batch_size"] or recipe["train"]["batch_size"]
    return stage, model, losses, data, batch


def _loader(recipe, data, batch: int, steps: int) -> DataLoader:
    n = min(len(data), steps * batch)
    g = torch.Generator().manual_seed(0)
    return DataLoader(Subset(data, range(n)), batch_size=batch, shuffle=True, generator=g,
                      num_workers=recipe["train"]["num_workers"])


def _model_step(model, losses, opt, batch: dict, max_norm: float) -> torch.Tensor:
    pred = model(batch["xrays"], batch["geometry"])
    loss = sum(t.weight * t.module(pred, batch["ct"], batch) for t in losses.terms if t.weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return loss


def bare_loop(recipe, steps: int) -> float:
    """Seconds per step of a hand-written loop: same model, data, loss modules, AdamW, clipping."""
    stage, model, losses, data, batch = _parts(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.options["lr"], weight_decay=stage.options["weight_decay"])
    model.train()
    losses.train()
    dl = _loader(recipe, data, batch, steps)
    t0 = time.perf_counter()
    for b in itertools.islice(itertools.cycle(dl), steps):
        _model_step(model, losses, opt, b, recipe["train"]["max_grad_norm"])
    return (time.perf_counter() - t0) / steps


def trainer_loop(recipe) -> dict:
    from benchmarks.variants import train_and_time

    return train_and_time(recipe, resume=False)


def data_vs_model(recipe, batches: int, repeat: int) -> tuple[float, float, float, int]:
    """Seconds per batch of the DataLoader (first pass: rendering; second: the dataset's cache) and of the model
    step."""
    stage, model, losses, data, batch = _parts(recipe)
    dl = _loader(recipe, data, batch, batches)
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = sum(1 for _ in dl)
        passes.append((time.perf_counter() - t0) / max(n, 1))
    first = next(iter(dl))
    opt = torch.optim.AdamW(model.parameters(), lr=stage.options["lr"])
    model.train()
    model_s = timeit(lambda: _model_step(model, losses, opt, first, recipe["train"]["max_grad_norm"]),
                     repeat=repeat, warmup=1)["median_s"]
    return passes[0], passes[1], model_s, batch


class _Const(torch.nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, pred, target, batch):
        return self.value


def overhead(recipe, model_step_s: float, steps_per_epoch: int, total_steps: int, repeat: int) -> list[dict]:
    """The framework's own per-step costs as shares of ``model_step_s``."""
    from x2ct_framework.config.build import LossSet, LossTerm
    from x2ct_framework.plugins import get_plugin_manager
    from x2ct_framework.registry import Registry
    from x2ct_framework.training.guards import NonFiniteGuard
    from x2ct_framework.training.objective import Objective
    from x2ct_framework.training.trainer import Trainer

    stage, model, losses, data, batch = _parts(recipe)
    pred = torch.rand(batch, 1, *(stage.resolution,) * 3, requires_grad=True)
    target = torch.rand_like(pred.detach())
    sample = {"ct": target}
    stub = LossSet([LossTerm(t.name, _Const(torch.tensor(0.5)), t.weight) for t in losses.terms])
    n = 2000
    # The constant terms are detached on purpose (their cost is not the point): under no_grad the loss set's
    # check that every term reaches the prediction stands aside, as it does for validation.
    with torch.no_grad():
        t_loss = _per_call(lambda: stub(pred, target, sample, epoch=0), n, repeat)

    trainer = Trainer(recipe)
    loss = (pred * 1.0).mean()
    terms = {t.name: torch.tensor(0.5) for t in losses.terms}
    objective = Objective(stub, trainer.accelerator)
    guard = NonFiniteGuard(trainer.accelerator, limit=10)

    def bookkeeping():
        if guard.loss_ok(loss):
            objective.record(loss, terms)
        guard.verdict(1.0)
        objective.record_update(1.0)
        objective.take_update()

    t_book = _per_call(bookkeeping, n, repeat)
    pm = get_plugin_manager()
    t_step_hook = _per_call(lambda: pm.hook.on_train_step_end(trainer=trainer, stage=stage, step=1, metrics={}),
                            500, repeat)
    t_hook = _per_call(lambda: pm.hook.on_epoch_end(trainer=trainer, stage=stage, epoch=0, metrics={}), 500, repeat)
    t_stage_hooks = _per_call(lambda: (pm.hook.on_stage_start(trainer=trainer, stage=stage),
                                       pm.hook.on_stage_end(trainer=trainer, stage=stage, metrics={})), 200, repeat)
    reg = Registry("bench")
    reg.register("stub", lambda **kw: None, plugin="bench", distribution="bench")
    t_create = _per_call(lambda: reg.create("stub", {}, where="bench"), 500, repeat)
    n_components = 2 + len(losses.terms) + 1  # model, dataset x2 (train, val), each loss term
    dispatch = t_step_hook + t_hook / steps_per_epoch + (t_stage_hooks + n_components * t_create) / total_steps
    rows = []
    for name, cost, note in (
            ("overhead_dispatch", dispatch, f"hooks {t_step_hook * 1e6:.1f} us per step and {t_hook * 1e6:.1f} us "
             f"per epoch / {steps_per_epoch} steps, stage "
             f"hooks and {n_components} registry look-ups per stage / {total_steps} steps"),
            ("overhead_loss_assembly", t_loss, f"LossSet over {len(losses.terms)} terms "
             f"({', '.join(t.name for t in losses.terms)}), terms replaced by constants"),
            ("overhead_bookkeeping", t_book, "finite check, logged sums (.item() per term) and the update's "
             "values for on_train_step_end, per step")):
        rows.append({"benchmark": name, "ours": cost * 1e6, "reference": model_step_s * 1e3, "unit": "us vs ms step",
                     "ratio": cost / model_step_s, "share_pct": 100 * cost / model_step_s, "note": note})
    total = sum(r["ratio"] for r in rows)
    rows.append({"benchmark": "overhead_total", "ours": total * model_step_s * 1e6, "reference": model_step_s * 1e3,
                 "unit": "us vs ms step", "ratio": total, "share_pct": 100 * total,
                 "note": "target under 2% of the step: " + ("met" if total < 0.02 else "NOT met")})
    return rows


def _per_call(fn, n: int, repeat: int) -> float:
    def block():
        for _ in range(n):
            fn()

    return timeit(block, repeat=repeat, warmup=1)["median_s"] / n


def run(quick: bool = False, matrix_path: Path = CPU_MATRIX) -> list[dict]:
    steps = 4 if quick else 16
    repeat = 3 if quick else 7
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="x2ct-perf-train-") as tmp:
        recipe = cpu_stage2_recipe(Path(tmp), steps, matrix_path)
        stage = recipe["stages"][-1]
        batch = stage["batch_size"] or recipe["train"]["batch_size"]
        desc = (f"{recipe['model']['name']} {stage['resolution']}^3, tokens {recipe['model'].get('tokens', '-')}, "
                f"{len(recipe['data'].get('views', []))} views, batch {batch}, losses "
                f"{'+'.join(k for k, v in stage['losses'].items() if v.get('weight', 1))}")
        # A-B-A: the bare loop before and after the trainer, so drift in machine load shows up in both.
        bare = [bare_loop(recipe, steps)]
        timed = trainer_loop(recipe)
        bare.append(bare_loop(recipe, steps))
        ref = statistics.mean(bare)
        ours = timed["time_per_step_s"]
        rows.append({"benchmark": "train_e2e", "ours": batch / ours, "reference": batch / ref, "unit": "samples/s",
                     "ratio": ours / ref, "share_pct": "",
                     "note": f"{desc}; {steps} steps; trainer vs bare loop time per step (bare runs "
                             f"{', '.join(f'{b:.3f}' for b in bare)} s)"})
        # the data pass starts cold: no disk cache of phantoms and DRRs (every case made and rendered)
        cold = (cpu_stage2_recipe(Path(tmp), steps, matrix_path, ['data.cache_dir=""'])
                if recipe["data"].get("cache_dir") else recipe)
        cold_s, warm_s, model_s, b = data_vs_model(cold, steps, repeat)
        workers = recipe["train"]["num_workers"]
        for name, data_s, what in (("data_cold_vs_model", cold_s, "first pass: every case made and rendered"),
                                   ("data_warm_vs_model", warm_s, "second pass: the dataset's cache")):
            rows.append({"benchmark": name, "ours": b / data_s, "reference": b / model_s, "unit": "samples/s",
                         "ratio": model_s / data_s, "share_pct": 100 * data_s / (data_s + model_s),
                         "note": f"data loader ({workers} workers; {what}) vs model step on a resident batch; "
                                 f"ratio = data / model throughput (> 1: the data keeps up); share = data time "
                                 f"in a serial step"})
        epochs = recipe["stages"][-1]["epochs"]
        full_epochs = 100  # the seed's stage 2: dispatch per stage is amortised over its 100 epochs
        rows += overhead(recipe, model_s, max(steps // epochs, 1), steps * full_epochs, repeat)
    return rows


def main() -> int:
    quick = "--quick" in sys.argv
    rows = run(quick=quick)
    print(f"# training at CPU scale ({machine()})\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

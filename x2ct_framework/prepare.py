"""``x2ct prepare RECIPE``: discover, resample and render every case of every stage ahead of training.

For each stage and split of the recipe the dataset is built (which writes its manifest: the cases
found, their DICOM series and label maps, so later constructions on every rank read one file
instead of every header), then every case is prepared in parallel worker processes: read, resampled
to the stage grid, cropped, its labels remapped, its DRRs rendered for every view, all written to
the dataset's content-addressed cache (``.npy`` files opened memory-mapped). Cases already in the
cache are skipped, so an interrupted run resumes where it stopped; entries are written in private
folders and renamed into place, so several processes or nodes may prepare the same cache at once.

``x2ct run`` fills the cache the same way on first access (the datasets call the same code), so
preparing is optional; it moves that work out of the first epoch and onto as many workers as wanted.
Datasets without a ``prepare_case(index)`` method need no preparation and are passed over.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from x2ct_framework.errors import DataError, X2CTError

log = logging.getLogger("x2ct_framework.prepare")
SPLITS = ("train", "val", "test")
WORKER_ATTEMPTS = 2  # a case whose worker dies is tried once more, alone, then reported as failed


@dataclass
class PrepareReport:
    """What a prepare run did: counts, failures and the time it took."""

    prepared: int = 0
    cached: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    skipped_datasets: list[str] = field(default_factory=list)

    @property
    def cases_per_minute_per_worker(self) -> float:
        return 60.0 * self.prepared / max(self.seconds, 1e-9) / max(self.workers, 1)


_worker: dict = {}


def _init_worker(recipe_path: str, overrides: list[str], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("x2ct_plugins").setLevel(logging.ERROR)  # warnings were shown once by the main process
    _worker.clear()
    _worker["args"] = (recipe_path, overrides)


def _dataset(stage_index: int, split: str):
    from x2ct_framework.config.build import build_dataset, load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe

    key = (stage_index, split)
    if key not in _worker:
        if "recipe" not in _worker:
            recipe = load_recipe(*_worker["args"])
            load_recipe_plugins(recipe)
            _worker["recipe"], _worker["stages"] = recipe, stages(recipe)
        _worker[key] = build_dataset(_worker["recipe"], _worker["stages"][stage_index], split)
    return _worker[key]


def _prepare_one(job: tuple[int, str, int]) -> tuple[tuple[int, str, int], str, str | list[str]]:
    """(job, "prepared" | "cached" | "failed", the case's warnings or the failure's message)."""
    stage_index, split, index = job
    try:
        warnings = _dataset(stage_index, split).prepare_case(index)
        return job, ("cached" if warnings is None else "prepared"), list(warnings or [])
    except X2CTError as exc:
        return job, "failed", str(exc)
    except Exception as exc:  # a damaged file can raise anything in a reader
        return job, "failed", f"{type(exc).__name__}: {exc}"


def prepare(recipe_path: str, overrides: list[str] = (), *, workers: int = 0, splits: list[str] = SPLITS,
            stage_names: list[str] | None = None, rescan: bool = False, progress: bool = True,
            threads_per_worker: int = 1) -> PrepareReport:
    """Prepare every case of the recipe's stages and splits (see the module docstring)."""
    from tqdm.auto import tqdm

    from x2ct_framework.config.build import build_dataset, load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    load_recipe_plugins(recipe)
    all_stages = stages(recipe)
    chosen = [s for s in all_stages if not stage_names or s.name in stage_names]
    if stage_names and len(chosen) != len(set(stage_names)):
        known = ", ".join(s.name for s in all_stages)
        raise DataError(f"--stage: unknown stage(s) {', '.join(set(stage_names) - {s.name for s in chosen})} "
                        f"(the recipe has {known})")
    report = PrepareReport(workers=max(1, workers))
    jobs: list[tuple[int, str, int]] = []
    names: dict[tuple[int, str, int], str] = {}
    for stage in chosen:
        for split in splits:
            try:
                ds = build_dataset(recipe, stage, split)
            except DataError as exc:
                if "split is empty" in str(exc) and split == "test":
                    log.warning("%s: %s", stage.name, exc)
                    continue
                raise
            if not callable(getattr(ds, "prepare_case", None)):
                report.skipped_datasets.append(f"{recipe['data']['name']} ({stage.name}/{split})")
                continue
            if rescan and callable(getattr(ds, "manifest", None)):
                ds.manifest(rescan=True)
            for i in range(len(ds)):
                job = (stage.index - 1, split, i)
                jobs.append(job)
                case = ds.cases[i]
                names[job] = f"{stage.name}/{split}/{getattr(case, 'name', case)}"
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="prepare", unit="case", disable=not progress, dynamic_ncols=True)

    def record(result) -> None:
        job, status, message = result
        if status == "prepared":
            report.prepared += 1
            for w in message:
                if w not in report.warnings:
                    report.warnings.append(w)
                    bar.write(f"warning: {w}")
        elif status == "cached":
            report.cached += 1
        else:
            report.failed[names[job]] = message
        bar.update(1)
        bar.set_postfix(prepared=report.prepared, cached=report.cached, failed=len(report.failed))

    if workers <= 1:
        import torch

        level, threads = logging.getLogger("x2ct_plugins").level, torch.get_num_threads()
        try:
            _init_worker(str(recipe.path), list(overrides), threads_per_worker or threads)
            _worker["recipe"], _worker["stages"] = recipe, all_stages
            for job in jobs:
                record(_prepare_one(job))
        finally:
            logging.getLogger("x2ct_plugins").setLevel(level)
            torch.set_num_threads(threads)
            _worker.clear()
    else:
        from x2ct_framework.workerpool import run_jobs

        def died(job, tries: int) -> None:
            record((job, "failed", f"the worker process preparing it died {tries} time(s) (killed, for example by "
                                   f"the out-of-memory killer, or crashed in a reader); not tried again. Give it "
                                   f"more memory or fewer --workers, or remove the case"))

        try:
            run_jobs(_prepare_one, jobs, workers, on_result=record, on_died=died, initializer=_init_worker,
                     initargs=(str(recipe.path), list(overrides), threads_per_worker or 1), attempts=WORKER_ATTEMPTS)
        except KeyboardInterrupt:
            bar.close()
            print(f"prepare stopped: {report.prepared} prepared, {report.cached} already cached, "
                  f"{len(report.failed)} failed of {len(jobs)}; run it again to continue (finished cases are kept)",
                  file=sys.stderr, flush=True)
            raise
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes (default: the CPU count, at most 8)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads in each worker (default 1)")
    p.add_argument("--split", dest="splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--stage", dest="stages", nargs="+", metavar="NAME", help="only these stages (default: all)")
    p.add_argument("--rescan", action="store_true", help="discover the cases again even when the manifest is fresh")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    report = prepare(args.recipe, args.overrides, workers=args.workers, splits=args.splits, stage_names=args.stages,
                     rescan=args.rescan, progress=args.progress, threads_per_worker=args.threads_per_worker)
    for what in report.skipped_datasets:
        print(f"{what}: nothing to prepare (the dataset has no prepare_case)")
    print(f"prepared {report.prepared}, already cached {report.cached}, failed {len(report.failed)} in "
          f"{report.seconds:.1f} s with {report.workers} worker(s)"
          + (f" ({report.cases_per_minute_per_worker:.1f} cases/min per worker)" if report.prepared else ""))
    for name, message in report.failed.items():
        print(f"failed: {name}: {message}", file=sys.stderr)
    return 2 if report.failed else 0

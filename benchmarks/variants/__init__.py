"""The future-work quality matrix: recipe variants side by side, same data, same budget, several seeds.

``python -m benchmarks.variants benchmarks/matrix/cpu.toml`` trains every cell of the matrix once
per seed under one fixed budget, scores each run with one evaluation protocol, and writes
``matrix.md``, ``matrix.csv``, ``per_seed.csv`` and ``matrix.png`` into the output folder
(``benchmarks/out/matrix/<name>/`` unless ``--out``). Each value is the mean over seeds with a 95%
Student-t interval over seeds; every cell is also compared with the reference cell seed by seed.

A matrix is a TOML file (see ``benchmarks/README.md``)::

    name = "cpu"
    base = "../../recipes/stage2_extended.toml"   # relative to the matrix file
    set = ["model.dim=64"]                         # overrides for every cell (--set syntax)
    seeds = [0, 1, 2]
    reference = "baseline"
    [budget]
    steps = 60        # optimizer steps per trained stage (or wall_s = seconds of training per stage)
    epochs = 10       # the budget is cut into this many epochs (validation and best-checkpoint points)
    [eval]
    protocol = "default"
    [[cells]]
    name = "baseline"
    question = "the seed's stage 2"
    set = []
    budget_scale = 1.0
    # stage_budget_scale = { refiner = 2 }   # optional: that stage (by name) trains 2x the cell's epochs

Resuming: each finished (cell, seed) writes ``results/<cell>/seed<N>.json`` atomically, tagged with
a hash of everything that determines it (the resolved recipe, the budget, the evaluation). A rerun
skips every result whose hash still matches and continues an interrupted training run from its last
checkpoint (``--resume`` of the trainer), so an interrupted matrix never redoes finished work.

Parallel: ``--workers N`` runs N (cell, seed) jobs at once, each in its own process pinned to a
device (``--devices 0,1,2,3``, ``--per-device K``; one GPU each by default) or, on the CPU, to
``--threads-per-worker T`` threads; ``--shard K/N`` runs one node's share of the jobs into a shared
output folder. See docs/benchmarks.md.

The package: ``spec`` (the matrix file), ``stats`` (intervals over seeds), ``runner`` (recipes,
hashes, running, dispatch), ``timing`` (time per step, memory, device), ``tables`` (md/csv/png),
``__main__`` (the command line).
"""

from __future__ import annotations

from benchmarks.variants.runner import (CALIBRATION, CELL, RUNNER_VERSION, CellFailed, Job, Slot, calibrate,
                                        check_budget, cell_recipe, default_out, evaluate_run, hash_kind, make_slots,
                                        read_result, result_path, run_cell, run_hash, run_matrix, run_name)
from benchmarks.variants.spec import DEFAULT_METRICS, HASHED_EVAL, REPO, Cell, Matrix, load_matrix
from benchmarks.variants.stats import (T975, as_one_sample, fmt_interval, hierarchical_bootstrap, interval, median,
                                       overlap, paired, per_case_pairs, t_quantile_975, verdict)
from benchmarks.variants.tables import (collect, expected_keys, markdown, plot_matrix, read_tables, summarize,
                                        write_tables)
from benchmarks.variants.timing import device_label, peak_memory_mib, train_and_time, trained_stages

__all__ = ["CALIBRATION", "CELL", "DEFAULT_METRICS", "HASHED_EVAL", "REPO", "RUNNER_VERSION", "T975", "Cell",
           "CellFailed", "Job", "Matrix", "Slot", "as_one_sample", "calibrate", "check_budget", "cell_recipe",
           "collect", "default_out", "device_label", "evaluate_run", "expected_keys", "fmt_interval", "hash_kind",
           "hierarchical_bootstrap", "interval", "load_matrix", "machine_description", "make_slots", "markdown",
           "median", "overlap", "paired", "per_case_pairs", "peak_memory_mib", "plot_matrix", "read_result",
           "read_tables", "result_path", "run_cell", "run_hash", "run_matrix", "run_name", "summarize",
           "t_quantile_975", "train_and_time", "trained_stages", "verdict", "write_tables"]


def machine_description() -> str:
    from benchmarks.variants.__main__ import machine_description as describe

    return describe()

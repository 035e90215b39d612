"""``python -m benchmarks.variants MATRIX.toml``: run the matrix, print where the tables are."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.variants.runner import check_budget, cell_recipe, default_out, make_slots, parse_shard, run_matrix, \
    run_one
from benchmarks.variants.spec import Matrix, load_matrix
from benchmarks.variants.tables import budget_text, write_tables


def dry_run(matrix: Matrix, out: Path, extra: list[str], check: bool, log=print) -> int:
    """Resolve (and with ``check`` build) every cell's recipe without training."""
    from x2ct_framework.config.build import build_losses, build_model, load_recipe_plugins, stages

    steps = matrix.budget.get("steps") or matrix.budget["epochs"] * matrix.budget["calibration_steps"]
    log(f"matrix {matrix.name}: base {matrix.base}, seeds {matrix.seeds}, budget: {budget_text(matrix)}")
    for cell in matrix.cells:
        recipe = cell_recipe(matrix, cell, matrix.seeds[0], out, steps, extra, scoring=True)
        load_recipe_plugins(recipe)
        st = stages(recipe)[-1]
        tokens = recipe["model"].get("tokens")
        losses = ", ".join(k for k, v in st.options["losses"].items() if v.get("weight", 1))
        line = (f"  {cell.name:<16} {recipe['model']['name']}{f' {tokens}^3 tokens' if tokens else ''}, "
                f"{st.resolution}^3, views {recipe['data'].get('views', '?')}, losses {losses}, "
                f"{st.options['epochs']} epochs")
        if cell.kind == "rescore":
            line += f"; no training: scores {cell.of}'s runs with {', '.join(cell.eval_set)}"
        if check:
            check_budget(recipe, steps // matrix.budget["epochs"])
            model = build_model(recipe, st)
            build_losses(recipe, st)
            line += f", {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params"
        log(line)
    return 0


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = (f", {torch.cuda.device_count()} x GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available()
           else ", no GPU")
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, {platform.system()} {platform.release()}")


def files_line(status: dict) -> str:
    t = status.get("tables", {})
    return "tables: " + ", ".join(str(p) for p in t.values())


def main(argv: list[str] | None = None) -> int:
    import benchmarks.variants as package

    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=package.__doc__.splitlines()[0])
    parser.add_argument("matrix", nargs="?", help="matrix TOML file (benchmarks/matrix/cpu.toml, gpu.toml)")
    parser.add_argument("--out", help="output folder (default benchmarks/out/matrix/<name>)")
    parser.add_argument("--only", nargs="+", metavar="CELL", help="run only these cells")
    parser.add_argument("--seeds", nargs="+", type=int, help="run only these seeds (default: the matrix's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every cell (changes every cell's hash: all rerun)")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="CELL", help="redo these cells even if finished")
    parser.add_argument("--dry-run", action="store_true", help="resolve every cell's recipe and print the plan")
    parser.add_argument("--check", action="store_true", help="with --dry-run: also build every cell's model and losses")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the finished results")
    parser.add_argument("--accept-stale", action="store_true",
                        help="with --tables-only: count results whose hash differs from the current definition "
                             "(runs an earlier code version made; they are named in matrix.md)")
    parser.add_argument("--in-process", action="store_true",
                        help="run cells in this process (faster start; peak memory is then the whole process')")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="jobs run at once, each in its own process (0: one per device x --per-device)")
    parser.add_argument("--devices", default="auto", metavar="IDS",
                        help="auto (every visible GPU, else the CPU), cpu, or GPU ids such as 0,1,2,3")
    parser.add_argument("--per-device", type=int, default=1, metavar="K", help="jobs per GPU at once (small cells)")
    parser.add_argument("--threads-per-worker", type=int, default=0, metavar="T",
                        help="CPU threads of each job (OMP_NUM_THREADS); 0: the logical CPUs shared evenly")
    parser.add_argument("--shard", metavar="K/N",
                        help="run the K-th of every N jobs (one node of N into a shared --out)")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from x2ct_framework.run import report_errors

    if args.run_one:
        return report_errors(run_one, args.run_one)
    if not args.matrix:
        parser.error("the matrix file is required")

    def go() -> int:
        matrix = load_matrix(args.matrix)
        out = Path(args.out).resolve() if args.out else default_out(matrix)
        parallel = args.workers != 1 or args.per_device != 1
        if parallel and args.in_process:
            parser.error("--in-process runs one job at a time: drop it, or --workers")
        slots = make_slots(args.workers, args.devices, args.per_device, args.threads_per_worker) if parallel else None
        shard = parse_shard(args.shard)
        if args.dry_run:
            return dry_run(matrix, out, args.overrides, args.check)
        if args.tables_only:
            files = write_tables(matrix, out, plot=args.plot, extra=args.overrides, accept_stale=args.accept_stale)
            print(f"tables: {files['md']}")
            return 0
        t0 = time.perf_counter()
        status = run_matrix(matrix, out, only=args.only, seeds=args.seeds, extra=args.overrides,
                            isolate=not args.in_process, rerun=args.rerun, plot=args.plot, slots=slots,
                            shard=shard)
        print(f"\n{files_line(status)}; {len(status['ran'])} runs in {(time.perf_counter() - t0) / 60:.1f} min, "
              f"{len(status['skipped'])} skipped (finished earlier), {len(status['failed'])} failed")
        print(f"machine: {machine_description()}")
        for name, msg in status["failed"].items():
            print(f"failed: {name}: {msg.splitlines()[0]}", file=sys.stderr)
        return 1 if status["failed"] else 0

    return report_errors(go)


if __name__ == "__main__":
    sys.exit(main())

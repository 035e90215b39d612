"""Start-up cost of the commands: whole-process wall time and peak memory beside ``python -c "import torch"``.

``python -m benchmarks.perf.startup [--quick] [--repeat N]`` runs each command and the torch import
one after the other, alternating (torch, command, torch, command, ...) so that a change in machine
load hits both, and reports the medians and their ratio; the goal is a ratio within 1.3. Peak
memory is each child's own maximum resident set size (``wait4``). The commands share a fresh cache
folder (``X2CT_CACHE_DIR``): ``x2ct plugins`` prints the cached listing (primed once before timing),
``x2ct plugins --refresh`` lists afresh (every plugin module imported). ``x2ct validate`` also builds
every component of the recipe and runs a batch of two through each stage's model, losses and metrics
(the FLOP count is opt-in, ``--describe``), so its ratio includes that work; ``import torch, timm``
is its floor for a recipe with a timm encoder (timm imports torchvision and ``torch._dynamo``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH = [sys.executable, "-c", "import torch"]
GOAL = 1.3


def x2ct() -> list[str]:
    """The ``x2ct`` console script beside this interpreter (what a user types), else ``python -m``."""
    script = Path(sys.executable).with_name("x2ct")
    if script.is_file():
        return [str(script)]
    found = shutil.which("x2ct")
    return [found] if found else [sys.executable, "-m", "x2ct_framework.cli"]


def commands() -> dict[str, list[str]]:
    return {"x2ct --help": [*x2ct(), "--help"], "x2ct plugins": [*x2ct(), "plugins"],
            "x2ct plugins --refresh": [*x2ct(), "plugins", "--refresh"],
            "x2ct validate recipes/quickstart.toml": [*x2ct(), "validate", str(REPO / "recipes" / "quickstart.toml")],
            "python -c 'import torch, timm'": [sys.executable, "-c", "import torch, timm"]}


# A small launcher forks and times the command: a child forked straight from a large parent (this
# benchmark inside the perf suite or pytest, with torch loaded) would report the parent's resident set
# as its own peak (Linux carries the old memory's high-water mark across exec).
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one whole process; a failing command is an error."""
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, cwd=REPO,
                         env=env)
    try:
        wall, kib, code = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the launcher failed for {' '.join(cmd)}: {out.stderr.strip()[-500:]}") from None
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}: {out.stderr.strip()[-500:]}")
    return wall, kib / 1024  # Linux: ru_maxrss in kilobytes


def compare(name: str, cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> dict:
    """Median wall time and peak memory of ``cmd`` and of the torch import over ``repeat`` alternating pairs."""
    ours, ref = [], []
    for _ in range(repeat):
        ref.append(measure(TORCH, env))
        ours.append(measure(cmd, env))
    wall, mem = statistics.median(w for w, _ in ours), statistics.median(m for _, m in ours)
    ref_wall, ref_mem = statistics.median(w for w, _ in ref), statistics.median(m for _, m in ref)
    return {"benchmark": f"startup {name}", "ours": wall, "reference": ref_wall, "ratio": wall / ref_wall,
            "peak_mib": mem, "reference_peak_mib": ref_mem, "memory_ratio": mem / ref_mem, "pairs": repeat,
            "goal": GOAL, "note": f"whole process; reference: python -c \"import torch\" alternating; medians of "
                                  f"{repeat} pairs"}


def run(quick: bool = False, repeat: int | None = None, only: list[str] | None = None) -> list[dict]:
    repeat = repeat or (3 if quick else 5)
    chosen = {name: cmd for name, cmd in commands().items() if not only or name in only}
    with tempfile.TemporaryDirectory(prefix="x2ct-startup-") as cache:
        env = {**os.environ, "X2CT_CACHE_DIR": cache}
        measure(commands()["x2ct plugins"], env)  # the listing cache, primed
        return [compare(name, cmd, repeat, env) for name, cmd in chosen.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.startup", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 alternating pairs per command instead of 5")
    p.add_argument("--repeat", type=int, help="alternating pairs per command")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    from benchmarks.perf.common import machine, markdown_table

    rows = run(quick=args.quick, repeat=args.repeat)
    print(markdown_table(rows, ["benchmark", "ours", "reference", "ratio", "peak_mib", "reference_peak_mib",
                                "memory_ratio", "pairs"]))
    print(f"\nmachine: {machine()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

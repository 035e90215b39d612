"""Model step on CPU: the user's stage 2 (128^3 output, two 128^2 views) with 24^3 and 32^3 tokens.

One training step (forward + backward of a mean loss) at batch 1 for ``vit_cascade`` at its default
sizes, with and without gradient checkpointing (also as ``vit_cascade_kv2``: the 24^3-token model with
``kv_pool = 2``, keys and values from the token grid pooled 2x per axis), and for ``cnn_baseline`` and the
faithful ``x2ctgan``
(X2CT-GAN's 61.74 M generator, PA + lateral at 0/270 degrees, no checkpointing) beside it. Every
configuration runs in its own subprocess, so that its peak memory is its own. Two peaks, both over
the timed steps and above the level just before them (model, inputs and libraries excluded):
``peak_mib``, the bytes malloc has handed out and not taken back (glibc ``mallinfo2``, sampled every
millisecond: close to the live tensors), and ``rss_peak_mib``, the
process's resident set (``ru_maxrss``), which also counts memory that glibc keeps after a free.

Per row:
- ``params_m``: the model's parameters, in millions;
- ``seconds``: median wall time of one step;
- ``step_gflop``: FLOPs the step executes (counted on fake tensors by ``FlopCounterMode``: matrix
  products, convolutions, attention; element-wise work is not counted), recomputation included;
  ``model_gflop`` is the same without checkpointing's recomputation;
- ``gflops``: ``step_gflop / seconds``, the achieved throughput; ``matmul_gflops``: a 4096^2 fp32
  matrix product (2048^2 in quick mode) measured in the same process, right before and after the step (median of both);
- ``ratio`` = ``gflops / matmul_gflops`` (target >= 0.25); ``vs_vit``: ``seconds`` over those of
  ``vit_cascade`` at its first token grid without checkpointing, in the same run; ``vs_x2ctgan``: the
  same over X2CT-GAN's generator step (the goal: at most 1 at equal output size); ``mem_cut`` =
  ``peak_mib`` without / with gradient checkpointing (target >= 2).

With ``--compile [MODE]`` every row also times the same step with the model under ``torch.compile``
(``x2ct_framework.training.compile``, the recipe's ``train.compile``): ``compiled_seconds``, the
first call's ``compile_s`` and ``compile_speedup`` = eager / compiled seconds; a compile failure is
recorded in ``compile_note`` and the row keeps its eager figures. Off by default: on a CPU, compiling
the 128^3 models takes minutes.

``--recipe RECIPE [--stage NAME]`` adds the model exactly as a recipe builds it for one stage (default: its
last): its ``[model]`` table with the stage's overrides, its gradient checkpointing, views and geometry,
and X-rays at its ``data.image_size`` (the stage's resolution when unset). The row is named
``recipe:STEM/STAGE`` and ``--only`` selects it by that name; for instance
``--recipe recipes/stage2_extended.toml --only recipe:stage2_extended/stage2 x2ctgan`` times the shipped
stage-2 model beside X2CT-GAN's generator.

Run: ``python -m benchmarks.perf.model`` (``--quick``: a 32^3 model with 8^3 and 12^3 tokens on
32^2 views, for CI; ``--repeat N`` sets the timed steps of every row; ``--compile``; ``--only x2ctgan
vit_cascade:24`` runs only those rows, the first vit_cascade row being the ``vs_vit`` reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.perf.common import machine, markdown_table

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["model", "tokens", "checkpointing", "params_m", "steps", "seconds", "vs_vit", "vs_x2ctgan", "model_gflop",
           "step_gflop", "gflops", "matmul_gflops", "ratio", "peak_mib", "rss_peak_mib", "mem_cut", "targets"]
COMPILE_COLUMNS = ["compiled_seconds", "compile_s", "compile_speedup", "compile_note"]


def configs(quick: bool, repeat: int | None) -> list[dict]:
    if quick:
        base = dict(resolution=32, image=32, views=2, options=dict(dim=64, depth=2, heads=2, channels=8))
        grids, cnn = (8, 12), dict(channels=8, levels=3)
        x2ctgan = dict(image_size=64, width_divisor=16, encoder_blocks=[1, 1, 1, 1, 1])
    else:
        base = dict(resolution=128, image=128, views=2, options={})
        grids, cnn, x2ctgan = (24, 32), {}, {}
    out = []
    for g in grids:
        steps = repeat or (2 if quick else 3 if g <= 24 else 1)
        for ckpt in (False, True):
            out.append({**base, "model": "vit_cascade", "tokens": g, "checkpointing": ckpt, "steps": steps,
                        "options": {**base["options"], "tokens": g}})
    g = grids[0]  # the same model with pooled keys and values (kv_pool = 2): 1/8 of the attention
    for ckpt in (False, True):
        out.append({**base, "name": "vit_cascade_kv2", "model": "vit_cascade", "tokens": g, "checkpointing": ckpt,
                    "steps": repeat or (2 if quick else 3), "options": {**base["options"], "tokens": g, "kv_pool": 2}})
    for ckpt in (False, True):
        out.append({**base, "model": "cnn_baseline", "tokens": None, "checkpointing": ckpt,
                    "steps": repeat or (2 if quick else 3), "options": cnn})
    out.append({**base, "model": "x2ctgan", "tokens": None, "checkpointing": False, "steps": repeat or 2,
                "options": x2ctgan, "angles": [0.0, 270.0]})
    return out


def _recipe_stage(path: str, stage_name: str | None):
    """The recipe at ``path`` and its stage ``stage_name`` (default: the last)."""
    from x2ct_framework.config import build
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(path)
    stages = build.stages(recipe)
    names = [s.name for s in stages]
    if stage_name is not None and stage_name not in names:
        raise SystemExit(f"--stage {stage_name}: {path} has no such stage (its stages: {', '.join(names)})")
    return recipe, stages[names.index(stage_name)] if stage_name else stages[-1]


def recipe_configs(paths: list[str], stage_name: str | None, repeat: int | None) -> list[dict]:
    """One row per recipe: the model its ``stage_name`` stage (default: the last) builds, as training builds it.
    Views, geometry and X-ray size are the stage's data values, else the dataset's own defaults."""
    from x2ct_framework.config import build

    out = []
    for path in paths:
        recipe, stage = _recipe_stage(path, stage_name)
        model = build.model_options(recipe, stage)
        angles = [float(a) for a in build.dataset_default(recipe, stage, "views") or [0, 90]]
        out.append({"name": f"recipe:{Path(path).stem}/{stage.name}", "model": model.pop("name"),
                    "tokens": model.get("tokens"), "recipe": str(Path(path).resolve()), "stage": stage.name,
                    "checkpointing": bool(build.context(recipe, stage)["gradient_checkpointing"]),
                    "resolution": stage.resolution, "views": len(angles), "angles": angles,
                    "geometry": build.dataset_default(recipe, stage, "geometry") or "parallel",
                    "image": int(build.dataset_default(recipe, stage, "image_size") or stage.resolution),
                    "steps": repeat or 3, "options": model})
    return out


def _build(cfg: dict, angles: list[float]) -> torch.nn.Module:
    if cfg.get("recipe"):
        from x2ct_framework.config import build

        recipe, stage = _recipe_stage(cfg["recipe"], cfg["stage"])
        build.load_recipe_plugins(recipe)
        return build.build_model(recipe, stage)
    from x2ct_framework.plugins import get_plugin_manager

    return get_plugin_manager().registry("model").create(
        cfg["model"], cfg["options"], context={"resolution": cfg["resolution"], "views": angles,
                                               "gradient_checkpointing": cfg["checkpointing"]})


def matmul_gflops(n: int = 4096, repeat: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class LiveMemory:
    """Peak of the bytes malloc has handed out and not taken back (glibc ``mallinfo2``: heap in use plus
    mmapped blocks), sampled every millisecond by a thread. Unlike the resident set it does not count
    memory the allocator keeps after a free, so it follows the tensors that are alive."""

    def __init__(self, interval: float = 0.001):
        import ctypes

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _Info
        self.interval, self.peak, self._stop = interval, 0, False

    def now(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self):
        import threading

        self.base = self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(cfg: dict) -> dict:
    """Build one configuration, count its FLOPs, time ``steps`` training steps, report peak memory."""
    from x2ct_framework.model_info import step_flops
    from x2ct_framework.physics import make_geometry

    torch.manual_seed(0)
    angles = cfg.get("angles") or [i * 180.0 / cfg["views"] for i in range(cfg["views"])]
    model = _build(cfg, angles)
    model.train()
    geometry = {k: v[None] for k, v in make_geometry(angles, cfg.get("geometry", "parallel")).items()}
    xrays = torch.rand(1, cfg["views"], 1, cfg["image"], cfg["image"])
    executed = step_flops(model, xrays, geometry)
    flag = getattr(model, "gradient_checkpointing", False)
    if flag:
        model.gradient_checkpointing = False
        algorithmic = step_flops(model, xrays, geometry)
        model.gradient_checkpointing = flag
    else:
        algorithmic = executed

    def step():
        model.zero_grad(set_to_none=True)
        model(xrays, geometry).mean().backward()

    n = cfg.get("matmul", 4096)
    ref = [matmul_gflops(n)]
    if cfg.get("warmup"):
        step()
    model.zero_grad(set_to_none=True)
    base = _rss_bytes()
    times = []
    with LiveMemory() as live:
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    ref.append(matmul_gflops(n))
    seconds = statistics.median(times)
    compiled = compiled_step(model, xrays, geometry, cfg["compile"], cfg["steps"]) if cfg.get("compile") else {}
    return {**compiled, "seconds": seconds, "model_gflop": algorithmic / 1e9, "step_gflop": executed / 1e9,
            "gflops": executed / seconds / 1e9, "matmul_gflops": statistics.median(ref),
            "peak_mib": (live.peak - live.base) / 2**20, "rss_peak_mib": max(0, peak - base) / 2**20,
            "times": times, "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters())}


def compiled_step(model, xrays, geometry, mode: str, steps: int) -> dict:
    """Median seconds of the same training step with ``model`` compiled (first call timed apart)."""
    from x2ct_framework.training.compile import compile_model

    notes: list[str] = []
    compile_model(model, mode, log=notes.append)

    def step():
        model.zero_grad(set_to_none=True)
        model(xrays, geometry).mean().backward()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    if model.compile_fallback:
        return {"compile_note": notes[-1] if notes else model.compile_fallback}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"compiled_seconds": statistics.median(times), "compile_s": first, "compile_note": f"mode {mode}"}


def select(cfgs: list[dict], only: list[str] | None) -> list[dict]:
    """The configurations named by ``only``: ``MODEL`` (every row of that model), ``vit_cascade:G`` (one
    token grid, both checkpointing settings) or a row's full name (``recipe:STEM/STAGE``)."""
    if not only:
        return cfgs
    known = sorted({c.get("name", c["model"]) for c in cfgs})
    kept = []
    for cfg in cfgs:
        for sel in only:
            model, _, grid = (sel, "", "") if sel in known else sel.partition(":")
            if model not in known:
                raise SystemExit(f"--only {sel}: unknown model {model!r} (available: {', '.join(known)})")
            if cfg.get("name", cfg["model"]) == model and (not grid or str(cfg["tokens"]) == grid):
                kept.append(cfg)
                break
    if not kept:
        raise SystemExit(f"--only {' '.join(only)} selects no configuration")
    return kept


def run(quick: bool = False, repeat: int | None = None, log=print, compile_mode: str | None = None,
        only: list[str] | None = None, recipes: list[str] | None = None, stage: str | None = None) -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    cfgs = configs(quick, repeat) + recipe_configs(recipes or [], stage, repeat)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    for cfg in select(cfgs, only):
        cfg["warmup"], cfg["matmul"], cfg["compile"] = quick, 2048 if quick else 4096, compile_mode
        name = cfg.get("name", cfg["model"])
        label = f"{name} tokens={cfg['tokens']} checkpointing={cfg['checkpointing']}"
        log(f"[model] {label} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.model", "--worker", json.dumps(cfg)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"model": name, "tokens": f"{cfg['tokens']}^3" if cfg["tokens"] else "-",
               "checkpointing": cfg["checkpointing"], "steps": cfg["steps"],
               **{k: res[k] for k in ("seconds", "model_gflop", "step_gflop", "gflops", "matmul_gflops", "peak_mib",
                                   "rss_peak_mib")}}
        row["ratio"] = row["gflops"] / row["matmul_gflops"]
        row["params_m"] = res["params"] / 1e6
        if compile_mode:
            row.update({k: res[k] for k in ("compiled_seconds", "compile_s", "compile_note") if k in res})
            if "compiled_seconds" in row:
                row["compile_speedup"] = row["seconds"] / row["compiled_seconds"]
        log(f"[model]   {row['seconds']:.1f} s, {row['gflops']:.1f} GFLOP/s ({row['ratio']:.2f} of matmul), "
            f"peak {row['peak_mib']:.0f} MiB live, {row['rss_peak_mib']:.0f} MiB resident", flush=True)
        rows.append(row)
    vits = [r for r in rows if r["model"].startswith("vit_cascade")]
    vit = next((r for r in vits if not r["checkpointing"]), vits[0] if vits else None)
    gan = next((r for r in rows if r["model"] == "x2ctgan"), None)
    for row in rows:
        row["vs_vit"] = row["seconds"] / vit["seconds"] if vit else float("nan")
        row["vs_x2ctgan"] = row["seconds"] / gan["seconds"] if gan else float("nan")
    for row in rows:  # memory cut and targets, pairing each checkpointed row with its plain twin
        if row["checkpointing"]:
            plain = next((r for r in rows if r["model"] == row["model"] and r["tokens"] == row["tokens"]
                          and not r["checkpointing"]), None)
            if plain is None:  # its twin was not selected (--only)
                continue
            row["mem_cut"] = plain["peak_mib"] / max(row["peak_mib"], 1e-9)
            plain["mem_cut"] = row["mem_cut"]
    for row in rows:
        if quick:
            row["targets"] = "not judged (quick sizes)"
            continue
        ok = [f"ratio {'ok' if row['ratio'] >= 0.25 else 'MISSED'}"]
        if row["checkpointing"] and "mem_cut" in row:
            ok.append(f"mem {'ok' if row['mem_cut'] >= 2 else 'MISSED'}")
        row["targets"] = ", ".join(ok)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI-speed check")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per row (median)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="also time the step under torch.compile (default mode, or max-autotune, ...)")
    parser.add_argument("--only", nargs="+", metavar="MODEL[:G]",
                        help="run only these rows: a model name, or vit_cascade:24 for one token grid")
    parser.add_argument("--recipe", nargs="+", metavar="RECIPE",
                        help="also time the model these recipes build (row recipe:STEM/STAGE)")
    parser.add_argument("--stage", help="with --recipe: the stage whose model is timed (default: the last)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = run(quick=args.quick, repeat=args.repeat, compile_mode=args.compile, only=args.only,
               recipes=args.recipe, stage=args.stage)
    print(f"\nModel step, batch 1, CPU ({machine()})\n")
    print(markdown_table(rows, COLUMNS + (COMPILE_COLUMNS if args.compile else [])))


if __name__ == "__main__":
    main()

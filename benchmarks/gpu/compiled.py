"""GPU training step, eager vs ``torch.compile``, in bf16: the stage-2 ``vit_cascade`` and the ``x2ctgan`` model.

For each model (by registry name, so a model added by a plugin is measured once it is installed),
one training step (forward + backward of a mean loss, bf16 autocast, batch 1) is timed eager and
under each compile mode (``x2ct_framework.training.compile``, the recipe's ``train.compile``), each
configuration in its own process (clean memory and compile caches; a crash stays contained). Per row:
median step seconds, the first call's compile seconds, peak CUDA memory, the step's FLOPs (counted
on fake tensors, recomputation included), achieved TFLOP/s and its share of the bf16 matrix-product
peak measured in the same process (an 8192^2 bf16 matmul), and the speedup over eager.

Run on a CUDA machine (about 5-10 minutes on one H100/H200 with the default modes)::

    python -m benchmarks.gpu.compiled                       # writes benchmarks/gpu/results/compiled-<gpu>-<date>.json
    python -m benchmarks.gpu.compiled --modes eager,default,max-autotune --models vit_cascade

``--device cpu --quick`` runs the same plumbing at toy sizes on a CPU (a check, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# the stage-2 sizes of recipes/stage2_extended.toml: 128^3 output from two 128^2 views
MODELS = {
    "vit_cascade": {"options": {"tokens": 24}, "resolution": 128, "image": 128},
    "vit_cascade_cl_off": {"name": "vit_cascade", "options": {"tokens": 24, "channels_last": False},
                           "resolution": 128, "image": 128},
    "x2ctgan": {"options": {}, "resolution": 128, "image": 128},
}
QUICK = {"vit_cascade": {"options": {"tokens": 4, "dim": 32, "depth": 1, "heads": 2, "channels": 4,
                                     "encoder": "test_resnet"}, "resolution": 16, "image": 16},
         "x2ctgan": {"options": {"image_size": 64}, "resolution": 16, "image": 16}}  # image_size >= 64


def timed(fn, sync, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: str, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2 * n**3 / timed(lambda: a @ b, sync, repeat=10, warmup=3) / 1e12


def worker(cfg: dict) -> dict:
    """One (model, mode) configuration in this process."""
    import torch

    from x2ct_framework.model_info import step_flops
    from x2ct_framework.physics import make_geometry
    from x2ct_framework.plugins import get_plugin_manager
    from x2ct_framework.training.compile import compile_model

    device, mode = cfg["device"], cfg["mode"]
    registry = get_plugin_manager().registry("model")
    if cfg["name"] not in registry:
        return {"error": f"model {cfg['name']!r} is not registered here (known: {', '.join(registry.names())})"}
    torch.manual_seed(0)
    angles = [0.0, 90.0]
    model = registry.create(cfg["name"], cfg["options"], context={"resolution": cfg["resolution"], "views": angles})
    geometry_cpu = {k: v[None] for k, v in make_geometry(angles, "x2ctgan").items()}
    xrays_cpu = torch.rand(cfg["batch"], len(angles), 1, cfg["image"], cfg["image"])
    flops = step_flops(model.train(), xrays_cpu[:1], geometry_cpu) * cfg["batch"] if cfg["count_flops"] else None
    model = model.to(device).train()
    geometry = {k: v.to(device) for k, v in geometry_cpu.items()}
    xrays = xrays_cpu.to(device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    notes: list[str] = []
    if mode != "eager":
        compile_model(model, mode, log=notes.append)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(xrays, geometry)
        out.float().mean().backward()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if mode != "eager" and model.compile_fallback:
        return {"error": notes[-1] if notes else model.compile_fallback, "first_call_s": first}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, sync, repeat=cfg["repeat"], warmup=1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    ref = matmul_tflops(device, cfg["matmul"])
    row = {"seconds": seconds, "first_call_s": first, "peak_mib": peak, "matmul_bf16_tflops": ref,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if flops:
        row["step_gflop"] = flops / 1e9
        row["tflops"] = flops / seconds / 1e12
        row["share_of_bf16_matmul"] = row["tflops"] / ref
    return row


def run(models: list[str], modes: list[str], device: str, quick: bool, repeat: int, batch: int,
        log=print) -> list[dict]:
    table = QUICK if quick else MODELS
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    for key in models:
        spec = table.get(key) or {"options": {}, "resolution": 16 if quick else 128, "image": 16 if quick else 128}
        for mode in modes:
            cfg = {"name": spec.get("name", key), "options": spec["options"], "resolution": spec["resolution"],
                   "image": spec["image"], "device": device, "mode": mode, "repeat": repeat, "batch": batch,
                   "matmul": 1024 if quick else 8192, "count_flops": True}
            log(f"[gpu] {key} {mode} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.compiled", "--worker", json.dumps(cfg)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                res = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
            row = {"model": key, "mode": mode, "precision": "bf16", "resolution": spec["resolution"], "batch": batch,
                   **res, "wall_s": time.perf_counter() - t0}
            rows.append(row)
            log(f"[gpu]   {_fmt(row.get('seconds'))} s/step"
                + (f", {row['share_of_bf16_matmul']:.1%} of the bf16 matmul peak" if "share_of_bf16_matmul" in row
                   else "") + (f"; {row['error']}" if "error" in row else ""), flush=True)
    for row in rows:
        eager = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "eager" and "seconds" in r), None)
        if eager and "seconds" in row:
            row["speedup_vs_eager"] = eager["seconds"] / row["seconds"]
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.compiled", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_cascade,vit_cascade_cl_off,x2ctgan",
                   help="comma-separated: vit_cascade, vit_cascade_cl_off (decoder without channels-last 3D), x2ctgan "
                        "or any registered model name")
    p.add_argument("--modes", default="eager,default", help="eager and train.compile modes, comma-separated "
                                                              "(default, reduce-overhead, max-autotune)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="toy sizes (a plumbing check)")
    p.add_argument("--repeat", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", help="JSON file (default benchmarks/gpu/results/compiled-<gpu>-<date>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu.compiled needs a CUDA GPU (or --device cpu --quick for a plumbing check)",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = run(args.models.split(","), args.modes.split(","), args.device, args.quick, args.repeat, args.batch)
    from benchmarks.perf.common import markdown_table

    print(f"\n{name}, torch {torch.__version__}\n")
    print(markdown_table(rows, ["model", "mode", "seconds", "speedup_vs_eager", "first_call_s", "step_gflop", "tflops",
                                "matmul_bf16_tflops", "share_of_bf16_matmul", "peak_mib", "error"]))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = Path(args.out) if args.out else RESULTS / f"compiled-{slug}-{_dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": _dt.datetime.now().isoformat(),
                               "command": "python -m benchmarks.gpu.compiled " + " ".join(argv or sys.argv[1:]),
                               "quick": args.quick, "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

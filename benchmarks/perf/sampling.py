"""Sampling cost of ``flow_refiner`` beside the regression forward, and a training step's peak memory.

Models: ``--preset recipe`` builds both from ``recipes/variants/flow_refiner.toml`` (stage 2's
``vit_cascade`` and the refiner stage's ``flow_refiner``, GPU sizes, X-rays at the recipe's 256^2);
``--preset cpu`` builds the CPU matrix's sizes (``benchmarks/matrix/cpu_refiner.toml``: vit_cascade with
6^3 tokens, dim 64; flow_refiner widths [16, 32, 64], X-rays at 64^2). At each resolution, in the same
process, on one case (batch 1, eval mode, no gradients, fp32 on CPU, bf16 autocast on CUDA):

- ``regression_s``: the median time of one vit_cascade forward, the mean of its timings before and after the
  samples (``regression_drift``: after / before, how much the machine's speed moved meanwhile);
- for each step count (10, 25, 50): ``sample_s``, the median time of one flow_refiner sample (its sampler,
  Heun: two U-Net calls a step; the X-ray features computed once), and ``ratio = sample_s / regression_s``;
  the refiner runs after the regression in a cascade, so the cost of a refined volume is ``1 + ratio``
  regression forwards;
- ``train_peak_mb`` and ``stage2_train_peak_mb``: the peak memory of one training step (forward and
  backward, gradient checkpointing as the recipe sets it) of flow_refiner's ``training_loss`` and of
  stage 2's L1 step: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU (no allocator statistics) the
  weights and their gradients plus the tensors the forward pass keeps for the backward pass (counted once
  per storage through ``torch.autograd.graph.saved_tensors_hooks``), which is what sets a step's peak.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.sampling --preset cpu --resolutions 64`` (CPU) or
``python -m benchmarks.perf.sampling --preset recipe --resolutions 64 128 --device cuda`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.perf.common import machine, markdown_table

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "variants" / "flow_refiner.toml"
CPU_VIT = dict(tokens=6, dim=64, depth=2, heads=4, channels=8, kv_pool=1, encoder="test_resnet")
CPU_FLOW = dict(widths=[16, 32, 64], emb_dim=64, feature_channels=8, encoder="test_resnet")
STEPS = (10, 25, 50)


def build(preset: str, resolution: int) -> tuple[torch.nn.Module, torch.nn.Module, int, str]:
    """``(regression, refiner, X-ray size, geometry preset)`` at ``resolution``."""
    if preset == "cpu":
        from x2ct_plugins.models.flow_refiner import FlowRefiner
        from x2ct_plugins.models.vit_cascade import ViTCascade

        torch.manual_seed(0)
        return (ViTCascade(resolution=resolution, **CPU_VIT), FlowRefiner(resolution=resolution, **CPU_FLOW),
                64, "x2ctgan")
    from x2ct_framework.config.build import build_model, load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"stages.stage2.resolution={resolution}", f"stages.refiner.resolution={resolution}"])
    load_recipe_plugins(recipe)
    st = stages(recipe)
    torch.manual_seed(0)
    return build_model(recipe, st[0]), build_model(recipe, st[1]), int(recipe["data"]["image_size"]), \
        str(recipe["data"]["geometry"])


def inputs(image: int, geometry: str, device, resolution: int):
    from x2ct_framework.physics import make_geometry

    g = make_geometry([0.0, 90.0], geometry)
    geom = {k: v[None].to(device) for k, v in g.items()}
    gen = torch.Generator().manual_seed(0)
    xrays = torch.rand(1, 2, 1, image, image, generator=gen).to(device)
    ct = torch.rand(1, 1, resolution, resolution, resolution, generator=gen).to(device)
    return xrays, geom, ct


def _timed(fn, device, repeat: int, warm_up: bool = True) -> float:
    """The median of ``repeat`` timed calls, after one untimed call when ``warm_up``."""
    times = []
    for _ in range(repeat + int(warm_up)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[int(warm_up):])


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step_peak(which: str, preset: str, resolution: int, device_name: str) -> float:
    """Peak memory (MB) of one training step of the regression (``which = "regression"``: L1) or the refiner."""
    device = torch.device(device_name)
    regression, refiner, image, geometry = build(preset, resolution)
    model = (regression if which == "regression" else refiner).to(device).train()
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
        if which == "refiner":
            model.unet.checkpointing = True
    xrays, geom, ct = inputs(image, geometry, device, resolution)
    prev = torch.rand(1, 1, resolution, resolution, resolution).to(device) if which == "refiner" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with _autocast(device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if which == "regression":
            loss = (model(xrays, geom).float() - ct).abs().mean()
        else:
            loss = model.training_loss(xrays, geom, ct, prev)[0]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (2 * weights + sum(saved.values())) / 2**20


def run(quick: bool = False, preset: str = "cpu", resolutions: tuple[int, ...] | None = None,
        steps: tuple[int, ...] = STEPS, device: str = "cpu", repeat: int | None = None) -> list[dict]:
    resolutions = resolutions or ((32,) if quick else (64,))
    steps = (2,) if quick else steps
    repeat = repeat or (1 if quick else 3)
    dev = torch.device(device)
    rows = []
    for r in resolutions:
        regression, refiner, image, geometry = build(preset, r)
        regression, refiner = regression.to(dev).eval(), refiner.to(dev).eval()
        xrays, geom, _ = inputs(image, geometry, dev, r)
        with torch.no_grad(), _autocast(dev):
            prev = regression(xrays, geom)
            reg_s = reg_before = _timed(lambda: regression(xrays, geom), dev, repeat)
            # one warm-up sample of 2 steps (the U-Net's kernels and buffers), then each step count timed; the
            # regression forward is timed again after them, so a machine whose load drifts shows it
            refiner.sample(xrays, geom, prev=prev, steps=2, generator=torch.Generator().manual_seed(0))
            timed = {}
            for n in steps:
                timed[n] = _timed(lambda: refiner.sample(xrays, geom, prev=prev, steps=n,
                                                         generator=torch.Generator().manual_seed(0)), dev, repeat,
                                  warm_up=False)
                print(f"[sampling] {r}^3, {n} steps: {timed[n]:.2f} s (regression forward {reg_s:.3f} s)", flush=True)
            reg_after = _timed(lambda: regression(xrays, geom), dev, repeat, warm_up=False)
            reg_s = (reg_before + reg_after) / 2
        flow_peak = train_step_peak("refiner", preset, r, device)
        reg_peak = train_step_peak("regression", preset, r, device)
        for n in steps:
            rows.append({"preset": preset, "resolution": r, "device": device, "sampler": refiner.sampler,
                         "steps": n, "regression_s": reg_s, "regression_drift": reg_after / reg_before,
                         "sample_s": timed[n], "ratio": timed[n] / reg_s,
                         "train_peak_mb": flow_peak, "stage2_train_peak_mb": reg_peak,
                         "peak_ratio": flow_peak / max(reg_peak, 1e-9),
                         "refiner_params_m": sum(p.numel() for p in refiner.parameters()) / 1e6,
                         "stage2_params_m": sum(p.numel() for p in regression.parameters()) / 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=("cpu", "recipe"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(preset=args.preset, resolutions=tuple(args.resolutions), steps=tuple(args.steps), device=args.device,
               repeat=args.repeat)
    print(f"machine: {machine()}")
    print(markdown_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training step of ``vit_cascade`` with the implicit point decoder beside the dense one, in the same process.

The CPU matrix's model (stage 2 at 32^3 from two 32^2 views resized to 64^2, 6^3 tokens, dim 64, depth 2,
channels 8, timm's ``test_resnet``, pixel-aligned features, X2CT-GAN cone beam, batch 2, fp32): one
optimizer step (forward, L1 backward, AdamW) for ``decoder = "dense"`` and ``decoder = "implicit"``
(each point chunk recomputed in the backward pass), alternating, median of ``--steps`` after one warm-up
step each. ``ratio`` = implicit / dense median seconds, in this run.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.point_decoder [--steps N] [--resolution R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.perf.common import machine, markdown_table

OPTIONS = dict(tokens=6, dim=64, depth=2, heads=4, channels=8, encoder="test_resnet", xray_size=64,
               pixel_aligned=True)


def _setup(decoder: str, resolution: int, image: int, batch: int):
    from x2ct_framework.physics import make_geometry
    from x2ct_plugins.models.vit_cascade import ViTCascade

    torch.manual_seed(0)
    model = ViTCascade(resolution=resolution, decoder=decoder, **OPTIONS).train()
    g = make_geometry([0.0, 90.0], "x2ctgan")
    geometry = {k: v[None].expand(batch, *v.shape).clone() for k, v in g.items()}
    xrays = torch.rand(batch, 2, 1, image, image)
    target = torch.rand(batch, 1, resolution, resolution, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        (model(xrays, geometry) - target).abs().mean().backward()
        opt.step()
        return time.perf_counter() - t0

    params = sum(p.numel() for p in model.parameters())
    return step, params


def run(quick: bool = False, steps: int | None = None, resolution: int = 32) -> list[dict]:
    steps = steps or (3 if quick else 7)
    image, batch = 32, 2
    setups = {d: _setup(d, resolution, image, batch) for d in ("dense", "implicit")}
    for step, _ in setups.values():  # warm-up
        step()
    times: dict[str, list[float]] = {d: [] for d in setups}
    for _ in range(steps):
        for d, (step, _) in setups.items():
            times[d].append(step())
    dense = statistics.median(times["dense"])
    rows = []
    for d, (_, params) in setups.items():
        med = statistics.median(times[d])
        rows.append({"decoder": d, "resolution": resolution, "batch": batch, "steps": steps, "params": params,
                     "seconds": round(med, 4), "ratio": round(med / dense, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    rows = run(steps=args.steps, resolution=args.resolution)
    print(machine())
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

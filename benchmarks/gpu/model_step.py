"""GPU model step: the user's stage 2 (128^3 output, two 128^2 views, 24^3 and 32^3 tokens).

One training step (forward + backward) at batch 1 for ``vit_cascade`` at its default sizes, in fp32
and in bf16 autocast, with and without gradient checkpointing, plus the attention kernel alone
under each scaled-dot-product backend (flash, memory-efficient, math) at the 24^3-token shape. The
reference is a large bf16/fp32 matrix product measured in the same process.

Run on a CUDA machine: ``python -m benchmarks.gpu.model_step [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.perf.common import markdown_table


def cuda_time(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / cuda_time(lambda: a @ b) / 1e12


def model_rows(tokens_list=(24, 32)) -> list[dict]:
    from x2ct_framework.model_info import step_flops
    from x2ct_framework.physics import make_geometry
    from x2ct_framework.plugins import get_plugin_manager

    rows = []
    ref = {"fp32": matmul_tflops(torch.float32), "bf16": matmul_tflops(torch.bfloat16)}
    angles = [0.0, 90.0]
    geometry_cpu = {k: v[None] for k, v in make_geometry(angles, "x2ctgan").items()}
    geometry = {k: v.cuda() for k, v in geometry_cpu.items()}
    for tokens in tokens_list:
        for precision in ("fp32", "bf16"):
            for ckpt in (False, True):
                torch.manual_seed(0)
                model = get_plugin_manager().registry("model").create(
                    "vit_cascade", {"tokens": tokens},
                    context={"resolution": 128, "views": angles, "gradient_checkpointing": ckpt}).cuda().train()
                xrays = torch.rand(1, 2, 1, 128, 128, device="cuda")
                model_cpu_flops = None
                if precision == "fp32" and not ckpt:
                    model_cpu = model.cpu()
                    model_cpu_flops = step_flops(model_cpu, xrays.cpu(), geometry_cpu)
                    model.cuda()

                def step():
                    model.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        out = model(xrays, geometry)
                    out.float().mean().backward()

                torch.cuda.empty_cache()
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                seconds = cuda_time(step, repeat=5, warmup=1)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                row = {"tokens": tokens, "precision": precision, "checkpointing": ckpt, "seconds": seconds,
                       "peak_mib": peak, "matmul_tflops": ref[precision]}
                if model_cpu_flops is not None:
                    row["step_gflop"] = model_cpu_flops / 1e9
                rows.append(row)
                model = None  # frees the GPU memory before the next configuration
    flops = {r["tokens"]: r["step_gflop"] for r in rows if "step_gflop" in r}
    for r in rows:
        r["step_gflop"] = flops[r["tokens"]]
        r["tflops"] = r["step_gflop"] / r["seconds"] / 1e3
        r["ratio"] = r["tflops"] / r["matmul_tflops"]
    return rows


def attention_rows(tokens: int = 24, dim: int = 256, heads: int = 8) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = tokens**3
    q, k, v = (torch.randn(1, heads, n, dim // heads, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def fwd_bwd():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
        try:
            torch.cuda.reset_peak_memory_stats()
            seconds = cuda_time(fwd_bwd, repeat=5, warmup=1)
            rows.append({"backend": name, "tokens": n, "seconds": seconds,
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
        except RuntimeError as exc:
            rows.append({"backend": name, "tokens": n, "error": str(exc).splitlines()[0][:120]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0)
    att = attention_rows()
    models = model_rows()
    print(f"device: {device}, torch {torch.__version__}")
    print(markdown_table(att))
    print()
    print(markdown_table(models, ["tokens", "precision", "checkpointing", "seconds", "step_gflop", "tflops",
                                  "matmul_tflops", "ratio", "peak_mib"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "attention": att, "model": models}, f, indent=2)


if __name__ == "__main__":
    main()

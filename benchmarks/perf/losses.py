"""Loss terms: forward + backward time of every built-in loss on one volume, with in-run references.

``python -m benchmarks.perf.losses [--quick]`` (full: 128^3, the seed's stage-2 resolution; quick:
48^3 and fewer repeats, a CI smoke run). Each row is the median wall time of ``loss(pred, target,
batch)`` plus ``backward()`` with a prediction that requires grad:

- ``ssim_3d``: ours (``x2ct_framework.ssim``, banded-matrix separable filtering) against
  ``pytorch_msssim.ssim`` on the same 5D input (Gaussian window 11, sigma 1.5, valid convolution,
  i.e. the same cropped-border convention), ``ratio`` = ours / reference (target <= 0.5) and
  ``value_diff`` = |ours - reference| of the SSIM value (target <= 1e-4);
- every other term: ``reference`` is the plain ``l1`` term measured in the same run, ``ratio`` =
  term / l1, i.e. how many L1 terms one step of it costs. Perceptual networks use random weights
  (the timing does not depend on them).
"""

from __future__ import annotations

import sys
import warnings

import torch

from benchmarks.perf.common import machine, markdown_table, timeit

COLUMNS = ["benchmark", "ours", "reference", "unit", "ratio", "value_diff", "note"]

TERMS = [  # (row name, registry name, options)
    ("l1", "l1", {}),
    ("ssim_2d", "ssim", {"mode": "2d"}),
    ("gradient", "gradient", {"mode": "both"}),
    ("vgg", "vgg", {"weights": "random", "slices": 3}),
    ("lpips", "lpips", {"weights": "random", "slices": 3}),
    ("adversarial_generator", "adversarial", {}),
    ("bone", "bone", {"use_labels": False}),
    ("vessel", "vessel", {"use_labels": False}),
    ("landmark", "landmark", {"use_labels": False}),
    ("reprojection", "reprojection", {}),
]


def make_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A chest-like target with its DRR views and a noisy prediction, batch of one."""
    from x2ct_framework.testing import make_batch

    batch = make_batch(1, resolution=size, image_size=size)
    target = batch["ct"]
    g = torch.Generator().manual_seed(0)
    pred = (target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target, batch


def fwd_bwd(loss, pred: torch.Tensor, target: torch.Tensor, batch: dict):
    def step():
        p = pred.detach().requires_grad_(True)
        value = loss(p, target, batch)
        value.backward()
        return value

    return step


def ssim_rows(pred, target, repeat: int) -> list[dict]:
    from pytorch_msssim import ssim as reference_ssim

    from x2ct_framework.ssim import ssim

    ours_fn = fwd_bwd(lambda p, t, b: 1 - ssim(p, t).mean(), pred, target, {})
    ref_fn = fwd_bwd(lambda p, t, b: 1 - reference_ssim(p, t, data_range=1.0, win_size=11, win_sigma=1.5), pred,
                     target, {})
    # interleaved A-B-A-B so drifting machine load hits both alike
    ours_t, ref_t = [], []
    for _ in range(2):
        ours_t.append(timeit(ours_fn, repeat=repeat)["median_s"])
        ref_t.append(timeit(ref_fn, repeat=repeat)["median_s"])
    ours, ref = min(ours_t), min(ref_t)
    with torch.no_grad():
        diff = abs(ssim(pred, target).item() - reference_ssim(pred, target, data_range=1.0, win_size=11,
                                                                win_sigma=1.5).item())
    return [{"benchmark": "ssim_3d", "ours": 1e3 * ours, "reference": 1e3 * ref, "unit": "ms fwd+bwd",
             "ratio": ours / ref, "value_diff": diff,
             "note": "reference pytorch_msssim.ssim (5D, win 11, sigma 1.5); target ratio <= 0.5, diff <= 1e-4"}]


def run(quick: bool = False) -> list[dict]:
    from x2ct_framework.plugins import get_plugin_manager

    size = 48 if quick else 128
    repeat = 2 if quick else 3
    pred, target, batch = make_inputs(size)
    reg = get_plugin_manager().registry("loss")
    context = {"hu_window": [-1000.0, 3000.0]}
    rows = ssim_rows(pred, target, repeat + 2)
    l1_s = None
    for row_name, name, options in TERMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = reg.create(name, options, context=context)
        note = f"{size}^3, options {options}" if options else f"{size}^3"
        if name == "adversarial":
            # one critic update first, so the generator term runs through the discriminator
            parts_opt = loss.configure_optimizer(loss.trainable_parts().parameters())
            critic = loss.parts_loss(pred, target, batch, epoch=0, step=0)
            critic.backward()
            parts_opt.step()
            t = timeit(fwd_bwd(loss, pred, target, batch), repeat=repeat)["median_s"]

            def critic_step():
                parts_opt.zero_grad()
                loss.parts_loss(pred, target, batch, epoch=0, step=0).backward()

            c = timeit(critic_step, repeat=repeat)["median_s"]
            rows.append(_row(row_name, t, l1_s, note + "; generator objective through the critic"))
            rows.append(_row("adversarial_critic", c, l1_s, f"{size}^3; parts_loss fwd+bwd (real and fake)"))
            continue
        cheap = name in ("l1", "bone", "gradient", "landmark")  # sub-millisecond at 48^3: more runs
        t = timeit(fwd_bwd(loss, pred, target, batch), repeat=20 if cheap else repeat,
                   warmup=5 if cheap else 1)["median_s"]
        if name == "l1":
            l1_s = t
        rows.append(_row(row_name, t, l1_s, note))
    return rows


def _row(name: str, seconds: float, l1_s: float | None, note: str) -> dict:
    return {"benchmark": name, "ours": 1e3 * seconds, "reference": 1e3 * l1_s if l1_s else None,
            "unit": "ms fwd+bwd", "ratio": seconds / l1_s if l1_s else None, "value_diff": None,
            "note": note + ("; reference: the l1 term" if name != "l1" else "")}


def main() -> int:
    quick = "--quick" in sys.argv
    rows = run(quick=quick)
    print(f"# loss terms ({'quick' if quick else 'full'}; {machine()})\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation metrics: time per case of each protocol, against NumPy/scikit-image references in the same run.

``python -m benchmarks.perf.evaluation [--quick]`` (full: 128^3, the seed's stage-2 resolution;
quick: 48^3 and fewer repeats). Each row is the median wall time of scoring one case:

- ``x2ctgan_protocol``: ours (``x2ct_framework.evaluation.protocols``, torch) against a NumPy + scikit-image
  transcription of X2CT-GAN's ``metrics_np.py`` (float64 MAE/MSE/cosine, per-slice SSIM over three
  axes, slice and 3D PSNR on truncated integers with a peak of 4095); ``value_diff`` = the largest
  |ours - reference| over the eight numbers;
- ``default_global``: our PSNR, 3D SSIM, slice SSIM and MAE against scikit-image's
  ``peak_signal_noise_ratio`` and ``structural_similarity`` (3D, and per slice over three axes) plus
  NumPy MAE; ``value_diff`` as above;
- ``default_structures``: the nine per-structure metrics and ``landmark_mm`` (labels given), with
  ``reference`` = our whole-volume PSNR in the same run, so ``ratio`` says how many PSNRs they cost.

``ratio`` = ours / reference (lower is faster). The references run single-threaded (NumPy and
scikit-image), so ours is timed with one torch thread too; the previous thread count is restored.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from benchmarks.perf.common import machine, markdown_table, timeit

COLUMNS = ["benchmark", "size", "ours", "reference", "unit", "ratio", "value_diff", "note"]
HU = (-1024.0, 1476.0)  # maps [0, 1] onto X2CT-GAN's scale exactly


def make_case(size: int):
    from x2ct_framework.phantom import toy_chest as phantom_hu

    hu, labels = phantom_hu(size, 0)
    lo, hi = HU
    target = ((hu.clamp(lo, hi) - lo) / (hi - lo))[None, None]
    g = torch.Generator().manual_seed(0)
    pred = (target + 0.03 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred.float(), target.float(), {"labels": labels[None, None]}


def x2ctgan_reference(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """X2CT-GAN's metrics_np.py formulas for one case [D, H, W] in [0, 1] (float32 inputs)."""
    from skimage.metrics import structural_similarity

    r, g = target.astype(np.float64), np.clip(pred, 0, 1).astype(np.float64)
    out = {"mae0": np.abs(r - g).mean(), "mse0": ((r - g) ** 2).mean(),
           "cosine": (r * g).sum() / (np.linalg.norm(r) * np.linalg.norm(g))}
    ssims = []
    for axis in range(3):
        a, b = np.moveaxis(r, axis, -1), np.moveaxis(g, axis, -1)
        ssims.append(structural_similarity(a, b, data_range=1.0, channel_axis=-1))
    out["ssim"] = float(np.mean(ssims))
    ri = (np.clip(target, 0, 1).astype(np.float32) * 2500).astype(np.int32).astype(np.float64)
    gi = (np.clip(pred, 0, 1).astype(np.float32) * 2500).astype(np.int32).astype(np.float64)
    se = (ri - gi) ** 2
    psnrs = []
    for axes in ((1, 2), (0, 2), (0, 1)):
        mse = se.mean(axis=axes)
        p = 20 * np.log10(4095 / np.sqrt(np.where(mse == 0, 1e-10, mse)))
        psnrs.append(np.where(mse == 0, 100.0, p).mean())
    out["psnr"] = float(np.mean(psnrs))
    out["psnr_3d"] = float(20 * np.log10(4095 / np.sqrt(se.mean())))
    out["mae"], out["mse"] = float(np.abs(ri - gi).mean()), float(se.mean())
    return out


def default_reference(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p, t = pred.astype(np.float64), target.astype(np.float64)
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    slice_ssim = np.mean([structural_similarity(np.moveaxis(t, a, -1), np.moveaxis(p, a, -1), channel_axis=-1, **kw)
                          for a in range(3)])
    return {"psnr": peak_signal_noise_ratio(t, p, data_range=1.0), "ssim": structural_similarity(t, p, **kw),
            "ssim2d": slice_ssim, "mae_hu": np.abs(p - t).mean() * (HU[1] - HU[0])}


def _interleaved(a, b, repeat: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(2):
        ta.append(timeit(a, repeat=repeat)["median_s"])
        tb.append(timeit(b, repeat=repeat)["median_s"])
    return min(ta), min(tb)


def run(quick: bool = False) -> list[dict]:
    size, repeat = (48, 2) if quick else (128, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rows(size, repeat)
    finally:
        torch.set_num_threads(threads)


def _rows(size: int, repeat: int) -> list[dict]:
    from x2ct_framework.evaluation.metrics import MAE, PSNR, SSIM
    from x2ct_framework.evaluation.protocols import build_protocol

    pred, target, batch = make_case(size)
    pn, tn = pred[0, 0].numpy(), target[0, 0].numpy()
    rows = []

    x2ct = build_protocol("x2ctgan", HU)
    ours_fn = lambda: x2ct(pred, target, batch)  # noqa: E731
    ref_fn = lambda: x2ctgan_reference(pn, tn)  # noqa: E731
    ours, ref = _interleaved(ours_fn, ref_fn, repeat)
    mine = {k.split("/")[1]: v.item() for k, v in ours_fn().items()}
    theirs = ref_fn()
    diff = max(abs(mine[k] - theirs[k]) / max(1.0, abs(theirs[k])) for k in theirs)
    rows.append({"benchmark": "x2ctgan_protocol", "size": f"{size}^3", "ours": 1e3 * ours, "reference": 1e3 * ref,
                 "unit": "ms per case", "ratio": ours / ref, "value_diff": diff,
                 "note": "reference: NumPy + scikit-image transcription of metrics_np.py; diff relative"})

    metrics = {"psnr": PSNR(HU), "ssim": SSIM(HU, mode="3d"), "ssim2d": SSIM(HU, mode="2d"), "mae_hu": MAE(HU)}
    ours_fn = lambda: {k: m(pred, target, batch).item() for k, m in metrics.items()}  # noqa: E731
    ref_fn = lambda: default_reference(pn, tn)  # noqa: E731
    ours, ref = _interleaved(ours_fn, ref_fn, repeat)
    mine, theirs = ours_fn(), ref_fn()
    diff = max(abs(mine[k] - theirs[k]) / max(1.0, abs(theirs[k])) for k in theirs)
    rows.append({"benchmark": "default_global", "size": f"{size}^3", "ours": 1e3 * ours, "reference": 1e3 * ref,
                 "unit": "ms per case", "ratio": ours / ref, "value_diff": diff,
                 "note": "psnr, ssim (3D), ssim2d, mae_hu vs scikit-image / NumPy; diff relative"})

    default = build_protocol("default", HU, lpips=False)
    structural = {k: m for k, m in default.metrics.items() if default.groups[k] != "global"}
    ours_fn = lambda: [m(pred, target, batch) for m in structural.values()]  # noqa: E731
    ref_fn = lambda: metrics["psnr"](pred, target, batch)  # noqa: E731
    ours, ref = _interleaved(ours_fn, ref_fn, repeat)
    rows.append({"benchmark": "default_structures", "size": f"{size}^3", "ours": 1e3 * ours, "reference": 1e3 * ref,
                 "unit": "ms per case", "ratio": ours / ref, "value_diff": "",
                 "note": f"{len(structural)} metrics (lung/bone/vessel psnr, mae, dice; landmark_mm); "
                         "reference: our psnr"})
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(f"Evaluation metrics ({machine()}; timed with 1 torch thread)\n")
    print(markdown_table(run(quick), COLUMNS))

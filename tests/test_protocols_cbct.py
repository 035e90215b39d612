"""Protocols ``sparc`` and ``c2rv``: the authors' metric code (scikit-image) as the reference, their CSV columns."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from x2ct_framework.evaluation.protocols import build_protocol
from x2ct_framework.phantom import chest_phantom

skimage_metrics = pytest.importorskip("skimage.metrics")

WINDOW = (-1024.0, 3072.0)


def pair(seed: int = 0, size: int = 24):
    hu, _ = chest_phantom(size, seed=seed)
    noisy = hu + 80.0 * torch.randn(hu.shape, generator=torch.Generator().manual_seed(seed))
    to01 = lambda x: ((x.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))[None, None].double()  # noqa: E731
    return to01(noisy), to01(hu)


def sparc_case_metrics(recon_hu: np.ndarray, gt_hu: np.ndarray, hu_min: float = -1024, hu_max: float = 1024):
    """SPARC's ``case_metrics`` (src/utils/train_common.py), restated on int16 HU volumes."""
    rec = np.clip(recon_hu.astype(np.float32), hu_min, hu_max)
    tgt = np.clip(gt_hu.astype(np.float32), hu_min, hu_max)
    mse = float(np.mean((rec - tgt) ** 2) / ((hu_max - hu_min) ** 2))
    psnr = -10.0 * np.log10(max(mse, 1e-12))
    ssim = skimage_metrics.structural_similarity((tgt - hu_min) / (hu_max - hu_min), (rec - hu_min) / (hu_max - hu_min),
                                                 data_range=1.0)
    return psnr, ssim


def test_sparc_equals_their_case_metrics():
    proto = build_protocol("sparc", WINDOW)
    for seed in (0, 1):
        pred, target = pair(seed)
        ours = proto(pred, target, {})
        to_int16 = lambda x: np.rint((x[0, 0].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0])).astype(np.int16)  # noqa: E731
        psnr, ssim = sparc_case_metrics(to_int16(pred), to_int16(target))
        assert ours["sparc/psnr_db"].item() == pytest.approx(psnr, abs=1e-4)
        assert ours["sparc/ssim"].item() == pytest.approx(ssim, abs=1e-5)
    assert proto.per_volume == ("sparc.csv", {"ct_path": "", "psnr_db": "psnr_db", "ssim": "ssim"})
    narrow = build_protocol("sparc", (-1000.0, 1000.0))
    assert any("does not cover SPARC" in n for n in narrow.notes)


def test_c2rv_equals_skimage_with_explicit_data_range():
    proto = build_protocol("c2rv", WINDOW)
    pred, target = pair(2)
    pred = pred * 1.1 - 0.02  # some values outside [0, 1], which the protocol clips as their evaluate.py
    ours = proto(pred, target, {})
    image, output = target[0, 0].numpy(), np.clip(pred[0, 0].numpy(), 0, 1)
    assert ours["c2rv/psnr"].item() == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(image, output, data_range=1.0), abs=1e-6)
    assert ours["c2rv/ssim"].item() == pytest.approx(
        skimage_metrics.structural_similarity(image, output, data_range=1.0), abs=1e-6)
    # the default data range of 2 (older scikit-image on float volumes) gives a higher SSIM: why it is explicit
    assert skimage_metrics.structural_similarity(image, output, data_range=2.0) > ours["c2rv/ssim"].item()


def test_evaluate_writes_sparcs_csv_columns(tmp_path):
    from test_evaluate import make_run

    from x2ct_framework.cli import main as x2ct_main

    run = make_run(tmp_path)
    assert x2ct_main(["evaluate", str(run), "--protocol", "sparc", "c2rv", "--bootstrap", "10",
                      "--worst", "0", "--no-progress"]) == 0
    out = run / "eval" / "stage1-test"
    with (out / "sparc.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ct_path", "psnr_db", "ssim"] and len(rows) == 4
    with (out / "per_case.csv").open() as f:
        per_case = list(csv.DictReader(f))
    assert [r[0] for r in rows[1:]] == [r["case_id"] for r in per_case]
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([float(r["sparc/psnr_db"]) for r in per_case], abs=1e-5)
    with (out / "c2rv.csv").open() as f:
        assert next(csv.reader(f)) == ["name", "psnr", "ssim"]

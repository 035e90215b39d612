"""The new metrics through ``x2ct evaluate``: columns, set-level values and the batch's own geometry."""

from __future__ import annotations

import csv
import json
import math

import pytest

from test_evaluate import make_run
from x2ct_framework.cli import main as x2ct_main


def test_evaluate_reports_window_contrast_view_sharpness_and_set_metrics(tmp_path):
    run = make_run(tmp_path)
    assert x2ct_main(["evaluate", str(run), "--protocol", "default", "--bootstrap", "0", "--worst", "0",
                      "--lpips", "off", "--no-progress"]) == 0
    out = run / "eval" / "stage1-test"
    with (out / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    for name in ("psnr_lung", "ssim_soft", "contrast_retention", "contrast_lungs", "heldout_view_psnr",
                 "heldout_view_ncc", "hf_energy_ratio", "edge_sharpness", "uncertainty_spearman", "fid3d", "kid3d"):
        assert f"default/{name}" in rows[0], name
    # the phantom batches carry their geometry: every case has a held-out-view score
    assert all(math.isfinite(float(r["default/heldout_view_psnr"])) for r in rows)
    assert all(r["default/fid3d"] == "" and r["default/uncertainty_spearman"] == "" for r in rows)
    metrics = json.loads((out / "summary.json").read_text())["protocols"]["default"]["metrics"]
    fid = metrics["fid3d"]
    assert fid["n"] == 3 and math.isfinite(fid["mean"]) and fid["mean"] >= -1e-9 and fid["group"] == "set"
    assert fid["unit"] == "random features" and not fid["higher_is_better"]
    assert metrics["uncertainty_spearman"]["n"] == 0  # the model gives no standard deviation
    assert metrics["contrast_retention"]["unit"] == "ratio" and metrics["contrast_retention"]["group"] == "contrast"
    md = (out / "summary.md").read_text()
    assert "`default/heldout_view_psnr`" in md and "`default/fid3d`" in md and "`default/psnr_soft`" in md
    assert "`default/lpips3`" not in md and "lpips3" not in metrics  # --lpips off leaves both LPIPS out
    assert metrics["psnr_soft"]["mean"] == pytest.approx(
        sum(float(r["default/psnr_soft"]) for r in rows) / 3, rel=1e-6)

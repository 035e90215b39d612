"""benchmarks/compare.py: paired differences of two per-volume tables, case by case."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.compare import compare, main, read_table
from x2ct_framework.evaluation.evaluators import roc_auc


def write(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_pairs_rows_by_case_and_gives_the_paired_difference(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(30, 3, 20)
    y = np.arange(20) % 2
    sa = rng.normal(size=20) + 0.3 * y
    sb = y + 0.01 * np.arange(20)  # separates perfectly
    head = ["case_id", "c2rv/psnr", "pe_detectability/label", "pe_detectability/score_generated"]
    a = write(tmp_path / "a.csv", head, [(f"c{i}", x[i], y[i], sa[i]) for i in range(20)] + [("only_a", 1, 0, 0)])
    b = write(tmp_path / "b.csv", head, [(f"c{i}", x[i] + 1.5, y[i], sb[i]) for i in reversed(range(20))])
    rows = {r["column"]: r for r in compare(read_table(a), read_table(b), n_boot=500)}
    psnr = rows["c2rv/psnr"]
    assert psnr["n"] == 20 and psnr["diff"] == pytest.approx(1.5) and psnr["ci_low"] == pytest.approx(1.5)
    auc = rows["AUC of pe_detectability/score_generated"]
    assert auc["mean_a"] == pytest.approx(roc_auc(y, sa)) and auc["mean_b"] == 1.0
    assert auc["diff"] == pytest.approx(1.0 - roc_auc(y, sa)) and auc["ci_low"] <= auc["diff"] <= auc["ci_high"]
    assert main([str(a), str(b), "--columns", "c2rv/psnr", "--bootstrap", "100"]) == 0
    assert "| `c2rv/psnr` | 20 |" in capsys.readouterr().out


def test_a_published_table_is_paired_through_its_own_names(tmp_path):
    a = write(tmp_path / "ours.csv", ["case_id", "sparc/psnr_db"], [("v1", 30.0), ("v2", 31.0)])
    b = write(tmp_path / "sparc.csv", ["ct_path", "psnr_db", "ssim"], [("v1", 29.0), ("v2", 30.5)])
    rows = compare(read_table(a), read_table(b, "ct_path", {"psnr_db": "sparc/psnr_db"}), n_boot=100)
    assert [r["column"] for r in rows] == ["sparc/psnr_db"] and rows[0]["diff"] == pytest.approx(-0.75)
    with pytest.raises(SystemExit, match="no id column 'case_id'"):
        read_table(b)
    with pytest.raises(SystemExit, match="no case is in both tables"):
        compare(read_table(a), {"x": {"sparc/psnr_db": 1.0}})

"""benchmarks/clinical.py: the evaluators over a run folder's test split, one table row per run."""

from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_the_clinical_benchmark_writes_a_row_per_run(tmp_path):
    from benchmarks.clinical import COLUMNS, main
    from test_evaluate import make_run

    run = make_run(tmp_path, num_test=4, **{"num_train = 4": "num_train = 10"})
    out = tmp_path / "clinical"
    assert main([str(run), "--pe-fraction", "0.5", "--option", "pe_detectability.epochs=2",
                 "--option", "pe_detectability.width=2", "--option", "distribution.bootstrap=0",
                 "--option", "distribution.slices=2", "--bootstrap", "50", "--out", str(out)]) == 0
    text = (out / "clinical.md").read_text()
    assert "| tiny | 4 |" in text and "AUC generated CT" in text
    rows = list(csv.DictReader((out / "clinical.csv").open()))
    assert len(rows) == 1 and rows[0]["run"] == "tiny"
    assert float(rows[0]["pe_detectability/auc_real"]) >= 0.0 or rows[0]["pe_detectability/auc_real"] == ""
    assert {f"{e}/{k}" for _, e, k in COLUMNS} <= set(rows[0])
    cases = list(csv.DictReader((out / "tiny" / "per_case.csv").open()))
    assert len(cases) == 4 and "pe_detectability/score_generated" in cases[0]
    assert "organ_consistency/vessel_dice" in cases[0]

"""Evaluators as an extension point: the hook, recipe and command-line names, outputs, the contract kit."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from conftest import REPO
from x2ct_framework.errors import PluginError, RecipeError
from x2ct_framework.evaluation.evaluators import (EvaluatorResult, build_evaluators, check_result, summary_entry)
from x2ct_framework.testing import ContractError, check_evaluator, registered_component

EXAMPLE_SRC = REPO / "examples" / "x2ct-example-plugin" / "src"


@pytest.fixture
def hu_shift(monkeypatch):
    """The example package's evaluator class, imported from its source folder."""
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from x2ct_example_plugin.hu_shift import HUShift

    yield HUShift
    for name in [m for m in sys.modules if m.startswith("x2ct_example_plugin")]:
        del sys.modules[name]


def test_the_example_plugin_evaluator_keeps_the_contract(hu_shift):
    passed = check_evaluator(hu_shift(), build=lambda: hu_shift(tolerance_hu=10.0))
    assert "the same values one case per batch" in passed
    with registered_component("evaluator", "hu_shift", hu_shift):
        assert "builds" in check_evaluator("hu_shift", options={"tolerance_hu": 5.0})


class _Short:
    """Forgets the last case: its per-case column is one value short."""

    def start(self, context):
        self.n = 0

    def update(self, pred, target, batch):
        self.n += pred.shape[0]

    def result(self):
        return EvaluatorResult(per_case={"x": np.zeros(self.n - 1)}, summary={"m": summary_entry(1.0, (2.0, 0.0))})


def test_the_kit_names_a_broken_evaluator():
    with pytest.raises(ContractError, match=r"per-case column 'x' has shape \(5,\), expected one value per case"):
        check_evaluator(_Short())
    with pytest.raises(PluginError, match="ci_low"):
        check_result("bad", "test", EvaluatorResult(summary={"m": {"value": 1.0}}), 0)


def test_an_unknown_evaluator_lists_the_available_ones():
    with pytest.raises(RecipeError) as err:
        build_evaluators(["pe_detect"], where="--evaluators")
    text = str(err.value)
    assert "--evaluators" in text and 'unknown evaluator "pe_detect"' in text
    assert "pe_detectability" in text and "organ_consistency" in text and "distribution" in text


def test_a_recipe_names_its_evaluators_and_an_unknown_one_is_an_error(tiny_recipe):
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(tiny_recipe, ["eval.evaluators=[\"distribution\"]"])
    assert recipe["eval"]["evaluators"] == ["distribution"] and recipe["eval"]["evaluator_options"] == {}
    assert load_recipe(tiny_recipe)["eval"]["evaluators"] == []
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny_recipe, ["eval.evaluators=[\"organ_consistncy\"]"])
    text = str(err.value)
    assert "eval -> evaluators" in text and "'organ_consistncy'" in text and "organ_consistency" in text
    with pytest.raises(RecipeError, match=r"evaluator_options -> nope: 'nope' is not one of eval.evaluators"):
        load_recipe(tiny_recipe, ["eval.evaluator_options.nope.x=1"])
    with pytest.raises(RecipeError, match="unknown option for evaluator 'distribution'"):
        load_recipe(tiny_recipe, ["eval.evaluators=[\"distribution\"]", "eval.evaluator_options.distribution.slics=2"])


def test_x2ct_evaluate_writes_a_plugin_evaluators_columns_and_summary(tmp_path, hu_shift, capsys):
    from test_evaluate import make_run
    from x2ct_framework.cli import main as x2ct_main

    run = make_run(tmp_path, num_test=3)
    out = tmp_path / "ev"
    with registered_component("evaluator", "hu_shift", hu_shift):
        assert x2ct_main(["evaluate", str(run), "--protocol", "c2rv", "--evaluators", "hu_shift", "--bootstrap", "50",
                          "--worst", "0", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 3 and "hu_shift/shift_hu" in rows[0] and "c2rv/psnr" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["evaluators"]["hu_shift"]
    assert entry["skipped"] is None and entry["per_case_columns"] == ["hu_shift/shift_hu"]
    shifts = [float(r["hu_shift/shift_hu"]) for r in rows]
    assert entry["summary"]["mean_shift_hu"]["value"] == pytest.approx(np.mean(shifts), rel=1e-6)
    assert "## Evaluator `hu_shift`" in (out / "summary.md").read_text()
    assert "hu_shift/mean_shift_hu" in capsys.readouterr().out


def test_without_evaluators_the_outputs_are_unchanged(tmp_path):
    from test_evaluate import make_run
    from x2ct_framework.cli import main as x2ct_main

    run = make_run(tmp_path, num_test=2)
    out = tmp_path / "ev"
    assert x2ct_main(["evaluate", str(run), "--protocol", "c2rv", "--bootstrap", "20", "--worst", "0",
                      "--no-progress", "--out", str(out)]) == 0
    header = next(csv.reader((out / "per_case.csv").open()))
    assert header == ["case_id", "c2rv/psnr", "c2rv/ssim"]
    assert "evaluators" not in json.loads((out / "summary.json").read_text())


def test_a_skipped_evaluator_is_reported_with_its_reason(tmp_path, capsys):
    from test_evaluate import make_run
    from x2ct_framework.cli import main as x2ct_main
    from x2ct_framework.evaluation.evaluators import EvaluatorSkipped

    def needs_weights():
        raise EvaluatorSkipped("the weights are not in /nowhere; put them there")

    run = make_run(tmp_path, num_test=2)
    out = tmp_path / "ev"
    with registered_component("evaluator", "needs_weights", needs_weights):
        assert x2ct_main(["evaluate", str(run), "--protocol", "c2rv", "--evaluators", "needs_weights", "--bootstrap",
                          "20", "--worst", "0", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluators"]["needs_weights"]["skipped"] == "the weights are not in /nowhere; put them there"
    assert "SKIPPED: the weights are not in /nowhere" in (out / "summary.md").read_text()
    assert "evaluator needs_weights: SKIPPED" in capsys.readouterr().err


def test_trackers_receive_the_evaluators_summary_numbers():
    from x2ct_framework.training.trackers import final_values

    summary = {"protocols": {}, "evaluators": {
        "pe_detectability": {"summary": {"auc_generated": {"value": 0.71}, "auc_xray": {"value": float("nan")}}},
        "organ_consistency": {"skipped": "no weights", "summary": {}}}}
    assert final_values({}, summary, "test") == {"final/test/pe_detectability/auc_generated": 0.71}


def test_the_recipes_evaluators_reach_the_run_report(tmp_path, hu_shift):
    from test_evaluate import make_run
    from x2ct_framework.config.build import stages
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.evaluation.report import final_evaluation

    with registered_component("evaluator", "hu_shift", hu_shift):
        run = make_run(tmp_path, num_test=2, extra='\n[eval]\nprotocols = ["c2rv"]\nevaluators = ["hu_shift"]\n'
                                                   'bootstrap = 20\nworst_cases = 0\ngallery = 0\n'
                                                   '[eval.evaluator_options.hu_shift]\ntolerance_hu = 5.0\n')
        recipe = load_recipe(run / "recipe.toml")
        text = "\n".join(final_evaluation(run, recipe, stages(recipe)[0], tmp_path / "pics", "cpu"))
    assert "### Evaluator `hu_shift`" in text and "`hu_shift/mean_shift_hu`" in text
    assert "|shift| > 5 HU" in text  # the recipe's option reached the factory


def test_x2ct_validate_catches_missing_study_labels_and_names_a_skipped_evaluator(tiny_recipe, capsys):
    from x2ct_framework.cli import main as x2ct_main

    code = x2ct_main(["validate", str(tiny_recipe), "--set", 'eval.evaluators=["pe_detectability"]'])
    err = capsys.readouterr()
    assert code == 2 and "evaluator 'pe_detectability'" in err.err + err.out
    assert "no study label 'pe_present'" in err.err + err.out
    import importlib.util

    if importlib.util.find_spec("totalsegmentator") is not None:
        return
    assert x2ct_main(["validate", str(tiny_recipe), "--set", 'eval.evaluators=["pe_detectability", '
                      '"organ_consistency"]', "--set", "data.pe_fraction=0.5", "--set",
                      'eval.evaluator_options.organ_consistency.segmenter="totalsegmentator"']) == 0
    out = capsys.readouterr().out
    assert "note: evaluator 'organ_consistency' will be skipped: TotalSegmentator is not installed" in out

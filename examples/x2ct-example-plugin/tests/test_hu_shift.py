"""The example evaluator, checked with x2ct_framework.testing as a plugin author would."""

import numpy as np
import pytest

import x2ct_example_plugin
from x2ct_framework.api import EvaluationContext
from x2ct_framework.testing import check_evaluator, isolated_plugins, make_batch, registered


@pytest.fixture
def plugins():
    with isolated_plugins(entry_points=False), registered(x2ct_example_plugin, "example_plugin") as pm:
        yield pm


def test_keeps_the_evaluator_contract(plugins):
    passed = check_evaluator("hu_shift", options={"tolerance_hu": 10.0})
    assert "the same values one case per batch" in passed


def test_a_known_shift_is_measured(plugins):
    batch = make_batch(3, resolution=16)
    ev = x2ct_example_plugin.HUShift(body_hu=-500.0)
    ev.start(EvaluationContext(hu_window=(-1000.0, 3000.0), n_boot=200))
    pred = (batch["ct"] + 40.0 / 4000.0).clamp(0, 1)  # 40 HU brighter (nothing in the body reaches the top)
    ev.update(pred, batch["ct"], batch)
    result = ev.result()
    assert np.allclose(result.per_case["shift_hu"], 40.0, atol=1e-3)
    assert result.summary["fraction_outside"]["value"] == 1.0

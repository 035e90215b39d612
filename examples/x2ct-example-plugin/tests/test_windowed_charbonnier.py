"""Tests of the example plugin, written with x2ct_framework.testing as a plugin author would."""

import pytest
import torch

import x2ct_example_plugin
from x2ct_framework.errors import RecipeError
from x2ct_framework.testing import check_loss, create, isolated_plugins, make_batch, registered

HU = [-1000.0, 3000.0]


@pytest.fixture
def plugins():
    """Only this package's hooks (registered by hand), whatever else is installed."""
    with isolated_plugins(entry_points=False), registered(x2ct_example_plugin, "example_plugin") as pm:
        yield pm


def test_registered_under_its_name(plugins):
    entry = plugins.registry("loss").get("windowed_charbonnier")
    assert entry.factory is x2ct_example_plugin.WindowedCharbonnier


def test_keeps_the_loss_contract(plugins):
    loss = create("loss", "windowed_charbonnier", {"focus_weight": 3.0}, hu_window=HU)
    passed = check_loss(loss, identical="zero")
    assert "autocast float16" in passed and "gradient flows to pred" in passed


def test_receives_the_recipe_hu_window(plugins):
    loss = create("loss", "windowed_charbonnier", {"focus_hu": [0.0, 100.0]}, hu_window=[-100.0, 100.0])
    assert loss.focus == pytest.approx((0.5, 1.0))


def test_matches_a_hand_computed_value():
    loss = x2ct_example_plugin.WindowedCharbonnier(eps=0.0 + 1e-6, focus_hu=[0.0, 1000.0], focus_weight=3.0,
                                                   hu_window=[-1000.0, 3000.0])
    target = torch.tensor([0.0, 0.3])  # -1000 HU (outside the focus), 200 HU (inside)
    pred = torch.tensor([0.1, 0.1])
    expected = (1 * 0.1 + 3 * 0.2) / (1 + 3)
    assert loss(pred, target, {}).item() == pytest.approx(expected, abs=1e-5)


def test_focus_weight_one_is_plain_charbonnier():
    batch = make_batch(2)
    target = batch["ct"]
    pred = (target + 0.05).clamp(0, 1)
    loss = x2ct_example_plugin.WindowedCharbonnier(eps=1e-3, focus_weight=1.0)
    plain = (torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3).mean()
    assert loss(pred, target, batch).item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"eps": 0.0}, "eps must be > 0"),
    ({"focus_hu": [600.0, 150.0]}, "low < high"),
    ({"focus_weight": -1.0}, "focus_weight must be >= 0"),
    ({"eps": "small"}, "eps: expected float"),
    ({"focus_wieght": 2.0}, 'did you mean "focus_weight"'),
])
def test_bad_options_are_recipe_errors(plugins, options, message):
    with pytest.raises(RecipeError, match=message):
        create("loss", "windowed_charbonnier", options, hu_window=HU)

"""Tests of the lab plugins, written with x2ct_framework.testing as a plugin author would."""

import json
import textwrap

import numpy as np
import pytest
import torch

from x2ct_framework.errors import RecipeError
from x2ct_framework.api import build_protocol
from x2ct_framework.testing import FakeTrainer, check_metric, isolated_plugins, make_batch, make_stage, registered, \
    run_hooks
from x2ct_lab_plugins import epoch_log, protocol

HU = (-1000.0, 3000.0)


@pytest.fixture
def lab_plugins():
    """Only this package's hooks (registered by hand), whatever else is installed."""
    with isolated_plugins(entry_points=False), registered(protocol, "lab_protocol"), \
            registered(epoch_log, "lab_epoch_log") as pm:
        yield pm


def test_the_protocol_against_numpy(lab_plugins):
    proto = build_protocol("lab", HU, body_hu=-400.0)
    batch = make_batch(2, resolution=8)
    target = batch["ct"]
    pred = (target + 0.01 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = proto(pred, target, batch)
    assert set(out) == {"lab/mae_body_hu", "lab/rmse_body_hu", "lab/bias_hu"}
    p, t = pred.double().numpy() * 4000 - 1000, target.double().numpy() * 4000 - 1000
    for i in range(2):
        body = t[i] > -400
        err = (p[i] - t[i])[body]
        assert out["lab/mae_body_hu"][i].item() == pytest.approx(np.abs(err).mean())
        assert out["lab/rmse_body_hu"][i].item() == pytest.approx(np.sqrt((err ** 2).mean()))
        assert out["lab/bias_hu"][i].item() == pytest.approx(err.mean())


def test_each_metric_keeps_the_metric_contract(lab_plugins):
    proto = build_protocol("lab", HU)
    check_metric(proto.metrics["mae_body_hu"], higher_is_better=False)
    check_metric(proto.metrics["rmse_body_hu"], higher_is_better=False)


def test_the_hook_writes_every_nth_epoch_with_recipe_options(lab_plugins, tmp_path):
    recipe = {"name": "t", "plugin_options": {"lab_epoch_log": {"file": "log.jsonl", "every": 2,
                                                                "keys": ["val/psnr"]}}}
    run_hooks(FakeTrainer(recipe, tmp_path), stages=[make_stage(8, epochs=3)], epochs=3)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"stage": "stage1", "epoch": 2, "val/psnr": 21.0},
                    {"stage": "stage1", "epoch": 3, "val/psnr": 22.0}]


@pytest.fixture
def lab_hooks_and_the_builtins(monkeypatch):
    """The hook plugin registered by hand, plus the framework's built-in components a recipe names: load_recipe
    checks every component of a recipe, not only its plugin options."""
    monkeypatch.setenv("X2CT_LOAD_PLUGINS", "synthetic_phantom,vit_cascade,metrics")
    with isolated_plugins(), registered(epoch_log, "lab_epoch_log") as pm:
        yield pm


def test_recipe_options_are_checked_against_the_declaration(lab_hooks_and_the_builtins, tmp_path):
    from x2ct_framework.api import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent("""
        name = "t"
        [data]
        name = "synthetic_phantom"
        [model]
        name = "vit_cascade"
        [[stages]]
        resolution = 8
        epochs = 1
        [plugin_options.lab_epoch_log]
        evry = 2
        keys = "val/psnr"
        """))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "plugin_options -> lab_epoch_log -> evry: unknown option for plugin 'lab_epoch_log'" in msg
    assert 'did you mean "every"' in msg
    assert "plugin_options -> lab_epoch_log -> keys: expected list, got 'val/psnr'" in msg
    path.write_text(path.read_text().replace("evry = 2", "every = 0").replace('keys = "val/psnr"', ""))
    with pytest.raises(RecipeError, match="lab_epoch_log: plugin 'lab_epoch_log' rejected its options: every must"):
        load_recipe(path)
    path.write_text(path.read_text().replace("every = 0", "every = 3"))
    assert load_recipe(path)["plugin_options"]["lab_epoch_log"] == {"every": 3, "file": "lab_log.jsonl",
                                                                    "keys": ["val/psnr"]}

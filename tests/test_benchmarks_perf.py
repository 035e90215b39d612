"""The performance suite's runner and the training benchmark (tiny sizes: it checks the plumbing, not speed)."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.perf import __main__ as suite  # noqa: E402
from conftest import tiny_tables  # noqa: E402


def test_suite_collects_rows_and_reports_broken_modules(monkeypatch, tmp_path):
    good = types.ModuleType("benchmarks.perf.fake_good")
    good.run = lambda quick=False: [{"benchmark": "x", "ours": 2.0, "reference": 1.0, "ratio": 2.0, "quick": quick}]
    bad = types.ModuleType("benchmarks.perf.fake_bad")

    def boom(quick=False):
        raise RuntimeError("kaput")

    bad.run = boom
    monkeypatch.setitem(sys.modules, "benchmarks.perf.fake_good", good)
    monkeypatch.setitem(sys.modules, "benchmarks.perf.fake_bad", bad)
    res = suite.run_all(["fake_good", "fake_bad", "fake_missing"], quick=True, log=lambda *a, **k: None)
    assert res["fake_good"]["rows"][0]["quick"] is True and res["fake_good"]["error"] is None
    assert res["fake_bad"]["error"] == "RuntimeError: kaput" and "Traceback" in res["fake_bad"]["traceback"]
    assert res["fake_missing"]["error"] == "benchmarks/perf/fake_missing.py does not exist"
    md = suite.to_markdown({"date": "today", "machine": "m", "command": "c", "quick": True, "modules": res})
    assert "| benchmark | ours | reference | ratio | quick |" in md and "| x | 2 | 1 | 2 | True |" in md
    assert "Not measured: RuntimeError: kaput" in md


def test_suite_command_writes_json_and_markdown(monkeypatch, tmp_path, capsys):
    mod = types.ModuleType("benchmarks.perf.fake_one")
    mod.run = lambda quick=False: [{"benchmark": "y", "ratio": 1.5}]
    monkeypatch.setitem(sys.modules, "benchmarks.perf.fake_one", mod)
    monkeypatch.setattr(suite, "MODULES", ("fake_one",))
    assert suite.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["quick"] is True and report["modules"]["fake_one"]["rows"] == [{"benchmark": "y", "ratio": 1.5}]
    assert "torch" in report["machine"] and report["command"] == "python -m benchmarks.perf --quick"
    assert "| y | 1.5 |" in (tmp_path / "perf.md").read_text()


@pytest.mark.slow
def test_training_benchmark_rows(tmp_path):
    """``train.run`` on a tiny matrix: every row present, finite, and the overhead shares add up."""
    from benchmarks.perf import train

    (tmp_path / "base.toml").write_text('name = "tinybase"\n' + tiny_tables(encoder="test_efficientnet", num_train=8,
                                                                           decoder_levels=None) + textwrap.dedent("""
        [train]
        batch_size = 2
        [[stages]]
        name = "stage2"
        resolution = 16
        epochs = 100
        losses = { l1 = 1.0, gradient = 0.15 }
    """))
    (tmp_path / "m.toml").write_text('name = "t"\nbase = "base.toml"\nseeds = [0]\n[budget]\nsteps = 2\nepochs = 1\n'
                                     '[[cells]]\nname = "baseline"\n')
    rows = {r["benchmark"]: r for r in train.run(quick=True, matrix_path=tmp_path / "m.toml")}
    assert list(rows) == ["train_e2e", "data_cold_vs_model", "data_warm_vs_model", "overhead_dispatch",
                          "overhead_loss_assembly", "overhead_bookkeeping", "overhead_total"]
    for r in rows.values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    assert "vit_cascade 16^3" in rows["train_e2e"]["note"] and "l1+gradient" in rows["train_e2e"]["note"]
    parts = sum(rows[k]["share_pct"] for k in ("overhead_dispatch", "overhead_loss_assembly", "overhead_bookkeeping"))
    assert rows["overhead_total"]["share_pct"] == pytest.approx(parts)
    assert "LossSet over 2 terms (l1, gradient)" in rows["overhead_loss_assembly"]["note"]


def test_model_benchmark_only_selects_rows_and_refuses_unknown_models():
    from benchmarks.perf import model as bench

    cfgs = bench.configs(quick=True, repeat=1)
    picked = bench.select(cfgs, ["x2ctgan", "vit_cascade:8"])
    assert [(c["model"], c["tokens"], c["checkpointing"]) for c in picked] == [
        ("vit_cascade", 8, False), ("vit_cascade", 8, True), ("x2ctgan", None, False)]
    assert bench.select(cfgs, None) == cfgs
    kv = bench.select(cfgs, ["vit_cascade_kv2"])
    assert [(c["model"], c["options"]["kv_pool"], c["checkpointing"]) for c in kv] == [
        ("vit_cascade", 2, False), ("vit_cascade", 2, True)]
    with pytest.raises(SystemExit, match="unknown model 'x2ct'"):
        bench.select(cfgs, ["x2ct"])
    with pytest.raises(SystemExit, match="selects no configuration"):
        bench.select(cfgs, ["vit_cascade:99"])


def test_model_benchmark_times_the_model_a_recipe_builds(tmp_path):
    """``--recipe``: the row's model is the recipe's own (stage overrides, checkpointing, X-ray size, views)."""
    from benchmarks.perf import model as bench
    from x2ct_framework.config import build
    from x2ct_framework.config.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text((REPO / "recipes" / "quickstart.toml").read_text())
    cfgs = bench.recipe_configs([str(recipe)], "stage2", repeat=1)
    assert [c["name"] for c in cfgs] == ["recipe:r/stage2"]
    cfg = cfgs[0]
    loaded = load_recipe(recipe)
    stage = next(s for s in build.stages(loaded) if s.name == "stage2")
    assert cfg["resolution"] == stage.resolution == 24 and cfg["image"] == 24 and cfg["angles"] == [0.0, 90.0]
    assert cfg["options"]["xray_size"] == 32 and cfg["checkpointing"] is False
    assert bench.recipe_configs([str(recipe)], None, repeat=1)[0]["stage"] == "stage3"  # default: the last stage
    assert bench.select(cfgs + bench.configs(quick=True, repeat=1), ["recipe:r/stage2"]) == cfgs
    with pytest.raises(SystemExit, match="no such stage"):
        bench.recipe_configs([str(recipe)], "stage9", repeat=1)
    res = bench.worker({**cfg, "matmul": 256})
    model = build.build_model(loaded, stage)
    n_params = sum(p.numel() for p in model.parameters())
    assert res["seconds"] > 0 and res["step_gflop"] > 0
    assert res["params"] == n_params

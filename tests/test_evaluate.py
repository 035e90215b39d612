"""x2ct evaluate: finding checkpoints, per-case and aggregate outputs, bootstrap, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RECIPE
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import CheckpointError, RecipeError
from x2ct_framework.evaluation.evaluate import aggregate, evaluate
from x2ct_framework.runs import resolve_target


def with_model(text: str, model: str) -> str:
    """The recipe ``text`` with its whole ``[model]`` table replaced by ``model`` (the table's body)."""
    out, n = re.subn(r"(?ms)^\[model\]\n.*?(?=^\[)", "[model]\n" + model.strip() + "\n\n", text, count=1)
    assert n == 1, "the recipe has no [model] table followed by another table"
    return out


def make_run(tmp_path: Path, extra: str = "", name: str = "tiny", num_test: int = 3, model: str | None = None,
             **subs) -> Path:
    """A run folder with the resolved recipe and an (untrained) stage1 best/last checkpoint, in a second."""
    from x2ct_framework.config.build import build_model, load_recipe_plugins, stages
    from x2ct_framework.checkpoint import save_checkpoint
    from x2ct_framework.config.recipe import load_recipe

    text = textwrap.dedent(TINY_RECIPE.format(out=(tmp_path / "runs").as_posix()))
    text = text.replace('name = "tiny"', f'name = "{name}"').replace("num_test = 2", f"num_test = {num_test}")
    for old, new in subs.items():
        assert old in text, f"the tiny recipe no longer holds {old!r}"
        text = text.replace(old, new)
    if model is not None:
        text = with_model(text, model)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + textwrap.dedent(extra))
    recipe = load_recipe(path)
    load_recipe_plugins(recipe)
    run = tmp_path / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.toml").write_text(recipe.to_toml())
    stage = stages(recipe)[0]
    model = build_model(recipe, stage)
    for which in ("best", "last"):
        save_checkpoint(run / stage.name / which, model, {"stage": stage.name, "epoch": 1, "step": 2, "metrics": {}})
    return run


def test_aggregate_mean_std_bootstrap_and_nan():
    v = np.array([1.0, 2.0, 3.0, 4.0, float("nan")])
    s = aggregate(v, n_boot=2000, seed=0)
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert 1.0 <= s["ci_low"] < 2.5 < s["ci_high"] <= 4.0
    assert aggregate(v, 2000, seed=0) == s  # seeded
    one = aggregate([7.0])
    assert one["n"] == 1 and one["std"] == 0.0 and one["ci_low"] == one["ci_high"] == 7.0
    assert aggregate([float("nan")])["n"] == 0 and math.isnan(aggregate([])["mean"])


def test_evaluate_cli_writes_tables_pictures_and_protocol_named_numbers(tmp_path, capsys):
    run = make_run(tmp_path)
    assert x2ct_main(["evaluate", str(run), "--bootstrap", "100", "--worst", "2", "--no-progress"]) == 0
    out = run / "eval" / "stage1-test"
    stdout = capsys.readouterr().out
    assert "`default/psnr`" in stdout and "`x2ctgan/psnr`" in stdout
    with (out / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [f"phantom-test-{i:04d}" for i in range(3)]
    cols = [c for c in rows[0] if c != "case_id"]
    assert cols and all(c.split("/")[0] in ("default", "x2ctgan") for c in cols)
    assert {"default/psnr", "default/ssim2d", "default/bone_dice", "x2ctgan/psnr_3d", "x2ctgan/ssim"} <= set(cols)
    summary = json.loads((out / "summary.json").read_text())
    psnr = summary["protocols"]["default"]["metrics"]["psnr"]
    values = [float(r["default/psnr"]) for r in rows]
    assert psnr["key"] == "default/psnr" and psnr["n"] == 3 and psnr["unit"] == "dB"
    assert psnr["mean"] == pytest.approx(np.mean(values), rel=1e-7)
    assert psnr["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-6)
    assert psnr["ci95"][0] <= psnr["mean"] <= psnr["ci95"][1]
    assert summary["protocols"]["x2ctgan"]["conventions"]
    worst = summary["worst_cases"]
    assert [w["rank"] for w in worst] == [1, 2]
    assert worst[0]["default/psnr"] == pytest.approx(min(values), rel=1e-5)
    assert all(Path(w["picture"]).is_file() for w in worst)
    md = (out / "summary.md").read_text()
    assert "## Protocol `default`" in md and "## Protocol `x2ctgan`" in md and "`x2ctgan/psnr_3d`" in md
    for link in [line.split("](")[1].rstrip(")") for line in md.splitlines() if "![" in line]:
        assert (out / link).is_file()


def test_checkpoint_folder_and_run_folder_give_the_same_numbers(tmp_path):
    run = make_run(tmp_path)
    a = evaluate(resolve_target(run), "test", ["x2ctgan"], progress=False, worst=0, n_boot=0)
    b = evaluate(resolve_target(run / "stage1" / "best"), "test", ["x2ctgan"], progress=False, worst=0, n_boot=0,
                 max_cases=2)
    assert a.info["checkpoint"] == b.info["checkpoint"] and b.info["cases"] == 2
    np.testing.assert_allclose(a.values["x2ctgan/psnr"][:2], b.values["x2ctgan/psnr"])
    # a checkpoint outside a run folder needs its recipe
    lone = tmp_path / "lone"
    (run / "stage1" / "best").rename(lone)
    with pytest.raises(RecipeError, match="--recipe"):
        resolve_target(lone)
    t = resolve_target(lone, recipe_path=run / "recipe.toml")
    assert t.stage.name == "stage1" and t.checkpoint == lone


def test_kept_cases_are_the_worst_and_the_first(tmp_path):
    run = make_run(tmp_path, num_test=5)
    ev = evaluate(resolve_target(run), "test", ["default"], progress=False, worst=2, keep_first=1, n_boot=0,
                  lpips="off")
    worst = ev.worst_indices(2)
    assert set(ev.kept) == {0, *worst}
    assert ev.values["default/psnr"][worst[0]] == ev.values["default/psnr"].min()
    rec = ev.kept[worst[0]]
    assert rec["pred"].shape == rec["ct"].shape == (1, 16, 16, 16) and rec["case_id"] == ev.case_ids[worst[0]]


@pytest.mark.parametrize("args,message", [
    (["evaluate", "{tmp}/nowhere"], "no such checkpoint or run folder"),
    (["evaluate", "{tmp}"], "neither a checkpoint folder"),
    (["evaluate", "{run}", "--protocol", "x2ctgn"], 'unknown protocol "x2ctgn"; did you mean "x2ctgan"'),
    (["evaluate", "{run}", "--stage", "stage9"], "stage 'stage9' is not in recipe"),
    (["evaluate", "{run}", "--which", "epoch0020"], "no stage has a 'epoch0020' checkpoint"),
    (["evaluate", "{run}", "--device", "cuda:7"], "--device"),
])
def test_evaluate_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    run = make_run(tmp_path)
    argv = [a.format(tmp=tmp_path, run=run) for a in args] + ["--no-progress"]
    if "--device" in args:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    assert x2ct_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    run = make_run(tmp_path)
    (run / "stage1" / "best" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        evaluate(resolve_target(run), "test", ["default"], progress=False, worst=0)

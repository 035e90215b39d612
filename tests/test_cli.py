"""Command line: exit status and messages for bad recipes; validate; a tiny run."""

import json
import subprocess

import pytest

from conftest import PYTHON, run_env
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.run import main as run_main


def test_bad_recipe_exits_2_with_message_and_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[train]\nbatchsize = 3\n')
    assert run_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "train -> batchsize: unknown key" in err
    assert "data: required table is missing" in err
    assert "Traceback" not in err


def test_bad_recipe_in_a_subprocess(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[data]\nname = 3\n')
    out = subprocess.run([PYTHON, "-m", "x2ct_framework.run", str(bad)], capture_output=True, text=True,
                         env=run_env(), timeout=120)
    assert out.returncode == 2
    assert "data -> name: expected the plugin name as a string, got 3" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_recipe_file(tmp_path, capsys):
    assert run_main([str(tmp_path / "none.toml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_validate_builds_everything(tiny_recipe, capsys):
    assert x2ct_main(["validate", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out
    assert "stage1: 16^3, model vit_cascade" in out and "losses l1x1" in out and out.strip().endswith("ok")


def test_validate_reports_unknown_plugin_option(tiny_recipe, capsys):
    assert x2ct_main(["validate", str(tiny_recipe), "--set", "model.tokenz=8"]) == 2
    err = capsys.readouterr().err
    assert "model -> tokenz: unknown option for model 'vit_cascade'" in err and 'did you mean "tokens"' in err


def test_validate_reports_unknown_loss(tiny_recipe, capsys):
    assert x2ct_main(["validate", str(tiny_recipe), "--set", "stages.1.losses.l2=1.0"]) == 2
    assert 'stages -> 1 -> losses -> l2: unknown loss "l2"' in capsys.readouterr().err


def test_tiny_run_writes_the_run_folder(tiny_recipe, tmp_path):
    assert run_main([str(tiny_recipe), "--set", "stages.1.epochs=2"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "recipe.toml").is_file() and (run / "environment.json").is_file()
    assert (run / "stage1" / "last" / "model.safetensors").is_file()
    assert (run / "stage1" / "best" / "model.safetensors").is_file()
    assert list((run / "stage1" / "previews").glob("*.png"))
    rows = [json.loads(line) for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) == 2 and all(r["val/psnr"] > 0 for r in val)
    assert "epochs = 2" in (run / "recipe.toml").read_text()


@pytest.mark.slow
def test_two_process_cpu_run_under_accelerate(tiny_recipe, tmp_path):
    """Two gloo processes: 4 training cases, per-device batch 1 -> global batch 2 -> 2 steps an epoch.

    Accelerate's ``--cpu`` flag starts a single process unless MPI is configured; ``--multi_gpu`` on a
    machine without GPUs starts torchrun processes, which the trainer joins with gloo.
    """
    out = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "x2ct_framework.run", str(tiny_recipe),
         "--set", "train.batch_size=1", "--set", "stages.1.epochs=2"],
        capture_output=True, text=True, env=run_env(), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    log = tmp_path / "runs" / "tiny" / "stage1" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    assert "global batch 2" in out.stdout

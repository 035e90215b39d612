"""--resume keeps the schedule or says so (issue 33): process count, global batch, updates per epoch."""

from __future__ import annotations

import json

import pytest

from test_outputs_stay_inside import TALLY
from test_run_safety import QUIET, digest, interrupted, copy  # noqa: F401 (fixtures)
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.errors import CheckpointError
from x2ct_framework.run import main as run_main
from x2ct_framework.training.resume_schedule import check_schedule

TWO = {"processes": 2, "global_batch": 4, "batch_size": 2, "grad_accum": 1, "steps_per_epoch": 6, "total_steps": 12}
ONE = {"processes": 1, "global_batch": 2, "batch_size": 2, "grad_accum": 1, "steps_per_epoch": 12, "total_steps": 24}


@pytest.mark.parametrize("saved, now, allowed, refused", [
    (TWO, ONE, (), ["processes", "global_batch", "steps_per_epoch"]),  # 2 processes resumed with 1
    (TWO, ONE, ("schedule.processes",), None),  # allowed by name: the rest follows from it
    (TWO, ONE, ("schedule",), None),
    (TWO, ONE, ("stages.1.lr",), ["processes"]),  # another key allowed does not allow this
    (TWO, dict(TWO, steps_per_epoch=8, total_steps=16), (), ["steps_per_epoch"]),  # the data on disk grew
    (TWO, dict(TWO, steps_per_epoch=8, total_steps=16), ("schedule.steps_per_epoch",), None),
    (TWO, dict(TWO, global_batch=8, batch_size=4, steps_per_epoch=3, total_steps=6), ("train.batch_size",), None),
    (TWO, dict(TWO, total_steps=24), (), None),  # more epochs: the recipe comparison decides (stages.N.epochs)
    (TWO, TWO, (), None),
    (None, ONE, (), None),  # a checkpoint from before the schedule was saved
], ids=["2-to-1-process", "processes-allowed", "schedule-allowed", "other-key-allowed", "data-grew",
        "data-grew-allowed", "batch-allowed-in-recipe", "epochs-only", "same", "old-checkpoint"])
def test_which_schedule_changes_a_resume_refuses(saved, now, allowed, refused):
    TALLY["tried"] += 1
    if refused:
        with pytest.raises(CheckpointError) as info:
            check_schedule("stage1", "runs/tiny/stage1/last", saved, now, allowed)
        msg = str(info.value)
        for k in refused:
            assert f"--allow-change schedule.{k}" in msg and f"schedule.{k} (" in msg, msg
        if "processes" in refused:
            assert "schedule.processes (processes): 2 -> 1" in msg and "total updates): 12 -> 24" in msg
    else:
        lines = check_schedule("stage1", "runs/tiny/stage1/last", saved, now, allowed)
        changed = saved is not None and saved != now
        assert bool(lines) == changed and (not lines or "recomputed" in lines[0])
    TALLY["passed"] += 1


def as_two_processes(run) -> None:
    """Rewrite the interrupted run's last checkpoint as a 2-process run would have saved it."""
    state_file = run / "stage1" / "last" / "state.json"
    state = json.loads(state_file.read_text())
    s = state["schedule"]
    assert s["processes"] == 1, s
    state["schedule"] = dict(s, processes=2, global_batch=2 * s["global_batch"],
                             steps_per_epoch=max(1, s["steps_per_epoch"] // 2),
                             total_steps=max(1, s["total_steps"] // 2))
    state_file.write_text(json.dumps(state))


def test_resume_with_another_process_count_is_refused_then_allowed(copy, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "runs" / "tiny"
    as_two_processes(run)
    before = digest(run)
    TALLY["tried"] += 1
    assert run_main([str(copy), "--resume", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "schedule.processes (processes): 2 -> 1" in err and "--allow-change schedule.processes" in err, err
    assert "Traceback" not in err and digest(run) == before
    assert run_main([str(copy), "--resume", "--allow-change", "schedule.processes", *QUIET]) == 0
    out = capsys.readouterr()
    assert "the learning-rate schedule is recomputed" in out.out and "processes): 2 -> 1" in out.out, out
    assert ckpt.load_state(run / "stage1" / "last")["complete"]
    assert ckpt.load_state(run / "stage1" / "last")["schedule"]["processes"] == 1
    TALLY["passed"] += 1


@pytest.mark.slow
def test_a_real_two_process_run_resumed_with_one_process_is_refused_then_recomputed(tmp_path):
    """accelerate launch with 2 gloo processes, SIGTERM in epoch 2 (last saved), then --resume with 1 process."""
    import os
    import signal
    import subprocess
    import time

    from conftest import PYTHON, run_env
    from test_trainer_processes import run, write_recipe

    TALLY["tried"] += 1
    recipe = write_recipe(tmp_path)
    args = [str(recipe), "--set", "stages.1.epochs=3", "--set", "data.num_train=8", "--set", "train.batch_size=1",
            "--set", "stages.1.losses={ slow_l1 = 1.0 }", "--set", "train.trackers=[]"]
    marker = tmp_path / "epoch2.marker"
    proc = subprocess.Popen(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "x2ct_framework.run", *args],
        cwd=tmp_path, env=run_env(X2CT_TEST_SLOW_FROM="2", X2CT_TEST_MARKER=str(marker)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the 2-process run never reached epoch 2"
    time.sleep(0.7)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    run_dir = tmp_path / "runs" / "tiny"
    state = ckpt.load_state(run_dir / "stage1" / "last")
    assert not state["complete"] and state["schedule"]["processes"] == 2, out
    assert state["schedule"]["global_batch"] == 2 and state["schedule"]["steps_per_epoch"] == 4, state["schedule"]
    before = digest(run_dir)
    refused = run([*args, "--resume"], tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "schedule.processes (processes): 2 -> 1" in refused.stderr
    assert "schedule.global_batch (global batch): 2 -> 1" in refused.stderr
    assert "schedule.steps_per_epoch (updates per epoch): 4 -> 8" in refused.stderr
    assert "total updates): 12 -> 24" in refused.stderr and "Traceback" not in refused.stderr
    assert digest(run_dir) == before, "the refused resume changed the run folder"
    allowed = run([*args, "--resume", "--allow-change", "schedule.processes"], tmp_path)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "the learning-rate schedule is recomputed" in allowed.stdout and "of 24" in allowed.stdout, allowed.stdout
    assert ckpt.load_state(run_dir / "stage1" / "last")["complete"]
    TALLY["passed"] += 1

"""Trainer runs in subprocesses: SIGKILL mid-stage + --resume, two CPU processes, the Option A command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, REPO, run_env
from test_trainer import RECIPE, TINYNET, same
from x2ct_framework import checkpoint as ckpt

SLOWDOWN = '''
"""Slows training down from a chosen epoch (env X2CT_TEST_SLOW_FROM) and marks it, so a test can kill it there."""
import os
import time
from pathlib import Path

from x2ct_framework.hookspecs import hookimpl

STATE = {"slow": False}


@hookimpl
def on_epoch_end(trainer, stage, epoch, metrics):
    start = int(os.environ.get("X2CT_TEST_SLOW_FROM", "0"))
    STATE["slow"] = bool(start) and epoch + 1 >= start - 1


@hookimpl
def register_losses(register):
    import torch.nn as nn

    class SlowL1(nn.Module):
        def forward(self, pred, target, batch):
            if STATE["slow"]:
                Path(os.environ["X2CT_TEST_MARKER"]).touch()
                time.sleep(0.5)
            return (pred - target).abs().mean()

    register("slow_l1", SlowL1)
'''


def write_recipe(tmp_path, extra: str = "") -> "os.PathLike":
    (tmp_path / "tinynet.py").write_text(TINYNET)
    (tmp_path / "slowdown.py").write_text(SLOWDOWN)
    text = RECIPE.format(out="runs").replace('plugins = ["tinynet.py"]', 'plugins = ["tinynet.py", "slowdown.py"]')
    path = tmp_path / "tiny.toml"
    path.write_text(text + extra)
    return path


def run(args, cwd, env=None, timeout=300):
    return subprocess.run([PYTHON, "-m", "x2ct_framework.run", *args], cwd=cwd, capture_output=True, text=True,
                          env=env or run_env(), timeout=timeout)


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_gives_the_same_weights(tmp_path):
    """4 epochs x 3 updates with dropout (RNG matters); killed during epoch 3, resumed, compared bit for bit."""
    recipe = write_recipe(tmp_path)
    args = [str(recipe), "--set", "stages.1.epochs=4", "--set", "data.num_train=6", "--set", "model.dropout=0.2",
            "--set", "stages.1.losses={ slow_l1 = 1.0 }", "--set", "train.trackers=[]", "--set", "train.grad_accum=1"]
    ref = run(args + ["--set", "output_dir=\"ref\""], tmp_path)
    assert ref.returncode == 0, ref.stderr

    marker = tmp_path / "epoch3.marker"
    env = run_env(X2CT_TEST_SLOW_FROM="3", X2CT_TEST_MARKER=str(marker))
    proc = subprocess.Popen([PYTHON, "-m", "x2ct_framework.run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached epoch 3"
    time.sleep(0.7)  # inside epoch 3: at least one update of it is done and lost
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = tmp_path / "runs/tiny/stage1/last"
    state = ckpt.load_state(last)
    assert state["epoch"] == 2 and not state["complete"]
    assert not list((tmp_path / "runs/tiny/stage1").glob("*.tmp"))  # nothing half-written left as last

    resumed = run(args + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "epoch 2 of 4, step 6 of 12" in resumed.stdout
    final, reference = tmp_path / "runs/tiny/stage1", tmp_path / "ref/tiny/stage1"
    assert same(ckpt.load_weights(final / "last"), ckpt.load_weights(reference / "last"))
    assert same(ckpt.load_weights(final / "best"), ckpt.load_weights(reference / "best"))
    assert ckpt.load_trainer_state(final / "last")["optimizer"]["state"][0]["exp_avg"].equal(
        ckpt.load_trainer_state(reference / "last")["optimizer"]["state"][0]["exp_avg"])
    log = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """accelerate launch, 2 gloo processes x batch 1 == 1 process x batch 2, to float tolerance."""
    recipe = write_recipe(tmp_path)
    common = [str(recipe), "--set", "stages.1.epochs=2", "--set", "train.trackers=[]"]
    one = run(common + ["--set", "output_dir=\"one\"", "--set", "train.batch_size=2"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "x2ct_framework.run", *common,
         "--set", "output_dir=\"two\"", "--set", "train.batch_size=1"],
        cwd=tmp_path, capture_output=True, text=True, env=run_env(), timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "global batch 2 = per-device batch 1 x 2 process(es) x grad_accum 1" in two.stdout
    assert "global batch 2 = per-device batch 2 x 1 process(es)" in one.stdout
    a = ckpt.load_weights(tmp_path / "one/tiny/stage1/last")
    b = ckpt.load_weights(tmp_path / "two/tiny/stage1/last")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma = ckpt.load_state(tmp_path / "one/tiny/stage1/last")["metrics"]
    mb = ckpt.load_state(tmp_path / "two/tiny/stage1/last")["metrics"]
    assert ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) < 1e-3 for k in ma)


@pytest.mark.slow
def test_option_a_on_a_fresh_clone_says_what_to_run_first_then_trains(tmp_path):
    """``recipes/stage2_extended.toml`` without stage 1's checkpoint, then with one made at CPU scale."""
    env = run_env()
    out = run([str(REPO / "recipes/stage2_extended.toml")], tmp_path, env)
    assert out.returncode == 2, out.stderr
    assert "runs/stage1/stage1/best" in out.stderr and "stage1.toml" in out.stderr
    assert "accelerate launch -m x2ct_framework.run" in out.stderr and "Traceback" not in out.stderr

    cpu = ["--set", 'data={ name = "synthetic_phantom", views = [0, 90], num_train = 2, num_val = 1 }',
           "--set", 'model={ name = "vit_cascade", tokens = 4, dim = 16, depth = 1, heads = 2, channels = 4, '
                    'encoder = "test_efficientnet", decoder_levels = 1 }',
           "--set", "train.mixed_precision=no", "--set", "train.num_workers=0", "--set", "train.trackers=[]",
           "--set", "eval.report=false", "--set", "train.progress=false", "--set", "train.log_every=1"]
    stage1 = run([str(REPO / "recipes/stage1.toml"), *cpu, "--set", "stages.1.resolution=16",
                  "--set", "stages.1.epochs=1"], tmp_path, env)
    assert stage1.returncode == 0, stage1.stderr
    option_a = run([str(REPO / "recipes/stage2_extended.toml"), *cpu, "--set", "stages.1.resolution=24",
                    "--set", "stages.1.epochs=2", "--set", "stages.1.checkpoint_every=1",
                    "--set", 'stages.1.losses.vgg={ weight = 0.1, weights = "random" }'], tmp_path, env)
    assert option_a.returncode == 0, option_a.stderr
    assert "initialised from runs/stage1/stage1/best" in option_a.stdout
    assert "adamw lr 0.0001 -> 1e-06 (cosine" in option_a.stdout
    stage2 = tmp_path / "runs/stage2_extended/stage2"
    assert {p.name for p in stage2.iterdir() if p.is_dir()} >= {"best", "last", "epoch0001", "epoch0002"}
    row = json.loads((stage2 / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/l1", "train/ssim", "train/vgg", "train/gradient"} <= set(row)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_for_the_default_vit_cascade(tmp_path):
    """The default vit_cascade (GroupNorm encoder: no BatchNorm statistics that depend on the per-process batch;
    keys and values pooled as in recipes/base.toml), tiny: 2 gloo processes x batch 1 give the loss curve and
    weights of 1 process x batch 2."""
    recipe = write_recipe(tmp_path)
    common = [str(recipe), "--set", "stages.1.epochs=1", "--set", "train.trackers=[]",
              "--set", 'model={ name = "vit_cascade", tokens = 2, dim = 8, depth = 1, heads = 1, channels = 2, '
                       'encoder = "test_resnet", decoder_levels = 1, xray_size = 16, kv_pool = 2 }']
    one = run(common + ["--set", "output_dir=\"one\"", "--set", "train.batch_size=2"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "x2ct_framework.run", *common,
         "--set", "output_dir=\"two\"", "--set", "train.batch_size=1"],
        cwd=tmp_path, capture_output=True, text=True, env=run_env(), timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr

    def curve(folder):
        rows = [json.loads(x) for x in (tmp_path / folder / "tiny/stage1/metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if r["kind"] == "train"]

    ca, cb = curve("one"), curve("two")
    assert len(ca) == len(cb) == 2
    assert all(abs(x - y) < 1e-5 for x, y in zip(ca, cb)), (ca, cb)
    a = ckpt.load_weights(tmp_path / "one/tiny/stage1/last")
    b = ckpt.load_weights(tmp_path / "two/tiny/stage1/last")
    assert a.keys() == b.keys()
    for k in a:
        # all-reduce sums in another order than one process
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

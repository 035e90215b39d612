"""Crash safety: kill -9 at random and at the worst moments of a checkpoint write, then --resume.

After every kill the run folder holds either no checkpoint yet or a ``last`` checkpoint that loads
(weights and trainer state), and ``--resume`` ends with exactly the weights of an uninterrupted
run. A full disk, a permission error or a failed rename while saving is reported with the folder
named, and the previous checkpoint survives. The killed runs are real processes; the reference and
the resumed runs run in this process with the same thread count (1), so the weights match bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, braces, run_env, tiny_tables
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import build_model, stages
from x2ct_framework.plugins import reset_plugin_manager
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.run import main as run_main

pytestmark = pytest.mark.slow

RECIPE = """
name = "crash"
seed = 3
output_dir = "{out}"

""" + braces(tiny_tables(encoder="test_efficientnet")) + """
[train]
batch_size = 2
progress = false
log_every = 1

[eval]
preview = false
report = false

[[stages]]
name = "stage1"
resolution = 16
epochs = 4
lr = 1e-3
losses = {{ l1 = 1.0 }}
"""
EPOCHS, STEPS_PER_EPOCH = 4, 2
ROWS = EPOCHS * (STEPS_PER_EPOCH + 2)  # metrics.jsonl: a row per step, one per validation, one per epoch (timing)

# Runs the trainer in a child process that SIGKILLs itself at a chosen moment of a checkpoint write:
#   weights-half-written: half of model.safetensors of the second `last` is on disk;
#   before-first-rename: the new checkpoint is complete in last.tmp, last untouched;
#   between-renames: last was moved to last.old, last.tmp not yet renamed to last.
DRIVER = r"""
import os, signal, sys
from pathlib import Path
import x2ct_framework.checkpoint as c

mode, argv = sys.argv[1], sys.argv[2:]
saves = {"last": 0}
real_save, real_os = c.save_file, os

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def save_file(tensors, path, *a, **k):
    p = Path(path)
    if p.parent.name == "last.tmp" and p.name == c.WEIGHTS:
        saves["last"] += 1
        if mode == "weights-half-written" and saves["last"] == 2:
            real_save(tensors, path, *a, **k)
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
            die()
    return real_save(tensors, path, *a, **k)

class OS:
    def __getattr__(self, name):
        return getattr(real_os, name)
    def replace(self, src, dst):
        src, dst = Path(src), Path(dst)
        if saves["last"] >= 2 and mode == "before-first-rename" and src.name == "last" and dst.name == "last.old":
            die()
        if saves["last"] >= 2 and mode == "between-renames" and src.name == "last.tmp" and dst.name == "last":
            die()
        return real_os.replace(src, dst)

c.save_file, c.os = save_file, OS()
from x2ct_framework.run import main
sys.exit(main(argv))
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The child processes run with one thread; so do the reference and resumed runs, for equal bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "crash.toml"
    path.write_text(textwrap.dedent(RECIPE.format(out=(folder / "runs").as_posix())))
    return path


def last_dir(recipe: Path) -> Path:
    return recipe.parent / "runs" / "crash" / "stage1" / "last"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of an uninterrupted run."""
    recipe = write_recipe(tmp_path_factory.mktemp("reference"))
    torch.set_num_threads(1)
    reset_plugin_manager()
    assert run_main([str(recipe)]) == 0
    reset_plugin_manager()
    state = ckpt.load_state(last_dir(recipe))
    assert (state["epoch"], state["step"], state["complete"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH, True)
    return weights(last_dir(recipe))


def rows(recipe: Path) -> list[dict]:
    path = last_dir(recipe).parent / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by the kill
                pass
    return out


def assert_loadable_or_absent(recipe: Path, must_exist: bool) -> int:
    """The folder holds no checkpoint yet or a complete one; returns its epoch (0 when none)."""
    last = last_dir(recipe)
    if not ckpt.exists(last):
        assert not must_exist, f"{last} is gone although an epoch had been saved"
        return 0
    reset_plugin_manager()
    r = load_recipe(recipe)
    model = build_model(r, stages(r)[0])
    ckpt.load_into(model, last, strict=True)
    position = ckpt.load_trainer_state(last)["position"]
    state = ckpt.load_state(last)
    assert position["epoch"] == state["epoch"] >= 1
    return state["epoch"]


def resume_and_compare(recipe: Path, reference: dict[str, torch.Tensor]) -> None:
    reset_plugin_manager()
    assert run_main([str(recipe), "--resume"]) == 0
    reset_plugin_manager()
    final = weights(last_dir(recipe))
    assert final.keys() == reference.keys()
    different = [k for k in final if not torch.equal(final[k], reference[k])]
    assert not different, f"after --resume {len(different)} tensors differ from the uninterrupted run: {different[:3]}"
    assert ckpt.load_state(last_dir(recipe))["complete"]
    assert not last_dir(recipe).with_name("last.tmp").exists() and not last_dir(recipe).with_name("last.old").exists()


def kill_at_random(recipe: Path, rng: random.Random, *extra: str) -> tuple[bool, list[dict]]:
    """Start a run and SIGKILL it after a random number of log rows plus a random delay.

    Returns whether the kill hit a running process, and the log rows written by then.
    """
    target = rng.randrange(1, ROWS - 1)
    delay = rng.uniform(0.0, 0.4)
    log = open(recipe.parent / "child.log", "a")
    proc = subprocess.Popen([PYTHON, "-m", "x2ct_framework.run", str(recipe), *extra], stdout=log, stderr=log,
                            env=run_env())
    deadline = time.monotonic() + 300
    try:
        while len(rows(recipe)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return proc.returncode == -signal.SIGKILL, rows(recipe)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_points_then_resume(seed, tmp_path, reference):
    """Two random kills in a row (the second during the resumed run), then a resume to the end."""
    rng = random.Random(seed)
    recipe = write_recipe(tmp_path)
    kills = 0
    for extra in ((), ("--resume",)):
        killed, seen = kill_at_random(recipe, rng, *extra)
        kills += killed
        # epoch e's checkpoint is written before the first training row of epoch e + 1
        saved_once = any(r.get("kind") == "train" and r.get("epoch", 0) >= 2 for r in seen)
        assert_loadable_or_absent(recipe, must_exist=saved_once)
    assert kills >= 1, (recipe.parent / "child.log").read_text()
    resume_and_compare(recipe, reference)


@pytest.mark.parametrize("mode", ["weights-half-written", "before-first-rename", "between-renames"])
def test_kill_9_inside_a_checkpoint_write(mode, tmp_path, reference):
    recipe = write_recipe(tmp_path)
    out = subprocess.run([PYTHON, "-c", DRIVER, mode, str(recipe)], capture_output=True, text=True, env=run_env(),
                         timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    last = last_dir(recipe)
    if mode == "between-renames":
        assert not last.exists() and last.with_name("last.old").is_dir()  # the worst instant
    assert assert_loadable_or_absent(recipe, must_exist=True) == 1  # epoch 2's write was cut: epoch 1 is kept
    resume_and_compare(recipe, reference)


# ---- disk full, permissions, failed renames ----------------------------------------------------------
def _fail_second_last_save(monkeypatch, where: str, exc: OSError) -> None:
    """Make the write of the second ``last`` checkpoint fail at ``where`` (weights, state or rename)."""
    calls = {"last": 0}
    real_save, real_write, real_replace = ckpt.save_file, Path.write_text, os.replace

    def save_file(tensors, path, *a, **k):
        p = Path(path)
        if p.parent.name == "last.tmp" and p.name == ckpt.WEIGHTS:
            calls["last"] += 1
            if where == "weights" and calls["last"] == 2:
                p.write_bytes(b"partial")
                raise exc
        return real_save(tensors, path, *a, **k)

    def write_text(self, *a, **k):
        if where == "state" and calls["last"] == 2 and self.parent.name == "last.tmp" and self.name == ckpt.STATE:
            raise exc
        return real_write(self, *a, **k)

    class OS:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            if where == "rename" and calls["last"] == 2 and Path(src).name == "last.tmp":
                raise exc
            return real_replace(src, dst)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(ckpt, "os", OS())


@pytest.mark.parametrize("where, exc, words", [
    ("weights", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("state", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ("rename", OSError(errno.EIO, "Input/output error"), "Input/output error"),
])
def test_a_failed_save_is_reported_and_the_previous_checkpoint_survives(where, exc, words, tmp_path, reference,
                                                                       monkeypatch, capsys):
    recipe = write_recipe(tmp_path)
    _fail_second_last_save(monkeypatch, where, exc)
    reset_plugin_manager()
    assert run_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    last = last_dir(recipe)
    assert f"error: could not write checkpoint {last}" in err and words in err, err
    assert f"the previous checkpoint {last} is intact" in err and "Traceback" not in err
    assert not last.with_name("last.tmp").exists()
    monkeypatch.undo()
    torch.set_num_threads(1)
    assert assert_loadable_or_absent(recipe, must_exist=True) == 1
    resume_and_compare(recipe, reference)

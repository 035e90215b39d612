"""Runs that never lose, overwrite or mislead: run folders are data, locked, never silently reused.

Table-driven like test_bad_inputs.py: each case sets up a run folder (most from ``make_run``, an
untrained checkpoint written in a second; a few from one real tiny training run shared by the
module), runs a command in-process and checks the exit status, the message on stderr (no
traceback) and what is, and is not, on disk afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY_RECIPE
from test_evaluate import make_run
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.config.document import dumps_toml
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.errors import CheckpointError, PluginError, RecipeError
from x2ct_framework.plugins import get_plugin_manager, reset_plugin_manager
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.run import main as run_main
from x2ct_framework.testing import registered

QUIET = ["--set", "train.trackers=[]", "--set", "eval.report=false", "--set", "eval.preview=false"]
MARKER = "helper_ran"
HELPER = f"import pathlib\npathlib.Path(__file__).with_name({MARKER!r}).write_text('the run folder ran code')\n"


def tiny(tmp_path: Path, name: str = "tiny", extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    text = textwrap.dedent(TINY_RECIPE.format(out=(tmp_path / "runs").as_posix())).replace(
        'name = "tiny"', f'name = "{name}"')
    path.write_text(text + textwrap.dedent(extra))
    return path


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def received(tmp_path: Path) -> Path:
    """A run folder as received from someone else: its recipe.toml names helper.py, which lies inside it."""
    run = make_run(tmp_path, name="received")
    text = (run / "recipe.toml").read_text()
    assert "plugins = []\n" in text
    (run / "recipe.toml").write_text(text.replace("plugins = []\n", 'plugins = ["helper.py"]\n'))
    (run / "helper.py").write_text(HELPER)
    reset_plugin_manager()
    return run


def pngs(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(folder / f"view{i}.png")
    return folder


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # returns the argv of the command
    expect: tuple[str, ...] = ()  # every one in stderr
    command: str = "evaluate"  # run | evaluate | predict | validate | report
    code: int = 2
    ran: bool = False  # whether helper.py must have run
    check: Callable[[Path], None] | None = None


def dispatch(command: str, argv: list[str]) -> int:
    if command == "open":
        return open_folder(argv)
    if command == "run":
        return run_main(argv)
    if command == "report":
        from x2ct_framework.evaluation.report import main as report_main

        return report_main(argv)
    return x2ct_main([command, *argv])


def evaluate_args(*extra: str):
    def setup(tmp: Path) -> list[str]:
        return [str(received(tmp)), "--max-cases", "1", "--bootstrap", "0", "--worst", "0", "--no-progress", *extra]

    return setup


def predict_args(*extra: str):
    def setup(tmp: Path) -> list[str]:
        run = received(tmp)
        return [str(run), str(pngs(tmp / "case1")), "--geometry", "recipe", "--out", str(tmp / "pred"),
                "--no-progress", *extra]

    return setup


def cascade_from_received(*extra: str):
    """The user's own recipe whose cascade starts from a received run folder's best checkpoint."""

    def setup(tmp: Path) -> list[str]:
        run = received(tmp)
        recipe = tiny(tmp, "mine")
        best = (run / "stage1" / "best").as_posix()
        text = recipe.read_text().replace("[train]\n", f'[train]\ninit_from = "{best}"\n')
        recipe.write_text(text.replace("losses = { l1 = 1.0 }", "losses = { l1 = 1.0 }\ncascade = true\nepochs = 0")
                          .replace("epochs = 1\n", ""))
        return [str(recipe), *QUIET, *extra]

    return setup


REFUSED = ("recipe.toml names the plugin 'helper.py'", "inside the run folder", "--trust-run-plugins", "--plugins")
TRUST = [
    Case("evaluate-received-run-folder", evaluate_args(), REFUSED),
    Case("predict-received-run-folder", predict_args(), REFUSED, command="predict"),
    Case("report-of-received-run-folder", lambda tmp: [str(received(tmp)), "--device", "cpu"], REFUSED,
         command="report"),
    Case("cascade-from-received-run-folder", cascade_from_received(), REFUSED, command="run"),
    Case("evaluate-trusted-with-flag", evaluate_args("--trust-run-plugins"), code=0, ran=True),
    Case("predict-trusted-with-flag", predict_args("--trust-run-plugins"), code=0, ran=True, command="predict"),
    Case("evaluate-plugin-named-again", lambda tmp: evaluate_args("--plugins", str(tmp / "runs" / "received" /
                                                                                  "helper.py"))(tmp),
         code=0, ran=True),
    Case("cascade-trusted-with-flag", cascade_from_received("--trust-run-plugins"), code=0, ran=True, command="run"),
]


@pytest.mark.parametrize("case", TRUST, ids=lambda c: c.id)
def test_run_folders_are_data_not_code(case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    code = dispatch(case.command, argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    missing = [s for s in case.expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    ran = (tmp_path / "runs" / "received" / MARKER).exists()
    assert ran == case.ran, "helper.py ran" if ran else "helper.py should have run"


def test_which_run_folder_plugins_may_be_imported(tmp_path):
    pm = get_plugin_manager()
    run = tmp_path / "run"
    run.mkdir()
    assert pm.allows_run_plugin("numpy", run, run) is True  # an installed distribution
    for spec in ("not_an_installed_module.losses", "helper.py", "../elsewhere/helper.py"):
        with pytest.raises(PluginError, match="A run folder is data, not code"):
            pm.allows_run_plugin(spec, run, run)
    pm.user_plugins.add(str((run / "helper.py").resolve()))
    assert pm.allows_run_plugin("helper.py", run, run) is True  # the user named that very file
    assert pm.allows_run_plugin("other/helper.py", run, run) is None  # ... a file of that name: theirs is used
    pm.trust_run_plugins = True
    assert pm.allows_run_plugin("anything.py", run, run) is True


# ---- plugin paths resolve against the file that declares them ---------------------------------------
def loss_plugin(name: str) -> str:
    return ("from x2ct_framework.hookspecs import hookimpl\n@hookimpl\ndef register_losses(register):\n"
            f"    register({name!r}, lambda: (lambda pred, target, batch: (pred - target).abs().mean()))\n")


def test_plugin_paths_are_relative_to_the_recipe_that_names_them(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "myloss.py").write_text(loss_plugin("from_base_folder"))
    (tmp_path / "myloss.py").write_text(loss_plugin("from_child_folder"))  # the decoy beside the child
    base = tiny(tmp_path / "base", "base")
    base.write_text('plugins = ["myloss.py"]\n' + base.read_text())
    child = tmp_path / "child.toml"
    child.write_text('extends = "base/base.toml"\nname = "child"\n')
    recipe = load_recipe(child)
    assert recipe.plugins_dir == (tmp_path / "base").resolve()
    from x2ct_framework.config.build import load_recipe_plugins

    load_recipe_plugins(recipe)
    names = get_plugin_manager().registry("loss").names()
    assert "from_base_folder" in names and "from_child_folder" not in names
    run_toml = tomllib.loads(recipe.to_run_toml())
    assert run_toml["plugins"] == [str((tmp_path / "base" / "myloss.py").resolve())]


# ---- an occupied run folder, the lock, the run name --------------------------------------------------
def occupied(tmp: Path) -> Path:
    make_run(tmp, num_test=2)  # runs/tiny with stage1 best and last, from the tiny recipe itself
    reset_plugin_manager()
    return tiny(tmp)


def live_lock(tmp: Path, host: str | None = None) -> list[str]:
    recipe = tiny(tmp)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    LIVE.append(proc)
    lock = tmp / "runs" / "tiny" / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f'{{"pid": {proc.pid}, "host": "{host or socket.gethostname()}", "started": "earlier"}}')
    return [str(recipe), *QUIET]


def dead_lock(tmp: Path) -> list[str]:
    recipe = tiny(tmp)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp / "runs" / "tiny" / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f'{{"pid": {int(proc.stdout)}, "host": "{socket.gethostname()}", "started": "earlier"}}')
    return [str(recipe), *QUIET]


def old_lock(argv: list[str], tmp: Path) -> list[str]:
    """The lock of ``argv``'s run folder, last renewed 11 minutes ago."""
    lock = tmp / "runs" / "tiny" / ".lock"
    os.utime(lock, (lock.stat().st_atime - 660, lock.stat().st_mtime - 660))
    return argv


def garbage_lock(tmp: Path) -> list[str]:
    lock = tmp / "runs" / "tiny" / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text('{"pid": 12')  # cut short
    return [str(tiny(tmp)), *QUIET]


def locked_by_us(tmp: Path) -> None:
    info = json.loads((tmp / "runs" / "tiny" / ".lock").read_text())
    assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
    OPENED.pop().close()
    assert not (tmp / "runs" / "tiny" / ".lock").exists(), "close() leaves the lock behind"


OPENED: list = []


def open_folder(argv: list[str]) -> int:
    """What ``x2ct run`` does first: check, lock and survey the run folder (no training)."""
    from x2ct_framework.run import report_errors
    from x2ct_framework.training.runfolder import RunFolder

    recipe = load_recipe(argv[0], [a for a in argv[1:] if "=" in a])
    folder = RunFolder(Path(recipe["output_dir"]) / recipe.name, Path(recipe["output_dir"]))
    code = report_errors(folder.open)
    OPENED.append(folder)
    return code if isinstance(code, int) else 0


LIVE: list[subprocess.Popen] = []


def unchanged_run(tmp: Path) -> None:
    run = tmp / "runs" / "tiny"
    assert digest(run) == BEFORE[tmp], "the refused run changed the run folder"
    assert not (run / ".lock").exists() or "earlier" in (run / ".lock").read_text()


def trained(tmp: Path) -> None:
    run = tmp / "runs" / "tiny"
    assert ckpt.load_state(run / "stage1" / "last")["complete"]
    assert not (run / ".lock").exists(), "the lock outlived its run"


def moved_aside(tmp: Path) -> None:
    trained(tmp)
    aside = [p for p in (tmp / "runs").iterdir() if p.name.startswith("tiny.replaced-")]
    assert len(aside) == 1 and digest(aside[0]) == BEFORE[tmp], "the old run folder must be kept whole"


BEFORE: dict[Path, dict[str, str]] = {}

FOLDERS = [
    Case("rerun-without-resume-refused", lambda tmp: [str(occupied(tmp)), *QUIET],
         ("already holds checkpoints of stage1", "--resume", "--set name=", "--overwrite"), "run", check=unchanged_run),
    Case("rerun-with-overwrite-moves-aside", lambda tmp: [str(occupied(tmp)), "--overwrite", *QUIET],
         ("moved the earlier run folder", "nothing was deleted"), "run", code=0, check=moved_aside),
    Case("resume-and-overwrite-conflict", lambda tmp: [str(occupied(tmp)), "--overwrite", "--resume", *QUIET],
         ("--resume", "--overwrite", "choose one"), "run", check=unchanged_run),
    Case("lock-held-by-live-process", live_lock, ("is in use by process", "on host", ".lock"), "run"),
    Case("lock-held-on-another-host", lambda tmp: live_lock(tmp, host="elsewhere-node-7"),
         ("is in use by process", "on host elsewhere-node-7", "delete"), "run"),
    Case("stale-lock-taken-over", dead_lock, ("taking over the lock", "no longer runs"), "open", code=0,
         check=locked_by_us),
    Case("abandoned-lock-of-another-host", lambda tmp: old_lock(live_lock(tmp, host="dead-node-3"), tmp),
         ("taking over the lock", "dead-node-3"), "open", code=0, check=locked_by_us),
    Case("garbage-lock-file", lambda tmp: old_lock(garbage_lock(tmp), tmp), ("taking over the lock", "unreadable"),
         "open", code=0, check=locked_by_us),
    Case("output-dir-is-a-file", lambda tmp: [str(tiny(tmp)), "--set", f"output_dir={(tmp / 'afile').as_posix()}",
                                              *QUIET] if (tmp / "afile").write_text("x") else [],
         ("afile: output_dir exists and is not a folder",), "run"),
] + [
    Case(f"run-name-{label}", lambda tmp, n=name: [str(tiny(tmp)), "--set", f"name={n}", *QUIET],
         ("name: expected", want), "validate")
    for label, name, want in [("empty", '""', "non-empty"), ("parent", '"../escaped"', "'..'"),
                              ("deep-parent", '"a/../../escaped"', "'..'"), ("absolute", '"/tmp/escaped"', "absolute"),
                              ("home", '"~/escaped"', "absolute"), ("dot", '"."', "names a folder"),
                              ("control-char", '"a\\u0007b"', "control characters")]
]


@pytest.mark.parametrize("case", FOLDERS, ids=lambda c: c.id)
def test_run_folder_safety(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)


def run_case(case: Case, tmp_path: Path, capsys) -> str:
    argv = case.setup(tmp_path)
    if (tmp_path / "runs" / "tiny").is_dir():
        BEFORE[tmp_path] = digest(tmp_path / "runs" / "tiny")
    reset_plugin_manager()
    try:
        code = dispatch(case.command, argv)
    finally:
        while LIVE:
            LIVE.pop().kill()
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    missing = [s for s in case.expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    if case.check is not None:
        case.check(tmp_path)
    assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped")), "a run was written outside output_dir"
    return err


def test_good_run_names_stay_below_output_dir(tmp_path):
    for name in ("plain", "group/exp-1", "./x"):
        recipe = load_recipe(tiny(tmp_path), [f'name="{name}"'])
        run_dir = (Path(recipe["output_dir"]) / recipe.name).resolve()
        assert run_dir.is_relative_to((tmp_path / "runs").resolve()) and run_dir != (tmp_path / "runs").resolve()


# ---- numbers that must be finite ---------------------------------------------------------------------
@pytest.mark.parametrize("override, where", [
    ("stages.1.lr=inf", "stages -> 1 -> lr"), ("stages.1.lr=nan", "stages -> 1 -> lr"),
    ("stages.1.losses.l1=nan", "stages -> 1 -> losses -> l1"), ("stages.1.min_lr=-inf", "stages -> 1 -> min_lr"),
    ("data.views=[0, nan]", "data -> views -> 2"), ("data.hu_window=[-inf, inf]", "data -> hu_window -> 1"),
    ("train.max_grad_norm=nan", "train -> max_grad_norm"), ("train.ema.decay=nan", "train -> ema -> decay"),
    ("stages.1.weight_decay=inf", "stages -> 1 -> weight_decay"), ("model.dropout=nan", "model -> dropout"),
    ("stages.1.losses.l1={weight=inf}", "stages -> 1 -> losses -> l1 -> weight"),
])
def test_recipe_refuses_non_finite_numbers(tmp_path, override, where):
    with pytest.raises(RecipeError, match="expected a finite number") as info:
        load_recipe(tiny(tmp_path), [override])
    assert where in str(info.value)


# ---- the run folder's recipe.toml parses back to the same recipe -----------------------------------
ODD = ["é", "ключ", "a b", "a.b", "", "1", "-", "x=y", "\"", "\\", "#", "[t]", "\x7f", "\t", "\n", "\x00", "\x1b[0m",
       "\u2028", "\U0001F600", "'", "'''", '"""', "true", "nan", "inf", "a\r\nb", "\ufeff"]


def odd_text(rng: random.Random) -> str:
    alphabet = ODD + [chr(c) for c in range(0, 0x80)] + ["ä", "日本", "\u00a0", "\u200b"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))


def odd_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "list", "table", "tables"] if depth < 2 else ["str", "int", "float"]
    kind = rng.choice(kinds)
    if kind == "str":
        return odd_text(rng)
    if kind == "int":
        return rng.choice([0, -1, 2**62, rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e-300, 1.5e300, rng.uniform(-1e6, 1e6), float("inf"), float("-inf")])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "table":
        return {odd_text(rng): odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [{odd_text(rng): odd_value(rng, depth + 1) for _ in range(rng.randint(1, 2))}
            for _ in range(rng.randint(1, 2))]


def test_recipe_toml_round_trips_odd_keys_and_strings():
    rng = random.Random(16)
    for trial in range(400):
        data = {odd_text(rng): odd_value(rng) for _ in range(rng.randint(1, 5))}
        text = dumps_toml(data)
        assert tomllib.loads(text) == data, f"case {trial}: {data!r}\n{text}"
    nan = tomllib.loads(dumps_toml({"x": float("nan")}))["x"]
    assert math.isnan(nan)


def test_run_folder_recipe_with_odd_strings_is_read_back_by_evaluate(tmp_path):
    recipe = load_recipe(tiny(tmp_path), ['description="naïve \\u0007 bell\\ttab \\"quoted\\" 日本"'])
    recipe.data["data"]["ключ_é"] = 1  # a non-ASCII key in an open table
    again = tomllib.loads(recipe.to_run_toml())
    assert again == recipe.data


# ---- save failures, file modes -------------------------------------------------------------------------
def test_a_full_disk_inside_safetensors_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path / "last", model, {"epoch": 1})
    before = digest(tmp_path / "last")

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*is intact"):
        ckpt.save_checkpoint(tmp_path / "last", model, {"epoch": 2})
    assert digest(tmp_path / "last") == before and not (tmp_path / "last.tmp").exists()
    assert ckpt.load_state(tmp_path / "last")["epoch"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_and_result_files_follow_the_umask(tmp_path, umask):
    from x2ct_framework.atomic import write_text

    old = os.umask(umask)
    try:
        ckpt.save_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2), {"epoch": 1}, {"x": torch.zeros(2)})
        write_text(tmp_path / "r" / "summary.json", "{}")
    finally:
        os.umask(old)
    files = [*(tmp_path / "c").iterdir(), tmp_path / "r" / "summary.json"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


# ---- atomic outputs ------------------------------------------------------------------------------------
def test_an_interrupted_evaluation_leaves_the_earlier_results_whole(tmp_path, monkeypatch, capsys):
    from x2ct_framework.evaluation import evaluate as ev_mod

    run = make_run(tmp_path)
    args = [str(run), "--max-cases", "2", "--bootstrap", "0", "--worst", "1", "--no-progress"]
    assert x2ct_main(["evaluate", *args]) == 0
    out = run / "eval" / "stage1-test"
    before = digest(out)
    assert {"per_case.csv", "summary.json", "summary.md"} <= set(before)

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if the process died while writing the tables

    monkeypatch.setattr(ev_mod, "markdown", killed)
    assert x2ct_main(["evaluate", *args[:2], "1", *args[3:]]) == 130
    assert digest(out) == before, "a half-written evaluation replaced the earlier one"
    assert [p.name for p in out.parent.iterdir()] == ["stage1-test"], "temporary folders were left behind"


def test_evaluate_refuses_to_replace_a_folder_of_other_files(tmp_path, capsys):
    run = make_run(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code = x2ct_main(["evaluate", str(run), "--max-cases", "1", "--bootstrap", "0", "--worst", "0", "--no-progress",
                      "--out", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and "holds other files than evaluation results" in err and "thesis.tex" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_an_interrupted_prediction_leaves_no_volume_under_its_final_name(tmp_path, monkeypatch):
    import nibabel as nib

    from x2ct_framework.evaluation import predict as pr

    run = make_run(tmp_path)
    real_save = nib.save

    def dies_half_way(img, name):
        real_save(img, name)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", dies_half_way)
    target = pr.resolve_target(run)
    with pytest.raises(KeyboardInterrupt):
        pr.predict(target, [pngs(tmp_path / "case1")], tmp_path / "pred", geometry="recipe", progress=False)
    left = sorted(p.name for p in (tmp_path / "pred").iterdir()) if (tmp_path / "pred").exists() else []
    assert left == [], f"an interrupted prediction left {left}"


# ---- command-line values and error paths ---------------------------------------------------------------
@pytest.mark.parametrize("argv, expect", [
    (["evaluate", "RUN", "--batch-size", "-1"], "argument --batch-size: expected an integer >= 0, got -1"),
    (["evaluate", "RUN", "--max-cases", "-3"], "argument --max-cases: expected an integer >= 0, got -3"),
    (["evaluate", "RUN", "--bootstrap", "-1"], "argument --bootstrap: expected an integer >= 0"),
    (["evaluate", "RUN", "--worst", "x"], "argument --worst: expected an integer >= 0, got 'x'"),
    (["predict", "RUN", "img.png", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
])
def test_bad_command_line_numbers_are_usage_errors(argv, expect, capsys):
    with pytest.raises(SystemExit) as info:
        x2ct_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and expect in err and "Traceback" not in err


NO_GRAD_LOSS = ("import torch\nfrom x2ct_framework.hookspecs import hookimpl\n@hookimpl\n"
                "def register_losses(register):\n"
                "    register('detached_l1',\n"
                "             lambda: (lambda pred, target, batch: (pred.detach() - target).abs().mean()))\n")


@pytest.mark.parametrize("case", ["loss-without-grad", "x2ct-debug-shows-traceback"])
def test_a_loss_without_gradient_names_its_term_and_plugin(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "detached.py").write_text(NO_GRAD_LOSS)
    recipe = tiny(tmp_path)
    recipe.write_text('plugins = ["detached.py"]\n' + recipe.read_text())
    argv = [str(recipe), "--set", "stages.1.losses={flat={name='detached_l1', weight=1.0}}", *QUIET]
    if case == "x2ct-debug-shows-traceback":
        monkeypatch.setenv("X2CT_DEBUG", "1")
        with pytest.raises(PluginError, match="'flat'"):
            run_main(argv)
        return
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "loss term 'flat' (loss 'detached_l1' from plugin" in err and "detached.py" in err
    assert "does not depend differentiably on the prediction" in err and "Traceback" not in err


# ---- validate checks every stage before anything trains ------------------------------------------------
TWO_STAGES = '\n[[stages]]\nname = "stage2"\nresolution = 16\nepochs = 1\nlosses = { l1 = 1.0 }\n'


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("override, expect", [
    ('stages.2.select_best="val/psnrr"', ("stages -> 2 -> select_best: 'val/psnrr' is not measured",
                                          'did you mean "val/psnr"')),
    ('train.trackers=["tensorbaord"]', ("train -> trackers -> 1: unknown tracker 'tensorbaord'",
                                        'did you mean "tensorboard"')),
    ('train.trackers=["aim"]', ("tracker 'aim' needs the package 'aim', which is not installed",)),
])
def test_every_stage_is_checked_before_anything_trains(command, override, expect, tmp_path, capsys):
    recipe = tiny(tmp_path, extra=TWO_STAGES)
    code = dispatch(command, [str(recipe), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and all(e in err for e in expect), err
    assert not (tmp_path / "runs" / "tiny" / "stage1").exists(), "stage 1 trained before the error"


def test_validate_checks_freeze_prefixes_of_every_stage(tmp_path, capsys):
    recipe = tiny(tmp_path, extra=TWO_STAGES)
    code = x2ct_main(["validate", str(recipe), "--set", 'stages.2.freeze=["encoderr."]'])
    err = capsys.readouterr().err
    assert code == 2 and "stages -> 2 -> freeze: 'encoderr.' matches no parameter" in err


# ---- scale-out and Python version claims ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_training_is_refused_at_start(kind):
    from accelerate.utils import DistributedType

    from x2ct_framework.training.scaleout import UnsupportedDistribution, check_distributed

    class Fake:
        distributed_type = DistributedType[kind]

    with pytest.raises(UnsupportedDistribution, match=f"configured for {kind}.*Use DDP"):
        check_distributed(Fake())
    for ok in ("NO", "MULTI_GPU", "MULTI_CPU"):
        Fake.distributed_type = DistributedType[ok]
        check_distributed(Fake())


def test_requires_python_matches_the_standard_library_the_code_uses():
    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    uses_tomllib = any("import tomllib" in p.read_text() for p in (root / "x2ct_framework").rglob("*.py"))
    assert uses_tomllib and meta["requires-python"].startswith(">=3.11")


# ---- --resume compares the recipe with the run folder's ---------------------------------------------
def resume_args(*sets: str, allow: tuple[str, ...] = ()):
    def setup(tmp: Path) -> list[str]:
        argv = [str(occupied(tmp)), "--resume", *QUIET]
        for s in sets:
            argv += ["--set", s]
        for a in allow:
            argv += ["--allow-change", a]
        return argv

    return setup


RESUMES = [
    Case("resume-changed-lr", resume_args("stages.1.lr=0.1"),
         ("stages.1.lr: 0.001 -> 0.1", "--allow-change stages.1.lr"),
         "run", check=unchanged_run),
    Case("resume-changed-batch-size", resume_args("train.batch_size=4"), ("train.batch_size: 2 -> 4",), "run",
         check=unchanged_run),
    Case("resume-fewer-epochs", resume_args("stages.1.epochs=0"), ("stages.1.epochs: 1 -> 0",), "run",
         check=unchanged_run),
    Case("resume-changed-loss", resume_args("stages.1.losses.l1=0.5"), ("stages.1.losses.l1.weight: 1.0 -> 0.5",),
         "run", check=unchanged_run),
    Case("resume-changed-model", resume_args("model.depth=2"), ("model.depth: 1 -> 2",), "run", check=unchanged_run),
    Case("resume-changed-data", resume_args("data.views=[0, 45]"), ("data.views: [0, 90] -> [0, 45]",), "run",
         check=unchanged_run),
    Case("resume-one-of-two-allowed", resume_args("stages.1.lr=0.1", "seed=5", allow=("stages.stage1.lr",)),
         ("seed: 0 -> 5",), "run", check=unchanged_run),
]


@pytest.mark.parametrize("case", RESUMES, ids=lambda c: c.id)
def test_resume_refuses_a_recipe_that_trains_differently(case, tmp_path, capsys):
    err = run_case(case, tmp_path, capsys)
    assert "the recipe differs from the one" in err and "Traceback" not in err
    if case.id == "resume-one-of-two-allowed":
        assert "stages.1.lr" not in err


def test_which_changes_a_resume_accepts(tmp_path):
    from x2ct_framework.training.recipe_diff import check_resume

    recipe_path = occupied(tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert (run / "recipe.toml").is_file()
    for reporting in (["eval.bootstrap=5", "train.progress=true", 'description="x"', "train.log_every=3"], []):
        assert check_resume(load_recipe(recipe_path, reporting), run) == []
    allowed = check_resume(load_recipe(recipe_path, ["stages.1.lr=0.1"]), run, ["stages.1"])
    assert allowed == ["  stages.1.lr: 0.001 -> 0.1"]
    two = TWO_STAGES.replace("epochs = 1", "epochs = 3")
    assert check_resume(load_recipe(tiny(tmp_path, extra=two)), run) == []  # a stage nothing was trained for yet


# ---- the training loop: SIGTERM, training that did nothing, honest resume -----------------------------
NAN_PLUGINS = '''
import torch
from x2ct_framework.hookspecs import hookimpl


class PhantomWithoutCT(torch.utils.data.Dataset):
    def __init__(self, split, stage):
        self.n = 2

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"xrays": torch.zeros(2, 1, 16, 16), "geometry": {"angles": torch.zeros(2)}}


@hookimpl
def register_losses(register):
    register("always_nan", lambda: (lambda pred, target, batch: (pred - target).abs().mean() * float("nan")))
    # finite while training, NaN in validation (run under torch.no_grad)
    register("nan_in_validation", lambda: (lambda pred, target, batch: (pred - target).abs().mean()
                                           if torch.is_grad_enabled() else pred.sum() * float("nan")))


@hookimpl
def register_datasets(register):
    register("no_ct", PhantomWithoutCT)
'''


def with_nan_plugins(tmp: Path, *sets: str) -> list[str]:
    (tmp / "nan_plugins.py").write_text(NAN_PLUGINS)
    recipe = tiny(tmp)
    recipe.write_text('plugins = ["nan_plugins.py"]\n' + recipe.read_text())
    argv = [str(recipe), *QUIET]
    for s in sets:
        argv += ["--set", s]
    return argv


def nothing_written(tmp: Path) -> None:
    stage = tmp / "runs" / "tiny" / "stage1"
    assert not ckpt.exists(stage / "best") and not ckpt.exists(stage / "last"), "a checkpoint of a failed stage"


LOOP = [
    Case("every-update-skipped", lambda tmp: with_nan_plugins(tmp, "stages.1.losses={always_nan=1.0}",
                                                              "train.max_nonfinite_steps=100"),
         ("stage1: every one of its 2 optimizer updates so far was skipped", "'best' is not taken from it"),
         "run", code=3, check=nothing_written),
    Case("validation-not-finite", lambda tmp: with_nan_plugins(tmp, "stages.1.losses={nan_in_validation=1.0}"),
         ("stage1: validation is not finite (val/loss = nan)", "nothing of this epoch is written"),
         "run", code=3, check=nothing_written),
    Case("dataset-item-without-ct", lambda tmp: with_nan_plugins(tmp, 'data={name="no_ct"}'),
         ("dataset 'no_ct' (train split) gave items without 'ct'", "keys 'xrays', 'geometry'"), "run"),
]


@pytest.mark.parametrize("case", LOOP, ids=lambda c: c.id)
def test_a_stage_that_did_not_train_does_not_end_done(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)


class StopAtFirstEpoch:
    """A two-epoch run stopped after its first epoch's checkpoint (like Ctrl-C there)."""

    @staticmethod
    @hookimpl
    def on_epoch_end(trainer, stage, epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt


class TermAtFirstStep:
    """The scheduler's SIGTERM, arriving during the first optimizer update."""

    @staticmethod
    @hookimpl
    def on_train_step_end(trainer, stage, step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A tiny two-epoch run stopped after epoch 1 (last and best written); tests get hard-linked copies."""
    root = tmp_path_factory.mktemp("interrupted")
    recipe = tiny(root)
    recipe.write_text(recipe.read_text().replace("epochs = 1", "epochs = 2"))
    reset_plugin_manager()
    with registered(StopAtFirstEpoch, "stop_at_first_epoch"):
        assert run_main([str(recipe), *QUIET]) == 130
    reset_plugin_manager()
    return root


@pytest.fixture
def copy(interrupted, tmp_path) -> Path:
    import shutil

    shutil.copytree(interrupted / "runs", tmp_path / "runs", copy_function=os.link)
    recipe = tiny(tmp_path)
    recipe.write_text(recipe.read_text().replace("epochs = 1", "epochs = 2"))
    return recipe


def test_sigterm_saves_last_and_exits_143(copy, tmp_path, capsys):
    with registered(TermAtFirstStep, "term_at_first_step"):
        code = run_main([str(copy), "--overwrite", *QUIET])
    err = capsys.readouterr().err
    assert code == 143, err
    assert "SIGTERM" in err and "Continue with the same command and --resume" in err
    state = ckpt.load_state(tmp_path / "runs" / "tiny" / "stage1" / "last")
    assert state["interrupted"] and state["step"] == 1 and not state["complete"]
    assert not (tmp_path / "runs" / "tiny" / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is not None


def lrs(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in rows if r["kind"] == "train"]


def test_an_allowed_lr_change_on_resume_is_the_lr_used_and_written(copy, tmp_path, capsys):
    from x2ct_framework.config.optim import lr_at

    run = tmp_path / "runs" / "tiny"
    assert run_main([str(copy), "--resume", "--set", "stages.1.lr=0.1", "--allow-change", "stages.1.lr", *QUIET]) == 0
    err = capsys.readouterr()
    assert "stages.1.lr: 0.001 -> 0.1" in err.err and "adamw lr 0.1 -> 1e-06" in err.out
    after = [(s, lr) for s, lr in lrs(run) if s > 2]
    assert after and all(lr == pytest.approx(lr_at(s - 1, 4, 0.1, 1e-6, 0, "cosine")) for s, lr in after), after
    assert tomllib.loads((run / "recipe.toml").read_text())["stages"][0]["lr"] == 0.1
    assert ckpt.load_state(run / "stage1" / "last")["complete"]


def test_resume_with_fewer_epochs_completes_the_stage(copy, tmp_path):
    run = tmp_path / "runs" / "tiny"
    before = digest(run / "stage1" / "best")
    assert run_main([str(copy), "--resume", "--set", "stages.1.epochs=1", "--allow-change", "stages.1.epochs",
                     *QUIET]) == 0
    assert ckpt.load_state(run / "stage1" / "last")["complete"] and digest(run / "stage1" / "best") == before


def test_resume_finishes_an_interrupted_final_evaluation_and_report(copy, tmp_path, monkeypatch, capsys):
    from x2ct_framework.evaluation import report

    run = tmp_path / "runs" / "tiny"
    args = [str(copy), "--resume", "--set", "train.trackers=[]", "--set", "eval.preview=false",
            "--set", "eval.bootstrap=0", "--set", "eval.max_cases=1", "--set", "eval.gallery=0",
            "--set", "eval.worst_cases=0"]
    real = report.final_evaluation

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "final_evaluation", killed)
    assert run_main(args) == 130  # stage trained to the end, then the final evaluation was cut short
    assert ckpt.load_state(run / "stage1" / "last")["complete"] and not (run / "report.md").exists()
    monkeypatch.setattr(report, "final_evaluation", real)
    assert run_main(args) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert "## Final metrics: stage1 best checkpoint" in (run / "report.md").read_text()
    assert (run / "eval" / "stage1-test" / "summary.json").is_file()

"""Nothing outside its folder, nothing lost (issue 33): export, stage names, links in run folders.

Table-driven like test_run_safety.py: each case sets up a run folder and an outside target, runs a
command in-process and checks the exit status, the message (no traceback), and that the run folder
and the outside target are byte-for-byte what they were before a refusal.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from test_evaluate import make_run
from test_run_safety import QUIET, digest, tiny
from x2ct_framework import safepaths
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import PluginError
from x2ct_framework.plugins import reset_plugin_manager
from x2ct_framework.run import main as run_main

TALLY = {"tried": 0, "passed": 0}


def snapshot(*folders: Path) -> dict[str, dict[str, str]]:
    """Every file (and link target) below each folder, with its sha256."""
    out = {}
    for f in folders:
        if f.is_symlink():
            out[str(f)] = {"->": os.readlink(f)}
        elif f.is_dir():
            d = digest(f)
            d.update({str(p.relative_to(f)): "-> " + os.readlink(p) for p in f.rglob("*") if p.is_symlink()})
            out[str(f)] = d
        elif f.is_file():
            out[str(f)] = {"": f.read_bytes().hex()}
    return out


def export_run(tmp: Path) -> Path:
    run = make_run(tmp)
    (tmp / "outside").mkdir()
    (tmp / "outside" / "keep.txt").write_text("the user's file")
    reset_plugin_manager()
    return run


def earlier_export(tmp: Path, extra: str | None = None) -> Path:
    run = export_run(tmp)
    assert x2ct_main(["export", str(run), str(tmp / "exp")]) == 0
    if extra:
        (tmp / "exp" / extra).write_text("written by the user")
    reset_plugin_manager()
    return run


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # returns the argv of ``x2ct``
    expect: tuple[str, ...] = ()
    code: int = 2
    watch: tuple[str, ...] = ("runs", "outside")  # folders below tmp that must be unchanged (on a refusal)


def ex(*args: str) -> Callable[[Path], list[str]]:
    """``x2ct export`` with ``{run}``/``{tmp}`` filled in."""
    def setup(tmp: Path) -> list[str]:
        run = export_run(tmp)
        return ["export", *[a.format(run=run, tmp=tmp) for a in args]]
    return setup


def linked_out(tmp: Path) -> list[str]:
    run = export_run(tmp)
    os.symlink(tmp / "outside", tmp / "exp")
    return ["export", str(run), str(tmp / "exp"), "--overwrite"]


EXPORTS = [
    Case("export-over-its-own-run-folder", ex("{run}", "{run}", "--overwrite"), ("is the source", "never over it")),
    Case("export-checkpoint-over-runs-folder", ex("{run}/stage1/best", "{tmp}/runs", "--overwrite"),
         ("a folder holding the source",)),
    Case("export-over-stage-folder", ex("{run}/stage1/best", "{run}/stage1", "--overwrite"),
         ("a folder holding the source",)),
    Case("export-over-the-checkpoint", ex("{run}", "{run}/stage1/best", "--overwrite"), ("is the source",)),
    Case("export-over-user-folder", ex("{run}", "{tmp}/outside", "--overwrite"),
         ("replaces only an earlier export", "keep.txt", "is kept")),
    Case("export-over-user-folder-without-flag", ex("{run}", "{tmp}/outside"), ("is not empty", "--overwrite")),
    Case("export-over-a-file", ex("{run}", "{tmp}/outside/keep.txt", "--overwrite"), ("is not a folder",)),
    Case("export-through-a-link", linked_out, ("symbolic link",)),
    Case("export-over-export-with-user-file", lambda tmp: ["export", str(earlier_export(tmp, "notes.txt")),
                                                           str(tmp / "exp"), "--overwrite"],
         ("notes.txt", "did not write"), watch=("runs", "outside", "exp")),
    Case("export-over-earlier-export", lambda tmp: ["export", str(earlier_export(tmp)), str(tmp / "exp"),
                                                    "--overwrite"], code=0),
    Case("export-to-new-folder", ex("{run}", "{tmp}/new/exp"), code=0),
]


def run_table_case(case: Case, tmp_path: Path, capsys) -> str:
    TALLY["tried"] += 1
    argv = case.setup(tmp_path)
    capsys.readouterr()
    watched = [tmp_path / w for w in case.watch]
    before = snapshot(*watched)
    reset_plugin_manager()
    code = x2ct_main(argv) if argv[0] != "run" else run_main(argv[1:])
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    missing = [s for s in case.expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    if case.code != 0:
        assert snapshot(*watched) == before, "a refused command changed the run folder or the outside target"
    else:
        assert (tmp_path / "runs" / "tiny" / "stage1" / "best" / "model.safetensors").is_file()
        assert (tmp_path / "outside" / "keep.txt").read_text() == "the user's file"
    TALLY["passed"] += 1
    return err


@pytest.mark.parametrize("case", EXPORTS, ids=lambda c: c.id)
def test_export_never_removes_what_it_did_not_write(case, tmp_path, capsys):
    run_table_case(case, tmp_path, capsys)
    if case.code == 0:
        out = tmp_path / ("new/exp" if case.id == "export-to-new-folder" else "exp")
        names = sorted(p.name for p in out.iterdir())
        assert names == ["README.md", "config.json", "model.safetensors", "recipe.toml", "state.json"], names
        assert not [p for p in out.parent.iterdir() if "export-tmp" in p.name], "a temporary folder was left"


# ---- stage names ---------------------------------------------------------------------------------
STAGE_NAMES = [("parent", '"../../escaped_stage"', "'..'"), ("dot", '"."', "not the folder itself"),
               ("slash", '"a/b"', "single folder name"), ("absolute", '"/tmp/escaped_stage"', "absolute"),
               ("home", '"~/escaped_stage"', "absolute"), ("hidden", '".hidden"', "start with '.'"),
               ("eval-folder", '"eval"', "other than eval"), ("control", '"a\\u0007b"', "control characters"),
               ("tmp-suffix", '"stage1.tmp"', "*.tmp")]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("label, name, want", STAGE_NAMES, ids=[s[0] for s in STAGE_NAMES])
def test_stage_names_stay_below_the_run_folder(command, label, name, want, tmp_path, capsys):
    TALLY["tried"] += 1
    recipe = tiny(tmp_path)
    argv = [str(recipe), "--set", f"stages.1.name={name}", *QUIET]
    code = x2ct_main(["validate", *argv]) if command == "validate" else run_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "stages -> 1 -> name" in err or "stages.1.name" in err or "name" in err
    assert want in err and "Traceback" not in err
    assert not any(tmp_path.parent.rglob("escaped_stage")) and not (tmp_path / "runs").exists()
    TALLY["passed"] += 1


# ---- links inside run folders: every writer checks when it opens --------------------------------
def writer_case(kind: str, root: Path, outside: Path) -> Callable[[], object]:
    from x2ct_framework import atomic, checkpoint
    from x2ct_framework.training.logbook import Logbook
    from x2ct_framework.viz import plt, save_figure

    stage = root / "stage1"
    stage.mkdir(parents=True)
    book = Logbook(stage)
    (stage / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "epoch": 1}\n')
    if kind == "curves-png":
        os.symlink(outside / "target.bin", stage / "curves.png")
        return lambda: save_figure(plt.figure(), stage / "curves.png")
    if kind == "previews-folder":
        os.symlink(outside, stage / "previews")
        return lambda: save_figure(plt.figure(), stage / "previews" / "epoch0001.png")
    if kind == "metrics-csv-tmp":
        os.symlink(outside / "target.bin", stage / "metrics.csv.tmp")
        return book.write_csv
    if kind == "metrics-jsonl-tmp":
        os.symlink(outside / "target.bin", stage / "metrics.jsonl.tmp")
        return lambda: book.truncate(1, 1)
    if kind == "metrics-jsonl":
        (stage / "metrics.jsonl").unlink()
        os.symlink(outside / "target.bin", stage / "metrics.jsonl")
        return lambda: book.append({"kind": "train", "step": 2})
    if kind == "checkpoint-folder":
        os.symlink(outside, stage / "last")
        return lambda: checkpoint.save_checkpoint(stage / "last", {"w": __import__("torch").zeros(2)}, {})
    if kind == "checkpoint-tmp":
        os.symlink(outside, stage / "last.tmp")
        return lambda: checkpoint.save_checkpoint(stage / "last", {"w": __import__("torch").zeros(2)}, {})
    if kind == "recipe-toml":
        os.symlink(outside / "target.bin", root / "recipe.toml")
        return lambda: atomic.write_text(root / "recipe.toml", "x = 1\n")
    if kind == "eval-folder":
        os.symlink(outside, root / "eval")
        return lambda: atomic.write_text(root / "eval" / "stage1-test" / "summary.json", "{}")
    if kind == "report-gallery":
        (root / "report").mkdir()
        os.symlink(outside / "target.bin", root / "report" / "gallery.png")
        from x2ct_framework.evaluation.report import plot_gallery
        import torch

        v = torch.rand(8, 8, 8)
        return lambda: plot_gallery([("c", v, v)], (-1000.0, 1000.0), root / "report" / "gallery.png")
    raise AssertionError(kind)


WRITERS = ["curves-png", "previews-folder", "metrics-csv-tmp", "metrics-jsonl-tmp", "metrics-jsonl",
           "checkpoint-folder", "checkpoint-tmp", "recipe-toml", "eval-folder", "report-gallery"]


@pytest.mark.parametrize("kind", WRITERS)
def test_no_writer_follows_a_link_out_of_a_confined_folder(kind, tmp_path):
    """Links made after a command started (so past the start-up check) are caught when the file is opened."""
    TALLY["tried"] += 1
    root, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "target.bin").write_bytes(b"the user's file")
    write = writer_case(kind, root, outside)
    before = snapshot(outside)
    with safepaths.confined(root):
        try:
            write()
        except safepaths.OutsideFolderError as exc:
            assert "outside the folder" in str(exc)
    assert snapshot(outside) == before, f"{kind}: a write went through a link out of the folder"
    TALLY["passed"] += 1


def test_names_below_a_folder():
    for bad in ("../x", "/abs", "~/x", ".", "", "a/../../b", "a\0b"):
        with pytest.raises(safepaths.OutsideFolderError):
            safepaths.inside("/tmp/root", bad)
    assert safepaths.inside("/tmp/root", "a", "b.txt") == Path("/tmp/root/a/b.txt")
    assert safepaths.bounded(range(8), 3) == "0, 1, 2, and 5 more"
    assert safepaths.clip("x" * 300, 10).endswith("(290 more characters)")


# ---- a finished run whose every output path is a link out of it -----------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run trained to the end with its report, then evaluated: the outputs the framework writes."""
    root = tmp_path_factory.mktemp("finished")
    recipe = tiny(root)
    reset_plugin_manager()
    args = [str(recipe), "--set", "train.trackers=[]", "--set", "eval.bootstrap=0", "--set", "eval.max_cases=1",
            "--set", "eval.gallery=1", "--set", "eval.worst_cases=1"]
    assert run_main(args) == 0
    reset_plugin_manager()
    assert x2ct_main(["evaluate", str(root / "runs" / "tiny"), "--max-cases", "1", "--bootstrap", "0",
                      "--no-progress"]) == 0
    reset_plugin_manager()
    return root


def commands(tmp: Path, recipe: Path) -> dict[str, Callable[[], int]]:
    from x2ct_framework.evaluation.report import main as report_main

    run = tmp / "runs" / "tiny"
    return {
        "resume": lambda: run_main([str(recipe), "--resume", "--set", "stages.1.epochs=2", "--allow-change",
                                    "stages.1.epochs", "--set", "train.trackers=[]", "--set", "eval.bootstrap=0",
                                    "--set", "eval.max_cases=1"]),
        "evaluate": lambda: x2ct_main(["evaluate", str(run), "--max-cases", "1", "--bootstrap", "0", "--no-progress"]),
        "report": lambda: report_main([str(run), "--device", "cpu"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("level", ["files", "folders"])
def test_every_output_path_linked_outside_writes_nothing_outside(level, finished, tmp_path, capsys):
    """List the finished run's outputs, replace each one (every file, or every folder) by a link to a copy
    outside the run folder; then resume, evaluate and report: nothing outside changes."""
    shutil.copytree(finished / "runs", tmp_path / "runs", symlinks=True)
    recipe = tiny(tmp_path)
    run, outside = tmp_path / "runs" / "tiny", tmp_path / "outside"
    outside.mkdir()
    paths = sorted((p for p in run.rglob("*") if (p.is_file() if level == "files" else p.is_dir())),
                   key=lambda p: -len(p.parts))
    assert len(paths) >= (10 if level == "files" else 4), paths
    replaced = []
    for i, p in enumerate(paths):
        if not p.exists() or p.name == ".lock":
            continue
        dest = outside / f"{i:03d}-{p.name}"
        shutil.move(str(p), dest)
        os.symlink(dest, p)
        replaced.append(p.relative_to(run))
    before = snapshot(outside)
    for name, command in commands(tmp_path, recipe).items():
        TALLY["tried"] += 1
        reset_plugin_manager()
        capsys.readouterr()
        code = command()
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert code == 2, f"{name}: {err}"
        assert "symbolic link" in err and "outside" in err, err
        assert snapshot(outside) == before, f"{name} wrote outside the run folder"
        TALLY["passed"] += 1
    assert replaced


def test_load_pretrained_and_export_share_recipe_local_plugins(tmp_path, capsys):
    """A model whose recipe names a local plugin file: exported with --plugins, the file is carried (as
    received code, not imported unless trusted); load_pretrained takes the command line's trust arguments."""
    from x2ct_framework import load_pretrained

    TALLY["tried"] += 1
    plugin = tmp_path / "myloss.py"
    plugin.write_text("from x2ct_framework.hookspecs import hookimpl\nimport pathlib\n"
                      "pathlib.Path(__file__).with_name('ran').touch()\n"
                      "@hookimpl\ndef register_losses(register):\n"
                      "    register('myl1', lambda: (lambda p, t, b: (p - t).abs().mean()))\n")
    run = make_run(tmp_path, extra="")
    text = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(text.replace("plugins = []\n", f'plugins = ["{plugin.as_posix()}"]\n'))
    reset_plugin_manager()
    assert x2ct_main(["export", str(run), str(tmp_path / "exp")]) == 2
    assert "--plugins" in capsys.readouterr().err
    reset_plugin_manager()
    assert x2ct_main(["export", str(run), str(tmp_path / "exp"), "--plugins", str(plugin)]) == 0, \
        capsys.readouterr().err
    carried = tmp_path / "exp" / "plugins" / "myloss.py"
    assert carried.read_bytes() == plugin.read_bytes()
    import json

    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["plugins"] == ["plugins/myloss.py"] and cfg["plugin_files"] == ["plugins/myloss.py"]
    reset_plugin_manager()
    with pytest.raises(PluginError) as info:
        load_pretrained(tmp_path / "exp")
    msg = str(info.value)
    assert "trust_plugins=True" in msg and "plugins=[" in msg and "--trust-run-plugins" not in msg, msg
    assert not (tmp_path / "exp" / "plugins" / "ran").exists(), "received code ran without trust"
    reset_plugin_manager()
    model = load_pretrained(tmp_path / "exp", trust_plugins=True)
    assert not model.training and (tmp_path / "exp" / "plugins" / "ran").exists()
    reset_plugin_manager()
    (tmp_path / "exp" / "plugins" / "ran").unlink()
    assert load_pretrained(tmp_path / "exp", plugins=[str(carried)]) is not None
    TALLY["passed"] += 1


def test_a_checkpoint_cut_short_while_written_does_not_block_a_resume(tmp_path):
    """A kill during the first checkpoint leaves only ``last.tmp``: no checkpoint, so the stage starts afresh."""
    from x2ct_framework.training.runfolder import stages_with_checkpoints

    TALLY["tried"] += 1
    run = make_run(tmp_path)
    os.replace(run / "stage1" / "last", run / "stage1" / "last.tmp")
    shutil.rmtree(run / "stage1" / "best")
    assert stages_with_checkpoints(run) == []
    os.replace(run / "stage1" / "last.tmp", run / "stage1" / "last")
    assert stages_with_checkpoints(run) == ["stage1"]
    TALLY["passed"] += 1


def test_export_with_a_recipe_naming_a_local_plugin_carries_it(tmp_path, capsys):
    """``x2ct export CKPT OUT --recipe mine.toml`` where mine.toml names ``myloss.py`` beside it: the export
    holds the file and load_pretrained finds it there (not a path into the export that does not exist)."""
    import json

    from x2ct_framework import load_pretrained

    TALLY["tried"] += 1
    run = make_run(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "myloss.py").write_text(
        "from x2ct_framework.hookspecs import hookimpl\n@hookimpl\ndef register_losses(register):\n"
        "    register('myl1b', lambda: (lambda p, t, b: (p - t).abs().mean()))\n")
    recipe = tiny(tmp_path / "mine")
    recipe.write_text('plugins = ["myloss.py"]\n' + recipe.read_text())
    reset_plugin_manager()
    assert x2ct_main(["export", str(run / "stage1" / "best"), str(tmp_path / "exp"), "--recipe", str(recipe)]) == 0, \
        capsys.readouterr().err
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["plugins"] == ["plugins/myloss.py"] and (tmp_path / "exp" / "plugins" / "myloss.py").is_file()
    reset_plugin_manager()
    assert load_pretrained(tmp_path / "exp", trust_plugins=True) is not None
    TALLY["passed"] += 1

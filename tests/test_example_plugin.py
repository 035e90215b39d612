"""The example third-party package: pip-installs, is found through its entry point, lists, trains."""

import importlib
import json
import shutil
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO, run_env
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.run import main as run_main

EXAMPLE = REPO / "examples" / "x2ct-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install`` the example (built by its own pyproject.toml) into a folder of its own.

    A copy is built so that no build output lands in the repository, and the target folder keeps
    the shared environment untouched; putting it on ``sys.path`` is what an install into
    site-packages does.
    """
    root = tmp_path_factory.mktemp("example")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = root / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return src, target


@pytest.fixture
def on_path(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed[1]))
    importlib.invalidate_caches()
    yield installed
    for name in [m for m in sys.modules if m.startswith("x2ct_example_plugin")]:
        del sys.modules[name]


def test_the_wheel_declares_the_entry_point(installed):
    (info,) = installed[1].glob("x2ct_example_plugin-*.dist-info")
    assert "[x2ct_framework]\nexample_plugin = x2ct_example_plugin" in (info / "entry_points.txt").read_text()


def test_found_through_its_entry_point(on_path):
    entry = get_plugin_manager().registry("loss").get("windowed_charbonnier")
    assert (entry.plugin, entry.distribution) == ("example_plugin", "x2ct-example-plugin")
    assert entry.factory.__module__ == "x2ct_example_plugin.charbonnier"
    assert str(on_path[1]) in sys.modules["x2ct_example_plugin"].__file__


def test_not_found_without_the_install():
    assert "windowed_charbonnier" not in get_plugin_manager().registry("loss")


def test_listed_by_x2ct_plugins(on_path, capsys):
    assert x2ct_main(["plugins"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["windowed_charbonnier", "plugin", "example_plugin", "(x2ct-example-plugin)"] in lines


def test_trains_in_its_tiny_recipe(on_path, tmp_path, capsys):
    recipe = on_path[0] / "example.toml"
    assert run_main([str(recipe), "--set", f"output_dir={tmp_path.as_posix()}", "--set", "stages.1.epochs=1",
                     "--set", "eval.report=false", "--set", "eval.preview=false"]) == 0
    stage = tmp_path / "example_plugin" / "stage1"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/charbonnier" in r]
    assert train and all(r["train/charbonnier"] > 0 for r in train)
    assert (stage / "last" / "model.safetensors").is_file()
    env = json.loads((tmp_path / "example_plugin" / "environment.json").read_text())
    assert env["plugins"]["example_plugin"] == "x2ct-example-plugin"


@pytest.mark.slow
def test_its_own_test_suite_passes(installed):
    """The package's tests (written with x2ct_framework.testing) pass against the installed copy."""
    src, target = installed
    out = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")],
                         capture_output=True, text=True, cwd=src, env=run_env(PYTHONPATH=str(target)), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " passed" in out.stdout and "failed" not in out.stdout

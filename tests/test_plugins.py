"""Plugin loading: real entry points, broken plugins, strict mode, selection, recipe plugins."""

import subprocess
import textwrap

import pytest

from conftest import PYTHON, run_env
from x2ct_framework.errors import PluginError
from x2ct_framework.plugins import PluginLoadWarning, get_plugin_manager


def make_distribution(root, dist_name, modules: dict[str, str], entry_points: dict[str, str]):
    """Write modules plus a .dist-info folder with entry-point metadata (an installed distribution)."""
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[x2ct_framework]\n{eps}\n")


GOOD = """
    import torch
    from x2ct_framework.hookspecs import hookimpl

    class Huber(torch.nn.Module):
        def __init__(self, delta: float = 0.1):
            super().__init__()
            self.delta = delta
        def forward(self, pred, target, batch):
            return torch.nn.functional.huber_loss(pred, target, delta=self.delta)

    @hookimpl
    def register_losses(register):
        register("huber", Huber)
"""
BROKEN = """
    raise ImportError("needs a package that is not installed")
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    make_distribution(tmp_path, "x2ct-huber", {"x2ct_huber": GOOD, "x2ct_broken": BROKEN},
                      {"huber": "x2ct_huber", "broken": "x2ct_broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return tmp_path


def test_entry_point_plugin_is_found_and_broken_one_skipped(third_party):
    pm = get_plugin_manager()
    with pytest.warns(PluginLoadWarning, match="'broken' from x2ct-huber failed to load"):
        reg = pm.registry("loss")
    entry = reg.get("huber")
    assert (entry.plugin, entry.distribution) == ("huber", "x2ct-huber")
    assert "l1" in reg  # built-ins still load
    assert "broken" in pm.failed


def test_every_unknown_name_error_names_the_plugin_that_failed_to_load(third_party):
    from x2ct_framework.errors import RecipeError
    from x2ct_framework.evaluation.protocols import check_names

    pm = get_plugin_manager()
    with pytest.warns(PluginLoadWarning):
        pm.registries()
    for kind in ("metric", "model", "loss", "dataset"):
        with pytest.raises(RecipeError) as err:
            pm.registry(kind).get("bias", "r.toml: eval -> metrics -> 0")
        msg = str(err.value)
        assert f'unknown {kind} "bias"' in msg
        assert "plugin 'broken' from x2ct-huber failed to load and was skipped" in msg
        assert "needs a package that is not installed" in msg
    assert "plugin 'broken' from x2ct-huber failed to load" in check_names(["lab"])


def test_strict_mode_turns_a_broken_plugin_into_an_error(third_party, monkeypatch):
    monkeypatch.setenv("X2CT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken' from x2ct-huber failed to load.*X2CT_STRICT_PLUGINS"):
        get_plugin_manager().registry("loss")


def test_load_plugins_variable_limits_what_loads(third_party, monkeypatch):
    monkeypatch.setenv("X2CT_LOAD_PLUGINS", "huber,l1")
    pm = get_plugin_manager()
    reg = pm.registry("loss")
    assert reg.names() == ["huber", "l1", "mse"]
    assert "broken" not in pm.failed
    assert pm.registry("model").names() == []


def test_recipe_plugin_file_and_module(tmp_path):
    (tmp_path / "my_loss.py").write_text(textwrap.dedent(GOOD).replace('"huber"', '"file_huber"'))
    pm = get_plugin_manager()
    pm.load_module("my_loss.py", tmp_path)
    assert "file_huber" in pm.registry("loss")
    assert pm.registry("loss").get("file_huber").distribution == "local file"
    with pytest.raises(PluginError, match="plugin file 'nope.py' not found"):
        pm.load_module("nope.py", tmp_path)
    with pytest.raises(PluginError, match="plugin module 'no_such_module_xyz' failed to import"):
        pm.load_module("no_such_module_xyz")


def test_hook_that_raises_is_named(tmp_path):
    from x2ct_framework.hookspecs import hookimpl

    class Bad:
        @staticmethod
        @hookimpl
        def register_models(register):
            raise RuntimeError("boom")

    pm = get_plugin_manager()
    pm.register_object(Bad, "bad_models")
    with pytest.raises(PluginError, match="plugin 'bad_models' .* raised inside register_models: RuntimeError: boom"):
        pm.registries()


def test_x2ct_plugins_lists_components_with_their_source(third_party):
    out = subprocess.run([PYTHON, "-m", "x2ct_framework.cli", "plugins"], capture_output=True, text=True,
                         env=run_env(PYTHONPATH=str(third_party)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "huber" in out.stdout and "plugin huber (x2ct-huber)" in out.stdout
    assert "vit_cascade" in out.stdout and "(x2ct-framework)" in out.stdout
    assert "failed: plugin 'broken'" in out.stdout


# ---- the cached listing of `x2ct plugins` -------------------------------------------------------------------------
# `x2ct plugins` in a fresh process: its output, and whether torch was imported (a warm listing must not).
LISTING_PROBE = """
import contextlib, io, json, sys
from x2ct_framework.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    status = main(["plugins", *sys.argv[1:]])
print(json.dumps({"status": status, "out": out.getvalue(), "torch": "torch" in sys.modules}))
"""


def list_plugins(tmp_path, *args, **env):
    import json

    out = subprocess.run([PYTHON, "-c", LISTING_PROBE, *args], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=run_env(X2CT_CACHE_DIR=str(tmp_path / "cache"), **env))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 0
    return res


def test_a_warm_listing_is_the_cold_one_without_torch(tmp_path):
    cold = list_plugins(tmp_path)
    assert cold["torch"] and "vit_cascade" in cold["out"] and "(x2ct-framework)" in cold["out"]
    assert len(list((tmp_path / "cache" / "plugins").glob("listing-*.json"))) == 1
    warm = list_plugins(tmp_path)
    assert warm["out"] == cold["out"] and not warm["torch"]
    refreshed = list_plugins(tmp_path, "--refresh")
    assert refreshed["torch"] and refreshed["out"] == cold["out"]


@pytest.fixture
def huber_only(tmp_path):
    """An installed third-party plugin (a .dist-info on PYTHONPATH), the only entry point loaded."""
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "x2ct-huber", {"x2ct_huber": GOOD}, {"huber": "x2ct_huber"})
    return site, {"PYTHONPATH": str(site), "X2CT_LOAD_PLUGINS": "huber"}


def test_touching_a_plugin_module_invalidates_the_listing(tmp_path, huber_only):
    import os

    site, env = huber_only
    cold = list_plugins(tmp_path, **env)
    assert "plugin huber (x2ct-huber)" in cold["out"] and "vit_cascade" not in cold["out"]
    assert not list_plugins(tmp_path, **env)["torch"]
    module = site / "x2ct_huber.py"
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same content, a later modification time
    again = list_plugins(tmp_path, **env)
    assert again["torch"] and again["out"] == cold["out"]
    assert not list_plugins(tmp_path, **env)["torch"]  # cached again


def test_a_changed_plugin_module_is_listed_afresh(tmp_path, huber_only):
    site, env = huber_only
    assert "  huber " in list_plugins(tmp_path, **env)["out"]
    (site / "x2ct_huber.py").write_text(textwrap.dedent(GOOD).replace('"huber"', '"huber_v2"'))
    changed = list_plugins(tmp_path, **env)
    assert changed["torch"] and "  huber_v2 " in changed["out"] and "  huber " not in changed["out"]


def test_a_listing_with_a_failed_plugin_is_not_cached(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "x2ct-broken", {"x2ct_broken": BROKEN}, {"broken": "x2ct_broken"})
    env = {"PYTHONPATH": str(site), "X2CT_LOAD_PLUGINS": "broken"}
    for _ in range(2):  # the failure may come from anything installed: every call looks again
        res = list_plugins(tmp_path, **env)
        assert res["torch"] and "failed: plugin 'broken' from x2ct-broken" in res["out"]
    assert not list((tmp_path / "cache" / "plugins").glob("listing-*.json"))

"""Registries: duplicates, unknown names, option checking, provenance."""

import pytest

from x2ct_framework.errors import PluginError, RecipeError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.registry import Registry


def test_builtin_components_come_from_entry_points():
    pm = get_plugin_manager()
    assert "l1" in pm.registry("loss")
    assert "vit_cascade" in pm.registry("model")
    assert "synthetic_phantom" in pm.registry("dataset")
    assert "psnr" in pm.registry("metric")
    entry = pm.registry("loss").get("l1")
    assert entry.plugin == "l1"
    assert entry.distribution == "x2ct-framework"


def test_duplicate_name_names_both_plugins():
    class Dup:
        @staticmethod
        @hookimpl
        def register_losses(register):
            register("l1", lambda: None)

    pm = get_plugin_manager()
    pm.register_object(Dup, "my_dup_plugin", "my-dist")
    with pytest.raises(PluginError) as err:
        pm.registries()
    msg = str(err.value)
    assert "duplicate loss name 'l1'" in msg
    assert "'l1' (x2ct-framework)" in msg and "'my_dup_plugin' (my-dist)" in msg


def test_unknown_name_lists_available_and_closest():
    reg = get_plugin_manager().registry("model")
    with pytest.raises(RecipeError) as err:
        reg.get("vit_cascde", where="r.toml: model -> name")
    msg = str(err.value)
    assert 'unknown model "vit_cascde"' in msg
    assert 'did you mean "vit_cascade"' in msg
    assert "available: " in msg and "vit_cascade" in msg


def test_create_reports_every_bad_option_at_once():
    reg = Registry("loss")

    def factory(*, alpha: float = 1.0, mode: str = "a"):
        return (alpha, mode)

    reg.register("demo", factory, plugin="p", distribution="d")
    with pytest.raises(RecipeError) as err:
        reg.create("demo", {"alpah": 2.0, "mode": 3}, where="r.toml: stages -> 1 -> losses -> demo")
    problems = err.value.problems
    assert len(problems) == 2
    assert any("alpah: unknown option" in p and 'did you mean "alpha"' in p for p in problems)
    assert any("mode: expected str, got 3" in p for p in problems)
    assert reg.create("demo", {"alpha": 2}) == (2, "a")


def test_context_fills_only_parameters_the_factory_asks_for():
    reg = Registry("loss")
    reg.register("ctx", lambda *, hu_window=(0, 1), scale=1.0: (hu_window, scale))
    assert reg.create("ctx", {}, context={"hu_window": (-1000, 3000), "views": [0, 90]}) == ((-1000, 3000), 1.0)
    assert reg.create("ctx", {"hu_window": [0, 5]}, context={"hu_window": (-1000, 3000)}) == ([0, 5], 1.0)


def test_factory_value_error_becomes_recipe_error():
    reg = Registry("loss")

    def factory(*, weight: float = 1.0):
        raise ValueError("weight must be positive")

    reg.register("bad", factory)
    with pytest.raises(RecipeError, match="rejected its options: weight must be positive"):
        reg.create("bad", {}, where="r.toml: x")


def test_names_with_wildcards():
    reg = get_plugin_manager().registry("loss")
    assert "l1" in reg.names("l*")
    assert "psnr" not in reg.names("*")


def test_an_unannotated_option_is_checked_against_the_type_of_its_default():
    from x2ct_framework.errors import RecipeError
    from x2ct_framework.registry import Registry

    def factory(every=1, name="x", flag=False, keys=("a",), scale=0.5):
        return (every, name, flag, keys, scale)

    reg = Registry("loss")
    reg.register("f", factory)
    assert reg.create("f", {"every": 2, "scale": 1, "keys": ["b"], "flag": True}) == (2, "x", True, ["b"], 1)
    with pytest.raises(RecipeError) as err:
        reg.create("f", {"every": "2", "name": 3, "flag": "yes", "keys": "a"},
                   where="r.toml: stages -> 1 -> losses -> f")
    problems = err.value.problems
    assert problems == ["r.toml: stages -> 1 -> losses -> f -> every: expected int | float, got '2'",
                        "r.toml: stages -> 1 -> losses -> f -> name: expected str, got 3",
                        "r.toml: stages -> 1 -> losses -> f -> flag: expected bool, got 'yes'",
                        "r.toml: stages -> 1 -> losses -> f -> keys: expected list, got 'a'"]

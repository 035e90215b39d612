"""The plugin docs: every hook with its exact arguments, every testing helper, and code that runs."""

import ast
import inspect
import re
import types
from pathlib import Path

import pytest

from x2ct_framework import hookspecs, testing
from x2ct_framework.plugins import KINDS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
TEXT = DOCS.read_text()


def hookspec_functions():
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return [(name, fn) for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, marker)]


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", TEXT, flags=re.S)


def test_the_hookspec_module_is_found():
    names = [n for n, _ in hookspec_functions()]
    assert set(KINDS.values()) <= set(names)
    assert "on_epoch_end" in names


@pytest.mark.parametrize("name, fn", hookspec_functions(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_hook_is_documented_with_its_exact_arguments(name, fn):
    args = list(inspect.signature(fn).parameters)
    heading = f"#### `{name}({', '.join(args)})`"
    assert heading in TEXT, f"docs/plugins.md lacks the heading {heading!r}"


def test_no_documented_hook_is_missing_from_the_specs():
    documented = set(re.findall(r"^#### `(\w+)\(", TEXT, flags=re.M))
    assert documented == {n for n, _ in hookspec_functions()}


@pytest.mark.parametrize("name", testing.__all__)
def test_every_testing_helper_is_documented(name):
    assert f"`{name}" in TEXT, f"x2ct_framework.testing.{name} is not in docs/plugins.md"


def test_the_trust_model_is_stated():
    assert "## Trust model: plugins are code" in TEXT
    assert "A recipe may name plugin modules" in TEXT
    assert "weights_only=True" in TEXT and "safetensors" in TEXT


def test_python_blocks_compile_and_toml_blocks_parse():
    import tomllib

    for block in code_blocks("python"):
        ast.parse(block)
    for block in code_blocks("toml"):
        tomllib.loads(block)


def test_the_five_minute_plugin_works_as_documented():
    """The first code block is a complete plugin: register it and run the loss contract on it."""
    module = types.ModuleType("docs_five_minute_plugin")
    exec(compile(code_blocks("python")[0], str(DOCS), "exec"), module.__dict__)
    with testing.isolated_plugins(entry_points=False), testing.registered(module, "my_losses"):
        loss = testing.create("loss", "huber", {"delta": 0.02})
        assert "autocast float16" in testing.check_loss(loss, identical="zero")
        with pytest.raises(Exception, match="delta must be > 0"):
            testing.create("loss", "huber", {"delta": 0.0})

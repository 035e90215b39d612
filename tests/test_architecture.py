"""The package's shape: every module imports, no import cycle between modules, the plugin API is named."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import x2ct_framework


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module and package under ``root`` (the package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: the module body and the blocks of its
    top-level if/try/with statements, not function or class bodies, not ``if TYPE_CHECKING:``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo[:0] = node.body + [n for h in node.handlers for n in h.body] + node.orelse + node.finalbody
        elif isinstance(node, ast.With):
            todo[:0] = node.body


def _all_imports(tree: ast.Module):
    """Every import statement, in function and class bodies too, except under ``if TYPE_CHECKING:``."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str, function_level: bool = False,
                 lazy_allowed: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (ast, nothing is executed): at module level, or with
    ``function_level`` anywhere; ``lazy_allowed`` maps a module to the modules it may import inside functions
    without the edge counting (deliberate lazy imports, named one by one)."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, _top_level_imports(tree)))
        nodes = _all_imports(tree) if function_level else _top_level_imports(tree)
        for node in nodes:
            allowed = set() if id(node) in top else (lazy_allowed or {}).get(name, set())
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = here
                for _ in range(node.level - 1 if node.level else 0):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                # ``from pkg import submodule`` imports the submodule; any other name comes from pkg itself
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            graph[name].update(t for t in targets if t in files and t != name and t not in allowed)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, set(g), g[0]) for g in groups]


def _path_within(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start through ``group`` (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle group but no path leads back to it")  # pragma: no cover


PACKAGE_ROOT = Path(x2ct_framework.__file__).parent


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(x2ct_framework.__path__, "x2ct_framework.")]
    assert set(module_files(PACKAGE_ROOT, "x2ct_framework")) == {"x2ct_framework", *names}
    for name in names:
        importlib.import_module(name)


# cli.py imports each command's module inside the command, so `x2ct --help` and `x2ct plugins` stay fast; those
# imports are deliberate and named here one by one (any other lazy import counts as an edge).
CLI_LAZY_IMPORTS = {"x2ct_framework", "x2ct_framework.config.build", "x2ct_framework.config.checks",
                    "x2ct_framework.config.document", "x2ct_framework.config.recipe", "x2ct_framework.datacheck",
                    "x2ct_framework.validate", "x2ct_framework.model_info", "x2ct_framework.listing_cache",
                    "x2ct_framework.plugins", "x2ct_framework.evaluation.evaluate",
                    "x2ct_framework.evaluation.predict", "x2ct_framework.export", "x2ct_framework.prepare"}


def test_no_import_cycle_between_modules():
    graph = import_graph(PACKAGE_ROOT, "x2ct_framework")
    assert graph["x2ct_framework.evaluation.report"] >= {"x2ct_framework.training.logbook", "x2ct_framework.viz"}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = import_graph(PACKAGE_ROOT, "x2ct_framework", function_level=True,
                         lazy_allowed={"x2ct_framework.cli": CLI_LAZY_IMPORTS})
    assert "x2ct_framework.config.build" in graph["x2ct_framework.config.recipe"]  # a lazy import, counted
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules (imports inside functions included):\n" + "\n".join(
        " -> ".join(c) for c in cycles)
    schema = graph["x2ct_framework.config.schema"]
    assert not {m for m in schema if m.startswith(("x2ct_framework.training", "x2ct_framework.evaluation"))}


def test_the_cycle_finder_sees_cycles_and_only_module_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("try:\n    from .. import c\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("import pkg.a\n\ndef late():\n    from pkg import d\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                              "def f():\n    import pkg.c\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.a"}, "pkg.d": set()}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y", "x"]]
    deep = import_graph(pkg, "pkg", function_level=True)
    assert deep["pkg.c"] == {"pkg.a", "pkg.d"} and deep["pkg.d"] == {"pkg.c"}  # TYPE_CHECKING still left out
    assert import_graph(pkg, "pkg", function_level=True, lazy_allowed={"pkg.d": {"pkg.c"}})["pkg.d"] == set()


def test_the_package_names_its_plugin_api_and_imports_cheaply():
    assert set(x2ct_framework.__all__) >= {"hookspecs", "errors", "stage", "physics", "io", "ssim", "phantom",
                                           "testing", "conventions"}
    for name in x2ct_framework.__all__:
        if name != "__version__":
            assert getattr(x2ct_framework, name) is importlib.import_module(f"x2ct_framework.{name}")
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        x2ct_framework.trainer  # not part of the plugin API
    code = "import sys, x2ct_framework; print('torch' in sys.modules, 'x2ct_framework.physics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_docs_architecture_names_every_module():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    files = module_files(PACKAGE_ROOT, "x2ct_framework").values()
    missing = [f.relative_to(PACKAGE_ROOT).as_posix() for f in files if f.name != "__init__.py" and f.name not in text]
    missing += [f"{f.parent.name}/" for f in files
                if f.name == "__init__.py" and f.parent != PACKAGE_ROOT and f"{f.parent.name}/" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"


REPO = Path(__file__).resolve().parents[1]


def api_violations(files) -> list[str]:
    """Imports of ``x2ct_framework`` outside the declared plugin API (every import, function-level too)."""
    import x2ct_framework.api as api

    public = set(x2ct_framework.PLUGIN_API)
    top_names = set(x2ct_framework.__all__) | {"load_pretrained"}
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                pairs = [(node.module, [alias.name for alias in node.names])]
            else:
                continue
            for module, names in pairs:
                parts = module.split(".")
                if parts[0] != "x2ct_framework":
                    continue
                if len(parts) == 1:
                    ok = names is None or set(names) <= top_names
                elif parts[1] == "api":
                    ok = len(parts) == 2 and (names is None or set(names) <= set(api.__all__))
                else:
                    ok = parts[1] in public
                if not ok:
                    what = f"from {module} import {', '.join(names)}" if names else f"import {module}"
                    bad.append(f"{Path(path).as_posix()}:{node.lineno}: {what}")
    return bad


def test_plugins_and_examples_import_only_the_plugin_api():
    files = sorted(p for folder in ("plugins", "examples") for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 20
    bad = api_violations(files)
    assert not bad, "imports outside the plugin API (x2ct_framework.__all__, x2ct_framework.api):\n" + "\n".join(bad)


def test_the_api_check_sees_private_imports_and_every_api_name_resolves(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("from x2ct_framework.hookspecs import hookimpl\nfrom x2ct_framework.api import Protocol\n"
                      "import x2ct_framework.physics.drr\n\ndef f():\n    from x2ct_framework.plugins import registry\n"
                      "    from x2ct_framework.api import Nope\n    import x2ct_framework.training.trainer\n")
    bad = api_violations([plugin])
    assert [b.split(": ", 1)[1] for b in bad] == ["from x2ct_framework.plugins import registry",
                                                  "from x2ct_framework.api import Nope",
                                                  "import x2ct_framework.training.trainer"]
    import x2ct_framework.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None


def test_a_moved_module_still_imports_with_a_warning_naming_the_new_import(tmp_path):
    """A third-party metric package written against 0.1's layout (``x2ct_framework.metrics``) keeps working."""
    pkg = tmp_path / "old_metric_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from x2ct_framework.metrics import Metric\nfrom x2ct_framework.hookspecs import hookimpl\n\n"
        "class Bias(Metric):\n    higher_is_better = False\n\n    def __call__(self, pred, target, batch=None):\n"
        "        return (pred - target).flatten(1).mean(1)\n\n"
        "@hookimpl\ndef register_metrics(register):\n    register('bias', Bias)\n")
    code = ("import warnings, torch\nwarnings.simplefilter('error')\n"
            "try:\n    import old_metric_pkg\nexcept DeprecationWarning as w:\n    print('WARNED', w)\n"
            "warnings.simplefilter('ignore')\nimport old_metric_pkg\n"
            "from x2ct_framework.evaluation.metrics import Metric\n"
            "print(issubclass(old_metric_pkg.Bias, Metric))\n"
            "from x2ct_framework.testing import isolated_plugins, registered, create\n"
            "with isolated_plugins(entry_points=False), registered(old_metric_pkg, 'old'):\n"
            "    m = create('metric', 'bias')\n"
            "    print(float(m(torch.ones(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4))[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("WARNED x2ct_framework.metrics moved to x2ct_framework.evaluation.metrics")
    assert "from x2ct_framework.api import Metric" in lines[0] and "0.3.0" in lines[0]
    assert lines[1:] == ["True", "1.0"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert x2ct_framework.__version__ in changelog and "x2ct_framework.metrics" in changelog


def test_the_old_layers_module_still_gives_each_name_with_a_warning_naming_its_new_module():
    import warnings

    import x2ct_plugins.models.layers as layers
    from x2ct_framework.physics import project_points
    from x2ct_plugins.models.attention import Attention
    from x2ct_plugins.models.inputs import check_inputs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert layers.Attention is Attention and layers.check_inputs is check_inputs
        assert layers.project_points is project_points  # one projection, in physics/
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages[0] == ("x2ct_plugins.models.layers is split by role: import Attention from "
                           "x2ct_plugins.models.attention instead (the old path is removed in 0.3.0)")
    assert len(messages) == 3
    with pytest.raises(AttributeError):
        layers.no_such_layer

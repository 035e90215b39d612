"""Registering plugins for one test: an isolated plugin manager, a module or one factory for a block, building
a component the way a recipe does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable


from x2ct_framework import plugins as _plugins
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import KINDS, PluginManager, get_plugin_manager
from x2ct_framework.stage import Stage


@contextmanager
def isolated_plugins(entry_points: bool = True) -> Iterator[PluginManager]:
    """A fresh process-wide plugin manager for the block; the previous one is restored afterwards.

    ``entry_points=False`` skips installed plugins, so the block sees only what it registers plus the
    core's optimizers, schedules and protocols.
    """
    saved = _plugins._MANAGER
    pm = PluginManager()
    if not entry_points:
        pm._entry_points_loaded = True
    _plugins._MANAGER = pm
    try:
        yield pm
    finally:
        _plugins._MANAGER = saved


@contextmanager
def registered(plugin: Any, name: str | None = None) -> Iterator[PluginManager]:
    """Register ``plugin`` (a module, class or object with hook implementations) for the block."""
    pm = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or f"test-plugin-{id(plugin)}"
    pm.register_object(plugin, name, distribution="registered in a test")
    try:
        yield pm
    finally:
        if pm.pm.has_plugin(name):
            pm.unregister(name)


def registered_component(kind: str, name: str, factory: Callable[..., Any]):
    """Register one factory under ``name`` for the block, e.g. ``registered_component("loss", "x", X)``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    hook_name = KINDS[kind]

    def impl(register):
        register(name, factory)

    plugin = type(f"test_{kind}_{name}", (), {hook_name: staticmethod(hookimpl(impl))})
    return registered(plugin, f"test-{kind}-{name}")


def make_stage(resolution: int = 16, name: str = "stage1", index: int = 1, **options: Any) -> Stage:
    """A :class:`Stage` as datasets receive it."""
    return Stage(name=name, index=index, resolution=resolution, options={"resolution": resolution, **options})


def create(kind: str, name: str, options: dict | None = None, **context: Any) -> Any:
    """Build a registered component the way a recipe does.

    ``options`` is the recipe table (checked against the factory's keyword arguments, so a
    misspelt option fails here as it would in a recipe). ``context`` holds what the framework
    offers (``resolution``, ``views``, ``hu_window``, ``geometry``, ``seed``); a factory receives
    only the ones it declares. Datasets also take ``split`` (default ``"train"``) and ``stage``
    (default a stage at ``resolution``, 16 when not given).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    reg = get_plugin_manager().registry(kind)
    fixed = {}
    if kind == "dataset":
        fixed["split"] = context.pop("split", "train")
        fixed["stage"] = context.pop("stage", None) or make_stage(context.get("resolution", 16))
    return reg.create(name, options or {}, where=f"test {kind} {name!r}", context=context, **fixed)


# ---- inputs ----------------------------------------------------------------------------------------

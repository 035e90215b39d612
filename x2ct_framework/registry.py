"""Flat registries of named component factories, filled only through plugin hooks.

A registry maps a name to a factory and remembers which plugin (and distribution) gave it.
Duplicate names are an error naming both sources; an unknown name lists the available names and
the closest match. `create` checks a recipe table against the factory's keyword parameters, so a
misspelt option is reported with its file and dotted key before anything is built.
"""

from __future__ import annotations

import fnmatch
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from x2ct_framework.errors import PluginError, RecipeError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str

    @property
    def source(self) -> str:
        return f"plugin {self.plugin!r} ({self.distribution})"


class Registry:
    """Components of one kind (``model``, ``loss``, ``dataset``, ``metric``, ...).

    ``reserved`` maps names no plugin may take to what they already mean (accelerate's built-in trackers).
    """

    def __init__(self, kind: str, reserved: dict[str, str] | None = None, failed: dict[str, str] | None = None):
        self.kind = kind
        self.reserved = dict(reserved or {})
        self.failed = failed if failed is not None else {}  # plugin -> why it failed to load (the manager's)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable[..., Any], *, plugin: str = "?", distribution: str = "?") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a factory that is not callable")
        if name in self.reserved:
            raise PluginError(f"plugin {plugin!r} ({distribution}) registered {self.kind} {name!r}, a name taken by "
                              f"{self.reserved[name]}; rename it")
        if name in self._entries:
            old = self._entries[name]
            raise PluginError(
                f"duplicate {self.kind} name {name!r}: registered by {old.source} and again by "
                f"plugin {plugin!r} ({distribution}); rename one of them"
            )
        self._entries[name] = Entry(name, factory, plugin, distribution)

    def copy(self) -> "Registry":
        out = Registry(self.kind, self.reserved, self.failed)
        out._entries = dict(self._entries)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def failed_note(self) -> str:
        """``; note: plugin 'x' from dist failed to load ...`` when any did: the missing name may be theirs."""
        if not self.failed:
            return ""
        return "; note: " + "; ".join(self.failed.values())

    def get(self, name: str, where: str = "") -> Entry:
        if name not in self._entries:
            prefix = f"{where}: " if where else ""
            raise RecipeError([
                f'{prefix}unknown {self.kind} "{name}"{did_you_mean(name, self._entries)} '
                f"(available: {name_list(self.names())}){self.failed_note()}"
            ])
        return self._entries[name]

    def create(self, name: str, options: dict | None = None, *, where: str = "", context: dict | None = None,
               **fixed: Any) -> Any:
        """Build component ``name`` from recipe ``options``.

        ``fixed`` arguments are always passed (for example ``split`` and ``stage`` for datasets).
        ``context`` values are passed only for parameters the factory accepts and the recipe did
        not set (for example ``hu_window`` or ``views``), so components can ask for them.
        ``where`` is the ``file: dotted -> key`` prefix used in error messages.
        """
        entry = self.get(name, where)
        options = dict(options or {})
        params = _parameters(entry.factory)
        kwargs = check_options(entry, options, where, self.kind, reserved=set(fixed),
                               supplied=set(context or {}))
        for key, value in (context or {}).items():
            if key not in kwargs and key not in fixed and params is not None and key in params:
                kwargs[key] = value
        try:
            return entry.factory(**fixed, **kwargs)
        except (ValueError, TypeError) as exc:
            raise RecipeError([f"{where}: {self.kind} {name!r} rejected its options: {exc}"]) from exc


def name_list(names: list[str] | tuple[str, ...], limit: int = 12) -> str:
    """``a, b, c`` or, past ``limit`` names, ``a, b, ... and N more`` (an error line stays readable)."""
    names = list(names)
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """Keyword parameters of a factory, or None when it accepts ``**kwargs``."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = {}
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        params[p.name] = p
    return params


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}


def _type_ok(value: Any, hint: Any) -> bool:
    """A lenient check of a TOML value against a simple annotation (unknown forms pass)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _default_type(default: Any) -> Any:
    """The type an unannotated option's default implies (a number stays a number, int or float)."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return int | float
    if isinstance(default, str):
        return str
    if isinstance(default, (list, tuple)):
        return list
    if isinstance(default, dict):
        return dict
    return inspect.Parameter.empty


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_options(entry: Entry, options: dict, where: str, kind: str = "component",
                  reserved: set[str] = frozenset(), supplied: set[str] = frozenset()) -> dict:
    """Validate recipe options against the factory's signature; all problems are reported at once."""
    params = _parameters(entry.factory)
    if params is None:
        return options
    hints = _hints(entry.factory)
    accepted = [n for n in params if n not in reserved]
    problems = []
    for key, value in options.items():
        if key not in params or key in reserved:
            problems.append(
                f"{where} -> {key}: unknown option for {kind} {entry.name!r}{did_you_mean(key, accepted)} "
                f"(accepted: {name_list(accepted)})"
            )
            continue
        hint = hints.get(key, params[key].annotation)
        if hint is inspect.Parameter.empty:
            hint = _default_type(params[key].default)
        if not _type_ok(value, hint):
            problems.append(f"{where} -> {key}: expected {_describe(hint)}, got {value!r}")
    missing = [n for n, p in params.items()
               if p.default is p.empty and n not in options and n not in reserved and n not in supplied]
    for key in missing:
        problems.append(f"{where} -> {key}: required option of {entry.name!r} is missing")
    if problems:
        raise RecipeError(problems)
    return options

"""The recipe document: TOML reading with ``extends``, ``--set`` overrides, strict validation and the resolved recipe.

A recipe is one TOML file (plus the files it extends) that describes a whole experiment.
``extends = "base.toml"`` is resolved relative to the file; tables deep-merge, arrays replace,
cycles are an error. ``--set stages.2.epochs=5`` overrides a dotted key with a TOML value
(array positions in dotted keys are 1-based, so ``stages.2`` is stage 2; a stage may also be named,
``stages.stage2.epochs``). Validation reports every problem at once as
``file: dotted -> key: what was expected, what was found``.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from x2ct_framework.errors import RecipeError, did_you_mean
from x2ct_framework.plugins import plugin_file

Key = tuple  # a path into the recipe: strings for table keys, ints (0-based) for array items


@dataclass
class Recipe:
    """A resolved recipe: plain data plus where each value came from."""

    data: dict
    path: Path
    origins: dict = field(default_factory=dict)
    # The run folder whose recipe.toml this is, when it was read from one rather than named by the user:
    # its plugins are then data, not code (see PluginManager.allows_run_plugin).
    run_folder: Path | None = None
    # Set once every check of load_recipe passed (schema, cross-key, registries and options); Trainer(recipe)
    # runs them itself otherwise.
    checked: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def plugins_dir(self) -> Path:
        """The folder ``plugins`` paths are relative to: that of the file that declares them (or the
        working directory for ``--set plugins=[...]``)."""
        origin = self.origin(("plugins",))
        return Path.cwd() if origin == "--set" else Path(origin).parent

    def origin(self, key: Key) -> str:
        """The file (or ``--set``) that gave the value at ``key`` or its nearest parent."""
        key = tuple(key)
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key[:-1]
        return str(self.path)

    def where(self, *key: Any) -> str:
        """``file: a -> b -> c`` for error messages; array positions are shown 1-based."""
        return f"{self.origin(key)}: {format_key(key)}" if key else self.origin(())

    def to_toml(self) -> str:
        return dumps_toml(self.data)

    def to_run_toml(self) -> str:
        """The recipe as a run folder keeps it: plugin files as absolute paths, so that evaluating or
        predicting from the run folder (recipe.toml there, not beside the original) still finds them."""
        data = copy.deepcopy(self.data)
        if data.get("plugins"):
            data["plugins"] = [str(plugin_file(p, self.plugins_dir) or p) for p in data["plugins"]]
        return dumps_toml(data)


def format_key(key: Key) -> str:
    return " -> ".join(str(k + 1) if isinstance(k, int) else str(k) for k in key)


# ---- loading -------------------------------------------------------------------------------------
def _read_toml(path: Path, chain: list[Path]) -> tuple[dict, dict]:
    """Read ``path`` with its ``extends`` chain; returns (data, origins)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + [path])
        raise RecipeError([f"{chain[-1]}: extends: cycle in extends: {cycle}"])
    if not path.is_file():
        where = f"{chain[-1]}: extends" if chain else "recipe"
        raise RecipeError([f"{where}: file not found: {path}"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{path}: not valid TOML: {exc}"]) from exc
    own_origins = {k: str(path) for k in _all_keys(data)}
    parents = data.pop("extends", None)
    if parents is None:
        return data, own_origins
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError([f"{path}: extends: expected a file name or a list of file names, got {parents!r}"])
    merged: dict = {}
    origins: dict = {}
    for parent in parents:
        pdata, porigins = _read_toml(path.parent / parent, chain + [path])
        merged, origins = _merge(merged, origins, pdata, porigins)
    own_origins.pop(("extends",), None)
    return _merge(merged, origins, data, own_origins)


def _all_keys(data: Any, prefix: Key = ()) -> list[Key]:
    keys = []
    if isinstance(data, dict):
        for k, v in data.items():
            keys.append(prefix + (k,))
            keys.extend(_all_keys(v, prefix + (k,)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, dict):
                keys.append(prefix + (i,))
                keys.extend(_all_keys(v, prefix + (i,)))
    return keys


def _merge(base: dict, base_origins: dict, over: dict, over_origins: dict) -> tuple[dict, dict]:
    """Deep-merge ``over`` into ``base``: tables merge, everything else (arrays too) replaces."""
    out = copy.deepcopy(base)
    origins = dict(base_origins)

    def rec(dst: dict, src: dict, prefix: Key) -> None:
        for k, v in src.items():
            key = prefix + (k,)
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                rec(dst[k], v, key)
            else:
                dst[k] = copy.deepcopy(v)
                for ok in [o for o in origins if o[: len(key)] == key]:
                    del origins[ok]
            if key in over_origins:
                origins[key] = over_origins[key]
            for ok, ov in over_origins.items():
                if ok[: len(key)] == key and ok not in origins:
                    origins[ok] = ov

    rec(out, over, ())
    return out, origins


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (['a', 'b', 'c'], value); the value is TOML, or a bare word as a string."""
    if "=" not in text:
        raise RecipeError([f"--set {text}: expected dotted.key=value"])
    key, raw = text.split("=", 1)
    key_path = [p.strip() for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in key_path):
        raise RecipeError([f"--set {text}: expected dotted.key=value, got an empty key part"])
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw and all(c.isalnum() or c in "_-./:+" for c in raw) and raw[0] not in "[{\"'":
            value = raw  # a bare word such as a name or a path
        else:
            raise RecipeError([f"--set {text}: the value {raw!r} is not a TOML value "
                               f"(strings with spaces need quotes: key=\"a b\")"]) from None
    return key_path, value


def apply_override(data: dict, origins: dict, key_path: list[str], value: Any, text: str) -> None:
    node: Any = data
    key: Key = ()
    for i, part in enumerate(key_path):
        last = i == len(key_path) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, text, key)
            key += (idx,)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise RecipeError([f"--set {text}: {format_key(key)} is a {type(node).__name__}, "
                               f"not a table, so it has no key {part!r}"])
        key += (part,)
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
    for ok in [o for o in origins if o[: len(key)] == key]:
        del origins[ok]
    origins[key] = "--set"


def _list_index(node: list, part: str, text: str, key: Key = ()) -> int:
    if part.isdigit():
        idx = int(part) - 1
        if 0 <= idx < len(node):
            return idx
        raise RecipeError([f"--set {text}: position {part} is out of range (1..{len(node)}; positions are 1-based)"])
    default = "stage{}" if key == ("stages",) else ""
    names = [(item.get("name") or default.format(i + 1)) if isinstance(item, dict) else ""
             for i, item in enumerate(node)]
    if part in names:
        return names.index(part)
    raise RecipeError([f"--set {text}: no item named {part!r}{did_you_mean(part, [n for n in names if n])}"
                       f" (use a 1-based position or one of: {', '.join(str(n) for n in names)})"])


# ---- writing -------------------------------------------------------------------------------------
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(v: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped."""
    out = []
    for c in v:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    """A bare key when TOML allows one (ASCII letters, digits, ``_`` and ``-``), else a quoted key."""
    return k if _BARE_KEY.fullmatch(k) else _toml_string(k)


def dumps_toml(data: dict) -> str:
    """Write plain recipe data as TOML (tables as sections, arrays of tables as [[...]])."""
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not _is_section(v)}
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict) and _is_section(v):
                name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
                lines.append("")
                lines.append(f"[{name}]")
                emit(v, name)
            elif isinstance(v, list) and _is_section(v):
                name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
                for item in v:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    emit(item, name)

    emit(data, "")
    return "\n".join(lines).strip() + "\n"


def _is_section(v: Any) -> bool:
    if isinstance(v, dict):
        return True
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, dict) for x in v)

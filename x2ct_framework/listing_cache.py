"""The cached output of ``x2ct plugins``, so that listing the plugins again needs no torch import.

Listing the plugins imports every plugin module, and so torch. A listing that succeeded (no plugin
failed or warned) is written to ``<cache dir>/plugins/listing-<key>.json`` (the cache directory of
:mod:`x2ct_framework.cachedir`); the next call prints it without importing a plugin when nothing
that can change it has changed:

- in the key: the format of this file, the Python version and interpreter, ``sys.path``, the
  ``X2CT_LOAD_PLUGINS`` and ``X2CT_STRICT_PLUGINS`` variables, every entry point of the
  ``x2ct_framework`` group (name, module, distribution name and version) and the ``--recipe`` path;
- checked file by file (path, size, modification time): every module file of the framework and of
  the plugin packages (the top-level packages the entry points name, helpers included) that the
  listing imported, each plugin file a recipe names, and the recipe with its ``extends`` chain.

A listing with a failed plugin is not cached (the failure may come from anything installed).
``x2ct plugins --refresh`` lists afresh and rewrites the entry. This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from x2ct_framework.cachedir import default_cache_dir
from x2ct_framework.plugins import ENTRY_POINT_GROUP as GROUP  # torch-free: pluggy and the registry

FORMAT = 1
FOLDER = "plugins"


def _entry_points() -> list[list[str]]:
    versions: dict[str, str] = {}
    out = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist
        name = dist.name if dist is not None else ""
        if dist is not None and name not in versions:
            versions[name] = dist.version or ""
        out.append([ep.name, ep.value, name, versions.get(name, "")])
    return sorted(out)


def listing_key(recipe: str | None) -> dict[str, Any]:
    """Everything except files that can change the listing."""
    env = {k: os.environ.get(k) for k in ("X2CT_LOAD_PLUGINS", "X2CT_STRICT_PLUGINS")}
    return {"format": FORMAT, "python": sys.version, "executable": sys.executable, "path": list(sys.path),
            "env": env, "entry_points": _entry_points(),
            "recipe": str(Path(recipe).resolve()) if recipe else None}


def _stat(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [path, st.st_size, st.st_mtime_ns]


def listing_files(key: dict[str, Any], extra: Iterable[str | Path] = ()) -> list[list]:
    """(path, size, mtime) of every file the listing depends on, as imported now: the modules of the
    framework and of the entry points' top-level packages, plus ``extra`` (recipe files, plugin files)."""
    tops = {"x2ct_framework"} | {value.split(":")[0].split(".")[0] for _, value, _, _ in key["entry_points"]}
    paths = {str(Path(p).resolve()) for p in extra}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and name.split(".")[0] in tops:
            paths.add(str(Path(file).resolve()))
    return [s for s in map(_stat, sorted(paths)) if s is not None]


class ListingCache:
    """One cached listing: :meth:`read` gives the text when it is still valid, :meth:`write` stores it."""

    def __init__(self, recipe: str | None = None, folder: str | Path | None = None):
        self.key = listing_key(recipe)
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = Path(folder or default_cache_dir()) / FOLDER / f"listing-{digest}.json"

    def read(self) -> str | None:
        """The cached listing, or ``None`` when there is none, it is unreadable or a file it depends on changed."""
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != self.key or not isinstance(entry.get("files"), list):
            return None
        if not entry["files"] or any(not isinstance(f, list) or not f or _stat(f[0]) != f for f in entry["files"]):
            return None
        listing = entry.get("listing")
        return listing if isinstance(listing, str) else None

    def write(self, listing: str, extra: Iterable[str | Path] = ()) -> None:
        """Store ``listing`` (best effort: a cache folder that cannot be written only costs the next call time)."""
        entry = {"key": self.key, "files": listing_files(self.key, extra), "listing": listing}
        try:
            from x2ct_framework.atomic import write_text

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(entry, indent=1))
        except OSError:
            pass

"""Every output path of a folder the framework writes stays inside that folder.

A run folder, an evaluation's results, a report, an export or a prepared cache may come from
someone else, and a folder received is data: it must not be able to make a command write anywhere
else. The rules, applied by one helper for every writer:

- names below a folder are relative, one or more plain components: no absolute path, no ``~``,
  no ``..``, no control characters (:func:`name_problem`, :func:`inside`);
- no symbolic link on the way from the folder to the file may lead outside the folder. A folder is
  *confined* while a command writes into it (:func:`confined`); every writer calls :func:`guard`
  on its path when it opens it, so a link made after the start is caught too;
- :func:`refuse_outside_links` checks a whole folder before a command starts writing there, so a
  received folder with links is refused before anything is written;
- temporary files are opened with ``O_NOFOLLOW | O_EXCL`` after removing a leftover of that name
  (:func:`open_new`), so a planted link at a temporary name is never written through.

The refusals are :class:`OutsideFolderError` (exit status 2), naming the link, where it leads and
what to do.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator

from x2ct_framework.errors import DataError

MAX_LISTED = 5  # entries named in one message; the rest are counted


class OutsideFolderError(DataError):
    """An output path would leave the folder it belongs to (a ``..``, an absolute name, a symbolic link)."""


def bounded(items: Iterable[object], limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """``items`` joined, at most ``limit`` of them, then "and N more"."""
    items = [str(i) for i in items]
    shown = sep.join(items[:limit])
    return shown + (f"{sep}and {len(items) - limit} more" if len(items) > limit else "")


def clip(text: object, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def name_problem(name: str, *, single: bool = False) -> str | None:
    """Why ``name`` cannot name something below a folder (None when it can).

    ``single``: exactly one path component (a stage folder, a file), no ``/``.
    """
    if not isinstance(name, str) or not name.strip():
        return "expected a non-empty name"
    if "\0" in name or any(ord(c) < 0x20 for c in name):
        return "expected a name without control characters"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive \
            or name.startswith("~"):
        return "expected a relative name, not an absolute path"
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        return "expected a name without '..'"
    if not parts:
        return "expected a name that names something below the folder, not the folder itself"
    if single and (len(parts) != 1 or "/" in name or "\\" in name):
        return "expected a single folder name, without '/'"
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check(root: str | Path, path: str | Path) -> Path:
    """``path`` if it lies below ``root`` and no symbolic link between them leads outside ``root``."""
    root, path = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    if not _within(path, root):
        raise OutsideFolderError(f"{path}: outside the folder {root} it must be written in")
    real_root = _real(root)
    cur = root
    for part in path.relative_to(root).parts:
        cur = cur / part
        if os.path.islink(cur):
            dest = _real(cur)
            if not _within(dest, real_root):
                raise OutsideFolderError(
                    f"{cur} is a symbolic link to {dest}, outside the folder {root}; nothing is written through it. "
                    f"A folder's outputs stay inside it: remove the link (or put a real file or folder there)")
        elif not os.path.lexists(cur):
            break
    return path


def inside(root: str | Path, *names: str) -> Path:
    """``root/names...`` after checking each name (relative, no ``..``) and the links on the way."""
    for name in names:
        problem = name_problem(name)
        if problem:
            raise OutsideFolderError(f"{name!r}: {problem} (it is written below {root})")
    return check(root, Path(root).joinpath(*names))


# ---- confined folders ---------------------------------------------------------------------------
_lock = threading.Lock()
_roots: list[Path] = []


@contextlib.contextmanager
def confined(root: str | Path) -> Iterator[Path]:
    """While the block runs, :func:`guard` checks every path below ``root``."""
    root = Path(os.path.abspath(root))
    with _lock:
        _roots.append(root)
    try:
        yield root
    finally:
        with _lock:
            _roots.remove(root)


def confine(root: str | Path) -> Path:
    """Confine ``root`` until :func:`release` (for owners that outlive one block, like a run folder)."""
    root = Path(os.path.abspath(root))
    with _lock:
        _roots.append(root)
    return root


def release(root: str | Path | None) -> None:
    if root is None:
        return
    root = Path(os.path.abspath(root))
    with _lock:
        if root in _roots:
            _roots.remove(root)


def guard(path: str | Path) -> Path:
    """``path``, after checking it against every confined folder that holds it (call it when opening)."""
    p = Path(os.path.abspath(path))
    with _lock:
        roots = [r for r in _roots if _within(p, r)]
    for root in roots:
        check(root, p)
    return Path(path)


def refuse_outside_links(root: str | Path, what: str = "folder") -> None:
    """Refuse a ``root`` holding symbolic links that lead outside it (checked before writing there)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        return
    real_root = _real(root)
    bad = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            if os.path.islink(p) and not _within(_real(p), real_root):
                bad.append(f"{p.relative_to(root)} -> {os.readlink(p)}")
    if bad:
        raise OutsideFolderError(
            f"{what} {root} holds {len(bad)} symbolic link(s) leading outside it ({bounded(bad)}); a command writes "
            f"only inside the {what}, so these are refused: remove them, or put real files or folders in their place")


def open_new(path: str | Path, mode: str = "w", **kwargs):
    """Open a fresh file at ``path`` (a temporary name): a leftover file or link there is removed first,
    and the file is created with ``O_EXCL | O_NOFOLLOW``, so a link planted at that name is never followed."""
    path = guard(path)
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, mode, **kwargs)

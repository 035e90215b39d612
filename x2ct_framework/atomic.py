"""Atomic outputs: a file or a folder of results appears under its final name complete, or not at all.

Files are written under a temporary name in the same folder and renamed into place; folders of
results are filled under a temporary name and swapped in whole (the previous folder lives at
``<name>.old`` for the instant between the two renames). File modes follow the process umask, also
for the writers that ignore it (safetensors creates its files 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from x2ct_framework.safepaths import guard


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), else set and reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, mode: int = 0o666) -> None:
    """Give ``path`` the mode a plain ``open()`` would have given it (``mode`` minus the umask)."""
    os.chmod(path, mode & ~current_umask())


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without error."""
    path = guard(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    if os.path.islink(tmp):  # a link planted at the temporary name is removed, never written through
        os.unlink(tmp)
    try:
        yield tmp
        guard(path)
        if tmp.exists():
            follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to fill; swapped in whole for ``path`` when the block ends.

    On an error the temporary folder is removed and ``path`` is left as it was.
    """
    path = guard(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, path: Path) -> None:
    """Replace folder ``path`` by the finished folder ``tmp`` (two renames; the old one is removed after)."""
    guard(path)
    old = guard(path.with_name(path.name + ".old"))
    if os.path.islink(old):
        os.unlink(old)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)

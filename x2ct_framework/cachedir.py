"""Where the framework caches things: ``$X2CT_CACHE_DIR``, else ``$XDG_CACHE_HOME/x2ct``, else ``~/.cache/x2ct``.

The datasets' array cache and the plugin listing (``x2ct plugins``) live there. This module
imports nothing heavy, so the commands that start fast can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "X2CT_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$X2CT_CACHE_DIR``, else ``$XDG_CACHE_HOME/x2ct``, else ``~/.cache/x2ct``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "x2ct"

"""Importing a plugin cannot hang or end a command silently.

:func:`bounded_import` runs a plugin's import in a helper thread and waits at most
``X2CT_PLUGIN_IMPORT_TIMEOUT`` seconds (default 120). A plugin still importing then (waiting on a
network, a lock, input) is named in a :class:`~x2ct_framework.errors.PluginError`; its import keeps
running in the background, where it cannot be interrupted, and is not used. A plugin that calls
``sys.exit()`` (or raises ``SystemExit``) while importing is reported as a failed plugin instead of
ending the command with that status and nothing done.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from x2ct_framework.errors import PluginError


def import_timeout() -> float:
    try:
        return max(0.01, float(os.environ.get("X2CT_PLUGIN_IMPORT_TIMEOUT", "120")))
    except ValueError:
        return 120.0


def bounded_import(what: str, load: Callable[[], Any], timeout: float | None = None) -> Any:
    """``load()`` (an import), bounded in time; ``what`` names the plugin in messages."""
    timeout = import_timeout() if timeout is None else timeout
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = load()
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included: reported, not obeyed
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"x2ct-import {what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise PluginError(f"{what} is still importing after {timeout:g} s (X2CT_PLUGIN_IMPORT_TIMEOUT): it seems "
                          f"blocked (waiting on a network, a lock or input?). It is not used; its import is left "
                          f"running in the background. Fix or remove the plugin, or raise the bound.")
    error = box.get("error")
    if isinstance(error, SystemExit):
        raise PluginError(f"{what} called sys.exit({error.code!r}) while importing; a plugin must not end the "
                          f"program: fix or remove it") from None
    if isinstance(error, KeyboardInterrupt):
        raise error
    if error is not None:
        raise error
    return box.get("value")

"""Stop requests during training: the one place where signals reach the loop.

A signal (Ctrl-C = SIGINT) does not raise inside the loop; it sets :attr:`StopRequest.requested`,
and the loop stops at its next consistent point (after an optimizer update), saves ``last`` and
raises ``KeyboardInterrupt``. A second signal raises at once. With several processes the request is
shared at every optimizer update so that all stop together.

Another signal is handled by naming it in ``SIGNALS`` (with its message); the loop needs no change.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
from accelerate import Accelerator

SIGNALS: dict[int, str] = {signal.SIGINT: "Ctrl-C"}


class StopRequest:
    """Turns the signals of ``SIGNALS`` into a ``requested`` flag while installed.

    Use as a context manager (``with StopRequest() as stop:``) or with :meth:`install` /
    :meth:`uninstall`. Handlers are installed only in the main thread (Python's rule for signals).
    """

    def __init__(self, signals: dict[int, str] | None = None):
        self.signals = dict(SIGNALS if signals is None else signals)
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = self.signals.get(signum, f"signal {signum}")
        print(f"\nstopping at the next optimizer update ({name} again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, acc: Accelerator) -> bool:
        """Whether any process was asked to stop; processes compare their flags when gradients sync."""
        if acc.num_processes == 1:
            return self.requested
        if not acc.sync_gradients:
            return False
        flag = torch.tensor([float(self.requested)], device=acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

"""Stop requests during training: the one place where signals reach the loop.

A signal (Ctrl-C = SIGINT, or SIGTERM, which SLURM and other schedulers send before a preemption or
at the time limit) does not raise inside the loop; it sets :attr:`StopRequest.requested`, and the
loop stops at its next consistent point (after an optimizer update), saves ``last`` and raises
``KeyboardInterrupt``. A second signal raises at once. With several processes the request (and
which signal it was) is shared at every optimizer update so that all stop together. The command
line exits with :func:`exit_status`: 130 after Ctrl-C, 143 after SIGTERM. Outside the loop,
:func:`install_terminate_handler` turns SIGTERM into the same ``KeyboardInterrupt``.

Another signal is handled by naming it in ``SIGNALS`` (with its message); the loop needs no change.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and accelerate are imported where processes agree: report_errors needs neither
    from accelerate import Accelerator

SIGNALS: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []  # the signals that asked this process to stop, in order


def received_signal() -> int | None:
    """The last signal that asked the process to stop (itself or, with several processes, another one)."""
    return _received[-1] if _received else None


def exit_status() -> int:
    """128 + the signal number: 143 after SIGTERM, 130 after Ctrl-C (and for a KeyboardInterrupt of other origin)."""
    return 128 + signal.SIGTERM if received_signal() == signal.SIGTERM else 128 + signal.SIGINT


def reset_received() -> None:
    _received.clear()


def _terminate(signum, frame) -> None:
    _received.append(signum)
    print("\nstopping (SIGTERM)", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def install_terminate_handler():
    """Outside the training loop SIGTERM raises ``KeyboardInterrupt`` too (exit status 143), so the
    command stops through the same clean-up as Ctrl-C (the run folder's lock is released). Returns the
    previous handler (None when not in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _terminate)
    return None


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
        _received.append(signum)
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = self.signals.get(signum, f"signal {signum}")
        print(f"\nstopping at the next optimizer update ({name} again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, acc: Accelerator) -> bool:
        """Whether any process was asked to stop; processes compare their flags when gradients sync."""
        if acc.num_processes == 1:
            return self.requested
        if not acc.sync_gradients:
            return False
        import torch

        # the flag carries the signal number, so every process learns that it was SIGTERM (15 > 2)
        flag = torch.tensor([float(getattr(self, "signum", signal.SIGINT) if self.requested else 0)],
                            device=acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and not self.requested:
            _received.append(signum)
        return bool(signum)

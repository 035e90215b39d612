"""The run folder a training run writes: locked while it runs, never silently reused or replaced.

- :meth:`RunFolder.open` (at the start of a run, before anything is written) checks that
  ``output_dir`` and the run folder are folders, moves an existing run folder aside when the user
  asked for ``--overwrite`` (to ``<name>.replaced-<UTC time>``, never deleted), takes the lock, and
  notes which stages already hold checkpoints.
- The lock is a file ``.lock`` in the run folder holding the PID, host and start time of the
  process that writes there; the holder touches it every ``HEARTBEAT`` seconds. A second run on the
  same folder stops with exit status 2 naming the holder; a lock left by a process that no longer
  exists on this host is taken over with a message, and so is a lock from another host that has not
  been touched for ``X2CT_LOCK_TIMEOUT`` seconds (default 600: a node that died or a job killed with
  SIGKILL, then requeued elsewhere).
- :meth:`RunFolder.before_fresh_stage` is called before a stage starts from scratch: a stage whose
  folder held checkpoints when the run started is refused (exit 2) with the three ways on
  (``--resume``, a new ``name``, ``--overwrite``), so a finished run is never overwritten by
  mistake.

With several processes only the main one takes the lock and moves folders; every process reaches
the same verdict (it is broadcast), so they stop together.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.errors import DataError, X2CTError

LOCK = ".lock"
HEARTBEAT = 30.0  # seconds between touches of a held lock


def lock_timeout() -> float:
    """Seconds after which a lock from another host that nobody touches counts as abandoned."""
    try:
        return float(os.environ.get("X2CT_LOCK_TIMEOUT", "600"))
    except ValueError:
        return 600.0


class RunFolderError(X2CTError):
    """The run folder is in use, already holds checkpoints, or cannot be made (exit status 2)."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def holder_info() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "process_start": _process_start(pid), "command": " ".join(sys.argv)[:500]}


def describe_holder(info: dict[str, Any]) -> str:
    return (f"process {info.get('pid')} on host {info.get('host')} (since {info.get('started')}"
            + (f", command: {info['command']}" if info.get("command") else "") + ")")


def is_stale(info: dict[str, Any] | None, lock: Path) -> bool:
    """A lock whose holder is gone: a process of this host that no longer runs (or whose PID was reused)."""
    if info is None:  # unreadable: stale unless it was created an instant ago (a writer in the middle)
        try:
            return time.time() - lock.stat().st_mtime > 10
        except OSError:
            return True
    if info.get("host") != socket.gethostname():
        try:
            return time.time() - lock.stat().st_mtime > lock_timeout()
        except OSError:
            return True
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    start = info.get("process_start")
    return start is not None and _process_start(pid) not in (None, start)


def read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def acquire(folder: Path) -> tuple[Path, str | None]:
    """Take ``folder/.lock``; returns (lock path, a message when a stale lock was taken over)."""
    lock = folder / LOCK
    note = None
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            info = read_lock(lock)
            if not is_stale(info, lock):
                holder = describe_holder(info) if info else "another process (the lock file is being written)"
                raise RunFolderError(
                    f"run folder {folder} is in use by {holder}: its lock {lock} is held. Wait for that run to end, "
                    f"or choose another name (--set name=...). A lock from another host that is not renewed for "
                    f"{lock_timeout():g} s (X2CT_LOCK_TIMEOUT) is taken over; if you are sure no run writes there, "
                    f"delete {lock}.") from None
            note = (f"run folder {folder}: taking over the lock left by "
                    f"{describe_holder(info) if info else 'an unreadable lock file'}, which no longer runs")
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(holder_info()))
        return lock, note
    raise RunFolderError(f"run folder {folder}: could not take its lock {lock} (another run keeps taking it)")


def release(lock: Path | None) -> None:
    """Remove our lock (only if it is still ours)."""
    if lock is None:
        return
    info = read_lock(lock)
    if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        try:
            lock.unlink()
        except OSError:
            pass


def stages_with_checkpoints(run_dir: Path) -> list[str]:
    """Names of the stage folders of ``run_dir`` that hold a checkpoint (last, best, epochNNNN)."""
    if not run_dir.is_dir():
        return []
    out = []
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # a <name>.tmp folder is a checkpoint cut short while written (killed): it is no checkpoint
        if any(ckpt.exists(c) for c in stage_dir.iterdir() if c.is_dir() and not c.name.endswith(".tmp")):
            out.append(stage_dir.name)
    return out


def aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    return candidate


class RunFolder:
    """The run folder of one training run (see the module docstring)."""

    def __init__(self, run_dir: Path, output_dir: Path, *, resume: bool = False, overwrite: bool = False,
                 recipe=None, allow_changes: list[str] | tuple[str, ...] = ()):
        self.path, self.output_dir = Path(run_dir), Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.recipe, self.allow_changes = recipe, list(allow_changes)
        self.allowed_changes: list[str] = []  # changes of a resumed recipe that the user allowed
        self.lock: Path | None = None
        self.occupied: list[str] = []  # stages holding checkpoints when the run started
        self.moved_to: Path | None = None

    def open(self, accelerator=None) -> RunFolder:
        """Check, (move aside,) lock and survey the folder; every process gets the main one's verdict."""
        main = accelerator is None or accelerator.is_main_process
        error, notes = None, []
        if self.resume and self.overwrite:
            error = "--resume continues the run in its folder and --overwrite moves that folder aside: choose one"
        elif main:
            try:
                notes = self._open_main()
            except X2CTError as exc:
                error = str(exc)
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            verdict = broadcast_object_list([error])
            error = verdict[0]
            accelerator.wait_for_everyone()
        if error is not None:
            raise RunFolderError(error)
        for note in notes:  # only the main process has notes
            print(note, file=sys.stderr, flush=True)
        from x2ct_framework import safepaths

        self.confined = safepaths.confine(self.path)  # every writer checks its path against it when opening
        self.occupied = stages_with_checkpoints(self.path)
        if self.resume and self.recipe is not None and self.occupied:
            from x2ct_framework.training.recipe_diff import check_resume

            try:
                self.allowed_changes = check_resume(self.recipe, self.path, self.allow_changes)
            except X2CTError:
                self.close()
                raise
            if self.allowed_changes and main:
                print("--resume with changes allowed by --allow-change (recipe.toml is rewritten with them):\n"
                      + "\n".join(self.allowed_changes), file=sys.stderr, flush=True)
        return self

    def _open_main(self) -> list[str]:
        notes = []
        for folder, what in ((self.output_dir, "output_dir"), (self.path, "the run folder (output_dir/name)")):
            if folder.exists() and not folder.is_dir():
                raise DataError(f"{folder}: {what} exists and is not a folder; set output_dir or name to a folder")
        if self.overwrite and self.path.exists():
            lock = self.path / LOCK
            if lock.exists() and not is_stale(read_lock(lock), lock):
                raise RunFolderError(f"--overwrite: run folder {self.path} is in use by "
                                     f"{describe_holder(read_lock(lock) or {})}; it is not moved")
            self.moved_to = aside_name(self.path)
            try:
                os.replace(self.path, self.moved_to)
            except OSError as exc:
                raise DataError(f"--overwrite: could not move {self.path} aside to {self.moved_to}: {exc}") from exc
            notes.append(f"--overwrite: moved the earlier run folder {self.path} aside to {self.moved_to} "
                         f"(nothing was deleted)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"could not create the run folder {self.path}: {exc}") from exc
        from x2ct_framework import safepaths

        safepaths.refuse_outside_links(self.path, "run folder")  # a received folder writes nowhere else
        self.lock, note = acquire(self.path)
        if note:
            notes.append(note)
        self._start_heartbeat()
        return notes

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()
        lock = self.lock

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT):
                try:
                    os.utime(lock)
                except OSError:
                    pass

        threading.Thread(target=beat, name="x2ct-run-folder-lock", daemon=True).start()

    def before_fresh_stage(self, stage_name: str) -> None:
        """Refuse to start ``stage_name`` from scratch over checkpoints this run did not write."""
        if stage_name not in self.occupied:
            return
        held = sorted(p.name for p in (self.path / stage_name).iterdir()
                      if ckpt.exists(p) and not p.name.endswith(".tmp"))
        how = ("it holds checkpoints but no complete 'last' to continue from" if self.resume else
               "starting it again would overwrite them")
        raise RunFolderError(
            f"run folder {self.path} already holds checkpoints of {stage_name} "
            f"({', '.join(held)}); {how}. "
            f"Either\n  - continue that run: the same command with --resume,\n  - start a new run beside it: "
            f"--set name=<new name>,\n  - or replace it: --overwrite (moves {self.path} aside to "
            f"{self.path.name}.replaced-<time>; nothing is deleted).")

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        release(self.lock)
        self.lock = None
        from x2ct_framework import safepaths

        safepaths.release(getattr(self, "confined", None))
        self.confined = None

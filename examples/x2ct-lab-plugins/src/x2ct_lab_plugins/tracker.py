"""``lab_tracker``: a tracker plugin that writes everything the trainer sends to trackers into a JSON-lines file.

It registers the tracker ``jsonl`` (``register_trackers``), an ``accelerate.tracking.GeneralTracker``
that a recipe names beside accelerate's own trackers, with its options from the recipe:

```toml
[train]
trackers = ["tensorboard", "jsonl"]

[train.tracker_options.jsonl]
file = "tracker.jsonl"   # relative to the run folder
pixels = false           # true: store preview images whole (nested lists), not just their shape and mean
```

Every line is one event: ``start``, ``config`` (the flat recipe), ``log`` (``step`` and ``values``),
``images`` (per key, each image's shape, dtype and mean), ``artifact`` (a path and its size in
bytes) and ``finish``. The factory declares ``logging_dir`` (the run folder) and ``run_name`` (the
recipe's name), which the framework fills in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.tracking import GeneralTracker, on_main_process

from x2ct_framework.hookspecs import hookimpl

NAME = "jsonl"


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per event to ``path``; the file is opened by :meth:`start` (main process)."""

    name = NAME
    requires_logging_directory = True

    def __init__(self, path: Path, run_name: str, pixels: bool = False):
        super().__init__()
        self.path, self.run_name, self.pixels = Path(path), run_name, pixels
        self._file = None

    @property
    def tracker(self):
        return self._file

    @on_main_process
    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._write({"event": "start", "run_name": self.run_name})

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self._write({"event": "config", "values": values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._write({"event": "log", "step": step, "values": values})

    @on_main_process
    def log_images(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        images = {}
        for key, arrays in values.items():
            images[key] = [{"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype),
                            "mean": float(np.asarray(a).mean()),
                            **({"pixels": np.asarray(a).tolist()} if self.pixels else {})} for a in arrays]
        self._write({"event": "images", "step": step, "images": images})

    @on_main_process
    def log_artifact(self, path: Path) -> None:
        """Called by x2ct-framework (not by accelerate) with the run's report and final evaluation summary."""
        path = Path(path)
        self._write({"event": "artifact", "path": str(path), "bytes": path.stat().st_size})

    @on_main_process
    def finish(self) -> None:
        if self._file is not None:
            self._write({"event": "finish"})
            self._file.close()
            self._file = None

    def _write(self, event: dict) -> None:
        if self._file is None:
            raise RuntimeError(f"tracker {NAME!r} was not started (accelerate calls start() in init_trackers)")
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()


def jsonl_tracker(logging_dir: Path, run_name: str, file: str = "tracker.jsonl", pixels: bool = False) -> JsonlTracker:
    """The ``jsonl`` tracker; ``file`` is relative to the run folder (``logging_dir``)."""
    rel = Path(file)
    if not file or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"file must be a relative path inside the run folder, got {file!r}")
    return JsonlTracker(Path(logging_dir) / rel, run_name, pixels)


@hookimpl
def register_trackers(register):
    register(NAME, jsonl_tracker)

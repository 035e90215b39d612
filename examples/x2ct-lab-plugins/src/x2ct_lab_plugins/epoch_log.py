"""``lab_epoch_log``: a lifecycle-hook plugin that appends chosen metrics to a JSON-lines file in the run folder.

Its options come from the recipe and are checked against :func:`x2ct_options` when the recipe loads
(an unknown or mistyped key is a recipe error naming the file and ``plugin_options -> lab_epoch_log -> key``):

```toml
[plugin_options.lab_epoch_log]
file = "lab_log.jsonl"   # relative to the run folder
every = 2                # every N epochs (and after the last of a stage)
keys = ["val/psnr", "val/loss"]
```
"""

from __future__ import annotations

import json

from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.api import plugin_options

NAME = "lab_epoch_log"


def x2ct_options(file: str = "lab_log.jsonl", every: int = 1, keys: list[str] = ("val/psnr",)) -> None:
    """The options this plugin takes from ``[plugin_options.lab_epoch_log]`` (names, types and defaults)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")


@hookimpl
def on_epoch_end(trainer, stage, epoch, metrics):
    opts = plugin_options(trainer.recipe, NAME)
    x2ct_options(**opts)  # the same checks as at recipe load, for options given another way
    last = epoch + 1 == stage.options.get("epochs", epoch + 1)
    if not trainer.accelerator.is_main_process or trainer.run_dir is None or ((epoch + 1) % opts["every"] and not last):
        return
    row = {"stage": stage.name, "epoch": epoch + 1, **{k: metrics[k] for k in opts["keys"] if k in metrics}}
    with (trainer.run_dir / opts["file"]).open("a") as f:
        f.write(json.dumps(row) + "\n")

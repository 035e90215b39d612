"""What the experiment trackers receive, on the main process only.

accelerate's built-in trackers (``train.trackers = ["tensorboard", "wandb", ...]``) are made by
``Accelerator(log_with=...)``. Plugin trackers (``register_trackers``) are built by
:func:`~x2ct_framework.config.build.build_trackers` on the main process once the run folder is
checked and locked (so a tracker that writes there never writes into a folder the run then
refuses), added to the same accelerator's ``log_with``, and started with the built-in ones by
``init_trackers`` (``start()``, then ``store_init_configuration`` with the flat recipe). Then every
tracker gets:

- every row of ``metrics.jsonl`` as ``log({"<stage>/<key>": value}, step=<the run's optimizer
  update>)`` (the stage's update plus every update of the stages before it in the run folder, so the
  step only increases across stages): the train rows (every ``train.log_every`` updates: ``epoch``,
  ``lr``, ``train/loss``, ``train/<term>``, ``train/grad_norm``, critics' values), the validation
  rows (``val/<metric>``, ``val/loss``) and the epoch rows (``time/train_s``, ...);
- every validation preview as ``log_images({"<stage>/preview": [H x W x 3 uint8 array]}, step=...)``
  when it has ``log_images`` (TensorBoard gets them stacked, ``NHWC``);
- after the last stage and the end-of-run hooks (the report): the final metrics as
  ``log({"final/<stage>/<metric>": ..., "final/<split>/<protocol>/<metric>": mean,
  "final/<split>/<evaluator>/<number>": value})`` and the report
  and final evaluation summary as ``log_artifact(path)`` when it defines that method;
- ``finish()`` when the run ends, also after an error or Ctrl-C.

An exception inside a plugin tracker stops the run with a :class:`PluginError` naming the plugin.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from x2ct_framework.errors import PluginError, X2CTError

PREVIEW = "preview"


def png_image(path: str | Path) -> np.ndarray:
    """A PNG file as an ``H x W x 3`` uint8 array (what trackers' ``log_images`` take)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def final_values(results: dict[str, dict], summary: dict | None = None, split: str = "test") -> dict[str, float]:
    """The run's final metrics: each stage's last validation, and the means of the final evaluation's summary."""
    out = {f"final/{stage}/{k}": float(v) for stage, metrics in results.items() for k, v in (metrics or {}).items()
           if _number(v) and math.isfinite(v)}
    for proto in (summary or {}).get("protocols", {}).values():
        for name, stats in proto.get("metrics", {}).items():
            mean = stats.get("mean")
            if _number(mean) and math.isfinite(mean):
                out[f"final/{split}/{stats.get('key', name)}"] = float(mean)
    for name, ev in (summary or {}).get("evaluators", {}).items():  # evaluators' summary numbers (AUC, Dice, FID)
        for key, stats in (ev.get("summary") or {}).items():
            value = stats.get("value")
            if _number(value) and math.isfinite(value):
                out[f"final/{split}/{name}/{key}"] = float(value)
    return out


class Trackers:
    """The accelerator's trackers, with the plugin ones named when they fail."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.plugins: dict[int, Any] = {}  # id(tracker) -> its registry entry

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def start(self, recipe, run_dir: str | Path, config: dict[str, Any]) -> None:
        """Build the plugin trackers (main process) and start every tracker with the recipe as configuration."""
        from x2ct_framework.config.build import build_trackers, tracker_init_kwargs

        error = None
        if self.is_main:
            try:
                for tracker, entry in build_trackers(recipe, run_dir):
                    self.plugins[id(tracker)] = (tracker, entry)
                    self.accelerator.log_with.append(tracker)
                with self._naming("start or store_init_configuration"):
                    self.accelerator.init_trackers(recipe.name, config=config,
                                                   init_kwargs=tracker_init_kwargs(recipe))
            except Exception as exc:
                error = exc
        if self.accelerator.num_processes > 1:  # every process stops together, none waits in a collective
            from accelerate.utils import broadcast_object_list

            note = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"])[0]
            if note is not None and error is None:
                raise X2CTError(f"the main process could not start the trackers: {note}")
        if error is not None:
            raise error

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        if not self.is_main or not values:
            return
        for tracker in self.accelerator.trackers:
            with self._naming("log"):
                tracker.log(values, step=step)

    def log_images(self, images: dict[str, list[np.ndarray]], step: int | None = None) -> None:
        """``images``: per key a list of ``H x W x 3`` uint8 arrays; trackers without ``log_images`` skip them."""
        if not self.is_main:
            return
        for tracker in self.accelerator.trackers:
            fn = getattr(tracker, "log_images", None)
            if not callable(fn):
                continue
            with self._naming("log_images"):
                if tracker.name == "tensorboard":  # SummaryWriter.add_images takes one [N, H, W, C] array
                    fn({k: np.stack(v) for k, v in images.items()}, step=step, dataformats="NHWC")
                else:
                    fn(images, step=step)

    def log_artifact(self, path: str | Path) -> None:
        """A file of the run (the report) to every tracker that defines ``log_artifact(path)``."""
        if not self.is_main:
            return
        for tracker in self.accelerator.trackers:
            fn = getattr(tracker, "log_artifact", None)
            if callable(fn):
                with self._naming("log_artifact"):
                    fn(Path(path))

    def log_run_end(self, results: dict[str, dict], report: Path | None, summary: Path | None,
                    split: str) -> None:
        """The final metrics, then the report and the final evaluation's summary as artifacts."""
        data = None
        if summary is not None:
            try:
                data = json.loads(summary.read_text())
            except (OSError, json.JSONDecodeError):
                data, summary = None, None
        self.log(final_values(results, data, split))
        for path in (report, summary):
            if path is not None:
                self.log_artifact(path)

    def finish(self) -> None:
        with self._naming("finish"):
            self.accelerator.end_training()

    @contextmanager
    def _naming(self, what: str) -> Iterator[None]:
        """An exception raised inside a plugin tracker becomes a PluginError naming its plugin."""
        try:
            yield
        except X2CTError:
            raise
        except Exception as exc:
            found = self._culprit(exc)
            if found is None:
                raise
            tracker, entry = found
            raise PluginError(f"{entry.source}: tracker {entry.name!r} ({type(tracker).__name__}) raised inside "
                              f"{what}: {type(exc).__name__}: {exc}") from exc

    def _culprit(self, exc: BaseException):
        tb = exc.__traceback__
        while tb is not None:
            found = self.plugins.get(id(tb.tb_frame.f_locals.get("self")))
            if found is not None:
                return found
            tb = tb.tb_next
        return None

"""A stage's metrics on disk: JSONL (every row), CSV (the same rows, one column per key), curve plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


from x2ct_framework.safepaths import guard, open_new
from x2ct_framework.viz import plt, save_figure


class Logbook:
    """``metrics.jsonl`` and ``metrics.csv`` of one stage; rows carry ``epoch`` (1-based) and ``step``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.jsonl = self.folder / "metrics.jsonl"
        self.csv = self.folder / "metrics.csv"

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl.is_file():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return out

    def append(self, row: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with guard(self.jsonl).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate(self, epoch: int, step: int) -> None:
        """Forget rows written after a checkpoint (``epoch`` epochs and ``step`` updates done) before resuming."""
        keep = [r for r in self.rows()
                if (r.get("step", 0) <= step if r.get("kind") == "train" else r.get("epoch", 0) <= epoch)]
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        with open_new(tmp) as f:
            f.write("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(guard(self.jsonl))
        self.write_csv()

    def write_csv(self) -> None:
        rows = self.rows()
        columns: list[str] = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
        tmp = self.csv.with_suffix(".csv.tmp")
        with open_new(tmp, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(guard(self.csv))

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Training loss and each loss term per step, the learning rate, and validation metrics per epoch."""
        rows = self.rows()
        train = [r for r in rows if r.get("kind") == "train"]
        val = [r for r in rows if r.get("kind") == "val"]
        loss_keys = [k for k in _keys(train) if k.startswith("train/") and k != "train/grad_norm"]
        val_keys = [k for k in _keys(val) if k.startswith("val/")]
        panels = 2 + len(val_keys)
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
        ax = axes[0, 0]
        for k in loss_keys:
            pts = [(r["step"], r[k]) for r in train if _finite(r.get(k))]
            if pts:
                ax.plot(*zip(*pts), label=k.removeprefix("train/"), lw=2.0 if k == "train/loss" else 1.0,
                        ls="-" if k == "train/loss" else "--")
        if any(_finite(r.get(k)) and r[k] > 0 for r in train for k in loss_keys):
            ax.set_yscale("log")
        ax.set(xlabel="optimizer step", title="training loss and terms")
        if loss_keys:
            ax.legend(fontsize=7)
        ax = axes[0, 1]
        pts = [(r["step"], r["lr"]) for r in train if _finite(r.get("lr"))]
        if pts:
            ax.plot(*zip(*pts))
        ax.set(xlabel="optimizer step", title="learning rate")
        for i, k in enumerate(val_keys):
            ax = axes[0, 2 + i]
            pts = [(r["epoch"], r[k]) for r in val if _finite(r.get(k))]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3)
            ax.set(xlabel="epoch", title=k)
        return save_figure(fig, path, dpi=90, title=title, title_size=10)


def _keys(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        out.extend(k for k in r if k not in out)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)

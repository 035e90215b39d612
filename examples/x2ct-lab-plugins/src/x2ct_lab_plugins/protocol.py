"""The ``lab`` metric protocol: errors in HU inside the body, and the signed bias, as a lab reports them.

Once installed, ``x2ct evaluate RUN --protocol default lab``, ``[eval] protocols = ["default", "lab"]``
and the benchmark matrix's ``[eval] protocol = "lab"`` use it; its numbers are keyed ``lab/<metric>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from x2ct_framework.api import Protocol
from x2ct_framework.hookspecs import hookimpl

CONVENTIONS = [
    "intensity: the recipe's HU window scaled to [0, 1], converted back to HU; the prediction clipped to the window",
    "body: voxels of the reference above body_hu (default -500 HU)",
    "mae_body_hu, rmse_body_hu: over the body voxels of each case; bias_hu: mean(pred - target) there",
]


class BodyError:
    """One value per case: ``kind`` = mae, rmse or bias, in HU, over the reference's body voxels."""

    unit = "HU"

    def __init__(self, hu_window: Sequence[float], kind: str, body_hu: float):
        if kind not in ("mae", "rmse", "bias"):
            raise ValueError(f"kind must be mae, rmse or bias, got {kind!r}")
        self.lo, self.hi = float(hu_window[0]), float(hu_window[1])
        self.kind, self.body_hu = kind, float(body_hu)
        self.higher_is_better = False if kind != "bias" else True  # bias: ranked by its value, read its sign

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        width = self.hi - self.lo
        p = pred.detach().double().clamp(0, 1).flatten(1) * width + self.lo
        t = target.detach().double().flatten(1) * width + self.lo
        body = (t > self.body_hu).double()
        n = body.sum(1).clamp_min(1.0)
        err = (p - t) * body
        if self.kind == "mae":
            return err.abs().sum(1) / n
        if self.kind == "rmse":
            return (err.pow(2).sum(1) / n).sqrt()
        return err.sum(1) / n


def lab(hu_window: Sequence[float], body_hu: float = -500.0) -> Protocol:
    """The protocol factory: ``hu_window`` is the one the data was scaled with; ``body_hu`` an option."""
    metrics = {f"{k}_body_hu" if k != "bias" else "bias_hu": BodyError(hu_window, k, body_hu)
               for k in ("mae", "rmse", "bias")}
    return Protocol("lab", CONVENTIONS, metrics, dict.fromkeys(metrics, "global"), primary="mae_body_hu")


@hookimpl
def register_protocols(register):
    register("lab", lab)

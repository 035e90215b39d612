"""``prior_only``: any model with its X-rays replaced by zeros, the reference row that measures the X-rays' worth.

A reconstruction benchmark must show how much of a score comes from the X-rays and how much from the
anatomy every chest shares. ``prior_only`` wraps a model of the recipe (same architecture, same
parameters, same training) and feeds it zeros instead of the X-rays, in training and in evaluation
alike; the geometry and ``prev`` pass through unchanged. Whatever it reaches is what a model of that
size learns from the training CTs alone; a model that does not beat it does not use its input.

Recipe: ``model = { name = "prior_only", model = { name = "vit_cascade", tokens = 6, ... } }``.
The inner model's parameters are named ``inner.<its names>``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from x2ct_framework.hookspecs import hookimpl


class PriorOnly(nn.Module):
    """``inner(zeros_like(xrays), geometry, prev)``: the inner model never sees an X-ray."""

    def __init__(self, *, model: dict, resolution: int, views: list[float] | None = None,
                 geometry: Any = None, seed: int = 0, gradient_checkpointing: bool = False,
                 hu_window: list[float] | None = None):
        super().__init__()
        from x2ct_framework.api import create_component

        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise ValueError(f"model must be a table naming the wrapped model, e.g. "
                             f"model = {{ name = \"vit_cascade\", ... }}, got {model!r}")
        opts = dict(model)
        name = opts.pop("name")
        if name == "prior_only":
            raise ValueError("model: prior_only cannot wrap itself; name the model whose prior is measured")
        context = {"resolution": resolution, "seed": seed, "gradient_checkpointing": gradient_checkpointing}
        for key, value in (("views", views), ("geometry", geometry), ("hu_window", hu_window)):
            if value is not None:
                context[key] = value
        self.inner = create_component("model", name, opts, where="model -> model", context=context)
        self.wrapped = name

    def forward(self, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(torch.zeros_like(xrays), geometry, prev)

    def checkpointed_modules(self) -> list[nn.Module]:
        units = getattr(self.inner, "checkpointed_modules", None)
        return units() if callable(units) else []


@hookimpl
def register_models(register):
    register("prior_only", PriorOnly)

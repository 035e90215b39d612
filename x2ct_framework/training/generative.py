"""The objective of a generative stage: the model's own ``training_loss`` (``x2ct_framework.generative``).

The trainer calls :func:`generative_objective` in place of "predict, then the recipe's losses" when the
stage's model is generative. The call goes through the prepared (possibly DDP-wrapped) model, so that
DDP synchronises the gradients and mixed precision applies, exactly as for ``forward``: the module's
``forward`` is pointed at ``training_loss`` for the length of that one call (the forward redirection
that PyTorch Lightning uses for the same reason).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from x2ct_framework.errors import RecipeError
from x2ct_framework.generative import ESTIMATE
from x2ct_framework.training.objective import Loss


def call_redirected(wrapped: nn.Module, module: nn.Module, method: Callable, *args: Any) -> Any:
    """``method(*args)`` called through ``wrapped`` (the module as ``accelerate.prepare`` returned it), which
    runs ``module``'s forward: the wrapper's pre- and post-forward work (DDP's gradient bookkeeping) happens."""
    if wrapped is module:
        return method(*args)
    saved = module.__dict__.get("forward")  # accelerate may have set an instance forward (autocast)
    module.forward = method
    try:
        return wrapped(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def generative_objective(trainer, st, batch: dict) -> tuple[Loss, torch.Tensor | None]:
    """``(Loss(total, terms), estimate)`` of one micro-batch for a generative model: its ``training_loss`` (with the
    cascade's ``prev``), plus the stage's recipe losses on its one-step clean estimate when it returns one
    (logged as ``train/<term>`` beside the model's own terms). ``estimate`` is what critics see (None: none)."""
    acc = trainer.accelerator
    module = acc.unwrap_model(st.model)
    xrays, geometry, ct = batch["xrays"], batch["geometry"], batch["ct"]
    prev = st.previous(xrays, geometry) if st.previous is not None else None
    with acc.autocast():
        loss, terms = call_redirected(st.model, module, module.training_loss, xrays, geometry, ct, prev)
    terms = dict(terms)
    estimate = terms.pop(ESTIMATE, None)
    if estimate is not None:
        extra, extra_terms = st.objective(estimate.float(), batch, epoch=st.epoch)  # a Loss: (total, terms)
        loss = loss + extra
        overlap = sorted(set(terms) & set(extra_terms))
        if overlap:
            raise RecipeError([f"{st.stage.name}: the model's logged terms {overlap} have the names of the stage's "
                               f"losses; rename the loss terms"])
        terms.update(extra_terms)
    elif len(st.critics):
        raise RecipeError([f"{st.stage.name}: the stage's losses have a critic (an adversarial term) but the "
                           f"generative model returns no clean estimate for it to judge; set "
                           f"model.estimate_losses = true or remove the adversarial term"])
    return Loss(loss, {k: v.detach() for k, v in terms.items()}), estimate

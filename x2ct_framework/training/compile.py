"""``train.compile``: the model under ``torch.compile``, with a fallback to eager and a message when it fails.

``train.compile = false`` (default) keeps the model eager; ``true`` compiles it with the default
mode; a string names the mode (``"default"``, ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``,
``"max-autotune-no-cudagraphs"``). Compilation is lazy in PyTorch: the graph is built at the first
call, so a failure shows at the first call: :func:`compile_model` then falls back to the eager model, with
one message saying why, and training goes on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from x2ct_framework.config.schema import COMPILE_MODES as MODES  # noqa: F401  (the values live with the schema)
from x2ct_framework.config.schema import compile_mode
from x2ct_framework.config.schema import compile_setting as check_compile  # noqa: F401


def compile_model(model: torch.nn.Module, value: Any, *, example: tuple | None = None, backend: str = "inductor",
                  log: Callable[[str], Any] = print) -> torch.nn.Module:
    """Compile ``model`` in place as ``train.compile`` says (like ``model.compile(mode=...)``); returns ``model``.

    The module stays itself (its parameters, state dict and attributes are untouched; only its call
    goes through the compiled graph), so accelerate, checkpoints and EMA see the model as built. If
    compiling fails, at :func:`torch.compile` or at the first call (with ``example``, the positional
    arguments of one call, that first call happens here), the model runs eager from then on and
    ``log`` gets one message saying why; ``model.compile_fallback`` keeps that reason (None if compiled).
    """
    mode = compile_mode(value)
    model.compile_fallback = None
    if mode is None:
        return model
    hint = "Set train.compile = false to skip compiling."
    try:
        compiled = torch.compile(model._call_impl, mode=None if mode == "default" else mode, backend=backend)
    except Exception as exc:  # noqa: BLE001 - e.g. no compiler backend on this platform
        model.compile_fallback = f"{type(exc).__name__}: {exc}"
        log(f"torch.compile (mode {mode!r}) is not available here, the model runs eager: {model.compile_fallback}. "
            f"{hint}")
        return model

    def first_call_guarded(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            model._compiled_call_impl = None
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            model.compile_fallback = f"{type(exc).__name__}: {text}"
            log(f"torch.compile (mode {mode!r}) failed, the model runs eager: {model.compile_fallback}. {hint}")
            return model._call_impl(*args, **kwargs)

    model._compiled_call_impl = first_call_guarded  # what nn.Module.compile sets; its __call__ uses it
    if example is not None:
        with torch.no_grad():
            model(*example)
    return model

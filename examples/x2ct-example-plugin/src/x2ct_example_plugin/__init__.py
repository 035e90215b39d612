"""x2ct-example-plugin: registers the ``windowed_charbonnier`` loss and the ``hu_shift`` evaluator with
x2ct-framework.

x2ct-framework imports this module through the entry point declared in ``pyproject.toml`` and
calls the hook below with a ``register(name, factory)`` callable.
"""

from x2ct_framework.hookspecs import hookimpl

from .charbonnier import WindowedCharbonnier
from .hu_shift import HUShift

__all__ = ["WindowedCharbonnier", "HUShift", "register_losses", "register_evaluators"]


@hookimpl
def register_losses(register):
    register("windowed_charbonnier", WindowedCharbonnier)


@hookimpl
def register_evaluators(register):
    register("hu_shift", HUShift)

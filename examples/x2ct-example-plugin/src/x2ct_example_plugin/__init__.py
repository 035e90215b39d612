"""x2ct-example-plugin: registers the ``windowed_charbonnier`` loss with x2ct-framework.

x2ct-framework imports this module through the entry point declared in ``pyproject.toml`` and
calls the hook below with a ``register(name, factory)`` callable.
"""

from x2ct_framework.hookspecs import hookimpl

from .charbonnier import WindowedCharbonnier

__all__ = ["WindowedCharbonnier", "register_losses"]


@hookimpl
def register_losses(register):
    register("windowed_charbonnier", WindowedCharbonnier)

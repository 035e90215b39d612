"""x2ct-framework: reconstruct 3D CT volumes from two or more 2D X-ray views.

Models, losses, datasets and metrics are plugins. **The plugin API** is what a plugin may import
(``tests/test_architecture.py`` fails when a plugin of ``plugins/`` or ``examples/`` imports anything
else); everything else is the framework's own and may change:

- ``hookspecs``: the hooks (``register_models``, ``register_losses``, ...) and ``hookimpl``;
- ``errors``: the error types and their exit statuses (``RecipeError``, ``DataError``, ...);
- ``stage``: ``Stage``, what a factory learns about the stage it builds for;
- ``physics``: geometry presets, the differentiable DRR projector and its back-projection;
- ``io``: reading CT volumes and X-ray images in the canonical orientation;
- ``ssim``: the shared SSIM (2D/3D, Gaussian or uniform window);
- ``phantom``: the synthetic chest phantom and the toy chests for tests;
- ``testing``: the contract kit that checks a plugin against the framework's expectations;
- ``conventions``: the default HU window, HU <-> [0, 1], label codes and slicing planes;
- ``cachedir``: the cache folder (``$X2CT_CACHE_DIR``, else ``~/.cache/x2ct``);
- ``checkpoint``: reading and writing checkpoint folders (safetensors weights, JSON state);
- ``dicom``, ``labels``: DICOM series discovery, label maps remapped to the label codes;
- ``api``: the names a plugin takes from the core (``Metric``, ``Protocol``, ``plugin_options``,
  ``load_recipe``, ``Trainer``, ...), importable from there whatever the core's layout.

Changes to the plugin API are listed in CHANGELOG.md; a moved name keeps working for one minor version
with a DeprecationWarning that names its new import (``_moved.py``).

They load on first use (``x2ct_framework.physics``), so ``import x2ct_framework`` stays cheap. The
layout of the rest (``config/``, ``training/``, ``evaluation/``, ``runs``, ``loading``) is in
docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from x2ct_framework import _moved
from x2ct_framework._version import __version__

__all__ = ["__version__", "hookspecs", "errors", "stage", "physics", "io", "ssim", "phantom", "testing", "conventions",
           "cachedir", "checkpoint", "dicom", "labels", "api", "generative"]
PLUGIN_API = tuple(__all__[1:])

_moved.install()


def __getattr__(name: str) -> Any:
    if name in PLUGIN_API:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *PLUGIN_API})


def load_pretrained(path, device="cpu", *, plugins=(), trust_plugins=False):
    """The model of an exported folder (``x2ct export``), ready for inference; see :mod:`x2ct_framework.loading`.

    Not in ``__all__`` (the plugin API's modules): it is the one function a model's user imports."""
    from x2ct_framework.loading import load_pretrained as _load

    return _load(path, device, plugins=plugins, trust_plugins=trust_plugins)


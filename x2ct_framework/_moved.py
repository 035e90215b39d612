"""Old import paths of modules that moved, kept working for one minor version with a DeprecationWarning.

``import x2ct_framework.metrics`` (the layout before 0.2.0) gives the module now at
``x2ct_framework.evaluation.metrics`` and warns with the new import. The finder is installed by
``x2ct_framework/__init__.py``; it answers only for the names in :data:`MOVED`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module -> (new module, the version that removes the old path)
MOVED = {
    "x2ct_framework.metrics": "x2ct_framework.evaluation.metrics",
    "x2ct_framework.protocols": "x2ct_framework.evaluation.protocols",
    "x2ct_framework.evaluate": "x2ct_framework.evaluation.evaluate",
    "x2ct_framework.report": "x2ct_framework.evaluation.report",
    "x2ct_framework.predict": "x2ct_framework.evaluation.predict",
    "x2ct_framework.build": "x2ct_framework.config.build",
    "x2ct_framework.recipe": "x2ct_framework.config.recipe",
    "x2ct_framework.schema": "x2ct_framework.config.schema",
    "x2ct_framework.optim": "x2ct_framework.config.optim",
    "x2ct_framework.trainer": "x2ct_framework.training.trainer",
    "x2ct_framework.cascade": "x2ct_framework.training.cascade",
    "x2ct_framework.logbook": "x2ct_framework.training.logbook",
}
REMOVED_IN = "0.3.0"
# what a plugin imports instead, where the plugin API has the names a plugin takes from the moved module
API_HINTS = {
    "x2ct_framework.metrics": "from x2ct_framework.api import Metric",
    "x2ct_framework.protocols": "from x2ct_framework.api import Protocol, build_protocol",
    "x2ct_framework.recipe": "from x2ct_framework.api import load_recipe",
    "x2ct_framework.trainer": "from x2ct_framework.api import Trainer",
}


def deprecation(old: str, new: str) -> str:
    hint = API_HINTS.get(old)
    return (f"{old} moved to {new}: import {new} instead"
            + (f" (a plugin: {hint})" if hint else "")
            + f"; the old path is removed in x2ct-framework {REMOVED_IN}")


def warn_moved(old: str, new: str, stacklevel: int = 2) -> None:
    """The DeprecationWarning of a moved name (shim modules of moved names call it too)."""
    warnings.warn(deprecation(old, new), DeprecationWarning, stacklevel=stacklevel + 1)


def _caller_level() -> int:
    """The stack level of the first frame outside the import machinery (the module doing the import)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or frame.f_code.co_filename == __file__
                                 or "importlib" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(deprecation(spec.name, new), DeprecationWarning, stacklevel=_caller_level())
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the new module is executed already
        return None


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader())


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())

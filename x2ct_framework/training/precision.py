"""Mixed precision from the launcher: ``accelerate launch --mixed_precision X`` wins over the recipe.

``accelerate launch`` hands its ``--mixed_precision`` (or the ``accelerate config`` default) to the
run in the ``ACCELERATE_MIXED_PRECISION`` environment variable. A value other than ``no`` is the
choice made for this launch and wins over the recipe's ``train.mixed_precision``, with a message
naming both; the resolved recipe in the run folder then records what ran. ``no`` is also what the
launcher sets when it was given nothing, so it cannot turn off a recipe's ``bf16``: the recipe
decides then (``--set train.mixed_precision=\\"no\\"`` turns it off).
"""

from __future__ import annotations

import os
from typing import Mapping

from x2ct_framework.errors import RecipeError

LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"
SUPPORTED = ("no", "fp16", "bf16")


def launcher_precision(recipe_value: str, env: Mapping[str, str] | None = None,
                       where: str = "train.mixed_precision") -> tuple[str, str | None]:
    """(the mixed precision this run uses, a message when the launcher overrode the recipe, else None)."""
    launched = (os.environ if env is None else env).get(LAUNCHER_VARIABLE, "").strip().lower()
    if launched in ("", "no", recipe_value):
        return recipe_value, None
    if launched not in SUPPORTED:
        raise RecipeError([f"accelerate launch --mixed_precision {launched} ({LAUNCHER_VARIABLE}): this framework "
                           f"trains in {', '.join(SUPPORTED)}; the recipe's {where} is {recipe_value!r}. Launch "
                           f"with --mixed_precision {recipe_value} or one of those"])
    return launched, (f"mixed precision {launched} from accelerate launch --mixed_precision ({LAUNCHER_VARIABLE}) "
                      f"wins over the recipe's {where} = {recipe_value!r}")


def apply_launcher_precision(recipe) -> str | None:
    """Set ``recipe['train']['mixed_precision']`` to the launcher's choice (see module doc); the message to
    show when the launcher overrode the recipe, else None."""
    train = recipe["train"]
    value, message = launcher_precision(train["mixed_precision"], where=recipe.where("train", "mixed_precision"))
    train["mixed_precision"] = value
    return message

"""Load a recipe: read and merge its files, apply ``--set`` overrides, validate against the schema.

The document model (``Recipe``, TOML reading and writing, overrides) is
:mod:`x2ct_framework.config.document`; the schema is :mod:`x2ct_framework.config.schema`.
"""

from __future__ import annotations

from pathlib import Path

from x2ct_framework.config.document import (Key, Recipe, _read_toml, apply_override, dumps_toml,  # noqa: F401
                                            format_key, parse_override)
from x2ct_framework.config.schema import validate_recipe
from x2ct_framework.errors import RecipeError


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), validate: bool = True,
                run_folder: Path | None = None) -> Recipe:
    """Load, merge, override and validate a recipe file.

    ``run_folder``: the recipe is a run folder's ``recipe.toml`` (data: its plugins are imported only when
    allowed, see :func:`x2ct_framework.config.build.load_recipe_plugins`)."""
    path = Path(path)
    data, origins = _read_toml(path, [])
    problems = []
    for text in overrides:
        try:
            key_path, value = parse_override(text)
            apply_override(data, origins, key_path, value, text)
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems)
    recipe = Recipe(data=data, path=path.resolve(), origins=origins)
    recipe.run_folder = run_folder
    if validate:
        validate_recipe(recipe)
    return recipe

"""Load a recipe: read and merge its files, apply ``--set`` overrides, check everything in one pass.

The document model (``Recipe``, TOML reading and writing, overrides) is
:mod:`x2ct_framework.config.document`; the schema is :mod:`x2ct_framework.config.schema`; the checks
beyond it are :mod:`x2ct_framework.config.checks` (``select_best``, trackers) and
``config/build.py: component_problems`` (each component's name and options against its registry).
:func:`check_all` runs them all and reports every problem in one :class:`RecipeError`.
"""

from __future__ import annotations

import copy
from pathlib import Path

from x2ct_framework.config.document import (Key, Recipe, _read_toml, apply_override, dumps_toml,  # noqa: F401
                                            format_key, parse_override)
from x2ct_framework.config.schema import schema_problems
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
        # A run folder's recipe.toml is data read back (evaluate, predict, resume): the schema fills its
        # defaults; its trackers and components were checked when it trained.
        check_all(recipe, components=run_folder is None)
    return recipe


def check_all(recipe: Recipe, components: bool = True) -> Recipe:
    """Every check of a recipe, in one pass: the schema (types, values, keys that depend on each other,
    ``[plugin_options]``), then, with ``components``, every stage's ``select_best``, the trackers, and every
    component's name and options against its registry. Raises one :class:`RecipeError` listing every problem;
    otherwise fills the defaults in place and marks the recipe checked (``Trainer`` runs this itself for a
    recipe that was not)."""
    from x2ct_framework.config.build import component_problems, load_recipe_plugins
    from x2ct_framework.config.checks import select_best_problems, tracker_problems

    specs = recipe.data.get("plugins")
    if isinstance(specs, list) and all(isinstance(p, str) for p in specs):  # else the schema says why
        load_recipe_plugins(recipe)  # first: names checked against a registry include the ones they register
    data, problems = schema_problems(recipe)
    if components:
        filled = copy.copy(recipe)
        filled.data = data
        for check in (select_best_problems, tracker_problems, component_problems):
            try:
                problems += [p for p in check(filled) if p not in problems]
            except (KeyError, TypeError, AttributeError, IndexError, ValueError):
                pass  # a table the schema found malformed: its problem is reported already
    if problems:
        raise RecipeError(problems)
    recipe.data = data
    recipe.checked = components
    return recipe

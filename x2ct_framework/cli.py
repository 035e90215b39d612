"""The ``x2ct`` command: run, validate, plugins."""

from __future__ import annotations

import argparse
import sys

from .run import add_run_arguments, report_errors, run


def validate(args: argparse.Namespace) -> int:
    """Build every component of every stage without training."""
    from .build import (build_dataset, build_losses, build_metrics, build_model, load_recipe_plugins, stages)
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    load_recipe_plugins(recipe)
    build_metrics(recipe)
    print(f"recipe {recipe.path}: {recipe.name}")
    for stage in stages(recipe):
        model = build_model(recipe, stage)
        losses = build_losses(recipe, stage)
        sizes = {split: len(build_dataset(recipe, stage, split)) for split in ("train", "val")}
        n_params = sum(p.numel() for p in model.parameters())
        terms = ", ".join(f"{t.name}x{t.weight:g}" for t in losses.terms)
        print(f"  {stage.name}: {stage.resolution}^3, model {recipe['model']['name']} ({n_params / 1e6:.2f} M params), "
              f"losses {terms or 'none'}, train {sizes['train']} / val {sizes['val']} cases")
    print("ok")
    return 0


def plugins(args: argparse.Namespace) -> int:
    from .plugins import get_plugin_manager

    pm = get_plugin_manager()
    if getattr(args, "recipe", None):
        from .build import load_recipe_plugins
        from .recipe import load_recipe

        load_recipe_plugins(load_recipe(args.recipe))
    for kind, reg in pm.registries().items():
        print(f"{kind}s:")
        for e in reg.entries():
            print(f"  {e.name:<22} plugin {e.plugin} ({e.distribution})")
    for name, msg in pm.failed.items():
        print(f"failed: {msg}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="x2ct", description="x2ct-framework: CT from X-ray views")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a recipe")
    add_run_arguments(p)
    p.set_defaults(fn=run)
    p = sub.add_parser("validate", help="build every component of a recipe without training")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=validate)
    p = sub.add_parser("plugins", help="list registered components and where they came from")
    p.add_argument("--recipe", help="also load the plugins this recipe names")
    p.set_defaults(fn=plugins)
    args = parser.parse_args(argv)
    return report_errors(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``x2ct`` command: run, validate, check-data, evaluate, predict, plugins."""

from __future__ import annotations

import argparse
import sys

from x2ct_framework.run import add_run_arguments, report_errors, run


def validate(args: argparse.Namespace) -> int:
    """Build every component of every stage without training."""
    from x2ct_framework.config.build import (build_dataset, build_losses, build_metrics, build_model, load_recipe_plugins, stages)
    from x2ct_framework.datacheck import guard_stored_geometry
    from x2ct_framework.model_info import describe_for_sample
    from x2ct_framework.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    load_recipe_plugins(recipe)
    build_metrics(recipe)
    print(f"recipe {recipe.path}: {recipe.name}")
    for stage in stages(recipe):
        model = build_model(recipe, stage)
        losses = build_losses(recipe, stage)
        datasets = {split: build_dataset(recipe, stage, split) for split in ("train", "val")}
        checked = guard_stored_geometry(datasets["train"])  # stored X-rays vs the CT's DRRs, as training does
        if checked is not None:
            print(f"  {stage.name}: stored X-rays agree with the CT ({len(checked.fits)} views checked; "
                  f"x2ct check-data shows the table)" if checked.ok else
                  f"  {stage.name}: stored X-rays DISAGREE with the CT (data.check_geometry = \"warn\"): "
                  + "; ".join(checked.fixes or checked.problems))
        sizes = {split: len(ds) for split, ds in datasets.items()}
        n_params = sum(p.numel() for p in model.parameters())
        terms = ", ".join(f"{t.name}x{t.weight:g}" for t in losses.terms)
        print(f"  {stage.name}: {stage.resolution}^3, model {recipe['model']['name']} ({n_params / 1e6:.2f} M params), "
              f"losses {terms or 'none'}, train {sizes['train']} / val {sizes['val']} cases")
        print(f"    model: {describe_for_sample(model, datasets['train'][0])}")
    print("ok")
    return 0


def check_data(args: argparse.Namespace) -> int:
    """The framework's DRRs of the first cases against the X-rays the dataset stores; 2 when they disagree."""
    from x2ct_framework.datacheck import check_data as run_check

    result, png = run_check(args.recipe, args.overrides, cases=args.cases, split=args.split,
                            stage_index=args.stage, out=args.out)
    print(result.table())
    print(f"overlay: {png} (magenta: the framework's DRR of the CT, green: the stored view; white where they agree)")
    if result.ok:
        print("ok: the stored X-rays show the CT in the declared geometry")
        return 0
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    if result.fixes:
        print("fix: set " + " and ".join(result.fixes) + " in the recipe's [data] table (or pass --set "
              + " --set ".join(f.replace(" = ", "=").replace(", ", ",") for f in result.fixes) + ")", file=sys.stderr)
    return 2


def plugins(args: argparse.Namespace) -> int:
    from x2ct_framework.plugins import get_plugin_manager

    pm = get_plugin_manager()
    if getattr(args, "recipe", None):
        from x2ct_framework.config.build import load_recipe_plugins
        from x2ct_framework.config.recipe import load_recipe

        load_recipe_plugins(load_recipe(args.recipe))
    for kind, reg in pm.registries().items():
        print(f"{kind}s:")
        for e in reg.entries():
            print(f"  {e.name:<22} plugin {e.plugin} ({e.distribution})")
    for name, msg in pm.failed.items():
        print(f"failed: {msg}")
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (runs/<name>/<stage>/best) or run folder (runs/<name>)")
    p.add_argument("--recipe", help="recipe that built the checkpoint (default: the run folder's recipe.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. to point data at another dataset")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--protocol", dest="protocols", nargs="+", default=["default", "x2ctgan"], metavar="NAME",
                   help="metric protocols (default: default x2ctgan)")
    p.add_argument("--stage", help="stage to evaluate (run folder: default its last trained stage)")
    p.add_argument("--which", default="best", help="checkpoint of the stage in a run folder: best, last, epochNNNN")
    p.add_argument("--out", help="output folder (default <run>/eval/<stage>-<split>)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-cases", type=int, default=0, help="evaluate only the first N cases (0 = all)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--worst", type=int, default=3, help="slice pictures of the N worst cases")
    p.add_argument("--lpips", default="auto", choices=("auto", "on", "off"),
                   help="LPIPS in the default protocol: auto = when its weights are present")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (runs/<name>/<stage>/best) or run folder (runs/<name>)")
    p.add_argument("inputs", nargs="+", help="image files of one case, a case folder, or a folder of case folders")
    p.add_argument("--geometry", help="'recipe' (the training geometry), a preset name with --views, or a "
                                      "TOML/JSON geometry file; a case folder's geometry.toml takes precedence")
    p.add_argument("--views", type=float, nargs="+", metavar="DEG", help="gantry angle of each image, in order")
    p.add_argument("--out", default="predictions", help="output folder, or a .nii.gz file for one case")
    p.add_argument("--recipe", help="recipe that built the checkpoint (default: the run folder's recipe.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stage", help="stage whose model to use (run folder: default its last trained stage)")
    p.add_argument("--which", default="best", help="checkpoint of the stage in a run folder: best, last, ...")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resize", default="auto", choices=("auto", "off"),
                   help="auto: resize (and pad) images to the training size, logged; off: refuse other sizes")
    p.add_argument("--normalize", default="auto", choices=("auto", "dtype", "minmax", "none"),
                   help="image intensity scaling to [0, 1] (see x2ct_framework.io.read_xray)")
    p.add_argument("--allow-geometry-mismatch", action="store_true",
                   help="use view angles or geometry other than the training ones (logged)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="output voxel size (x y z or one value)")
    p.add_argument("--dtype", default="float32", choices=("float32", "int16"))
    p.add_argument("--no-progress", dest="progress", action="store_false")


def evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint under named protocols (see x2ct_framework.evaluation.evaluate)."""
    from x2ct_framework.evaluation.evaluate import main as evaluate_main

    return evaluate_main(args)


def predict(args: argparse.Namespace) -> int:
    """Reconstruct CT volumes from X-ray images (see x2ct_framework.evaluation.predict)."""
    from x2ct_framework.evaluation.predict import main as predict_main

    return predict_main(args)


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
    p = sub.add_parser("check-data", help="check that a dataset's stored X-rays show its CTs in the declared geometry")
    p.add_argument("recipe")
    p.add_argument("--cases", type=int, default=3, help="cases to check (the first N of the split)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--stage", type=int, default=1, help="stage whose resolution the data is read at (1-based)")
    p.add_argument("--out", default="", help="folder for check_data.png (default: the run folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=check_data)
    p = sub.add_parser("evaluate", help="score a checkpoint on a dataset split under named metric protocols")
    add_evaluate_arguments(p)
    p.set_defaults(fn=evaluate)
    p = sub.add_parser("predict", help="X-ray images -> CT volume (NIfTI, HU) with a trained checkpoint")
    add_predict_arguments(p)
    p.set_defaults(fn=predict)
    p = sub.add_parser("plugins", help="list registered components and where they came from")
    p.add_argument("--recipe", help="also load the plugins this recipe names")
    p.set_defaults(fn=plugins)
    args = parser.parse_args(argv)
    return report_errors(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())

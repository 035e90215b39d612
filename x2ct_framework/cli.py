"""The ``x2ct`` command: run, prepare, validate, check-data, evaluate, predict, export, plugins."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from x2ct_framework.errors import X2CTError

from x2ct_framework.plugins import add_trust_arguments
from x2ct_framework.run import add_run_arguments, report_errors, run


def format_count(n: int) -> str:
    """A parameter count readable at every size: 812, 12.3 k, 4.56 M, 1.20 G."""
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def validate(args: argparse.Namespace) -> int:
    """Build every component of every stage and run the contract checks on them, without training."""
    from x2ct_framework.config.build import (build_dataset, build_losses, build_metrics, build_model,
                                             load_recipe_plugins, stages)
    from x2ct_framework.datacheck import guard_stored_geometry
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.config.checks import check_freeze
    from x2ct_framework.validate import (check_evaluators, check_protocols, check_stage, check_trackers,
                                         raise_problems)

    recipe = load_recipe(args.recipe, args.overrides)  # schema, select_best, trackers, names and options at once
    load_recipe_plugins(recipe)
    metrics = build_metrics(recipe)
    print(f"recipe {recipe.path}: {recipe.name}")
    problems: list[str] = [] if args.build_only else check_trackers(recipe)
    last = len(recipe["stages"])
    for stage in stages(recipe):
        model = build_model(recipe, stage)
        check_freeze(model, stage.options["freeze"], recipe.where("stages", stage.index - 1, "freeze"))
        losses = build_losses(recipe, stage)
        datasets = {split: build_dataset(recipe, stage, split) for split in ("train", "val")}
        checked = guard_stored_geometry(datasets["train"])  # stored X-rays vs the CT's DRRs, as training does
        if checked is not None:
            print(f"  {stage.name}: stored X-rays agree with the CT ({len(checked.fits)} views checked; "
                  f"x2ct check-data shows the table)" if checked.ok else
                  f"  {stage.name}: stored X-rays DISAGREE with the CT (data.check_geometry = \"warn\"): "
                  + "; ".join(checked.fixes or checked.problems))
        try:
            datasets["test"] = build_dataset(recipe, stage, "test")
        except X2CTError:  # a dataset may have no test split; the final evaluation reports it
            datasets["test"] = None
        sizes = {split: len(ds) for split, ds in datasets.items() if ds is not None}
        n_params = format_count(sum(p.numel() for p in model.parameters()))
        terms = ", ".join(f"{t.name}x{t.weight:g}" for t in losses.terms)
        print(f"  {stage.name}: {stage.resolution}^3, model {recipe['model']['name']} ({n_params} params), "
              f"losses {terms or 'none'}, " + " / ".join(f"{k} {v}" for k, v in sizes.items()) + " cases")
        # Two train items are the smallest batch that still checks collation and one metric value per case.
        found = [] if args.build_only else check_stage(recipe, stage, datasets, model, losses, metrics,
                                                       min(2, recipe["train"]["batch_size"]))
        if not found and not args.build_only and stage.index == last:
            found += check_protocols(recipe, stage, model, datasets["val"], min(2, recipe["train"]["batch_size"]))
            bad, notes = check_evaluators(recipe, stage)
            found += bad
            for note in notes:
                print(f"    note: {note}")
        problems += found
        if not found and args.describe:
            from x2ct_framework.model_info import describe_for_sample  # FlopCounterMode: only when asked

            print(f"    model: {describe_for_sample(model, datasets['train'][0])}")
        if not args.build_only:
            print(f"    contract: {'ok' if not found else f'{len(found)} problem(s)'}")
    raise_problems(problems)
    print("ok")
    return 0


def check_data(args: argparse.Namespace) -> int:
    """The framework's DRRs of the first cases against the X-rays the dataset stores; 2 when they disagree."""
    from x2ct_framework.datacheck import check_data as run_check

    result, png = run_check(args.recipe, args.overrides, cases=args.cases, split=args.split,
                            stage_index=args.stage, out=args.out)
    if not result.stored:
        print("nothing compared: the dataset stores no X-rays (it renders them from each CT in the declared "
              "geometry), so there are no stored views to check against the CT; check-data is for datasets that "
              "read X-rays from files (x2ctgan_h5 with xrays = \"stored\", paired_xray)")
        return 0
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
    """Every registered component with its plugin, every hook-only plugin with its hooks, and every failure.

    A plugin that fails to load or register is listed under ``failed:`` and the rest is still shown
    (``X2CT_STRICT_PLUGINS=1`` makes it an error). A listing without failures is cached
    (:mod:`x2ct_framework.listing_cache`): the next call prints it without importing torch or a plugin
    while nothing it depends on changed; ``--refresh`` lists afresh."""
    import warnings

    from x2ct_framework.listing_cache import ListingCache
    from x2ct_framework.plugins import manager_created

    recipe = getattr(args, "recipe", None)
    # Only a fresh process state is cached: plugins registered in-process (register_object) are in no key.
    cache = None if manager_created() else ListingCache(recipe)
    if cache is not None and not getattr(args, "refresh", False):
        text = cache.read()
        if text is not None:
            sys.stdout.write(text)
            return 0
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters stay; the warnings are shown below
            lines, failed, extra = _plugin_listing(recipe)
    finally:
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    text = "".join(f"{line}\n" for line in lines)
    sys.stdout.write(text)
    if cache is not None and not failed and not caught:
        cache.write(text, extra)
    return 0


def _plugin_listing(recipe_path: str | None) -> tuple[list[str], bool, list[str]]:
    """The lines of ``x2ct plugins``, whether a plugin failed, and the recipe and plugin files it read."""
    from x2ct_framework.plugins import PLURALS, get_plugin_manager

    pm = get_plugin_manager()
    pm.tolerant = True
    extra: list[str] = []
    if recipe_path:
        from x2ct_framework.config.document import Recipe, _read_toml

        # The plugins only: a recipe that does not validate must not hide what is installed.
        data, origins = _read_toml(Path(recipe_path), [])
        recipe = Recipe(data=data, path=Path(recipe_path).resolve(), origins=origins)
        extra += [str(recipe.path), *sorted(set(map(str, origins.values())))]
        for spec in data.get("plugins", []) if isinstance(data.get("plugins"), list) else []:
            try:
                pm.load_module(str(spec), recipe.base_dir)
            except X2CTError as exc:
                pm.failed[str(spec)] = str(exc)
    registries = pm.registries()
    lines: list[str] = []
    givers: set[str] = set()
    for kind, reg in registries.items():
        lines.append(f"{PLURALS[kind]}:")
        for e in reg.entries():
            givers.add(e.plugin)
            lines.append(f"  {e.name:<22} plugin {e.plugin} ({e.distribution})")
    lifecycle = []
    for name, plugin in pm.pm.list_name_plugin():
        file = getattr(plugin, "__file__", None)
        if file:
            extra.append(file)
        hooks = [h for h in pm.hooks_of(name) if not h.startswith("register_")]
        if hooks or name not in givers:
            lifecycle.append((name, hooks))
    if lifecycle:
        lines.append("hooks:")
        for name, hooks in lifecycle:
            lines.append(f"  {name:<22} {', '.join(hooks) or 'none'} ({pm.distributions.get(name, '?')})")
    lines += [f"failed: {msg}" for msg in pm.failed.values()]
    return lines, bool(pm.failed), extra


def count(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a bad value is a usage error, exit status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (runs/<name>/<stage>/best) or run folder (runs/<name>)")
    p.add_argument("--recipe", help="recipe that built the checkpoint (default: the run folder's recipe.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. to point data at another dataset")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--protocol", dest="protocols", nargs="+", default=["default", "x2ctgan"], metavar="NAME",
                   help="metric protocols (default: default x2ctgan)")
    p.add_argument("--evaluators", nargs="*", default=None, metavar="NAME",
                   help="evaluators that score the whole split (pe_detectability, organ_consistency, distribution, "
                        "or a plugin's); default: the recipe's eval.evaluators; with no name: none")
    p.add_argument("--stage", help="stage to evaluate (run folder: default its last trained stage)")
    p.add_argument("--which", default="best", help="checkpoint of the stage in a run folder: best, last, epochNNNN")
    p.add_argument("--out", help="output folder (default <run>/eval/<stage>-<split>)")
    p.add_argument("--batch-size", type=count(0), default=0, help="cases per batch (0 = the recipe's batch size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-cases", type=count(0), default=0, help="evaluate only the first N cases (0 = all)")
    p.add_argument("--bootstrap", type=count(0), default=1000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--worst", type=count(0), default=3, help="slice pictures of the N worst cases")
    p.add_argument("--lpips", default="auto", choices=("auto", "on", "off"),
                   help="LPIPS in the default protocol: auto = when its weights are present")
    p.add_argument("--samples", type=count(1), default=None, metavar="K",
                   help="a generative model: score the mean of K samples per case and one sample, and record their "
                        "diversity (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_trust_arguments(p)


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
    p.add_argument("--batch-size", type=count(1), default=1)
    p.add_argument("--resize", default="auto", choices=("auto", "off"),
                   help="auto: resize (and pad) images to the training size, logged; off: refuse other sizes")
    p.add_argument("--normalize", default="auto", choices=("auto", "dtype", "minmax", "none"),
                   help="image intensity scaling to [0, 1] (see x2ct_framework.io.read_xray)")
    p.add_argument("--allow-geometry-mismatch", action="store_true",
                   help="use view angles or geometry other than the training ones (logged)")
    p.add_argument("--match-histogram", action="store_true",
                   help="map each view's grey levels onto a training DRR's of the same view (histogram "
                        "matching; see docs/data.md, Your own radiographs, for its limits)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="output voxel size (x y z or one value)")
    p.add_argument("--dtype", default="float32", choices=("float32", "int16"))
    p.add_argument("--samples", type=count(0), default=0, metavar="K",
                   help="a generative model: write the mean of K samples, and <case>_std.nii.gz (per-voxel standard "
                        "deviation, HU) beside it (0 = the model's forward)")
    p.add_argument("--keep-samples", action="store_true", help="with --samples: also write <case>_sample<k>.nii.gz")
    p.add_argument("--like", metavar="CT", help="write the volume in this CT's world frame (the framework's crop of "
                                                "it), so it overlays the CT; default: isocentre at the origin")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_trust_arguments(p)


def evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint under named protocols (see x2ct_framework.evaluation.evaluate)."""
    from x2ct_framework.evaluation.evaluate import main as evaluate_main

    return evaluate_main(args)


def predict(args: argparse.Namespace) -> int:
    """Reconstruct CT volumes from X-ray images (see x2ct_framework.evaluation.predict)."""
    from x2ct_framework.evaluation.predict import main as predict_main

    return predict_main(args)


def export(args: argparse.Namespace) -> int:
    """Write an exported model folder (see x2ct_framework.export)."""
    from x2ct_framework.export import main as export_main

    return export_main(args)


def prepare(args: argparse.Namespace) -> int:
    """Discover, resample and render every case into the dataset cache (see x2ct_framework.prepare)."""
    from x2ct_framework.prepare import main as prepare_main

    return prepare_main(args)


def main(argv: list[str] | None = None) -> int:
    from x2ct_framework import __version__

    parser = argparse.ArgumentParser(prog="x2ct", description="x2ct-framework: CT from X-ray views")
    parser.add_argument("--version", action="version", version=f"x2ct-framework {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a recipe")
    add_run_arguments(p)
    p.set_defaults(fn=run)
    p = sub.add_parser("prepare", help="discover, resample and render every case into the dataset cache")
    from x2ct_framework.prepare import add_prepare_arguments

    add_prepare_arguments(p)
    p.set_defaults(fn=prepare)
    p = sub.add_parser("validate", help="build every component of a recipe and check their contracts, without "
                                        "training")
    p.add_argument("recipe")
    p.add_argument("--build-only", action="store_true",
                   help="build every component but skip the contract checks (a dataset item of every split, a batch "
                        "through the model, losses and metrics): seconds instead of minutes for 256^3 recipes on a CPU")
    p.add_argument("--describe", action="store_true",
                   help="also print the model's FLOPs and activation memory per training step (counted on fake "
                        "tensors: several seconds, so off by default to keep validate close to the torch import)")
    p.add_argument("--no-describe", dest="describe", action="store_false",
                   help="skip that line (the default; kept for older scripts)")
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
    p = sub.add_parser("export", help="write a trained model as a shareable folder (weights, config.json, model "
                                      "card) that load_pretrained, predict and evaluate accept")
    p.add_argument("source", help="run folder (runs/<name>) or checkpoint folder (runs/<name>/<stage>/best)")
    p.add_argument("out", help="output folder")
    p.add_argument("--recipe", help="recipe that built the checkpoint (default: the run folder's recipe.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stage", help="stage to export (run folder: default its last trained stage)")
    p.add_argument("--which", default="best", help="checkpoint of the stage in a run folder: best, last, epochNNNN")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to the Hugging Face Hub "
                                                           "(needs huggingface_hub and a network)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    add_trust_arguments(p)
    p.set_defaults(fn=export)
    p = sub.add_parser("plugins", help="list registered components and where they came from")
    p.add_argument("--recipe", help="also load the plugins this recipe names")
    p.add_argument("--refresh", action="store_true",
                   help="list afresh (import every plugin) instead of printing the cached listing")
    p.set_defaults(fn=plugins)
    args = parser.parse_args(argv)
    return report_errors(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())

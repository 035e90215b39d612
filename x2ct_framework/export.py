"""Share a trained model: ``x2ct export RUN_OR_CHECKPOINT OUT`` and :func:`load_pretrained`.

An export folder is self-describing, so it is used without the run folder or the recipe file:

- ``model.safetensors``: the ready model's weights (with the frozen earlier stages of a cascade),
  plus ``state.json`` holding their sha256, checked on every load, as for any checkpoint;
- ``config.json``: the model name and options, the stage and its resolution, views and geometry,
  HU window, X-ray image size, the cascade chain and the plugins the recipe named;
- ``recipe.toml`` (and ``cascade/<n>-<stage>.toml`` for each earlier stage of a cascade): the
  resolved recipes that built the model;
- ``README.md``: a model card with the run's metrics, the protocol they were scored under, the data
  and the recipe.

``x2ct_framework.load_pretrained(folder)`` returns the model ready for inference;
``x2ct predict FOLDER ...`` and ``x2ct evaluate FOLDER`` accept the folder in place of a checkpoint.
``--push-to-hub REPO_ID`` uploads the folder with ``huggingface_hub`` when it is installed and the
machine is online.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from x2ct_framework.errors import CheckpointError, X2CTError
from x2ct_framework.safepaths import bounded

# The read side (an export folder as a target, and loading its model) lives with run-folder discovery
# (runs.py) and model loading (loading.py); these names stay importable from here.
from x2ct_framework.loading import _missing_provider, load_pretrained  # noqa: E402,F401
from x2ct_framework.runs import CONFIG, FORMAT, FORMAT_VERSION, export_target, is_export, read_config  # noqa: E402,F401


# ---- writing ----------------------------------------------------------------------------------
EXPORT_FILES = {"model.safetensors", "state.json", CONFIG, "recipe.toml", "README.md", "cascade", "plugins"}


def check_output(out: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output folder whose replacement could lose anything: the source itself or a folder
    holding it, a link, a file, or a folder that is not an earlier export (with only an export's files)."""
    if out.is_symlink():
        raise X2CTError(f"{out}: is a symbolic link; the export writes a new folder there, name a real path")
    real_out = Path(os.path.realpath(out))
    for src in sources:
        real_src = Path(os.path.realpath(src))
        if real_out == real_src or real_out in real_src.parents:
            raise X2CTError(f"{out}: is {'the source' if real_out == real_src else 'a folder holding the source'} "
                            f"{src}; the export is written beside the run, never over it: name a new folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise X2CTError(f"{out}: exists and is not a folder; name a new folder for the export")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise X2CTError(f"{out}: the folder exists and is not empty; choose another or pass --overwrite "
                        f"(which replaces an earlier export only)")
    if not is_export(out):
        raise X2CTError(f"{out}: --overwrite replaces only an earlier export (a folder with {CONFIG} of format "
                        f"{FORMAT!r}); this folder holds {bounded(entries)}, which is kept: name a new folder")
    foreign = [e for e in entries if e not in EXPORT_FILES]
    if foreign:
        raise X2CTError(f"{out}: an earlier export, but it also holds {bounded(foreign)}, which the export did not "
                        f"write; --overwrite would lose them, so nothing is replaced: move them or name a new folder")


def _chain(target) -> list[tuple[Any, Any]]:
    """(recipe, stage) of every earlier stage that feeds ``target``'s stage its ``prev``, first first."""
    from x2ct_framework.training import cascade

    links = []
    recipe, stage, run = target.recipe, target.stage, target.run_dir
    while stage.options.get("cascade", False):
        link_recipe, earlier, _, link_run = cascade._link_before(recipe, stage, run)
        links.insert(0, (link_recipe, earlier))
        recipe, stage, run = link_recipe, earlier, link_run
    return links


def _model_table(recipe, stage) -> dict[str, Any]:
    from x2ct_framework.config.build import model_options

    opts = model_options(recipe, stage)
    return {"name": opts.pop("name"), "options": opts}


def _evaluation_summary(target) -> tuple[dict[str, Any] | None, Path | None]:
    base = target.run_dir if target.run_dir is not None else target.checkpoint
    for split in ("test", "val"):
        path = base / "eval" / f"{target.stage.name}-{split}" / "summary.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()), path
            except json.JSONDecodeError:
                continue
    return None, None


def model_card(cfg: dict[str, Any], recipe_text: str, summary: dict[str, Any] | None) -> str:
    """The README.md of an export: what the model is, how it was trained and scored, how to load it."""
    src = cfg["source"]
    data = cfg["data"]
    lines = ["---", "library_name: x2ct-framework", "tags:", "- x2ct-framework", "- ct-reconstruction",
             "- x-ray", "---", "", f"# {cfg['name']}: {cfg['stage']['name']} ({cfg['model']['name']})", "",
             f"A CT reconstruction model from {len(cfg['views'])} X-ray views (gantry angles {cfg['views']} "
             f"degrees), trained with x2ct-framework {cfg['framework_version']}. It returns a "
             f"{cfg['stage']['resolution']}^3 volume on the [0, 1] scale of the HU window {cfg['hu_window']}.", "",
             "## Use", "", "```python", "from x2ct_framework import load_pretrained", "",
             "model = load_pretrained(\"path/to/this/folder\")  # eval mode, on the CPU",
             "volume01 = model(xrays, geometry)  # xrays [B, V, 1, H, W] in [0, 1]; geometry as in training", "```",
             "", "or `x2ct predict FOLDER IMAGES... --geometry recipe` for NIfTI volumes in HU, and "
             "`x2ct evaluate FOLDER` to score it on the recipe's data.", "",
             "## Inputs", "",
             f"- views: {cfg['views']} (degrees), geometry: `{json.dumps(cfg['geometry'])}`",
             f"- X-ray images: {cfg['image_size']}^2 pixels, intensities in [0, 1]",
             f"- HU window: {cfg['hu_window']} (output value v is HU = lo + v * (hi - lo))"]
    if cfg["cascade"]:
        chain = " -> ".join(f"{c['stage']} ({c['resolution']}^3, {c['model']['name']})" for c in cfg["cascade"])
        lines.append(f"- cascade: {chain} -> {cfg['stage']['name']}; the earlier stages are frozen and included")
    if cfg["plugins"]:
        lines.append(f"- plugins the recipe loads (install them first): {', '.join(cfg['plugins'])}")
    lines += ["", "## Training data", "", f"- dataset plugin `{data.get('name')}` with options "
              f"`{json.dumps({k: v for k, v in data.items() if k != 'name'}, default=str)}`",
              f"- checkpoint: `{src['checkpoint']}` (epoch {src.get('epoch')}, step {src.get('step')})", "",
              "## Metrics", ""]
    val = {k: v for k, v in (src.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if val:
        lines += ["Validation at the checkpoint (the trainer's metrics on the val split):", "",
                  "| metric | value |", "|---|---|"] + [f"| `{k}` | {v:.4g} |" for k, v in sorted(val.items())] + [""]
    if summary:
        info = summary.get("info", {})
        lines += [f"Evaluation on the {info.get('split', '?')} split ({info.get('cases', '?')} cases), mean "
                  f"[95% bootstrap interval]; every number is keyed `<protocol>/<metric>`:", ""]
        for proto, body in summary.get("protocols", {}).items():
            lines += [f"Protocol `{proto}`:", "", "| metric | mean | 95% CI | n |", "|---|---|---|---|"]
            for m in body.get("metrics", {}).values():
                lo, hi = m.get("ci95", [None, None])
                fmt = (lambda v: "n/a" if v is None or v != v else f"{v:.4g}")  # noqa: E731
                lines.append(f"| `{m['key']}` | {fmt(m.get('mean'))} | [{fmt(lo)}, {fmt(hi)}] | {m.get('n')} |")
            lines += [""] + [f"- {c}" for c in body.get("conventions", [])] + [""]
    if not val and not summary:
        lines += ["No metrics were recorded for this checkpoint; score it with `x2ct evaluate`.", ""]
    lines += ["## Recipe", "", "```toml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def export(path: str | Path, out: str | Path, *, recipe: str | Path | None = None, overrides: list[str] = (),
           stage: str | None = None, which: str = "best", overwrite: bool = False) -> Path:
    """Write the export folder ``out`` for a run folder or checkpoint folder ``path``."""
    from x2ct_framework._version import __version__
    from x2ct_framework.checkpoint import load_state
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import data_options_with_defaults, hu_window_of, resolve_target
    from x2ct_framework.training.cascade import image_size

    out = Path(out)
    target = resolve_target(path, recipe, list(overrides), stage, which)
    if is_export(target.checkpoint):
        raise X2CTError(f"{path}: already an exported model; copy the folder instead")
    check_output(out, [Path(path), target.checkpoint, *([target.run_dir] if target.run_dir else [])], overwrite)
    model = load_model(target, torch.device("cpu"))
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()} values)" for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{target.checkpoint}: {len(bad)} tensor(s) hold NaN or infinite values: {bounded(bad)}; "
                              f"a model with them predicts nothing useful, so it is not exported. Export an earlier "
                              f"checkpoint (--which last / epochNNNN) or train again")
    links = _chain(target)
    data = data_options_with_defaults(target.recipe, target.stage)
    try:
        state = load_state(target.checkpoint)
    except CheckpointError:
        state = {}
    cfg: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "framework_version": __version__,
        "name": target.recipe.name,
        "model": _model_table(target.recipe, target.stage),
        "stage": {"name": target.stage.name, "index": target.stage.index, "resolution": target.stage.resolution},
        "views": [float(v) for v in data.get("views", [])],
        "geometry": data.get("geometry", "parallel"),
        "hu_window": list(hu_window_of(target.recipe, target.stage)),
        "image_size": image_size(target.recipe, target.stage),
        "cascade": [{"stage": s.name, "resolution": s.resolution, "image_size": image_size(r, s),
                     "model": _model_table(r, s), "recipe": f"cascade/{i + 1}-{s.name}.toml"}
                    for i, (r, s) in enumerate(links)],
        "recipe": "recipe.toml",
        "plugins": list(target.recipe["plugins"]),
        "providers": providers(target.recipe, target.stage, links),
        "plugin_files": [],  # recipe-local plugin files copied into plugins/: received code, imported only when trusted
        "data": {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool, list, dict))},
        "source": {"checkpoint": str(target.checkpoint), "epoch": state.get("epoch"), "step": state.get("step"),
                   "metrics": state.get("metrics", {})},
    }
    plugin_files: dict[Path, str] = {}
    texts = [_export_recipe_text(target.recipe, plugin_files)] + [_export_recipe_text(r, plugin_files, "../")
                                                                  for r, _ in links]  # cascade/<n>.toml
    cfg["plugins"] = [_exported_name(target.recipe, p, plugin_files) for p in target.recipe["plugins"]]
    cfg["plugin_files"] = sorted(plugin_files.values())
    from x2ct_framework.atomic import swap_in

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    try:
        _write_export(tmp, target, model, texts, cfg, plugin_files)
        check_output(out, [Path(path), target.checkpoint, *([target.run_dir] if target.run_dir else [])],
                     overwrite)  # again: nothing may have appeared there while the model was written
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _exported_name(recipe, spec: str, copies: dict[Path, str]) -> str:
    from x2ct_framework.plugins import plugin_file

    path = plugin_file(spec, recipe.plugins_dir)
    return copies.get(path, spec) if path is not None else spec


def _export_recipe_text(recipe, copies: dict[Path, str], up: str = "") -> str:
    """The recipe as the export keeps it: its plugin files copied to ``plugins/<name>`` and named so."""
    import copy

    from x2ct_framework.config.document import dumps_toml
    from x2ct_framework.plugins import plugin_file

    data = copy.deepcopy(recipe.data)
    names = []
    for spec in data.get("plugins") or []:
        path = plugin_file(spec, recipe.plugins_dir)
        if path is not None and path.is_file() and path not in copies:
            stem, n, used = path.stem, 1, set(copies.values())
            name = f"plugins/{path.name}"
            while name in used:
                n += 1
                name = f"plugins/{stem}_{n}.py"
            copies[path] = name
        names.append(up + copies[path] if path in copies else spec)
    if data.get("plugins"):
        data["plugins"] = names
    return dumps_toml(data)


def _write_export(tmp: Path, target, model, texts: list[str], cfg, plugin_files: dict[Path, str]) -> None:
    from x2ct_framework.checkpoint import save_checkpoint

    save_checkpoint(tmp, model, {"stage": target.stage.name, "exported_from": str(target.checkpoint)})
    recipe_text = texts[0]
    (tmp / "recipe.toml").write_text(recipe_text)
    for link, text in zip(cfg["cascade"], texts[1:]):
        (tmp / link["recipe"]).parent.mkdir(exist_ok=True)
        (tmp / link["recipe"]).write_text(text)
    for src, name in plugin_files.items():
        (tmp / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(src, tmp / name)
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    summary, _ = _evaluation_summary(target)
    (tmp / "README.md").write_text(model_card(cfg, recipe_text, summary))


def providers(recipe, stage, links=()) -> dict[str, dict[str, Any]]:
    """Which plugin, distribution and version provide the model (and each cascade link's model) and the dataset:
    ``{"model": {"name", "plugin", "distribution", "version"}, "dataset": ..., "cascade/1": ...}``."""
    import importlib.metadata

    from x2ct_framework.plugins import get_plugin_manager
    from x2ct_framework.runs import data_options_with_defaults

    def entry(kind: str, name: Any) -> dict[str, Any]:
        reg = get_plugin_manager().registry(kind)
        if not isinstance(name, str) or name not in reg:
            return {"name": name}
        e = reg.get(name)
        try:
            version = importlib.metadata.version(e.distribution)
        except (importlib.metadata.PackageNotFoundError, ValueError):
            version = None
        return {"name": name, "plugin": e.plugin, "distribution": e.distribution, "version": version}

    out = {"model": entry("model", _model_table(recipe, stage).get("name")),
           "dataset": entry("dataset", data_options_with_defaults(recipe, stage).get("name"))}
    for i, (r, s) in enumerate(links):
        out[f"cascade/{i + 1}"] = entry("model", _model_table(r, s).get("name"))
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hugging Face Hub as model repository ``repo_id``; returns its URL."""
    folder = Path(folder)
    read_config(folder)
    try:
        import huggingface_hub
    except ImportError as exc:
        raise X2CTError("--push-to-hub needs the huggingface_hub package, which is not installed "
                        "(pip install huggingface_hub); the export itself is written") from exc
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload x2ct-framework export")
    except Exception as exc:  # offline, no token, no permission: the folder is still there
        raise X2CTError(f"--push-to-hub {repo_id}: the upload failed ({type(exc).__name__}: {exc}); the export "
                        f"is in {folder}, upload it later with `huggingface-cli upload {repo_id} {folder}`") from exc
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def main(args) -> int:
    from x2ct_framework.plugins import apply_trust_arguments

    apply_trust_arguments(args)  # --plugins / --trust-run-plugins, as evaluate and predict take them
    out = export(args.source, args.out, recipe=args.recipe, overrides=args.overrides, stage=args.stage,
                 which=args.which, overwrite=args.overwrite)
    print(f"exported {args.source} to {out} (model.safetensors, config.json, recipe.toml, README.md)")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0

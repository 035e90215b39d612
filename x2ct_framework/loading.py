"""Load a trained stage's model, with the earlier stages it cascades from, ready for inference: from a
checkpoint of a run (:func:`load_model`) or from an export folder (:func:`load_pretrained`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from x2ct_framework.checkpoint import load_into, load_weights
from x2ct_framework.config.build import build_model, stages
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.errors import CheckpointError, DataError, PluginError, RecipeError, X2CTError
from x2ct_framework.runs import CONFIG, Target, export_target, is_export, read_config
from x2ct_framework.training.cascade import CascadeModel, PreviousStages, previous_stages


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {device}: no CUDA device is visible on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DataError(f"--device {device!r}: not a device name (expected auto, cpu, cuda or cuda:N)") from exc


def load_model(target: Target, device: torch.device) -> torch.nn.Module:
    """The stage's model with the checkpoint's weights, in eval mode on ``device``."""
    if is_export(target.checkpoint):  # the folder holds the whole chain and its description
        return load_pretrained(target.checkpoint, device)
    model = build_model(target.recipe, target.stage)
    load_into(model, target.checkpoint, strict=True)
    previous = previous_stages(target.recipe, target.stage, target.run_dir)
    if previous is not None:  # the checkpoint was trained with the earlier stages' prediction as prev
        model = CascadeModel(previous, model)
    return model.to(device).eval()


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", *, plugins: list[str] | tuple = (),
                    trust_plugins: bool = False) -> torch.nn.Module:
    """The model of an export folder, with its weights (and its cascade's frozen stages), in eval mode.

    An export folder is data, as a run folder is: the plugins its recipe names are imported when they
    are installed distributions, when named in ``plugins`` (modules or .py files, as ``--plugins``
    takes them), or, for every one of them, with ``trust_plugins=True`` (as ``--trust-run-plugins``).
    Plugin files the export carries lie in its ``plugins/`` folder. A missing plugin is an error naming it
    and the distribution that provided it.
    """
    from x2ct_framework.errors import PluginError
    from x2ct_framework.plugins import get_plugin_manager

    pm = get_plugin_manager()
    before = pm.trust_run_plugins
    pm.trust_run_plugins = bool(trust_plugins) or before
    try:
        pm.load_user_plugins([str(p) for p in plugins], Path.cwd())
        return _load_pretrained(path, device)
    except PluginError as exc:
        raise PluginError(_python_message(str(exc))) from None
    finally:
        pm.trust_run_plugins = before


def _python_message(text: str) -> str:
    """A plugin refusal worded for a Python caller of load_pretrained (keyword arguments, not flags)."""
    import re

    text = re.sub(r"--plugins (\S+)", lambda m: f"load_pretrained(path, plugins=[{m.group(1)!r}])", text)
    text = text.replace("pass --trust-run-plugins", "call load_pretrained(path, trust_plugins=True)")
    text = text.replace("--trust-run-plugins", "load_pretrained(path, trust_plugins=True)")
    return text.replace("A run folder is data", "An export folder is data")


def _load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    folder = Path(path)
    cfg = read_config(folder)
    target = export_target(folder)
    try:
        model = build_model(target.recipe, target.stage)
    except RecipeError as exc:
        raise _missing_provider(folder, cfg, "model", exc) from exc
    if cfg["cascade"]:
        models, sizes, names = [], [], []
        for i, link in enumerate(cfg["cascade"]):
            r = load_recipe(folder / link["recipe"], run_folder=folder)
            s = next(s for s in stages(r) if s.name == link["stage"])
            try:
                models.append(build_model(r, s))
            except RecipeError as exc:
                raise _missing_provider(folder, cfg, f"cascade/{i + 1}", exc) from exc
            sizes.append(int(link["image_size"]))
            names.append(f"{s.name} (exported)")
        model = CascadeModel(PreviousStages(models, sizes, names), model)
    weights = load_weights(folder)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit the model {cfg['model']['name']!r} "
                              f"that {folder / CONFIG} describes: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()


def _missing_provider(folder: Path, cfg: dict[str, Any], key: str, exc: RecipeError) -> X2CTError:
    """An "unknown model" on loading an export, with the distribution (and version) that provided it."""
    from x2ct_framework.plugins import get_plugin_manager

    info = cfg.get("providers", {}).get(key, {})
    if not info or info.get("name") in get_plugin_manager().registry("model"):
        return exc  # the model is there: another problem (its options), said by the original error
    dist = info.get("distribution")
    if not dist or dist in ("local file", "in-process", "not installed", "?"):
        where = f" (it came from {info['plugin']!r}, {dist})" if info.get("plugin") else ""
        return PluginError(f"{folder}: the exported model needs the model {info.get('name', '?')!r}{where}, which "
                           f"no loaded plugin provides; load that plugin (--plugins) and try again ({exc})")
    version = info.get("version")
    return PluginError(f"{folder}: the exported model needs the model {info['name']!r} from the distribution "
                       f"{dist!r}{' ' + version if version else ''}, which is not installed: "
                       f"pip install {dist}{'==' + version if version else ''}")

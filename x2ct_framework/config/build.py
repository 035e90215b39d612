"""Build the components a recipe names, for one stage, through the registries."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import PluginError, RecipeError, X2CTError
from x2ct_framework.registry import check_options
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.config.document import Recipe
from x2ct_framework.config.schema import LOSS_TERM_KEYS
from x2ct_framework.stage import Stage


def load_recipe_plugins(recipe: Recipe) -> None:
    """Import the plugins a recipe names (paths relative to the file that declares them).

    A recipe the user named is trusted and its plugins are remembered as the user's; a run folder's
    ``recipe.toml`` (``recipe.run_folder`` set) is data: each of its plugins must be allowed by
    :meth:`~x2ct_framework.plugins.PluginManager.allows_run_plugin` first, so none is imported unless
    the user named it too, it is installed, or the user passed ``--trust-run-plugins``.
    """
    from x2ct_framework.plugins import plugin_key

    pm = get_plugin_manager()
    base = recipe.plugins_dir
    allowed = []
    for spec in recipe["plugins"]:
        if recipe.run_folder is not None:
            verdict = pm.allows_run_plugin(spec, base, recipe.run_folder)
            if verdict is None:
                continue
        allowed.append(spec)
    for spec in allowed:
        pm.load_module(spec, base)
        if recipe.run_folder is None:
            pm.user_plugins.add(plugin_key(spec, base))


def tracker_init_kwargs(recipe: Recipe) -> dict[str, dict]:
    """``train.tracker_options`` of accelerate's built-in trackers as ``init_trackers(..., init_kwargs=...)``: per
    tracker name, the keyword arguments of its initialisation (wandb: entity, tags, name, ...; tensorboard:
    SummaryWriter's). A plugin tracker's options go to its factory instead (:func:`build_trackers`)."""
    from x2ct_framework.config.checks import known_trackers

    known = known_trackers()
    return {name: dict(opts) for name, opts in recipe["train"]["tracker_options"].items() if name in known}


def builtin_tracker_names(recipe: Recipe) -> list[str]:
    """The names in ``train.trackers`` that accelerate knows itself (``Accelerator(log_with=...)``)."""
    from x2ct_framework.config.checks import known_trackers

    known = known_trackers()
    return [t for t in recipe["train"]["trackers"] if t != "none" and t in known]


def build_trackers(recipe: Recipe, run_dir: str | Path) -> list[tuple[Any, Any]]:
    """The plugin trackers of ``train.trackers``, each built from ``[train.tracker_options.<name>]`` plus the
    context its factory declares (``logging_dir`` = the run folder, ``run_name`` = the recipe's name).

    Returns ``(tracker, registry entry)`` pairs; a factory that fails or returns anything but an
    ``accelerate.tracking.GeneralTracker`` is a :class:`PluginError` naming the plugin.
    """
    from accelerate.tracking import GeneralTracker

    from x2ct_framework.config.checks import TRACKER_CONTEXT, known_trackers, plugin_trackers, unknown_tracker

    known, registry = known_trackers(), plugin_trackers()
    context = dict(zip(TRACKER_CONTEXT, (Path(run_dir), recipe.name)))
    out = []
    for i, name in enumerate(recipe["train"]["trackers"]):
        if name == "none" or name in known:
            continue
        if name not in registry:
            raise RecipeError([unknown_tracker(recipe.where("train", "trackers", i), name, known, registry.names())])
        entry = registry.get(name)
        try:
            tracker = registry.create(name, recipe["train"]["tracker_options"].get(name, {}),
                                      where=recipe.where("train", "tracker_options", name), context=context)
        except X2CTError:
            raise
        except Exception as exc:
            raise PluginError(f"{entry.source}: the factory of tracker {name!r} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(tracker, GeneralTracker):
            raise PluginError(f"{entry.source}: the factory of tracker {name!r} returned {type(tracker).__name__}, "
                              f"not an accelerate.tracking.GeneralTracker; return an instance of a subclass that "
                              f"defines name, requires_logging_directory, tracker, log and finish "
                              f"(docs/plugins.md, register_trackers)")
        if not isinstance(getattr(tracker, "name", None), str):
            raise PluginError(f"{entry.source}: tracker {name!r} ({type(tracker).__name__}) has no `name` string; "
                              f"set the class attribute name = {name!r}")
        out.append((tracker, entry))
    return out


def stages(recipe: Recipe) -> list[Stage]:
    return [Stage(name=s["name"], index=i + 1, resolution=s["resolution"], options=s)
            for i, s in enumerate(recipe["stages"])]


def _merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def data_options(recipe: Recipe, stage: Stage) -> dict:
    return _merged(recipe["data"], stage.options.get("data", {}))


def model_options(recipe: Recipe, stage: Stage) -> dict:
    """``[model]`` with the stage's ``model`` table over it; a stage that names another model (a generative
    refiner after a regression cascade) takes its own table whole."""
    own = stage.options.get("model", {})
    if own.get("name") not in (None, recipe["model"].get("name")):
        return copy.deepcopy(own)
    return _merged(recipe["model"], own)


def dataset_default(recipe: Recipe, stage: Stage, key: str) -> Any:
    """The stage's ``[data]`` value of ``key``, else the dataset factory's own default, else ``None``."""
    data = data_options(recipe, stage)
    if key in data:
        return data[key]
    reg = get_plugin_manager().registry("dataset")
    if data.get("name") not in reg:
        return None
    factory = reg.get(data["name"]).factory
    try:
        param = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters.get(key)
    except (TypeError, ValueError):
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return list(param.default) if isinstance(param.default, tuple) else param.default


def context(recipe: Recipe, stage: Stage) -> dict[str, Any]:
    """Values a component may ask for by naming them as parameters (unless its recipe sets them).

    ``hu_window`` is always offered: ``[data] hu_window``, else the dataset's default, else
    ``DEFAULT_HU_WINDOW``, so every component scales intensities as the data does.
    """
    data = data_options(recipe, stage)
    ctx = {"resolution": stage.resolution, "stage": stage, "seed": recipe["seed"],
           "gradient_checkpointing": recipe["train"]["gradient_checkpointing"]}
    for key in ("views", "geometry"):
        if key in data:
            ctx[key] = data[key]
    window = dataset_default(recipe, stage, "hu_window")
    ctx["hu_window"] = list(window) if window is not None else list(DEFAULT_HU_WINDOW)
    return ctx


def dataset_context(recipe: Recipe, stage: Stage) -> dict[str, Any]:
    """What a dataset factory may declare besides its options: ``resolution`` (the stage's), ``hu_window``
    (the recipe's, else ``DEFAULT_HU_WINDOW`` when the dataset has no default of its own) and
    ``gradient_checkpointing``. The recipe's training ``seed`` is not offered: a dataset's ``seed``
    fixes its split and content, which must not change with the training seed; set it in ``[data]``."""
    ctx = {"resolution": stage.resolution, "gradient_checkpointing": recipe["train"]["gradient_checkpointing"]}
    if dataset_default(recipe, stage, "hu_window") is None:
        ctx["hu_window"] = list(DEFAULT_HU_WINDOW)
    return ctx


def _stage_key(recipe: Recipe, stage: Stage, *rest: str) -> tuple:
    return ("stages", stage.index - 1) + rest


def build_dataset(recipe: Recipe, stage: Stage, split: str) -> torch.utils.data.Dataset:
    opts = data_options(recipe, stage)
    name = opts.pop("name")
    reg = get_plugin_manager().registry("dataset")
    dataset = reg.create(name, opts, where=recipe.where("data"), split=split, stage=stage,
                         context=dataset_context(recipe, stage))
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise PluginError(f"dataset {name!r} ({reg.get(name).source}) returned {type(dataset).__name__}, "
                          f"expected a torch.utils.data.Dataset (with __len__ and __getitem__)")
    return dataset


def loader_options(num_workers: int) -> dict[str, Any]:
    """DataLoader options for ``num_workers``: workers stay alive across epochs (their in-memory caches
    and open memory maps with them), and batches are pinned for fast copies when a GPU is present."""
    workers = int(num_workers)
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        opts["persistent_workers"] = True
    return opts


def build_model(recipe: Recipe, stage: Stage) -> nn.Module:
    opts = model_options(recipe, stage)
    name = opts.pop("name")
    ctx = context(recipe, stage)
    ctx.pop("stage")
    reg = get_plugin_manager().registry("model")
    model = reg.create(name, opts, where=recipe.where("model"), context=ctx)
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {name!r} ({reg.get(name).source}) returned {type(model).__name__}, "
                          f"expected a torch.nn.Module")
    return model


class LossTerm(nn.Module):
    """One weighted term; the weight may ramp linearly between two epochs."""

    def __init__(self, name: str, module: nn.Module, weight: float, schedule: str = "constant",
                 start_epoch: int = 0, end_epoch: int = 0, source: str = ""):
        super().__init__()
        self.name, self.module, self.source = name, module, source
        self.weight, self.schedule = float(weight), schedule
        self.start_epoch, self.end_epoch = int(start_epoch), int(end_epoch)

    def weight_at(self, epoch: int) -> float:
        if epoch < self.start_epoch:
            return 0.0
        if self.schedule == "linear" and self.end_epoch > self.start_epoch:
            return self.weight * min(1.0, (epoch - self.start_epoch + 1) / (self.end_epoch - self.start_epoch))
        return self.weight


class LossSet(nn.Module):
    """The stage's loss: a weighted sum of terms, each term logged separately."""

    def __init__(self, terms: list[LossTerm], model_name: str = "the model"):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.model_name = model_name

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict, epoch: int = 0):
        if not isinstance(pred, torch.Tensor) or pred.shape != target.shape:
            shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise PluginError(f"model {self.model_name!r} returned {shape}, expected the target's shape "
                              f"{tuple(target.shape)} ([B, 1, R, R, R] at the stage resolution)")
        total = pred.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            w = term.weight_at(epoch)
            if w == 0.0:
                continue
            source = getattr(term, "source", "")
            named = f"loss term {term.name!r}" + (f" ({source})" if source else "")
            try:
                value = term.module(pred, target, batch)
            except X2CTError:
                raise
            except KeyError as exc:
                raise PluginError(f"{named} needs batch key {exc}, which the dataset does not give (it gives "
                                  f"{', '.join(map(str, batch))})") from exc
            except Exception as exc:
                raise PluginError(f"{named} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(value, torch.Tensor) or value.ndim != 0:
                got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise PluginError(f"{named} returned {got}, expected a scalar tensor")
            # A constant 0 (nothing to score in this batch) is harmless; another detached value trains nothing.
            if pred.requires_grad and torch.is_grad_enabled() and not value.requires_grad and float(value) != 0.0:
                raise PluginError(f"{named} does not depend differentiably on the prediction (detached?), so it "
                                  f"would train nothing; fix the loss or remove the term")
            parts[term.name] = value.detach()
            total = total + w * value
        if parts and torch.is_grad_enabled() and pred.requires_grad and not total.requires_grad:
            names = ", ".join(f"{t.name!r} ({t.source or 'unknown plugin'})" for t in self.terms if t.name in parts)
            raise PluginError(f"loss term(s) {names} returned a tensor that does not depend on the prediction "
                              f"(no gradient flows back: detached, computed under torch.no_grad, or built from "
                              f"the target only); nothing would train")
        return total, parts

    def trainable(self) -> list[LossTerm]:
        """Terms whose loss owns trainable parts (``trainable_parts`` / ``configure_optimizer`` / ``parts_loss``)."""
        return [t for t in self.terms if callable(getattr(t.module, "trainable_parts", None))]


def build_losses(recipe: Recipe, stage: Stage) -> LossSet:
    reg = get_plugin_manager().registry("loss")
    ctx = context(recipe, stage)
    terms = []
    for term_name, table in stage.options["losses"].items():
        table = dict(table)
        meta = {k: table.pop(k) for k in LOSS_TERM_KEYS if k in table}
        plugin = meta.pop("name", term_name)
        where = recipe.where(*_stage_key(recipe, stage, "losses", term_name))
        module = reg.create(plugin, table, where=where, context=ctx)
        if not isinstance(module, nn.Module):
            module = _Wrap(module)
        terms.append(LossTerm(term_name, module, **meta, source=f"loss {plugin!r} from {reg.get(plugin).source}"))
    return LossSet(terms, model_options(recipe, stage).get("name", "the model"))


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, pred, target, batch):
        return self.fn(pred, target, batch)


def component_problems(recipe: Recipe) -> list[str]:
    """Every component a recipe names (dataset, model, each loss term, each metric, in every stage) against its
    registry, and its options against the factory's signature, as ``build_*`` would check them, without
    building anything: the problems, each once."""
    pm = get_plugin_manager()
    problems: list[str] = []

    def check(kind: str, name: Any, options: dict, where: str, fixed: tuple = (), supplied: Any = ()) -> None:
        if not isinstance(name, str):
            return  # the schema reports a missing or malformed name
        try:
            entry = pm.registry(kind).get(name, where)
            check_options(entry, options, where, kind, reserved=set(fixed), supplied=set(supplied))
        except RecipeError as exc:
            problems.extend(p for p in exc.problems if p not in problems)

    for stage in stages(recipe):
        data = data_options(recipe, stage)
        check("dataset", data.pop("name", None), data, recipe.where("data"), ("split", "stage"),
              dataset_context(recipe, stage))
        model = model_options(recipe, stage)
        ctx = context(recipe, stage)
        check("model", model.pop("name", None), model, recipe.where("model"), supplied=set(ctx) - {"stage"})
        for term_name, table in stage.options["losses"].items():
            table = dict(table)
            plugin = table.get("name", term_name)
            options = {k: v for k, v in table.items() if k not in LOSS_TERM_KEYS}
            check("loss", plugin, options, recipe.where(*_stage_key(recipe, stage, "losses", term_name)),
                  supplied=ctx)
    for i, name in enumerate(recipe["eval"]["metrics"]):
        options = recipe["eval"]["metric_options"].get(name)
        check("metric", name, options or {}, recipe.where("eval", *(("metric_options", name) if options else
                                                                    ("metrics", i))), supplied=("hu_window", "seed"))
    for name, options in recipe["eval"]["protocol_options"].items():
        check("protocol", name, options, recipe.where("eval", "protocol_options", name), ("hu_window",),
              ("lpips", "resolution", "seed"))
    for name, options in recipe["eval"]["evaluator_options"].items():
        check("evaluator", name, options, recipe.where("eval", "evaluator_options", name))
    return problems


def build_metrics(recipe: Recipe) -> dict[str, Any]:
    reg = get_plugin_manager().registry("metric")
    first = stages(recipe)[0]
    window = dataset_default(recipe, first, "hu_window")
    ctx = {"hu_window": list(window) if window is not None else list(DEFAULT_HU_WINDOW), "seed": recipe["seed"]}
    out = {}
    for i, name in enumerate(recipe["eval"]["metrics"]):
        options = recipe["eval"]["metric_options"].get(name)
        where = recipe.where("eval", "metric_options", name) if options else recipe.where("eval", "metrics", i)
        out[name] = reg.create(name, options or {}, where=where, context=ctx)
        if getattr(out[name], "per_set", False):
            raise RecipeError([f"{recipe.where('eval', 'metrics', i)}: metric {name!r} is one number for a whole split "
                               f"(x2ct evaluate, the report and the matrices report it); it cannot score validation "
                               f"batches: remove it from eval.metrics"])
    return out

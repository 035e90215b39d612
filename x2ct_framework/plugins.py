"""The plugin manager: loads plugins and fills the registries through their hooks.

Plugins come from the entry-point group ``x2ct_framework`` (the built-in ones too, so the core
never imports a built-in plugin by name) and from modules or ``.py`` files that a recipe lists
under ``plugins``. Loading is lazy and idempotent: a module is registered once, whichever way it
arrives. An installed plugin that fails to import, implements a hook that does not exist, or fails
to register (an exception inside ``register_*``, a duplicate name) is reported with its name and
distribution and skipped; ``X2CT_STRICT_PLUGINS=1`` turns that into an error and
``X2CT_LOAD_PLUGINS=a,b`` loads only the named entry points (an empty value loads none). A plugin
the user names (a recipe's ``plugins``, ``register_object``) fails loudly instead.

The core's own optimizers, learning-rate schedules and metric protocols are plugins too
(``CORE_PLUGINS``), registered before the entry points and not filtered by ``X2CT_LOAD_PLUGINS``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from x2ct_framework import hookspecs
from x2ct_framework.errors import PluginError, X2CTError, did_you_mean
from x2ct_framework.importguard import bounded_import
from x2ct_framework.registry import Registry

ENTRY_POINT_GROUP = "x2ct_framework"
KINDS = {"model": "register_models", "loss": "register_losses", "dataset": "register_datasets",
         "metric": "register_metrics", "protocol": "register_protocols", "optimizer": "register_optimizers",
         "schedule": "register_schedules", "tracker": "register_trackers",
         "evaluator": "register_evaluators", "segmenter": "register_segmenters"}
PLURALS = {"model": "models", "loss": "losses", "dataset": "datasets", "metric": "metrics", "protocol": "protocols",
           "optimizer": "optimizers", "schedule": "schedules", "tracker": "trackers",
           "evaluator": "evaluators", "segmenter": "segmenters"}
# Core modules that register built-in components through the same hooks (plugin name -> module).
CORE_PLUGINS = {"optim": "x2ct_framework.config.optim", "protocols": "x2ct_framework.evaluation.protocols",
                "evaluators": "x2ct_framework.evaluation.clinical"}
CORE_DISTRIBUTION = "x2ct-framework"
# Accelerate's tracker names -> the package each one needs (no plugin may register a tracker of these names)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def plugin_file(spec: str, base_dir: str | Path | None = None) -> Path | None:
    """The absolute path a recipe's ``plugins`` entry names (relative to ``base_dir``), or ``None``
    when the entry is a dotted module name."""
    if not (spec.endswith(".py") or os.sep in spec or "/" in spec):
        return None
    path = Path(spec)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path.resolve()


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and was skipped, or looks like a plugin but registers nothing."""


def _strict() -> bool:
    return os.environ.get("X2CT_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def hook_names() -> list[str]:
    """Every hook of x2ct_framework, by name."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker))


class PluginManager:
    """A pluggy manager plus one registry per component kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.installed: set[str] = set()  # plugins found through entry points (skipped, not fatal, on failure)
        self.tolerant = False  # True: a failing plugin the user named is reported and skipped too (x2ct plugins)
        self._entry_points_loaded = False
        self._core_loaded = False
        self._registries: dict[str, Registry] | None = None
        # Run folders are data: the plugins their recipe.toml names are imported only when the user named
        # them too (their own recipe, --plugins: keys are resolved file paths or module names), when they
        # are modules of installed distributions, or when the user passed --trust-run-plugins.
        self.user_plugins: set[str] = set()
        self.trust_run_plugins = False

    @property
    def hook(self):
        """``pm.hook.<name>(**kwargs)``; an exception inside a plugin's hook becomes a PluginError naming it."""
        return _NamedHooks(self)

    # ---- loading -----------------------------------------------------------------------------
    def load_core(self) -> None:
        """The core plugins (optimizers, schedules, protocols): always there, even in an isolated manager."""
        if self._core_loaded:
            return
        self._core_loaded = True
        for name, module_name in CORE_PLUGINS.items():
            if not self.pm.has_plugin(name):
                self._register(importlib.import_module(module_name), name, CORE_DISTRIBUTION)

    def load_entry_points(self) -> None:
        self.load_core()
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        only = os.environ.get("X2CT_LOAD_PLUGINS")
        allowed = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allowed is not None and ep.name not in allowed:
                continue
            if self.pm.has_plugin(ep.name) or ep.name in self.failed:
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            try:
                module = bounded_import(f"plugin {ep.name!r} ({dist})", ep.load)
            except Exception as exc:  # a broken plugin must not break every command
                self._failed(ep.name, dist, exc)
                continue
            if self.pm.is_registered(module):  # a recipe named the same module first: keep one registration
                known = self.pm.get_name(module)
                if self.distributions.get(known) in ("not installed", "?"):
                    self.distributions[known] = dist
                continue
            self.installed.add(ep.name)
            try:
                self._register(module, ep.name, dist)
            except PluginError as exc:
                self.installed.discard(ep.name)
                self._failed(ep.name, dist, exc, verb="register")

    def load_module(self, spec: str, base_dir: str | Path | None = None) -> str:
        """Load a plugin named in a recipe: a dotted module name or a path to a ``.py`` file.

        A module that is already registered (an installed plugin's entry point names it, or another
        recipe loaded it) is not registered again; its existing name is returned.
        """
        self.load_entry_points()
        path = plugin_file(spec, base_dir)
        if path is not None:
            name = f"x2ct_local_plugin_{path.stem}"
            if self.pm.has_plugin(str(path)):
                return str(path)
            for known, plugin in self.pm.list_name_plugin():
                file = getattr(plugin, "__file__", None)
                if file and Path(file).resolve() == path:
                    return known
            if not path.is_file():
                raise PluginError(f"plugin file {spec!r} not found (looked at {path})")
            try:
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                bounded_import(f"plugin file {path}", lambda: mod_spec.loader.exec_module(module))
            except PluginError:
                sys.modules.pop(name, None)
                raise
            except Exception as exc:
                sys.modules.pop(name, None)
                raise PluginError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
            self._register(module, str(path), "local file")
            return str(path)
        if self.pm.has_plugin(spec):
            return spec
        try:
            module = bounded_import(f"plugin module {spec!r}", lambda: importlib.import_module(spec))
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin module {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
        if self.pm.is_registered(module):
            return self.pm.get_name(module)
        self._register(module, spec, _distribution_of(module))
        return spec

    def load_user_plugins(self, specs: list[str] | tuple[str, ...], base_dir: str | Path | None = None) -> None:
        """Load plugins the user names on the command line (``--plugins``), relative to ``base_dir``."""
        for spec in specs:
            self.load_module(spec, base_dir)
            self.user_plugins.add(plugin_key(spec, base_dir))

    def allows_run_plugin(self, spec: str, base_dir: str | Path, run_dir: str | Path) -> bool | None:
        """Whether a plugin named by a run folder's recipe may be imported: True (import it), None (the user
        named a file of the same name, which is loaded already: skip this one); raises PluginError otherwise."""
        key = plugin_key(spec, base_dir)
        if self.trust_run_plugins or key in self.user_plugins:
            return True
        path = plugin_file(spec, base_dir)
        if path is not None:
            if any(Path(k).name == path.name for k in self.user_plugins if k.endswith(".py")):
                return None
            what = (f"the file {path}" + (", inside the run folder" if _inside(path, run_dir) else "")
                    + ", which is not an installed distribution")
        elif _installed_module(spec, run_dir):
            return True
        else:
            what = f"the module {spec!r}, which is not part of an installed distribution"
        raise PluginError(
            f"{Path(run_dir) / 'recipe.toml'} names the plugin {spec!r} ({what}). A run folder is data, not "
            f"code: the plugins its recipe names are not imported. If you trust it, name it yourself with "
            f"--plugins {path if path is not None else spec} (or install it as a package), or pass "
            f"--trust-run-plugins to import every plugin the run folder names.")

    def register_object(self, obj: Any, name: str, distribution: str = "in-process") -> None:
        """Register an already-imported plugin object (tests and notebooks)."""
        self._register(obj, name, distribution)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.distributions.pop(name, None)
        self.installed.discard(name)
        self._registries = None

    def _register(self, module: Any, name: str, dist: str) -> None:
        try:
            self.pm.register(module, name=name)
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({dist}) could not be registered: {exc}") from exc
        unknown = [c.name for c in self.pm.get_hookcallers(module) or []
                   if c.spec is None and any(i.plugin is module and not i.optionalhook for i in c.get_hookimpls())]
        if unknown:
            self.pm.unregister(module)
            known = hook_names()
            hook = unknown[0]
            raise PluginError(f"plugin {name!r} ({dist}) implements {hook!r}, which is not a hook of "
                              f"{hookspecs.PROJECT_NAME}{did_you_mean(hook, known)} (hooks: {', '.join(known)}); "
                              f"rename the function")
        self.distributions[name] = dist
        self._registries = None
        unmarked = _unmarked_hooks(module)
        if unmarked:
            warnings.warn(f"plugin {name!r} ({dist}) defines {', '.join(f'{f}()' for f in unmarked)} without the "
                          f"@hookimpl marker, so it is never called; decorate it with "
                          f"@x2ct_framework.hookspecs.hookimpl", PluginLoadWarning, stacklevel=3)

    def _failed(self, name: str, dist: str, exc: BaseException, verb: str = "load") -> None:
        detail = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        msg = f"plugin {name!r} from {dist} failed to {verb} and was skipped: {detail}"
        if _strict():
            raise PluginError(msg + " (X2CT_STRICT_PLUGINS is set)") from exc
        self.failed[name] = msg
        warnings.warn(msg, PluginLoadWarning, stacklevel=3)

    def find_plugin(self, name: str) -> tuple[str, Any] | None:
        """The plugin a recipe calls ``name``: its registered name, a recipe file's stem or a module's last part."""
        self.load_entry_points()
        pairs = self.pm.list_name_plugin()
        for known, plugin in pairs:
            if known == name:
                return known, plugin
        for known, plugin in pairs:
            if Path(known).stem == name or known.rsplit(".", 1)[-1] == name:
                return known, plugin
        return None

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements."""
        plugin = self.pm.get_plugin(name)
        return sorted(c.name for c in self.pm.get_hookcallers(plugin) or []) if plugin is not None else []

    # ---- registries --------------------------------------------------------------------------
    def registries(self) -> dict[str, Registry]:
        """The registries, rebuilt from the hooks whenever the set of plugins changed.

        Each plugin's registrations are collected first and added all together: a plugin that raises
        inside a registration hook or registers a name another plugin has is left out entirely (an
        installed one is reported and skipped, one the user named is an error).
        """
        self.load_entry_points()
        if self._registries is not None:
            return self._registries
        regs = {kind: Registry(kind, reserved=_reserved(kind), failed=self.failed) for kind in KINDS}
        collected: dict[str, list[tuple[str, str, Any]]] = {}
        broken: dict[str, PluginError] = {}
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            # pluggy calls implementations last-registered first, tryfirst before trylast.
            for impl in reversed(caller.get_hookimpls()):
                plugin = impl.plugin_name
                got = collected.setdefault(plugin, [])
                if plugin in broken:
                    continue
                try:
                    impl.function(register=lambda name, factory, _k=kind, _got=got: _got.append((_k, name, factory)))
                except Exception as exc:
                    dist = self.distributions.get(plugin, "?")
                    broken[plugin] = PluginError(f"plugin {plugin!r} ({dist}) raised inside {hook_name}: "
                                                 f"{type(exc).__name__}: {exc}")
                    broken[plugin].__cause__ = exc
        order = {name: i for i, (name, _) in enumerate(self.pm.list_name_plugin())}
        # The framework's own plugins first, then other installed ones, then the ones the user named, each in
        # registration order: of two plugins registering one name, the later one is blamed and left out.
        def rank(plugin: str) -> tuple[int, int]:
            own = self.distributions.get(plugin) == CORE_DISTRIBUTION
            group = 0 if own else 1 if plugin in self.installed else 2
            return group, order.get(plugin, 0)

        for plugin, items in sorted(collected.items(), key=lambda kv: rank(kv[0])):
            dist = self.distributions.get(plugin, "?")
            error = broken.get(plugin)
            if error is None:
                trial = {kind: reg.copy() for kind, reg in regs.items()}
                try:
                    for kind, name, factory in items:
                        trial[kind].register(name, factory, plugin=plugin, distribution=dist)
                except PluginError as exc:
                    error = exc
                else:
                    regs = trial
                    continue
            self._registration_failed(plugin, dist, error)
        self._registries = regs
        return regs

    def _registration_failed(self, plugin: str, dist: str, error: PluginError) -> None:
        if plugin not in self.installed and not self.tolerant:
            raise error
        if _strict():
            raise PluginError(f"{error} (X2CT_STRICT_PLUGINS is set)") from error
        msg = f"plugin {plugin!r} from {dist} failed to register and was skipped: {error}"
        self.failed[plugin] = msg
        if self.pm.has_plugin(plugin):  # its lifecycle hooks are skipped too
            self.pm.unregister(name=plugin)
        warnings.warn(msg, PluginLoadWarning, stacklevel=4)

    def registry(self, kind: str) -> Registry:
        return self.registries()[kind]


def _reserved(kind: str) -> dict[str, str]:
    """Names a plugin may not register: accelerate's built-in trackers, which a recipe names directly."""
    if kind != "tracker":
        return {}
    return dict.fromkeys(TRACKER_PACKAGES, "accelerate's built-in tracker")


def _unmarked_hooks(plugin: Any) -> list[str]:
    """Functions of a plugin module or class named like a hook but lacking the hookimpl marker."""
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    names = hook_names()
    out = []
    for attr in names:
        fn = getattr(plugin, attr, None)
        if callable(fn) and not hasattr(fn, marker):
            out.append(attr)
    if isinstance(plugin, ModuleType):
        for attr, fn in vars(plugin).items():
            if (attr.startswith(("register_", "on_")) and attr not in names and inspect.isfunction(fn)
                    and fn.__module__ == plugin.__name__ and not hasattr(fn, marker)):
                out.append(attr)
    return out


class _NamedHooks:
    """pluggy's hook relay with the culprit named: a plugin raising inside a lifecycle hook stops the run
    with ``plugin 'name' (distribution) raised inside on_epoch_end: ...`` rather than a bare traceback."""

    def __init__(self, manager: PluginManager):
        self._manager = manager

    def __getattr__(self, hook_name: str):
        caller = getattr(self._manager.pm.hook, hook_name)

        def call(**kwargs):
            try:
                return caller(**kwargs)
            except X2CTError:
                raise
            except Exception as exc:
                codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
                tb, plugin = exc.__traceback__, None
                while tb is not None and plugin is None:
                    plugin = codes.get(tb.tb_frame.f_code)
                    tb = tb.tb_next
                if plugin is None:
                    raise
                dist = self._manager.distributions.get(plugin, "?")
                raise PluginError(f"plugin {plugin!r} ({dist}) raised inside {hook_name}: "
                                  f"{type(exc).__name__}: {exc}") from exc

        return call


def plugin_key(spec: str, base_dir: str | Path | None = None) -> str:
    """How a plugin entry is remembered: its resolved file path, or its module name."""
    path = plugin_file(spec, base_dir)
    return str(path) if path is not None else spec


def _inside(path: Path, folder: str | Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def _installed_module(spec: str, run_dir: str | Path) -> bool:
    """A dotted module name whose top-level package belongs to an installed distribution (and is not a
    folder inside the run folder)."""
    top = spec.split(".")[0]
    if not top.isidentifier() or top not in importlib.metadata.packages_distributions():
        return False
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    locations = list(getattr(found, "submodule_search_locations", None) or [])
    origin = getattr(found, "origin", None) or (locations[0] if locations else None)
    if origin is None:
        return False
    return not _inside(Path(origin), run_dir)


def _distribution_of(module: ModuleType) -> str:
    top = module.__name__.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    return dists[0] if dists else "not installed"


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (created and loaded on first use)."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def manager_created() -> bool:
    """Whether this process created its plugin manager already (plugins may have been registered in-process)."""
    return _MANAGER is not None


def reset_plugin_manager() -> None:
    """Forget every loaded plugin (tests)."""
    global _MANAGER
    _MANAGER = None


def add_trust_arguments(parser) -> None:
    """``--plugins`` and ``--trust-run-plugins`` for commands that read run folders."""
    parser.add_argument("--plugins", nargs="+", default=[], metavar="MODULE_OR_FILE",
                        help="plugin modules or .py files to load (relative to the working directory); also "
                             "allows a run folder's recipe to name them")
    parser.add_argument("--trust-run-plugins", action="store_true",
                        help="import the plugins a run folder's recipe.toml names (a run folder is data: "
                             "by default they are not imported)")


def apply_trust_arguments(args) -> None:
    """Apply ``--plugins`` / ``--trust-run-plugins`` to the process-wide plugin manager."""
    pm = get_plugin_manager()
    pm.trust_run_plugins = bool(getattr(args, "trust_run_plugins", False))
    pm.load_user_plugins(list(getattr(args, "plugins", None) or []), Path.cwd())


def registry(kind: str) -> Registry:
    return get_plugin_manager().registry(kind)


def failed_note() -> str:
    """What every "unknown <kind>" error adds when installed plugins failed to load (the name may be theirs)."""
    if _MANAGER is None or not _MANAGER.failed:
        return ""
    return "; note: " + "; ".join(_MANAGER.failed.values())


OPTIONS_DECLARATION = "x2ct_options"


def declared_options(plugin: Any) -> dict[str, Any] | None:
    """The options a plugin declares with ``def x2ct_options(name: type = default, ...)`` and their defaults
    (``None`` when it declares none)."""
    declare = getattr(plugin, OPTIONS_DECLARATION, None)
    if not callable(declare):
        return None
    out = {}
    for p in inspect.signature(declare).parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is p.empty else p.default
        out[p.name] = list(default) if isinstance(default, tuple) else default
    return out


def plugin_options(recipe: Any, name: str) -> dict[str, Any]:
    """A hook plugin's options: the recipe's ``[plugin_options.<name>]`` table (checked and completed with the
    defaults when the recipe was loaded), else the defaults the plugin declares."""
    try:
        tables = recipe["plugin_options"]
    except (KeyError, TypeError):
        tables = {}
    table = tables.get(name)
    if table is not None:
        return dict(table)
    found = get_plugin_manager().find_plugin(name)
    declared = declared_options(found[1]) if found is not None else None
    return dict(declared or {})


def create_component(kind: str, name: str, options: dict | None = None, *, where: str = "",
                     context: dict | None = None) -> Any:
    """Build the registered component ``name`` of ``kind`` (model, loss, dataset, metric, ...) with ``options``
    checked as a recipe's are, offering ``context`` values (``resolution``, ``views``, ...) to a factory that
    declares them. For plugins that wrap another component (``prior_only`` wraps any model)."""
    return get_plugin_manager().registry(kind).create(name, dict(options or {}), where=where or kind,
                                                       context=context)

"""The plugin kit: protocols, optimizers and schedules from plugins, and plugin loading that fails clearly."""

from __future__ import annotations

import csv
import math
import textwrap
import warnings

import pytest
import torch

from test_evaluate import make_run
from test_plugins import make_distribution
from x2ct_framework.cli import format_count, main as x2ct_main
from x2ct_framework.config.optim import Schedule, build_schedule, make_optimizer
from x2ct_framework.errors import PluginError, RecipeError
from x2ct_framework.plugins import PluginLoadWarning, get_plugin_manager
from x2ct_framework.testing import check_model

MYLAB = """
    import torch
    from x2ct_framework.hookspecs import hookimpl


    class Mae01:
        higher_is_better = False
        unit = ""

        def __call__(self, pred, target, batch):
            return (pred.float() - target.float()).abs().flatten(1).mean(1)


    def mylab(hu_window, scale: float = 1.0):
        # a plain dict of metrics becomes a protocol named after its registration
        return {"mae01": Mae01(), "mae_hu": lambda p, t, b: Mae01()(p, t, b) * (hu_window[1] - hu_window[0]) * scale}


    class Flat(torch.nn.Module):
        # a tiny model for fast tests: every voxel is a learned multiple of the views mean intensity

        def __init__(self, resolution):
            super().__init__()
            self.r = resolution
            self.w = torch.nn.Parameter(torch.tensor([0.5]))

        def forward(self, xrays, geometry, prev=None):
            v = xrays.float().mean(dim=(2, 3, 4))  # [B, V]
            return (self.w * v.mean(1))[:, None, None, None, None].expand(-1, 1, self.r, self.r, self.r)


    @hookimpl
    def register_protocols(register):
        register("mylab", mylab)


    @hookimpl
    def register_models(register):
        register("kit_flat", Flat)
"""


def _plugin(tmp_path, name="mylab_protocol.py", source=MYLAB):
    (tmp_path / name).write_text(textwrap.dedent(source))
    return name


# ---- protocols --------------------------------------------------------------------------------------
def test_a_plugin_protocol_reaches_the_recipe_evaluate_per_case_csv_and_the_report(tmp_path, capsys):
    from x2ct_framework.config.build import stages
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.evaluation.report import final_evaluation

    plugin = _plugin(tmp_path)
    run = make_run(tmp_path, num_test=2, model='name = "kit_flat"',
                   **{"seed = 0": f'seed = 0\nplugins = ["{(tmp_path / plugin).as_posix()}"]'},
                   extra='\n[eval]\nprotocols = ["default", "mylab"]\nbootstrap = 0\nworst_cases = 0\ngallery = 0\n'
                         'lpips = "off"\nmax_cases = 1\n')
    assert x2ct_main(["evaluate", str(run), "--protocol", "default", "mylab", "--bootstrap", "0", "--worst", "0",
                      "--lpips", "off", "--no-progress"]) == 0
    assert "`mylab/mae01`" in capsys.readouterr().out
    with (run / "eval" / "stage1-test" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:  # the plugin's MAE on [0, 1] times the window width is the default protocol's MAE in HU
        assert float(r["mylab/mae_hu"]) == pytest.approx(float(r["default/mae_hu"]), rel=1e-5)
        assert float(r["mylab/mae01"]) * 4000.0 == pytest.approx(float(r["default/mae_hu"]), rel=1e-5)
    recipe = load_recipe(run / "recipe.toml")
    lines = final_evaluation(run, recipe, stages(recipe)[0], tmp_path / "pics", torch.device("cpu"))
    assert "### Protocol `mylab`" in lines and any("`mylab/mae01`" in line for line in lines)


def test_an_unknown_protocol_in_a_recipe_lists_the_plugin_ones(tmp_path):
    from x2ct_framework.config.recipe import load_recipe
    from conftest import TINY_RECIPE

    plugin = _plugin(tmp_path)
    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.format(out=tmp_path.as_posix()).replace("seed = 0", f'seed = 0\nplugins = ["{plugin}"]')
                    + '\n[eval]\nprotocols = ["mylb"]\n')
    with pytest.raises(RecipeError, match=r"eval -> protocols: unknown protocol\(s\) 'mylb'; did you mean \"mylab\"\?"
                                          r".*default, x2ctgan, sparc, c2rv, mylab"):
        load_recipe(path)


def test_a_protocol_factory_returning_something_else_is_named():
    from x2ct_framework.evaluation.protocols import build_protocol
    from x2ct_framework.testing import registered_component

    with registered_component("protocol", "broken", lambda hu_window: 42):
        with pytest.raises(PluginError, match="protocol 'broken' .* returned int, expected a Protocol"):
            build_protocol("broken")


# ---- loading ----------------------------------------------------------------------------------------
HUBER = """
    import torch
    from x2ct_framework.hookspecs import hookimpl

    @hookimpl
    def register_losses(register):
        register("kit_huber", lambda delta=0.1: (lambda p, t, b: torch.nn.functional.huber_loss(p, t, delta=delta)))
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """An installed distribution with a good plugin, one raising inside register_losses and one colliding."""
    import importlib

    raising = "from x2ct_framework.hookspecs import hookimpl\n@hookimpl\ndef register_losses(register):\n" \
              "    raise RuntimeError('boom')\n"
    colliding = "from x2ct_framework.hookspecs import hookimpl\n@hookimpl\ndef register_losses(register):\n" \
                "    register('l1', lambda: None)\n"
    make_distribution(tmp_path, "x2ct-kit", {"kit_huber": HUBER, "kit_raising": raising, "kit_colliding": colliding},
                      {"kit_huber": "kit_huber", "kit_raising": "kit_raising", "kit_colliding": "kit_colliding"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_a_recipe_module_that_is_also_installed_loads_once(installed):
    pm = get_plugin_manager()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        assert pm.load_module("kit_huber") == "kit_huber"  # the entry point's name, not a second registration
        assert pm.load_module("kit_huber") == "kit_huber"
        entry = pm.registry("loss").get("kit_huber")
    assert (entry.plugin, entry.distribution) == ("kit_huber", "x2ct-kit")


def test_failed_registrations_are_reported_like_failed_imports(installed, capsys, monkeypatch):
    with pytest.warns(PluginLoadWarning) as caught:
        reg = get_plugin_manager().registry("loss")
    assert "kit_huber" in reg and "l1" in reg and reg.get("l1").plugin == "l1"  # the rest still loads
    text = "\n".join(str(w.message) for w in caught)
    assert "'kit_raising' from x2ct-kit failed to register and was skipped" in text and "RuntimeError: boom" in text
    assert "'kit_colliding' from x2ct-kit failed to register" in text and "duplicate loss name 'l1'" in text
    from x2ct_framework.plugins import reset_plugin_manager

    reset_plugin_manager()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        assert x2ct_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "losses:" in out and "losss" not in out and "kit_huber" in out
    assert "failed: plugin 'kit_raising'" in out and "failed: plugin 'kit_colliding'" in out
    reset_plugin_manager()
    monkeypatch.setenv("X2CT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="kit_colliding.*X2CT_STRICT_PLUGINS|duplicate loss name 'l1'.*X2CT_STRICT"):
        get_plugin_manager().registries()


def test_a_misspelt_hook_is_an_error_naming_the_plugin_and_the_closest_hook(tmp_path):
    _plugin(tmp_path, "typo.py", "from x2ct_framework.hookspecs import hookimpl\n@hookimpl\n"
                                 "def on_epoch_ended(trainer, stage, epoch, metrics):\n    pass\n")
    with pytest.raises(PluginError, match=r"typo.py.*implements 'on_epoch_ended', which is not a hook of "
                                          r"x2ct_framework; did you mean \"on_epoch_end\"\?"):
        get_plugin_manager().load_module("typo.py", tmp_path)


def test_a_hook_without_its_marker_warns(tmp_path):
    _plugin(tmp_path, "nomark.py", "def register_losses(register):\n    register('x', lambda: None)\n")
    with pytest.warns(PluginLoadWarning, match=r"nomark.py.*defines register_losses\(\) without the @hookimpl marker"):
        get_plugin_manager().load_module("nomark.py", tmp_path)
    assert "x" not in get_plugin_manager().registry("loss")


def test_hook_only_plugins_are_listed_with_their_hooks(tmp_path, capsys):
    from conftest import TINY_RECIPE

    _plugin(tmp_path, "notify.py", "from x2ct_framework.hookspecs import hookimpl\n@hookimpl\n"
                                   "def on_stage_end(trainer, stage, metrics):\n    pass\n")
    recipe = tmp_path / "r.toml"
    text = TINY_RECIPE.format(out=tmp_path.as_posix())
    recipe.write_text(text.replace("seed = 0", 'seed = 0\nplugins = ["notify.py"]'))
    assert x2ct_main(["plugins", "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out.split("hooks:")[1]
    assert "report" in out and "on_run_end" in out
    assert "notify.py" in out and "on_stage_end (local file)" in out


def test_version_and_parameter_counts(capsys):
    with pytest.raises(SystemExit) as exit_:
        x2ct_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("x2ct-framework 0.")
    assert [format_count(n) for n in (812, 12_345, 4_560_000, 1_200_000_000)] == ["812", "12.3 k", "4.56 M", "1.2 G"]


# ---- optimizers and schedules -----------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    # total 11 updates, lr 1.0, min_lr 0.1, warm-up 2: steps 0..1 rise, then the schedule
    ("cosine", lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 8))),
    ("constant", lambda s: 1.0),
    ("linear", lambda s: 1.0 - 0.9 * (s - 2) / 8),
    ({"name": "step", "every": 3, "gamma": 0.5}, lambda s: max(0.1, 0.5 ** ((s - 2) // 3))),
    ({"name": "linear_decay", "constant_steps": 6}, lambda s: 1.0 if s < 6 else 1.0 - (s - 6) / 4),
    ({"name": "linear_decay", "constant_fraction": 0.5}, lambda s: 1.0 if s < 6 else 1.0 - (s - 6) / 4),
])
def test_built_in_schedules_with_warm_up(spec, expected):
    fn = build_schedule(spec, total=11, lr=1.0, min_lr=0.1, warmup=2)
    assert [fn(s) for s in (0, 1)] == pytest.approx([0.5, 1.0])
    assert [fn(s) for s in range(2, 11)] == pytest.approx([expected(s) for s in range(2, 11)])
    sched = Schedule(11, 1.0, 0.1, 2, spec)
    assert all(isinstance(v, (int, float, str, dict)) for v in vars(sched).values())  # storable in a checkpoint


def test_schedule_and_optimizer_plugins():
    from x2ct_framework.testing import registered_component

    def halving(total, lr, min_lr, warmup, every: int = 2):
        return lambda s: lr / 2 ** (s // every)

    def plain_sgd(params, lr, weight_decay, nesterov: bool = False):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if nesterov else 0.0, nesterov=nesterov,
                               weight_decay=weight_decay)

    with registered_component("schedule", "halving", halving), registered_component("optimizer", "plain", plain_sgd):
        halves = build_schedule({"name": "halving", "every": 1}, 4, 0.8, 0.0)
        assert [halves(s) for s in range(4)] == [0.8, 0.4, 0.2, 0.1]
        with pytest.raises(RecipeError, match=r"sched -> evry: unknown option for schedule 'halving'"):
            build_schedule({"name": "halving", "evry": 1}, 4, 0.8, 0.0, where="sched")
        opt = make_optimizer("plain", [torch.nn.Parameter(torch.zeros(2))], 0.1, 0.0, {"nesterov": True})
        assert opt.param_groups[0]["nesterov"] is True
        with pytest.raises(RecipeError, match=r"optimizer_options -> momentm: unknown option for optimizer 'plain'"):
            make_optimizer("plain", [torch.nn.Parameter(torch.zeros(2))], 0.1, 0.0, {"momentm": 1})
    with pytest.raises(RecipeError, match=r'unknown optimizer .adamww.; did you mean "adamw"'):
        make_optimizer("adamww", [torch.nn.Parameter(torch.zeros(2))], 0.1, 0.0, {})


def test_a_recipe_checks_the_schedule_table(tmp_path):
    from conftest import TINY_RECIPE
    from x2ct_framework.config.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.format(out=tmp_path.as_posix()))
    recipe = load_recipe(path, ['stages.1.scheduler={ name = "step", every = 5, gamma = 0.5 }'])
    assert recipe["stages"][0]["scheduler"] == {"name": "step", "every": 5, "gamma": 0.5}
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ['stages.1.scheduler="cosin"', 'stages.1.optimizer="sgdd"'])
    msg = str(err.value)
    assert 'stages -> 1 -> scheduler: unknown schedule \'cosin\'; did you mean "cosine"' in msg
    assert 'stages -> 1 -> optimizer: unknown optimizer; did you mean "sgd"' in msg
    with pytest.raises(RecipeError, match=r"scheduler: .*gamma must be in \(0, 1\]"):
        load_recipe(path, ['stages.1.scheduler={ name = "step", gamma = 2.0 }'])


# ---- check_model: four real mistakes ----------------------------------------------------------------
class ViewMixer(torch.nn.Module):
    """A small model that uses every view, the geometry and prev; ``mistake`` breaks one of them."""

    uses_prev = True

    def __init__(self, resolution=8, mistake=""):
        super().__init__()
        self.r, self.mistake = resolution, mistake
        self.mix = torch.nn.Linear(2, 1)

    def forward(self, xrays, geometry, prev=None):
        from x2ct_framework.physics import make_geometry

        b, v = xrays.shape[:2]
        x = xrays.detach() if self.mistake == "detached" else xrays
        if self.mistake == "drops_view":
            x = x[:, :2]
        if self.mistake == "fixed_geometry":
            geometry = {k: t[None].expand(b, *t.shape) for k, t in make_geometry([0.0, 90.0, 45.0]).items()}
        angles = torch.deg2rad(geometry["angles"].float())  # [B, V]
        weights = torch.cos(angles[:, : x.shape[1]])[:, :, None, None, None] + 1.5
        feats = torch.stack([(x * weights).mean(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4))], dim=1)
        vol = self.mix(feats)[:, :, None, None, None].expand(b, 1, self.r, self.r, self.r)
        if prev is not None and self.mistake != "ignores_prev":
            vol = vol + torch.nn.functional.interpolate(prev, size=(self.r,) * 3, mode="trilinear")
        if self.mistake == "mixes_the_batch":
            vol = vol - vol.mean(dim=0, keepdim=True)  # statistics across the cases of a batch
        return vol


VIEWS3 = (0.0, 90.0, 45.0)


def test_check_model_passes_a_model_that_uses_everything():
    passed = check_model(ViewMixer(), resolution=8, views=VIEWS3, autocast_dtypes=())
    assert {"gradient reaches the X-rays", "the output depends on every view", "the output depends on the geometry",
            "the output depends on prev"} <= set(passed)


@pytest.mark.parametrize("mistake, message", [
    ("detached", "gradient reaches the X-rays: the loss has no gradient w.r.t. the input X-rays"),
    ("drops_view", "the output depends on every view: changing view(s) [2] of 3 (angles [0.0, 90.0, 45.0]) leaves"),
    ("ignores_prev", "the output depends on prev: the model declares uses_prev = True but two different prev"),
    ("fixed_geometry", "the output depends on the geometry: the views' angles moved by 37 degrees and the output is "
                       "unchanged"),
    ("mixes_the_batch", "each case's output is independent of the other cases: a case's output in a batch of 2 "
                        "differs from its output alone"),
])
def test_check_model_catches_four_real_mistakes(mistake, message):
    from x2ct_framework.testing import ContractError

    with pytest.raises(ContractError) as err:
        check_model(ViewMixer(mistake=mistake), resolution=8, views=VIEWS3, autocast_dtypes=())
    assert message in str(err.value)
    assert len(err.value.failures) == 1, err.value.failures  # only the mistake, nothing else


# ---- hooks without training -------------------------------------------------------------------------
def test_run_hooks_drives_a_hook_plugin_in_the_trainer_order(tmp_path):
    from x2ct_framework.hookspecs import hookimpl
    from x2ct_framework.testing import FakeTrainer, make_stage, registered, run_hooks

    seen = []

    class Recorder:
        @staticmethod
        @hookimpl
        def on_epoch_end(trainer, stage, epoch, metrics):
            seen.append((stage.name, epoch, metrics["val/psnr"]))

        @staticmethod
        @hookimpl
        def on_run_end(trainer, results):
            (trainer.run_dir / "done.txt").write_text(",".join(results))

    with registered(Recorder, "recorder"):
        trainer = run_hooks(FakeTrainer(run_dir=tmp_path), stages=[make_stage(8), make_stage(16, "stage2", 2)],
                            epochs=2)
    assert seen == [("stage1", 0, 20.0), ("stage1", 1, 21.0), ("stage2", 0, 20.0), ("stage2", 1, 21.0)]
    assert (tmp_path / "done.txt").read_text() == "stage1,stage2"
    names = [h for h, _ in trainer.calls]
    assert names[0] == "on_stage_start" and names[-1] == "on_run_end" and names.count("on_stage_end") == 2
    assert names.index("on_checkpoint_saved") < names.index("on_epoch_end")


# ---- context ----------------------------------------------------------------------------------------
def test_context_reaches_every_factory_that_declares_it(tmp_path):
    from conftest import TINY_RECIPE
    from x2ct_framework.config.build import build_dataset, build_losses, build_metrics, stages
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.conventions import DEFAULT_HU_WINDOW
    from x2ct_framework.testing import registered_component

    got = {}

    def data(split, stage, resolution, hu_window, size: int = 3):
        got["data"] = (resolution, hu_window)
        return [0] * size

    class Loss(torch.nn.Module):
        def __init__(self, hu_window, seed, resolution):
            super().__init__()
            got["loss"] = (hu_window, seed, resolution)

    def metric(hu_window, seed):
        got["metric"] = (hu_window, seed)
        return lambda p, t, b: (p - t).abs().flatten(1).mean(1)

    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.format(out=tmp_path.as_posix()).replace("seed = 0", "seed = 7"))
    with registered_component("dataset", "ctx_data", data), registered_component("loss", "ctx_loss", Loss), \
            registered_component("metric", "ctx_metric", metric):
        recipe = load_recipe(path, ['data={name="ctx_data"}', "stages.1.losses={ctx_loss=1.0}",
                                    'eval.metrics=["ctx_metric"]', 'stages.1.select_best="val/ctx_metric"'])
        stage = stages(recipe)[0]
        assert len(build_dataset(recipe, stage, "train")) == 3
        build_losses(recipe, stage)
        build_metrics(recipe)
    assert got["data"] == (16, list(DEFAULT_HU_WINDOW))  # the default window when [data] omits it
    assert got["loss"] == (list(DEFAULT_HU_WINDOW), 7, 16)
    assert got["metric"] == (list(DEFAULT_HU_WINDOW), 7)


# ---- tracker options --------------------------------------------------------------------------------
def test_tracker_options_reach_the_tracker(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from conftest import TINY_RECIPE
    from x2ct_framework.config.build import tracker_init_kwargs
    from x2ct_framework.config.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.format(out=tmp_path.as_posix()))
    recipe = load_recipe(path, ["train.trackers=['tensorboard']", "train.tracker_options.tensorboard={flush_secs=7}"])
    kwargs = tracker_init_kwargs(recipe)
    assert kwargs == {"tensorboard": {"flush_secs": 7}}
    config = ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs"))
    acc = Accelerator(cpu=True, log_with=["tensorboard"], project_config=config)
    acc.init_trackers("tiny", init_kwargs=kwargs)
    assert acc.get_tracker("tensorboard", unwrap=True).flush_secs == 7  # what the trainer's init_trackers passes
    acc.end_training()
    with pytest.raises(RecipeError, match=r"train -> tracker_options -> wandb: 'wandb' is not one of train.trackers"):
        load_recipe(path, ["train.trackers=['tensorboard']", "train.tracker_options.wandb={entity='lab'}"])


# ---- tracker plugins --------------------------------------------------------------------------------
RECORDER = """
    from accelerate.tracking import GeneralTracker
    from x2ct_framework.hookspecs import hookimpl


    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False
        rows = []

        def __init__(self, run_name, tags: list = (), fail: bool = False):
            super().__init__()
            self.run_name, self.tags, self.fail = run_name, list(tags), fail

        @property
        def tracker(self):
            return self.rows

        def log(self, values, step=None, **kwargs):
            if self.fail:
                raise ConnectionError("server went away")
            self.rows.append((step, dict(values)))


    @hookimpl
    def register_trackers(register):
        register("recorder", Recorder)
"""


def _tracker_recipe(tmp_path, trackers, options="", checks=True):
    """The tiny recipe with these trackers; ``checks=False``: the schema only (as a recipe built by hand)."""
    from conftest import TINY_RECIPE
    from x2ct_framework.config.build import load_recipe_plugins
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.config.schema import validate_recipe

    plugin = _plugin(tmp_path, "recorder_tracker.py", RECORDER)
    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.format(out=tmp_path.as_posix()).replace("seed = 0", f'seed = 0\nplugins = ["{plugin}"]')
                    .replace("[train]", f"[train]\ntrackers = {trackers}\n{options}"))
    if checks:
        return load_recipe(path)
    recipe = load_recipe(path, validate=False)
    load_recipe_plugins(recipe)
    return validate_recipe(recipe)


def test_a_plugin_tracker_is_built_with_its_options_and_context_and_listed(tmp_path, capsys):
    from x2ct_framework.config.build import build_trackers, builtin_tracker_names, tracker_init_kwargs
    from x2ct_framework.config.checks import check_recipe

    recipe = _tracker_recipe(tmp_path, '["recorder", "tensorboard"]',
                             'tracker_options = { recorder = { tags = ["a", "b"] }, tensorboard = { flush_secs = 5 } }')
    check_recipe(recipe)
    ((tracker, entry),) = build_trackers(recipe, tmp_path)
    assert (tracker.name, tracker.run_name, tracker.tags) == ("recorder", "tiny", ["a", "b"])
    assert entry.plugin.endswith("recorder_tracker.py")
    assert builtin_tracker_names(recipe) == ["tensorboard"]  # what Accelerator(log_with=...) gets
    assert tracker_init_kwargs(recipe) == {"tensorboard": {"flush_secs": 5}}  # the plugin's options go to its factory
    assert x2ct_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "\ntrackers:\n  recorder " in out and "recorder_tracker.py" in out


def test_plugin_tracker_mistakes_are_named(tmp_path):
    from x2ct_framework.config.build import build_trackers
    from x2ct_framework.config.checks import check_recipe
    from x2ct_framework.testing import registered_component

    with pytest.raises(RecipeError, match=r"train -> trackers -> 1: unknown tracker 'recordr'; did you mean "
                                          r"\"recorder\"\? \(built-in: aim, .*tensorboard.*; from plugins: "
                                          r"recorder; or \[\] for none\)"):
        check_recipe(_tracker_recipe(tmp_path, '["recordr"]'))  # load_recipe reports it already
    recipe = _tracker_recipe(tmp_path, '["recordr"]', checks=False)
    with pytest.raises(RecipeError, match="unknown tracker 'recordr'"):  # also when a run starts without the checks
        build_trackers(recipe, tmp_path)
    with pytest.raises(RecipeError, match=r"r.toml: train -> tracker_options -> recorder -> tag: unknown option for "
                                          r"tracker 'recorder'; did you mean \"tags\"\?"):
        check_recipe(_tracker_recipe(tmp_path, '["recorder"]', 'tracker_options = { recorder = { tag = ["a"] } }'))
    with registered_component("tracker", "bogus", lambda: {"log": print}):
        recipe = _tracker_recipe(tmp_path, '["bogus"]')
        check_recipe(recipe)
        with pytest.raises(PluginError, match=r"plugin 'test-tracker-bogus' \(registered in a test\): the factory "
                                              r"of tracker 'bogus' returned dict, not an "
                                              r"accelerate.tracking.GeneralTracker"):
            build_trackers(recipe, tmp_path)
    with registered_component("tracker", "wandb", lambda: None):
        with pytest.raises(PluginError, match="registered tracker 'wandb', a name taken by accelerate's built-in "
                                              "tracker; rename it"):
            get_plugin_manager().registry("tracker")


def test_a_plugin_tracker_failing_inside_log_names_its_plugin(tmp_path):
    from accelerate import Accelerator

    from x2ct_framework.training.trackers import Trackers

    recipe = _tracker_recipe(tmp_path, '["recorder"]', 'tracker_options = { recorder = { fail = true } }')
    trackers = Trackers(Accelerator(cpu=True))
    trackers.start(recipe, tmp_path, {"lr": 1e-3})
    with pytest.raises(PluginError, match=r"plugin '.*recorder_tracker.py' \(local file\): tracker 'recorder' "
                                          r"\(Recorder\) raised inside log: ConnectionError: server went away"):
        trackers.log({"stage1/train/loss": 0.5}, step=1)
    trackers.finish()


# ---- protocols ------------------------------------------------------------------------------------------
def test_check_protocol_passes_the_built_in_protocols_and_names_a_broken_metric():
    from x2ct_framework.api import Protocol
    from x2ct_framework.testing import ContractError, check_protocol

    passed = check_protocol("x2ctgan", resolution=16)
    assert passed[:2] == ["builds", "a Protocol with its primary metric among its metrics"]
    assert "metric 'psnr_3d': one value per case [B], independent of the batch" in passed

    def per_case(pred, target, batch):
        return (pred - target).abs().flatten(1).mean(1)

    good = Protocol("mine", ["mean absolute error on [0, 1]"], {"mae": per_case}, {"mae": "global"}, primary="mae")
    assert check_protocol(good)[0] == "a Protocol with its primary metric among its metrics"
    bad = Protocol("mine", ["..."], {"mae": per_case, "mean": lambda p, t, b: (p - t).abs().mean(),
                                     "batchwise": lambda p, t, b: per_case(p, t, b) - per_case(p, t, b).mean()},
                   {"mae": "global"}, primary="psnr")
    with pytest.raises(ContractError) as err:
        check_protocol(bad, batch_size=3)
    failures = err.value.failures
    assert len(failures) == 3, failures
    assert "primary 'psnr' is not one of its metrics (mae, mean, batchwise)" in failures[0]
    assert "metric 'mean': one value per case [B], independent of the batch: returned shape (), expected one value " \
           "per case (3,)" in failures[1]
    assert "metric 'batchwise'" in failures[2] and "differs from the batch" in failures[2]

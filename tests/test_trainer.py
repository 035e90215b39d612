"""The progressive trainer on tiny sizes: schedule, checkpoints, best, stages, safety, resume."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import get_plugin_manager, reset_plugin_manager
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.run import main as run_main
from x2ct_framework.training.sampling import EpochSampler
from x2ct_framework.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Checkpoints skip the flush to disk here (the rename is what makes them atomic for a killed process)."""
    monkeypatch.setattr(ckpt, "FSYNC", False)


TINYNET = '''
"""A small test model: per-view 2D features, spread along the depth axis, fused, 3D head."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from x2ct_framework.hookspecs import hookimpl


class TinyNet(nn.Module):
    def __init__(self, *, resolution: int, channels: int = 4, dropout: float = 0.0):
        super().__init__()
        self.resolution = resolution
        self.encoder = nn.Conv2d(1, channels, 3, padding=1)
        self.decoder = nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.GELU(),
                                     nn.Dropout3d(dropout), nn.Conv3d(channels, 1, 1))

    def forward(self, xrays, geometry, prev=None):
        r = self.resolution
        f = F.interpolate(self.encoder(rearrange(xrays, "b v c h w -> (b v) c h w")), size=(r, r), mode="bilinear")
        f = rearrange(f, "(b v) c h w -> b v c h w", b=xrays.shape[0]).mean(1)
        return self.decoder(f[:, :, :, None, :].expand(-1, -1, -1, r, -1).contiguous())


@hookimpl
def register_models(register):
    register("tinynet", TinyNet)
'''

RECIPE = """
name = "tiny"
seed = 0
output_dir = "{out}"
plugins = ["tinynet.py"]

[data]
name = "synthetic_phantom"
views = [0, 90]
num_train = 4
num_val = 2
num_test = 2

[model]
name = "tinynet"

[train]
batch_size = 2
progress = false
log_every = 1

[eval]
report = false
preview = false

[[stages]]
name = "stage1"
resolution = 16
epochs = 1
lr = 1e-3
losses = {{ l1 = 1.0 }}
"""


@pytest.fixture
def tiny(tmp_path):
    """A one-stage recipe at 16^3 with a small test model (a plugin file beside the recipe)."""
    (tmp_path / "tinynet.py").write_text(TINYNET)
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE.format(out=(tmp_path / "runs").as_posix()))
    return path


def rows(run, stage="stage1"):
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return ckpt.load_weights(folder)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _NaNGradient(torch.autograd.Function):
    """0 in the forward pass, NaN gradients in the backward pass: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"), dtype=grad.dtype, device=grad.device)


class Scripted:
    """A metric whose value at the k-th validation comes from a list; and losses that misbehave on cue."""

    values: list[float] = []
    calls = 0
    nan_calls: set[int] = set()
    grad_nan_calls: set[int] = set()  # a finite loss whose gradient is NaN
    interrupt_at = -1
    loss_calls = 0
    checkpoints: list[tuple[str, str]] = []
    stage_models: dict[str, dict] = {}

    @classmethod
    def reset(cls, values=(), nan_calls=(), interrupt_at=-1, grad_nan_calls=()):
        cls.values, cls.calls = list(values), 0
        cls.nan_calls, cls.interrupt_at, cls.loss_calls = set(nan_calls), interrupt_at, 0
        cls.grad_nan_calls = set(grad_nan_calls)
        cls.checkpoints, cls.stage_models = [], {}

    @hookimpl
    def register_metrics(self, register):
        def factory():
            def metric(pred, target, batch):
                v = Scripted.values[Scripted.calls % len(Scripted.values)]
                Scripted.calls += 1
                return torch.full((pred.shape[0],), float(v))

            return metric

        register("scripted", factory)

    @hookimpl
    def register_losses(self, register):
        class Misbehaving(nn.Module):
            def forward(self, pred, target, batch):
                k = Scripted.loss_calls
                Scripted.loss_calls += 1
                if k == Scripted.interrupt_at:
                    raise KeyboardInterrupt
                loss = (pred - target).abs().mean()
                if k in Scripted.grad_nan_calls:
                    loss = loss + _NaNGradient.apply(pred)
                return loss * float("nan") if k in Scripted.nan_calls else loss

        register("misbehaving", Misbehaving)

    @hookimpl
    def on_checkpoint_saved(self, trainer, stage, path, kind):
        Scripted.checkpoints.append((stage.name, path.name, kind))

    @hookimpl
    def on_stage_start(self, trainer, stage):
        Scripted.stage_models[stage.name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture
def scripted():
    Scripted.reset()
    get_plugin_manager().register_object(Scripted(), "scripted-test")
    return Scripted


QUIET = ["train.trackers=[]"]  # no TensorBoard files


def cli(recipe_path, *args):
    """``python -m x2ct_framework.run`` in-process, without the end-of-run report and trackers."""
    return run_main([str(recipe_path), *[a for q in QUIET for a in ("--set", q)], *args])


def train(recipe_path, *overrides, resume=False):
    recipe = load_recipe(recipe_path, [*QUIET, *overrides])
    Trainer(recipe, resume=resume).run()
    return recipe


# ---- schedule --------------------------------------------------------------------------------------
def test_lr_at_each_step_follows_cosine_under_accumulation(tiny, tmp_path):
    """5 cases, batch 1, accumulation 2 -> 3 updates an epoch (the last from one micro-batch), 2 epochs."""
    train(tiny, "data.num_train=5", "train.batch_size=1", "train.grad_accum=2", "stages.1.epochs=2",
          "stages.1.lr=1e-2", "stages.1.min_lr=1e-4", "stages.1.warmup_steps=1")
    log = [r for r in rows(tmp_path / "runs/tiny") if r["kind"] == "train"]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in log] == [1, 1, 1, 2, 2, 2]
    total, warm, hi, lo = 6, 1, 1e-2, 1e-4
    expected = [hi * 1 / warm] + [lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * (s - warm) / (total - 1 - warm)))
                                  for s in range(1, total)]
    assert [r["lr"] for r in log] == pytest.approx(expected, rel=1e-9)
    assert log[-1]["lr"] == pytest.approx(lo)


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    a.set_epoch(4)
    list(EpochSampler(10, seed=3))  # unrelated draws do not matter
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(5)
    assert list(a) != list(b)
    assert len(EpochSampler(10, seed=0, limit=4)) == 4 and len(list(EpochSampler(10, 0, limit=4))) == 4


# ---- checkpoints and best --------------------------------------------------------------------------
def test_checkpoints_at_the_right_epochs_and_best_follows_the_metric(tiny, tmp_path, scripted):
    scripted.reset(values=[1.0, 3.0, 2.0, 5.0, 4.0])
    train(tiny, "stages.1.epochs=5", "stages.1.checkpoint_every=2", "eval.metrics=[\"scripted\"]",
          "stages.1.select_best=\"val/scripted\"")
    stage = tmp_path / "runs/tiny/stage1"
    assert sorted(p.name for p in stage.iterdir() if p.is_dir()) == ["best", "epoch0002", "epoch0004", "last"]
    assert ckpt.load_state(stage / "epoch0002")["epoch"] == 2 and ckpt.load_state(stage / "epoch0004")["epoch"] == 4
    last = ckpt.load_state(stage / "last")
    assert last["epoch"] == 5 and last["complete"] and last["step"] == 10
    best = ckpt.load_state(stage / "best")
    assert best["epoch"] == 4 and best["metrics"]["val/scripted"] == 5.0
    assert same(weights(stage / "best"), weights(stage / "epoch0004"))
    assert not same(weights(stage / "best"), weights(stage / "last"))
    kinds = [(p, k) for _, p, k in scripted.checkpoints]
    assert kinds.count(("last", "last")) == 5
    assert [p for p, k in kinds if k == "best"] == ["best"] * 3  # epochs 1, 2 and 4 improved
    assert [p for p, k in kinds if k == "periodic"] == ["epoch0002", "epoch0004"]
    assert (stage / "metrics.csv").read_text().splitlines()[0].startswith("kind,stage,epoch,step")
    assert (stage / "curves.png").stat().st_size > 1000


def test_best_in_min_mode_and_validation_every_n_epochs(tiny, tmp_path, scripted):
    scripted.reset(values=[3.0, 1.0, 2.0])
    train(tiny, "stages.1.epochs=5", "stages.1.val_every=2", "train.max_steps_per_epoch=1",
          "eval.metrics=[\"scripted\"]", "stages.1.select_best=\"val/scripted\"",
              "stages.1.best_mode=\"min\"", "eval.preview=true")
    val = [r for r in rows(tmp_path / "runs/tiny") if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [2, 4, 5]  # every 2 epochs and after the last
    assert [r["step"] for r in rows(tmp_path / "runs/tiny") if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert ckpt.load_state(tmp_path / "runs/tiny/stage1/best")["epoch"] == 4
    assert sorted(p.name for p in (tmp_path / "runs/tiny/stage1/previews").iterdir()) == \
        ["epoch0002.png", "epoch0004.png", "epoch0005.png"]


def test_best_mode_auto_reads_the_metrics_direction():
    from x2ct_framework.evaluation.metrics import LPIPS
    from x2ct_framework.training.state import best_mode

    reg = get_plugin_manager().registry("metric")
    metrics = {name: reg.create(name, {}, where="test") for name in ("psnr", "ssim", "mae_hu", "landmark_mm")}
    metrics["lpips"] = LPIPS  # its class attribute: an instance would load a backbone
    assert best_mode("val/psnr", "auto", metrics) == "max" and best_mode("val/ssim", "auto", metrics) == "max"
    assert best_mode("val/loss", "auto", metrics) == "min" and best_mode("val/mae_hu", "auto", metrics) == "min"
    assert best_mode("val/lpips", "auto", metrics) == "min" and best_mode("val/loss", "max", metrics) == "max"
    assert best_mode("val/landmark_mm", "auto", metrics) == "min"

    class ErrorBars:  # the direction comes from the metric, not from words in its name
        higher_is_better = True

    assert best_mode("val/error_bars", "auto", {"error_bars": ErrorBars()}) == "max"
    assert best_mode("val/error_bars", "min", {"error_bars": ErrorBars()}) == "min"


def test_select_best_landmark_mm_keeps_the_minimum(tiny_recipe, tmp_path):
    """The contract: with best_mode = "auto", a lower-is-better metric's best checkpoint is its minimum."""
    # head_init = "default": the small head's near-zero first outputs find no landmark in 3 tiny steps, and the
    # distance would not move between epochs.
    train(tiny_recipe, "stages.1.epochs=3", "train.max_steps_per_epoch=1", "eval.metrics=[\"landmark_mm\"]",
          "eval.report=false", "eval.preview=false", "stages.1.select_best=\"val/landmark_mm\"",
          "model.head_init=\"default\"")
    values = {r["epoch"]: r["val/landmark_mm"] for r in rows(tmp_path / "runs/tiny") if r["kind"] == "val"}
    assert len(values) == 3 and all(math.isfinite(v) for v in values.values())
    assert len(set(values.values())) > 1, values  # otherwise min and max would pick the same epoch
    best = ckpt.load_state(tmp_path / "runs/tiny/stage1/best")
    assert best["best"]["mode"] == "min"
    assert best["epoch"] == min(values, key=values.get) and best["best"]["value"] == min(values.values())


def test_step_and_validation_hooks_and_the_epoch_timing_columns(tiny, tmp_path):
    """2 updates an epoch (batch 1 x grad_accum 2 over 4 cases), 3 epochs, validation at epochs 2 and 3."""
    class Recorder:
        def __init__(self):
            self.steps, self.validations = [], []

        @hookimpl
        def on_train_step_end(self, trainer, stage, step, metrics):
            self.steps.append((stage.name, step, dict(metrics), trainer.state.step))

        @hookimpl
        def on_validation_end(self, trainer, stage, epoch, metrics):
            self.validations.append((epoch, dict(metrics)))

    rec = Recorder()
    get_plugin_manager().register_object(rec, "recorder-test")
    train(tiny, "stages.1.epochs=3", "stages.1.val_every=2", "train.batch_size=1", "train.grad_accum=2",
          "train.log_every=2")
    log = rows(tmp_path / "runs/tiny")
    assert [(name, step, now) for name, step, _, now in rec.steps] == [("stage1", s, s) for s in range(1, 7)]
    assert all({"lr", "train/loss", "train/l1", "train/grad_norm"} <= set(m) for _, _, m, _ in rec.steps)
    for row in (r for r in log if r["kind"] == "train"):  # a row averages the updates since the previous one
        updates = [m for _, step, m, _ in rec.steps if row["step"] - 2 < step <= row["step"]]
        assert row["lr"] == updates[-1]["lr"]
        assert row["train/loss"] == pytest.approx(sum(m["train/loss"] for m in updates) / 2, rel=1e-12)
    val = [r for r in log if r["kind"] == "val"]
    assert [e for e, _ in rec.validations] == [1, 2] and [r["epoch"] for r in val] == [2, 3]
    assert [m for _, m in rec.validations] == [{k: v for k, v in r.items() if k.startswith("val/")} for r in val]
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4), (3, 6)]
    assert all(r["time/train_s"] > 0 and r["time/save_s"] > 0 for r in epochs)
    assert [r["time/validate_s"] > 0 for r in epochs] == [False, True, True]


def test_select_best_must_be_measured(tiny, capsys):
    assert cli(tiny, "--set", "stages.1.select_best=\"val/psnrr\"") == 2
    assert "select_best: 'val/psnrr' is not measured" in capsys.readouterr().err


# ---- stages ----------------------------------------------------------------------------------------
VIT = ('model={ name = "vit_cascade", tokens = 4, dim = 16, depth = 1, heads = 2, channels = 4, '
       'encoder = "test_efficientnet", decoder_levels = 1 }')


@pytest.mark.slow
def test_stage2_starts_from_stage1_best(tiny, tmp_path, scripted):
    """With the real ViT cascade: stage 2 (a finer grid) starts from stage 1's best weights, every tensor."""
    scripted.reset(values=[2.0, 1.0, 0.5])  # stage 1's best is its first epoch, not its last
    two = tiny.read_text() + '\n[[stages]]\nname = "stage2"\nresolution = 24\nepochs = 1\nlr = 1e-3\n' \
        'losses = { l1 = 1.0, mse = 1.0 }\n'
    tiny.write_text(two)
    train(tiny, VIT, "stages.1.epochs=3", "train.max_steps_per_epoch=1", "eval.metrics=[\"scripted\"]",
        "stages.1.select_best=\"val/scripted\"",
          "stages.2.select_best=\"val/scripted\"")
    run = tmp_path / "runs/tiny"
    assert ckpt.load_state(run / "stage1/best")["epoch"] == 1
    start2 = scripted.stage_models["stage2"]
    assert same(weights(run / "stage1/best"), {k: v.cpu() for k, v in start2.items()})
    assert not same(weights(run / "stage1/last"), {k: v.cpu() for k, v in start2.items()})
    assert ckpt.load_state(run / "stage2/last")["complete"]


def test_start_stage_without_the_previous_checkpoint_says_what_to_run(tiny, tmp_path, capsys):
    tiny.write_text(tiny.read_text() + '\n[[stages]]\nname = "stage2"\nresolution = 16\nepochs = 1\n'
                           'losses = { l1 = 1.0 }\n')
    assert cli(tiny, "--set", "train.start_stage=2") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "runs/tiny/stage1/best") in err
    assert "x2ct_framework.run" in err and "--set train.start_stage=1" in err and "Traceback" not in err


def test_init_from_a_missing_folder_names_the_recipe_that_makes_it(tiny, tmp_path, capsys):
    (tmp_path / "maker.toml").write_text("name = 'maker'\n")
    assert cli(tiny, "--set", f"train.init_from=\"{tmp_path}/runs/maker/stage1/best\"",
        "--set", "train.init_from_recipe=\"maker.toml\"") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/runs/maker/stage1/best" in err and "maker.toml" in err and "model.safetensors" in err


def test_freeze_keeps_parameters_and_rejects_unknown_prefixes(tiny, tmp_path, capsys):
    train(tiny, "stages.1.freeze=[\"encoder\"]", "stages.1.epochs=1")
    recipe = load_recipe(tiny, QUIET)
    from x2ct_framework.config.build import build_model, stages

    torch.manual_seed(recipe["seed"] + 1)
    fresh = dict(build_model(recipe, stages(recipe)[0]).named_parameters())
    trained = weights(tmp_path / "runs/tiny/stage1/last")
    assert all(torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("encoder"))
    assert not all(torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("decoder"))
    assert cli(tiny, "--set", "stages.1.freeze=[\"encodr\"]") == 2
    assert "'encodr' matches no parameter" in capsys.readouterr().err


# ---- optimisation options ----------------------------------------------------------------------------
def test_optimizer_by_name_with_options_and_lr_scaling(tiny, tmp_path, capsys):
    train(tiny, "stages.1.optimizer=\"SGD\"", "stages.1.optimizer_options={ momentum = 0.9 }",
          "train.lr_scaling=\"linear\"", "train.reference_batch=8", "stages.1.scheduler=\"constant\"")
    out = capsys.readouterr().out
    assert "global batch 2 = per-device batch 2 x 1 process(es) x grad_accum 1" in out
    assert "SGD lr 0.00025" in out and "reference batch 8, x0.25" in out
    state = ckpt.load_trainer_state(tmp_path / "runs/tiny/stage1/last")
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 8)


def test_unknown_optimizer_is_a_recipe_error(tiny, capsys):
    assert cli(tiny, "--set", "stages.1.optimizer=\"adamww\"") == 2
    assert 'unknown optimizer; did you mean "adamw"' in capsys.readouterr().err


def test_ema_weights_are_validated_and_saved(tiny, tmp_path):
    train(tiny, "train.ema={ enabled = true, decay = 0.5 }", "stages.1.epochs=2")
    last = tmp_path / "runs/tiny/stage1/last"
    state = ckpt.load_trainer_state(last)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    assert same(weights(last), ema) and not same(weights(last), state["model"])
    assert int(state["ema"]["n_averaged"]) == 4
    assert ckpt.load_state(last)["weights"] == "ema"


def test_bf16_mixed_precision_trains(tiny, tmp_path):
    train(tiny, "train.mixed_precision=\"bf16\"")
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "runs/tiny/stage1/last").values())


def test_tensorboard_tracker_writes_events(tiny, tmp_path):
    Trainer(load_recipe(tiny, [q for q in QUIET if "trackers" not in q])).run()
    assert list((tmp_path / "runs/tiny/logs").rglob("events.out.tfevents.*"))


# ---- safety ----------------------------------------------------------------------------------------
def test_an_update_skipped_for_a_non_finite_gradient_is_not_averaged_into_the_ema(tiny, tmp_path, scripted):
    """The loss is finite but its gradient is NaN at 2 of the 4 updates: both are skipped, and the EMA averages
    only the 2 updates that happened (before 0.2.0 it averaged all 4)."""
    scripted.reset(grad_nan_calls={1, 2})
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
        train(tiny, "stages.1.losses={ misbehaving = 1.0 }", "train.batch_size=1", "stages.1.epochs=1",
              "train.max_nonfinite_steps=2", "train.ema.enabled=true")
    state = ckpt.load_trainer_state(tmp_path / "runs/tiny/stage1/last")
    assert state["position"]["step"] == 4 and state["position"]["nonfinite"] == 2
    assert int(state["ema"]["n_averaged"]) == 2


def test_non_finite_losses_are_skipped_up_to_the_limit(tiny, tmp_path, scripted):
    scripted.reset(nan_calls={1, 2})  # loss calls 1 and 2 of epoch 1 (batch 1: one call a step)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
        train(tiny, "stages.1.losses={ misbehaving = 1.0 }", "train.batch_size=1", "stages.1.epochs=2",
              "train.max_nonfinite_steps=2")
    last = tmp_path / "runs/tiny/stage1/last"
    assert ckpt.load_state(last)["complete"]
    assert all(torch.isfinite(v).all() for v in weights(last).values())
    assert ckpt.load_trainer_state(last)["position"]["nonfinite"] == 2


def test_too_many_non_finite_losses_stop_with_the_last_good_checkpoint(tiny, tmp_path, scripted, capsys):
    scripted.reset(nan_calls=set(range(6, 100)))  # epoch 1: 4 training + 2 validation calls; NaN from epoch 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code = cli(tiny, "--set", "stages.1.losses={ misbehaving = 1.0 }", "--set", "train.batch_size=1",
                   "--set", "stages.1.epochs=3", "--set", "train.max_nonfinite_steps=1")
    assert code == 3
    err = capsys.readouterr().err
    assert "limit train.max_nonfinite_steps = 1" in err and "last good checkpoint" in err
    last = tmp_path / "runs/tiny/stage1/last"
    assert ckpt.load_state(last)["epoch"] == 1 and not ckpt.load_state(last)["complete"]
    assert all(torch.isfinite(v).all() for v in weights(last).values())


def test_ctrl_c_saves_last_and_resume_matches_an_uninterrupted_run(tiny, tmp_path, scripted, capsys):
    """A KeyboardInterrupt mid-epoch (inside an accumulation window) saves ``last``; --resume finishes exactly."""
    common = ["--set", "stages.1.losses={ misbehaving = 1.0 }", "--set", "train.batch_size=1", "--set",
              "train.grad_accum=2", "--set", "stages.1.epochs=2", "--set", "data.num_train=6"]
    ref_folder = tmp_path / "ref_run"
    scripted.reset()
    assert cli(tiny, *common, "--set", f"output_dir=\"{ref_folder}\"") == 0
    scripted.reset(interrupt_at=6 + 2 + 3)  # epoch 1: 6 calls + 2 validation; epoch 2: the 4th micro-batch
    assert cli(tiny, *common) == 130
    assert "Continue with the same command and --resume" in capsys.readouterr().err
    last = tmp_path / "runs/tiny/stage1/last"
    state = ckpt.load_state(last)
    assert state["interrupted"] and state["epoch"] == 1 and state["batch_in_epoch"] == 2 and state["step"] == 4
    scripted.reset()
    assert cli(tiny, *common, "--resume") == 0
    assert same(weights(last), weights(ref_folder / "tiny/stage1/last"))
    steps = [r["step"] for r in rows(tmp_path / "runs/tiny") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_skips_finished_stages(tiny, tmp_path, capsys):
    train(tiny)
    before = weights(tmp_path / "runs/tiny/stage1/last")
    capsys.readouterr()
    train(tiny, resume=True)
    assert "finished earlier" in capsys.readouterr().out
    assert same(before, weights(tmp_path / "runs/tiny/stage1/last"))


def test_run_folder_recipe_finds_a_local_plugin_file_from_anywhere(tiny, tmp_path, monkeypatch):
    """recipe.toml in the run folder names plugin files by absolute path: evaluate/predict load it from there."""
    train(tiny)
    kept = tmp_path / "runs/tiny/recipe.toml"
    assert load_recipe(kept)["plugins"] == [str((tmp_path / "tinynet.py").resolve())]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reset_plugin_manager()
    from x2ct_framework.plugins import get_plugin_manager

    get_plugin_manager().trust_run_plugins = True  # a run folder's plugins load only when trusted (--trust-run-plugins)
    from x2ct_framework.evaluation.evaluate import evaluate
    from x2ct_framework.runs import resolve_target
    ev = evaluate(resolve_target(tmp_path / "runs/tiny"), split="val", protocols=["default"], n_boot=10, worst=0,
                  progress=False)
    assert len(ev.case_ids) == 2 and np.isfinite(ev.values["default/psnr"]).all()

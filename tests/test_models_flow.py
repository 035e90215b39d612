"""flow_refiner and the generative-model contract: the kit, training through the trainer (EMA, exact resume,
a cascade), samples in x2ct predict and x2ct evaluate, export."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from test_evaluate import make_run
from test_predict import _case
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.generative import SampleStats, case_generators, case_seed, is_generative
from x2ct_framework.testing import check_model, make_batch
from x2ct_plugins.models.flow_refiner import FlowRefiner

FLOW = """
name = "flow_refiner"
encoder = "test_resnet"
widths = [8, 16]
emb_dim = 32
feature_channels = 8
steps = 2
"""


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(ckpt, "FSYNC", False)


def tiny_flow(**options) -> FlowRefiner:
    torch.manual_seed(0)
    return FlowRefiner(resolution=16, encoder="test_resnet", widths=[8, 16], emb_dim=32, feature_channels=8, steps=2,
                       **options)


def test_flow_refiner_keeps_the_model_contract_with_the_generative_checks():
    passed = check_model(tiny_flow(), resolution=16)
    assert "sample: another seed gives another sample" in passed
    assert "forward: a case gets the same volume alone as in its batch" in passed
    assert "the output depends on prev" in passed


def test_the_kit_refuses_a_generative_model_that_ignores_its_noise():
    class Deterministic(FlowRefiner):
        def sample(self, xrays, geometry, prev=None, steps=None, generator=None):
            return self.condition(xrays, geometry, prev).base

    with pytest.raises(AssertionError, match="ignores its noise"):
        check_model(Deterministic(resolution=16, encoder="test_resnet", widths=[8], emb_dim=16, feature_channels=4,
                                  steps=1), resolution=16)


def test_samplers_integrate_a_known_velocity_exactly_and_heun_beats_euler():
    """With the network replaced by v(x, t) = x (dx/dt = x), the exact flow is x(1) = e x(0): Euler with n
    steps gives (1 + 1/n)^n, Heun (1 + h + h^2/2)^n."""
    for sampler, n, factor in (("euler", 4, (1 + 1 / 4) ** 4), ("heun", 4, (1 + 0.25 + 0.25**2 / 2) ** 4)):
        m = tiny_flow(sampler=sampler, residual_scale=1.0)
        m.eval()
        m.guided_velocity = lambda x, t, cond: x
        batch = make_batch(1, resolution=16)
        gen = case_generators(batch["xrays"], batch["geometry"], 0, 0)
        with torch.no_grad():
            base = m.condition(batch["xrays"], batch["geometry"], None).base
            out = m.sample(batch["xrays"], batch["geometry"], steps=n, generator=gen)
        x0 = torch.randn(base.shape[1:], generator=case_generators(batch["xrays"], batch["geometry"], 0, 0)[0])
        assert torch.allclose(out[0] - base[0], factor * x0, atol=1e-5), sampler
    assert abs((1 + 0.25 + 0.25**2 / 2) ** 4 - np.e) < abs((1 + 1 / 4) ** 4 - np.e)


def test_sample_shift_moves_the_steps_to_the_clean_end_and_one_is_uniform():
    """SD3's shift on the noise level sigma = 1 - t: a = 0.5 with 4 Euler steps calls the velocity at
    sigma' = 0.5 sigma / (1 - 0.5 sigma) for sigma = 1, 3/4, 1/2, 1/4, i.e. t = 0, 0.4, 2/3, 6/7; a = 1 keeps the
    uniform grid; a Heun integration of dx/dt = 2 t x on the shifted grid still lands on e x(0)."""
    seen = []

    def record(x, t, cond):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    batch = make_batch(1, resolution=16)
    x, g = batch["xrays"], batch["geometry"]
    for a, expected in ((0.5, [0.0, 0.4, 2 / 3, 6 / 7]), (1.0, [0.0, 0.25, 0.5, 0.75]),
                        (3.0, [0.0, 1 - 2.25 / 2.5, 1 - 1.5 / 2.0, 1 - 0.75 / 1.5])):
        seen.clear()
        m = tiny_flow(sampler="euler", sample_shift=a, residual_scale=1.0).eval()
        m.guided_velocity = record
        with torch.no_grad():
            m.sample(x, g, steps=4, generator=case_generators(x, g, 0, 0))
        assert seen == pytest.approx(expected, abs=1e-6), a
        grid = m.time_grid(4)
        assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
    assert torch.equal(tiny_flow().time_grid(10), torch.linspace(0.0, 1.0, 11))
    m = tiny_flow(sampler="heun", sample_shift=0.4, residual_scale=1.0).eval()
    m.guided_velocity = lambda x, t, cond: 2 * t[:, None, None, None, None] * x
    with torch.no_grad():
        base = m.condition(x, g, None).base
        out = m.sample(x, g, steps=40, generator=case_generators(x, g, 0, 0)) - base
    x0 = torch.randn(base.shape[1:], generator=case_generators(x, g, 0, 0)[0])
    assert torch.allclose(out[0], np.e * x0, rtol=2e-3, atol=1e-4)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="sample_shift"):
            tiny_flow(sample_shift=bad)


def test_dropout_acts_in_training_only_and_adds_no_weights():
    """U-Net dropout (DDPM's regulariser): two training-mode calls differ, evaluation is the same network without
    dropout (same weights, same output), and the option adds no parameter, so checkpoints load either way."""
    plain, dropped = tiny_flow(), tiny_flow(dropout=0.3)
    dropped.load_state_dict(plain.state_dict())  # strict: the same keys
    for m in (plain, dropped):
        for p in m.unet.parameters():  # the zero-initialised convolutions would hide the dropout
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.1)
    dropped.load_state_dict(plain.state_dict())
    batch = make_batch(2, resolution=16)
    x, g = batch["xrays"], batch["geometry"]
    xt, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        dropped.train()
        cond = dropped.condition(x, g, None)
        a, b = dropped.velocity(xt, t, cond), dropped.velocity(xt, t, cond)
        assert not torch.allclose(a, b)
        dropped.eval(), plain.eval()
        assert torch.equal(dropped.velocity(xt, t, dropped.condition(x, g, None)),
                           plain.velocity(xt, t, plain.condition(x, g, None)))
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            tiny_flow(dropout=bad)


def _gaussian_velocity(mu: float, s: float):
    """The exact velocity E[x1 - x0 | x_t] of the flow x_t = (1 - t) x0 + t x1 from x0 ~ N(0, 1) to x1 ~ N(mu, s^2)."""
    def v(x, t, cond):
        t = t[:, None, None, None, None].double()
        var = (1 - t) ** 2 + t**2 * s**2
        x1 = mu + t * s**2 * (x.double() - t * mu) / var
        x0 = (1 - t) * (x.double() - t * mu) / var
        return (x1 - x0).float()
    return v


def test_sde_sampler_keeps_the_marginals_of_a_known_flow_and_without_noise_is_euler():
    """With the exact velocity of N(0, 1) -> N(2, 0.5^2) in place of the network, the SDE sampler (a Langevin term
    on the ODE) lands on that Gaussian; with sde_noise = 0 it is Euler step for step."""
    batch = make_batch(1, resolution=16)
    x, g = batch["xrays"], batch["geometry"]
    out = {}
    for sampler, noise_level in (("sde", 1.0), ("sde", 0.0), ("euler", 1.0)):
        m = tiny_flow(sampler=sampler, sde_noise=noise_level, residual_scale=1.0).eval()
        m.guided_velocity = _gaussian_velocity(2.0, 0.5)
        with torch.no_grad():
            base = m.condition(x, g, None).base
            out[sampler, noise_level] = (m.sample(x, g, steps=100, generator=case_generators(x, g, 0, 0)) - base)
    sde = out["sde", 1.0]
    assert abs(float(sde.mean()) - 2.0) < 0.03 and abs(float(sde.std()) - 0.5) < 0.03  # 4096 voxels
    assert torch.equal(out["sde", 0.0], out["euler", 1.0])
    assert not torch.allclose(sde, out["euler", 1.0], atol=1e-2)  # the noise does enter
    with pytest.raises(ValueError, match="sde_noise"):
        tiny_flow(sampler="sde", sde_noise=-1.0)


def test_case_seeds_depend_on_the_case_not_the_batch():
    batch = make_batch(2, resolution=16)
    x, g = batch["xrays"], batch["geometry"]
    one = {"angles": g["angles"][1]}
    assert case_seed(x[1], one) == case_seed(x[1].clone(), one)
    assert case_seed(x[0], {"angles": g["angles"][0]}) != case_seed(x[1], one)
    assert case_seed(x[1], one, index=0) != case_seed(x[1], one, index=1)


def test_sample_stats_match_numpy():
    xs = [torch.randn(2, 1, 3, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    s = SampleStats()
    for x in xs:
        s.add(x)
    ref = np.stack([x.numpy() for x in xs])
    assert np.allclose(s.mean.numpy(), ref.mean(0), atol=1e-12)
    assert np.allclose(s.std().numpy(), ref.std(0, ddof=1), atol=1e-12)


def test_options_are_checked():
    with pytest.raises(ValueError, match="sampler"):
        tiny_flow(sampler="rk4")
    with pytest.raises(ValueError, match="cond_drop"):
        tiny_flow(guidance=2.0)
    with pytest.raises(ValueError, match="widths"):
        FlowRefiner(resolution=16, widths=[])


def test_auto_residual_scale_is_the_first_batchs_rms_and_travels_with_the_weights():
    """residual_scale = "auto": the root mean square of ct - base over the first training batch, measured once,
    kept in the state dict (and so in an EMA, a checkpoint, an export); a number is used as it is."""
    from x2ct_framework.training.state import EMA

    m = tiny_flow()
    m.train()
    ema = EMA(m, decay=0.9)
    batch = make_batch(2, resolution=16)
    prev = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    ct = batch["ct"]
    m.training_loss(batch["xrays"], batch["geometry"], ct, prev)
    rms = float(torch.sqrt(((ct.double() - prev.double()) ** 2).mean()))
    assert m.residual_scale == pytest.approx(rms, rel=1e-6)
    m.training_loss(batch["xrays"], batch["geometry"], ct * 0.5, prev)  # measured once only
    assert m.residual_scale == pytest.approx(rms, rel=1e-6)
    for _ in range(2):
        ema.update(m)
    assert float(ema.module.residual_scale_value) == pytest.approx(rms, rel=1e-6)

    fresh = tiny_flow()
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    assert fresh.residual_scale == pytest.approx(rms, rel=1e-6)
    fresh.train()
    fresh.training_loss(batch["xrays"], batch["geometry"], ct * 0.5, prev)  # a resumed run does not re-measure
    assert fresh.residual_scale == pytest.approx(rms, rel=1e-6)

    warm = tiny_flow()  # a warm start of the other weights (strict=False): the scale is still measured
    warm.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("residual_scale")},
                         strict=False)
    warm.train()
    warm.training_loss(batch["xrays"], batch["geometry"], ct, prev)
    assert warm.residual_scale == pytest.approx(rms, rel=1e-6)
    fixed = tiny_flow(residual_scale=0.05)
    fixed.train()
    fixed.training_loss(batch["xrays"], batch["geometry"], ct, prev)
    assert fixed.residual_scale == pytest.approx(0.05)
    with pytest.raises(ValueError, match="auto"):
        tiny_flow(residual_scale="measure")


RECIPE_TAIL = """
[train]
batch_size = 2
progress = false
log_every = 1
trackers = []
ema = {{ enabled = true, decay = 0.5 }}

[eval]
report = false
preview = false
metrics = ["psnr"]

[[stages]]
name = "stage1"
resolution = 16
epochs = 2
lr = 1e-3
losses = {{ l1 = 1.0 }}
"""

HEAD = """
name = "flow"
seed = 0
output_dir = "{out}"

[data]
name = "synthetic_phantom"
views = [0, 90]
num_train = 4
num_val = 2
num_test = 2

[model]
""" + FLOW


def _recipe(tmp_path, extra_model: str = "") -> str:
    path = tmp_path / "flow.toml"
    path.write_text(HEAD.format(out=(tmp_path / "runs").as_posix()) + extra_model + RECIPE_TAIL.format())
    return path


@pytest.mark.slow  # three (two-stage) training runs
def test_trainer_trains_a_generative_model_with_ema_and_resumes_exactly(tmp_path, monkeypatch):
    """The trainer logs the model's own terms (flow, coarse) and the recipe's l1 on its clean estimate; a run
    interrupted mid-epoch and resumed ends with the weights of an uninterrupted one (EMA included)."""
    from x2ct_framework.run import main as run_main
    from x2ct_plugins.models import flow_refiner

    path = _recipe(tmp_path, "estimate_losses = true\n")
    quiet = ["--set", "train.trackers=[]"]
    assert run_main([str(path), *quiet, "--set", f'output_dir="{(tmp_path / "ref").as_posix()}"']) == 0
    rows = [json.loads(x) for x in (tmp_path / "ref/flow/stage1/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 4 and all({"train/flow", "train/coarse", "train/l1", "train/loss"} <= set(r) for r in train)
    assert all(r["train/loss"] == pytest.approx(r["train/flow"] + r["train/coarse"] + r["train/l1"], rel=1e-5)
               for r in train)
    assert any(r["kind"] == "val" and np.isfinite(r["val/psnr"]) for r in rows)

    calls = {"n": 0}
    real = flow_refiner.FlowRefiner.training_loss

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, first micro-batch
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(flow_refiner.FlowRefiner, "training_loss", interrupting)
    assert run_main([str(path), *quiet]) == 130
    monkeypatch.setattr(flow_refiner.FlowRefiner, "training_loss", real)
    assert run_main([str(path), *quiet, "--resume"]) == 0
    a, b = ckpt.load_weights(tmp_path / "runs/flow/stage1/last"), ckpt.load_weights(tmp_path / "ref/flow/stage1/last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three (two-stage) training runs
def test_a_generative_stage_refines_the_cascade(tmp_path):
    """Stage 2 names another model (flow_refiner, its own [stages.model] table, cascade = true): it starts fresh
    and gets stage 1's vit_cascade prediction as prev in training."""
    from x2ct_framework.run import main as run_main

    text = HEAD.format(out=(tmp_path / "runs").as_posix()).replace(FLOW, """
name = "vit_cascade"
tokens = 4
dim = 16
depth = 1
heads = 2
channels = 4
encoder = "test_resnet"
decoder_levels = 1
""") + RECIPE_TAIL.format().replace("epochs = 2", "epochs = 1") + """
[[stages]]
name = "stage2"
resolution = 16
epochs = 1
lr = 1e-3
cascade = true
losses = { l1 = 1.0 }

[stages.model]
""" + FLOW
    path = tmp_path / "casc.toml"
    path.write_text(text)
    seen = []
    from x2ct_plugins.models import flow_refiner

    real = flow_refiner.FlowRefiner.training_loss

    def spy(self, xrays, geometry, ct, prev=None):
        seen.append(prev)
        return real(self, xrays, geometry, ct, prev)

    flow_refiner.FlowRefiner.training_loss = spy
    try:
        code = run_main([str(path), "--set", "train.trackers=[]"])
    finally:
        flow_refiner.FlowRefiner.training_loss = real
    assert code == 0
    assert seen and all(p is not None and p.shape[1:] == (1, 16, 16, 16) for p in seen)


def test_a_critic_without_a_clean_estimate_is_a_recipe_error(tmp_path):
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.training.trainer import Trainer

    path = _recipe(tmp_path)
    recipe = load_recipe(path, ["train.trackers=[]", "stages.1.losses={ l1 = 1.0, adversarial = 0.1 }"])
    with pytest.raises(RecipeError, match="estimate_losses"):
        Trainer(recipe).run()


def test_predict_samples_writes_mean_std_and_samples_in_one_frame(tmp_path):
    run = make_run(tmp_path, name="flow", model=FLOW)
    case = _case(tmp_path / "case")
    out = tmp_path / "pred"
    assert x2ct_main(["predict", str(run), str(case), "--geometry", "recipe", "--out", str(out), "--samples", "3",
                      "--keep-samples", "--no-progress"]) == 0
    mean = nib.load(out / "case.nii.gz")
    std = nib.load(out / "case_std.nii.gz")
    samples = [nib.load(out / f"case_sample{k}.nii.gz") for k in range(3)]
    assert np.allclose(mean.affine, std.affine) and all(np.allclose(mean.affine, s.affine) for s in samples)
    stack = np.stack([s.get_fdata() for s in samples])
    assert np.allclose(mean.get_fdata(), stack.mean(0), atol=1e-2)
    assert np.allclose(std.get_fdata(), stack.std(0, ddof=1), atol=1e-2)
    assert std.get_fdata().max() > 10.0  # HU: the untrained flow's samples differ
    meta = json.loads((out / "case.json").read_text())
    assert meta["samples"] == 3 and meta["mean_of_samples"] and len(meta["sample_files"]) == 3
    # the same command again gives the same samples (seeded per case)
    again = tmp_path / "again"
    assert x2ct_main(["predict", str(run), str(case), "--geometry", "recipe", "--out", str(again), "--samples", "3",
                      "--no-progress"]) == 0
    assert np.array_equal(nib.load(again / "case.nii.gz").get_fdata(), mean.get_fdata())


def test_predict_samples_refuses_a_regression_model(tmp_path):
    from x2ct_framework.evaluation.predict import predict
    from x2ct_framework.runs import resolve_target

    run = make_run(tmp_path)
    with pytest.raises(DataError, match="not generative"):
        predict(resolve_target(run), [_case(tmp_path / "case")], tmp_path / "o", geometry="recipe", samples=2,
                progress=False)


def test_evaluate_scores_the_mean_and_one_sample_and_records_diversity(tmp_path):
    from x2ct_framework.evaluation.evaluate import DIVERSITY, ONE_SAMPLE, evaluate
    from x2ct_framework.runs import resolve_target

    run = make_run(tmp_path, name="flow", model=FLOW, num_test=2)
    ev = evaluate(resolve_target(run), "test", ["default"], n_boot=50, worst=1, keep_first=1, progress=False,
                  lpips="off", samples=3, out_dir=tmp_path / "ev")
    assert ev.info["samples"] == 3
    assert f"{ONE_SAMPLE}default/psnr" in ev.values and DIVERSITY in ev.values
    assert np.all(ev.values[DIVERSITY] > 0)
    # the samples' spread reaches the uncertainty metrics (a regression model leaves them NaN)
    assert np.all(np.isfinite(ev.values["default/uncertainty_spearman"]))
    assert np.all(np.abs(ev.values["default/uncertainty_spearman"]) <= 1.0)
    # the mean of samples is closer to the target than one sample of an untrained flow (noise averages out)
    assert np.all(ev.values["default/psnr"] > ev.values[f"{ONE_SAMPLE}default/psnr"])
    assert {"sample", "std"} <= set(ev.kept[0])
    summary = json.loads((tmp_path / "ev/summary.json").read_text())
    assert summary["generative"]["samples"] == 3 and "default/psnr" in summary["generative"]["one_sample"]
    assert summary["generative"]["coverage_if_calibrated"] == pytest.approx(0.7746, abs=1e-3)  # P(|t_2| <= 1.732)
    assert "## Samples (3 per case)" in (tmp_path / "ev/summary.md").read_text()


def test_matrix_results_keep_one_samples_per_case_values(tmp_path):
    """The matrix runner's result file keeps one sample's per-case values beside the mean's, so one sample pairs
    with the regression case by case (stats.per_case_pairs); their mean over cases is the one_sample column."""
    from types import SimpleNamespace

    from benchmarks.variants.runner import evaluate_run
    from x2ct_framework.config.recipe import load_recipe

    run = make_run(tmp_path, name="flow", model=FLOW, num_test=2)
    recipe = load_recipe(run / "recipe.toml")
    matrix = SimpleNamespace(eval={"which": "best", "split": "test", "protocol": "default", "batch_size": 0,
                                   "max_cases": 0})
    res = evaluate_run(recipe, matrix)
    pc = res["per_case"]["metrics"]
    assert len(res["per_case"]["case_ids"]) == 2 and len(pc["one_sample/psnr"]) == 2
    for m in ("psnr", "ssim"):
        assert np.mean(pc[f"one_sample/{m}"]) == pytest.approx(res["metrics"][f"one_sample/{m}"], rel=1e-9)
        assert np.mean(pc[m]) == pytest.approx(res["metrics"][m], rel=1e-9)
    assert pc["one_sample/psnr"] != pytest.approx(pc["psnr"], abs=1e-3)  # the mean of 8 and one sample differ


def test_set_level_metrics_score_the_means_and_the_single_samples_apart(tmp_path):
    """fid3d over the split is computed on the means alone, and under one_sample: on the first samples alone:
    the same numbers as scoring either as a plain predictor (before, one accumulator held both)."""
    from x2ct_framework.evaluation.evaluate import ONE_SAMPLE, evaluate, infer_samples
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target

    run = make_run(tmp_path, name="flow", model=FLOW, num_test=3)
    target = resolve_target(run)
    kw = dict(n_boot=20, worst=0, progress=False, lpips="off")
    ev = evaluate(target, "test", ["default"], samples=3, **kw)
    flow = load_model(target, torch.device("cpu"))

    class Fixed(torch.nn.Module):  # a plain predictor: the mean, or the first sample, of the same 3 samples
        def __init__(self, which):
            super().__init__()
            self.flow, self.which = flow, which

        def forward(self, xrays, geometry):
            return infer_samples(self.flow, {"xrays": xrays, "geometry": geometry}, 3)[self.which]

    for which, key in (("mean", "default/fid3d"), ("sample", f"{ONE_SAMPLE}default/fid3d")):
        alone = evaluate(target, "test", ["default"], model=Fixed(which), **kw)
        assert ev.summary[key]["mean"] == pytest.approx(alone.summary["default/fid3d"]["mean"], rel=1e-6), which
    assert ev.summary["default/fid3d"]["mean"] != ev.summary[f"{ONE_SAMPLE}default/fid3d"]["mean"]


def test_report_gallery_draws_regression_sample_mean_and_std(tmp_path):
    from x2ct_framework.evaluation.report import plot_samples

    b = make_batch(1, resolution=16)
    ct = b["ct"][0]
    rec = {"case_id": "c0", "ct": ct, "pred": ct, "sample": ct, "std": ct * 0.1, "regression": ct}
    path = plot_samples([rec], (-1000, 3000), tmp_path / "samples.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > img.shape[1]  # five rows of three planes


def test_export_and_load_pretrained_keep_a_generative_model(tmp_path):
    from x2ct_framework import load_pretrained
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target

    run = make_run(tmp_path, name="flow", model=FLOW, num_test=1)
    out = tmp_path / "export"
    assert x2ct_main(["export", str(run), str(out)]) == 0
    model = load_pretrained(out)
    assert is_generative(model)
    batch = make_batch(1, resolution=16)
    with torch.no_grad():
        ref = load_model(resolve_target(run), torch.device("cpu"))(batch["xrays"], batch["geometry"])
        got = model(batch["xrays"], batch["geometry"])
    assert torch.equal(ref, got)


WEIGHTS_HASH = '''
"""Writes a hash of the model's weights after every optimizer step, one file per process."""
import hashlib
import os
from pathlib import Path

from x2ct_framework.hookspecs import hookimpl


@hookimpl
def on_train_step_end(trainer, stage, step, metrics):
    h = hashlib.sha1()
    for _, v in sorted(trainer.model.state_dict().items()):
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    rank = trainer.accelerator.process_index
    with open(Path(os.environ["X2CT_TEST_HASHES"]) / f"rank{rank}.txt", "a") as f:
        f.write(f"{step} {h.hexdigest()}\\n")
'''


@pytest.mark.slow
def test_two_cpu_processes_keep_a_generative_model_in_sync(tmp_path):
    """Under DDP (2 gloo processes) training_loss goes through the wrapped model, so gradients are all-reduced:
    after every update both processes hold the same weights, and the weights moved."""
    path = _recipe(tmp_path)
    path.write_text('plugins = ["weights_hash.py"]\n' + path.read_text())
    r0, r1 = two_process_hashes(tmp_path, path)
    assert len(r0) == 2 and r0 == r1
    assert r0[0].split()[1] != r0[1].split()[1]


def two_process_hashes(tmp_path, path) -> tuple[list[str], list[str]]:
    """Train the recipe at ``path`` (which loads ``weights_hash.py``, written here) on 2 gloo processes, batch 1,
    one epoch: each process's ``step hash`` lines."""
    import subprocess

    from conftest import PYTHON, run_env

    (tmp_path / "weights_hash.py").write_text(WEIGHTS_HASH)
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    two = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "x2ct_framework.run", str(path),
         "--set", "train.batch_size=1", "--set", "stages.1.epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, env=run_env(X2CT_TEST_HASHES=str(hashes)), timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    return tuple((hashes / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))


def test_the_run_report_shows_the_samples_gallery_of_a_generative_run(tmp_path):
    from x2ct_framework.evaluation import report

    run = make_run(tmp_path, name="flow", model=FLOW, num_test=1)
    assert report.main([str(run), "--device", "cpu"]) == 0
    md = (run / "report.md").read_text()
    assert "## Samples" in md and "mean of 8 samples" in md and "| psnr |" in md.replace("default/", "")
    pictures = [p for p in run.rglob("samples.png")]
    assert len(pictures) == 1 and pictures[0].read_bytes()[:4] == b"\x89PNG"

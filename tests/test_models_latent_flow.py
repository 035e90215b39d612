"""latent_flow_refiner: flow_refiner's flow on a 3D autoencoder's latent grid (the route past 128^3).

The model kit's generative checks, the latent grid and its cost, the autoencoder learning to reconstruct, the
running latent scale travelling with the weights, bad options, and a run through the trainer with exact resume
and x2ct evaluate's samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.generative import case_generators
from x2ct_framework.testing import check_model, make_batch
from test_models_flow import FLOW, HEAD, RECIPE_TAIL
from x2ct_plugins.models.flow_refiner import FlowRefiner
from x2ct_plugins.models.latent_flow import LatentFlowRefiner, VolumeAutoencoder, latent_sizes

SMALL = dict(encoder="test_resnet", widths=[8, 16], emb_dim=32, feature_channels=8, steps=2)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(ckpt, "FSYNC", False)


def tiny_latent(resolution: int = 16, **options) -> LatentFlowRefiner:
    torch.manual_seed(0)
    return LatentFlowRefiner(resolution=resolution, autoencoder_width=8, **{**SMALL, **options})


def test_latent_flow_refiner_keeps_the_model_contract_with_the_generative_checks():
    passed = check_model(tiny_latent(), resolution=16)
    assert "sample: another seed gives another sample" in passed
    assert "forward: a case gets the same volume alone as in its batch" in passed
    assert "the output depends on prev" in passed


def test_the_flow_runs_on_the_latent_grid():
    """The U-Net's input and the noise live on (R / 2**levels)^3 with latent_channels channels; the sample comes
    back at R^3; every size works (odd sizes round up, as the strided convolutions do)."""
    assert latent_sizes(16, 2) == [16, 8, 4] and latent_sizes(20, 2) == [20, 10, 5] and latent_sizes(9, 1) == [9, 5]
    for r, levels, grid in ((16, 2, 4), (20, 2, 5), (12, 1, 6)):
        m = tiny_latent(r, autoencoder_levels=levels, latent_channels=3)
        m.eval()
        batch = make_batch(2, resolution=r)
        seen = []
        m.unet.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
        with torch.no_grad():
            cond = m.condition(batch["xrays"], batch["geometry"], None)
            out = m(batch["xrays"], batch["geometry"])
        assert m.state_shape(cond) == (2, 3, grid, grid, grid)
        assert cond.features.shape[-3:] == (grid,) * 3 and cond.grid_base.shape == (2, 1, grid, grid, grid)
        assert seen and all(s == (2, 3 + 1 + 8, grid, grid, grid) for s in seen)
        assert out.shape == (2, 1, r, r, r) and torch.isfinite(out).all()
        z = m.autoencoder.encode(torch.zeros(1, 1, r, r, r))
        assert z.shape == (1, 3, grid, grid, grid) and m.autoencoder.decode(z, r).shape == (1, 1, r, r, r)


def test_a_latent_step_costs_a_fraction_of_the_voxel_flows():
    """What the latent buys: the velocity network runs on 1/64 of the voxels at 2 levels; counted as the
    U-Net's multiply-adds through torch's FLOP counter, one sampler call is far cheaper than flow_refiner's
    at the same widths."""
    from torch.utils.flop_counter import FlopCounterMode

    r = 32
    batch = make_batch(1, resolution=r)
    flops = {}
    for name, m in (("voxel", FlowRefiner(resolution=r, **SMALL)), ("latent", tiny_latent(r))):
        m.eval()
        with torch.no_grad():
            cond = m.condition(batch["xrays"], batch["geometry"], None)
            x = torch.zeros(m.state_shape(cond))
            with FlopCounterMode(display=False) as counter:
                m.velocity(x, torch.zeros(1), cond)
        flops[name] = counter.get_total_flops()
    assert flops["latent"] * 20 < flops["voxel"], flops


def test_the_autoencoder_learns_to_reconstruct_and_the_latent_scale_is_a_running_rms():
    torch.manual_seed(0)
    m = tiny_latent(latent_momentum=0.5)
    m.train()
    batch = make_batch(2, resolution=16)
    ct, prev = batch["ct"], torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    assert not bool(m.latent_scale_measured)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    ae, scales = [], []
    for _ in range(40):
        loss, terms = m.training_loss(batch["xrays"], batch["geometry"], ct, prev)
        assert set(terms) == {"flow", "coarse", "autoencoder", "latent"}
        assert float(loss.detach()) == pytest.approx(float(sum(terms.values())), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ae.append(float(terms["autoencoder"]))
        scales.append(m.latent_scale_value.item())
    assert ae[-1] < 0.5 * ae[0], ae
    # the scale is the first batch's latent RMS, then a running average (momentum 0.5) of later ones
    with torch.no_grad():
        cond = m.condition(batch["xrays"], batch["geometry"], prev)
        z = m.autoencoder.encode((torch.nn.functional.interpolate(ct, size=(16,) * 3) - cond.base)
                                 / m.residual_scale_value)
    rms = float(z.pow(2).mean().sqrt())
    before = m.latent_scale_value.item()
    m.training_loss(batch["xrays"], batch["geometry"], ct, prev)
    assert m.latent_scale_value.item() == pytest.approx(0.5 * before + 0.5 * rms, rel=1e-4)
    m.eval()  # evaluation leaves it alone
    m.training_loss(batch["xrays"], batch["geometry"], ct, prev)
    assert m.latent_scale_value.item() == pytest.approx(0.5 * before + 0.5 * rms, rel=1e-4)
    # it travels with the weights: a fresh model loading them samples the same volume
    fresh = tiny_latent(latent_momentum=0.5)
    fresh.load_state_dict(m.state_dict())
    fresh.eval()
    gen = case_generators(batch["xrays"], batch["geometry"], 0, 0)
    gen2 = case_generators(batch["xrays"], batch["geometry"], 0, 0)
    with torch.no_grad():
        assert torch.equal(m.sample(batch["xrays"], batch["geometry"], prev, generator=gen),
                           fresh.sample(batch["xrays"], batch["geometry"], prev, generator=gen2))


def test_the_flow_loss_does_not_move_the_encoder():
    """The flow trains on the latent with its gradient stopped: the encoder's gradient is the autoencoder's
    loss alone (and none when that weight is 0)."""
    m = tiny_latent(autoencoder_weight=0.0, latent_weight=0.0, coarse_weight=0.0)
    m.train()
    batch = make_batch(2, resolution=16)
    loss, _ = m.training_loss(batch["xrays"], batch["geometry"], batch["ct"])
    loss.backward()
    enc = [p.grad for n, p in m.named_parameters() if n.startswith("autoencoder.enc")]
    assert enc and all(g is None or float(g.abs().sum()) == 0.0 for g in enc)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in m.named_parameters()
               if n.startswith("unet."))


def test_options_are_checked():
    for key, bad, match in (("autoencoder_levels", 0, "autoencoder_levels must be an integer >= 1"),
                            ("autoencoder_levels", 5, "halves the 16\\^3 grid below one voxel; use at most 4"),
                            ("latent_channels", 1.5, "latent_channels must be an integer"),
                            ("autoencoder_weight", -1, "autoencoder_weight must be a number >= 0"),
                            ("latent_momentum", 1.0, "latent_momentum must be a number in \\[0, 1\\)"),
                            ("widths", [], "widths must be a list")):
        with pytest.raises(ValueError, match=match):
            tiny_latent(**{key: bad})
    # the recipe check sees flow_refiner's options by name too (a misspelt key is reported before training)
    import inspect

    params = inspect.signature(LatentFlowRefiner).parameters
    assert {"widths", "sample_shift", "gradient_checkpointing", "latent_channels"} <= set(params)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    from x2ct_framework.errors import DataError

    m = tiny_latent()
    with pytest.raises(DataError, match="latent_flow_refiner"):
        m(torch.zeros(2, 2, 16, 16), {"angles": torch.zeros(2, 2)})


def test_the_autoencoder_decodes_to_any_grid_size():
    ae = VolumeAutoencoder(levels=3, width=4, latent_channels=2)
    for r in (8, 13, 17):
        z = ae.encode(torch.rand(1, 1, r, r, r))
        assert z.shape[-1] == latent_sizes(r, 3)[-1] and ae.decode(z, r).shape == (1, 1, r, r, r)


LATENT = """
name = "latent_flow_refiner"
encoder = "test_resnet"
widths = [8, 16]
emb_dim = 32
feature_channels = 8
steps = 2
autoencoder_width = 8
estimate_losses = true
"""
# test_models_flow's tiny run (4 training phantoms at 16^3, 2 epochs, EMA) with this model
PLUGIN = 'plugins = ["x2ct_plugins.models.latent_flow"]\n'
RECIPE = HEAD.replace(FLOW, LATENT).replace('name = "flow"\n', f'name = "latent"\n{PLUGIN}', 1) + RECIPE_TAIL


@pytest.mark.slow  # two training runs and an evaluation
def test_trainer_trains_the_latent_model_resumes_exactly_and_evaluate_samples(tmp_path, monkeypatch):
    """Through the trainer unchanged: the model's terms and the recipe's l1 on its decoded clean estimate are
    logged and summed; a run interrupted mid-epoch and resumed ends with the weights of an uninterrupted one
    (EMA and the latent scale included); x2ct evaluate scores the mean of samples and one sample."""
    from x2ct_framework.run import main as run_main
    from x2ct_plugins.models import latent_flow

    path = tmp_path / "latent.toml"
    path.write_text(RECIPE.format(out=(tmp_path / "runs").as_posix()))
    ref = ["--set", f'output_dir="{(tmp_path / "ref").as_posix()}"']
    assert run_main([str(path), *ref]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ref/latent/stage1/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    keys = ("train/flow", "train/coarse", "train/autoencoder", "train/latent", "train/l1")
    assert len(train) == 4 and all(set(keys) <= set(r) for r in train)
    assert all(r["train/loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5) for r in train)

    calls = {"n": 0}
    real = latent_flow.LatentFlowRefiner.training_loss

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(latent_flow.LatentFlowRefiner, "training_loss", interrupting)
    assert run_main([str(path)]) == 130
    monkeypatch.setattr(latent_flow.LatentFlowRefiner, "training_loss", real)
    assert run_main([str(path), "--resume"]) == 0
    a = ckpt.load_weights(tmp_path / "runs/latent/stage1/last")
    b = ckpt.load_weights(tmp_path / "ref/latent/stage1/last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("latent_scale_value") for k in a)

    from x2ct_framework.evaluation.evaluate import DIVERSITY, ONE_SAMPLE, evaluate
    from x2ct_framework.runs import resolve_target

    ev = evaluate(resolve_target(tmp_path / "runs/latent"), "test", ["default"], n_boot=50, worst=1, keep_first=1,
                  progress=False, lpips="off", samples=2, out_dir=tmp_path / "ev")
    assert ev.info["samples"] == 2 and np.all(ev.values[DIVERSITY] > 0)
    assert np.all(np.isfinite(ev.values["default/psnr"]))
    assert np.all(np.isfinite(ev.values[f"{ONE_SAMPLE}default/psnr"]))
    summary = json.loads((tmp_path / "ev/summary.json").read_text())
    assert summary["generative"]["samples"] == 2 and "default/psnr" in summary["generative"]["one_sample"]


@pytest.mark.slow  # two processes
def test_two_cpu_processes_keep_the_weights_and_the_latent_scale_in_sync(tmp_path):
    """Under DDP (2 gloo processes) the gradients are all-reduced and the running latent scale is averaged over
    processes: after every update both hold the same weights and buffers (the hash covers the state dict)."""
    from test_models_flow import two_process_hashes

    path = tmp_path / "latent.toml"
    text = RECIPE.format(out=(tmp_path / "runs").as_posix())
    plugin = '"x2ct_plugins.models.latent_flow"'
    path.write_text(text.replace(f"{plugin}]", f'{plugin}, "weights_hash.py"]'))
    r0, r1 = two_process_hashes(tmp_path, path)
    assert len(r0) == 2 and r0 == r1
    assert r0[0].split()[1] != r0[1].split()[1]

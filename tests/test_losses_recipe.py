"""Losses inside real runs: the stage-2 loss of the user's plan end to end, recipe errors, and adversarial training."""

import json

import pytest
import torch

from x2ct_framework import checkpoint as ckpt
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.run import main as run_main

# no report, previews or trackers; timm's 0.4M-parameter test encoder instead of resnet18 (the losses are under test)
QUIET = ["eval.report=false", "eval.preview=false", 'train.trackers=["none"]', 'model.encoder="test_resnet"']


def cli(recipe, *args):
    return run_main([str(recipe), *[a for q in QUIET for a in ("--set", q)], *args])


def rows(run_dir, kind="train"):
    lines = (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


SEED_STAGE2 = 'stages.1.losses={ l1 = 1.0, ssim = 0.5, vgg = { weight = 0.1, weights = "random" }, gradient = 0.15 }'


@pytest.mark.slow
def test_seed_stage2_loss_runs_end_to_end(tiny_recipe, tmp_path):
    """``L1 + 0.5 SSIM + 0.1 VGG + 0.15 gradient`` (train_stage2_extended.py's loss), each term logged."""
    assert cli(tiny_recipe, "--set", SEED_STAGE2, "--set", "stages.1.epochs=2") == 0
    run = tmp_path / "runs" / "tiny"
    train = rows(run)
    assert train
    for row in train:
        terms = {k: row[f"train/{k}"] for k in ("l1", "ssim", "vgg", "gradient")}
        assert all(v > 0 for v in terms.values())
        total = terms["l1"] + 0.5 * terms["ssim"] + 0.1 * terms["vgg"] + 0.15 * terms["gradient"]
        assert row["train/loss"] == pytest.approx(total, rel=1e-4)
    resolved = (run / "recipe.toml").read_text()
    assert 'weights = "random"' in resolved and "gradient" in resolved
    assert ckpt.exists(run / "stage1" / "best")


@pytest.mark.parametrize("losses, message", [
    ("{ l1 = 1.0, ssim = -0.5 }",
     "tiny.toml: stages -> 1 -> losses -> ssim -> weight: expected a number >= 0, got -0.5"),
    ("{ ssim = { weight = 0.5, win_sise = 7 } }",
     'tiny.toml: stages -> 1 -> losses -> ssim -> win_sise: unknown option for loss \'ssim\'; did you mean "win_size"'),
    ('{ lpips = { net = "resnet" } }',
     "tiny.toml: stages -> 1 -> losses -> lpips: loss 'lpips' rejected its options: net: unknown LPIPS backbone "
     "'resnet'; choose from 'alex', 'vgg'"),
    ('{ edges = { name = "gradient", mode = "sobel" } }',
     "tiny.toml: stages -> 1 -> losses -> edges: loss 'gradient' rejected its options: mode must be one of"),
    ("{ ssim2 = 0.5 }", 'tiny.toml: stages -> 1 -> losses -> ssim2: unknown loss "ssim2"; did you mean "ssim"?'),
])
def test_bad_loss_tables_are_one_line_errors_naming_file_and_key(tiny_recipe, capsys, losses, message):
    text = tiny_recipe.read_text()
    tiny_recipe.write_text(text.replace("losses = { l1 = 1.0 }", f"losses = {losses}"))
    assert cli(tiny_recipe) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---- adversarial ---------------------------------------------------------------------------------
ADVERSARIAL = ('stages.1.losses={ l1 = 1.0, adversarial = { weight = 0.1, layers = 2, channels = 4, lr = 1e-3, '
               'objective = "hinge" } }')
COMMON = ["--set", ADVERSARIAL, "--set", "stages.1.epochs=2", "--set", "train.batch_size=2"]


class StopAfterFirstEpoch:
    """Ctrl-C at the end of epoch 1, after its checkpoint is written."""

    @hookimpl
    def on_epoch_end(self, trainer, stage, epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_adversarial_trains_logs_checkpoints_and_resumes_both_players(tiny_recipe, tmp_path):
    ref = tmp_path / "ref"
    assert cli(tiny_recipe, *COMMON, "--set", f'output_dir="{ref.as_posix()}"') == 0
    train = rows(ref / "tiny")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 4 cases, batch 2, 2 epochs, a row per step
    assert train[0]["train/adversarial"] == 0.0  # no trained critic before its first update
    assert all(r["train/adversarial"] != 0.0 for r in train[1:])
    assert all(r["train/adversarial/parts_loss"] > 0 for r in train)
    parts = ckpt.load_trainer_state(ref / "tiny/stage1/last")["parts"]["adversarial"]
    assert int(parts["weights"]["updates"]) == 4
    assert any("parametrizations" in k for k in parts["weights"])  # spectral norm (default on)
    assert all(int(s["step"]) == 4 for s in parts["optimizer"]["state"].values())
    assert parts["optimizer"]["param_groups"][0]["lr"] == 1e-3

    # interrupted after epoch 1, then --resume: both the model and the critic end where the straight run did
    get_plugin_manager().register_object(StopAfterFirstEpoch(), "stop-after-first-epoch")
    assert cli(tiny_recipe, *COMMON) == 130
    get_plugin_manager().unregister("stop-after-first-epoch")
    run = tmp_path / "runs" / "tiny"
    half = ckpt.load_trainer_state(run / "stage1/last")["parts"]["adversarial"]
    assert int(half["weights"]["updates"]) == 2
    assert cli(tiny_recipe, *COMMON, "--resume") == 0
    resumed = ckpt.load_trainer_state(run / "stage1/last")["parts"]["adversarial"]
    for k, v in parts["weights"].items():
        assert torch.equal(resumed["weights"][k], v), k
    for i, s in parts["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["exp_avg"], s["exp_avg"])
    model_ref, model_res = ckpt.load_weights(ref / "tiny/stage1/last"), ckpt.load_weights(run / "stage1/last")
    assert all(torch.equal(model_ref[k], model_res[k]) for k in model_ref)
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]

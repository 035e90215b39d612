"""The trainer side of the "loss with trainable parts" contract, with a small critic loss."""

import json
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_trainer import cli, same, tiny  # noqa: F401 (tiny is a fixture)
from x2ct_framework.checkpoint import load_state, load_trainer_state, load_weights
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.training.trainer import Trainer


class CriticLoss(nn.Module):
    """L1 plus a least-squares critic on the prediction; the critic trains every ``every`` steps."""

    interrupt_at = -1  # raise KeyboardInterrupt at this parts_loss call (tests Ctrl-C + --resume)

    def __init__(self, every: int = 2, lr: float = 1e-2):
        super().__init__()
        self.critic = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.GELU(), nn.Conv3d(2, 1, 1))
        self.every, self.lr = every, lr
        self.calls: list[int] = []

    def forward(self, pred, target, batch):
        return (pred - target).abs().mean() + 0.01 * ((self.critic(pred) - 1) ** 2).mean()

    def trainable_parts(self):
        return self.critic

    def configure_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.lr)

    def parts_loss(self, pred_detached, target, batch, *, epoch, step):
        assert not pred_detached.requires_grad
        if step % self.every:
            return None
        self.calls.append(step)
        if len(self.calls) - 1 == CriticLoss.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of an update
        return F.mse_loss(self.critic(pred_detached), torch.zeros_like(pred_detached)) + \
            F.mse_loss(self.critic(target), torch.ones_like(target))


class CriticPlugin:
    made: list[CriticLoss] = []

    @hookimpl
    def register_losses(self, register):
        def factory(every: int = 2, lr: float = 1e-2):
            loss = CriticLoss(every, lr)
            CriticPlugin.made.append(loss)
            return loss

        register("critic", factory)


def test_trainable_parts_are_trained_logged_and_checkpointed(tiny, tmp_path):
    CriticPlugin.made = []
    get_plugin_manager().register_object(CriticPlugin(), "critic-test")
    recipe = load_recipe(tiny, ["stages.1.epochs=2", "stages.1.losses={ critic = 1.0 }", "train.batch_size=1",
                                "train.trackers=[]"])
    Trainer(recipe).run()
    loss = CriticPlugin.made[-1]
    assert loss.calls == [0, 2, 4, 6]  # 4 cases / batch 1 = 4 steps an epoch, every 2nd step, 2 epochs
    rows = [json.loads(x) for x in (tmp_path / "runs/tiny/stage1/metrics.jsonl").read_text().splitlines()]
    logged = [r["train/critic/parts_loss"] for r in rows if "train/critic/parts_loss" in r]
    assert logged and all(v > 0 for v in logged)
    state = load_trainer_state(tmp_path / "runs/tiny/stage1/last")
    parts = state["parts"]["critic"]
    for k, v in loss.critic.state_dict().items():
        assert torch.equal(parts["weights"][k], v.cpu())
    adam = parts["optimizer"]
    assert len(adam["state"]) == len(list(loss.critic.parameters()))
    assert all(int(s["step"]) == 4 for s in adam["state"].values())  # 4 critic updates
    assert adam["param_groups"][0]["lr"] == 1e-2
    fresh = CriticLoss()
    assert not all(torch.equal(fresh.critic.state_dict()[k], v.cpu()) for k, v in loss.critic.state_dict().items())


@pytest.mark.slow
def test_trainable_parts_resume_exactly_after_ctrl_c(tiny, tmp_path):
    get_plugin_manager().register_object(CriticPlugin(), "critic-test")
    common = ["--set", "stages.1.epochs=2", "--set", "stages.1.losses={ critic = 1.0 }", "--set",
              "train.batch_size=1"]
    CriticLoss.interrupt_at = -1
    assert cli(tiny, *common, "--set", f"output_dir=\"{tmp_path}/ref\"") == 0
    CriticLoss.interrupt_at = 3  # during the critic's 4th update (epoch 2, update 7): stops after it
    try:
        assert cli(tiny, *common) == 130
    finally:
        CriticLoss.interrupt_at = -1
    last = tmp_path / "runs/tiny/stage1/last"
    assert load_state(last)["interrupted"] and load_state(last)["step"] == 7
    assert cli(tiny, *common, "--resume") == 0
    got, ref = load_trainer_state(last), load_trainer_state(tmp_path / "ref/tiny/stage1/last")
    assert same(got["parts"]["critic"]["weights"], ref["parts"]["critic"]["weights"])
    assert same(load_weights(last), load_weights(tmp_path / "ref/tiny/stage1/last"))
    assert int(got["parts"]["critic"]["optimizer"]["state"][0]["step"]) == 4

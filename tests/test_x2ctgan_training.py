"""X2CT-GAN's training parts: the projection loss, the conditional critic, the linear-decay schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from x2ct_framework.config.optim import lr_at
from x2ct_framework.physics import make_geometry
from x2ct_plugins.losses.adversarial import AdversarialLoss
from x2ct_plugins.losses.projection import ProjectionLoss


def test_projection_loss_matches_a_numpy_reference():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 8, 9, 10) - 0.2, torch.rand(2, 1, 8, 9, 10)
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    ref = np.mean([np.abs(np.abs(p).mean(a) - np.abs(t).mean(a)).mean() for a in (2, 3, 4)])
    assert ProjectionLoss()(pred, target, {}).item() == pytest.approx(ref, rel=1e-5)
    ref_y = np.abs(np.abs(p).mean(3) - np.abs(t).mean(3)).mean()
    assert ProjectionLoss(axes=["y"])(pred, target, {}).item() == pytest.approx(ref_y, rel=1e-5)
    assert ProjectionLoss()(target, target, {}).item() == 0.0
    with pytest.raises(ValueError, match="axes must be"):
        ProjectionLoss(axes=["q"])


def test_linear_decay_is_cyclegans_rule():
    # X2CT-GAN: niter = 50 constant epochs, niter_decay = 50 linear ones; factor 1 - max(0, e + 1 - 50) / 51
    for e in range(100):
        expected = 2e-4 * (1.0 - max(0, e + 1 - 50) / 51.0)
        assert lr_at(e, 100, 2e-4, 0.0, kind="linear_decay", constant_steps=50) == pytest.approx(expected)


def test_x2ctgan_critic_has_their_size():
    loss = AdversarialLoss(arch="x2ctgan", condition="xrays", views=[0.0, 270.0])
    params = sum(p.numel() for p in loss.trainable_parts().parameters())
    assert params / 1e6 == pytest.approx(11.06, abs=0.005)  # X2CT-GAN's basic3d critic on CT + two X-rays
    state = loss.trainable_parts().state_dict()
    assert tuple(state["model.0.weight"].shape) == (64, 3, 4, 4, 4)
    assert "model.3.bias" not in state and tuple(state["model.11.weight"].shape) == (1, 512, 4, 4, 4)


def test_conditional_critic_sees_the_xrays():
    torch.manual_seed(0)
    loss = AdversarialLoss(arch="x2ctgan", condition="xrays", channels=4, layers=2, views=[0.0, 270.0])
    geometry = {k: v[None] for k, v in make_geometry([0.0, 270.0]).items()}
    xrays = torch.rand(1, 2, 1, 16, 16)
    batch = {"xrays": xrays, "geometry": geometry}
    pred = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    target = torch.rand(1, 1, 16, 16, 16)
    cond = loss.critic_input(target, batch)
    assert cond.shape == (1, 3, 16, 16, 16)
    # a parallel PA view spread along its rays: constant along y (the ray), the image along z and x
    torch.testing.assert_close(cond[0, 0, :, 0], cond[0, 0, :, 7])
    assert cond[0, 0, :, 0].std() > 0
    d = loss.parts_loss(pred.detach(), target, batch, epoch=0, step=0)
    assert d is not None and d.requires_grad
    g = loss(pred, target, batch)
    g.backward()
    assert pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.trainable_parts().parameters())
    other = {"xrays": torch.rand(1, 3, 1, 16, 16), "geometry": make_geometry([0.0, 90.0, 180.0])}
    with pytest.raises(ValueError, match="built for 2 views"):
        loss.critic_input(target, other)

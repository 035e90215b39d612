"""``drr_projection``: DRRs of the prediction against DRRs of the target, in the batch geometry."""

from __future__ import annotations

import pytest
import torch

from x2ct_framework.errors import RecipeError
from x2ct_framework.physics import make_geometry
from x2ct_framework.plugins import get_plugin_manager


def make(**options):
    return get_plugin_manager().registry("loss").create("drr_projection", options, where="r.toml: losses",
                                                        context={"hu_window": [-1000, 3000]})


def batch(angles, b=2):
    g = make_geometry(angles, "parallel")
    return {"geometry": {k: v[None].expand(b, *v.shape).clone() for k, v in g.items()},
            "xrays": torch.zeros(b, len(angles), 1, 16, 16)}


def test_sees_only_what_the_views_see():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 16, 16, 16) * 0.3
    shifted = torch.roll(target, 3, dims=3)      # along H = y: the PA rays' own direction
    pa, both = make(), make()
    assert pa(target.clone(), target, batch([0])).item() == 0.0
    # A shift along the PA rays leaves the PA DRR unchanged (parallel beam: a cyclic shift keeps every ray sum)
    assert pa(shifted, target, batch([0])).item() < 1e-5
    assert both(shifted, target, batch([0, 90])).item() > 1e-3
    # extra angles see it too, from the PA view alone
    assert make(angles=[90])(shifted, target, batch([0])).item() > 1e-3
    assert (shifted - target).abs().mean() > 0.05


def test_gradient_reaches_the_prediction_and_det_size():
    target = torch.rand(1, 1, 16, 16, 16) * 0.3
    pred = torch.full_like(target, 0.2, requires_grad=True)  # -200 HU: neither air (no attenuation) nor clipped
    loss = make(det_size=8, distance="l2")(pred, target, batch([0, 90], b=1))
    loss.backward()
    assert loss.item() > 0 and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("options,match", [({"distance": "huber"}, "distance must be one of"),
                                           ({"det_size": -2}, "det_size must be an integer >= 0"),
                                           ({"drr_options": {"det_shape": 4}}, "drr_options may not set")])
def test_bad_options(options, match):
    with pytest.raises(RecipeError, match=match):
        make(**options)

"""vit_cascade's pooled-key attention (``kv_pool``): the same attention as a hand-written reference, the same
parameters as full attention, fewer FLOPs, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework import testing
from x2ct_framework.model_info import step_flops
from x2ct_framework.physics import make_geometry
from x2ct_plugins.models.attention import Attention
from x2ct_plugins.models.vit_cascade import ViTCascade

TINY = dict(tokens=4, dim=16, depth=1, heads=2, channels=4, encoder="test_resnet", xray_size=16)


def reference_attention(attn: Attention, x: torch.Tensor, g: int, r: int) -> torch.Tensor:
    """Softmax attention written out: queries from every token, keys/values from r x r x r block means."""
    b, n, c = x.shape
    w, bias = attn.qkv.weight, attn.qkv.bias
    wq, wk, wv = w[:c], w[c:2 * c], w[2 * c:]
    bq, bk, bv = bias[:c], bias[c:2 * c], bias[2 * c:]
    blocks = x.reshape(b, g // r, r, g // r, r, g // r, r, c).mean(dim=(2, 4, 6)).reshape(b, -1, c)
    q, k, v = x @ wq.T + bq, blocks @ wk.T + bk, blocks @ wv.T + bv
    h = attn.heads
    split = lambda t: t.reshape(b, t.shape[1], h, c // h).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("g,r", [(4, 1), (4, 2), (6, 3), (6, 2)])
def test_pooled_attention_equals_the_written_out_reference(g, r):
    torch.manual_seed(0)
    attn = Attention(16, 2, kv_pool=r, grid=g).double()
    x = torch.randn(2, g**3, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x, g, r), rtol=1e-10, atol=1e-10)


def test_attention_refuses_a_grid_it_cannot_pool_and_the_wrong_token_count():
    with pytest.raises(ValueError, match="divisible"):
        Attention(16, 2, kv_pool=2, grid=5)
    with pytest.raises(ValueError, match="expected 4\\^3 = 64 tokens, got 27"):
        Attention(16, 2, kv_pool=2, grid=4)(torch.randn(1, 27, 16))


def geometry(batch=2):
    g = make_geometry([0.0, 90.0], "parallel")
    return {k: v[None].expand(batch, *v.shape).clone() for k, v in g.items()}


def test_vit_cascade_with_pooled_keys_has_the_same_parameters_and_passes_the_model_checks():
    torch.manual_seed(0)
    full = ViTCascade(resolution=8, **TINY)
    pooled = ViTCascade(resolution=8, **TINY, kv_pool=2)
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in pooled.state_dict().items()}
    pooled.load_state_dict(full.state_dict())  # strict: weights move between the two settings
    torch.manual_seed(1)
    xrays = torch.rand(2, 2, 1, 16, 16)
    full.eval(), pooled.eval()
    with torch.no_grad():
        a, b = full(xrays, geometry()), pooled(xrays, geometry())
    assert a.shape == b.shape == (2, 1, 8, 8, 8)
    assert not torch.allclose(a, b)  # the pooling is in the path
    testing.check_model(ViTCascade(resolution=8, **TINY, kv_pool=2), resolution=8, image_size=16, autocast_dtypes=())


def test_pooled_keys_cut_the_step_flops_in_proportion_to_the_keys():
    xrays, g = torch.rand(1, 2, 1, 16, 16), geometry(1)
    big = dict(TINY, tokens=8, dim=32)
    flops = {r: step_flops(ViTCascade(resolution=16, **big, kv_pool=r), xrays, g) for r in (1, 2, 4)}
    assert flops[1] > flops[2] > flops[4]
    # everything that depends on the number of keys m (attention's products, the key/value projections)
    # is linear in m = 512 / r^3, the rest of the step does not change: the savings are in the ratio
    # (1 - 1/8) : (1 - 1/64)
    assert (flops[1] - flops[2]) / (flops[1] - flops[4]) == pytest.approx((7 / 8) / (63 / 64), rel=1e-6)


@pytest.mark.parametrize("value", [0, 3, True, 1.5])
def test_vit_cascade_names_a_bad_kv_pool(value):
    with pytest.raises(ValueError, match="kv_pool must be an integer >= 1 that divides tokens \\(4\\)"):
        ViTCascade(resolution=8, **TINY, kv_pool=value)

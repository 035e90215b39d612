"""model_info: parameter and token counts, forward FLOPs and activation memory, and `x2ct validate`."""

from __future__ import annotations

import torch

from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.model_info import flop_counter, model_info
from x2ct_framework.physics import make_geometry
from x2ct_plugins.models.cnn_baseline import CNNBaseline
from x2ct_plugins.models.vit_cascade import ViTCascade


def _geometry(angles):
    return {k: v[None] for k, v in make_geometry(angles).items()}


def _real_forward(model, xrays, g):
    """FLOPs counted on real tensors and the bytes of the distinct tensors saved for backward."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(xrays, g)
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(xrays, g)
    return counter.get_total_flops(), sum(saved.values())


def test_estimates_match_a_real_forward_pass():
    torch.manual_seed(0)
    model = ViTCascade(resolution=16, tokens=4, dim=16, depth=2, heads=2, channels=4, encoder="test_resnet").train()
    xrays, g = torch.rand(1, 2, 1, 16, 16), _geometry([0, 90])
    info = model_info(model, xrays, g)
    flops, saved = _real_forward(model, xrays, g)
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.tokens == 64 and info.token_grid == 4
    assert info.forward_flops == flops > 0
    assert info.activation_bytes == saved > 0
    assert 0 < info.activation_bytes_checkpointed < info.activation_bytes
    assert model.gradient_checkpointing is False and model.training  # restored


def test_estimates_are_per_sample_and_grow_with_the_token_grid():
    torch.manual_seed(0)
    kw = dict(resolution=16, dim=16, depth=1, heads=2, channels=4, encoder="test_resnet")
    g2 = {k: v.expand(3, *v.shape[1:]) for k, v in _geometry([0, 90]).items()}
    small = model_info(ViTCascade(tokens=4, **kw), torch.rand(3, 2, 1, 16, 16), g2)
    one = model_info(ViTCascade(tokens=4, **kw), torch.rand(1, 2, 1, 16, 16), _geometry([0, 90]))
    big = model_info(ViTCascade(tokens=8, **kw), torch.rand(1, 2, 1, 16, 16), _geometry([0, 90]))
    assert small.forward_flops == one.forward_flops
    assert big.tokens == 512 and big.forward_flops > one.forward_flops


def test_stage2_defaults_are_described_without_running_them():
    """The user's stage 2 (128^3, 24^3 tokens, two 128^2 views) at the default sizes, on fake tensors."""
    info = model_info(ViTCascade(resolution=128), torch.rand(1, 2, 1, 128, 128), _geometry([0, 90]))
    assert info.tokens == 24**3 == 13_824
    assert 1e12 < info.forward_flops < 3e12
    assert info.activation_bytes > 2 * info.activation_bytes_checkpointed  # the benchmark target
    text = info.describe()
    assert "13,824 tokens (24^3)" in text and "TFLOP forward" in text and "with gradient checkpointing" in text


def test_cnn_baseline_has_no_tokens():
    model = CNNBaseline(resolution=16, channels=4, levels=2)
    info = model_info(model, torch.rand(1, 2, 1, 16, 16), _geometry([0, 90]))
    assert info.tokens is None and info.forward_flops > 0 and "tokens" not in info.describe()


def test_validate_prints_model_cost_per_stage(tiny_recipe, capsys):
    assert x2ct_main(["validate", str(tiny_recipe), "--describe"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("model:"))
    assert "M params" in line and "64 tokens (4^3)" in line and "FLOP forward" in line
    assert "activations" in line and "with gradient checkpointing" in line and "per sample" in line

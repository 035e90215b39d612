"""Model plugins on tiny sizes: shapes for any view count, view-order invariance, gradients,
gradient checkpointing, stage-to-stage checkpoint loading, encoders and bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from x2ct_framework.checkpoint import load_into, save_checkpoint
from x2ct_framework.errors import CheckpointError, DataError, RecipeError
from x2ct_framework.physics import make_geometry
from x2ct_framework.plugins import get_plugin_manager
from x2ct_plugins.models.cnn_baseline import CNNBaseline
from x2ct_plugins.models.vit_cascade import ViTCascade

TINY_VIT = dict(tokens=4, dim=16, depth=2, heads=2, channels=4, encoder="test_resnet")
TINY_CNN = dict(channels=4, levels=3)


def geometry(angles, batch=2, preset="parallel"):
    g = make_geometry(angles, preset)
    return {k: v[None].expand(batch, *v.shape).clone() for k, v in g.items()}


def angles_for(v):
    return [i * 180.0 / v + 7.0 * i for i in range(v)]


def vit(resolution=16, **kw):
    torch.manual_seed(0)
    return ViTCascade(resolution=resolution, **{**TINY_VIT, **kw})


def cnn(resolution=16, views=(0.0, 90.0), **kw):
    torch.manual_seed(0)
    return CNNBaseline(resolution=resolution, views=list(views), **{**TINY_CNN, **kw})


@pytest.mark.parametrize("kind", ["vit_cascade", "cnn_baseline"])
@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_output_shape_for_any_number_of_views(kind, views):
    angles = angles_for(views)
    model = vit() if kind == "vit_cascade" else cnn(views=angles)
    xrays = torch.rand(2, views, 1, 16, 16)
    out = model(xrays, geometry(angles))
    assert out.shape == (2, 1, 16, 16, 16)
    assert torch.isfinite(out).all()


def test_output_resolution_independent_of_tokens_and_cone_beam():
    model = vit(resolution=20, tokens=6)
    out = model(torch.rand(1, 2, 1, 24, 24), geometry([0, 90], batch=1, preset="x2ctgan"))
    assert out.shape == (1, 1, 20, 20, 20)
    assert model.level_sizes[-1] == 20


def _permuted(g, perm):
    return {k: v[:, perm] for k, v in g.items()}


def test_fused_features_invariant_to_view_order():
    model = vit().eval()
    angles = [0.0, 45.0, 90.0, 150.0]
    xrays, g = torch.rand(2, 4, 1, 16, 16), geometry(angles)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        fused = model.lift_views(xrays, g)
        fused_perm = model.lift_views(xrays[:, perm], _permuted(g, perm))
        out, out_perm = model(xrays, g), model(xrays[:, perm], _permuted(g, perm))
        # Permuting the images without their geometry pairs each image with another view's rays.
        mismatched = model.lift_views(xrays[:, perm], g)
    assert fused.shape == (2, 16, 4, 4, 4)
    torch.testing.assert_close(fused_perm, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_perm, out, rtol=1e-5, atol=1e-5)
    assert (mismatched - fused).abs().max() > 1e-3


def test_shared_encoder_cnn_baseline_is_view_order_invariant():
    model = cnn(share_encoder=True).eval()
    angles = [0.0, 60.0, 120.0]
    xrays, g = torch.rand(1, 3, 1, 16, 16), geometry(angles, batch=1)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(xrays[:, perm], _permuted(g, perm)), model(xrays, g), rtol=1e-5, atol=1e-5)


def _assert_every_parameter_has_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached: {missing}"


def test_gradients_reach_every_parameter_vit():
    # zero_init_last=False: timm's ResNet zero-initialises each block's last norm, which blocks
    # gradients to the convolutions before it at step 0 (by design); here every path must carry one.
    model = vit(encoder_kwargs={"zero_init_last": False}).train()
    out = model(torch.rand(2, 2, 1, 16, 16), geometry([0, 90]))
    ((out - torch.rand_like(out)) ** 2).mean().backward()
    _assert_every_parameter_has_gradient(model)


def test_gradients_reach_every_parameter_cnn_baseline():
    model = cnn().train()
    out = model(torch.rand(2, 2, 1, 16, 16), geometry([0, 90]))
    ((out - torch.rand_like(out)) ** 2).mean().backward()
    _assert_every_parameter_has_gradient(model)


def test_prev_is_upsampled_and_refined():
    model = vit(resolution=16).eval()
    xrays, g = torch.rand(1, 2, 1, 16, 16), geometry([0, 90], batch=1)
    prev = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        a = model(xrays, g, prev=prev)
        b = model(xrays, g, prev=prev + 0.5)
        c = model(xrays, g)
    assert a.shape == (1, 1, 16, 16, 16)
    # The last level adds a residual to the upsampled prev (small at initialisation); without prev
    # it refines the model's own coarser prediction, which is far from this prev.
    up = torch.nn.functional.interpolate(prev, size=(16, 16, 16), mode="trilinear", align_corners=False)
    assert (a - up).abs().mean() < 0.1 * (c - up).abs().mean()
    assert (b - a).mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("kind", ["vit_cascade", "cnn_baseline"])
def test_gradient_checkpointing_same_loss_and_gradients(kind):
    torch.manual_seed(1)
    xrays, g = torch.rand(2, 2, 1, 16, 16), geometry([0, 90])
    target = torch.rand(2, 1, 16, 16, 16)
    results = []
    for flag in (False, True):
        model = (vit(drop_path=0.3, gradient_checkpointing=flag) if kind == "vit_cascade"
                 else cnn(gradient_checkpointing=flag)).train()
        torch.manual_seed(2)  # the same stochastic-depth draws; checkpointing replays them in the backward pass
        loss = (model(xrays, g) - target).abs().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["vit_cascade", "cnn_baseline"])
def test_bf16_autocast_with_checkpointing(kind):
    model = (vit if kind == "vit_cascade" else cnn)(gradient_checkpointing=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 2, 1, 16, 16), geometry([0, 90], batch=1, preset="x2ctgan"))
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out.float()).all()
    out.float().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _create(name, options, resolution, views=(0, 90)):
    return get_plugin_manager().registry("model").create(
        name, options, where="r.toml: model", context={"resolution": resolution, "views": list(views),
                                                       "gradient_checkpointing": False, "seed": 0})


@pytest.mark.parametrize("kind,options", [("vit_cascade", TINY_VIT), ("cnn_baseline", TINY_CNN)])
def test_stage1_checkpoint_loads_into_stage2(tmp_path, kind, options):
    stage1 = _create(kind, options, resolution=16)
    save_checkpoint(tmp_path / "stage1" / "best", stage1, {"stage": "stage1"})
    stage2 = _create(kind, options, resolution=32)
    load_into(stage2, tmp_path / "stage1" / "best", strict=True)
    for k, v in stage1.state_dict().items():
        assert torch.equal(stage2.state_dict()[k], v), k
    out = stage2(torch.rand(1, 2, 1, 32, 32), geometry([0, 90], batch=1))
    assert out.shape == (1, 1, 32, 32, 32)


def test_checkpoint_loads_across_token_grids(tmp_path):
    """The 24^3 -> 32^3 future-work variant starts from the 24^3 weights (positions are not learned per token)."""
    save_checkpoint(tmp_path / "ck", vit(tokens=4), {})
    load_into(vit(tokens=6), tmp_path / "ck", strict=True)


def test_freeze_prefixes_name_real_parameters():
    names = [n for n, _ in vit().named_parameters()]
    for prefix in ("encoder.", "lift.", "transformer.", "transformer.blocks.0.", "decoder.", "decoder.levels.0."):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all(n.split(".")[0] in {"encoder", "lift", "transformer", "decoder"} for n in names)


@pytest.mark.parametrize("encoder,kwargs", [("test_convnext", {}), ("test_efficientnet", {}),
                                            ("test_vit", {"img_size": 32})])
def test_any_timm_encoder(encoder, kwargs):
    model = vit(encoder=encoder, encoder_kwargs=kwargs)
    out = model(torch.rand(1, 2, 1, 32, 32), geometry([0, 90], batch=1))
    assert out.shape == (1, 1, 16, 16, 16)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("xrays,angles,match", [
    (torch.rand(2, 2, 16, 16), [[0, 90], [0, 90]], r"xrays must be \[B, V, 1, H, W\]"),
    (torch.rand(2, 2, 3, 16, 16), [[0, 90], [0, 90]], r"xrays must be \[B, V, 1, H, W\]"),
    (torch.rand(2, 0, 1, 16, 16), [[], []], "no views"),
    (torch.rand(2, 3, 1, 16, 16), [[0, 90], [0, 90]], r"angles'\] has shape \(2, 2\) .* 3 views .* \[2, 3\]"),
    (torch.rand(2, 2, 1, 16, 16), [[0, 90]], r"angles'\] has shape \(1, 2\) .* expected \[B, V\] = \[2, 2\]"),
])
@pytest.mark.parametrize("kind", ["vit_cascade", "cnn_baseline"])
def test_bad_views_or_geometry_is_a_clear_error(kind, xrays, angles, match):
    model = vit() if kind == "vit_cascade" else cnn(share_encoder=True)
    with pytest.raises(DataError, match=match):
        model(xrays, {"angles": torch.tensor(angles, dtype=torch.float32).reshape(len(angles), -1)})


def test_missing_angles_and_bad_prev():
    model = vit()
    with pytest.raises(ValueError, match=r"geometry must be a dict with 'angles'"):
        model(torch.rand(1, 2, 1, 16, 16), {"volume_mm": torch.ones(1, 2, 3)})
    with pytest.raises(ValueError, match=r"prev .* must be \[B, 1, D, H, W\] with B = 1"):
        model(torch.rand(1, 2, 1, 16, 16), geometry([0, 90], batch=1), prev=torch.rand(2, 1, 8, 8, 8))


def test_cnn_baseline_with_one_encoder_per_view_needs_that_many_views():
    model = cnn(views=(0, 90))
    with pytest.raises(DataError, match="built for 2 views .* got 3 views"):
        model(torch.rand(1, 3, 1, 16, 16), geometry([0, 60, 120], batch=1))


@pytest.mark.parametrize("options,match", [
    ({"dim": 18, "heads": 4}, r"dim \(18\) must be divisible by heads \(4\)"),
    ({"tokens": 1}, "tokens must be an integer >= 2"),
    ({"encoder": "resnet1B"}, r'unknown timm model .*did you mean "resnet18"'),
    ({"drop_path": 1.5}, r"drop_path must be in \[0, 1\)"),
])
def test_bad_options_name_the_recipe_key(options, match):
    with pytest.raises(RecipeError, match=r"r.toml: model: model 'vit_cascade' rejected its options: .*" + match):
        _create("vit_cascade", {**TINY_VIT, **options}, resolution=16)


# ---- pretrained encoders (never downloads) -------------------------------------------------------

def test_pretrained_file_is_loaded(tmp_path):
    import timm

    src = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = vit(pretrained=True, pretrained_file=str(path))
    ours, theirs = model.encoder.body.state_dict(), src.state_dict()
    torch.testing.assert_close(ours["layer2.0.conv1.weight"], theirs["layer2.0.conv1.weight"])
    # One-channel X-rays: timm folds the RGB filters of the first convolution into one.
    torch.testing.assert_close(ours["conv1.0.weight"], theirs["conv1.0.weight"].sum(1, keepdim=True))


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    with pytest.raises(CheckpointError) as info:
        vit(pretrained=True)
    msg = str(info.value)
    assert "test_resnet.r160_in1k" in msg and "model.safetensors" in msg and "model.pretrained_file" in msg
    assert str(tmp_path / "hub") in msg
    with pytest.raises(CheckpointError, match=r"pretrained_file: .*nowhere.safetensors does not exist"):
        vit(pretrained=True, pretrained_file=str(tmp_path / "nowhere.safetensors"))

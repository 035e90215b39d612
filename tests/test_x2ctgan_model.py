"""The faithful X2CT-GAN generator: published size, checkpoint layout, the model contract at CPU widths."""

from __future__ import annotations

import pytest
import torch

from x2ct_framework.errors import CheckpointError, DataError
from x2ct_plugins.models.inputs import ModelInputError
from x2ct_plugins.models.x2ctgan import X2CTGAN, load_x2ctgan_checkpoint

TINY = dict(resolution=32, image_size=64, width_divisor=16, encoder_blocks=[1, 1, 1, 1, 1])


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.fixture(scope="module")
def full():
    return X2CTGAN(resolution=128)


def test_published_parameter_count(full):
    # X2CT-GAN's multiview generator at 128^3: 61.74 M; per view a 13.57 M DenseNet encoder, 12.26 M of
    # 2D->3D links of which 11.55 M are the fully connected bottleneck, a 3.56 M view decoder; a 2.97 M fused one
    assert count(full) == pytest.approx(61.74, abs=0.005)
    v = full.view1Model
    encoder = count(v.encoder_layer) + sum(count(v.layer(f"encoder_layer{i}")) for i in range(5))
    links = sum(count(v.layer(f"linker_layer{i}")) for i in range(5)) + count(v.base_link)
    assert encoder == pytest.approx(13.57, abs=0.005)
    assert links == pytest.approx(12.26, abs=0.005)
    assert count(v.base_link) == pytest.approx(11.55, abs=0.005)
    fused = sum(count(full.layer(f"decoder_layer{i}")) for i in range(-1, 5)) + count(full.decoder_layer)
    assert fused == pytest.approx(2.97, abs=0.005)


def test_key_names_and_shapes_of_their_generator(full):
    state = full.state_dict()
    expected = {  # names and shapes as X2CT-GAN's module tree gives them
        "view1Model.encoder_layer.1.weight": (64, 1, 7, 7),
        "view1Model.encoder_layer0.2.weight": (64, 64, 3, 3),
        "view1Model.encoder_layer0.3.conv_block.5.conv2.weight": (32, 128, 3, 3),
        "view1Model.encoder_layer0.6.weight": (128, 256, 1, 1),
        "view2Model.encoder_layer4.3.conv_block.5.conv1.weight": (128, 672, 1, 1),
        "view1Model.base_link.0.weight": (256 * 4**3, 704),
        "view1Model.linker_layer0.0.compress_block.0.weight": (16, 64, 1, 1),
        "view1Model.linker_layer4.0.conv_block.0.weight": (128, 128, 3, 3, 3),
        "view1Model.decoder_layer4.0.block.block.0.weight": (256, 128, 3, 3, 3),
        "view1Model.decoder_compress_layer3.0.weight": (128, 256, 3, 3, 3),
        "view1Model.decoder_layer0.6.block.block.0.weight": (16, 16, 3, 3, 3),
        "view2Model.decoder_compress_layer-1.0.weight": (16, 32, 3, 3, 3),
        "view2Model.decoder_layer-1.0.weight": (16, 16, 3, 3, 3),
        "view2Model.decoder_layer.0.weight": (1, 16, 7, 7, 7),
        "decoder_layer3.6.block.block.0.weight": (128, 64, 3, 3, 3),
        "decoder_layer-1.3.weight": (16, 16, 3, 3, 3),
        "decoder_layer.0.weight": (1, 16, 7, 7, 7),
        "view1Model.encoder_layer.2.running_mean": (64,),
        "decoder_layer-1.1.num_batches_tracked": (),
    }
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not any(k.endswith("norm1.weight") for k in state)  # instance norms have no affine parameters
    assert "view1Model.decoder_compress_layer4.0.weight" not in state  # the coarsest join is empty in theirs
    assert len(state) == 1755
    weights = [m.weight for m in full.modules() if isinstance(m, torch.nn.Conv3d)]
    assert 0.018 < torch.cat([w.flatten() for w in weights]).std().item() < 0.022  # N(0, 0.02)


def test_forward_backward_at_cpu_widths():
    torch.manual_seed(0)
    model = X2CTGAN(**TINY)
    xrays = torch.rand(1, 2, 1, 48, 48)  # resized to image_size inside
    geometry = {"angles": torch.tensor([[0.0, 270.0]])}
    out = model(xrays, geometry)
    assert out.shape == (1, 1, 32, 32, 32)
    assert (out >= 0).all()  # ReLU output
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:10])
    assert model.view1Model.encoder_layer[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("views,angles,match", [
    (3, [0.0, 90.0, 180.0], "exactly two views"),
    (2, [90.0, 0.0], "PA view at 0"),
    (2, [0.0, 45.0], "lateral view"),
])
def test_refuses_other_views(views, angles, match):
    model = X2CTGAN(**TINY)
    with pytest.raises(ModelInputError, match=match):
        model(torch.rand(1, views, 1, 64, 64), {"angles": torch.tensor([angles])})


def test_bad_options():
    with pytest.raises(ValueError, match="multiple of 32"):
        X2CTGAN(resolution=32)
    with pytest.raises(ValueError, match="encoder_blocks"):
        X2CTGAN(resolution=64, encoder_blocks=[1, 2])


def test_loads_their_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    source = X2CTGAN(**TINY)
    state = source.state_dict()
    # as X2CT-GAN's save_networks writes it, from a DataParallel net on an older PyTorch
    saved = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "90_net_G.pth"
    torch.save({"iters": 1000, "epoch": 90, "state_dict": saved, "lr": 2e-4}, path)
    torch.manual_seed(2)
    loaded = X2CTGAN(**TINY, weights=str(path))
    for key, value in state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_lateral_at_90_is_the_mirror_of_270():
    torch.manual_seed(0)
    model = X2CTGAN(**TINY).eval()
    xrays = torch.rand(1, 2, 1, 64, 64)
    mirrored = xrays.clone()
    mirrored[:, 1] = mirrored[:, 1].flip(-1)
    with torch.no_grad():
        at270 = model(xrays, {"angles": torch.tensor([[0.0, 270.0]])})
        torch.testing.assert_close(at270, model(mirrored, {"angles": torch.tensor([[0.0, 90.0]])}))


def test_converts_their_checkpoint_to_a_checkpoint_folder(tmp_path):
    from x2ct_framework.checkpoint import load_into
    from x2ct_plugins.models.x2ctgan import convert_checkpoint

    source = X2CTGAN(**TINY)
    torch.save({"iters": 1, "epoch": 90, "state_dict": source.state_dict(), "lr": 2e-4}, tmp_path / "90_net_G.pth")
    folder = convert_checkpoint(tmp_path / "90_net_G.pth", tmp_path / "ckpt", **TINY)
    target = X2CTGAN(**TINY)
    assert not any(load_into(target, folder).values())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match="90_net_G.pth"):
        load_x2ctgan_checkpoint(tmp_path / "absent.pth")
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        X2CTGAN(**TINY, weights=str(path))


def _running_statistics_differ(model):
    """Running statistics far from any case's own: means 0.5, variances 4 (a checkpoint trained elsewhere)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(4.0)
    return model


def test_evaluation_uses_per_case_statistics_as_their_test_script():
    """X2CT-GAN's test.py: ``eval()``, then every InstanceNorm back to train mode. The plugin's ``eval()`` output
    equals that, leaves the running statistics alone, and differs from the running-statistics output."""
    import copy

    torch.manual_seed(0)
    model = _running_statistics_differ(X2CTGAN(**TINY))
    assert model.eval_norm == "per_case"
    theirs = copy.deepcopy(model).eval()
    for m in theirs.modules():
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            m.train()  # the stock PyTorch InstanceNorm forward in train mode: per-case statistics
    running = copy.deepcopy(model)
    running.set_eval_norm("running")
    running.eval()
    xrays = torch.rand(2, 2, 1, 64, 64)
    geometry = {"angles": torch.tensor([[0.0, 270.0], [0.0, 270.0]])}
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        ours = model.eval()(xrays, geometry)
        reference = theirs(xrays, geometry)
        stored = running(xrays, geometry)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # no running-statistics update
    assert (ours - stored).abs().max() > 1e-3  # the running statistics give another volume
    # one case's output does not depend on the other cases of the batch (instance statistics)
    with torch.no_grad():
        torch.testing.assert_close(model(xrays[:1], {"angles": geometry["angles"][:1]}), ours[:1], rtol=0, atol=1e-5)


def test_running_statistics_mode_is_plain_eval():
    torch.manual_seed(0)
    model = _running_statistics_differ(X2CTGAN(**TINY, eval_norm="running")).eval()
    stock = X2CTGAN(**TINY)
    stock.load_state_dict(model.state_dict())
    for m in stock.modules():
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            m.__class__ = torch.nn.InstanceNorm2d if isinstance(m, torch.nn.InstanceNorm2d) else torch.nn.InstanceNorm3d
    stock.eval()
    xrays = torch.rand(1, 2, 1, 64, 64)
    geometry = {"angles": torch.tensor([[0.0, 270.0]])}
    with torch.no_grad():
        torch.testing.assert_close(model(xrays, geometry), stock(xrays, geometry), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="eval_norm"):
        X2CTGAN(**TINY, eval_norm="batch")


def test_contract_kit_at_two_views():
    """X2CT-GAN takes exactly a PA and a lateral, so the contract is checked at 2 views (0 and 270 degrees)."""
    from x2ct_framework import testing

    torch.manual_seed(0)
    model = X2CTGAN(**TINY)
    for branch in (model.view1Model, model.view2Model):  # in their checkpoint, never reach the fused CT (by design)
        branch.layer("decoder_layer-1").requires_grad_(False)
        branch.decoder_layer.requires_grad_(False)
    passed = testing.check_model(model, resolution=32, views=(0.0, 270.0), image_size=64, prev=False,
                                 geometry="x2ctgan", autocast_dtypes=())
    assert "gradients reach every trainable parameter" in passed

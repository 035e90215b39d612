"""``vgg`` and ``lpips``: agreement with torchvision / the lpips package, and weight handling offline."""

import urllib.error

import lpips
import pytest
import torch
import torchvision

from x2ct_framework.errors import CheckpointError, RecipeError
from x2ct_framework.plugins import get_plugin_manager

# lpips builds its backbones with torchvision's deprecated `pretrained=` argument
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


def make(name, **options):
    return get_plugin_manager().registry("loss").create(name, options, where="r.toml: losses -> t")


def volumes(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 1, size, size, size, generator=g)
    return (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(0, 1), target


def reference_slices(vol, n):
    """Centre slices of n equal bins along D, H and W by plain indexing (independent of einops)."""
    out = []
    for axis in range(3):
        size = vol.shape[2 + axis]
        idx = [int((i + 0.5) * size / n) for i in range(n)]
        sl = [vol.select(2 + axis, i) for i in idx]  # each [B, 1, a, b]
        out.append(torch.stack(sl, 1).flatten(0, 1))  # case-major, like (b n)
    return out


@pytest.fixture(scope="module")
def tv_vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def save_features(model, path):
    """A torchvision VGG16 state dict without the (large, unused) classifier."""
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)


def test_vgg_matches_torchvision_vgg16_features(tmp_path, tv_vgg16):
    path = tmp_path / "vgg16.pth"
    save_features(tv_vgg16, path)
    loss = make("vgg", weights=str(path), layers=["relu2_2", "relu1_2"], layer_weights=[0.25, 1.0], slices=2)
    pred, target = volumes()
    norm = torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    from torchvision.models.feature_extraction import create_feature_extractor  # not imported by torchvision

    feats = create_feature_extractor(
        tv_vgg16, return_nodes={"features.3": "relu1_2", "features.8": "relu2_2"})
    per_axis = []
    for sp, st in zip(reference_slices(pred, 2), reference_slices(target, 2)):
        fp, ft = feats(norm(sp.repeat(1, 3, 1, 1))), feats(norm(st.repeat(1, 3, 1, 1)))
        per_axis.append(1.0 * (fp["relu1_2"] - ft["relu1_2"]).abs().mean()
                        + 0.25 * (fp["relu2_2"] - ft["relu2_2"]).abs().mean())
    expected = torch.stack(per_axis).mean()
    assert loss(pred, target, {}).item() == pytest.approx(expected.item(), rel=1e-5)


def test_vgg_imagenet_reads_torchvision_cache_and_fails_offline_with_the_file_to_place(tmp_path, monkeypatch,
                                                                                        tv_vgg16):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as info:
        make("vgg")
    msg = str(info.value)
    assert f"at {expected}" in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert 'weights = "/path/to/vgg16-397923af.pth"' in msg
    # once the file is where the message says, "imagenet" loads it
    expected.parent.mkdir(parents=True, exist_ok=True)
    save_features(tv_vgg16, expected)
    loss = make("vgg", layers=["relu3_3"])
    assert torch.equal(loss.features[14].weight, tv_vgg16.features[14].weight)
    assert len(loss.features) == 16  # truncated after the deepest chosen layer


def test_vgg_bad_weights_files(tmp_path):
    with pytest.raises(CheckpointError, match="weights file '.*missing.pth' not found"):
        make("vgg", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not a torchvision VGG16 state dict"):
        make("vgg", weights=str(bad))


def test_vgg_random_only_when_asked_and_frozen():
    loss = make("vgg", weights="random", slices=[1, 0, 2])
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.features.training
    pred, target = volumes(16)
    assert loss(pred, target, {}) > 0


def lpips_torchvision_state(module: lpips.LPIPS) -> dict:
    """The backbone of an lpips.LPIPS module as a torchvision state dict (features.N.*)."""
    return {f"features.{k.split('.', 1)[1]}": v for k, v in module.net.state_dict().items()}


@pytest.mark.parametrize("min_size", [0, 48])
def test_lpips_matches_the_lpips_package_with_the_same_random_backbone(tmp_path, min_size):
    torch.manual_seed(1)
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    path = tmp_path / "alex.pth"
    torch.save(lpips_torchvision_state(ref), path)
    loss = make("lpips", net="alex", weights=str(path), slices=2, min_size=min_size)
    pred, target = volumes()
    values = []
    for sp, st in zip(reference_slices(pred, 2), reference_slices(target, 2)):
        if min_size:
            sp, st = (torch.nn.functional.interpolate(s, size=(48, 48), mode="bilinear") for s in (sp, st))
        values.append(ref(sp.repeat(1, 3, 1, 1), st.repeat(1, 3, 1, 1), normalize=True).flatten())
    expected = torch.cat(values).mean()
    assert loss(pred, target, {}).item() == pytest.approx(expected.item(), rel=1e-5)
    # the calibrated linear layers are the package's own
    assert torch.equal(loss.lpips.lin0.model[1].weight, ref.lin0.model[1].weight)


def test_lpips_vgg_backbone_loads_torchvision_vgg16_weights(tmp_path, tv_vgg16):
    path = tmp_path / "vgg16.pth"
    save_features(tv_vgg16, path)
    loss = make("lpips", net="vgg", weights=str(path), slices=1, min_size=0)
    assert torch.equal(loss.lpips.net.slice3.state_dict()["14.weight"], tv_vgg16.features[14].weight)
    pred, target = volumes(16)
    value = loss(pred.requires_grad_(), target, {})
    value.backward()
    assert value > 0 and pred.grad.abs().sum() > 0


def test_lpips_offline_error_names_alexnet_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match=r"lpips loss \(alex backbone\).*alexnet-owt-7be5be79.pth"):
        make("lpips")
    with pytest.raises(RecipeError, match="unknown LPIPS backbone 'squeeze'"):
        make("lpips", net="squeeze")

"""Every built-in loss: registration, its minimum on identical inputs, gradients, option errors."""

import pytest
import torch
from torch.utils.data import default_collate

from x2ct_framework.errors import RecipeError
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage
from x2ct_framework.testing import check_loss

CONTEXT = {"hu_window": [-1000.0, 3000.0], "views": [0.0, 90.0], "resolution": 32}


def phantom_batch(resolution=32, cases=2):
    from x2ct_plugins.datasets.synthetic_phantom import SyntheticPhantomDataset

    ds = SyntheticPhantomDataset(split="train", stage=Stage("s", 1, resolution, {}))
    return default_collate([ds[i] for i in range(cases)])


@pytest.fixture(scope="module")
def batch():
    return phantom_batch()


def make(name, **options):
    return get_plugin_manager().registry("loss").create(name, options, where="r.toml: stages -> 1 -> losses -> t",
                                                         context=CONTEXT)


def noisy(ct, seed=0, sigma=0.05):
    g = torch.Generator().manual_seed(seed)
    return (ct + sigma * torch.randn(ct.shape, generator=g)).requires_grad_()


CASES = [
    ("l1", {}), ("mse", {}), ("ssim", {}), ("ssim", {"mode": "2d"}),
    ("gradient", {}), ("gradient", {"mode": "magnitude"}), ("gradient", {"mode": "both", "distance": "l2"}),
    ("vgg", {"weights": "random", "slices": 2}), ("lpips", {"weights": "random", "slices": 1, "min_size": 32}),
    ("bone", {}), ("bone", {"use_labels": False}), ("vessel", {}), ("vessel", {"use_labels": False}),
    ("landmark", {}), ("landmark", {"use_labels": False}), ("reprojection", {}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_zero_on_identical_inputs_and_gradient_to_pred(name, options, batch):
    loss = make(name, **options)
    assert isinstance(loss, torch.nn.Module)
    ct = batch["ct"]
    same = loss(ct.clone(), ct, batch)
    assert same.dim() == 0 and abs(same.item()) < 1e-6
    pred = noisy(ct)
    value = loss(pred, ct, batch)
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 1e-6
    value.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # frozen networks inside a loss never collect gradients
    assert all(p.grad is None for p in loss.parameters())


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_builtin_losses_pass_the_plugin_author_kit(name, options):
    """The checks third-party authors run (x2ct_framework.testing): batch of one, autocast, no in-place."""
    # float16 convolutions are very slow on CPU: the conv-net losses are checked under bfloat16 only
    dtypes = (torch.bfloat16,) if name in ("vgg", "lpips") else (torch.bfloat16, torch.float16)
    check_loss(make(name, **options), identical="zero", autocast_dtypes=dtypes)


def test_every_builtin_loss_comes_from_its_own_entry_point():
    reg = get_plugin_manager().registry("loss")
    expected = {"l1": "l1", "mse": "l1", "ssim": "ssim", "gradient": "gradient", "vgg": "vgg", "lpips": "lpips",
                "adversarial": "adversarial", "bone": "bone", "vessel": "vessel", "landmark": "landmark",
                "reprojection": "reprojection"}
    for name, plugin in expected.items():
        entry = reg.get(name)
        assert (entry.plugin, entry.distribution) == (plugin, "x2ct-framework")
        assert entry.factory.__doc__, f"{name} has no docstring"


BAD = [
    ("ssim", {"win_sise": 7}, r'losses -> t -> win_sise: unknown option for loss \'ssim\'; did you mean "win_size"'),
    ("ssim", {"win_size": "11"}, r"losses -> t -> win_size: expected int, got '11'"),
    ("ssim", {"mode": "4d"}, "mode must be one of '3d', '2d'"),
    ("ssim", {"win_size": 10}, "win_size must be an odd positive integer"),
    ("gradient", {"mode": "sobel"}, "mode must be one of 'components', 'magnitude', 'both'"),
    ("vgg", {"layers": ["relu9_9"], "weights": "random"}, r"unknown VGG16 layer\(s\) \['relu9_9'\]"),
    ("vgg", {"slices": [1, 2], "weights": "random"}, "slices must be"),
    ("vgg", {"layer_weights": [1.0], "weights": "random"}, "layer_weights: expected 3 numbers"),
    ("lpips", {"net": "resnet", "weights": "random"}, "unknown LPIPS backbone 'resnet'; choose from 'alex', 'vgg'"),
    ("adversarial", {"objective": "wgan"}, "objective must be one of 'lsgan', 'hinge'"),
    ("adversarial", {"update_every": 0}, "update_every must be an integer >= 1"),
    ("adversarial", {"lr": -1.0}, "lr must be > 0"),
    ("bone", {"softness_hu": 0.0}, "softness_hu must be > 0"),
    ("bone", {"threshold_hu": 5000.0}, r"threshold_hu 5000.0 lies outside hu_window \[-1000.0, 3000.0\]"),
    ("vessel", {"sigmas": []}, "sigmas must be a non-empty list"),
    ("landmark", {"slabs": 0}, "slabs must be an integer >= 1"),
    ("reprojection", {"drr_options": {"geometry": 1}}, r"drr_options may not set \['geometry'\]"),
    ("l1", {"mask": "lung"}, 'did you mean "mask_key"'),
]


@pytest.mark.parametrize("name, options, match", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_options_are_recipe_errors_naming_file_and_key(name, options, match):
    with pytest.raises(RecipeError, match=match) as info:
        make(name, **options)
    assert str(info.value).startswith("r.toml: stages -> 1 -> losses -> t")


def test_l1_mask_key_weights_voxels(batch):
    ct = batch["ct"]
    pred = ct.clone()
    pred[:, :, :16] += 0.2  # error only in the first half
    mask = torch.zeros_like(ct)
    mask[:, :, 16:] = 1.0
    assert make("l1", mask_key="m")(pred, ct, {"m": mask}).item() == 0.0
    assert make("mse", mask_key="m")(pred, ct, {"m": 1 - mask}).item() == pytest.approx(0.04, rel=1e-5)
    with pytest.raises(KeyError, match="mask_key 'm' is not in the batch"):
        make("l1", mask_key="m")(pred, ct, {})


def test_ssim_loss_is_one_minus_shared_ssim(batch):
    from x2ct_framework.ssim import ssim

    ct, pred = batch["ct"], noisy(batch["ct"]).detach()
    assert make("ssim")(pred, ct, batch).item() == pytest.approx(1 - ssim(pred, ct).mean().item(), abs=1e-7)
    two = make("ssim", mode="2d", win_size=7, sigma=1.0)(pred, ct, batch)
    assert two.item() == pytest.approx(1 - ssim(pred, ct, mode="2d", win_size=7, sigma=1.0).mean().item(), abs=1e-7)


def test_gradient_loss_analytic_ramps():
    d = torch.arange(12.0)
    ramp = d.reshape(1, 1, 1, 1, 12).expand(1, 1, 12, 12, 12)
    a, b = 0.01 * ramp, 0.03 * ramp  # slopes along W only
    # per-axis L1: |0.03 - 0.01| along W, 0 along D and H, averaged over the three axes
    assert make("gradient")(b, a, {}).item() == pytest.approx(0.02 / 3, rel=1e-5)
    assert make("gradient", mode="magnitude", eps=1e-12)(b, a, {}).item() == pytest.approx(0.02, rel=1e-4)
    # a blurred copy of a sharp edge loses gradient, a shifted-intensity copy does not
    edge = (d > 5.5).float().reshape(1, 1, 1, 1, 12).expand(1, 1, 12, 12, 12)
    blurred = torch.nn.functional.avg_pool3d(edge, (1, 1, 3), stride=1, padding=(0, 0, 1), count_include_pad=False)
    loss = make("gradient")
    assert loss(blurred, edge, {}).item() > 0.01
    assert loss(edge + 0.3, edge, {}).item() == pytest.approx(0.0, abs=1e-7)

"""The shared SSIM (x2ct_framework.ssim) against scikit-image and pytorch_msssim."""

import numpy as np
import pytest
import torch
from pytorch_msssim import ssim as msssim_ssim
from skimage.metrics import structural_similarity

from x2ct_framework.ssim import filter_valid, ssim, ssim_map, window_1d

SK = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def pair(shape, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 1, *shape, generator=g)
    # structured content (a smooth blob) plus noise, so SSIM is neither ~0 nor ~1
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    target = 0.5 * target + 0.5 * torch.exp(-sum(a**2 for a in axes) * 3)
    pred = (target + noise * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target


def sk_slices(p: np.ndarray, t: np.ndarray, **kw) -> float:
    """2D SSIM of every slice along each axis, averaged per axis, then over the three axes."""
    per_axis = []
    for axis in range(3):
        pm, tm = np.moveaxis(p, axis, 0), np.moveaxis(t, axis, 0)
        per_axis.append(np.mean([structural_similarity(a, b, **kw) for a, b in zip(pm, tm)]))
    return float(np.mean(per_axis))


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 13, 19)])
@pytest.mark.parametrize("data_range", [1.0, 2.5])
def test_3d_matches_skimage(shape, data_range):
    pred, target = pair(shape)
    pred, target = pred * data_range, target * data_range
    ref = structural_similarity(pred[0, 0].double().numpy(), target[0, 0].double().numpy(), data_range=data_range, **SK)
    assert ssim(pred, target, data_range=data_range).item() == pytest.approx(ref, abs=1e-4)
    assert ssim(pred.double(), target.double(), data_range=data_range).item() == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("shape", [(16, 16, 16), (13, 17, 12)])
def test_2d_slicewise_matches_skimage_over_three_axes(shape):
    pred, target = pair(shape, seed=1)
    ref = sk_slices(pred[0, 0].double().numpy(), target[0, 0].double().numpy(), data_range=1.0, **SK)
    assert ssim(pred, target, mode="2d").item() == pytest.approx(ref, abs=1e-4)


def test_2d_single_axis_and_x2ctgan_protocol():
    pred, target = pair((14, 12, 16), seed=2)
    p, t = pred[0, 0].double().numpy(), target[0, 0].double().numpy()
    axial = np.mean([structural_similarity(a, b, data_range=1.0, **SK) for a, b in zip(p, t)])
    assert ssim(pred, target, mode="2d", slice_axes=[0]).item() == pytest.approx(axial, abs=1e-4)
    # X2CT-GAN: skimage defaults (uniform 7-tap window, sample covariance), slices as channels, 3 axes
    ref = np.mean([structural_similarity(np.moveaxis(p, a, -1), np.moveaxis(t, a, -1), data_range=1.0, channel_axis=-1)
                   for a in range(3)])
    ours = ssim(pred, target, mode="2d", window="uniform", win_size=7, sample_covariance=True)
    assert ours.item() == pytest.approx(ref, abs=1e-4)


def test_images_and_batches():
    pred, target = pair((20, 18), seed=3)
    ref = structural_similarity(pred[0, 0].double().numpy(), target[0, 0].double().numpy(), data_range=1.0, **SK)
    assert ssim(pred, target).item() == pytest.approx(ref, abs=1e-4)
    a, b = pair((16, 16, 16), seed=4)
    c, d = pair((16, 16, 16), seed=5, noise=0.3)
    both = ssim(torch.cat([a, c]), torch.cat([b, d]))
    assert both.shape == (2,)
    assert torch.allclose(both, torch.cat([ssim(a, b), ssim(c, d)]), atol=1e-6)
    assert both[0] > both[1]  # more noise, less similar


def test_matches_pytorch_msssim_3d():
    pred, target = pair((24, 24, 24), seed=6)
    ref = msssim_ssim(pred, target, data_range=1.0, win_size=11, win_sigma=1.5)
    assert ssim(pred, target).item() == pytest.approx(ref.item(), abs=1e-5)


def test_identical_is_one_and_map_shape():
    _, target = pair((16, 16, 16))
    assert ssim(target, target).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(target, target, mode="2d").item() == pytest.approx(1.0, abs=1e-6)
    assert ssim_map(target, target).shape == (1, 1, 6, 6, 6)


def test_filter_valid_is_a_valid_convolution():
    x = torch.randn(2, 9, 10, 11, dtype=torch.float64)
    taps = window_1d(5, 1.0, dtype=torch.float64)
    for axis in (-1, -2, -3):
        ref = torch.nn.functional.conv1d(x.movedim(axis, -1).reshape(-1, 1, x.shape[axis]), taps.reshape(1, 1, -1))
        ours = filter_valid(x, taps, axis).movedim(axis, -1).reshape(ref.shape)
        assert torch.allclose(ours, ref)


def test_gradients_are_exact():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 1, 4, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.rand(1, 1, 4, 5, 4, dtype=torch.float64, generator=g)
    for mode in ("3d", "2d"):
        assert torch.autograd.gradcheck(lambda p: ssim(p, target, win_size=3, sigma=1.0, mode=mode), (pred,))
    # a target that carries gradients too (filtered together with pred) gets the symmetric gradient
    p, t = pred.detach().clone().requires_grad_(), target.clone().requires_grad_()
    ssim(p, t, win_size=3, sigma=1.0).sum().backward()
    p2, t2 = t.detach().clone().requires_grad_(), pred.detach().clone()
    ssim(p2, t2, win_size=3, sigma=1.0).sum().backward()
    assert torch.allclose(t.grad, p2.grad)


@pytest.mark.parametrize("kwargs, shapes, match", [
    ({}, ((1, 1, 16, 16, 16), (1, 1, 16, 16, 15)), "same shape"),
    ({}, ((1, 1, 8, 16, 16), (1, 1, 8, 16, 16)), "does not fit"),
    ({"win_size": 4}, ((1, 1, 16, 16, 16),) * 2, "odd positive"),
    ({"mode": "2.5d"}, ((1, 1, 16, 16, 16),) * 2, "mode must be"),
    ({"window": "box"}, ((1, 1, 16, 16, 16),) * 2, "window must be"),
    ({"sigma": 0.0}, ((1, 1, 16, 16, 16),) * 2, "sigma"),
    ({"data_range": 0.0}, ((1, 1, 16, 16, 16),) * 2, "data_range"),
    ({"mode": "2d", "slice_axes": [3]}, ((1, 1, 16, 16, 16),) * 2, "slice_axes"),
    ({}, ((16, 16, 16),) * 2, r"\[B, C, D, H, W\]"),
])
def test_bad_input_is_a_clear_error(kwargs, shapes, match):
    with pytest.raises(ValueError, match=match):
        ssim(torch.rand(shapes[0]), torch.rand(shapes[1]), **kwargs)

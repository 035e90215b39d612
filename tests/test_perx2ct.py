"""perx2ct: PerX2CT (dek924/PerX2CT) layer for layer: sizes, their key names, the converter, their camera and layout.

The parameter count and key set were measured by building their ``INREncoderZoomAxisInAlign`` and taming ``Decoder``
from their repository (commit be4c354c8a01520190929e267b5594421b6000eb) outside this repository; docs/models.md
records that check (their random weights through the converter give their decoded slices exactly, maximum
difference 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework import testing
from x2ct_framework.errors import CheckpointError, DataError
from x2ct_framework.physics import make_geometry, project
from x2ct_plugins.models.inputs import ModelInputError
from x2ct_plugins.models.perx2ct import (LATERAL_POSE, PA_POSE, PerX2CT, camera_world2cam, convert_checkpoint,
                                        load_perx2ct_checkpoint, perspective_grid)

TINY = dict(pretrained="random", backbone="resnet18", latent_dim=8, ch=32, ch_mult=[1, 1], num_res_blocks=1,
            attn_resolutions=[], multires=2, image_size=32, slice_chunk=3)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def published() -> PerX2CT:
    with torch.device("meta"):
        return PerX2CT(resolution=128, pretrained="random")


def test_parameter_counts_equal_theirs():
    model = published()
    assert count(model) == 42_555_715  # configs/PerX2CT.yaml, measured from their code
    assert count(model.encoder) == 1_444_928 and count(model.decoder) == 41_110_787
    assert model.encoder.z_channels == 1087  # 2 x 512 + 63, their ddconfig.z_channels


def their_state_dict() -> dict[str, tuple[int, ...]]:
    """Their module tree's keys and shapes: torchvision's ResNet-101 without layer3/4, fc, avgpool under
    ``encoder.network_fn.cond_encoder.model``, their width-0 axis embedding, and taming's Decoder, written out here."""
    import torchvision

    keys: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        resnet = torchvision.models.resnet101(weights=None)
    for k, v in resnet.state_dict().items():
        if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2"):
            keys[f"encoder.network_fn.cond_encoder.model.{k}"] = tuple(v.shape)
    keys["encoder.axis_emb.weight"] = (3, 0)

    def norm(prefix: str, c: int) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (c,), (c,)

    def conv(prefix: str, cin: int, cout: int, k: int) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (cout, cin, k, k), (cout,)

    def resblock(prefix: str, cin: int, cout: int) -> None:
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cin, cout, 3)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cin, cout, 1)

    def attn(prefix: str, c: int) -> None:
        norm(f"{prefix}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.{n}", c, c, 1)

    conv("decoder.conv_in", 1087, 512, 3)
    resblock("decoder.mid.block_1", 512, 512)
    attn("decoder.mid.attn_1", 512)
    resblock("decoder.mid.block_2", 512, 512)
    cin = 512
    for level, cout in ((2, 512), (1, 256), (0, 128)):  # built from the coarsest level (32^2, with attention)
        for i in range(3):
            resblock(f"decoder.up.{level}.block.{i}", cin, cout)
            cin = cout
            if level == 2:
                attn(f"decoder.up.{level}.attn.{i}", cout)
        if level:
            conv(f"decoder.up.{level}.upsample.conv", cout, cout, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 128, 3, 3)
    return keys


def test_key_names_and_shapes_are_theirs():
    ours = {k: tuple(v.shape) for k, v in published().state_dict().items()}
    theirs = their_state_dict()
    assert set(ours) == set(theirs) and len(ours) == 287
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def random_norms(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_converter_loads_a_checkpoint_in_their_format(tmp_path):
    """Their PerX2CT.ckpt layout (a Lightning checkpoint: ``state_dict`` with ``encoder.*``, ``decoder.*`` and the
    training loss's ``loss.*``) built here -> checkpoint folder -> the same forward as the model it came from."""
    from x2ct_framework.checkpoint import load_into

    torch.manual_seed(0)
    source = PerX2CT(resolution=8, **TINY).eval()
    random_norms(source)
    state = dict(source.state_dict())
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)  # their LPIPS and discriminator
    state["loss.discriminator.main.0.weight"] = torch.rand(64, 3, 4, 4)
    path = tmp_path / "PerX2CT.ckpt"
    torch.save({"epoch": 12, "global_step": 3400, "state_dict": state}, path)
    folder = convert_checkpoint(path, tmp_path / "converted", **{"resolution": 8, **TINY})
    target = PerX2CT(resolution=8, **TINY)
    load_into(target, folder)
    target.eval()
    xrays = torch.rand(1, 2, 1, 32, 32)
    geometry = {"angles": torch.tensor([[0.0, 270.0]])}
    with torch.no_grad():
        torch.testing.assert_close(target(xrays, geometry), source(xrays, geometry), rtol=0, atol=0)
    loaded = PerX2CT(resolution=8, **{**TINY, "pretrained": "imagenet"}, weights=str(path))  # no ImageNet needed
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(DataError, match=r"PerX2CT\.ckpt .*dek924/PerX2CT.*missing\.ckpt"):
        load_perx2ct_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(DataError, match="not found"):
        PerX2CT(resolution=8, **TINY, weights=str(tmp_path / "weights" / "PerX2CT.ckpt"))
    state = PerX2CT(resolution=8, **TINY).state_dict()
    bad = {("decoder.conv_in.kernel" if k == "decoder.conv_in.weight" else k): v for k, v in state.items()}
    torch.save({"state_dict": bad}, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder\.conv_in\.weight\).*1 unexpected "
                                              r"\(decoder\.conv_in\.kernel\)"):
        load_perx2ct_checkpoint(tmp_path / "renamed.ckpt", PerX2CT(resolution=8, **TINY))
    with pytest.raises(CheckpointError, match=r"CPU-sized variant.*of another shape \(encoder\.network_fn\.cond_encoder"
                                              r"\.conv2\.weight: \(8, 128, 3, 3\) in the file, \(16, 128, 3, 3\) here"):
        PerX2CT(resolution=8, **{**TINY, "latent_dim": 16}, weights=str(tmp_path / "renamed.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        load_perx2ct_checkpoint(tmp_path / "junk.ckpt")


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    """``pretrained = "imagenet"`` reads torchvision's cached resnet file; offline and absent, the error names it."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    small = {**TINY, "pretrained": "imagenet"}
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth.*" + str(tmp_path / "hub" / "checkpoints")
                       + r".*set pretrained = .* in the recipe's \[model\] table"):
        PerX2CT(resolution=8, **small)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(weights, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = PerX2CT(resolution=8, **small)
    resnet = model.encoder.network_fn.cond_encoder.model
    assert torch.equal(resnet.conv1.weight, weights["conv1.weight"])
    assert torch.equal(resnet.layer2[0].conv1.weight, weights["layer2.0.conv1.weight"])
    # their encoder_freeze_layer = layer1: the stem before layer1 is frozen with ImageNet weights, nothing else
    frozen = sorted(n for n, p in resnet.named_parameters() if not p.requires_grad)
    assert frozen == ["bn1.bias", "bn1.weight", "conv1.weight"]


def test_their_camera_projects_as_their_code_states():
    """PA: the camera on +H (their axis 1) one side away; grid x = -W / ((1 - H) tan 30), y = D / ((1 - H) tan 30).
    Lateral: the camera on +W; x = D / ((1 - W) tan 30), y = -H / ((1 - W) tan 30)."""
    t = math.tan(math.radians(30))
    p = torch.tensor([[[0.2, -0.1, 0.3], [-0.35, 0.25, -0.05], [0.0, 0.0, 0.0]]])  # their (d0, d1, d2) = (D, H, W)
    d, h, w = p[..., 0], p[..., 1], p[..., 2]
    pa = perspective_grid(p, camera_world2cam(*PA_POSE), 60.0)
    lat = perspective_grid(p, camera_world2cam(*LATERAL_POSE), 60.0)
    torch.testing.assert_close(pa, torch.stack([-w / ((1 - h) * t), d / ((1 - h) * t)], -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(lat, torch.stack([d / ((1 - w) * t), -h / ((1 - w) * t)], -1), atol=1e-4, rtol=0)


def test_forward_stacks_their_decoded_slices():
    """The volume is the decoder's channel 1 for every slice along ``slice_axis``, at the slices' points: the centres
    of up_factor^2 voxel blocks, the slice's own coordinate at its voxel centre."""
    torch.manual_seed(0)
    xrays, geometry = torch.rand(2, 2, 1, 32, 32), {"angles": torch.tensor([[0.0, 270.0]] * 2)}
    model = PerX2CT(resolution=8, **TINY).eval()
    pts = model.slice_points("coronal", torch.tensor([6]), "cpu")[0]
    ax = (torch.arange(4) + 0.5) / 4 - 0.5
    torch.testing.assert_close(pts[:, 0], ax.repeat_interleave(4), atol=1e-6, rtol=0)  # rows: D
    torch.testing.assert_close(pts[:, 2], ax.repeat(4), atol=1e-6, rtol=0)  # columns: W
    assert torch.allclose(pts[:, 1], torch.tensor(6.5 / 8 - 0.5))
    with torch.no_grad():
        pa, lat = model.their_views(xrays, geometry)
        cond = model.encoder.network_fn.cond_encoder
        feats = (cond(pa), cond(lat))
        for axis, take in (("axial", lambda v, s: v[:, 0, s]), ("coronal", lambda v, s: v[:, 0, :, s]),
                           ("sagittal", lambda v, s: v[:, 0, :, :, s])):
            model.slice_axis = axis
            vol = model(xrays, geometry)
            assert vol.shape == (2, 1, 8, 8, 8)
            for s in (0, 5):
                torch.testing.assert_close(take(vol, s), model.decode_slices(feats, torch.tensor([s]), axis)[:, 0])


def test_views_are_turned_into_their_layout():
    """PA = the view at 0 degrees, columns reversed; lateral = the view at 270 transposed (at 90: mirrored first)."""
    model = PerX2CT(resolution=8, **{**TINY, "image_size": 16})
    x = torch.rand(1, 2, 1, 16, 16)
    pa, lat = model.their_views(x, {"angles": torch.tensor([[0.0, 270.0]])})
    assert torch.equal(pa, x[:, 0].flip(-1)) and torch.equal(lat, x[:, 1].transpose(-1, -2))
    _, lat90 = model.their_views(x, {"angles": torch.tensor([[360.0, 90.0]])})
    assert torch.equal(lat90, x[:, 1].flip(-1).transpose(-1, -2))
    with pytest.raises(ModelInputError, match="lateral at 270"):
        model(x, {"angles": torch.tensor([[0.0, 45.0]])})
    with pytest.raises(ModelInputError, match="PA at 0"):
        model(x, {"angles": torch.tensor([[270.0, 0.0]])})
    with pytest.raises(ModelInputError, match="exactly two views"):
        model(torch.rand(1, 4, 1, 16, 16), {"angles": torch.tensor([[0.0, 90.0, 180.0, 270.0]])})
    with pytest.raises(ModelInputError, match="previous stage"):
        model(x, {"angles": torch.tensor([[0.0, 270.0]])}, prev=torch.rand(1, 1, 4, 4, 4))


def test_bad_options():
    with pytest.raises(ValueError, match="slice_axis"):
        PerX2CT(resolution=8, **TINY, slice_axis="oblique")
    with pytest.raises(ValueError, match="multiple of 2"):
        PerX2CT(resolution=9, **TINY)
    with pytest.raises(ValueError, match="GroupNorm"):
        PerX2CT(resolution=8, **{**TINY, "ch": 48})
    with pytest.raises(CheckpointError, match="no such file"):
        PerX2CT(resolution=8, **{**TINY, "pretrained": "nowhere/resnet.pth"})


@pytest.mark.parametrize("views", [(0.0, 270.0), (0.0, 90.0)])
def test_contract_at_2_views(views):
    torch.manual_seed(0)
    passed = testing.check_model(PerX2CT(resolution=8, **TINY), resolution=8, views=views, image_size=32, prev=False,
                                 autocast_dtypes=())
    assert "gradients reach every trainable parameter" in passed


# ---- their projection convention against the presets, on an analytic phantom ------------------------------------
N, MU, SIZE = 40, 0.02, 320.0
SPHERES = [((-0.15, 0.05, -0.2), 0.16), ((0.12, -0.15, 0.18), 0.10), ((0.05, 0.2, 0.05), 0.07)]  # (x, y, z), radius


def phantom() -> torch.Tensor:
    """The spheres in the framework's volume ``[1, 1, D, H, W]`` (x along W, y along H, z along D), partial volume."""
    ax = (torch.arange(N, dtype=torch.float64) + 0.5) / N - 0.5
    d, h, w = torch.meshgrid(ax, ax, ax, indexing="ij")
    vol = torch.zeros(N, N, N, dtype=torch.float64)
    for (x, y, z), r in SPHERES:
        dist = ((w - x) ** 2 + (h - y) ** 2 + (d - z) ** 2).sqrt() * SIZE
        vol += ((r * SIZE - dist) / (SIZE / N) + 0.5).clamp(0, 1)
    return (MU * vol)[None, None].float()


def their_camera_image(pose, px: int) -> torch.Tensor:
    """Chord lengths x MU through the spheres along the rays of PerX2CT's camera: pixel (r, c) of their input image
    sits at grid coordinates (x, y) = ((2c + 1) / px - 1, (2r + 1) / px - 1), i.e. camera direction
    (x tan 30, -y tan 30, -1); their world axes (d0, d1, d2) in units of the volume side."""
    c2w = torch.inverse(camera_world2cam(*pose).double())
    g = (torch.arange(px, dtype=torch.float64) + 0.5) / px * 2 - 1
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    t = math.tan(math.radians(30))
    d = torch.stack([xx * t, -yy * t, -torch.ones_like(xx)], -1) @ c2w[:3, :3].T
    d = d.flip(-1) / d.norm(dim=-1, keepdim=True)  # (d0, d1, d2) -> (x, y, z) = (W, H, D)
    src = c2w[:3, 3].flip(0) * SIZE
    out = torch.zeros(px, px, dtype=torch.float64)
    for (x, y, z), r in SPHERES:
        oc = src - torch.tensor([x, y, z], dtype=torch.float64) * SIZE
        along = (d * oc).sum(-1)
        out += MU * 2 * ((r * SIZE) ** 2 - ((oc * oc).sum() - along ** 2)).clamp_min(0).sqrt()
    return out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten() - a.double().mean(), b.double().flatten() - b.double().mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_presets_match_their_camera_on_an_analytic_phantom():
    """The framework's DRRs turned into their layout by the model against their camera's rendering of the same
    spheres. ``perx2ct_camera`` (their network's pinhole) agrees above 0.99; ``perx2ct`` (the 700 / 949 mm geometry of
    their DRRs) agrees to 0.97-0.98, the perspective their network's camera does not reproduce; the layouts one
    flip away do not fit."""
    px = 48
    model = PerX2CT(resolution=8, **{**TINY, "image_size": px})
    angles = {"angles": torch.tensor([[0.0, 270.0]])}
    theirs = (their_camera_image(PA_POSE, px), their_camera_image(LATERAL_POSE, px))
    found = {}
    for preset in ("perx2ct_camera", "perx2ct"):
        det = project(phantom(), make_geometry([0.0, 270.0], preset, volume_mm=SIZE), (px, px))
        pa, lat = model.their_views(det, angles)
        found[preset] = (correlation(pa[0, 0], theirs[0]), correlation(lat[0, 0], theirs[1]))
        assert correlation(det[0, 0, 0], theirs[0]) < 0.5 and correlation(pa[0, 0].flip(0), theirs[0]) < 0.5
        assert correlation(det[0, 1, 0], theirs[1]) < 0.5 and correlation(lat[0, 0].flip(0), theirs[1]) < 0.5
    assert min(found["perx2ct_camera"]) > 0.99, found
    assert 0.95 < min(found["perx2ct"]) < 0.99, found


@pytest.mark.slow
def test_their_recipe_validates(tmp_path, capsys):
    """recipes/benchmarks/perx2ct_lidc.toml on h5 cases laid out as X2CT-GAN's release: x2ct validate passes at CPU
    size, and with model.weights pointing at a missing PerX2CT.ckpt it names the file."""
    from test_x2ctgan_data import write_case

    from x2ct_framework.cli import main

    root = tmp_path / "LIDC-HDF5-256"
    names = [f"LIDC-IDRI-{i:04d}.2000" for i in range(1, 5)]
    for i, name in enumerate(names):
        write_case(root / name, seed=300 + i)
    (root / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "test.txt").write_text(names[3] + "\n")
    sets = [f'data.root="{root.as_posix()}"', 'data.train_list="train.txt"', 'data.test_list="test.txt"',
            'data.val_list=""',
            "data.val_fraction=0.34", f'output_dir="{(tmp_path / "runs").as_posix()}"', "stages.1.resolution=16",
            "data.image_size=32", "model.image_size=32", 'model.pretrained="random"', 'model.backbone="resnet18"',
            "model.latent_dim=8", "model.ch=32", "model.ch_mult=[1,1]", "model.num_res_blocks=1",
            "model.attn_resolutions=[]", "train.batch_size=2", "data.cache=false",
            'stages.1.losses.lpips={ weight = 1.0, net = "vgg", slices = 2, weights = "random" }']
    args = ["validate", "recipes/benchmarks/perx2ct_lidc.toml"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    assert "model perx2ct" in capsys.readouterr().out
    missing = (tmp_path / "weights" / "PerX2CT.ckpt").as_posix()
    assert main(args + ["--set", f'model.weights="{missing}"']) != 0
    assert "PerX2CT.ckpt" in capsys.readouterr().err


def test_shipped_case_lists_are_perx2cts_split_of_x2ctgans_cases():
    """perx2ct:train / val / test: 855, 17 and 76 cases, disjoint; their training cases are X2CT-GAN's training cases,
    their validation and test cases X2CT-GAN's test cases."""
    from x2ct_plugins.datasets._common import read_list_file
    from x2ct_plugins.datasets.x2ctgan_h5 import SHIPPED_LISTS

    train, val, test = (set(read_list_file(SHIPPED_LISTS[f"perx2ct:{s}"])) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (855, 17, 76)
    assert not (train & val or train & test or val & test)
    assert train <= set(read_list_file(SHIPPED_LISTS["x2ctgan:train"]))
    assert val | test <= set(read_list_file(SHIPPED_LISTS["x2ctgan:test"]))


def test_published_size_runs_on_their_128_views():
    """Their widths (ResNet-101 to layer2, the 1087-channel decoder) on two 128^2 views; a small output grid keeps it
    fast (the decoder's cost is per slice and pixel)."""
    torch.manual_seed(0)
    model = PerX2CT(resolution=8, pretrained="random", slice_chunk=8).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 2, 1, 128, 128), {"angles": torch.tensor([[0.0, 270.0]])})
    assert out.shape == (1, 1, 8, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    xrays, geometry = torch.rand(1, 2, 1, 32, 32), {"angles": torch.tensor([[0.0, 270.0]])}
    grads = []
    for flag in (False, True):
        torch.manual_seed(1)
        model = PerX2CT(resolution=4, **{**TINY, "slice_chunk": 2}, gradient_checkpointing=flag)
        model(xrays, geometry).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6)


def test_matrix_cells_build(tmp_path):
    """cpu_baselines' perx2ct_cpu cell runs on that matrix's data (two views at 0 and 90 degrees, 24^3); gpu_model's
    perx2ct cell asks for their published configuration."""
    from pathlib import Path

    import benchmarks.variants as V

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix"
    m = V.load_matrix(root / "cpu_baselines.toml")
    cell = next(c for c in m.cells if c.name == "perx2ct_cpu")
    recipe = V.cell_recipe(m, cell, m.seeds[0], tmp_path, m.budget["steps"])
    opts = {k: v for k, v in recipe["model"].items() if k != "name"}
    r = recipe["stages"][-1]["resolution"]
    model = PerX2CT(resolution=r, **opts)
    views = recipe["data"]["views"]
    with torch.no_grad():
        out = model(torch.rand(1, 2, 1, 24, 24), {"angles": torch.tensor([views], dtype=torch.float32)})
    assert out.shape == (1, 1, r, r, r)
    g = V.load_matrix(root / "gpu_model.toml")
    gpu = V.cell_recipe(g, next(c for c in g.cells if c.name == "perx2ct"), g.seeds[0], tmp_path, 10)
    assert gpu["model"]["name"] == "perx2ct" and gpu["data"]["views"] == [0, 270]
    assert not {"backbone", "ch", "latent_dim"} & set(gpu["model"])


def test_converter_command_names_a_missing_checkpoint(tmp_path, capsys):
    from x2ct_plugins.models.perx2ct import main

    assert main([str(tmp_path / "PerX2CT.ckpt"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "PerX2CT.ckpt" in err and "dek924/PerX2CT" in err and not (tmp_path / "out").exists()


def test_layout_follows_from_their_loader_and_the_stored_views():
    """Their dataset (x2ct_nerf/data/base.py) reads the stored PA mirrored left-right and the stored lateral
    transposed then flipped upside down; the stored views are X2CT-GAN's Plastimatch layout (their 2_xraypro.py is
    X2CT-GAN's script with a 700 mm source distance; preset ``perx2ct``'s ``stored_views``: xray1 = view 0 as it
    lies, xray2 = view 270 mirrored). Through both, the model's inputs."""
    from x2ct_framework.physics import GEOMETRY_PRESETS, to_stored

    assert GEOMETRY_PRESETS["perx2ct"]["stored_views"] == GEOMETRY_PRESETS["x2ctgan"]["stored_views"]
    stored = {v["key"]: v for v in GEOMETRY_PRESETS["perx2ct"]["stored_views"]}
    assert (stored["xray1"]["angle"], stored["xray2"]["angle"]) == (0.0, 270.0)
    views = torch.rand(1, 2, 1, 16, 16)  # detector frame, views at 0 and 270
    xray1 = to_stored(views[:, 0], stored["xray1"]["orientation"])
    xray2 = to_stored(views[:, 1], stored["xray2"]["orientation"])
    their_pa = xray1.flip(-1)  # np.fliplr
    their_lateral = xray2.transpose(-1, -2).flip(-2)  # np.transpose(., (1, 0)) then np.flipud
    model = PerX2CT(resolution=8, **{**TINY, "image_size": 16})
    pa, lat = model.their_views(views, {"angles": torch.tensor([[0.0, 270.0]])})
    assert torch.equal(pa, their_pa) and torch.equal(lat, their_lateral)

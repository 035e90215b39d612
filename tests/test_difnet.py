"""difnet: DIF-Net (xmed-lab/DIF-Net) layer for layer: sizes, their key names, the converter, any view count.

The parameter counts were measured by building their ``DIF_Net`` from their repository (commit
ddc4c3dbe6990d8898d7114e423d86458b98b900) outside this repository; docs/models.md records that check
(their random weights through the converter give a forward identical to theirs, maximum difference 0).
"""

from __future__ import annotations

import pytest
import torch

from x2ct_framework import testing
from x2ct_framework.errors import CheckpointError, DataError
from x2ct_plugins.models.difnet import DIFNet, convert_checkpoint, load_difnet_checkpoint
from x2ct_plugins.models.inputs import ModelInputError

TINY = dict(resolution=8, base_channels=4, mid_channels=8, classifier_channels=[8, 4, 4], eval_points=200)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_theirs():
    with torch.device("meta"):
        mlp = DIFNet(resolution=128, combine="mlp", num_views=10)  # scripts/train.sh: 10 views, --combine mlp
        pooled = DIFNet(resolution=128, combine="max")
    assert count(mlp) == 31_105_694
    assert count(pooled) == 31_105_633
    assert count(mlp.image_encoder) == 31_044_736 and count(mlp.point_classifier) == 60_897


def their_state_dict(num_views: int = 10) -> dict[str, tuple[int, ...]]:
    """Their module tree's keys and shapes (models/unet.py, model.py, point_classifier.py), written out here."""
    keys: dict[str, tuple[int, ...]] = {}

    def double(prefix: str, cin: int, cout: int) -> None:
        for i, (a, b) in ((0, (cin, cout)), (3, (cout, cout))):
            keys[f"{prefix}.double_conv.{i}.weight"] = (b, a, 3, 3)
            bn = f"{prefix}.double_conv.{i + 1}"
            keys.update({f"{bn}.weight": (b,), f"{bn}.bias": (b,), f"{bn}.running_mean": (b,),
                         f"{bn}.running_var": (b,), f"{bn}.num_batches_tracked": ()})

    double("image_encoder.inc", 1, 64)
    for i, (a, b) in enumerate([(64, 128), (128, 256), (256, 512), (512, 1024)], 1):
        double(f"image_encoder.down{i}.maxpool_conv.1", a, b)
    for i, (a, b) in enumerate([(1024, 512), (512, 256), (256, 128), (128, 64)], 1):
        keys[f"image_encoder.up{i}.up.weight"] = (a, a // 2, 2, 2)
        keys[f"image_encoder.up{i}.up.bias"] = (a // 2,)
        double(f"image_encoder.up{i}.conv", a, b)
    keys["image_encoder.outc.conv.weight"] = (128, 64, 1, 1)
    keys["image_encoder.outc.conv.bias"] = (128,)
    keys["view_mixer.layer.0.weight"] = (num_views // 2, num_views, 1, 1)
    keys["view_mixer.layer.0.bias"] = (num_views // 2,)
    keys["view_mixer.layer.2.weight"] = (1, num_views // 2, 1, 1)
    keys["view_mixer.layer.2.bias"] = (1,)
    for i, (a, b) in enumerate([(128, 256), (256 + 128, 64), (64 + 128, 16), (16 + 128, 1)]):
        keys[f"point_classifier.conv{i}.weight"] = (b, a, 1)
        keys[f"point_classifier.conv{i}.bias"] = (b,)
    return keys


def test_key_names_and_shapes_are_theirs():
    with torch.device("meta"):
        model = DIFNet(resolution=128, combine="mlp", num_views=10)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = their_state_dict(10)
    assert set(ours) == set(theirs) and len(ours) == 130
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def test_converter_loads_a_checkpoint_in_their_format(tmp_path):
    """A DIF-Net ``ep_N.pth`` (a bare state dict, here with DataParallel's ``module.`` prefix) built here with their
    key names -> checkpoint folder -> the same forward as the model the weights came from."""
    from x2ct_framework.checkpoint import load_into

    torch.manual_seed(0)
    source = DIFNet(**TINY, combine="mlp", num_views=4).eval()
    for m in source.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "ep_400.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    folder = convert_checkpoint(path, tmp_path / "converted", **{**TINY, "combine": "mlp", "num_views": 4})
    target = DIFNet(**TINY, combine="mlp", num_views=4)
    load_into(target, folder)
    target.eval()
    xrays = torch.rand(1, 4, 1, 32, 32)
    geometry = testing.make_batch(1, views=(0.0, 45.0, 90.0, 135.0), resolution=8, image_size=32,
                                  geometry="x2ctgan")["geometry"]
    with torch.no_grad():
        torch.testing.assert_close(target(xrays, geometry), source(xrays, geometry), rtol=0, atol=0)
    loaded = DIFNet(**TINY, combine="mlp", num_views=4, weights=str(path))  # the weights option reads it too
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match="DIF-Net checkpoint not found"):
        load_difnet_checkpoint(tmp_path / "missing.pth")
    path = tmp_path / "mlp.pth"
    torch.save(DIFNet(**TINY, combine="mlp", num_views=4).state_dict(), path)
    with pytest.raises(CheckpointError, match='set combine = "mlp"'):
        DIFNet(**TINY, combine="max", weights=str(path))
    with pytest.raises(CheckpointError, match="another shape"):
        DIFNet(**{**TINY, "mid_channels": 16}, combine="mlp", num_views=4, weights=str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        load_difnet_checkpoint(tmp_path / "junk.pth")


def test_point_decoding_matches_their_index_2d():
    """Sampling at a detector point: their ``grid_sample`` on the transposed map, first coordinate along rows."""
    from x2ct_plugins.models.difnet import sample_at

    feat = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    uv = torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]])  # (row, column), corners aligned
    out = sample_at(feat, uv)
    assert out.shape == (1, 2, 4)
    assert out[0, 0].tolist() == [feat[0, 0, 0, 0], feat[0, 0, 4, 6], feat[0, 0, 0, 6], feat[0, 0, 2, 3]]


@pytest.mark.parametrize("views", [(0.0, 90.0), (0.0, 45.0, 90.0, 135.0), tuple(i * 22.5 for i in range(8))])
def test_contract_at_2_4_8_views(views):
    torch.manual_seed(0)
    passed = testing.check_model(DIFNet(**TINY), resolution=8, views=views, image_size=16, prev=False,
                                 autocast_dtypes=())
    assert "gradients reach every trainable parameter" in passed


def test_view_count_and_bad_options():
    model = DIFNet(**TINY, combine="mlp", num_views=4)
    with pytest.raises(ModelInputError, match="num_views = 4 views, got 2"):
        model(torch.rand(1, 2, 1, 16, 16), {"angles": torch.tensor([[0.0, 90.0]])})
    with pytest.raises(ModelInputError, match="multiple of 16"):
        DIFNet(**TINY)(torch.rand(1, 2, 1, 20, 20), {"angles": torch.tensor([[0.0, 90.0]])})
    with pytest.raises(ValueError, match="combine"):
        DIFNet(**TINY, combine="mean")
    with pytest.raises(ValueError, match="image_size"):
        DIFNet(**TINY, image_size=24)


@pytest.mark.slow
def test_their_recipe_validates(tmp_path, capsys):
    """recipes/benchmarks/difnet_cbct.toml on CT folders rendered in their geometry: x2ct validate passes (CPU size)."""
    from x2ct_framework.cli import main

    from conftest import write_phantom_cts

    write_phantom_cts(tmp_path / "cts", voxel_mm=8.5)
    sets = [f"data.root={(tmp_path / 'cts').as_posix()}", f'output_dir="{(tmp_path / "runs").as_posix()}"',
            "stages.1.resolution=12", "data.image_size=32", "model.base_channels=4", "model.mid_channels=8",
            "model.classifier_channels=[8,4,4]", "train.batch_size=2", "data.cache=false"]
    assert main(["validate", "recipes/benchmarks/difnet_cbct.toml"] + [a for s in sets for a in ("--set", s)]) == 0
    assert "model difnet" in capsys.readouterr().out


def test_cpu_baselines_matrix_resolves_with_equal_data_and_steps(tmp_path):
    """benchmarks/matrix/cpu_baselines.toml: 3+ seeds, every baseline beside vit and cnn_baseline, same data/steps."""
    from pathlib import Path

    import benchmarks.variants as V

    m = V.load_matrix(Path(__file__).resolve().parents[1] / "benchmarks" / "matrix" / "cpu_baselines.toml")
    assert len(m.seeds) >= 3 and m.reference == "vit"
    recipes = {c.name: V.cell_recipe(m, c, m.seeds[0], tmp_path, m.budget["steps"]) for c in m.cells}
    models = {n: r["model"]["name"] for n, r in recipes.items()}
    assert {"vit_cascade", "cnn_baseline", "x2ctgan", "difnet"} <= set(models.values())
    assert len({repr(r["data"]) for r in recipes.values()}) == 1  # the same data for every cell
    assert len({r["stages"][-1]["epochs"] for r in recipes.values()}) == 1
    assert recipes["difnet_objective"]["stages"][-1]["optimizer"] == "sgd"

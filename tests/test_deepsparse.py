"""deepsparse: DeepSparse (xmed-lab/DeepSparse) layer for layer: sizes, their key names, the converter, any view count.

The parameter counts were measured by building their ``model_v7.Model_mv`` from their repository (commit
a055aba3bcb5732a68f89cc0bf3ee6fbfbb1b1e4, configs/finetune_s1.yaml = pretrain.yaml = scratch_mv.yaml, and
finetune_s2.yaml) outside this repository; docs/models.md records that check (their random weights through the
converter give their forward, in eval and in training mode, with maximum difference 0).
"""

from __future__ import annotations

import pytest
import torch

from x2ct_framework import testing
from x2ct_framework.errors import CheckpointError, DataError
from x2ct_framework.generative import model_terms
from x2ct_plugins.models.deepsparse import DeepSparse, convert_checkpoint, load_deepsparse_checkpoint
from x2ct_plugins.models.inputs import ModelInputError

TINY = dict(resolution=8, base_channels=4, levels=2, feature_channels=8, decoder_convs=1, mlp_channels=[8, 4, 1],
            codebook_size=16, grid=4, eval_points=200)


def count(module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def test_parameter_counts_equal_theirs():
    with torch.device("meta"):
        model = DeepSparse(resolution=128)  # configs/finetune_s1.yaml, pretrain.yaml, scratch_mv.yaml
        stage2 = DeepSparse(resolution=128, finetune=True)  # configs/finetune_s2.yaml
    assert count(model) == 6_041_419 and count(model, trainable=True) == 5_793_611
    assert count(stage2) == 7_217_899
    assert (count(model.encoder), count(model.cb), count(model.decoders), count(model.point_decoder)) == \
        (313_680, 291_808, 5_257_344, 178_587)
    assert count(stage2.denoise_layers) == 1_176_480


def their_state_dict(finetune: bool = False) -> dict[str, tuple[int, ...]]:
    """Their module tree's keys and shapes (models/model_v7.py, encoder.py, image_encoders/base.py, conv_utils.py,
    ema_codebook.py, point_decoder.py at their configuration), written out here."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    def conv(prefix: str, cout: int, cin: int, k: tuple[int, ...]) -> None:
        keys[f"{prefix}.weight"] = (cout, cin, *k)
        keys[f"{prefix}.bias"] = (cout,)

    def stacked(prefix: str, cin: int, cout: int, n: int, k: tuple[int, ...]) -> None:
        if cin != cout:
            conv(f"{prefix}.pre_conv.0", cout, cin, k)
            bn(f"{prefix}.pre_conv.1", cout)
        for j in range(n):
            conv(f"{prefix}.layers.{j}.conv.0", cout, cout, k)
            bn(f"{prefix}.layers.{j}.conv.1", cout)

    e = "encoder.encoder"
    conv(f"{e}.stem.conv.0", 16, 1, (3, 3))
    bn(f"{e}.stem.conv.1", 16)
    for i, c in enumerate([16, 32, 64]):
        conv(f"{e}.layers.{i}.0.layer.0", c, c, (2, 2))
        bn(f"{e}.layers.{i}.0.layer.1", c)
        stacked(f"{e}.layers.{i}.1", c, 2 * c, 1, (3, 3))
    chs = [128, 64, 32, 16]
    for i, c in enumerate(chs):
        conv(f"cb.{i}.pre_quant", c, c, (1, 1, 1))
        conv(f"cb.{i}.post_quant", c, c, (1, 1, 1))
        keys[f"cb.{i}.codebook.embedding.weight"] = (512, c)
        keys[f"cb.{i}.codebook.embedding.cluster_size"] = (512,)
        keys[f"cb.{i}.codebook.embedding.embed_avg"] = (512, c)
        stacked(f"decoders.{i}", c if i == 0 else c + 128, 128, 2, (3, 3, 3))
        if finetune:
            stacked(f"denoise_layers.{i}", c, c, 2, (3, 3, 3))
    widths = [368, 184, 128, 64, 16, 1]
    for i in range(5):
        conv(f"point_decoder.mlps.{i}.0", widths[i + 1], widths[i] + (368 if i else 0), (1,))
        bn(f"point_decoder.mlps.{i}.1", widths[i + 1])
    return keys


@pytest.mark.parametrize("finetune,entries", [(False, 210), (True, 266)])
def test_key_names_and_shapes_are_theirs(finetune, entries):
    with torch.device("meta"):
        model = DeepSparse(resolution=128, finetune=finetune)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = their_state_dict(finetune)
    assert set(ours) == set(theirs) and len(ours) == entries
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def randomised(model: DeepSparse) -> DeepSparse:
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def batch(views: int, size: int = 16, geometry: str = "x2ctgan") -> tuple[torch.Tensor, dict]:
    angles = tuple(i * 180.0 / views for i in range(views))
    b = testing.make_batch(1, views=angles, resolution=8, image_size=size, geometry=geometry)
    return b["xrays"], b["geometry"]


@pytest.mark.parametrize("prefix", ["", "module."])
def test_converter_loads_a_checkpoint_in_their_format(tmp_path, prefix):
    """A DeepSparse ``ep_N.pth`` (a bare state dict; with DDP's ``module.`` prefix or without) built here with their
    key names -> checkpoint folder -> the same forward as the model the weights came from."""
    from x2ct_framework.checkpoint import load_into

    torch.manual_seed(0)
    source = randomised(DeepSparse(**TINY, finetune=True)).eval()
    path = tmp_path / "ep_400.pth"
    torch.save({f"{prefix}{k}": v for k, v in source.state_dict().items()}, path)
    folder = convert_checkpoint(path, tmp_path / "converted", **TINY)  # finetune follows the file
    target = DeepSparse(**TINY, finetune=True)
    load_into(target, folder)
    target.eval()
    xrays, geometry = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(target(xrays, geometry), source(xrays, geometry), rtol=0, atol=0)
    loaded = DeepSparse(**TINY, finetune=True, weights=str(path))  # the weights option reads it too
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_converter_command_line(tmp_path, capsys):
    """``python -m x2ct_plugins.models.deepsparse SRC FOLDER``: the stage follows the file; a bad file is exit 2."""
    import json

    from x2ct_plugins.models.deepsparse import main

    path = tmp_path / "ep_700.pth"
    torch.save(DeepSparse(**TINY).state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:  # the command line builds their full-size network: shrink it
        import x2ct_plugins.models.deepsparse as module

        mp.setattr(module, "convert_checkpoint", lambda s, f, st, **o: convert_checkpoint(s, f, st, **TINY, **o))
        assert main([str(path), str(tmp_path / "out")]) == 0
        assert main([str(tmp_path / "missing.pth"), str(tmp_path / "out2")]) == 2
    assert json.loads((tmp_path / "out" / "state.json").read_text())["finetune"] is False
    assert "HajihajihaJimmy/DeepSparse" in capsys.readouterr().err


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match=r"HajihajihaJimmy/DeepSparse.*put the file at /"):
        load_deepsparse_checkpoint(tmp_path / "missing.pth")
    stage2 = tmp_path / "s2.pth"
    torch.save(DeepSparse(**TINY, finetune=True).state_dict(), stage2)
    with pytest.raises(CheckpointError, match="set finetune = true"):
        DeepSparse(**TINY, weights=str(stage2))
    stage1 = tmp_path / "s1.pth"
    torch.save({"state_dict": DeepSparse(**TINY).state_dict()}, stage1)  # a wrapper is accepted
    with pytest.raises(CheckpointError, match="set finetune = false, or safely_load"):
        DeepSparse(**TINY, finetune=True, weights=str(stage1))
    with pytest.raises(CheckpointError, match="another shape"):
        DeepSparse(**{**TINY, "feature_channels": 16}, weights=str(stage1))
    with pytest.raises(CheckpointError, match="unexpected"):
        torch.save({"encoder.encoder.stem.conv.0.weight": torch.zeros(4, 1, 3, 3), "head.weight": torch.zeros(1)},
                   tmp_path / "other.pth")
        DeepSparse(**TINY, weights=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        load_deepsparse_checkpoint(tmp_path / "junk.pth")
    # their stage 2 starts from stage 1 (--safely_load): the file's entries, fresh denoisers
    fresh = DeepSparse(**TINY, finetune=True, weights=str(stage1), safely_load=True)
    one = torch.load(stage1)["state_dict"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in one.items())


def test_vq_term_reaches_the_gradient_and_freezing():
    """The commitment loss is the model's own term (auxiliary_losses: vq_weight x loss_vq, taken once per forward
    pass), which the trainer adds to the recipe's losses: their loss + vq_w * loss_vq."""
    torch.manual_seed(0)
    xrays, geometry = batch(2)
    a, b = DeepSparse(**TINY, vq_weight=0.0), DeepSparse(**TINY, vq_weight=0.3)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        (m(xrays, geometry).sum() + sum(model_terms(m).values())).backward()
    assert float(b.last_aux_loss) > 0
    assert model_terms(b) == {} and model_terms(a) == {}  # taken once; none with vq_weight 0
    c = DeepSparse(**TINY, vq_weight=0.3)
    c.load_state_dict(a.state_dict())
    out = c(xrays, geometry)
    (term,) = model_terms(c).values()
    torch.testing.assert_close(term.detach(), 0.3 * c.last_aux_loss)
    c.eval()
    c(xrays, geometry)
    assert model_terms(c) == {}  # no term at evaluation
    del out
    assert not torch.allclose(a.cb[0].pre_quant.weight.grad, b.cb[0].pre_quant.weight.grad)
    torch.testing.assert_close(a.point_decoder.mlps[0][0].weight.grad, b.point_decoder.mlps[0][0].weight.grad)

    frozen = DeepSparse(**TINY, freeze_pretrained=True)
    codes = frozen.cb[0].codebook.embedding.weight.clone()
    frozen(xrays, geometry).sum().backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert torch.equal(codes, frozen.cb[0].codebook.embedding.weight)
    moving = DeepSparse(**TINY)
    codes = moving.cb[0].codebook.embedding.weight.clone()
    moving(xrays, geometry)
    assert not torch.equal(codes, moving.cb[0].codebook.embedding.weight)  # codes follow the moving averages


@pytest.mark.parametrize("views", [(0.0, 90.0), (0.0, 45.0, 90.0, 135.0), tuple(i * 22.5 for i in range(8))])
def test_contract_at_2_4_8_views(views):
    torch.manual_seed(0)
    passed = testing.check_model(DeepSparse(**TINY), resolution=8, views=views, image_size=16, prev=False,
                                 autocast_dtypes=())
    assert "gradients reach every trainable parameter" in passed


def test_contract_biplanar_cone_beam_and_stage2():
    """Two 0/90 degree views in X2CT-GAN's cone beam (the CPU matrix's setting); the stage-2 network too."""
    torch.manual_seed(0)
    for model in (DeepSparse(**TINY, image_size=24), DeepSparse(**TINY, finetune=True, checkpoint=True)):
        passed = testing.check_model(model, resolution=8, views=(0.0, 90.0), image_size=24, prev=False,
                                     geometry="x2ctgan", autocast_dtypes=())
        assert "the output depends on every view" in passed


def test_bad_inputs_and_options():
    model = DeepSparse(**TINY)
    with pytest.raises(ModelInputError, match="previous stage"):
        model(torch.rand(1, 2, 1, 16, 16), {"angles": torch.tensor([[0.0, 90.0]])}, prev=torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ModelInputError, match="model.image_size"):
        model(torch.rand(1, 2, 1, 2, 2), {"angles": torch.tensor([[0.0, 90.0]])})
    with pytest.raises(ModelInputError, match=r"\[B, V, 1, H, W\]"):
        model(torch.rand(1, 2, 16, 16), {"angles": torch.tensor([[0.0, 90.0]])})
    with pytest.raises(ValueError, match="mlp_channels"):
        DeepSparse(**{**TINY, "mlp_channels": [8, 4]})
    with pytest.raises(ValueError, match="vq_weight"):
        DeepSparse(**TINY, vq_weight=-1)
    with pytest.raises(ValueError, match="grid"):
        DeepSparse(**{**TINY, "grid": 1})


@pytest.mark.slow
def test_their_recipe_validates(tmp_path, capsys):
    """recipes/benchmarks/deepsparse_luna16.toml on CT folders: x2ct validate passes (CPU size)."""
    from x2ct_framework.cli import main

    from conftest import write_phantom_cts

    write_phantom_cts(tmp_path / "cts", voxel_mm=17.0)
    sets = [f"data.root={(tmp_path / 'cts').as_posix()}", f'output_dir="{(tmp_path / "runs").as_posix()}"',
            "stages.1.resolution=12", "data.image_size=32", "model.base_channels=4", "model.levels=2",
            "model.feature_channels=8", "model.decoder_convs=1", "model.mlp_channels=[8,4,1]",
            "model.codebook_size=16", "model.grid=6", "train.batch_size=2", "data.cache=false"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["validate", "recipes/benchmarks/deepsparse_luna16.toml"] + args) == 0
    assert "model deepsparse" in capsys.readouterr().out


def test_the_trainer_adds_and_logs_the_vq_term(tmp_path):
    """A short training run of a tiny deepsparse: the logged total is MSE + the vq term (train/vq)."""
    import json

    from x2ct_framework.run import main as run_main

    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
name = "ds"
seed = 0
output_dir = "{(tmp_path / 'runs').as_posix()}"
[data]
name = "synthetic_phantom"
views = [0, 90]
num_train = 2
num_val = 2
num_test = 2
[model]
name = "deepsparse"
resolution = 16
base_channels = 4
levels = 2
feature_channels = 8
decoder_convs = 1
mlp_channels = [8, 4, 1]
grid = 4
codebook_size = 8
vq_weight = 0.5
[train]
batch_size = 2
progress = false
log_every = 1
[[stages]]
name = "s1"
resolution = 16
epochs = 1
lr = 1e-3
losses = {{ mse = 1.0 }}
""")
    assert run_main([str(recipe), "--set", "eval.metrics=[\"psnr\"]"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "ds" / "s1" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert train and all("train/vq" in r and r["train/vq"] > 0 for r in train)
    for r in train:
        assert r["train/loss"] == pytest.approx(r["train/mse"] + r["train/vq"], rel=1e-5)

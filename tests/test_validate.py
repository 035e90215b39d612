"""x2ct validate runs the contract on the recipe's real components: each mistake is caught before training."""

from __future__ import annotations

import textwrap

import pytest

from x2ct_framework.cli import main as x2ct_main

PLUGIN = """
    import torch
    from x2ct_framework.hookspecs import hookimpl
    from x2ct_framework.testing import make_case


    class Data(torch.utils.data.Dataset):
        def __init__(self, split, stage, views: list = (0, 90), mode: str = "ok", n: int = 2):
            self.r, self.mode, self.n = stage.resolution, mode, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            item = make_case(i, resolution=self.r * 2 if self.mode == "noresize" and i else self.r)
            if self.mode == "hu":
                item["ct"] = item["ct"] * 4000.0 - 1000.0
            if self.mode == "nolabels":
                del item["labels"]
            return item


    class Flat(torch.nn.Module):
        def __init__(self, resolution, mode: str = "ok"):
            super().__init__()
            self.r, self.mode = resolution, mode
            self.w = torch.nn.Parameter(torch.tensor([0.5]))

        def forward(self, xrays, geometry, prev=None):
            x = xrays.detach() if self.mode == "detached" else xrays
            r = self.r // 2 if self.mode == "half" else self.r
            if self.mode == "dropview":
                x = x[:, :1]
            angles = torch.deg2rad(geometry["angles"].float())[:, : x.shape[1]]
            if self.mode == "nogeometry":
                angles = torch.zeros_like(angles)
            weights = (torch.cos(angles) + 1.5)[:, :, None, None, None]
            value = (x * weights).mean(dim=(1, 2, 3, 4))
            if self.mode == "batchmix":
                value = value - value.mean()  # statistics across the cases of the batch
            out = (self.w * value)[:, None, None, None, None].expand(-1, 1, r, r, r)
            if prev is not None and self.mode != "ignoreprev":
                out = out + torch.nn.functional.interpolate(prev, size=(r, r, r), mode="trilinear")
            return out


    class NoBatch(torch.nn.Module):
        def forward(self, pred, target):
            return (pred - target).abs().mean()


    class Detached(torch.nn.Module):
        def forward(self, pred, target, batch):
            return (pred.detach() - target).abs().mean()


    class NeedsLabels(torch.nn.Module):
        def forward(self, pred, target, batch):
            return ((pred - target).abs() * (batch["labels"] == 3)).mean()


    def bad_protocol(hu_window, scale: float = 1.0):
        return {"mae": lambda pred, target, batch: scale * (pred - target).abs().mean()}  # one value, not [B]


    @hookimpl
    def register_protocols(register):
        register("kit_bad_protocol", bad_protocol)


    @hookimpl
    def register_datasets(register):
        register("kit_data", Data)


    @hookimpl
    def register_models(register):
        register("kit_flat", Flat)


    @hookimpl
    def register_losses(register):
        register("kit_nobatch", NoBatch)
        register("kit_detached", Detached)
        register("kit_labels", NeedsLabels)
"""

RECIPE = """
    name = "kit"
    plugins = ["kit_plugin.py"]
    [data]
    name = "kit_data"
    views = [0, 90]
    [model]
    name = "kit_flat"
    [train]
    batch_size = 2
    [eval]
    metrics = ["psnr"]
    protocols = ["x2ctgan"]  # the default protocol's 11-voxel SSIM window needs more than 8^3
    [[stages]]
    resolution = 8
    epochs = 1
    losses = { l1 = 1.0 }
"""


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "kit_plugin.py").write_text(textwrap.dedent(PLUGIN))
    path = tmp_path / "kit.toml"
    path.write_text(textwrap.dedent(RECIPE))
    return path


def validate(recipe, *sets):
    argv = ["validate", str(recipe), "--no-describe"]
    for s in sets:
        argv += ["--set", s]
    return x2ct_main(argv)


def test_the_good_recipe_passes(recipe, capsys):
    assert validate(recipe) == 0
    out = capsys.readouterr().out
    assert "contract: ok" in out and out.strip().endswith("ok") and "(1 params)" in out


@pytest.mark.parametrize("sets, message", [
    (["model.mode='half'"], "model 'kit_flat' (plugin '"),
    (["model.mode='detached'"], "the output does not depend (differentiably) on the X-rays"),
    (["data.mode='hu'"], "train split, item 0: ct: values outside [0, 1]: -1000.."),
    (["data.mode='noresize'"], "2 train items do not collate into a batch"),
    (["stages.1.losses={kit_nobatch=1.0}"], "loss term 'kit_nobatch' (plugin '"),
    (["stages.1.losses={l1=1.0, kit_detached=0.5}"], "loss term 'kit_detached'"),
    (["data.mode='nolabels'", "stages.1.losses={kit_labels=1.0}"], "needs batch key 'labels' that dataset 'kit_data'"),
    (["model.mode='dropview'"], "the output depends on every view: changing view(s) [1] of 2 (angles [0.0, 90.0]) "
                                "leaves the output unchanged: the model ignores them"),
    (["model.mode='nogeometry'"], "the output depends on the geometry: the views' angles moved by 37 degrees and the "
                                  "output is unchanged: the model does not use the batch geometry"),
    (["model.mode='ignoreprev'", "stages.1.cascade=true"],
     "the output depends on prev: two different prev volumes (the previous stage's prediction) give the same output: "
     "the model ignores prev"),
    (["model.mode='batchmix'"], "each case's output is independent of the other cases: a case's output in a batch of "
                                "2 differs from its output alone"),
    (["eval.protocols=['x2ctgan', 'kit_bad_protocol']"],
     "protocol 'kit_bad_protocol' (plugin '"),
], ids=["wrong-shape-model", "detached-model", "hu-dataset", "no-resize", "loss-without-batch", "detached-loss",
        "missing-labels", "model-drops-a-view", "model-ignores-geometry", "model-ignores-prev",
        "model-mixes-the-batch", "protocol-metric-wrong-shape"])
def test_validate_catches(recipe, capsys, sets, message):
    assert validate(recipe, *sets) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert "kit_plugin.py" in err or "kit_data" in err


def test_training_time_loss_errors_name_the_term_and_its_plugin(recipe):
    import torch

    from x2ct_framework.config.build import build_losses, load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.errors import PluginError
    from x2ct_framework.testing import make_batch

    batch = make_batch(2, resolution=8)
    del batch["labels"]
    for losses, message in [("{l1=1.0, kit_detached=0.5}",
                             r"loss term 'kit_detached' \(loss 'kit_detached' from plugin .*kit_plugin.py.*\) "
                             r"does not depend "
                             r"differentiably"),
                            ("{kit_labels=1.0}", r"loss term 'kit_labels' .* needs batch key 'labels'"),
                            ("{kit_nobatch=1.0}", r"loss term 'kit_nobatch' .* raised TypeError")]:
        r = load_recipe(recipe, [f"stages.1.losses={losses}"])
        load_recipe_plugins(r)
        loss_set = build_losses(r, stages(r)[0])
        pred = torch.rand(2, 1, 8, 8, 8, requires_grad=True)
        with pytest.raises(PluginError, match=message):
            loss_set(pred, batch["ct"], batch)


def test_flop_line_is_opt_in(recipe, capsys):
    """The FLOP / memory count costs seconds: plain validate skips it, ``--describe`` prints it."""
    assert x2ct_main(["validate", str(recipe)]) == 0
    assert "    model: " not in capsys.readouterr().out
    assert x2ct_main(["validate", str(recipe), "--describe"]) == 0
    assert "    model: " in capsys.readouterr().out


def test_the_contract_batch_is_two_items_whatever_the_recipe_batch_size(recipe, capsys):
    """Two items check collation and one metric value per case; more would only cost data loading."""
    assert validate(recipe, "data.mode='noresize'", "data.n=6", "train.batch_size=4") == 2
    assert "2 train items do not collate into a batch" in capsys.readouterr().err


def test_a_protocol_metric_of_the_wrong_shape_is_named_with_its_plugin(recipe, capsys):
    assert validate(recipe, "eval.protocols=['x2ctgan', 'kit_bad_protocol']") == 2
    err = capsys.readouterr().err
    assert ("metric 'mae': one value per case [B], independent of the batch: returned shape (), expected one "
            "value per case (2,)") in err and "kit_plugin.py" in err and "Traceback" not in err
    assert "protocol 'x2ctgan'" not in err  # the built-in protocol passes on the same batch


def test_a_protocol_that_cannot_score_the_stage_resolution_is_caught(recipe, capsys):
    """The default protocol's SSIM needs 11 voxels a side: a report at 8^3 would crash after training."""
    assert validate(recipe, "eval.protocols=['default']") == 2
    assert "metric 'ssim': one value per case [B], independent of the batch: raised DataError: SSIM window of 11 " \
           "voxels does not fit volume (8, 8, 8)" in capsys.readouterr().err


def test_protocol_options_come_from_the_recipe_and_are_checked(recipe, capsys):
    sets = ["eval.protocols=['kit_bad_protocol']", "eval.protocol_options.kit_bad_protocol.scal=2.0"]
    assert validate(recipe, *sets) == 2
    err = capsys.readouterr().err
    assert "eval -> protocol_options -> kit_bad_protocol -> scal: unknown option for protocol 'kit_bad_protocol'" in err
    assert 'did you mean "scale"' in err

"""stages.N.cascade: the previous stage's frozen prediction reaches the model as ``prev`` in training,
validation, evaluation and prediction, within a recipe and across recipes (train.init_from)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_tables
from x2ct_framework.training import cascade
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import build_dataset, build_model, stages
from x2ct_framework.errors import RecipeError
from x2ct_framework.loading import load_model
from x2ct_framework.runs import resolve_target
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.run import main as run_main
from x2ct_framework.training.trainer import Trainer

TWO_STAGES = """
name = "{name}"
seed = 0
output_dir = "{out}"
""" + tiny_tables() + """
[train]
batch_size = 2
progress = false
trackers = []

[eval]
report = false
preview = false
metrics = ["psnr"]  # SSIM's 11-voxel window does not fit 8^3

[[stages]]
name = "stage1"
resolution = 8
epochs = 1
lr = 1e-3
losses = {{ l1 = 1.0 }}

[[stages]]
name = "stage2"
resolution = 16
epochs = 1
lr = 1e-3
cascade = true
losses = {{ l1 = 1.0 }}
"""


@pytest.fixture
def spy(monkeypatch):
    """Records the shape of every ``prev`` the frozen chain hands to a model."""
    seen = []
    forward = cascade.PreviousStages.forward

    def recording(self, xrays, geometry):
        out = forward(self, xrays, geometry)
        seen.append((tuple(xrays.shape), tuple(out.shape)))
        return out

    monkeypatch.setattr(cascade.PreviousStages, "forward", recording)
    return seen


def write(tmp_path, text: str, name: str = "casc"):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text.format(name=name, out=(tmp_path / "runs").as_posix())))
    return path


def first_batch(recipe, stage):
    return next(iter(DataLoader(build_dataset(recipe, stage, "val"), batch_size=2)))


def test_a_cascading_stage_trains_and_is_scored_with_the_previous_stage_prediction(tmp_path, spy, capsys):
    recipe = load_recipe(write(tmp_path, TWO_STAGES))
    Trainer(recipe).run()
    assert "cascade: prev comes from stage1" in capsys.readouterr().out
    # stage 1 trains without prev; every stage-2 step and validation batch gets stage 1's 8^3 volume
    assert spy and all(out == (2, 1, 8, 8, 8) and xr[-1] == 16 for xr, out in spy)
    assert len(spy) == 2 + 1  # 4 train cases / batch 2 = 2 steps, 2 val cases = 1 batch

    # evaluation rebuilds the same chain: stage2(x, prev=stage1(x at 8^2)) with both best checkpoints
    run = tmp_path / "runs" / "casc"
    model = load_model(resolve_target(run), torch.device("cpu"))
    assert isinstance(model, cascade.CascadeModel)
    s1, s2 = stages(recipe)
    m1, m2 = build_model(recipe, s1), build_model(recipe, s2)
    ckpt.load_into(m1, run / "stage1" / "best", strict=True)
    ckpt.load_into(m2, run / "stage2" / "best", strict=True)
    m1.eval(), m2.eval()
    batch = first_batch(recipe, s2)
    x, g = batch["xrays"], batch["geometry"]
    with torch.no_grad():
        prev = m1(torch.nn.functional.interpolate(x.flatten(0, 1), size=(8, 8), mode="bilinear",
                                                  antialias=True).reshape(2, 2, 1, 8, 8), g)
        expected = m2(x, g, prev=prev)
        got = model(x, g)
        without = m2(x, g)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, without, atol=1e-4)  # prev changes the answer: it is really used


def test_a_one_stage_recipe_cascades_from_the_run_that_made_its_init_checkpoint(tmp_path, spy):
    """The user's plan's stage2_extended pattern: one stage, train.init_from = runs/stage1/stage1/best."""
    first = TWO_STAGES[:TWO_STAGES.index("[[stages]]\nname = \"stage2\"")]
    Trainer(load_recipe(write(tmp_path, first, "s1"))).run()
    second = TWO_STAGES.replace('[[stages]]\nname = "stage1"\nresolution = 8\nepochs = 1\nlr = 1e-3\n'
                                'losses = {{ l1 = 1.0 }}\n\n', "")
    second = second.replace("[train]\n", f'[train]\ninit_from = "{(tmp_path / "runs/s1/stage1/best").as_posix()}"\n')
    recipe = load_recipe(write(tmp_path, second, "s2"))
    assert [s.name for s in stages(recipe)] == ["stage2"]
    Trainer(recipe).run()
    assert spy and all(out == (2, 1, 8, 8, 8) for _, out in spy)
    model = load_model(resolve_target(tmp_path / "runs" / "s2"), torch.device("cpu"))
    assert isinstance(model, cascade.CascadeModel) and model.previous.sizes == [8]


def test_cascade_without_a_previous_stage_is_a_recipe_error(tmp_path, capsys):
    only = TWO_STAGES.replace('[[stages]]\nname = "stage1"\nresolution = 8\nepochs = 1\nlr = 1e-3\n'
                              'losses = {{ l1 = 1.0 }}\n\n', "")
    assert run_main([str(write(tmp_path, only))]) == 2
    err = capsys.readouterr().err
    assert "cascade" in err and "train.init_from" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "casc" / "stage2" / "best").exists()


def test_cascade_needs_the_previous_checkpoint(tmp_path):
    recipe = load_recipe(write(tmp_path, TWO_STAGES))
    s2 = stages(recipe)[1]
    with pytest.raises(Exception, match="stage1's best checkpoint"):
        cascade.previous_stages(recipe, s2, tmp_path / "runs" / "casc")
    assert cascade.previous_stages(recipe, stages(recipe)[0], None) is None
    with pytest.raises(RecipeError, match="cascade"):
        load_recipe(write(tmp_path, TWO_STAGES.replace("cascade = true", 'cascade = "yes"')))


def test_resize_xrays_keeps_each_view_apart():
    levels = torch.arange(6, dtype=torch.float32).reshape(2, 3, 1, 1, 1) / 6
    x = levels.expand(2, 3, 1, 16, 16).contiguous()  # every view one grey level
    y = cascade.resize_xrays(x, 8)
    assert y.shape == (2, 3, 1, 8, 8) and torch.allclose(y, levels.expand(2, 3, 1, 8, 8), atol=1e-6)
    ramp = torch.linspace(0, 1, 16).expand(1, 1, 1, 16, 16)
    assert torch.allclose(cascade.resize_xrays(ramp, 32)[..., 1::2].mean(), ramp.mean(), atol=0.02)
    assert cascade.resize_xrays(x, 16) is x

"""Recipes: extends, overrides and every kind of validation error."""

import textwrap

import pytest

from x2ct_framework.errors import RecipeError
from x2ct_framework.config.recipe import load_recipe, parse_override
from x2ct_framework.config.schema import describe

BASE = """
name = "base"
[data]
name = "synthetic_phantom"
views = [0, 90]
[model]
name = "vit_cascade"
tokens = 8
[train]
batch_size = 2
[[stages]]
resolution = 16
epochs = 2
losses = { l1 = 1.0 }
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_extends_deep_merges_tables_and_replaces_arrays(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "sub/child.toml", "") if False else None
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, "sub/child.toml", """
        extends = "../base.toml"
        name = "child"
        [data]
        views = [0, 45, 90, 135]
        [model]
        dim = 32
    """)
    r = load_recipe(child)
    assert r.name == "child"
    assert r["data"] == {"name": "synthetic_phantom", "views": [0, 45, 90, 135]}
    assert r["model"] == {"name": "vit_cascade", "tokens": 8, "dim": 32}
    assert r["train"]["batch_size"] == 2 and r["train"]["grad_accum"] == 1  # default filled
    assert r["stages"][0]["name"] == "stage1" and r["stages"][0]["lr"] == 1e-4
    assert r.origin(("model", "tokens")).endswith("base.toml")
    assert r.origin(("model", "dim")).endswith("child.toml")


def test_overrides_are_toml_values_with_1_based_stage_positions(tmp_path):
    p = write(tmp_path, "r.toml", BASE)
    r = load_recipe(p, ["stages.1.epochs=5", "data.views=[0, 60, 120]", "train.mixed_precision=bf16",
                        "stages.stage1.lr=3e-4", 'name="with space"'])
    assert r["stages"][0]["epochs"] == 5 and r["stages"][0]["lr"] == 3e-4
    assert r["data"]["views"] == [0, 60, 120]
    assert r["train"]["mixed_precision"] == "bf16"
    assert r.name == "with space"
    assert r.origin(("stages", 0, "epochs")) == "--set"


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path):
    p = write(tmp_path, "r.toml", BASE.replace("batch_size = 2", 'batch_size = "two"\nbatchsize = 3')
              .replace("epochs = 2", 'epochs = 2\nlr = "fast"'))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    problems = err.value.problems
    assert len(problems) == 3
    assert f"{p.resolve()}: train -> batch_size: expected an integer, got 'two'" in problems
    assert any(q.startswith(f"{p.resolve()}: train -> batchsize: unknown key")
               and 'did you mean "batch_size"' in q for q in problems)
    assert f"{p.resolve()}: stages -> 1 -> lr: expected a number, got 'fast'" in problems


@pytest.mark.parametrize("text, expected", [
    ('[eval]\npreview = "yes"', "eval -> preview: expected true or false, got 'yes'"),
    ("[[stages]]\nresolution = 16\nepochs = 1\nlr = -1.0", "stages -> 2 -> lr: expected a positive number"),
    ("[[stages]]\nepochs = 1", "stages -> 2 -> resolution: required key is missing"),
    ("[[stages]]\nresolution = 8\nepochs = 1\nlosses = { l1 = -1 }",
     "stages -> 2 -> losses -> l1 -> weight: expected a number >= 0"),
    ('[[stages]]\nresolution = 8\nepochs = 1\nlosses = { l1 = "x" }', "stages -> 2 -> losses -> l1: expected a weight"),
])
def test_wrong_values(tmp_path, text, expected):
    p = write(tmp_path, "r.toml", BASE + text)
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(p)


@pytest.mark.parametrize("override, expected", [
    ("train.mixed_precision=fp8", "--set: train -> mixed_precision: expected one of 'no', 'fp16', 'bf16'"),
    ("seed=1.5", "--set: seed: expected an integer, got 1.5"),
    ("train.grad_accum=0", "--set: train -> grad_accum: expected an integer >= 1, got 0"),
    ("train.start_stage=3", "train -> start_stage: the recipe has 1 stage(s), got start_stage = 3"),
])
def test_wrong_values_from_overrides(tmp_path, override, expected):
    p = write(tmp_path, "r.toml", BASE)
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(p, [override])


def test_missing_component_table(tmp_path):
    p = write(tmp_path, "r.toml", BASE.replace('[model]\nname = "vit_cascade"\ntokens = 8\n', ""))
    with pytest.raises(RecipeError, match=r"r.toml: model: required table is missing"):
        load_recipe(p)


def test_bad_extends_path_names_the_file(tmp_path):
    p = write(tmp_path, "r.toml", 'extends = "nope.toml"\n' + BASE)
    with pytest.raises(RecipeError, match=r"r.toml: extends: file not found: .*nope.toml"):
        load_recipe(p)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\nname = "a"')
    write(tmp_path, "b.toml", 'extends = "a.toml"\nname = "b"')
    with pytest.raises(RecipeError, match=r"cycle in extends: .*a.toml -> .*b.toml -> .*a.toml"):
        load_recipe(tmp_path / "a.toml")


def test_invalid_toml_names_the_file(tmp_path):
    p = write(tmp_path, "r.toml", "name = \n")
    with pytest.raises(RecipeError, match=r"r.toml: not valid TOML"):
        load_recipe(p)


@pytest.mark.parametrize("override, expected", [
    ("stages.1.epochs", "expected dotted.key=value"),
    ("stages..epochs=1", "empty key part"),
    ("data.views=[0, 90", "is not a TOML value"),
    ("stages.7.epochs=1", "position 7 is out of range"),
    ("stages.stag1.epochs=1", 'no item named \'stag1\'; did you mean "stage1"'),
    ("name.sub=1", "is a str, not a table"),
    ("train.batchsize=4", "--set: train -> batchsize: unknown key"),
    ("train.batch_size=four words", "is not a TOML value"),
])
def test_bad_overrides(tmp_path, override, expected):
    p = write(tmp_path, "r.toml", BASE)
    with pytest.raises(RecipeError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        load_recipe(p, [override])


def test_bare_word_override_is_a_string():
    assert parse_override("data.name=ct_folder") == (["data", "name"], "ct_folder")
    assert parse_override("train.init_from=runs/x/stage1/best") == (["train", "init_from"], "runs/x/stage1/best")


def test_resolved_recipe_round_trips(tmp_path):
    p = write(tmp_path, "r.toml", BASE)
    r = load_recipe(p, ["stages.1.losses.ssim=0.5"])
    out = write(tmp_path, "resolved.toml", r.to_toml())
    r2 = load_recipe(out)
    assert r2.data == r.data


def test_schema_is_described_for_docs():
    keys = [row[0] for row in describe()]
    assert "train.batch_size" in keys and "stages.N.lr" in keys


FOUR_MISTAKES = BASE.replace("batch_size = 2", 'batch_size = "two"\ntrackers = ["tensorbord"]') \
    .replace('name = "vit_cascade"', 'name = "vit_cascad"') \
    .replace("losses = { l1 = 1.0 }",
             'select_best = "val/psnrr"\nlosses = { l1 = 1.0, ssim = { weight = 0.5, windw = 7 } }')


def test_mistakes_of_every_kind_are_reported_in_one_run(tmp_path):
    """A type (schema), a select_best that validation does not measure and a tracker nobody provides (checks
    across keys), an unknown model (registry) and a misspelt loss option (the factory's signature): one error."""
    p = write(tmp_path, "r.toml", FOUR_MISTAKES)
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    problems, where = err.value.problems, str(p.resolve())
    assert f"{where}: train -> batch_size: expected an integer, got 'two'" in problems
    assert any(q.startswith(f"{where}: stages -> 1 -> select_best: 'val/psnrr' is not measured") for q in problems)
    assert any(q.startswith(f"{where}: train -> trackers -> 1: unknown tracker 'tensorbord'")
               and 'did you mean "tensorboard"' in q for q in problems)
    assert any(q.startswith(f'{where}: model: unknown model "vit_cascad"') and 'did you mean "vit_cascade"' in q
               for q in problems)
    assert any(q.startswith(f"{where}: stages -> 1 -> losses -> ssim -> windw: unknown option for loss 'ssim'")
               for q in problems)
    assert len(problems) == 5, problems


def test_a_trainer_built_from_python_gets_the_same_checks(tmp_path):
    from x2ct_framework.training.trainer import Trainer

    p = write(tmp_path, "r.toml", FOUR_MISTAKES)
    recipe = load_recipe(p, validate=False)
    with pytest.raises(RecipeError) as err:
        Trainer(recipe)
    assert len(err.value.problems) == 5


def test_a_long_list_of_accepted_options_is_cut(tmp_path):
    p = write(tmp_path, "r.toml", BASE.replace("tokens = 8", "tokns = 8"))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    (line,) = [q for q in err.value.problems if "tokns" in q]
    assert 'did you mean "tokens"' in line and " more)" in line and len(line) < 400


def test_metric_and_protocol_options_are_set_in_the_recipe_and_checked(tmp_path):
    from x2ct_framework.config.build import build_metrics

    p = write(tmp_path, "r.toml", BASE + '[eval]\nmetrics = ["psnr", "ssim"]\n[eval.metric_options.psnr]\n'
              'slices = true\npeak = 2000.0\n[eval.protocol_options.default]\nstructures = false\n')
    recipe = load_recipe(p)
    metrics = build_metrics(recipe)
    assert metrics["psnr"].slices is True and metrics["psnr"].peak == 2000.0 and metrics["ssim"] is not None
    bad = write(tmp_path, "bad.toml", BASE + '[eval]\nmetrics = ["psnr"]\n[eval.metric_options.psnr]\nslice = true\n'
                '[eval.metric_options.mae]\nx = 1\n[eval.protocol_options.default]\nstructure = false\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    msg = str(err.value)
    assert "eval -> metric_options -> psnr -> slice: unknown option for metric 'psnr'; did you mean \"slices\"?" in msg
    assert "eval -> metric_options -> mae: 'mae' is not one of eval.metrics (psnr)" in msg
    assert ("eval -> protocol_options -> default -> structure: unknown option for protocol 'default'; did you mean "
            "\"structures\"?") in msg

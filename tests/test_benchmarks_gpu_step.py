"""The GPU-step switches: ``train.compile`` (with its fallback to eager) and the launcher's mixed precision."""

from __future__ import annotations

import pytest
import torch

from x2ct_framework.errors import RecipeError
from x2ct_framework.training import compile as C
from x2ct_framework.training.precision import apply_launcher_precision, launcher_precision


def test_compile_values():
    assert C.compile_mode(False) is None and C.compile_mode(True) == "default"
    assert C.compile_mode("max-autotune") == "max-autotune"
    assert C.check_compile("fast") and C.check_compile(1) and C.check_compile("reduce-overhead") is None
    with pytest.raises(ValueError, match="train.compile: expected false, true or one of"):
        C.compile_mode("fast")


def test_compile_off_keeps_the_module_as_is():
    m = torch.nn.Linear(3, 2)
    assert C.compile_model(m, False) is m and m._compiled_call_impl is None and m.compile_fallback is None


def test_compile_failure_at_the_first_call_falls_back_to_eager(monkeypatch):
    def broken(fn, **kwargs):
        assert kwargs["mode"] == "max-autotune"

        def call(*a, **k):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    m, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    expected = torch.nn.functional.linear(x, m.weight, m.bias)
    said: list[str] = []
    assert C.compile_model(m, "max-autotune", log=said.append) is m
    assert m._compiled_call_impl is not None  # compiled lazily: the failure comes at the first call
    assert torch.equal(m(x), expected)  # ... which still returns the eager result
    assert said == ["torch.compile (mode 'max-autotune') failed, the model runs eager: RuntimeError: no C++ compiler "
                    "found. Set train.compile = false to skip compiling."]
    assert m._compiled_call_impl is None and m.compile_fallback == "RuntimeError: no C++ compiler found"
    assert list(m.state_dict()) == ["weight", "bias"]  # the module itself, not a wrapper


def test_compile_unavailable_at_torch_compile(monkeypatch):
    def unavailable(fn, **kwargs):
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", unavailable)
    said: list[str] = []
    m = C.compile_model(torch.nn.Linear(2, 2), True, log=said.append)
    assert m._compiled_call_impl is None and "is not available here, the model runs eager" in said[0]


def test_launcher_precision_wins_over_the_recipe_with_a_message():
    assert launcher_precision("no", {}) == ("no", None)
    assert launcher_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}) == ("bf16", None)  # the launcher default
    assert launcher_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == ("bf16", None)
    value, msg = launcher_precision("no", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert value == "bf16"
    assert msg == ("mixed precision bf16 from accelerate launch --mixed_precision (ACCELERATE_MIXED_PRECISION) wins "
                   "over the recipe's train.mixed_precision = 'no'")
    with pytest.raises(RecipeError, match="--mixed_precision fp8 .* the recipe's train.mixed_precision is 'bf16'"):
        launcher_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_apply_launcher_precision_records_what_ran(tmp_path, monkeypatch):
    from x2ct_framework.config.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[data]\nname = "synthetic_phantom"\n[model]\nname = "vit_cascade"\n'
                    '[train]\nmixed_precision = "fp16"\ncompile = "max-autotune"\n[[stages]]\nresolution = 16\n'
                    'epochs = 1\n')
    recipe = load_recipe(path)
    assert recipe["train"]["compile"] == "max-autotune"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    said = apply_launcher_precision(recipe)
    assert recipe["train"]["mixed_precision"] == "bf16" and "train -> mixed_precision = 'fp16'" in said
    path.write_text(path.read_text().replace('"max-autotune"', '"fast"'))
    with pytest.raises(RecipeError, match="train -> compile: expected false, true or one of"):
        load_recipe(path)


def test_trainer_compiles_the_model_and_takes_the_launcher_precision(tiny_recipe, monkeypatch, capsys):
    """Wiring: train.compile reaches the prepared model (a stand-in compiler counts its calls); the
    launcher's bf16 replaces the recipe's "no" and the run says so.

    Four updates, not one: on some CPUs torch's bf16 convolution backward now and then returns a NaN weight
    gradient (seen on an AMD EPYC, about 1 call in 40 with the same inputs); the trainer skips such an update
    (train.max_nonfinite_steps) and refuses a stage none of whose updates happened, which this test tolerates:
    what it checks is the wiring, not bf16 arithmetic on a CPU."""
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.training.guards import TrainingDiverged
    from x2ct_framework.training.trainer import Trainer

    calls = []

    def counting(fn, **kwargs):
        def call(*a, **k):
            calls.append(kwargs["mode"])
            return fn(*a, **k)
        return call

    monkeypatch.setattr(torch, "compile", counting)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    recipe = load_recipe(tiny_recipe, ['train.compile="reduce-overhead"', "train.trackers=[]", "eval.report=false",
                                       "eval.preview=false", "train.max_steps_per_epoch=2", "stages.1.epochs=2"])
    trainer = Trainer(recipe)
    assert trainer.accelerator.mixed_precision == "bf16" and recipe["train"]["mixed_precision"] == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    try:
        trainer.run()
    except TrainingDiverged as exc:  # every bf16 update hit the CPU kernel's NaN: the wiring below still ran
        assert "optimizer updates so far was skipped" in str(exc)
    out = capsys.readouterr().out
    assert "mixed precision bf16 from accelerate launch --mixed_precision" in out
    assert calls and set(calls) == {"reduce-overhead"}  # training and validation went through the compiled call
    assert trainer.model.compile_fallback is None
    assert 'mixed_precision = "bf16"' in (trainer.run_dir / "recipe.toml").read_text()  # what ran is recorded

"""The bad-input matrix: every bad recipe, data file, checkpoint or plugin ends the same way.

Each case runs a command (in-process through ``x2ct_framework.run.main`` / ``x2ct_framework.cli.main``,
a few in a subprocess) against a run folder that already holds a good checkpoint, and must end with:
a message on stderr that names the culprit (file, dotted key, plugin or path) and what was expected,
a non-zero exit status, no traceback, and the run folder's checkpoints byte-for-byte unchanged and
still loadable.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import PYTHON, TINY_RECIPE, run_env
from x2ct_framework import checkpoint as ckpt
from x2ct_framework.config.build import build_model, stages
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.plugins import reset_plugin_manager
from x2ct_framework.config.recipe import load_recipe
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.run import main as run_main
from x2ct_framework.testing import registered


# ---- the environment each case gets ----------------------------------------------------------------
@dataclass
class Env:
    tmp: Path
    recipe: Path  # the good tiny recipe, output_dir = tmp/runs
    good_ckpt: Path  # a good checkpoint folder outside the run folder (for init_from cases)

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / "tiny"

    @property
    def last(self) -> Path:
        return self.run_dir / "stage1" / "last"

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def variant(self, *, replace: dict[str, str] | None = None, append: str = "", name: str = "variant.toml") -> Path:
        """The tiny recipe with text replaced and/or appended (same run name and output folder)."""
        text = self.recipe.read_text()
        for old, new in (replace or {}).items():
            assert old in text, f"the tiny recipe has no {old!r}"
            text = text.replace(old, new)
        return self.write(name, text + textwrap.dedent(append))

    def plugin(self, name: str, source: str) -> Path:
        return self.write(name, source)


@dataclass
class Bad:
    id: str
    setup: Callable[[Env], list[str]]  # returns the command line (after the command name)
    expect: tuple[str, ...]  # every one must appear in stderr
    command: str = "run"  # run | validate | plugins
    code: int = 2
    env: dict = field(default_factory=dict)  # environment variables for the case
    prepare: Callable | None = None  # prepare(env, monkeypatch) before the command


def sets(*overrides: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        argv = [str(env.recipe)]
        for o in overrides:
            argv += ["--set", o]
        return argv

    return setup


def variant(replace: dict[str, str] | None = None, append: str = "", extra: tuple[str, ...] = ()):
    def setup(env: Env) -> list[str]:
        return [str(env.variant(replace=replace, append=append)), *extra]

    return setup


def with_plugin(source: str, file: str = "bad_plugin.py", extra: tuple[str, ...] = ()):
    """The tiny recipe plus ``plugins = [file]`` holding ``source``."""

    def setup(env: Env) -> list[str]:
        env.plugin(file, source)
        recipe = env.variant(replace={'seed = 0': f'seed = 0\nplugins = ["{file}"]'})
        return [str(recipe), *extra]

    return setup


HOOKIMPL = "from x2ct_framework.hookspecs import hookimpl\n"

# ---- recipes -------------------------------------------------------------------------------------------
RECIPES = [
    Bad("unknown-top-level-key", variant(replace={"seed = 0": "seed = 0\nepochz = 3"}),
        ("variant.toml: epochz: unknown key",)),
    Bad("unknown-key-did-you-mean", sets("train.batchsize=3"),
        ("train -> batchsize: unknown key", 'did you mean "batch_size"')),
    Bad("unknown-stage-key", sets("stages.1.epoch=3"),
        ("stages -> 1 -> epoch: unknown key", 'did you mean "epochs"')),
    Bad("wrong-type-lr", sets('stages.1.lr="fast"'), ("stages -> 1 -> lr: expected a number, got 'fast'",)),
    Bad("wrong-type-batch-size", sets("train.batch_size=2.5"),
        ("train -> batch_size: expected an integer, got 2.5",)),
    Bad("wrong-type-bool", sets('train.progress="yes"'), ("train -> progress: expected true or false",)),
    Bad("wrong-type-views", sets('data.views="PA"'), ("data -> views", "'PA'")),
    Bad("zero-resolution", sets("stages.1.resolution=0"),
        ("stages -> 1 -> resolution: expected a positive number, got 0",)),
    Bad("negative-epochs", sets("stages.1.epochs=-1"), ("stages -> 1 -> epochs: expected a number >= 0, got -1",)),
    Bad("zero-batch-size", sets("train.batch_size=0"), ("train -> batch_size: expected an integer >= 1, got 0",)),
    Bad("start-stage-beyond-recipe", sets("train.start_stage=3"),
        ("train -> start_stage: the recipe has 1 stage(s), got start_stage = 3",)),
    Bad("bad-choice-mixed-precision", sets('train.mixed_precision="fp8"'),
        ("train -> mixed_precision: expected one of", "got 'fp8'")),
    Bad("negative-loss-weight", sets("stages.1.losses.l1=-1.0"),
        ("stages -> 1 -> losses -> l1", "expected a number >= 0, got -1.0")),
    Bad("bad-loss-schedule", sets('stages.1.losses.l1={weight=1.0, schedule="cosine"}'),
        ("stages -> 1 -> losses -> l1 -> schedule", "got 'cosine'")),
    Bad("unknown-model", sets("model.name=vit_cascde"),
        ('model: unknown model "vit_cascde"', 'did you mean "vit_cascade"')),
    Bad("unknown-dataset", sets("data.name=synthetic_phantoms"),
        ('data: unknown dataset "synthetic_phantoms"', 'did you mean "synthetic_phantom"')),
    Bad("unknown-loss", sets("stages.1.losses.l2=1.0"), ('stages -> 1 -> losses -> l2: unknown loss "l2"',)),
    Bad("unknown-metric", sets('eval.metrics=["psnr", "psnrr"]'), ('eval -> metrics -> 2: unknown metric "psnrr"',)),
    Bad("unknown-model-option", sets("model.tokenz=8"),
        ("model -> tokenz: unknown option for model 'vit_cascade'", 'did you mean "tokens"')),
    Bad("model-option-wrong-type", sets('model.tokens="many"'), ("model -> tokens: expected int, got 'many'",)),
    Bad("model-option-impossible", sets("model.heads=3"),
        ("model: model 'vit_cascade' rejected its options", "dim (16) must be divisible by heads (3)")),
    Bad("loss-option-unknown", sets("stages.1.losses.l1={weight=1.0, mask=\"labels\"}"),
        ("stages -> 1 -> losses -> l1 -> mask: unknown option for loss 'l1'",)),
    Bad("component-not-a-table", variant(replace={'[model]\nname = "vit_cascade"': '[modelx]\nname = "vit_cascade"'}),
        ("model: required table is missing", "modelx: unknown key")),
    Bad("component-without-name", sets("model.name=3"),
        ("model -> name: expected the plugin name as a string, got 3",)),
    Bad("no-stages", variant(replace={"[[stages]]": "[[stagez]]"}),
        ("stages: required array of tables is missing",)),
    Bad("duplicate-stage-names", variant(append='\n[[stages]]\nname = "stage1"\nresolution = 16\nepochs = 1\n'),
        ("stages: stage names must be unique",)),
    Bad("toml-syntax-error", lambda env: [str(env.write("broken.toml", 'name = "x"\n[train\nbatch_size = 2\n'))],
        ("broken.toml: not valid TOML",)),
    Bad("missing-recipe-file", lambda env: [str(env.tmp / "nope.toml")], ("recipe: file not found", "nope.toml")),
    Bad("extends-missing-file", variant(replace={"seed = 0": 'seed = 0\nextends = "base_nope.toml"'}),
        ("variant.toml: extends: file not found", "base_nope.toml")),
    Bad("extends-cycle", lambda env: [str(env.write("a.toml", 'extends = "b.toml"\nname = "a"\n'))
                                      if env.write("b.toml", 'extends = "a.toml"\n') else ""],
        ("cycle in extends", "a.toml -> ", "b.toml")),
    Bad("override-without-equals", sets("train.batch_size"), ("--set train.batch_size: expected dotted.key=value",)),
    Bad("override-out-of-range", sets("stages.5.epochs=1"),
        ("--set stages.5.epochs=1: position 5 is out of range (1..1",)),
    Bad("override-unknown-stage-name", sets("stages.stage9.epochs=1"),
        ("--set stages.stage9.epochs=1: no item named 'stage9'",)),
    Bad("override-unquoted-spaces", sets("name=my run"), ("--set name=my run", "strings with spaces need quotes")),
    Bad("override-through-a-scalar", sets("seed.value=1"), ("--set seed.value=1: seed is a int, not a table",)),
    Bad("validate-too", sets("model.tokenz=8"), ("model -> tokenz: unknown option",), command="validate"),
]

# ---- plugins --------------------------------------------------------------------------------------------
PLUGINS = [
    Bad("recipe-plugin-file-missing",
        lambda env: [str(env.variant(replace={"seed = 0": 'seed = 0\nplugins = ["nope_plugin.py"]'}))],
        ("plugin file 'nope_plugin.py' not found", "nope_plugin.py")),
    Bad("recipe-plugin-import-error", with_plugin("import a_module_that_does_not_exist\n"),
        ("plugin file", "bad_plugin.py failed to import: ModuleNotFoundError", "a_module_that_does_not_exist")),
    Bad("recipe-plugin-syntax-error", with_plugin("def broken(:\n"),
        ("bad_plugin.py failed to import: SyntaxError",)),
    Bad("recipe-plugin-module-missing",
        lambda env: [str(env.variant(replace={"seed = 0": 'seed = 0\nplugins = ["no_such_pkg.losses"]'}))],
        ("plugin module 'no_such_pkg.losses' failed to import",)),
    Bad("plugins-not-a-list", lambda env: [str(env.variant(replace={"seed = 0": 'seed = 0\nplugins = "x.py"'}))],
        ("plugins: expected an array of strings, got 'x.py'",)),
    Bad("hook-raises",
        with_plugin(HOOKIMPL + "@hookimpl\ndef register_losses(register):\n    raise RuntimeError('boom')\n"),
        ("bad_plugin.py", "raised inside register_losses: RuntimeError: boom")),
    Bad("duplicate-component-name", with_plugin(HOOKIMPL + "@hookimpl\ndef register_losses(register):\n"
                                               "    register('l1', lambda: None)\n"),
        ("duplicate loss name 'l1'", "bad_plugin.py")),
    Bad("factory-not-callable", with_plugin(HOOKIMPL + "@hookimpl\ndef register_models(register):\n"
                                           "    register('not_callable', 42)\n"),
        ("registered model 'not_callable' with a factory that is not callable",)),
    Bad("factory-returns-wrong-type", with_plugin(
        HOOKIMPL + "@hookimpl\ndef register_models(register):\n"
        "    register('str_model', lambda resolution: 'a model')\n",
        extra=("--set", "model={name='str_model'}")),
        ("model 'str_model'", "returned str", "expected a torch.nn.Module")),
    Bad("dataset-factory-returns-wrong-type", with_plugin(
        HOOKIMPL + "@hookimpl\ndef register_datasets(register):\n"
        "    register('none_data', lambda split, stage: None)\n",
        extra=("--set", "data={name='none_data'}")),
        ("dataset 'none_data'", "returned NoneType", "expected a torch.utils.data.Dataset")),
    Bad("loss-returns-non-scalar", with_plugin(
        "import torch\n" + HOOKIMPL + "@hookimpl\ndef register_losses(register):\n"
        "    register('per_voxel', lambda: (lambda pred, target, batch: (pred - target).abs()))\n",
        extra=("--set", "stages.1.losses={per_voxel=1.0}")),
        ("loss term 'per_voxel'", "expected a scalar")),
    Bad("model-returns-wrong-shape", with_plugin(
        "import torch\n" + HOOKIMPL + "class Half(torch.nn.Module):\n"
        "    def __init__(self, resolution):\n        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.zeros(()))\n"
        "        self.r = resolution // 2\n"
        "    def forward(self, xrays, geometry, prev=None):\n"
        "        return self.w + torch.zeros(xrays.shape[0], 1, self.r, self.r, self.r)\n"
        "@hookimpl\ndef register_models(register):\n    register('half_model', Half)\n",
        extra=("--set", "model={name='half_model'}")),
        ("model 'half_model'", "(2, 1, 8, 8, 8)", "(2, 1, 16, 16, 16)")),
    Bad("lifecycle-hook-raises", with_plugin(
        HOOKIMPL + "@hookimpl\ndef on_stage_start(trainer, stage):\n    raise ValueError('no GPU quota left')\n"),
        ("bad_plugin.py", "raised inside on_stage_start: ValueError: no GPU quota left")),
    Bad("strict-mode-broken-entry-point", sets(),
        ("'broken_ep' from x2ct-broken-ep failed to load", "X2CT_STRICT_PLUGINS"),
        env={"X2CT_STRICT_PLUGINS": "1"}, prepare=lambda env, mp: broken_entry_point(env.tmp, mp)),
]

# ---- data -----------------------------------------------------------------------------------------------
def nifti(path: Path, array, spacing=(20.0, 20.0, 20.0)) -> Path:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


def chest(n: int = 16):
    """A small HU volume: air around a water cylinder with a bone rod."""
    import numpy as np

    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
    hu = np.full((n, n, n), -1000.0)
    hu[(x**2 + y**2) < (0.4 * n) ** 2] = 0.0
    hu[(x**2 + (y - 0.2 * n) ** 2) < (0.08 * n) ** 2] = 700.0
    return hu


SPLITS = 'train = ["case0", "case1"]\nval = ["case2"]\ntest = ["case3"]\n'


def nan_voxel(hu):
    hu[8, 8, 8] = float("nan")
    return hu


def ct_folder(files: dict[str, Callable[[Path], object]] | None = None, options: str = "", cases: int = 4):
    """The tiny recipe reading a ct_folder of ``cases`` good volumes, then ``files`` (name -> writer) written
    over them; case1 is in the train split."""

    def setup(env: Env) -> list[str]:
        root = env.tmp / "cts"
        root.mkdir()
        for i in range(cases):
            nifti(root / f"case{i}.nii.gz", chest())
        (root / "splits.toml").write_text(SPLITS)
        for name, write in (files or {}).items():
            write(root / name)
        data = (f'[data]\nname = "ct_folder"\nroot = "{root.as_posix()}"\nviews = [0, 90]\ngeometry = "parallel"\n'
                f'splits = "{(root / "splits.toml").as_posix()}"\n{textwrap.dedent(options)}')
        text = env.recipe.read_text()
        start, end = text.index("[data]"), text.index("[model]")
        path = env.write("ct.toml", text[:start] + data + "\n" + text[end:])
        return [str(path)]

    return setup


def truncated(src_writer):
    def write(path: Path):
        src_writer(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


def garbage(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)


DATA = [
    Bad("data-root-missing", sets('data={name="ct_folder", root="no_such_folder"}'),
        ("no_such_folder: CT folder not found (data.root of ct_folder)",)),
    Bad("data-folder-empty", ct_folder(cases=0), ("no CT volumes found",)),
    Bad("data-truncated-volume", ct_folder({"case1.nii.gz": truncated(lambda p: nifti(p, chest()))}),
        ("case1.nii.gz",)),
    Bad("data-corrupted-volume", ct_folder({"case1.nii.gz": garbage}), ("case1.nii.gz",)),
    Bad("data-2d-image", ct_folder({"case1.nii.gz": lambda p: nifti(p, chest()[0])}),
        ("case1.nii.gz: expected a single-channel 3D volume",)),
    Bad("data-4d-image", ct_folder({"case1.nii.gz": lambda p: nifti(p, chest()[..., None].repeat(2, -1))}),
        ("case1.nii.gz: expected a single-channel 3D volume",)),
    Bad("data-nan-voxels", ct_folder({"case1.nii.gz": lambda p: nifti(p, nan_voxel(chest()))}),
        ("case1.nii.gz", "NaN")),
    Bad("data-labels-on-another-grid", ct_folder(
        {f"labels/case{i}.nii.gz": (lambda p: nifti(p, chest(12) > 0)) for i in range(4)},
        options='labels_dir = "LABELS"'),
        ("label map is on another grid",)),
    Bad("data-split-names-missing-case", ct_folder({"splits.toml": lambda p: p.write_text(
        'train = ["case0", "case9"]\nval = ["case1"]\ntest = ["case2"]\n')}), ("splits.toml", "case9")),
    Bad("data-empty-split", ct_folder({"splits.toml": lambda p: p.write_text(
        'train = ["case0"]\nval = []\ntest = ["case2"]\n')}), ("the val split is empty",)),
    Bad("data-bad-split-file", ct_folder({"splits.toml": lambda p: p.write_text('train = "case0"\n')}),
        ("splits.toml: expected a table with keys among train, val, test",)),
    Bad("data-every-case-unreadable", ct_folder({f"case{i}.nii.gz": garbage for i in range(4)},
                                                options='on_bad_case = "skip"'), ("cts", "the train split is empty")),
    Bad("data-unknown-geometry", sets('data.geometry="x2ctgann"'), ("x2ctgann", 'did you mean "x2ctgan"')),
    Bad("data-reversed-hu-window", sets("data.hu_window=[3000, -1000]"),
        ("--set: data -> hu_window: expected [low, high] in HU with low < high, got [3000, -1000]",)),
    Bad("data-hu-window-wrong-type", sets('data.hu_window="lung"'), ("data -> hu_window: expected [low, high]",)),
    Bad("data-no-views", sets("data.views=[]"), ("data", "views: expected at least one")),
    Bad("data-empty-phantom-split", sets("data.num_val=0"), ("data", "num_val must be at least 1")),
    Bad("data-h5-root-missing", sets('data={name="x2ctgan_h5", root="no_h5_here"}'), ("no_h5_here",)),
]


def _fix_paths(case: Bad) -> Bad:
    """ct_folder options may name LABELS: the labels folder of the case."""
    setup = case.setup

    def wrapped(env: Env) -> list[str]:
        argv = setup(env)
        path = Path(argv[0])
        path.write_text(path.read_text().replace('"LABELS"', f'"{(env.tmp / "cts" / "labels").as_posix()}"'))
        return argv

    return Bad(case.id, wrapped, case.expect, case.command, case.code, case.env, case.prepare)


DATA = [_fix_paths(c) for c in DATA]


# ---- checkpoints ---------------------------------------------------------------------------------------
def damage(kind: str, file: str, how: str, *extra: str):
    """Damage ``file`` of the run's ``kind`` checkpoint (or of the init_from copy) and run with ``extra``."""

    def setup(env: Env) -> list[str]:
        folder = env.good_ckpt if kind == "init" else env.run_dir / "stage1" / kind
        path = folder / file
        data = path.read_bytes()
        path.unlink()  # the run folder holds hard links to the good run: never write through them
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif how == "flip":  # one byte of tensor data: the header still parses
            pos = len(data) - 17
            path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:])
        elif how == "garbage":
            path.write_text("{ not json")
        elif how == "pickle":
            path.write_bytes(pickle.dumps(Payload(env.tmp / "pickle_payload_ran")))
        elif how == "delete":
            pass  # unlinked above
        argv = [str(env.recipe), *extra]
        if kind == "init":
            argv += ["--set", f"train.init_from={env.good_ckpt.as_posix()}"]
        return argv

    return setup


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: loading a checkpoint must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def other_model_checkpoint(env: Env) -> list[str]:
    """init_from a checkpoint of another model (the CNN baseline)."""
    from x2ct_framework.testing import create

    reset_plugin_manager()
    model = create("model", "cnn_baseline", {"channels": 4, "levels": 2}, resolution=16)
    folder = env.tmp / "cnn_ckpt"
    ckpt.save_checkpoint(folder, model, {"stage": "stage1", "epoch": 1})
    return [str(env.recipe), "--set", f"train.init_from={folder.as_posix()}"]


def two_stages(*extra: str):
    """A two-stage variant writing to a fresh output folder; ``{tmp}`` in ``extra`` is the case's folder."""

    def setup(env: Env) -> list[str]:
        path = env.variant(append='\n[[stages]]\nname = "stage2"\nresolution = 16\nepochs = 1\nlosses = { l1 = 1.0 }\n')
        return [str(path), *(e.format(tmp=env.tmp.as_posix()) for e in extra)]

    return setup


CHECKPOINTS = [
    Bad("init-from-missing", sets("train.init_from=no_such_checkpoint"),
        ("starts from no_such_checkpoint", "which does not exist")),
    Bad("init-from-truncated-weights", damage("init", "model.safetensors", "truncate"), ("model.safetensors",)),
    Bad("init-from-another-model", other_model_checkpoint, ("cnn_ckpt does not fit stage1's model 'vit_cascade'",
                                                             "another model")),
    Bad("init-from-tampered-weights", damage("init", "model.safetensors", "flip"),
        ("model.safetensors was altered or damaged after it was written",)),
    Bad("init-from-pickle-instead-of-safetensors", damage("init", "model.safetensors", "pickle"),
        ("model.safetensors",)),
    Bad("start-stage-without-previous-best", two_stages("--set", "train.start_stage=2",
                                                        "--set", "output_dir={tmp}/elsewhere_runs"),
        ("stage2 (train.start_stage = 2) starts from", "which does not exist", "Train stage1 first")),
    Bad("resume-truncated-weights", damage("last", "model.safetensors", "truncate", "--resume"),
        ("last/model.safetensors",)),
    Bad("resume-truncated-trainer-state", damage("last", "trainer.safetensors", "truncate", "--resume"),
        ("trainer.safetensors",)),
    Bad("resume-weights-deleted", damage("last", "model.safetensors", "delete", "--resume"),
        ("checkpoint weights not found", "last/model.safetensors")),
    Bad("resume-damaged-trainer-json", damage("last", "trainer.json", "garbage", "--resume"), ("trainer.json",)),
    Bad("resume-damaged-state-json", damage("last", "state.json", "garbage", "--resume"), ("state.json",)),
    Bad("resume-tampered-trainer-state", damage("last", "trainer.safetensors", "flip", "--resume"),
        ("trainer.safetensors was altered or damaged",)),
    Bad("resume-pickle-trainer-state", damage("last", "trainer.safetensors", "pickle", "--resume"),
        ("trainer.safetensors",)),
    # --allow-change lets these past the recipe comparison (test_run_safety.py), to the checkpoint's own checks
    Bad("resume-another-model", lambda env: [str(env.recipe), "--resume", "--set", "model.dim=32",
                                             "--allow-change", "model.dim"],
        ("cannot resume from", "do not fit this stage's model")),
    Bad("resume-another-resolution", lambda env: [str(env.recipe), "--resume", "--set", "stages.1.resolution=32",
                                                  "--allow-change", "stages.1.resolution"],
        ("cannot resume stage1 from", "trained at 16^3", "now says 32^3")),
]

def evaluate_best(*extra: str, flip: bool = False):
    """``x2ct evaluate runs/tiny/stage1/best`` (optionally after altering one byte of its weights)."""

    def setup(env: Env) -> list[str]:
        best = env.run_dir / "stage1" / "best"
        if flip:
            damage("best", "model.safetensors", "flip")(env)
        return [str(best), "--max-cases", "1", "--bootstrap", "10", "--no-progress", *extra]

    return setup


CHECKPOINTS += [
    Bad("evaluate-tampered-checkpoint", evaluate_best(flip=True),
        ("best/model.safetensors was altered or damaged after it was written",), command="evaluate"),
    Bad("evaluate-with-another-model", evaluate_best("--set", "model.dim=32"),
        ("best does not fit the model", "shape mismatch"), command="evaluate"),
]

DATA_AND_CHECKPOINTS = DATA + CHECKPOINTS
CASES = RECIPES + PLUGINS + DATA_AND_CHECKPOINTS

# A run over a folder that already holds checkpoints is refused before its first batch (without --resume,
# see test_run_safety.py), so the cases whose error comes from the first batch or a stage hook train a new
# run folder beside the good one (which must still be left as it was).
AFTER_STAGE_START = {"loss-returns-non-scalar", "model-returns-wrong-shape", "lifecycle-hook-raises",
                     "data-truncated-volume", "data-nan-voxels", "data-labels-on-another-grid"}


def in_a_new_run_folder(case: Bad) -> Bad:
    setup = case.setup
    return Bad(case.id, lambda env: [*setup(env), "--set", "name=tiny_fresh"], case.expect, case.command,
               case.code, case.env, case.prepare)


CASES = [in_a_new_run_folder(c) if c.id in AFTER_STAGE_START else c for c in CASES]


# ---- the good run every case starts from ---------------------------------------------------------------
def tiny_text(out: Path) -> str:
    """The conftest tiny recipe with a 0.1 M-parameter model (timm's test encoder) and two epochs, so an
    interrupted run has a stage to resume and its checkpoints are small enough to copy per case."""
    text = textwrap.dedent(TINY_RECIPE.format(out=out.as_posix()))
    assert "epochs = 1" in text and "channels = 4\n" in text
    text = text.replace("epochs = 1", "epochs = 2")
    if "encoder =" not in text:
        text = text.replace("channels = 4\n", 'channels = 4\nencoder = "test_efficientnet"\ndecoder_levels = 1\n', 1)
    return text


class StopAfterFirstEpoch:
    """Ctrl-C after the first epoch's checkpoint: the trainer saves ``last`` and stops mid-stage."""

    @staticmethod
    @hookimpl
    def on_epoch_end(trainer, stage, epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """An interrupted tiny run (epoch 1 of 2: ``last`` and ``best`` written); every case gets a copy."""
    root = tmp_path_factory.mktemp("good")
    recipe = root / "tiny.toml"
    recipe.write_text(tiny_text(root / "runs"))
    reset_plugin_manager()
    with registered(StopAfterFirstEpoch, "stop_after_first_epoch"):
        assert run_main([str(recipe)]) == 130
    reset_plugin_manager()
    state = ckpt.load_state(root / "runs" / "tiny" / "stage1" / "last")
    assert (state["epoch"], state["complete"]) == (1, False)
    return root


@pytest.fixture
def env(good_run, tmp_path) -> Env:
    # Hard links: cheap, and safe because checkpoints are replaced by rename, never rewritten in place
    # (a command that did write into one would change the good run and fail every later case's hashes).
    shutil.copytree(good_run / "runs", tmp_path / "runs", copy_function=os.link)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_text(tmp_path / "runs"))
    shutil.copytree(good_run / "runs" / "tiny" / "stage1" / "best", tmp_path / "good_ckpt")
    return Env(tmp_path, recipe, tmp_path / "good_ckpt")


def broken_entry_point(tmp_path, monkeypatch):
    """An installed distribution whose entry point fails to import."""
    tmp_path = tmp_path / "site"
    tmp_path.mkdir()
    (tmp_path / "x2ct_broken_ep.py").write_text("raise ImportError('needs cuda_only_lib')\n")
    info = tmp_path / "x2ct_broken_ep-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: x2ct-broken-ep\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[x2ct_framework]\nbroken_ep = x2ct_broken_ep\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file in every checkpoint folder and of the resolved recipe."""
    files = [p for p in run_dir.rglob("*") if p.is_file()
             and (p.name == "recipe.toml" or any(part in ("last", "best") for part in p.relative_to(run_dir).parts))]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_run_folder_intact(env: Env, before: dict[str, str], pristine: dict[str, str]) -> None:
    """Nothing changed since ``before``; every checkpoint the case did not damage on purpose still loads."""
    after = snapshot(env.run_dir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"the failed command changed or removed {changed}"
    damaged = {Path(k).parent.name for k in pristine if before.get(k) != pristine[k]}
    reset_plugin_manager()
    recipe = load_recipe(env.recipe)
    model = build_model(recipe, stages(recipe)[0])
    intact = [kind for kind in ("last", "best") if kind not in damaged]
    assert intact, "every checkpoint was damaged by the case itself"
    for kind in intact:
        ckpt.load_into(model, env.run_dir / "stage1" / kind, strict=True)
    if "last" in intact:
        assert ckpt.load_trainer_state(env.run_dir / "stage1" / "last")["position"]["epoch"] == 1


def dispatch(command: str, argv: list[str]) -> int:
    if command == "run":
        return run_main(argv)
    return x2ct_main([command, *argv])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, env, capsys, monkeypatch):
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.prepare is not None:
        case.prepare(env, monkeypatch)
    pristine = snapshot(env.run_dir)
    assert any(k.startswith("stage1/last/") for k in pristine)
    argv = case.setup(env)
    before = snapshot(env.run_dir)
    reset_plugin_manager()
    code = dispatch(case.command, argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "error:" in err and "Traceback" not in err, err
    missing = [s for s in case.expect if s not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    for key in case.env:
        monkeypatch.delenv(key)
    assert not (env.tmp / "pickle_payload_ran").exists(), "a checkpoint was unpickled"
    assert_run_folder_intact(env, before, pristine)


def test_the_matrix_is_large_enough():
    assert len(CASES) + len(DATA_AND_CHECKPOINTS) >= 40
    assert len({c.id for c in CASES}) == len(CASES)




# ---- a few in a real process: exit status and stderr as a shell sees them ---------------------------------
@pytest.mark.parametrize("args, expect", [
    (["run", "{recipe}", "--set", "train.batchsize=3"], 'did you mean "batch_size"'),
    (["validate", "{recipe}", "--set", "model.name=vit_cascde"], 'unknown model "vit_cascde"'),
])
def test_bad_input_in_a_subprocess(args, expect, env):
    before = snapshot(env.run_dir)
    argv = [a.format(recipe=env.recipe) for a in args]
    out = subprocess.run([PYTHON, "-m", "x2ct_framework.cli", *argv], capture_output=True, text=True,
                         env=run_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert expect in out.stderr and out.stderr.startswith("error:") and "Traceback" not in out.stderr
    assert_run_folder_intact(env, before, before)


# ---- nothing the framework loads is unpickled -------------------------------------------------------------
def test_no_code_path_unpickles_untrusted_files():
    """Every torch.load in the framework and built-in plugins passes weights_only=True; no pickle.load(s)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*(root / "x2ct_framework").rglob("*.py"), *(root / "plugins").rglob("*.py")]):
        if path.relative_to(root).as_posix() == "x2ct_framework/testing/checks.py":
            continue  # pickles the author's own dataset to check worker-process support
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = getattr(node.func.value, "id", "")
            if owner == "torch" and node.func.attr == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} torch.load without weights_only=True")
            if owner in ("pickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {owner}.{node.func.attr}")
    assert not offenders, offenders

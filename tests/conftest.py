"""Shared fixtures: tiny recipes and a clean plugin manager per test."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """The datasets' default cache (``~/.cache/x2ct``) points into the test session's temporary folder."""
    os.environ["X2CT_CACHE_DIR"] = str(tmp_path_factory.mktemp("x2ct-cache"))
    yield


@pytest.fixture(autouse=True)
def _clean_plugins(monkeypatch):
    """Each test starts with a fresh plugin manager and no plugin-selection variables."""
    from x2ct_framework.plugins import reset_plugin_manager

    monkeypatch.delenv("X2CT_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("X2CT_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def tiny_tables(encoder: str = "test_resnet", num_train: int = 4, decoder_levels: int | None = 1) -> str:
    """The ``[data]`` and ``[model]`` tables every tiny test recipe shares: phantoms at 16^3, a 4^3-token cascade."""
    return textwrap.dedent(f"""
        [data]
        name = "synthetic_phantom"
        views = [0, 90]
        num_train = {num_train}
        num_val = 2
        num_test = 2

        [model]
        name = "vit_cascade"
        tokens = 4
        dim = 16
        depth = 1
        heads = 2
        channels = 4
        encoder = "{encoder}"
        """) + (f"decoder_levels = {decoder_levels}\n" if decoder_levels is not None else "")


def braces(text: str) -> str:
    """``text`` escaped for ``str.format`` (the recipes below keep one ``{out}`` field)."""
    return text.replace("{", "{{").replace("}", "}}")


TINY_RECIPE = """
name = "tiny"
seed = 0
output_dir = "{out}"
""" + braces(tiny_tables()) + """
[train]
batch_size = 2
progress = false
log_every = 1

[[stages]]
name = "stage1"
resolution = 16
epochs = 1
lr = 1e-3
losses = {{ l1 = 1.0 }}
"""


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    """A one-stage recipe at 16^3 that trains in about a second."""
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY_RECIPE.format(out=(tmp_path / "runs").as_posix())))
    return path


def write_phantom_cts(root: Path, count: int = 10, voxel_mm: float = 8.5, size: int = 24, seed: int = 600) -> Path:
    """``count`` chest phantoms as ``root/caseNN/ct.nii.gz`` (a ``ct_folder`` tree) of ``voxel_mm`` voxels."""
    import nibabel as nib
    import numpy as np

    from x2ct_framework.phantom import chest_phantom

    for i in range(count):
        hu, _ = chest_phantom(size, seed=seed + i)
        (root / f"case{i:02d}").mkdir(parents=True)
        data = hu.permute(2, 1, 0).numpy().astype(np.int16)
        affine = np.diag([-voxel_mm, -voxel_mm, -voxel_mm, 1.0])
        nib.save(nib.Nifti1Image(data, affine), str(root / f"case{i:02d}" / "ct.nii.gz"))
    return root


def run_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


PYTHON = sys.executable

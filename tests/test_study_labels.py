"""Per-case study labels from a CSV (RSPECT-style) attached to ct_folder items, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import read_study_labels


def create(split: str = "train", **options):
    return get_plugin_manager().registry("dataset").create("ct_folder", options, where="recipe.toml: data",
                                                           split=split, stage=Stage("stage1", 1, 16))


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    """Three phantom CTs at 16^3 (20 mm voxels), named like RSPECT's study folders."""
    import nibabel as nib
    import numpy as np

    root = tmp_path_factory.mktemp("ctpa")
    for i in range(3):
        hu, _ = chest_phantom(16, seed=200 + i)
        data = hu.permute(2, 1, 0).numpy().astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([-20.0, -20.0, -20.0, 1.0])), root / f"study{i}.nii.gz")
    return root


RSPECT = """StudyInstanceUID,SOPInstanceUID,negative_exam_for_pe,pe_present_on_image,central_pe
study0,a,0,1,1
study0,b,0,0,1
study1,c,1,0,0
study2,d,0,1,false
study2,e,0,0,false
other,f,1,0,0
"""


def test_rspect_style_rows_are_reduced_per_study_and_reach_every_item(ct_root, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text(RSPECT)
    ds = create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv),
                study_id_column="StudyInstanceUID", study_columns=["negative_exam_for_pe", "pe_present_on_image",
                                                                   "central_pe"], study_reduce="max")
    by_case = {ds[i]["case_id"]: ds[i]["study"] for i in range(len(ds))}
    assert by_case["study0"] == {"negative_exam_for_pe": 0.0, "pe_present_on_image": 1.0, "central_pe": 1.0}
    assert by_case["study1"] == {"negative_exam_for_pe": 1.0, "pe_present_on_image": 0.0, "central_pe": 0.0}
    assert by_case["study2"]["central_pe"] == 0.0  # "false"
    batch = default_collate([ds[0], ds[1]])
    assert batch["study"]["negative_exam_for_pe"].shape == (2,)
    assert "study" not in create(root=str(ct_root), split_fractions=[1, 0, 0])[0]  # no file: no labels


def test_the_reductions_and_empty_values():
    import tempfile
    from pathlib import Path

    f = Path(tempfile.mkdtemp()) / "l.csv"
    f.write_text("id,score,flag\na,1,yes\na,3,\nb,,no\n")
    assert read_study_labels(f, "id", reduce="mean")["a"] == {"score": 2.0, "flag": 1.0}
    assert read_study_labels(f, "id", reduce="first")["a"]["score"] == 1.0
    assert math.isnan(read_study_labels(f, "id", reduce="max")["b"]["score"])
    with pytest.raises(DataError, match=r"case 'a' has 2 rows whose column 'score' disagrees \(1, 3\)"):
        read_study_labels(f, "id")


def test_errors_name_the_file_the_column_and_the_unmatched_cases(ct_root, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("case,pe\nstudy0,1\nstudy1,0\n")
    with pytest.raises(DataError, match=rf"{csv}: 1 case\(s\) of the train split have no row \(matched on column "
                                        r"'case'\): study2; the file's ids look like study0, study1"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv), study_id_column="case")
    with pytest.raises(DataError, match=rf"{csv}: no case-id column 'case_id' \(columns: case, pe\)"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv))
    with pytest.raises(DataError, match=rf"{csv}: no column 'pe_present' \(data.study_columns; columns: case, pe\)"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv), study_id_column="case",
               study_columns=["pe_present"])
    csv.write_text("case,pe\nstudy0,1\nstudy1,maybe\nstudy2,0\n")
    with pytest.raises(DataError, match=rf"{csv}, line 3, column 'pe': 'maybe' is not a number"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv), study_id_column="case")
    with pytest.raises(DataError, match="the study-label file .*absent.csv was not found"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(tmp_path / "absent.csv"))
    with pytest.raises(RecipeError, match="study_reduce must be one of error, max, mean, first"):
        create(root=str(ct_root), split_fractions=[1, 0, 0], study_reduce="median")


def test_pe_detectability_reads_the_attached_labels(ct_root, tmp_path):
    """The CSV's column reaches the evaluator's label, negated for RSPECT's negative_exam_for_pe."""
    from x2ct_framework.evaluation.evaluators import batch_column

    csv = tmp_path / "train.csv"
    csv.write_text(RSPECT)
    ds = create(root=str(ct_root), split_fractions=[1, 0, 0], study_labels=str(csv),
                study_id_column="StudyInstanceUID", study_columns=["negative_exam_for_pe"])
    batch = default_collate([ds[i] for i in range(3)])
    values = batch_column(batch, "negative_exam_for_pe", 3)
    expected = {"study0": 0.0, "study1": 1.0, "study2": 0.0}
    assert values == [expected[c] for c in batch["case_id"]]
    assert isinstance(batch["study"]["negative_exam_for_pe"], torch.Tensor)

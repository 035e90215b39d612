"""x2ct export: a shareable folder that load_pretrained, predict and evaluate use without the run folder."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from test_evaluate import make_run
from test_predict import _case
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import X2CTError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One untrained tiny run and its export, shared by the tests of this file (none of them changes either)."""
    tmp = tmp_path_factory.mktemp("export")
    run = make_run(tmp, num_test=2)
    out = tmp / "shared" / "tiny-model"
    assert x2ct_main(["export", str(run), str(out)]) == 0
    return run, out


def test_export_round_trips_through_load_pretrained_and_predict(exported, tmp_path):
    from x2ct_framework import load_pretrained
    from x2ct_framework.io import read_volume
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target
    from x2ct_framework.testing import make_batch

    run, out = exported
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "recipe.toml", "README.md",
                                               "state.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "vit_cascade" and cfg["model"]["options"]["tokens"] == 4
    assert (cfg["views"], cfg["hu_window"], cfg["image_size"], cfg["cascade"]) == ([0.0, 90.0], [-1000.0, 3000.0],
                                                                                   16, [])
    assert cfg["stage"] == {"name": "stage1", "index": 1, "resolution": 16}
    card = (out / "README.md").read_text()
    assert "load_pretrained" in card and "[data]" in card and "synthetic_phantom" in card

    batch = make_batch(2, resolution=16)
    case = _case(tmp_path / "case")
    with torch.no_grad():
        before = load_model(resolve_target(run), torch.device("cpu"))(batch["xrays"], batch["geometry"])
    assert x2ct_main(["predict", str(run), str(case), "--geometry", "recipe", "--out", str(tmp_path / "run.nii.gz"),
                      "--no-progress"]) == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    hidden = run.with_name("hidden")
    run.rename(hidden)  # the run folder is not needed any more
    try:
        model = load_pretrained(moved)
        assert not model.training
        with torch.no_grad():
            after = model(batch["xrays"], batch["geometry"])
        assert after.shape == (2, 1, 16, 16, 16) and torch.equal(before, after)
        assert x2ct_main(["predict", str(moved), str(case), "--geometry", "recipe", "--out",
                          str(tmp_path / "export.nii.gz"), "--no-progress"]) == 0
    finally:
        hidden.rename(run)
    vol_run, sp_run, _ = read_volume(tmp_path / "run.nii.gz")
    vol_exp, sp_exp, _ = read_volume(tmp_path / "export.nii.gz")
    assert torch.equal(vol_run, vol_exp) and torch.equal(sp_run, sp_exp)
    assert float(vol_exp.std()) > 0


def test_evaluate_accepts_an_export_folder(exported, tmp_path, capsys):
    _, out = exported
    assert x2ct_main(["evaluate", str(out), "--protocol", "default", "--bootstrap", "0", "--worst", "0",
                      "--lpips", "off", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "per_case.csv").read_text().count("\n") == 3


def test_export_refuses_a_non_empty_folder_and_push_needs_huggingface_hub(exported, tmp_path, monkeypatch, capsys):
    run, out = exported
    assert x2ct_main(["export", str(run), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    from x2ct_framework.export import push_to_hub

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(X2CTError, match="needs the huggingface_hub package, which is not installed"):
        push_to_hub(out, "me/tiny")
    uploads = []

    class FakeApi:  # stands in for the Hub: records what would be uploaded, no network
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            uploads.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return types.SimpleNamespace(commit_url=f"local://{repo_id}")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    assert push_to_hub(out, "me/tiny") == "local://me/tiny"
    assert uploads[0] == ("create", "me/tiny") and "model.safetensors" in uploads[1][2]


def test_a_cascade_exports_with_its_frozen_earlier_stage(tmp_path):
    from x2ct_framework import load_pretrained
    from x2ct_framework.checkpoint import save_checkpoint
    from x2ct_framework.config.build import build_model, stages
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target
    from x2ct_framework.testing import make_batch
    from x2ct_framework.training.cascade import CascadeModel

    run = make_run(tmp_path, name="casc", num_test=1,
                   extra='\n[[stages]]\nname = "stage2"\nresolution = 16\nepochs = 1\ncascade = true\n')
    recipe = load_recipe(run / "recipe.toml")
    second = stages(recipe)[1]
    torch.manual_seed(1)
    save_checkpoint(run / "stage2" / "best", build_model(recipe, second), {"stage": "stage2", "epoch": 1, "step": 1})
    out = tmp_path / "casc-export"
    assert x2ct_main(["export", str(run), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"]["name"] == "stage2" and [c["stage"] for c in cfg["cascade"]] == ["stage1"]
    assert (out / cfg["cascade"][0]["recipe"]).is_file() and "cascade: stage1" in (out / "README.md").read_text()
    model = load_pretrained(out)
    assert isinstance(model, CascadeModel)
    batch = make_batch(1, resolution=16)
    with torch.no_grad():
        ref = load_model(resolve_target(run), torch.device("cpu"))(batch["xrays"], batch["geometry"])
        got = model(batch["xrays"], batch["geometry"])
    assert torch.equal(ref, got)


def test_an_export_records_who_provides_its_model_and_says_what_to_install(exported, tmp_path):
    import importlib.metadata

    from x2ct_framework import load_pretrained
    from x2ct_framework.errors import PluginError

    _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    version = importlib.metadata.version("x2ct-framework")
    assert cfg["providers"]["model"] == {"name": "vit_cascade", "plugin": "vit_cascade",
                                         "distribution": "x2ct-framework", "version": version}
    assert cfg["providers"]["dataset"]["name"] == "synthetic_phantom"
    # the same folder elsewhere, where the distribution that provided the model is not installed
    moved = tmp_path / "third-party-model"
    shutil.copytree(out, moved)
    (moved / "recipe.toml").write_text((moved / "recipe.toml").read_text().replace('"vit_cascade"', '"lab_net"'))
    cfg["providers"]["model"] = {"name": "lab_net", "plugin": "lab_net", "distribution": "x2ct-lab-models",
                                 "version": "1.4.0"}
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PluginError, match=r"needs the model 'lab_net' from the distribution 'x2ct-lab-models' 1.4.0, "
                                          r"which is not installed: pip install x2ct-lab-models==1.4.0"):
        load_pretrained(moved)

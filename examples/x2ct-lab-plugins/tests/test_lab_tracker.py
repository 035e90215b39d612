"""Tests of the ``jsonl`` tracker plugin: a tiny training run, and the recipe errors a user meets."""

import json
import textwrap

import matplotlib.image
import pytest

from x2ct_framework.api import Trainer, check_recipe, load_recipe
from x2ct_framework.errors import RecipeError

# A one-stage run at 16^3 on four synthetic phantoms, with the smallest end-of-run report.
RECIPE = """
    name = "tiny"
    seed = 0
    output_dir = "{out}"
    plugins = ["x2ct_lab_plugins.tracker"]

    [data]
    name = "synthetic_phantom"
    views = [0, 90]
    num_train = 4
    num_val = 2
    num_test = 1

    [model]
    name = "cnn_baseline"
    channels = 4
    levels = 2

    [train]
    batch_size = 2
    progress = false
    log_every = 1
    trackers = ["jsonl"]

    [train.tracker_options.jsonl]
    {options}

    [eval]
    protocols = ["default"]
    bootstrap = 0
    worst_cases = 0
    gallery = 0
    lpips = "off"

    [[stages]]
    name = "stage1"
    resolution = 16
    epochs = 1
    lr = 1e-3
    losses = {{ l1 = 1.0, ssim = 0.5 }}
    """


def recipe_file(tmp_path, options='file = "logs/lab.jsonl"'):
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(RECIPE).format(out=(tmp_path / "runs").as_posix(), options=options))
    return path


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_training_run_sends_steps_validation_previews_final_metrics_and_the_report(tmp_path):
    results = Trainer(load_recipe(recipe_file(tmp_path))).run()
    run = tmp_path / "runs" / "tiny"
    got = events(run / "logs" / "lab.jsonl")
    assert [e["event"] for e in got[:2]] == ["start", "config"] and got[-1]["event"] == "finish"
    assert got[0]["run_name"] == "tiny" and got[1]["values"]["stages.1.lr"] == 1e-3
    logs = [e for e in got if e["event"] == "log"]

    # every row of metrics.jsonl, at its step, under <stage>/<key>
    rows = [json.loads(line) for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    assert len(train_rows) == 2 and len(val_rows) == 1  # 2 updates (4 cases, batch 2), one validation
    for row in rows:  # train, val and epoch rows: exactly their numbers
        want = {f"stage1/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        assert want in [e["values"] for e in logs if e["step"] == row["step"]], row
    step_keys = set(logs[0]["values"])
    assert {"stage1/epoch", "stage1/lr", "stage1/train/loss", "stage1/train/l1", "stage1/train/ssim",
            "stage1/train/grad_norm"} <= step_keys
    assert [e["step"] for e in logs if "stage1/val/psnr" in e["values"]] == [2]

    # one preview per validation, the PNG of previews/ as an H x W x 3 uint8 array
    images = [e for e in got if e["event"] == "images"]
    assert [e["step"] for e in images] == [2]
    (entry,) = images[0]["images"]["stage1/preview"]
    png = matplotlib.image.imread(run / "stage1" / "previews" / "epoch0001.png")[..., :3]  # read independently
    assert entry["shape"] == [*png.shape[:2], 3] and entry["dtype"] == "uint8"
    assert entry["mean"] == pytest.approx(png.mean() * 255, abs=0.01)

    # the final metrics (each stage's last validation, the final evaluation's means), then the report
    final = next(e["values"] for e in logs if any(k.startswith("final/") for k in e["values"]))
    assert final["final/stage1/val/psnr"] == pytest.approx(results["stage1"]["val/psnr"])
    assert final["final/stage1/val/psnr"] == pytest.approx(val_rows[-1]["val/psnr"])
    summary = json.loads((run / "eval" / "stage1-test" / "summary.json").read_text())
    assert final["final/test/default/psnr"] == pytest.approx(summary["protocols"]["default"]["metrics"]["psnr"]["mean"])
    artifacts = [e for e in got if e["event"] == "artifact"]
    assert [e["path"] for e in artifacts] == [str(run / "report.md"),
                                              str(run / "eval" / "stage1-test" / "summary.json")]
    assert artifacts[0]["bytes"] == (run / "report.md").stat().st_size


def test_an_unknown_tracker_name_lists_the_built_in_and_plugin_trackers(tmp_path):
    path = recipe_file(tmp_path, options="")
    path.write_text(path.read_text().replace('trackers = ["jsonl"]', 'trackers = ["jsnl"]')
                    .replace("[train.tracker_options.jsonl]", ""))
    with pytest.raises(RecipeError) as err:
        check_recipe(load_recipe(path))
    msg = str(err.value)
    assert "train -> trackers -> 1: unknown tracker 'jsnl'; did you mean \"jsonl\"?" in msg
    assert "built-in: aim, " in msg and "tensorboard" in msg and "from plugins: jsonl" in msg


def test_bad_tracker_options_name_the_recipe_key(tmp_path):
    with pytest.raises(RecipeError) as err:
        check_recipe(load_recipe(recipe_file(tmp_path, options='fiel = "x.jsonl"\npixels = "yes"')))
    msg = str(err.value)
    assert ("train -> tracker_options -> jsonl -> fiel: unknown option for tracker 'jsonl'; "
            "did you mean \"file\"?") in msg
    assert "train -> tracker_options -> jsonl -> pixels: expected bool, got 'yes'" in msg
    # a value the factory itself refuses stops the run before the first stage trains
    with pytest.raises(RecipeError, match=r"train -> tracker_options -> jsonl: tracker 'jsonl' rejected its options: "
                                          r"file must be a relative path inside the run folder"):
        Trainer(load_recipe(recipe_file(tmp_path, options='file = "../outside.jsonl"'))).run()
    assert not (tmp_path / "runs" / "tiny" / "stage1").exists()


def test_the_step_keeps_rising_across_stages_and_after_a_resume(tmp_path):
    """The trackers' step is the run's update count: stage 2's rows follow stage 1's (wandb drops rows whose step
    goes back), also when a resumed run skips the finished stage 1."""
    path = recipe_file(tmp_path)
    two = tmp_path / "two.toml"
    two.write_text(path.read_text() + textwrap.dedent("""
        [[stages]]
        name = "stage2"
        resolution = 16
        epochs = 1
        lr = 1e-3
        losses = { l1 = 1.0 }
        """))
    Trainer(load_recipe(two)).run()
    run = tmp_path / "runs" / "tiny"

    def steps(stage):
        return sorted({e["step"] for e in events(run / "logs" / "lab.jsonl")
                       if e["event"] == "log" and any(k.startswith(f"{stage}/") for k in e["values"])})

    assert (steps("stage1"), steps("stage2")) == ([1, 2], [3, 4])  # 2 updates per stage; stage 2 goes on at 3

    # a fresh folder: stage 1 alone, then the two-stage recipe resumed there (stage 1 is skipped as finished)
    import shutil

    shutil.rmtree(run)
    Trainer(load_recipe(path)).run()
    (run / "logs" / "lab.jsonl").unlink()
    Trainer(load_recipe(two), resume=True).run()
    assert (steps("stage1"), steps("stage2")) == ([], [3, 4])

"""The quality matrix runner: intervals, the matrix file, a two-cell run, its tables and resume."""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import variants as V  # noqa: E402
from conftest import tiny_tables  # noqa: E402
from x2ct_framework.errors import RecipeError  # noqa: E402

BASE = """
name = "tinybase"
seed = 0

""" + tiny_tables(encoder="test_efficientnet", decoder_levels=None) + """
[train]
batch_size = 2

[[stages]]
name = "stage2"
resolution = 16
epochs = 50
lr = 1e-3
checkpoint_every = 20
losses = { l1 = 1.0 }
"""

MATRIX = """
name = "two"
base = "base.toml"
seeds = [0, 1]
reference = "plain"
notes = ["tiny sizes"]

[budget]
steps = 2
epochs = 2

[eval]
metrics = ["psnr", "ssim", "bone_dice"]

[[cells]]
name = "plain"
question = "L1 only"

[[cells]]
name = "grad"
question = "gradient loss on"
set = ["stages.stage2.losses.gradient=0.15"]
note = "adds the gradient term"
"""


def write(tmp_path: Path, matrix: str = MATRIX, base: str = BASE) -> Path:
    (tmp_path / "base.toml").write_text(textwrap.dedent(base))
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(matrix))
    return path


# ---- statistics -----------------------------------------------------------------------------------
def test_interval_hand_computed():
    # values 1, 2, 3, 4: mean 2.5, sample std sqrt(5/3) = 1.290994, standard error 0.645497,
    # t(0.975, 3) = 3.182446, half-width 2.054254
    s = V.interval([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(1.290994, abs=1e-6)
    assert s["ci_low"] == pytest.approx(0.445746, abs=1e-5)
    assert s["ci_high"] == pytest.approx(4.554254, abs=1e-5)
    # two seeds: 10 and 12 -> mean 11, std sqrt(2), half-width 12.706205 * 1 = 12.706205
    s = V.interval([10.0, 12.0])
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(-1.706205, abs=1e-5), pytest.approx(23.706205, abs=1e-5))


def test_interval_edge_cases():
    one = V.interval([3.0])
    assert one["mean"] == 3.0 and one["n"] == 1 and math.isnan(one["ci_low"]) and math.isnan(one["std"])
    assert V.interval([])["n"] == 0
    skipped = V.interval([1.0, float("nan"), 3.0, None])
    assert skipped["n"] == 2 and skipped["mean"] == 2.0
    same = V.interval([5.0, 5.0, 5.0])
    assert same["ci_low"] == same["ci_high"] == 5.0


def test_t_quantiles_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 120, 1000]:
        assert V.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-5), df
    with pytest.raises(ValueError):
        V.t_quantile_975(0)


def test_paired_difference_and_verdict():
    ref = [{"seed": s, "metrics": {"psnr": v}} for s, v in ((0, 20.0), (1, 21.0), (2, 22.0))]
    up = [{"seed": s, "metrics": {"psnr": v}} for s, v in ((0, 21.0), (1, 22.2), (2, 22.8))]
    d = V.paired(ref, up, "psnr")  # differences 1.0, 1.2, 0.8: mean 1.0, std 0.2
    assert d["mean"] == pytest.approx(1.0)
    assert d["ci_low"] == pytest.approx(1.0 - 4.302653 * 0.2 / math.sqrt(3), abs=1e-6)
    assert V.verdict(d, higher_is_better=True) == "better"
    assert V.verdict(d, higher_is_better=False) == "worse"
    noisy = [{"seed": s, "metrics": {"psnr": v}} for s, v in ((0, 23.0), (1, 19.0), (2, 22.5))]
    assert V.verdict(V.paired(ref, noisy, "psnr"), True) == "unclear"
    # the two cells' own intervals overlap although the paired difference is clear
    assert V.overlap(V.interval([20.0, 21.0, 22.0]), V.interval([21.0, 22.2, 22.8])) == "yes"
    assert V.overlap(V.interval([1.0, 1.1]), V.interval([5.0, 5.1])) == "no"


# ---- the matrix file -----------------------------------------------------------------------------
def test_matrix_file_errors_are_reported_together(tmp_path):
    bad = MATRIX.replace("seeds = [0, 1]", "seeds = [0, 0]\nbogus = 1").replace("steps = 2", "steps = 3")
    bad = bad.replace('name = "grad"', 'name = "plain"')
    with pytest.raises(RecipeError) as exc:
        V.load_matrix(write(tmp_path, bad))
    text = str(exc.value)
    for fragment in ("bogus: unknown key", "seeds: expected a non-empty array of distinct integers",
                     "budget -> steps: expected a positive multiple of budget.epochs (2), got 3",
                     "cell names must be unique, repeated: plain"):
        assert fragment in text, text
    with pytest.raises(RecipeError, match="budget_scale: budget.epochs"):
        V.load_matrix(write(tmp_path, MATRIX.replace('note = "adds', 'budget_scale = 0.3\nnote = "adds')))
    with pytest.raises(RecipeError, match="exactly one of steps"):
        V.load_matrix(write(tmp_path, MATRIX.replace("steps = 2", "steps = 2\nwall_s = 10")))


def test_budget_overrides_win_and_hash_follows_definition(tmp_path):
    m = V.load_matrix(write(tmp_path))
    out = tmp_path / "out"
    r = V.cell_recipe(m, m.cell("grad"), 1, out, 2)
    stage = r["stages"][0]
    assert (stage["epochs"], stage["checkpoint_every"], r["train"]["max_steps_per_epoch"]) == (2, 0, 1)
    assert r["seed"] == 1 and r.name == "grad-s1" and "gradient" in stage["losses"]
    assert r["train"]["trackers"] == [] and r["eval"]["report"] is False
    h = V.run_hash(r, m)
    assert h == V.run_hash(V.cell_recipe(m, m.cell("grad"), 1, tmp_path / "elsewhere", 2), m)  # not the folder
    assert h != V.run_hash(V.cell_recipe(m, m.cell("grad"), 0, out, 2), m)
    changed = V.load_matrix(write(tmp_path, MATRIX.replace("gradient=0.15", "gradient=0.3")))
    assert h != V.run_hash(V.cell_recipe(changed, changed.cell("grad"), 1, out, 2), changed)
    more = V.load_matrix(write(tmp_path, MATRIX.replace("steps = 2", "steps = 8")))
    with pytest.raises(RecipeError, match="need 8 training cases"):
        V.check_budget(V.cell_recipe(more, more.cell("grad"), 0, out, 8), 4)


def test_stage_budget_scale_trains_the_named_stage_longer_and_only_it(tmp_path):
    two_stages = BASE + """
[[stages]]
name = "stage3"
resolution = 16
epochs = 50
cascade = true
losses = { l1 = 1.0 }
"""
    longer = MATRIX.replace('note = "adds', 'stage_budget_scale = { stage3 = 3 }\nnote = "adds')
    m = V.load_matrix(write(tmp_path, longer, two_stages))
    out = tmp_path / "out"
    plain, grad = (V.cell_recipe(m, m.cell(c), 0, out, 2) for c in ("plain", "grad"))
    assert [st["epochs"] for st in plain["stages"]] == [2, 2]
    assert [st["epochs"] for st in grad["stages"]] == [2, 6]  # stage 2 as every cell's, stage 3 three times
    assert grad["train"]["max_steps_per_epoch"] == plain["train"]["max_steps_per_epoch"] == 1
    from benchmarks.variants.tables import budget_text
    assert "grad: stage3 x 3" in budget_text(m)
    with pytest.raises(RecipeError, match="stage_budget_scale names stage9, not a trained stage"):
        bad = V.load_matrix(write(tmp_path, longer.replace("stage3 = 3", "stage9 = 3"), two_stages))
        V.cell_recipe(bad, bad.cell("grad"), 0, out, 2)
    with pytest.raises(RecipeError, match=r"stage_budget_scale -> stage3: budget.epochs \(2\) x budget_scale "
                                          r"\(1.0\) x 0.25 = 0.5 must be a whole number"):
        V.load_matrix(write(tmp_path, longer.replace("stage3 = 3", "stage3 = 0.25"), two_stages))
    with pytest.raises(RecipeError, match="expected a table of stage name = positive number"):
        V.load_matrix(write(tmp_path, longer.replace("{ stage3 = 3 }", "3"), two_stages))


# ---- a two-cell matrix, end to end ---------------------------------------------------------------
@pytest.mark.slow
def test_two_cell_matrix_tables_and_resume(tmp_path):
    m = V.load_matrix(write(tmp_path))
    out = tmp_path / "out"
    logs: list[str] = []
    status = V.run_matrix(m, out, isolate=False, log=logs.append)
    assert status["ran"] == ["plain-s0", "grad-s0", "plain-s1", "grad-s1"] and not status["failed"]  # seed by seed

    # per-seed results: the fixed budget, the cost columns, the protocol's metrics
    res = json.loads((out / "results" / "grad" / "seed1.json").read_text())
    assert res["steps"] == 2 and res["epochs"] == 2 and res["params"] > 0 and res["time_per_step_s"] > 0
    assert res["peak_mem_mib"] > 0 and {"psnr", "ssim", "bone_dice", "vessel_dice"} <= set(res["metrics"])

    # the CSV summary is the interval over the per-seed values
    per_seed = list(csv.DictReader((out / "per_seed.csv").open()))
    summary = {r["cell"]: r for r in csv.DictReader((out / "matrix.csv").open())}
    assert [r["cell"] for r in per_seed] == ["plain", "plain", "grad", "grad"]
    for cell in ("plain", "grad"):
        seeds = [json.loads((out / "results" / cell / f"seed{k}.json").read_text())["metrics"]["psnr"] for k in (0, 1)]
        assert [float(r["psnr"]) for r in per_seed if r["cell"] == cell] == pytest.approx(seeds, rel=1e-5)
        s = V.interval(seeds)
        assert float(summary[cell]["psnr_mean"]) == pytest.approx(s["mean"], rel=1e-5)
        assert float(summary[cell]["psnr_ci_low"]) == pytest.approx(s["ci_low"], rel=1e-5, abs=1e-6)
        assert float(summary[cell]["psnr_ci_high"]) == pytest.approx(s["ci_high"], rel=1e-5, abs=1e-6)
        assert summary[cell]["seeds"] == "2" and int(summary[cell]["params"]) > 0

    md = (out / "matrix.md").read_text()
    assert ("| cell | psnr (dB) | ssim | bone_dice | steps | s/step | peak MiB | params (M) | GFLOP/step | train TFLOP "
            "| seeds |") in md
    assert res["cost"]["step_flops"] > 0 and res["cost"]["params"] == res["params"]
    assert "`plain` (ref)" in md and "| `grad` | gradient loss on |" in md
    assert "tiny sizes" in md and "adds the gradient term" in md
    assert (out / "matrix.png").stat().st_size > 1000

    # a rerun redoes nothing; losing one result redoes exactly that one
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    again = V.run_matrix(m, out, isolate=False, log=logs.append)
    assert again["ran"] == [] and len(again["skipped"]) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    (out / "results" / "grad" / "seed1.json").unlink()
    third = V.run_matrix(m, out, isolate=False, log=logs.append, plot=False)
    assert third["ran"] == ["grad-s1"] and len(third["skipped"]) == 3
    redone = json.loads((out / "results" / "grad" / "seed1.json").read_text())
    assert redone["key"] == res["key"] and redone["metrics"]["psnr"] == pytest.approx(res["metrics"]["psnr"])
    assert redone["time_per_step_s"] == pytest.approx(res["time_per_step_s"])  # kept from the finished training

    # results of an earlier definition of a cell are not counted in the tables
    changed = V.load_matrix(write(tmp_path, MATRIX.replace("gradient=0.15", "gradient=0.3")))
    V.write_tables(changed, out, plot=False)
    md = (out / "matrix.md").read_text()
    assert ("Not counted (made by an earlier definition of their cell; the next run redoes them): "
            "grad-s0, grad-s1.") in md
    assert list(csv.DictReader((out / "matrix.csv").open()))[1]["seeds"] == "0"
    assert "3 finished earlier, 1 to run" in logs[-2]
    # --accept-stale counts them, and says so by name
    V.write_tables(changed, out, plot=False, accept_stale=True)
    md = (out / "matrix.md").read_text()
    assert "Counted although their hash differs from the current definition" in md and "grad-s0, grad-s1." in md
    assert list(csv.DictReader((out / "matrix.csv").open()))[1]["seeds"] == "2"
    V.write_tables(changed, out, plot=False)  # as the rest of this test expects

    # --rerun trains a cell again from scratch, not only re-scores its finished run folder
    before = (out / "grad-s0" / "timing.json").stat().st_mtime_ns
    fourth = V.run_matrix(m, out, isolate=False, log=logs.append, plot=False, rerun=["grad"])
    assert sorted(fourth["ran"]) == ["grad-s0", "grad-s1"] and len(fourth["skipped"]) == 2
    assert (out / "grad-s0" / "timing.json").stat().st_mtime_ns != before


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_shipped_matrices_resolve(preset, tmp_path):
    """Every cell of the shipped matrices resolves to a valid recipe under the budget."""
    m = V.load_matrix(REPO / "benchmarks" / "matrix" / f"{preset}.toml")
    names = [c.name for c in m.cells]
    # the seed's questions, each a cell, in this order (the CPU preset adds the CNN at its own learning rate)
    questions = ["baseline", "epochs20", "no_gradient", "tokens32", "views4", "views8", "bone_vessel", "landmark",
                 "reprojection", "adversarial", "cnn_baseline", "lpips"]
    assert [n for n in names if n in questions] == questions
    assert set(names) - set(questions) <= {"cnn_lr3e-4", "x2ctgan"}  # x2ctgan: the faithful published baseline
    assert len(m.seeds) >= 3 and m.reference == "baseline"
    steps = m.budget["steps"]
    recipes = {c.name: V.cell_recipe(m, c, m.seeds[0], tmp_path, steps) for c in m.cells}
    stage = {n: r["stages"][-1] for n, r in recipes.items()}
    assert stage["epochs20"]["epochs"] * 5 == stage["baseline"]["epochs"] == m.budget["epochs"]
    assert recipes["tokens32"]["model"]["tokens"] > recipes["baseline"]["model"]["tokens"]
    assert [len(recipes[n]["data"]["views"]) for n in ("baseline", "views4", "views8")] == [2, 4, 8]
    assert {"bone", "vessel"} <= set(stage["bone_vessel"]["losses"])
    assert "landmark" not in stage["bone_vessel"]["losses"]
    assert "landmark" in stage["landmark"]["losses"] and "bone" not in stage["landmark"]["losses"]
    assert "reprojection" in stage["reprojection"]["losses"] and "adversarial" in stage["adversarial"]["losses"]
    assert recipes["cnn_baseline"]["model"]["name"] == "cnn_baseline"
    assert "lpips" in stage["lpips"]["losses"] and "vgg" not in stage["lpips"]["losses"]
    assert stage["no_gradient"]["losses"]["gradient"]["weight"] == 0.0
    if preset == "cpu":  # the CPU preset's data holds its budget (the GPU one uses the user's CT folder)
        V.check_budget(recipes["baseline"], steps // m.budget["epochs"])
    # the token questions keep the seed's downsampling: 128 / 24 and 128 / 32
    for cell, factor in (("baseline", 128 / 24), ("tokens32", 128 / 32)):
        assert stage[cell]["resolution"] / recipes[cell]["model"]["tokens"] == pytest.approx(factor)


# ---- reference floors, data seeds, per-case pairing ---------------------------------------------
FLOORED = """
name = "floored"
base = "base.toml"
seeds = [0, 1]
data_seeds = [5, 6]
reference = "plain"

[budget]
steps = 2
epochs = 2

[eval]
metrics = ["psnr", "ssim"]
compare = ["psnr", "mae_hu"]

[[cells]]
name = "blind"
kind = "blind_mean"

[[cells]]
name = "plain"

[[cells]]
name = "prior"
set = ['PRIOR']
"""
FLOORED = FLOORED.replace("PRIOR", 'model = { name = "prior_only", model = { name = "vit_cascade", tokens = 4, '
                                   'dim = 16, depth = 1, heads = 2, channels = 4, encoder = "test_efficientnet" } }')


def test_as_one_sample_and_fmt_interval():
    reg = [{"seed": 0, "metrics": {"psnr": 27.0}, "per_case": {"case_ids": ["a"], "metrics": {"psnr": [27.5]}}}]
    gen = [{"seed": 0, "metrics": {"one_sample/psnr": 26.0},
            "per_case": {"case_ids": ["a"], "metrics": {"one_sample/psnr": [26.25]}}}]
    one = V.as_one_sample(reg)
    assert one[0]["metrics"] == {"psnr": 27.0, "one_sample/psnr": 27.0} and reg[0]["metrics"] == {"psnr": 27.0}
    assert V.paired(one, gen, "one_sample/psnr")["mean"] == -1.0
    assert V.per_case_pairs(one, gen, "one_sample/psnr") == [[-1.25]]
    assert V.as_one_sample([{"seed": 1, "metrics": {"ssim": 0.5}}]) == [
        {"seed": 1, "metrics": {"ssim": 0.5, "one_sample/ssim": 0.5}}]
    assert V.fmt_interval({"mean": 0.12345, "ci_low": -0.5, "ci_high": 1.0}, "+") == "+0.1235 [-0.5, +1]"


def test_hierarchical_bootstrap_hand_cases():
    one = V.hierarchical_bootstrap([[2.0, 2.0, 2.0]])
    assert one["mean"] == 2.0 and one["ci_low"] == one["ci_high"] == 2.0 and one["cases"] == 3
    # group means 1 and 3 (cases constant within a group): the mean is 2 and the interval spans the group means
    two = V.hierarchical_bootstrap([[1.0, 1.0], [3.0, 3.0, 3.0]], n_boot=2000)
    assert two["mean"] == 2.0 and two["ci_low"] == pytest.approx(1.0) and two["ci_high"] == pytest.approx(3.0)
    assert V.hierarchical_bootstrap([])["n"] == 0
    # pairs by seed and case id; NaN cases and cases the other run lacks are left out
    ref = [{"seed": 0, "per_case": {"case_ids": ["a", "b", "c"], "metrics": {"psnr": [10.0, 11.0, None]}}}]
    oth = [{"seed": 0, "per_case": {"case_ids": ["b", "a", "c", "d"], "metrics": {"psnr": [13.0, 10.5, 9.0, 1.0]}}}]
    assert V.per_case_pairs(ref, oth, "psnr") == [[2.0, 0.5]]


def test_blind_mean_floor_prior_only_and_data_seeds(tmp_path):
    from skimage.metrics import peak_signal_noise_ratio

    from x2ct_framework.config.build import build_dataset, build_model, stages

    m = V.load_matrix(write(tmp_path, FLOORED))
    assert m.floor == "blind" and m.data_seed(1) == 6
    out = tmp_path / "out"
    status = V.run_matrix(m, out, isolate=False, log=lambda *_: None)
    assert not status["failed"] and len(status["ran"]) == 6

    # each run trains on its own data seed, and says so
    recipe = V.cell_recipe(m, m.cell("plain"), 1, out, 2)
    assert recipe["data"]["seed"] == 6
    blind = json.loads((out / "results" / "blind" / "seed1.json").read_text())
    assert blind["data_seed"] == 6 and blind["steps"] == 0 and blind["params"] == 0

    # the floor is the training split's voxel-wise mean CT, scored on every test case (hand-computed here)
    st = stages(recipe)[-1]
    train, test = build_dataset(recipe, st, "train"), build_dataset(recipe, st, "test")
    mean = sum(train[i]["ct"].double() for i in range(len(train))) / len(train)
    expect = [peak_signal_noise_ratio(test[i]["ct"].double().numpy(), mean.numpy(), data_range=1.0)
              for i in range(len(test))]
    assert blind["per_case"]["metrics"]["psnr"] == pytest.approx(expect, abs=2e-3)
    assert blind["metrics"]["psnr"] == pytest.approx(sum(expect) / len(expect), abs=2e-3)

    # prior_only: the wrapped model never sees its X-rays (same parameters as the model it wraps)
    prior = build_model(V.cell_recipe(m, m.cell("prior"), 0, out, 2), st).eval()
    item = test[0]
    x = item["xrays"][None].float()
    g = {k: v[None] for k, v in item["geometry"].items()}
    with torch.no_grad():
        assert torch.equal(prior(x, g), prior(torch.rand_like(x), g))

    # per-case table and the gain over the floor: case by case on the same data, averaged over cases and runs
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 3 * 2 * len(test) and {r["data_seed"] for r in rows} == {"5", "6"}
    plain = [json.loads((out / "results" / "plain" / f"seed{k}.json").read_text()) for k in (0, 1)]
    floors = [json.loads((out / "results" / "blind" / f"seed{k}.json").read_text()) for k in (0, 1)]
    gains = [sum(a - b for a, b in zip(p["per_case"]["metrics"]["psnr"], f["per_case"]["metrics"]["psnr"]))
             / len(test) for p, f in zip(plain, floors)]
    md = (out / "matrix.md").read_text()
    assert "## Gain over the blind mean `blind`" in md and "## Against the reference `plain`, case by case" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| `plain` |") and "[" in ln and "FLOP" not in ln
                and md.index(ln) > md.index("## Gain over the blind mean"))
    assert f"{sum(gains) / 2:+.3g}" in line
    assert "## Budget: validation `val/psnr` over training" in md and (out / "curves.png").stat().st_size > 1000

    # the committed tables read back as result rows (to the CSVs' 6 digits), so they pair with new runs
    back = V.read_tables(out, "plain")
    assert [r["seed"] for r in back] == [0, 1] and [r["data_seed"] for r in back] == [5, 6]
    for r, p in zip(back, plain):
        assert r["metrics"]["psnr"] == pytest.approx(p["metrics"]["psnr"], rel=1e-5)
        assert r["per_case"]["case_ids"] == p["per_case"]["case_ids"]
        assert r["per_case"]["metrics"]["psnr"] == pytest.approx(p["per_case"]["metrics"]["psnr"], rel=1e-5)
    assert V.per_case_pairs(V.read_tables(out, "blind"), back, "psnr") == [
        pytest.approx([a - b for a, b in zip(p["per_case"]["metrics"]["psnr"], f["per_case"]["metrics"]["psnr"])],
                      abs=1e-3) for p, f in zip(plain, floors)]
    with pytest.raises(ValueError, match="no rows of cell 'nope'"):
        V.read_tables(out, "nope")
    with pytest.raises(FileNotFoundError, match="per_seed.csv"):
        V.read_tables(tmp_path, "plain")


SARTED = """
name = "sarted"
base = "base.toml"
seeds = [0]
reference = "plain"
set = ["data.views = [0, 45, 90, 135]"]

[budget]
steps = 2
epochs = 2

[eval]
metrics = ["psnr"]

[[cells]]
name = "blind"
kind = "blind_mean"

[[cells]]
name = "sart"
kind = "sart"
iterations = 3

[[cells]]
name = "plain"
"""


def test_sart_reference_cell(tmp_path):
    """A ``sart`` cell scores SART from each test case's own views (nothing trained), hashed with its iterations."""
    from skimage.metrics import peak_signal_noise_ratio

    from x2ct_framework.config.build import build_dataset, stages
    from x2ct_framework.physics.iterative import SARTReconstruction

    m = V.load_matrix(write(tmp_path, SARTED))
    out = tmp_path / "out"
    status = V.run_matrix(m, out, isolate=False, log=lambda *_: None, plot=False)
    assert not status["failed"] and len(status["ran"]) == 3
    res = json.loads((out / "results" / "sart" / "seed0.json").read_text())
    assert res["kind"] == "sart" and res["steps"] == 0 and res["params"] == 0
    recipe = V.cell_recipe(m, m.cell("sart"), 0, out, 2)
    st = stages(recipe)[-1]
    test = build_dataset(recipe, st, "test")
    model = SARTReconstruction(st.resolution, hu_window=tuple(test.hu_window), iterations=3)  # the data's window
    expect = []
    for i in range(len(test)):
        item = test[i]
        pred = model(item["xrays"][None].float(), {k: v[None] for k, v in item["geometry"].items()})[0]
        expect.append(peak_signal_noise_ratio(item["ct"].double().numpy(), pred.double().numpy(), data_range=1.0))
    assert res["per_case"]["metrics"]["psnr"] == pytest.approx(expect, abs=2e-3)
    # another number of iterations is another result
    other = V.load_matrix(write(tmp_path, SARTED.replace("iterations = 3", "iterations = 4")))
    assert V.hash_kind(other.cell("sart")) != V.hash_kind(m.cell("sart"))
    assert V.run_matrix(other, out, isolate=False, log=lambda *_: None, plot=False)["ran"] == ["sart-s0"]


RESCORED = SARTED.split("[[cells]]")[0].replace('name = "sarted"', 'name = "rescored"').replace(
    'set = ["data.views = [0, 45, 90, 135]"]\n', "") + """[[cells]]
name = "plain"

[[cells]]
name = "same"
kind = "rescore"
of = "plain"
eval_set = ["model.dim=16"]

[[cells]]
name = "noisy"
kind = "rescore"
of = "plain"
question = "plain's weights on noisier X-rays"
eval_set = ["data.xray_noise=0.3"]
"""


def test_rescore_cell_scores_the_trained_runs_again_with_evaluation_overrides(tmp_path):
    """A ``rescore`` cell trains nothing: it scores its trained cell's weights with ``eval_set`` at evaluation."""
    from skimage.metrics import peak_signal_noise_ratio

    from x2ct_framework.config.build import build_dataset, stages
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target

    m = V.load_matrix(write(tmp_path, RESCORED))
    out = tmp_path / "out"
    # before its trained cell has run, a rescore says which runs it needs
    with pytest.raises(V.CellFailed, match=r"scores the runs of 'plain', and plain-s0 has no finished result"):
        V.runner.run_cell(m, m.cell("noisy"), 0, out, 2)
    # --only a rescore cell brings its trained cell along, and scores after it
    status = V.run_matrix(m, out, only=["noisy", "same"], isolate=False, log=lambda *_: None, plot=False)
    assert not status["failed"] and status["ran"] == ["plain-s0", "same-s0", "noisy-s0"]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("-s0")) == ["plain-s0"]  # no run folder of its own
    plain, same, noisy = (json.loads((out / "results" / c / "seed0.json").read_text())
                          for c in ("plain", "same", "noisy"))

    # an override that changes nothing scores exactly the trained cell's numbers: the same weights, the same cases
    assert same["per_case"] == plain["per_case"] and same["metrics"] == plain["metrics"]
    assert noisy["kind"] == "rescore" and noisy["rescore_of"] == "plain" and noisy["source_key"] == plain["key"]
    assert len({noisy["key"], same["key"], plain["key"]}) == 3  # each its own result
    # the cost columns are the training's, taken from the trained cell
    for k in ("steps", "time_per_step_s", "params", "peak_mem_mib", "cost", "curve"):
        assert noisy[k] == plain[k]

    # noisy: plain's checkpoint on X-rays with the override's noise, scored independently with scikit-image
    recipe = V.cell_recipe(m, m.cell("noisy"), 0, out, 2, scoring=True)
    assert recipe["data"]["xray_noise"] == 0.3 and recipe.name == "plain-s0"
    test = build_dataset(recipe, stages(recipe)[-1], "test")
    model = load_model(resolve_target(out / "plain-s0"), torch.device("cpu")).eval()  # the run's own recipe
    expect = []
    with torch.no_grad():
        for i in range(len(test)):
            item = test[i]
            pred = model(item["xrays"][None].float(), {k: v[None] for k, v in item["geometry"].items()})[0]
            expect.append(peak_signal_noise_ratio(item["ct"].double().numpy(), pred.double().clamp(0, 1).numpy(),
                                                  data_range=1.0))
    assert noisy["per_case"]["metrics"]["psnr"] == pytest.approx(expect, abs=2e-3)
    assert noisy["per_case"]["metrics"]["psnr"] != pytest.approx(plain["per_case"]["metrics"]["psnr"], abs=1e-3)
    md = (out / "matrix.md").read_text()
    assert "`noisy` trains nothing: it scores the runs of `plain`" in md and "`data.xray_noise=0.3`" in md

    # a rerun redoes nothing; another eval_set is another result, the training stays
    stamp = (out / "plain-s0" / "stage2" / "best" / "model.safetensors").stat().st_mtime_ns
    assert V.run_matrix(m, out, isolate=False, log=lambda *_: None, plot=False)["ran"] == []
    other = V.load_matrix(write(tmp_path, RESCORED.replace("xray_noise=0.3", "xray_noise=0.2")))
    assert V.run_matrix(other, out, isolate=False, log=lambda *_: None, plot=False)["ran"] == ["noisy-s0"]
    assert (out / "plain-s0" / "stage2" / "best" / "model.safetensors").stat().st_mtime_ns == stamp
    # training its cell again re-scores the rescore cells on the new weights
    again = V.run_matrix(other, out, isolate=False, log=lambda *_: None, plot=False, rerun=["plain"])
    assert again["ran"] == ["plain-s0", "same-s0", "noisy-s0"] and not again["skipped"]


@pytest.mark.parametrize("cell, message", [
    ('name = "r"\nkind = "rescore"\nof = "plain"\neval_set = ["model.dim=16"]\nset = ["model.dim=8"]',
     "a rescore cell trains nothing"),
    ('name = "r"\nkind = "rescore"\nof = "plain"', "needs the overrides it scores with"),
    ('name = "r"\nkind = "rescore"\nof = "nope"\neval_set = ["model.dim=16"]', "'nope' is not a cell"),
    ('name = "r"\nkind = "rescore"\nof = "blind"\neval_set = ["model.dim=16"]', "'blind' is a blind_mean cell"),
    ('name = "r"\neval_set = ["model.dim=16"]', "belong to rescore cells"),
])
def test_rescore_cell_errors(tmp_path, cell, message):
    text = RESCORED.split("[[cells]]")[0] + '[[cells]]\nname = "plain"\n\n[[cells]]\nname = "blind"\n' \
        'kind = "blind_mean"\n\n[[cells]]\n' + cell + "\n"
    with pytest.raises(RecipeError, match=message):
        V.load_matrix(write(tmp_path, text))


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "matrix").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_matrix_loads_and_every_cell_resolves(path, tmp_path):
    """Each matrix file in benchmarks/matrix loads, and each cell (a rescore cell with its eval_set) resolves."""
    m = V.load_matrix(path)
    steps = m.budget.get("steps") or m.budget["epochs"]
    for cell in m.cells:
        recipe = V.cell_recipe(m, cell, m.seeds[0], tmp_path, steps, scoring=True)
        assert recipe["stages"], cell.name
        if cell.kind == "rescore":  # the trained cell's run folder, its eval_set on top
            assert recipe.name == V.run_name(cell.of, m.seeds[0])
            trained = V.cell_recipe(m, m.cell(cell.of), m.seeds[0], tmp_path, steps)
            assert recipe.data != trained.data and V.hash_kind(cell) != V.hash_kind(m.cell(cell.of))

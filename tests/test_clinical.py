"""The built-in evaluators: PE detectability (AUC, bootstrap intervals, operating point, cache, user classifier),
organ consistency (stand-in and label-map segmenters, TotalSegmentator skipped with its reason), distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from x2ct_framework.errors import DataError
from x2ct_framework.evaluation.clinical import Distribution, OrganConsistency, PEDetectability
from x2ct_framework.evaluation.evaluators import (EvaluationContext, build_evaluators, cluster_weights,
                                                 percentile_interval, roc_auc, weighted_auc, youden_threshold)
from x2ct_framework.testing import registered_component

HW = (-1000.0, 3000.0)
R = 16


def unit(hu):
    return (hu - HW[0]) / (HW[1] - HW[0])


def separable_case(i: int, pe: int, seed: int) -> dict:
    """A contrast-filled 'artery' block (350 HU) in soft tissue; a PE case has a 50 HU clot filling its middle."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    hu = torch.full((R, R, R), 40.0)
    hu[4:12, 4:12, 4:12] = 350.0
    if pe:
        hu[6:10, 6:10, 6:10] = 50.0
    hu = hu + 10.0 * torch.randn(hu.shape, generator=g)
    return {"ct": unit(hu)[None].float(), "xrays": torch.rand(2, 1, R, R, generator=g),
            "study": {"pe_present": pe, "patient_id": f"p{seed}-{i}"}, "case_id": f"case-{seed}-{i:03d}"}


def split(n: int, seed: int) -> list[dict]:
    return [separable_case(i, i % 2, seed) for i in range(n)]


OPTS = {"epochs": 12, "width": 4, "seed": 0, "bootstrap": 300}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache folder holding the classifiers trained once on the separable training split (reused by the tests)."""
    folder = tmp_path_factory.mktemp("pe-cache")
    PEDetectability(**OPTS).start(context(folder))
    return folder


def context(tmp_path, key: str = "k", n_boot: int = 500) -> EvaluationContext:
    data = {"train": split(24, 1), "test": split(12, 2)}
    return EvaluationContext(split="test", hu_window=HW, resolution=R, seed=0, n_boot=n_boot,
                             dataset=lambda s: data[s], data_key=key, cache_dir=tmp_path)


def run(evaluator, cases: list[dict], ctx: EvaluationContext, pred=lambda ct: ct, batch_size: int = 4):
    from torch.utils.data import default_collate

    evaluator.start(ctx)
    for i in range(0, len(cases), batch_size):
        batch = default_collate(cases[i:i + batch_size])
        evaluator.update(pred(batch["ct"]), batch["ct"], batch)
    return evaluator.result()


# ---- statistics against independent references -------------------------------------------------
def test_auc_matches_the_mann_whitney_u_of_scipy_and_a_hand_count():
    from scipy.stats import mannwhitneyu

    y = [1, 0, 1, 0, 0, 1]
    s = [0.9, 0.1, 0.4, 0.4, 0.35, 0.8]
    # positives 0.9, 0.4, 0.8 vs negatives 0.1, 0.4, 0.35: 3 + (1 + 0.5 + 1) + 3 = 8.5 of 9
    assert roc_auc(y, s) == pytest.approx(8.5 / 9)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(size=80) + y, 1)  # ties included
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_bootstrap_weights_keep_a_patients_cases_together_and_unit_weights_give_the_auc():
    w = cluster_weights(["a", "a", "b", "c", "c", "c"], 200, seed=1)
    assert w.shape == (200, 6) and (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    assert w[:, [0, 2, 3]].sum(1).tolist() == [3.0] * 200  # three patients drawn per resample
    y, s = np.array([1, 0, 1, 0, 1, 0]), np.array([0.9, 0.2, 0.3, 0.5, 0.6, 0.1])
    assert weighted_auc(y, s, np.ones((1, 6)))[0] == pytest.approx(roc_auc(y, s))


def test_bootstrap_intervals_cover_the_true_auc_at_about_the_nominal_rate():
    """Binormal scores (negatives N(0, 1), positives N(d, 1)): the true AUC is Phi(d / sqrt 2)."""
    from scipy.stats import norm

    d, n, sims = 1.0, 30, 300
    true = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(n), np.zeros(n)]
    covered = 0
    for k in range(sims):
        s = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
        lo, hi = percentile_interval(weighted_auc(y, s, cluster_weights(range(2 * n), 400, seed=k)))
        covered += lo <= true <= hi
    rate = covered / sims
    assert 0.89 <= rate <= 0.99, rate  # nominal 0.95; the percentile bootstrap runs slightly low at n = 60


def test_youden_threshold_by_hand():
    y = [0, 0, 1, 0, 1, 1]
    s = [0.1, 0.3, 0.35, 0.4, 0.8, 0.9]
    # t = 0.35: sensitivity 1, specificity 2/3 -> J = 2/3, the best (t = 0.8: 2/3 + 1 - 1 = 2/3, tie -> lowest t)
    assert youden_threshold(y, s) == pytest.approx(0.35)


# ---- pe_detectability ---------------------------------------------------------------------------
@pytest.mark.slow
def test_pe_detectability_is_perfect_on_a_separable_set_and_chance_on_shuffled_labels(trained):
    ev = PEDetectability(**OPTS)
    res = run(ev, split(12, 2), context(trained))
    assert any("loaded from the cache" in n for n in ev.notes)
    s = res.summary
    assert s["auc_real"]["value"] == 1.0 and s["auc_generated"]["value"] == 1.0  # generated = real here
    assert s["auc_real"]["ci_low"] == 1.0 and s["auc_generated_minus_real"]["value"] == 0.0
    assert s["sensitivity_real"]["value"] == 1.0 and s["specificity_real"]["value"] == 1.0
    labels, scores = np.asarray(res.per_case["label"]), np.asarray(res.per_case["score_real"])
    assert labels.tolist() == [0, 1] * 6 and roc_auc(labels, scores) == 1.0
    rng = np.random.default_rng(0)
    shuffled = [roc_auc(rng.permutation(labels), scores) for _ in range(400)]
    assert abs(np.mean(shuffled) - 0.5) < 0.03
    assert "auc_xray" in s  # the third arm is there (random X-rays here: no claim on its value)


@pytest.mark.slow
def test_a_generated_arm_that_erases_the_clot_loses_its_auc(trained):
    blank = unit(torch.full((R, R, R), 40.0))
    blank[4:12, 4:12, 4:12] = float(unit(torch.tensor(350.0)))

    def erase(ct):  # a 'reconstruction' that gives every case the same clot-free artery: the clot is gone
        return blank.expand_as(ct).clone()

    res = run(PEDetectability(**OPTS), split(12, 2), context(trained), pred=erase)
    s = res.summary
    assert s["auc_real"]["value"] == 1.0 and s["auc_generated"]["value"] == 0.5  # identical scores: ties
    assert s["auc_generated_minus_real"]["ci_high"] < 0
    assert s["sensitivity_generated"]["value"] in (0.0, 1.0)  # one score for all: all called alike


def test_the_classifiers_are_cached_by_data_and_options_and_retrained_when_they_change(tmp_path):
    fast = {"epochs": 1, "width": 2, "xray_arm": False}
    first = PEDetectability(**fast)
    first.start(context(tmp_path, key="data-a"))
    assert any("trained on 24 train cases" in n for n in first.notes)
    again = PEDetectability(**fast)
    again.start(context(tmp_path, key="data-a"))
    assert any("loaded from the cache" in n for n in again.notes)
    x = split(2, 5)[1]["ct"][None]
    assert torch.equal(first._score(x), again._score(x))
    other = PEDetectability(**fast)
    other.start(context(tmp_path, key="data-b"))  # other data: trained again
    assert any("trained on" in n for n in other.notes)
    changed = PEDetectability(**{**fast, "epochs": 2})
    changed.start(context(tmp_path, key="data-a"))  # other options: trained again
    assert any("trained on" in n for n in changed.notes)
    assert len(list((tmp_path / "pe_detectability").iterdir())) == 3


def test_a_user_classifier_from_a_file_replaces_the_trained_one(tmp_path):
    f = tmp_path / "my_classifier.py"
    f.write_text("import torch\n\n"
                 "def make():\n"
                 "    def score(volume):  # low mean in the artery's centre = clot\n"
                 "        return -volume[:, 0, 6:10, 6:10, 6:10].mean((1, 2, 3))\n"
                 "    return score\n")
    res = run(PEDetectability(classifier=f"{f}:make", xray_arm=False), split(12, 2), context(tmp_path))
    assert res.summary["auc_real"]["value"] == 1.0 and "auc_xray" not in res.summary
    assert any("user's classifier" in n for n in res.notes)
    with pytest.raises(DataError, match="not found"):
        PEDetectability(classifier=str(tmp_path / "absent.pt")).start(context(tmp_path))


def test_data_without_study_labels_is_a_clear_error(tmp_path):
    ctx = context(tmp_path)
    data = split(4, 3)
    for item in data:
        del item["study"]
    ctx.dataset = lambda s: data
    with pytest.raises(DataError, match=r"no study label 'pe_present'.*pe_fraction > 0.*study_labels"):
        PEDetectability(epochs=1).start(ctx)


# ---- organ_consistency --------------------------------------------------------------------------
class Threshold:
    """A stand-in segmenter: vessel above 200 HU, lung below -400 HU, each volume on its own."""

    names = {0: "background", 2: "lung", 4: "vessel"}

    def __call__(self, pred_hu, target_hu, batch):
        def seg(hu):
            out = torch.zeros_like(hu, dtype=torch.long)
            out[hu > 200] = 4
            out[hu < -400] = 2
            return out

        return seg(pred_hu), seg(target_hu)


def test_organ_consistency_with_a_stand_in_segmenter(tmp_path):
    cases = [separable_case(i, 0, 2) for i in range(4)]  # no clot: the artery is one 8^3 block
    cut = float(unit(torch.tensor(40.0)))

    def shrink(ct):  # the prediction loses the artery's first slab (8 of 64 voxels per slice-stack: 1/8)
        out = ct.clone() + 20.0 / (HW[1] - HW[0])  # and is 20 HU too bright everywhere
        out[..., 4:5, 4:12, 4:12] = cut
        return out

    with registered_component("segmenter", "threshold", Threshold):
        res = run(OrganConsistency(segmenter="threshold", bootstrap=100), cases, context(tmp_path), pred=shrink)
        same = run(OrganConsistency(segmenter="threshold", bootstrap=100), cases, context(tmp_path))
    t = 8 * 8 * 8
    p = t - 8 * 8
    assert np.allclose(res.per_case["vessel_dice"], 2 * p / (p + t), atol=1e-6)
    assert np.allclose(res.per_case["vessel_volume_error_pct"], 100 * (p - t) / t, atol=1e-6)
    assert "lung_dice" not in res.per_case  # no lung in these volumes
    assert np.allclose(same.per_case["vessel_dice"], 1.0) and np.allclose(same.per_case["vessel_hu_error"], 0.0)
    # the mean HU error over the reference region: +20 HU on 7/8 of it, the slab 350 -> 40 HU on 1/8
    assert np.allclose(res.per_case["vessel_hu_error"], 20.0 * 7 / 8 + (40.0 - 350.0) / 8, atol=1.5)
    assert res.summary["vessel_dice"]["ci_low"] <= res.summary["vessel_dice"]["value"] <= 1.0


def test_the_label_map_segmenter_scores_identical_volumes_perfectly():
    from x2ct_framework.testing import make_batch

    batch = make_batch(2, resolution=16)
    ev = OrganConsistency(segmenter="labels")
    ev.start(EvaluationContext(hu_window=HW, n_boot=50))
    ev.update(batch["ct"], batch["ct"], batch)
    res = ev.result()
    dice = [k for k in res.per_case if k.endswith("_dice")]
    assert dice and all(np.allclose(res.per_case[k], 1.0) for k in dice)
    assert all(np.allclose(res.per_case[k], 0.0) for k in res.per_case if k.endswith("_hu_error"))


def test_totalsegmentator_absent_skips_organ_consistency_with_what_to_install():
    import importlib.util

    if importlib.util.find_spec("totalsegmentator") is not None:
        pytest.skip("TotalSegmentator is installed here")
    runs = build_evaluators(["organ_consistency"], {"organ_consistency": {"segmenter": "totalsegmentator"}})
    assert runs[0].evaluator is None
    assert "pip install TotalSegmentator" in runs[0].skipped and "nnunet/results" in runs[0].skipped


# ---- distribution -------------------------------------------------------------------------------
@pytest.mark.slow  # importing torch-fidelity alone takes seconds
def test_fid_of_a_set_with_itself_is_zero_and_equals_torch_fidelity_and_scipy_on_the_same_features(tmp_path):
    import scipy.linalg
    import torch_fidelity.metric_fid as tf_fid

    from x2ct_framework.evaluation.sharpness_metrics import build_extractor

    cases = split(10, 4)

    def darker(ct):
        return (ct - 0.02).clamp(0, 1)

    ctx = context(tmp_path, n_boot=50)
    itself = run(Distribution(bootstrap=0, kid_subsets=10), cases, ctx)
    assert abs(itself.summary["fid3d"]["value"]) < 1e-6 and abs(itself.summary["fid25d"]["value"]) < 1e-6
    res = run(Distribution(bootstrap=4, kid_subsets=10), cases, ctx, pred=darker)
    net = build_extractor("random3d", None, 0)
    ct = torch.stack([c["ct"] for c in cases])
    a, b = net(darker(ct)).double(), net(ct).double()
    ref = tf_fid.fid_statistics_to_metric(tf_fid.fid_features_to_statistics(a), tf_fid.fid_features_to_statistics(b),
                                          False)[tf_fid.KEY_METRIC_FID]
    assert res.summary["fid3d"]["value"] == pytest.approx(float(ref), rel=1e-6)
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    c1, c2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    hand = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert res.summary["fid3d"]["value"] == pytest.approx(hand, rel=1e-3)
    assert res.summary["fid3d"]["value"] > 0 and res.summary["kid3d"]["value"] > itself.summary["kid3d"]["value"]
    lo, hi = res.summary["fid3d"]["ci_low"], res.summary["fid3d"]["ci_high"]
    assert lo <= hi and math.isnan(itself.summary["fid3d"]["ci_low"])  # no resamples asked: no interval


# ---- the built-ins keep the evaluator contract ----------------------------------------------------
@pytest.mark.parametrize("name, options", [
    ("organ_consistency", {"bootstrap": 50}),
    ("pe_detectability", {"epochs": 1, "width": 2, "bootstrap": 50}),
    pytest.param("distribution", {"bootstrap": 0, "slices": 2, "kid_subsets": 5}, marks=pytest.mark.slow),
])
def test_the_built_in_evaluators_keep_the_contract(name, options):
    from x2ct_framework.testing import check_evaluator

    passed = check_evaluator(name, options=options)
    assert "the same values one case per batch" in passed


@pytest.mark.slow  # builds r3d_18 twice
def test_the_r3d_18_extractor_needs_its_weights_and_auto_says_which_it_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty hub cache
    from x2ct_framework.evaluation.clinical import distribution_extractor

    with pytest.raises(DataError, match=r"r3d_18's weights are not at .*hub/checkpoints/r3d_18-b3b3357e.pth"):
        distribution_extractor("r3d_18", None, 0)
    net, name, notes = distribution_extractor("auto", None, 0)
    assert name == "random3d" and "seeded random 3D CNN" in notes[0]
    # with a file of the expected name (random weights saved in r3d_18's layout) the pretrained path is taken
    from torchvision.models.video import r3d_18

    file = tmp_path / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth"
    file.parent.mkdir(parents=True)
    torch.save(r3d_18().state_dict(), file)
    net, name, _ = distribution_extractor("auto", None, 0)
    assert name.startswith("r3d_18") and net(torch.rand(2, 1, 16, 16, 16)).shape == (2, 512)

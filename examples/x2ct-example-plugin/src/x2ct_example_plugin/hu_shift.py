"""An example evaluator: the mean HU shift of the prediction against the target, over the whole split.

Per case: the mean of (prediction - target) in HU inside the body (target above ``body_hu``). Over the
split: the mean shift with a 95% bootstrap interval over patients, and the fraction of cases whose
shift exceeds ``tolerance_hu``. Copy it as the skeleton of your own evaluator.
"""

import numpy as np

from x2ct_framework.api import Evaluator, EvaluatorResult, bootstrap_mean, cluster_weights, summary_entry


class HUShift(Evaluator):
    def __init__(self, body_hu: float = -500.0, tolerance_hu: float = 25.0):
        if tolerance_hu <= 0:
            raise ValueError(f"tolerance_hu must be positive, got {tolerance_hu}")
        self.body_hu, self.tolerance_hu = float(body_hu), float(tolerance_hu)

    def start(self, context):
        self.context = context  # split, hu_window, seed, n_boot, dataset(split), cache_dir ...
        self.shifts, self.patients = [], []

    def update(self, pred, target, batch):
        lo, hi = self.context.hu_window
        pred_hu, target_hu = pred * (hi - lo) + lo, target * (hi - lo) + lo
        for i in range(pred.shape[0]):
            body = target_hu[i] > self.body_hu
            self.shifts.append(float((pred_hu[i] - target_hu[i])[body].mean()) if body.any() else float("nan"))
        study = batch.get("study", {})
        ids = study.get("patient_id", batch.get("case_id"))
        self.patients += [str(p) for p in ids] if ids is not None else [str(len(self.patients) + i)
                                                                       for i in range(pred.shape[0])]

    def result(self):
        shifts = np.asarray(self.shifts)
        weights = cluster_weights(self.patients, self.context.n_boot or 1000, seed=self.context.seed)
        mean, ci, n = bootstrap_mean(shifts, weights)
        outside, ci_out, _ = bootstrap_mean((np.abs(shifts) > self.tolerance_hu).astype(float), weights)
        return EvaluatorResult(
            per_case={"shift_hu": shifts},
            summary={"mean_shift_hu": summary_entry(mean, ci, n, unit="HU", higher_is_better=None),
                     "fraction_outside": summary_entry(outside, ci_out, n, higher_is_better=False,
                                                       note=f"|shift| > {self.tolerance_hu:g} HU")},
            conventions=[f"shift: mean (prediction - target) in HU where the target exceeds {self.body_hu:g} HU"])


__all__ = ["HUShift"]

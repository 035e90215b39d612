"""Statistics over seeds: the 95% Student-t interval, the paired difference against the reference, verdicts."""

from __future__ import annotations

import math

# Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30; larger df use a Cornish-Fisher expansion.
T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the 95% two-sided Student-t critical value."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def interval(values: list[float]) -> dict[str, float]:
    """Mean, sample std and the 95% t-interval of the mean over seeds; NaN values are skipped.

    With one value the interval is undefined (NaN): one seed says nothing about seed-to-seed spread.
    """
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    nan = float("nan")
    if n == 0:
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = sum(v) / n
    if n == 1:
        return {"mean": mean, "std": nan, "ci_low": nan, "ci_high": nan, "n": 1}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired(ref: list[dict], other: list[dict], metric: str) -> dict[str, float]:
    """Interval of the per-seed difference ``other - ref`` over the seeds both have."""
    a = {r["seed"]: r["metrics"].get(metric) for r in ref}
    diffs = [o["metrics"].get(metric) - a[o["seed"]] for o in other
             if o["seed"] in a and o["metrics"].get(metric) is not None and a[o["seed"]] is not None]
    return interval(diffs)


def verdict(diff: dict[str, float], higher_is_better: bool) -> str:
    if diff["n"] < 2 or not math.isfinite(diff["ci_low"]):
        return "n/a"
    if diff["ci_low"] > 0:
        return "better" if higher_is_better else "worse"
    if diff["ci_high"] < 0:
        return "worse" if higher_is_better else "better"
    return "unclear"


def overlap(a: dict, b: dict) -> str:
    if not (math.isfinite(a["ci_low"]) and math.isfinite(b["ci_low"])):
        return "n/a"
    return "yes" if a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"] else "no"


def median(values: list) -> float:
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return float("nan")
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

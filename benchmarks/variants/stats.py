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


def per_case_pairs(ref: list[dict], other: list[dict], metric: str) -> list[list[float]]:
    """Per run (seed), the case-by-case differences ``other - ref`` on the cases both scored.

    Runs pair by seed (the same seed means the same data seed, so the same test cases); cases pair by
    case id. A case either side could not score (NaN) is left out of that run's pairs.
    """
    by_seed = {r["seed"]: r for r in ref}
    groups = []
    for o in other:
        r = by_seed.get(o["seed"])
        if r is None or "per_case" not in o or "per_case" not in r:
            continue
        a = dict(zip(r["per_case"]["case_ids"], r["per_case"]["metrics"].get(metric, [])))
        diffs = []
        for cid, v in zip(o["per_case"]["case_ids"], o["per_case"]["metrics"].get(metric, [])):
            w = a.get(cid)
            if v is not None and w is not None and math.isfinite(v) and math.isfinite(w):
                diffs.append(v - w)
        if diffs:
            groups.append(diffs)
    return groups


def hierarchical_bootstrap(groups: list[list[float]], n_boot: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean over groups of the group means, with a 95% percentile interval from a two-level bootstrap.

    ``groups`` are runs (each its own training seed and data seed), each holding per-case values. Each
    replicate draws runs with replacement, then cases within every drawn run with replacement, so the
    interval covers both the run-to-run spread (training and data seeds) and the case-to-case spread.
    With a single run only cases are resampled (the interval then ignores seed-to-seed variation).
    """
    import numpy as np

    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    nan = float("nan")
    if not groups:
        return {"mean": nan, "ci_low": nan, "ci_high": nan, "n": 0, "cases": 0}
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    k = len(groups)
    for b in range(n_boot):
        picks = rng.integers(0, k, size=k) if k > 1 else np.zeros(1, dtype=int)
        reps[b] = np.mean([groups[i][rng.integers(0, len(groups[i]), size=len(groups[i]))].mean() for i in picks])
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"mean": mean, "ci_low": float(lo), "ci_high": float(hi), "n": k, "cases": int(sum(len(g) for g in groups))}


def as_one_sample(rows: list[dict]) -> list[dict]:
    """Result rows of a regression with every metric also under ``one_sample/<metric>`` (per case too): its
    prediction is its only sample, so it pairs with a generative cell's single-sample columns."""
    def both(metrics: dict) -> dict:
        return {**metrics, **{f"one_sample/{k}": v for k, v in metrics.items()}}

    return [{**r, "metrics": both(r["metrics"]),
             **({"per_case": {**r["per_case"], "metrics": both(r["per_case"]["metrics"])}} if "per_case" in r else {})}
            for r in rows]


def fmt_interval(i: dict, sign: str = "") -> str:
    """``mean [low, high]`` with 4 significant digits (``sign="+"`` for differences)."""
    return f"{i['mean']:{sign}.4g} [{i['ci_low']:{sign}.4g}, {i['ci_high']:{sign}.4g}]"

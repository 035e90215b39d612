"""Score a checkpoint on a dataset split under named protocols.

``x2ct evaluate CHECKPOINT_OR_RUN_FOLDER [--recipe R] [--split test] [--protocol default x2ctgan]``
writes, into ``<run>/eval/<stage>-<split>/`` (or ``--out``):

- ``per_case.csv``: one row per case, one column per ``<protocol>/<metric>``;
- ``summary.json``: per protocol its conventions, notes, and per metric mean, std, 95% bootstrap
  interval and the number of cases that counted;
- ``summary.md``: the same as markdown tables, with the worst cases' slice pictures (``worst/*.png``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from x2ct_framework._version import __version__
from x2ct_framework.atomic import atomic_folder
from x2ct_framework.config.build import build_dataset
from x2ct_framework.loading import load_model, pick_device
from x2ct_framework.runs import Target, hu_window_of, resolve_target
from x2ct_framework.errors import DataError
from x2ct_framework.evaluation.evaluators import (EvaluationContext, EvaluatorRun, build_evaluators, data_key,
                                                 finish_evaluators, start_evaluators, update_evaluators)
from x2ct_framework.evaluation.protocols import Protocol, build_protocol, x2ctgan_setting_deviations
from x2ct_framework.evaluation.sharpness_metrics import calibrated_coverage
from x2ct_framework.generative import SampleStats, draw_samples, is_generative, stage_model

# data options that change where or how fast the data is read, not what it is (left out of an evaluator's data key)
NOT_DATA = ("cache_dir", "cache", "memory_cache_mb", "num_val", "num_test", "on_bad_case")
ONE_SAMPLE = "one_sample:"  # prefix of the per-case columns scoring a generative model's first sample
DIVERSITY = "samples/diversity_hu"


log = logging.getLogger("x2ct_framework.evaluation")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def infer(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's volume for a batch, clipped to [0, 1] (the recipe's HU window)."""
    return model(batch["xrays"], batch["geometry"]).float().clamp(0, 1)


DEFAULT_SAMPLES = 8  # samples per case x2ct evaluate draws from a generative model unless told


def sample_count(model: torch.nn.Module, samples: int | None) -> int:
    """How many samples per case to draw: 0 for a regression model, ``samples`` (default
    :data:`DEFAULT_SAMPLES`) for a generative one; asking a regression model for samples is an error."""
    if not is_generative(model):
        if samples:
            raise DataError(f"--samples {samples}: the model ({type(stage_model(model)).__name__}) is not generative "
                            f"(it has no training_loss and sample); leave --samples out")
        return 0
    return DEFAULT_SAMPLES if samples is None else int(samples)


@torch.no_grad()
def infer_samples(model: torch.nn.Module, batch: dict, count: int) -> dict[str, torch.Tensor | None]:
    """A generative model's ``count`` samples of a batch (each clipped to [0, 1], seeded per case as
    ``x2ct predict --samples``): their mean, the first sample, the per-voxel standard deviation, and the
    regression it refines (the cascade's ``prev``; None without a cascade)."""
    xrays, geometry = batch["xrays"], batch["geometry"]
    inner = stage_model(model)
    prev = model.previous(xrays, geometry) if inner is not model else None
    stats, first = SampleStats(), None
    for s in draw_samples(model, xrays, geometry, count, seed=getattr(inner, "sample_seed", 0), prev=prev):
        s = s.float().clamp(0, 1)
        first = s if first is None else first
        stats.add(s)
    regression = None
    if prev is not None:
        regression = F.interpolate(prev.float(), size=first.shape[-3:], mode="trilinear", align_corners=False)
    return {"mean": stats.mean.float(), "sample": first, "std": stats.std().float(),
            "regression": None if regression is None else regression.clamp(0, 1)}


# ---- aggregation ------------------------------------------------------------------------------
def aggregate(values: np.ndarray | list[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean, sample std and 95% percentile-bootstrap interval of the mean; NaN values are skipped."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    if n > 1 and n_boot > 0:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, n, size=(n_boot, n))].mean(1)
        lo, hi = np.percentile(means, [2.5, 97.5])
    else:
        lo = hi = mean
    return {"mean": mean, "std": std, "ci_low": float(lo), "ci_high": float(hi), "n": n}


# ---- evaluation -------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Per-case values and aggregates of one evaluation; ``keys`` are ``<protocol>/<metric>``.

    ``kept`` holds, on the CPU, the volumes of the cases the pictures need (the first cases and the
    worst ones): index -> ``{"case_id", "pred", "ct", "xrays", "labels"?, "spacing"?}``.
    """

    case_ids: list[str]
    values: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]
    protocols: list[Protocol]
    info: dict[str, Any] = field(default_factory=dict)
    worst: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    kept: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluators: list[EvaluatorRun] = field(default_factory=list)

    def ranking_key(self) -> tuple[Protocol, str]:
        return ranking(self.protocols)

    def worst_indices(self, k: int) -> list[int]:
        proto, metric = self.ranking_key()
        bad = badness(self.values[proto.key(metric)], proto.higher_is_better(metric))
        return [int(i) for i in np.argsort(-bad, kind="stable")[:k]]


def ranking(protocols: list[Protocol]) -> tuple[Protocol, str]:
    """The protocol and metric that rank cases (the default protocol's PSNR when present)."""
    proto = next((p for p in protocols if p.name == "default"), protocols[0])
    return proto, proto.primary


def badness(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Larger is worse; a case that could not be scored (NaN) is the worst."""
    v = np.asarray(values, dtype=np.float64)
    bad = -v if higher_is_better else v.copy()
    bad[~np.isfinite(bad)] = np.inf
    return bad


def _case_record(batch: dict, pred: torch.Tensor, i: int, case_id: str) -> dict[str, Any]:
    rec = {"case_id": case_id, "pred": pred[i].detach().cpu(), "ct": batch["ct"][i].detach().float().cpu(),
           "xrays": batch["xrays"][i].detach().float().cpu()}
    for k in ("labels", "spacing"):
        if isinstance(batch.get(k), torch.Tensor):
            rec[k] = batch[k][i].detach().cpu()
    return rec


def evaluate(target: Target, split: str = "test", protocols: list[str] = ("default", "x2ctgan"), *,
             batch_size: int = 0, device: str | torch.device = "auto", max_cases: int = 0, n_boot: int = 1000,
             worst: int = 3, keep_first: int = 0, out_dir: str | Path | None = None, progress: bool = True,
             lpips: str = "auto", samples: int | None = None, model: torch.nn.Module | None = None,
             evaluators: list[str] | None = None) -> Evaluation:
    """Run the checkpoint over ``split`` once and score every case under each protocol.

    A generative model is scored on the mean of ``samples`` samples per case (default 8) under each
    protocol's keys, on one sample under ``one_sample:<key>``, and its sample diversity (the mean over
    voxels of the per-voxel standard deviation, HU) is ``samples/diversity_hu``.

    The volumes of the ``worst`` worst cases and of the first ``keep_first`` cases stay in
    ``Evaluation.kept`` for pictures; with ``out_dir`` the tables and the worst cases' slice pictures
    are written there. ``model`` scores that predictor (anything called as ``model(xrays, geometry)``)
    instead of the target's checkpoint; the target then supplies the recipe, stage and data only.
    ``evaluators`` names the evaluators that score the whole split (None: the recipe's ``eval.evaluators``);
    their per-case columns join ``per_case.csv`` as ``<evaluator>/<column>``, their summaries the report.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    recipe, stage = target.recipe, target.stage
    hu_window = hu_window_of(recipe, stage)
    # Offered to every protocol factory that declares them (the default protocol takes lpips).
    offered = {"lpips": {"auto": "auto", "on": True, "off": False}[lpips], "resolution": stage.resolution,
               "seed": recipe["seed"]}

    def build_protocols() -> list[Protocol]:
        built = []
        for name in dict.fromkeys(protocols):
            options = recipe["eval"].get("protocol_options", {}).get(name, {})
            where = recipe.where("eval", "protocol_options", name) if options else "--protocol"
            built.append(build_protocol(name, hu_window, where=where, context=offered, **options))
            built[-1].reset()
        return built

    protos = build_protocols()
    rank_proto, rank_metric = ranking(protos)
    rank_key, rank_higher = rank_proto.key(rank_metric), rank_proto.higher_is_better(rank_metric)
    dataset = build_dataset(recipe, stage, split)
    for proto in protos:  # the x2ctgan protocol outside X2CT-GAN's data setting: said loudly, kept in the results
        if proto.name == "x2ctgan" and recipe["data"].get("name") == "x2ctgan_h5":
            for note in x2ctgan_setting_deviations(hu_window, stage.resolution, getattr(dataset, "resize", None)):
                log.warning("x2ctgan protocol: %s", note)
                proto.notes.append(note)
    n = len(dataset) if not max_cases else min(max_cases, len(dataset))
    if n == 0:
        raise DataError(f"split {split!r} of {recipe.path} has no cases to evaluate")
    bs = batch_size or recipe["train"]["batch_size"]
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=bs, shuffle=False,
                        num_workers=recipe["train"]["num_workers"])
    names = recipe["eval"].get("evaluators", []) if evaluators is None else list(evaluators)
    runs = build_evaluators(names, recipe["eval"].get("evaluator_options", {}),
                            where=lambda name: (recipe.where("eval", "evaluator_options", name)
                                                if name in recipe["eval"].get("evaluator_options", {})
                                                else recipe.where("eval", "evaluators") if evaluators is None
                                                else "--evaluators")) if names else []
    if runs:
        from x2ct_framework.cachedir import default_cache_dir
        from x2ct_framework.config.build import data_options

        start_evaluators(runs, EvaluationContext(
            split=split, hu_window=tuple(hu_window), resolution=stage.resolution, seed=recipe["seed"], n_boot=n_boot,
            device=dev, dataset=lambda s: build_dataset(recipe, stage, s),
            data_key=data_key({k: v for k, v in data_options(recipe, stage).items() if k not in NOT_DATA},
                              stage.resolution, list(hu_window), recipe["seed"], __version__),
            cache_dir=default_cache_dir() / "evaluators", out_dir=None if out_dir is None else Path(out_dir),
            batch_size=bs, progress=progress))
    model = load_model(target, dev) if model is None else model.to(dev).eval()
    n_samples = sample_count(model, samples)
    # one sample is scored by protocols of its own: their set-level metrics (fid3d, kid3d) then hold one sample
    # per case, not the samples mixed with the means
    sample_protos = build_protocols() if n_samples else []
    case_ids: list[str] = []
    chunks: dict[str, list[torch.Tensor]] = {}
    kept: dict[int, dict[str, Any]] = {}
    worst_pool: list[tuple[float, int]] = []  # (badness, index) of the cases kept as worst
    from tqdm.auto import tqdm

    with_labels = 0
    for batch in tqdm(loader, desc=f"evaluate {stage.name}/{split}", disable=not progress, dynamic_ncols=True):
        with_labels += int("labels" in batch)
        if "ct" not in batch:
            raise DataError(f"split {split!r} of dataset {recipe['data']['name']!r} has no target CT ('ct') "
                            f"to score against")
        batch = _to(batch, dev)
        drawn = infer_samples(model, batch, n_samples) if n_samples else None
        pred = drawn["mean"] if drawn else infer(model, batch)
        target_ct = batch["ct"].float()
        if pred.shape != target_ct.shape:
            raise DataError(f"the model predicts {tuple(pred.shape[2:])} volumes but the {split} split's CT is "
                            f"{tuple(target_ct.shape[2:])}; evaluate at the stage's resolution")
        b, start = pred.shape[0], len(case_ids)
        ids = batch.get("case_id")
        case_ids += [str(c) for c in ids] if ids is not None else [f"case{start + i:04d}" for i in range(b)]
        if drawn:  # the samples' per-voxel spread: what the uncertainty metrics score against the mean's error
            batch = {**batch, "pred_std": drawn["std"]}
        update_evaluators(runs, pred, target_ct, batch)
        for proto in protos:
            for key, v in proto(pred, target_ct, batch).items():
                chunks.setdefault(key, []).append(v)
        for proto in sample_protos if drawn else ():
            for key, v in proto(drawn["sample"], target_ct, batch).items():
                chunks.setdefault(f"{ONE_SAMPLE}{key}", []).append(v)
        if drawn:
            lo, hi = hu_window
            chunks.setdefault(DIVERSITY, []).append((drawn["std"].flatten(1).mean(1) * (hi - lo)).cpu())
        bad = badness(chunks[rank_key][-1].numpy(), rank_higher)
        for i in range(b):
            idx = start + i
            keep = idx < keep_first
            if worst:
                worst_pool.append((float(bad[i]), idx))
                worst_pool.sort(key=lambda t: (-t[0], t[1]))
                dropped = worst_pool[worst:]
                del worst_pool[worst:]
                for _, j in dropped:
                    if j >= keep_first:
                        kept.pop(j, None)
                keep = keep or any(j == idx for _, j in worst_pool)
            if keep:
                kept[idx] = _case_record(batch, pred, i, case_ids[idx])
                if drawn:
                    kept[idx].update({k: v[i].detach().cpu() for k, v in drawn.items()
                                      if k != "mean" and v is not None})
    values = {k: torch.cat(v).numpy() for k, v in chunks.items()}
    values.update(finish_evaluators(runs, len(case_ids)))
    summary = {k: aggregate(v, n_boot, seed=recipe["seed"]) for k, v in values.items()}
    nan = float("nan")
    for prefix, group in (("", protos), (ONE_SAMPLE, sample_protos)):  # set-level metrics (fid3d, kid3d): one
        for proto in group:                                             # value for the split, no interval
            for key, v in proto.set_results().items():
                summary[prefix + key] = {"mean": v, "std": nan, "ci_low": nan, "ci_high": nan, "n": len(case_ids)}
    info = {"recipe": str(recipe.path), "name": recipe.name, "stage": stage.name, "resolution": stage.resolution,
            "checkpoint": str(target.checkpoint), "split": split, "cases": len(case_ids), "hu_window": list(hu_window),
            "device": str(dev), "bootstrap": n_boot, "samples": n_samples,
            "structures_from": structures_from(getattr(dataset, "label_source", None), with_labels > 0)}
    ev = Evaluation(case_ids, values, summary, protos, info, kept=kept, evaluators=runs)
    for run in runs:
        if run.result is not None and run.result.skipped:
            log.warning("evaluator %s skipped: %s", run.name, run.result.skipped)
    if out_dir is not None:
        write_results_folder(ev, Path(out_dir), worst)
    return ev


RESULT_FILES = ("per_case.csv", "summary.json", "summary.md", "worst", "sparc.csv", "c2rv.csv")


def write_results_folder(ev: Evaluation, out: Path, worst: int) -> None:
    """Write the tables and pictures into a temporary folder and swap it in whole for ``out``, so a
    killed evaluation never leaves new tables beside old ones. A folder that holds anything else than
    an earlier evaluation's results is refused rather than replaced."""
    from x2ct_framework.safepaths import guard

    guard(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder; choose a folder for the results")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RESULT_FILES)
        if foreign:
            raise DataError(f"--out {out}: the folder holds other files than evaluation results "
                            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); the results folder is "
                            f"replaced whole, so choose a new or empty folder")
    try:
        with atomic_folder(out) as tmp:
            if worst:
                save_worst(ev, tmp / "worst", worst)
                for w in ev.worst:  # name the pictures where they will be
                    w["picture"] = str(out / Path(w["picture"]).relative_to(tmp))
            write_outputs(ev, tmp, final=out)
    except OSError as exc:
        raise DataError(f"could not write the evaluation results to {out}: {exc}; nothing there was changed") from exc


def save_worst(ev: Evaluation, folder: Path, k: int) -> list[dict[str, Any]]:
    """Slice pictures (prediction, target, error; axial/coronal/sagittal) of the ``k`` worst cases."""
    from x2ct_framework.viz import save_preview

    proto, metric = ev.ranking_key()
    key = proto.key(metric)
    ev.worst = []
    for rank, i in enumerate(ev.worst_indices(k)):
        rec = ev.kept.get(i)
        if rec is None:
            continue
        cid = ev.case_ids[i]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(cid))
        path = folder / f"{rank + 1:02d}_{safe}.png"
        v = ev.values[key][i]
        save_preview(path, rec["pred"], rec["ct"], xrays=rec["xrays"],
                     title=f"worst #{rank + 1}: {cid}, {key} {v:.2f} {proto.unit(metric)}".strip())
        ev.worst.append({"rank": rank + 1, "case_id": cid, "index": i, key: float(v), "picture": str(path)})
    return ev.worst


# ---- writing ----------------------------------------------------------------------------------
def _fmt(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.1f}"


def summary_json(ev: Evaluation) -> dict[str, Any]:
    out: dict[str, Any] = {"info": ev.info, "protocols": {}, "worst_cases": ev.worst}
    for proto in ev.protocols:
        metrics = {}
        for m in proto.metrics:
            s = ev.summary[proto.key(m)]
            metrics[m] = {"key": proto.key(m), **s, "ci95": [s["ci_low"], s["ci_high"]], "unit": proto.unit(m),
                          "higher_is_better": proto.higher_is_better(m), "group": proto.groups.get(m, "global")}
        out["protocols"][proto.name] = {"conventions": proto.conventions, "notes": proto.notes, "metrics": metrics}
    if ev.evaluators:
        out["evaluators"] = {}
        for run in ev.evaluators:
            r = run.result
            out["evaluators"][run.name] = {
                "source": run.source, "skipped": r.skipped if r is not None else run.skipped,
                "conventions": r.conventions if r is not None else [], "notes": r.notes if r is not None else [],
                "summary": ({k: {**e, "ci95": [e["ci_low"], e["ci_high"]]} for k, e in r.summary.items()}
                            if r is not None else {}),
                "per_case_columns": [f"{run.name}/{c}" for c in (r.per_case if r is not None else {})]}
    if ev.info.get("samples"):
        out["generative"] = {"samples": ev.info["samples"], "scored": "the mean of the samples (protocols above)",
                             "one_sample": {k[len(ONE_SAMPLE):]: ev.summary[k] for k in ev.summary
                                            if k.startswith(ONE_SAMPLE)},
                             "diversity_hu": ev.summary.get(DIVERSITY),
                             "coverage_if_calibrated": calibrated_coverage(ev.info["samples"])
                             if ev.info["samples"] >= 2 else None}
    return out


def write_outputs(ev: Evaluation, out_dir: str | Path, final: str | Path | None = None) -> dict[str, Path]:
    """The tables into ``out_dir``; ``final`` is where the folder will live (for links and ``ev.files``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = Path(final) if final is not None else out
    keys = list(ev.values)
    with (out / "per_case.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", *keys])
        for i, cid in enumerate(ev.case_ids):
            w.writerow([cid, *[("" if not np.isfinite(ev.values[k][i]) else f"{ev.values[k][i]:.9g}") for k in keys]])
    (out / "summary.json").write_text(json.dumps(summary_json(ev), indent=2))
    (out / "summary.md").write_text(markdown(ev, final))
    ev.files = {"per_case": final / "per_case.csv", "summary_json": final / "summary.json",
                "summary_md": final / "summary.md"}
    for proto in ev.protocols:  # per-volume tables in a published layout (e.g. SPARC's CSV columns)
        if proto.per_volume is None:
            continue
        name, columns = proto.per_volume
        with (out / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(columns))
            for i, cid in enumerate(ev.case_ids):
                row = [cid]
                for metric in list(columns.values())[1:]:
                    v = ev.values[proto.key(metric)][i]
                    row.append("" if not np.isfinite(v) else f"{v:.6f}")
                w.writerow(row)
        ev.files[f"{proto.name}_per_volume"] = final / name
    return ev.files


# The report sections shown in the main metric table (the per-structure PSNR/MAE/Dice have their own).
TABLE_GROUPS = ("global", "window", "contrast", "view", "sharpness", "uncertainty", "set", "landmark")


def metric_table(ev: Evaluation, proto: Protocol, groups: tuple[str, ...] | None = None) -> str:
    """Markdown table of one protocol's aggregates; every metric is named ``<protocol>/<metric>``."""
    lines = ["| metric | mean | std | 95% CI | n | unit |", "|---|---|---|---|---|---|"]
    for m in proto.metrics:
        if groups is not None and proto.groups.get(m, "global") not in groups:
            continue
        s = ev.summary[proto.key(m)]
        arrow = "higher is better" if proto.higher_is_better(m) else "lower is better"
        lines.append(f"| `{proto.key(m)}` | {_fmt(s['mean'])} | {_fmt(s['std'])} | "
                     f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] | {s['n']} | {proto.unit(m) or '-'} ({arrow}) |")
    return "\n".join(lines)


def structure_table(ev: Evaluation, proto: Protocol) -> str:
    """Per-structure scores as one row per structure (PSNR, MAE, Dice means with n)."""
    rows = []
    for s in ("lung", "bone", "vessel"):
        cells = []
        for kind in ("psnr", "mae", "dice"):
            key = f"{s}_{kind}"
            if key not in proto.metrics:
                cells.append("-")
                continue
            st = ev.summary[proto.key(key)]
            cells.append(f"{_fmt(st['mean'])} ± {_fmt(st['std'], 2)} (n={st['n']})")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = (f"| structure | `{proto.name}/*_psnr` dB | `{proto.name}/*_mae` HU | `{proto.name}/*_dice` |\n"
            "|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def structures_from(label_source: dict | None, had_labels: bool) -> str:
    """Where the per-structure reference regions came from, in words: the label maps and their mapping, or HU."""
    if not had_labels:
        return "HU thresholds of the target CT (the data carries no label maps)"
    if not label_source:
        return "the dataset's label maps (in the framework's codes)"
    groups = "; ".join(f"{k} <- {v}" for k, v in label_source.get("groups", {}).items())
    text = f"label maps {label_source.get('maps', '')}, mapping {label_source.get('name', '')!r}"
    if label_source.get("identity"):
        return text + " (already in the framework's codes)"
    return text + (f" ({groups}; other ids -> {label_source.get('other')}"
                   + ("; unlabelled body voxels -> soft tissue/fat" if label_source.get("fill_body") else "") + ")")


def generative_lines(ev: Evaluation) -> list[str]:
    """A generative model's section of summary.md: the mean against one sample, and the sample diversity."""
    if not ev.info.get("samples"):
        return []
    lines = [f"## Samples ({ev.info['samples']} per case)", "",
             "The protocols above score the per-voxel mean of the samples. One sample, scored alone (sharper, but "
             "a sample is one CT that fits the X-rays, not the most likely one):", "",
             "| metric | mean of samples | one sample |", "|---|---|---|"]
    for key in ev.values:
        if key.startswith(ONE_SAMPLE):
            base = key[len(ONE_SAMPLE):]
            lines.append(f"| {base} | {_fmt(ev.summary[base]['mean'])} | {_fmt(ev.summary[key]['mean'])} |")
    d = ev.summary.get(DIVERSITY)
    if d:
        lines += ["", f"Sample diversity (mean per-voxel standard deviation over the samples): {_fmt(d['mean'], 2)} HU "
                      f"[{_fmt(d['ci_low'], 2)}, {_fmt(d['ci_high'], 2)}]."]
    if ev.info["samples"] >= 2:
        lines += ["", f"`uncertainty_coverage` of a calibrated sampler with {ev.info['samples']} samples: "
                      f"{calibrated_coverage(ev.info['samples']):.3f} (the std and the mean come from the samples; "
                      f"0.954 needs many)."]
    return lines + [""]


def markdown(ev: Evaluation, out_dir: Path | None = None) -> str:
    i = ev.info
    lines = [f"# Evaluation: {i.get('name', '')} {i.get('stage', '')} on the {i.get('split', '')} split", "",
             f"- checkpoint: `{i.get('checkpoint')}`", f"- recipe: `{i.get('recipe')}`",
             f"- cases: {i.get('cases')}, resolution {i.get('resolution')}^3, HU window {i.get('hu_window')}",
             f"- aggregate: mean over cases, sample std, 95% percentile bootstrap interval of the mean "
             f"({i.get('bootstrap')} resamples); n counts the cases where the metric is defined", ""]
    for proto in ev.protocols:
        lines += [f"## Protocol `{proto.name}`", "", metric_table(ev, proto, TABLE_GROUPS), ""]
        st = structure_table(ev, proto) if any(g == "structure" for g in proto.groups.values()) else ""
        if st:
            source = i.get("structures_from", "labels or HU thresholds")
            lines += [f"Per-structure scores; reference regions from {source}:",
                      "", st, ""]
        lines += ["Conventions:", ""] + [f"- {c}" for c in proto.conventions] + [""]
        if proto.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in proto.notes] + [""]
    lines += generative_lines(ev)
    lines += evaluator_lines(ev)
    lines += worst_cases_lines(ev, lambda pic: (pic.relative_to(out_dir) if out_dir is not None
                                                and pic.is_relative_to(out_dir) else pic).as_posix())
    return "\n".join(lines).rstrip() + "\n"


def evaluator_table(run: EvaluatorRun) -> str:
    """Markdown table of one evaluator's summary numbers."""
    lines = ["| number | value | 95% CI | n | unit | note |", "|---|---|---|---|---|---|"]
    for key, e in run.result.summary.items():
        hib = e.get("higher_is_better")
        arrow = "" if hib is None else " (higher is better)" if hib else " (lower is better)"
        lines.append(f"| `{run.name}/{key}` | {_fmt(e['value'])} | [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] | "
                     f"{e['n']} | {e.get('unit') or '-'}{arrow} | {e.get('note', '')} |")
    return "\n".join(lines)


def evaluator_lines(ev: Evaluation) -> list[str]:
    """The evaluators' sections of summary.md (a skipped evaluator with its reason)."""
    lines: list[str] = []
    for run in ev.evaluators:
        r = run.result
        lines += [f"## Evaluator `{run.name}`", ""]
        if r is None or r.skipped:
            lines += [f"SKIPPED: {r.skipped if r is not None else run.skipped}", ""]
            continue
        if r.summary:
            lines += [evaluator_table(run), ""]
        if r.per_case:
            lines += [f"Per-case columns in per_case.csv: {', '.join(f'`{run.name}/{c}`' for c in r.per_case)}.", ""]
        if r.conventions:
            lines += ["Conventions:", ""] + [f"- {c}" for c in r.conventions] + [""]
        if r.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in r.notes] + [""]
    return lines


def worst_cases_lines(ev: Evaluation, link: Callable[[Path], str]) -> list[str]:
    """The worst-cases section in markdown (``link`` turns a picture's path into the link written)."""
    if not ev.worst:
        return []
    proto, metric = ev.ranking_key()
    lines = [f"## Worst cases by `{proto.key(metric)}`", ""]
    for w in ev.worst:
        lines += [f"{w['rank']}. {w['case_id']}: {_fmt(w[proto.key(metric)])} {proto.unit(metric)}", "",
                  f"   ![{w['case_id']}]({link(Path(w['picture']))})", ""]
    return lines


def default_out_dir(target: Target, split: str) -> Path:
    base = target.run_dir if target.run_dir is not None else target.checkpoint
    suffix = "" if target.checkpoint.name == "best" else f"-{target.checkpoint.name}"
    return base / "eval" / f"{target.stage.name}{suffix}-{split}"


# ---- command line -----------------------------------------------------------------------------
def main(args) -> int:
    from x2ct_framework.plugins import apply_trust_arguments

    apply_trust_arguments(args)
    target = resolve_target(args.checkpoint, args.recipe, args.overrides, args.stage, args.which)
    out = Path(args.out) if args.out else default_out_dir(target, args.split)
    from x2ct_framework import safepaths

    root = target.run_dir if target.run_dir is not None else target.checkpoint
    if target.run_dir is not None:  # a run folder's results stay inside it, whatever links it holds
        safepaths.refuse_outside_links(target.run_dir, "run folder")
    with safepaths.confined(root):
        ev = evaluate(target, args.split, args.protocols, batch_size=args.batch_size, device=args.device,
                      max_cases=args.max_cases, n_boot=args.bootstrap, worst=args.worst, out_dir=out,
                      progress=args.progress, lpips=args.lpips,
                      samples=getattr(args, "samples", None), evaluators=getattr(args, "evaluators", None))
    for proto in ev.protocols:
        for note in proto.notes:
            loud = note.startswith("NOT X2CT-GAN")
            print(f"{'WARNING' if loud else 'note'} ({proto.name}): {note}", file=sys.stderr if loud else sys.stdout)
        print(f"\nprotocol {proto.name}:")
        print(metric_table(ev, proto))
    for run in ev.evaluators:
        if run.result is None or run.result.skipped:
            print(f"\nevaluator {run.name}: SKIPPED: {run.result.skipped if run.result else run.skipped}",
                  file=sys.stderr)
        elif run.result.summary:
            print(f"\nevaluator {run.name}:")
            print(evaluator_table(run))
    print(f"\n{ev.info['cases']} cases; results in {out}")
    return 0

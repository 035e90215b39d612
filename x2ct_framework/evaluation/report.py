"""The run report: ``runs/<name>/report.md`` with its pictures, written when a run ends.

A built-in plugin (entry point ``report``) implementing ``on_run_end``. The report holds the recipe
summary, per-stage training curves, the final model's metrics under every protocol of
``eval.protocols`` (scored on ``eval.split`` by ``x2ct_framework.evaluation.evaluate``), per-structure scores, a
slice gallery, structure overlays and the worst cases, as markdown plus PNG files, readable without
any other tool. ``eval.report = false`` turns it off. It reads everything from the run folder, so
``python -m x2ct_framework.evaluation.report runs/<name>`` writes it again for a finished run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from x2ct_framework.conventions import PLANES, unit_to_hu
from x2ct_framework.errors import FinalEvaluationError, X2CTError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.training.logbook import Logbook
from x2ct_framework.viz import orthogonal_slices, plt, save_figure

REPORT = "report.md"
PICTURES = "report"
DPI = 72


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---- pictures ---------------------------------------------------------------------------------
def plot_curves(book: Logbook, path: Path, title: str) -> Path | None:
    """The stage's curves as the trainer draws them (``Logbook.plot``); None when it holds no rows."""
    rows = book.rows()
    if not any(r.get("kind") in ("train", "val") for r in rows):
        return None
    return book.plot(path, title)


# the gallery's display windows (HU): lungs and bone in the wide one; the mediastinal soft-tissue window
# (W 400 / L 40) shows the heart's wall against its contrast-filled chambers, the vessels and the
# spine's outline, which the wide window compresses into a few grey levels
WIDE_WINDOW = (-1000.0, 1500.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def plot_gallery(cases: list[tuple[str, torch.Tensor, torch.Tensor]], hu_window, path: Path) -> Path:
    """Rows per case: target and prediction in the wide window, target and prediction in the soft-tissue
    window, |error| (HU); columns: axial, coronal, sagittal."""
    lo, hi = hu_window
    wide = (max(lo, WIDE_WINDOW[0]), min(hi, WIDE_WINDOW[1]))  # a readable display window
    soft = SOFT_TISSUE_WINDOW
    n = len(cases)
    per = 5
    fig, axes = plt.subplots(per * n, 3, figsize=(7.6, 2.4 * per * n), squeeze=False, layout="constrained")
    for c, (cid, pred, target) in enumerate(cases):
        p = unit_to_hu(pred.reshape(pred.shape[-3:]).float().cpu().numpy(), hu_window)
        t = unit_to_hu(target.reshape(target.shape[-3:]).float().cpu().numpy(), hu_window)
        ts, ps = orthogonal_slices(t), orthogonal_slices(p)
        win = lambda w: dict(cmap="gray", vmin=w[0], vmax=w[1])  # noqa: E731
        rows = [("target", ts, win(wide)), ("prediction", ps, win(wide)),
                ("target, soft tissue", ts, win(soft)), ("prediction, soft tissue", ps, win(soft)),
                ("|error| HU", orthogonal_slices(np.abs(p - t)), dict(cmap="magma", vmin=0, vmax=500))]
        for r, (label, sl, kw) in enumerate(rows):
            for j, plane in enumerate(PLANES):
                ax = axes[per * c + r, j]
                im = ax.imshow(sl[j], **kw)
                ax.set_title(f"{cid}: {label}, {plane}" if r == 0 else f"{label}, {plane}", fontsize=7)
                ax.axis("off")
            fig.colorbar(im, ax=axes[per * c + r, :], shrink=0.9)
    from x2ct_framework.safepaths import guard

    guard(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(guard(path), dpi=DPI)
    plt.close(fig)
    return path


def plot_samples(cases: list[dict], hu_window, path: Path) -> Path:
    """A generative model's gallery: rows per case: target, the regression it refines (the cascade's
    ``prev``, when there is one), one sample, the mean of the samples (wide window), and the per-voxel
    standard deviation of the samples (HU); columns: axial, coronal, sagittal."""
    lo, hi = hu_window
    wide = (max(lo, WIDE_WINDOW[0]), min(hi, WIDE_WINDOW[1]))
    rows_of = []
    for r in cases:
        rows = [("target", r["ct"]), ("regression", r.get("regression")), ("one sample", r["sample"]),
                ("mean of samples", r["pred"])]
        rows_of.append([(label, v) for label, v in rows if v is not None] + [("std of samples, HU", r["std"])])
    total = sum(len(rows) for rows in rows_of)
    fig, axes = plt.subplots(total, 3, figsize=(7.6, 2.4 * total), squeeze=False, layout="constrained")
    k = 0
    for r, rows in zip(cases, rows_of):
        for label, vol in rows:
            v = vol.reshape(vol.shape[-3:]).float().cpu().numpy()
            if label.startswith("std"):
                sl, kw = orthogonal_slices(v * (hi - lo)), dict(cmap="magma", vmin=0, vmax=200)
            else:
                sl, kw = orthogonal_slices(unit_to_hu(v, hu_window)), dict(cmap="gray", vmin=wide[0], vmax=wide[1])
            for j, plane in enumerate(PLANES):
                ax = axes[k, j]
                im = ax.imshow(sl[j], **kw)
                ax.set_title(f"{r['case_id']}: {label}, {plane}" if label == "target" else f"{label}, {plane}",
                             fontsize=7)
                ax.axis("off")
            fig.colorbar(im, ax=axes[k, :], shrink=0.9)
            k += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_structures(cid: str, pred: torch.Tensor, target: torch.Tensor, batch: dict, hu_window, path: Path) -> Path:
    """Per structure (rows) and plane (columns): the target with its reference region (green) and the
    prediction's thresholded structure (red) outlined."""
    from x2ct_framework.evaluation.metrics import LABELS, structure_masks, to_hu

    lo, hi = hu_window
    p, t = to_hu(pred[None].cpu(), hu_window), to_hu(target[None].cpu(), hu_window)
    b = {k: (v[None].cpu() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
         if k in ("labels", "spacing")}
    disp = (max(lo, WIDE_WINDOW[0]), min(hi, WIDE_WINDOW[1]))
    tv = t.reshape(t.shape[-3:]).numpy()
    fig, axes = plt.subplots(len(LABELS), 3, figsize=(7.2, 2.5 * len(LABELS)), squeeze=False)
    for r, s in enumerate(LABELS):
        pm, ref = structure_masks(p, t, b, s)
        pm, ref = pm.reshape(tv.shape).numpy(), ref.reshape(tv.shape).numpy()
        d, h, w = tv.shape
        # show the slice through the reference region's centre of mass where it has one
        if ref.any():
            cz, cy, cx = (int(round(float(np.mean(ix)))) for ix in np.nonzero(ref))
        else:
            cz, cy, cx = d // 2, h // 2, w // 2
        sl = [(tv[cz], ref[cz], pm[cz]), (tv[:, cy], ref[:, cy], pm[:, cy]),
              (tv[:, :, cx], ref[:, :, cx], pm[:, :, cx])]
        for j, (img, rm, prm) in enumerate(sl):
            ax = axes[r, j]
            ax.imshow(img, cmap="gray", vmin=disp[0], vmax=disp[1])
            if rm.any():
                ax.contour(rm.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            if prm.any():
                ax.contour(prm.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{s}, {PLANES[j]}", fontsize=7)
            ax.axis("off")
    return save_figure(fig, path, dpi=DPI, title=f"{cid}: reference (green) vs predicted (red) structures")


# ---- the report -------------------------------------------------------------------------------
def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _fmt(v: Any) -> str:
    if _finite(v):
        return f"{v:.4g}"
    return "n/a" if v is None or isinstance(v, float) else str(v)


def recipe_summary(recipe) -> list[str]:
    data, model, train = recipe["data"], recipe["model"], recipe["train"]
    opts = lambda t: ", ".join(f"{k} = {v!r}" for k, v in t.items() if k != "name") or "defaults"  # noqa: E731
    lines = ["## Recipe", "", f"- recipe: `{recipe.path}`"]
    if recipe.get("description"):
        lines.append(f"- description: {recipe['description']}")
    lines += [f"- seed: {recipe['seed']}",
              f"- data: `{data['name']}` ({opts(data)})",
              f"- model: `{model['name']}` ({opts(model)})",
              f"- train: batch size {train['batch_size']} x grad accum {train['grad_accum']}, mixed precision "
              f"{train['mixed_precision']}, start stage {train['start_stage']}"
              + (f", init from `{train['init_from']}`" if train.get("init_from") else ""), "",
              "| stage | resolution | epochs | lr -> min_lr | losses | select best |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(recipe["stages"]):
        losses = ", ".join(f"{k} x{v.get('weight', 1.0):g}" if isinstance(v, dict) else f"{k} x{v:g}"
                           for k, v in s.get("losses", {}).items()) or "-"
        lines.append(f"| {s.get('name') or f'stage{i + 1}'} | {s['resolution']}^3 | {s['epochs']} | "
                     f"{s.get('lr', 0):g} -> {s.get('min_lr', 0):g} | {losses} | `{s.get('select_best', '')}` |")
    return lines + [""]


def write_report(run_dir: str | Path, recipe=None, results: dict | None = None, *, device: str | torch.device = "auto",
                 evaluate_final: bool = True, failures: list[str] | None = None) -> Path:
    """Write ``run_dir/report.md`` and its pictures from what the run folder holds.

    A final evaluation that fails becomes a note in the report and, when ``failures`` is a list, an
    entry there (the end-of-run hook turns it into exit status 4).
    """
    from x2ct_framework import safepaths

    safepaths.refuse_outside_links(run_dir, "run folder")
    with safepaths.confined(run_dir):
        return _write_report(run_dir, recipe, results, device=device, evaluate_final=evaluate_final,
                             failures=failures)


def _write_report(run_dir, recipe, results, *, device, evaluate_final, failures) -> Path:
    from x2ct_framework.config.build import load_recipe_plugins, stages
    from x2ct_framework.config.recipe import load_recipe

    run_dir = Path(run_dir)
    if recipe is None:
        recipe = load_recipe(run_dir / "recipe.toml", run_folder=run_dir)  # data: plugins only when allowed
        load_recipe_plugins(recipe)
    pics = run_dir / PICTURES
    pics.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {recipe.name}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `{run_dir.resolve()}`. Every metric is named "
             f"`<protocol>/<metric>`; the protocols' conventions are listed under each table.", ""]
    env_path = run_dir / "environment.json"
    if env_path.is_file():
        try:
            env = json.loads(env_path.read_text())
            lines += [f"Environment: x2ct-framework {env.get('x2ct_framework')}, torch {env.get('torch')}, python "
                      f"{env.get('python')}, {env.get('processes')} process(es) on {env.get('device')}, "
                      f"mixed precision {env.get('mixed_precision')}.", ""]
        except json.JSONDecodeError:
            pass
    lines += recipe_summary(recipe)

    # per-stage curves and results
    all_stages = stages(recipe)
    lines += ["## Training", ""]
    trained = []
    for stage in all_stages:
        sdir = run_dir / stage.name
        book = Logbook(sdir)
        rows = book.rows()
        if not rows and not (sdir / "best").is_dir():
            lines += [f"### {stage.name}", "", "Not trained in this run folder.", ""]
            continue
        trained.append(stage)
        lines += [f"### {stage.name} ({stage.resolution}^3)", ""]
        # the trainer draws the stage's curves from the same log; draw them here only when it did not
        curve = sdir / "curves.png"
        if not curve.is_file():
            curve = plot_curves(book, pics / f"{stage.name}_curves.png", f"{stage.name}: {stage.resolution}^3")
        if curve is not None:
            lines += [f"![{stage.name} curves]({_rel(curve, run_dir)})", ""]
        final = (results or {}).get(stage.name) or next(
            ({k: v for k, v in r.items() if k.startswith("val/")} for r in reversed(rows)
             if any(k.startswith("val/") for k in r)), {})
        best_state = sdir / "best" / "state.json"
        best = {}
        if best_state.is_file():
            try:
                best = json.loads(best_state.read_text())
            except json.JSONDecodeError:
                best = {}
        if final:
            lines += ["| validation metric (last epoch) | value |", "|---|---|"]
            lines += [f"| `{k}` | {_fmt(v)} |" for k, v in final.items()] + [""]
        if best:
            sel = stage.options.get("select_best", "")
            lines += [f"Best checkpoint: epoch {best.get('epoch')}, `{sel}` = "
                      f"{_fmt(best.get('metrics', {}).get(sel))} (`{_rel(sdir / 'best', run_dir)}`).", ""]
        previews = sorted((sdir / "previews").glob("*.png")) if (sdir / "previews").is_dir() else []
        if previews:
            lines += [f"Last validation preview: ![{stage.name} preview]({_rel(previews[-1], run_dir)})", ""]

    # final evaluation
    if evaluate_final and trained:
        lines += final_evaluation(run_dir, recipe, trained[-1], pics, device, failures)
    from x2ct_framework.atomic import write_text

    write_text(run_dir / REPORT, "\n".join(lines).rstrip() + "\n")
    return run_dir / REPORT


def final_evaluation(run_dir: Path, recipe, stage, pics: Path, device, failures: list[str] | None = None) -> list[str]:
    """Score the last trained stage's best checkpoint and draw its gallery; problems become notes."""
    from x2ct_framework.evaluation import evaluate as ev_mod

    cfg = recipe["eval"]
    split = cfg["split"]
    ckpt = run_dir / stage.name / "best"
    lines = [f"## Final metrics: {stage.name} best checkpoint on the {split} split", ""]
    if not (ckpt / "model.safetensors").is_file():
        return lines + [f"No best checkpoint at `{ckpt}`; nothing to score.", ""]
    target = ev_mod.Target(recipe, stage, ckpt, run_dir)
    out = ev_mod.default_out_dir(target, split)
    try:
        ev = ev_mod.evaluate(target, split, cfg["protocols"], device=device, max_cases=cfg["max_cases"],
                             n_boot=cfg["bootstrap"], worst=cfg["worst_cases"], keep_first=cfg["gallery"],
                             out_dir=out, progress=False, lpips=cfg["lpips"])
    except (X2CTError, ValueError) as exc:
        print(f"report: the final evaluation failed: {exc}", file=sys.stderr)
        if failures is not None:
            failures.append(str(exc))
        return lines + [f"The final evaluation failed: {exc}", ""]
    lines += [f"{ev.info['cases']} cases, HU window {ev.info['hu_window']}; per-case values in "
              f"[{_rel(ev.files['per_case'], run_dir)}]({_rel(ev.files['per_case'], run_dir)}), aggregates in "
              f"[{_rel(ev.files['summary_json'], run_dir)}]({_rel(ev.files['summary_json'], run_dir)}). "
              f"Mean, sample std and 95% bootstrap interval over cases; n counts the cases where a metric is defined.",
              ""]
    for proto in ev.protocols:
        lines += [f"### Protocol `{proto.name}`", "", ev_mod.metric_table(ev, proto, ev_mod.TABLE_GROUPS), ""]
        if any(g == "structure" for g in proto.groups.values()):
            lines += ["Per-structure scores:", "", ev_mod.structure_table(ev, proto), ""]
        lines += ["<details><summary>conventions</summary>", ""] + [f"- {c}" for c in proto.conventions]
        lines += ["", "</details>", ""]
        for note in proto.notes:
            lines += [f"Note: {note}", ""]
    lines += [ln.replace("## Evaluator", "### Evaluator", 1) for ln in ev_mod.evaluator_lines(ev)]

    # gallery and structure overlays of the first cases (kept by the evaluation)
    first = [ev.kept[i] for i in sorted(ev.kept) if i < cfg["gallery"]]
    if first:
        hw = ev.info["hu_window"]
        gal = plot_gallery([(r["case_id"], r["pred"], r["ct"]) for r in first], hw, pics / "gallery.png")
        lines += ["## Slice gallery", "", f"Central slices of the first {len(first)} {split} case(s), in HU "
                  f"(target and prediction in the wide window {list(WIDE_WINDOW)} clipped to the data's, then in the "
                  f"soft-tissue window {list(SOFT_TISSUE_WINDOW)}; last row |error|).", "",
                  f"![gallery]({_rel(gal, run_dir)})", ""]
        if "sample" in first[0]:
            sam = plot_samples(first, hw, pics / "samples.png")
            lines += ["## Samples", "", f"The generative stage: regression (the stage it refines), one sample, the "
                      f"mean of {ev.info['samples']} samples (scored above) and their per-voxel standard deviation "
                      f"(HU). A sample is one CT that fits the X-rays, not the most likely one.", "",
                      f"![samples]({_rel(sam, run_dir)})", ""]
            lines += ev_mod.generative_lines(ev)
        r = first[0]
        st = plot_structures(r["case_id"], r["pred"], r["ct"], r, hw, pics / "structures.png")
        lines += ["## Structures", "", "Reference regions (labels, else HU thresholds) in green, the prediction's "
                  "HU-thresholded structures in red, through each region's centre.", "",
                  f"![structures]({_rel(st, run_dir)})", ""]
    return lines + ev_mod.worst_cases_lines(ev, lambda picture: _rel(picture, run_dir))


@hookimpl(trylast=True)
def on_run_end(trainer, results):
    """Write runs/<name>/report.md after the last stage (main process only)."""
    from x2ct_framework.plugins import plugin_file

    recipe = trainer.recipe
    if not recipe["eval"]["report"]:
        return
    device = getattr(getattr(trainer, "accelerator", None), "device", "auto")
    failures: list[str] = []
    path = write_report(trainer.run_dir, recipe, results, device=device, failures=failures)
    if hasattr(trainer, "print"):
        trainer.print(f"report: {path.resolve()}")
    if failures:
        run_dir = trainer.run_dir
        raise FinalEvaluationError(
            f"training finished and its checkpoints are saved in {run_dir}, but the final evaluation on the "
            f"{recipe['eval']['split']} split failed: {failures[0]}\nFix that, then score the run and rewrite its "
            f"report with:\n  python -m x2ct_framework.evaluation.report {run_dir}"
            + (" --plugins " + " ".join(str(plugin_file(p, recipe.plugins_dir) or p) for p in recipe["plugins"])
               if recipe["plugins"] else ""))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from x2ct_framework.plugins import add_trust_arguments, apply_trust_arguments
    from x2ct_framework.run import report_errors

    p = argparse.ArgumentParser(prog="python -m x2ct_framework.evaluation.report",
                                description="write runs/<name>/report.md again")
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")
    add_trust_arguments(p)
    args = p.parse_args(argv)

    def go(a):
        apply_trust_arguments(a)
        if not (Path(a.run_dir) / "recipe.toml").is_file():
            from x2ct_framework.errors import DataError

            raise DataError(f"{a.run_dir}: not a run folder (no recipe.toml)")
        failures: list[str] = []
        print(write_report(a.run_dir, device=a.device, failures=failures))
        return FinalEvaluationError.exit_code if failures else 0

    return report_errors(go, args)


if __name__ == "__main__":
    sys.exit(main())

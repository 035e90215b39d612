"""The built-in evaluators (``pe_detectability``, ``organ_consistency``, ``distribution``) and segmenters
(``labels``, ``totalsegmentator``), registered through ``register_evaluators`` / ``register_segmenters``
(this module is the core plugin ``evaluators``).

- ``pe_detectability``: would a clinician's classifier find the pulmonary emboli in the generated CT?
  A small 3D CNN trained on the training split's real CTs (the reference arm, cached on disk under a
  key of the data, the recipe and its own options) scores the split's real and generated volumes; a
  small 2D CNN on the input X-rays alone is the third arm. AUC per arm with patient-level bootstrap
  intervals, the paired AUC difference generated - real, and sensitivity/specificity at the real-CT
  arm's operating point (Youden's threshold on the real arm).
- ``organ_consistency``: a segmenter segments target and prediction; per structure the Dice, the volume
  error and the mean-HU error over the reference region.
- ``distribution``: FID and KID between generated and real volumes over 3D features and 2.5D features
  (orthogonal slices), statistics by torch-fidelity (``fid3d``/``kid3d``'s code).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.conventions import LABEL_NAMES
from x2ct_framework.errors import DataError, PluginError
from x2ct_framework.evaluation.evaluators import (EvaluationContext, Evaluator, EvaluatorResult, EvaluatorSkipped,
                                                 batch_column, bootstrap_mean, case_ids_of, cluster_weights, data_key,
                                                 percentile_interval, roc_auc, summary_entry, weighted_auc,
                                                 youden_threshold)
from x2ct_framework.evaluation.sharpness_metrics import RandomFeatures
from x2ct_framework.hookspecs import hookimpl

CLASSIFIER_VERSION = 1  # bump when the built-in classifiers or their training change: the cache is retrained
CTPA_WINDOW = (-100.0, 500.0)  # HU shown to the volume classifier: clot (20-80 HU) against enhanced blood (250-450)


def _to_hu(x01: torch.Tensor, hu_window: Sequence[float]) -> torch.Tensor:
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return x01.float() * (hi - lo) + lo


def _window(x01: torch.Tensor, hu_window: Sequence[float], window: Sequence[float]) -> torch.Tensor:
    """A volume on the recipe's [0, 1] scale shown in ``window`` (HU), scaled to [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    return ((_to_hu(x01, hu_window) - lo) / (hi - lo)).clamp(0, 1)


# ---- the classifiers ----------------------------------------------------------------------------
class VolumeClassifier(nn.Module):
    """A small 3D CNN: three 3x3x3 convolutions (``width``, 2x, 4x channels) with ReLU, max pooling between
    them, then global max and mean pooling and a linear layer to one logit. Max pooling keeps a small focal
    finding (a clot) visible in the global feature."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv3d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, ceil_mode=True),
            nn.Conv3d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2, ceil_mode=True),
            nn.Conv3d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return self.head(torch.cat([f.amax((2, 3, 4)), f.mean((2, 3, 4))], 1))[:, 0]


class XrayClassifier(nn.Module):
    """A small 2D CNN on the input views stacked as channels ``[B, V, H, W]``, built as :class:`VolumeClassifier`."""

    def __init__(self, views: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv2d(views, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], 1))[:, 0]


def train_classifier(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                     batch_size: int, seed: int, flip_dims: Sequence[int] = ()) -> list[float]:
    """Train ``net`` on ``inputs`` ``[N, ...]`` and 0/1 ``labels`` with class-balanced binary cross-entropy
    (Adam, seeded order and flips): returns the mean loss of each epoch."""
    y = labels.float()
    pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - pos) / pos if pos > 0 else 1.0)
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for _ in range(int(epochs)):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            x = inputs[idx]
            for d in flip_dims:  # mirror half of the batch along d (the anatomy's left-right)
                flip = torch.rand(len(idx), generator=g) < 0.5
                if flip.any():
                    x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(d), x)
            loss = F.binary_cross_entropy_with_logits(net(x), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    net.eval()
    return losses


def load_callable(spec: str, what: str) -> Any:
    """``"package.module:factory"`` or ``"path/to/file.py:factory"``: the factory called with no arguments;
    a ``.pt``/``.pth`` path: a TorchScript module (``torch.jit.load``)."""
    if spec.endswith((".pt", ".pth", ".ts")) and ":" not in Path(spec).name:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"{what}: {path} not found (a TorchScript file saved with torch.jit.save)")
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise DataError(f"{what}: {path} is not a TorchScript module: {type(exc).__name__}: {exc}") from exc
    mod, _, attr = spec.rpartition(":")
    if not mod or not attr:
        raise ValueError(f"{what}: expected 'package.module:factory', 'file.py:factory' or a TorchScript .pt file, "
                         f"got {spec!r}")
    try:
        if mod.endswith(".py"):
            path = Path(mod).expanduser().resolve()
            if not path.is_file():
                raise DataError(f"{what}: {path} not found")
            name = f"x2ct_user_{path.stem}"
            spec_ = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{what}: {spec!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    made = factory()
    if not callable(made):
        raise PluginError(f"{what}: {spec!r} returned {type(made).__name__}, which is not callable")
    return made


# ---- pe_detectability ---------------------------------------------------------------------------
PE_CONVENTIONS = [
    "arms: real CT (the split's target volumes) and generated CT (the model's) scored by one 3D classifier trained "
    "on the training split's real CTs (the reference arm); X-ray alone: a 2D classifier trained on the training "
    "split's input views",
    "volumes shown to the 3D classifier in the CTPA window [-100, 500] HU (clot 20-80 HU against enhanced blood "
    "250-450 HU) unless `window` says otherwise; the classifier never saw a generated volume",
    "auc: area under the ROC curve (Mann-Whitney, ties counted half); 95% interval: percentile bootstrap over "
    "patients (cases of one patient resampled together), the same resamples for every arm so the difference "
    "generated - real is paired",
    "operating point: Youden's threshold (max sensitivity + specificity - 1) of the real-CT arm on this split; the "
    "generated arm is read at the same threshold (the same classifier), the X-ray arm at its own Youden threshold",
]


class PEDetectability(Evaluator):
    """Pulmonary-embolism detectability of generated CT against real CT and the X-rays alone (module docstring).

    Options: ``label`` (the study column, default ``pe_present``; ``negate`` for a column such as RSPECT's
    ``negative_exam_for_pe``), ``patient`` (a study column grouping cases of one patient; default the case),
    ``classifier`` ("" = train the built-in one; a TorchScript ``.pt`` file, ``module:factory`` or
    ``file.py:factory`` giving a callable ``volume [B, 1, D, H, W] in [0, 1] -> score [B]``, higher = PE),
    ``xray_arm`` (train and score the X-ray classifier), ``window`` (HU shown to the built-in classifier),
    ``epochs``, ``lr``, ``batch_size``, ``width``, ``seed``, ``max_train_cases`` (0 = the whole training
    split), ``bootstrap`` (resamples; 0 = the evaluation's), ``cache`` and ``cache_dir`` (default the
    framework's cache folder).
    """

    def __init__(self, label: str = "pe_present", negate: bool = False, patient: str = "patient_id",
                 classifier: str = "", xray_arm: bool = True, window: list[float] = CTPA_WINDOW, epochs: int = 40,
                 lr: float = 2e-3, batch_size: int = 8, width: int = 8, seed: int = 0, max_train_cases: int = 0,
                 bootstrap: int = 0, cache: bool = True, cache_dir: str = "", train_split: str = "train"):
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"window must be [low, high] HU with low < high, got {window!r}")
        if epochs < 1 or batch_size < 1 or width < 1 or lr <= 0:
            raise ValueError("epochs, batch_size and width must be >= 1 and lr > 0")
        self.label, self.negate, self.patient = label, bool(negate), patient
        self.classifier_spec, self.xray_arm = classifier, bool(xray_arm)
        self.window = (float(window[0]), float(window[1]))
        self.train_options = {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
                              "width": int(width), "seed": int(seed), "max_train_cases": int(max_train_cases),
                              "window": list(self.window), "label": label, "negate": self.negate,
                              "train_split": train_split, "version": CLASSIFIER_VERSION}
        self.bootstrap, self.cache = int(bootstrap), bool(cache)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.train_split = train_split
        self.volume_net: Any = None
        self.xray_net: nn.Module | None = None
        self.notes: list[str] = []

    # -- training or loading ------------------------------------------------------------------
    def check(self, context: EvaluationContext) -> None:
        """What ``x2ct validate`` asks before a run: the training split's first case carries the label."""
        if self.classifier_spec and not self.xray_arm:
            return
        dataset = context.other_split(self.train_split)
        self._labels_of(dataset[0], f"case 0 of the {self.train_split} split")

    def start(self, context: EvaluationContext) -> None:
        self.context = context
        self.rows: dict[str, list] = {"case": [], "group": [], "label": [], "real": [], "generated": [], "xray": []}
        if self.classifier_spec:
            self.volume_net = load_callable(self.classifier_spec, "pe_detectability.classifier")
            self.notes.append(f"real and generated arms scored by the user's classifier {self.classifier_spec!r}")
        if self.classifier_spec and not self.xray_arm:
            return
        self._train_or_load()

    def _labels_of(self, item: dict, where: str) -> float:
        values = batch_column(item, self.label, 1)
        if values is None:
            raise DataError(
                f"pe_detectability: {where} has no study label {self.label!r} (item['study'][{self.label!r}]); give "
                f"the data per-case study labels (synthetic_phantom: pe_fraction > 0; ct_folder: study_labels = "
                f"\"labels.csv\") or set [eval.evaluator_options.pe_detectability] label to one of its columns")
        v = float(values[0])
        return 1.0 - v if self.negate else v

    def _train_or_load(self) -> None:
        ctx = self.context
        key = data_key(ctx.data_key, self.train_options, ctx.resolution, list(ctx.hu_window))
        folder = (self.cache_dir or (ctx.cache_dir or _default_cache())) / "pe_detectability" / key
        want_volume = not self.classifier_spec
        if self.cache and (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            from safetensors.torch import load_file

            if want_volume:
                self.volume_net = VolumeClassifier(self.train_options["width"])
                self.volume_net.load_state_dict(load_file(str(folder / "volume.safetensors")))
                self.volume_net.eval()
            if self.xray_arm:
                self.xray_net = XrayClassifier(meta["views"], 2 * self.train_options["width"])
                self.xray_net.load_state_dict(load_file(str(folder / "xray.safetensors")))
                self.xray_net.eval()
            self.meta = meta
            self.notes.append(f"classifiers loaded from the cache {folder} (trained on {meta['train_cases']} "
                              f"{self.train_split} cases, {meta['train_positive']} with PE)")
            return
        dataset = ctx.other_split(self.train_split)
        n = len(dataset) if not self.train_options["max_train_cases"] else min(len(dataset),
                                                                                 self.train_options["max_train_cases"])
        vols, xrays, labels = [], [], []
        for i in range(n):
            item = dataset[i]
            labels.append(self._labels_of(item, f"case {i} of the {self.train_split} split"))
            vols.append(_window(item["ct"].float(), ctx.hu_window, self.window))
            xrays.append(item["xrays"].float()[:, 0])
        y = torch.tensor(labels)
        if y.sum() == 0 or y.sum() == len(y):
            raise DataError(f"pe_detectability: the {self.train_split} split's {n} cases are all "
                            f"{'positive' if y.sum() else 'negative'} for {self.label!r}; the classifier needs both "
                            f"classes (synthetic_phantom: pe_fraction between 0 and 1)")
        t0 = time.perf_counter()
        opts = self.train_options
        meta: dict[str, Any] = {"train_cases": n, "train_positive": int(y.sum()), "options": opts,
                                "data_key": ctx.data_key, "resolution": ctx.resolution, "views": int(xrays[0].shape[0])}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts["seed"])
            if want_volume:
                self.volume_net = VolumeClassifier(opts["width"])
                x = torch.stack(vols)
                meta["volume_loss"] = train_classifier(self.volume_net, x, y, epochs=opts["epochs"], lr=opts["lr"],
                                                       batch_size=opts["batch_size"], seed=opts["seed"],
                                                       flip_dims=(4,))
                with torch.no_grad():
                    meta["volume_train_auc"] = roc_auc(y.numpy(), self.volume_net(x).numpy())
            if self.xray_arm:
                self.xray_net = XrayClassifier(meta["views"], 2 * opts["width"])
                xr = torch.stack(xrays)
                meta["xray_loss"] = train_classifier(self.xray_net, xr, y, epochs=opts["epochs"], lr=opts["lr"],
                                                     batch_size=opts["batch_size"], seed=opts["seed"] + 1)
                with torch.no_grad():
                    meta["xray_train_auc"] = roc_auc(y.numpy(), self.xray_net(xr).numpy())
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        self.meta = meta
        self.notes.append(f"classifiers trained on {n} {self.train_split} cases ({int(y.sum())} with PE) in "
                          f"{meta['seconds']} s; training-split AUC: volume "
                          f"{meta.get('volume_train_auc', math.nan):.3f}, "
                          f"X-ray {meta.get('xray_train_auc', math.nan):.3f}")
        if self.cache:
            self._save(folder, meta)

    def _save(self, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        from x2ct_framework.atomic import atomic_path, write_text

        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self.volume_net, VolumeClassifier):
            with atomic_path(folder / "volume.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in self.volume_net.state_dict().items()}, str(tmp))
        if self.xray_net is not None:
            with atomic_path(folder / "xray.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in self.xray_net.state_dict().items()}, str(tmp))
        write_text(folder / "meta.json", json.dumps(meta, indent=2))  # last: its presence marks a complete entry
        self.notes.append(f"classifiers cached in {folder}")

    # -- scoring ------------------------------------------------------------------------------
    def _score(self, volume01: torch.Tensor) -> torch.Tensor:
        if isinstance(self.volume_net, VolumeClassifier):
            self.volume_net.to(volume01.device)
            return self.volume_net(_window(volume01, self.context.hu_window, self.window)).float().cpu()
        out = self.volume_net(volume01.float())
        return torch.as_tensor(out).float().reshape(-1).cpu()

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
        b = pred.shape[0]
        labels = batch_column(batch, self.label, b)
        if labels is None:
            raise DataError(f"pe_detectability: the {self.context.split} split has no study label {self.label!r} "
                            f"(batch['study'][{self.label!r}]); give the data per-case study labels "
                            f"(synthetic_phantom: pe_fraction > 0; ct_folder: study_labels)")
        cases = case_ids_of(batch, len(self.rows["case"]), b)
        groups = batch_column(batch, self.patient, b) or cases
        self.rows["case"] += cases
        self.rows["group"] += [str(g) for g in groups]
        self.rows["label"] += [1.0 - float(v) if self.negate else float(v) for v in labels]
        self.rows["real"] += self._score(target).tolist()
        self.rows["generated"] += self._score(pred).tolist()
        if self.xray_net is not None:
            self.xray_net.to(pred.device)
            self.rows["xray"] += self.xray_net(batch["xrays"].float()[:, :, 0]).float().cpu().tolist()
        else:
            self.rows["xray"] += [math.nan] * b

    def result(self) -> EvaluatorResult:
        r = self.rows
        y = np.asarray(r["label"])
        n = len(y)
        n_boot = self.bootstrap or self.context.n_boot or 1000
        w = cluster_weights(r["group"], n_boot, seed=self.context.seed)
        arms = {"real": np.asarray(r["real"]), "generated": np.asarray(r["generated"]), "xray": np.asarray(r["xray"])}
        summary: dict[str, dict] = {}
        notes = list(self.notes)
        pos = int((y > 0.5).sum())
        if pos == 0 or pos == n:
            notes.append(f"the {self.context.split} split has only {'positive' if pos else 'negative'} cases: no AUC")
        boots = {}
        arm_names = {"real": "real CT (reference arm)", "generated": "generated CT", "xray": "X-ray alone"}
        for arm, s in arms.items():
            if not np.isfinite(s).all():
                continue
            boots[arm] = weighted_auc(y, s, w)
            summary[f"auc_{arm}"] = summary_entry(roc_auc(y, s), percentile_interval(boots[arm]), n,
                                                  note=arm_names[arm])
        if "real" in boots and "generated" in boots:
            diff = summary["auc_generated"]["value"] - summary["auc_real"]["value"]
            summary["auc_generated_minus_real"] = summary_entry(
                diff, percentile_interval(boots["generated"] - boots["real"]), n, higher_is_better=None,
                note="paired over the same bootstrap resamples")
        t_real = youden_threshold(y, arms["real"])
        for arm, t in (("real", t_real), ("generated", t_real),
                       ("xray", youden_threshold(y, arms["xray"]) if "xray" in boots else math.nan)):
            if not math.isfinite(t):
                continue
            hit = (arms[arm] >= t).astype(np.float64)
            for what, mask, val in (("sensitivity", y > 0.5, hit), ("specificity", y <= 0.5, 1 - hit)):
                wm = w[:, mask]
                with np.errstate(invalid="ignore", divide="ignore"):
                    b = (wm * val[mask]).sum(1) / wm.sum(1)
                summary[f"{what}_{arm}"] = summary_entry(
                    float(val[mask].mean()), percentile_interval(b), int(mask.sum()),
                    note=f"threshold {t:.4g} ({'the real-CT arm' if arm != 'xray' else 'its own'} Youden point)")
        notes.append(f"{n} cases ({pos} with {self.label}{' negated' if self.negate else ''}), "
                     f"{len(set(r['group']))} patients; {n_boot} patient-level bootstrap resamples")
        per_case = {"label": y, "score_real": arms["real"], "score_generated": arms["generated"],
                    "score_xray": arms["xray"]}
        return EvaluatorResult(per_case=per_case, summary=summary, conventions=list(PE_CONVENTIONS), notes=notes)


def _default_cache() -> Path:
    from x2ct_framework.cachedir import default_cache_dir

    return default_cache_dir() / "evaluators"


# ---- segmenters ---------------------------------------------------------------------------------
class LabelMapSegmenter:
    """The dataset's label map (``batch["labels"]``, framework codes) segments the target. The prediction has no
    label map: a voxel of it belongs to structure s when it lies within ``margin`` voxels of s's reference region
    and its HU falls within s's HU range in the target (the ``percentiles`` of the target's HU inside s); a voxel
    claimed by several structures goes to the one whose target mean HU is nearest. It scores whether each
    structure appears where it should with the intensity it should, not an independent segmentation."""

    names = dict(LABEL_NAMES)

    def __init__(self, margin: int = 1, percentiles: list[float] = (5.0, 95.0)):
        if margin < 0:
            raise ValueError(f"margin must be >= 0 voxels, got {margin}")
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must be [low, high] within [0, 100], got {percentiles!r}")
        self.margin, self.percentiles = int(margin), (float(percentiles[0]), float(percentiles[1]))

    def __call__(self, pred_hu: torch.Tensor, target_hu: torch.Tensor, batch: dict):
        labels = batch.get("labels")
        if labels is None:
            raise DataError("segmenter 'labels': the data carries no label maps (batch['labels']); choose a "
                            "segmenter that segments the CT itself (totalsegmentator, or a plugin's)")
        labels = labels.to(pred_hu.device).reshape(pred_hu.shape).long()
        out = torch.zeros_like(labels)
        q = torch.tensor([self.percentiles[0] / 100, self.percentiles[1] / 100], dtype=torch.float64)
        for i in range(pred_hu.shape[0]):
            best = torch.full(pred_hu[i].shape, math.inf, device=pred_hu.device)
            for code in labels[i].unique().tolist():
                if code == 0:
                    continue
                region = labels[i] == code
                values = target_hu[i][region].double().cpu()
                lo, hi = torch.quantile(values, q).tolist()
                near = region.float()
                if self.margin:
                    near = F.max_pool3d(near[None], 2 * self.margin + 1, stride=1, padding=self.margin)[0]
                cand = (near > 0) & (pred_hu[i] >= lo) & (pred_hu[i] <= hi)
                dist = torch.where(cand, (pred_hu[i] - float(values.mean())).abs(), torch.full_like(best, math.inf))
                take = dist < best
                out[i][take] = code
                best = torch.where(take, dist, best)
        return out, labels


TOTALSEG_INSTALL = ("TotalSegmentator is not installed: pip install TotalSegmentator (it brings nnU-Net); its weights "
                    "are downloaded by `totalseg_download_weights -t total` into $TOTALSEG_HOME_DIR/nnunet/results "
                    "(default ~/.totalsegmentator/nnunet/results); on an offline machine copy that folder there")


class TotalSegmentatorSegmenter:
    """TotalSegmentator (``task``, ``fast`` = its 3 mm model) segments target and prediction independently; its
    classes are grouped into the framework's codes by the ``totalsegmentator`` label preset (lung lobes -> lung,
    great vessels -> vessel, heart, bones). Needs the package and its weights in its cache: otherwise the factory
    raises EvaluatorSkipped saying what to install and where the weights go."""

    names = dict(LABEL_NAMES)

    def __init__(self, task: str = "total", fast: bool = True, device: str = "cpu"):
        if importlib.util.find_spec("totalsegmentator") is None:
            raise EvaluatorSkipped(TOTALSEG_INSTALL)
        try:
            from totalsegmentator.config import get_weights_dir
        except Exception as exc:
            raise EvaluatorSkipped(f"TotalSegmentator is installed but does not import: {type(exc).__name__}: {exc}; "
                                   f"{TOTALSEG_INSTALL}") from exc
        weights = Path(get_weights_dir())
        found = sorted(p.name for p in weights.glob("Dataset*")) if weights.is_dir() else []
        wanted = "Dataset297" if fast else "Dataset29"
        if not any(f.startswith(wanted) for f in found):
            raise EvaluatorSkipped(f"TotalSegmentator's weights for task {task!r}{' (fast)' if fast else ''} are not "
                                   f"in {weights} (found: {', '.join(found) or 'nothing'}); run "
                                   f"`totalseg_download_weights -t {task}{'_fast' if fast else ''}` on a machine "
                                   f"online and copy {weights} here")
        self.task, self.fast, self.device = task, bool(fast), device

    def _one(self, hu: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        import nibabel as nib
        from totalsegmentator.python_api import totalsegmentator

        from x2ct_framework.labels import label_mapping

        img = nib.Nifti1Image(hu[0].cpu().numpy().astype(np.float32), np.diag([*map(float, spacing), 1.0]))
        seg = totalsegmentator(img, None, ml=True, fast=self.fast, task=self.task, device=self.device, quiet=True)
        ids = torch.from_numpy(np.asarray(seg.dataobj).astype(np.int64))
        return label_mapping("totalsegmentator").apply(ids, hu[0].cpu()).long()[None]

    def __call__(self, pred_hu: torch.Tensor, target_hu: torch.Tensor, batch: dict):
        spacing = batch.get("spacing")
        outs_p, outs_t = [], []
        for i in range(pred_hu.shape[0]):
            sp = spacing[i].tolist() if isinstance(spacing, torch.Tensor) else [1.0, 1.0, 1.0]
            outs_p.append(self._one(pred_hu[i], sp))
            outs_t.append(self._one(target_hu[i], sp))
        return torch.stack(outs_p).to(pred_hu.device), torch.stack(outs_t).to(pred_hu.device)


# ---- organ_consistency --------------------------------------------------------------------------
ORGAN_CONVENTIONS = [
    "dice: 2|P & T| / (|P| + |T|) of the segmenter's structure in the prediction (P) and in the target (T); NaN "
    "when both are empty",
    "volume_error_pct: 100 (|P| - |T|) / |T|; NaN when T is empty",
    "hu_error: mean over the target's region T of (prediction - target) in HU (signed; the intensity bias inside "
    "the structure)",
    "summary: mean over cases with a 95% percentile bootstrap interval over cases; abs_ numbers average the "
    "absolute per-case errors",
]


class OrganConsistency(Evaluator):
    """Per-structure agreement of the prediction with the target under a segmenter (``segmenter``: a registered
    segmenter's name, ``segmenter_options`` its options); ``structures`` limits the structures scored (names of
    the segmenter's ``names``; default every structure present except background, air and the table)."""

    SKIP = ("background", "air", "table")

    def __init__(self, segmenter: str = "labels", segmenter_options: dict | None = None,
                 structures: list[str] = (), bootstrap: int = 0):
        from x2ct_framework.plugins import get_plugin_manager

        reg = get_plugin_manager().registry("segmenter")
        self.segmenter_name = segmenter
        self.segmenter = reg.create(segmenter, segmenter_options or {},
                                    where="organ_consistency -> segmenter_options")  # EvaluatorSkipped passes through
        if not callable(self.segmenter):
            raise PluginError(f"segmenter {segmenter!r} ({reg.get(segmenter).source}) built a "
                              f"{type(self.segmenter).__name__}, which is not callable")
        self.names = dict(getattr(self.segmenter, "names", LABEL_NAMES))
        unknown = [s for s in structures if s not in self.names.values()]
        if unknown:
            raise ValueError(f"structures {unknown} are not among segmenter {segmenter!r}'s "
                             f"({', '.join(self.names.values())})")
        self.structures = list(structures)
        self.bootstrap = int(bootstrap)

    def start(self, context: EvaluationContext) -> None:
        self.context = context
        self.cols: dict[str, dict[int, float]] = {}
        self.n = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
        hw = self.context.hu_window
        p_hu, t_hu = _to_hu(pred, hw), _to_hu(target, hw)
        p_lab, t_lab = self.segmenter(p_hu, t_hu, batch)
        p_lab = torch.as_tensor(p_lab).reshape(pred.shape).long()
        t_lab = torch.as_tensor(t_lab).reshape(pred.shape).long()
        for i in range(pred.shape[0]):
            codes = set(t_lab[i].unique().tolist()) | set(p_lab[i].unique().tolist())
            for code in sorted(codes):
                name = self.names.get(code, f"label{code}")
                if (self.structures and name not in self.structures) or (not self.structures and name in self.SKIP):
                    continue
                pm, tm = p_lab[i] == code, t_lab[i] == code
                sp, st = int(pm.sum()), int(tm.sum())
                inter = int((pm & tm).sum())
                dice = 2 * inter / (sp + st) if sp + st else math.nan
                vol = 100.0 * (sp - st) / st if st else math.nan
                hu = float((p_hu[i][tm] - t_hu[i][tm]).mean()) if st else math.nan
                for col, v in ((f"{name}_dice", dice), (f"{name}_volume_error_pct", vol), (f"{name}_hu_error", hu)):
                    self.cols.setdefault(col, {})[self.n + i] = v
        self.n += pred.shape[0]

    def result(self) -> EvaluatorResult:
        n = self.n
        per_case = {c: np.array([v.get(i, math.nan) for i in range(n)]) for c, v in sorted(self.cols.items())}
        w = cluster_weights(range(n), self.bootstrap or self.context.n_boot or 1000, seed=self.context.seed)
        summary = {}
        for col, vals in per_case.items():
            unit = "" if col.endswith("_dice") else "%" if col.endswith("_pct") else "HU"
            hib = True if col.endswith("_dice") else None
            mean, ci, k = bootstrap_mean(vals, w)
            summary[col] = summary_entry(mean, ci, k, unit, hib)
            if not col.endswith("_dice"):
                mean, ci, k = bootstrap_mean(np.abs(vals), w)
                summary[f"abs_{col}"] = summary_entry(mean, ci, k, unit, False)
        notes = [f"segmenter {self.segmenter_name!r}: {(type(self.segmenter).__doc__ or '').split('.')[0].strip()}"]
        return EvaluatorResult(per_case=per_case, summary=summary, conventions=list(ORGAN_CONVENTIONS), notes=notes)


# ---- distribution -------------------------------------------------------------------------------
class RandomFeatures2D(RandomFeatures):
    """The slice counterpart of ``fid3d``'s ``RandomFeatures3D``: :class:`RandomFeatures` over two axes (a seeded
    random-initialised 2D CNN, 256 features)."""

    def __init__(self, seed: int = 0, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__(2, seed, channels)


R3D_MEAN, R3D_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)  # Kinetics-400 normalisation


class R3D18Features(nn.Module):
    """torchvision's ``r3d_18`` (Kinetics-400 weights) as a 3D feature extractor: the volume repeated to three
    channels, normalised as its training clips, the 512 features before its classifier. The weights come from
    torch's hub cache (``<torch.hub.get_dir()>/checkpoints/r3d_18-b3b3357e.pth``, downloaded there when the
    machine is online); :func:`r3d18_weights_file` says where."""

    def __init__(self):
        super().__init__()
        from torchvision.models.video import R3D_18_Weights, r3d_18

        self.net = r3d_18(weights=R3D_18_Weights.KINETICS400_V1)
        self.net.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor(R3D_MEAN).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(R3D_STD).view(1, 3, 1, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.expand(-1, 3, -1, -1, -1) - self.mean) / self.std)


def r3d18_weights_file() -> Path:
    from torchvision.models.video import R3D_18_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(R3D_18_Weights.KINETICS400_V1.url).name


def distribution_extractor(extractor: str, weights: str | None, seed: int) -> tuple[nn.Module, str, list[str]]:
    """The 3D extractor of ``distribution``: ``(module, name, notes)``. ``"r3d_18"`` needs its weights in the hub
    cache (an error says where otherwise); ``"auto"`` takes ``r3d_18`` when its weights are there, else the seeded
    random 3D CNN, and says which; anything else is ``fid3d``'s ``build_extractor``."""
    from x2ct_framework.evaluation.sharpness_metrics import build_extractor

    if extractor in ("r3d_18", "auto"):
        file = r3d18_weights_file()
        if file.is_file():
            return R3D18Features(), "r3d_18 (Kinetics-400)", []
        if extractor == "r3d_18":
            raise DataError(f"distribution: r3d_18's weights are not at {file}; run torchvision.models.video.r3d_18("
                            f"weights='KINETICS400_V1') once on a machine online, or copy r3d_18-b3b3357e.pth there")
        return (build_extractor("random3d", None, seed), "random3d",
                [f"extractor auto: r3d_18's weights are not at {file}, so a seeded random 3D CNN gives the features"])
    return build_extractor(extractor, weights, seed), extractor, []


def orthogonal_slices(volumes: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced slices along each of the three axes: ``[B, 3 * count, 1, H, W]`` (a cube)."""
    d = volumes.shape[-1]
    idx = torch.linspace(0, d - 1, count + 2)[1:-1].round().long().tolist()
    v = volumes[:, 0]
    parts = [v[:, i][:, None] for i in idx] + [v[:, :, i][:, None] for i in idx] + [v[:, :, :, i][:, None] for i in idx]
    return torch.cat(parts, 1)[:, :, None]


DIST_CONVENTIONS = [
    "fid3d, kid3d: Frechet and kernel inception distances between the generated and the real volumes of the split, "
    "on 3D features of the extractor (default a seeded random-initialised 3D CNN); statistics by torch-fidelity",
    "fid25d, kid25d: the same on 2D features of `slices` evenly spaced slices per axis (2.5D), each slice one sample",
    "kid: unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (torch-fidelity); it is the "
    "MMD of the set",
    "95% interval: percentile bootstrap over cases (the generated and real volume of a case drawn together); a "
    "resample repeats cases, which inflates FID, so the interval shows the spread and may lie above the value",
    "0 = the same feature distribution; lower is better; comparable only with the same extractor and seed",
]


class Distribution(Evaluator):
    """FID/KID between generated and real volumes of the split (3D and 2.5D features). ``extractor``: "random3d"
    (default, a seeded random 3D CNN), "r3d_18" (torchvision's, pretrained; its weights must be in the hub cache),
    "auto" (r3d_18 when its weights are there, else random3d, said in the notes) or "package.module:factory"
    with ``weights`` a state-dict file."""

    def __init__(self, extractor: str = "random3d", weights: str | None = None, extractor_seed: int = 0,
                 slices: int = 8, bootstrap: int = 100, kid_subsets: int = 100, kid_subset_size: int = 1000):
        from x2ct_framework.evaluation.sharpness_metrics import _fidelity

        try:
            _fidelity()
        except PluginError as exc:
            raise EvaluatorSkipped(str(exc)) from exc
        if slices < 1 or bootstrap < 0:
            raise ValueError("slices must be >= 1 and bootstrap >= 0")
        self.extractor3d, self.extractor_name, self.extractor_notes = distribution_extractor(extractor, weights,
                                                                                             extractor_seed)
        self.extractor2d = RandomFeatures2D(extractor_seed)
        self.random = self.extractor_name == "random3d" and not weights
        self.slices, self.bootstrap = int(slices), int(bootstrap)
        self.kid_subsets, self.kid_subset_size, self.seed = int(kid_subsets), int(kid_subset_size), int(extractor_seed)

    def start(self, context: EvaluationContext) -> None:
        self.context = context
        self.feats: dict[str, list[torch.Tensor]] = {"pred3": [], "real3": [], "pred2": [], "real2": []}

    def _features(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.extractor3d.to(v.device)
        self.extractor2d.to(v.device)
        f3 = self.extractor3d(v.float()).double().cpu()
        s = orthogonal_slices(v.float(), self.slices)
        b, k = s.shape[:2]
        f2 = self.extractor2d(s.flatten(0, 1)).double().cpu().reshape(b, k, -1)
        return f3, f2

    def update(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
        for key, v in (("pred", pred), ("real", target.clamp(0, 1))):
            f3, f2 = self._features(v)
            self.feats[key + "3"].append(f3)
            self.feats[key + "2"].append(f2)

    def result(self) -> EvaluatorResult:
        from x2ct_framework.evaluation.sharpness_metrics import fid_from_features, kid_from_features

        f = {k: torch.cat(v) for k, v in self.feats.items()}
        n = len(f["pred3"])
        rng = np.random.default_rng(self.context.seed)
        draws = [rng.integers(0, n, n) for _ in range(self.bootstrap)] if n > 2 else []
        summary = {}

        def flat(x, idx=None):
            x = x if idx is None else x[torch.as_tensor(idx)]
            return x.reshape(-1, x.shape[-1])

        for dim, tag in (("3", "3d"), ("2", "25d")):
            a, b = f["pred" + dim], f["real" + dim]
            fid = fid_from_features(flat(a), flat(b)) if len(flat(a)) > 1 else math.nan
            boot = [fid_from_features(flat(a, d), flat(b, d)) for d in draws] if math.isfinite(fid) else []
            kid = kid_from_features(flat(a), flat(b), self.kid_subset_size, self.kid_subsets, self.seed)
            samples = len(flat(a))
            unit = "random features" if self.random or tag == "25d" else ""
            summary[f"fid{tag}"] = summary_entry(fid, percentile_interval(np.array(boot)) if boot else None, n, unit,
                                                 False, note=f"{samples} samples per set")
            summary[f"kid{tag}"] = summary_entry(kid, None, n, unit, False, note=f"{samples} samples per set")
        notes = list(self.extractor_notes) + [f"3D features: {self.extractor_name}; 2.5D features: a seeded random "
                                              f"2D CNN (seed {self.seed})"]
        if self.random:
            notes.append(f"features of seeded random-initialised CNNs (seed {self.seed}): a legitimate but weaker "
                         f"feature space than a pretrained medical encoder; compare only with the same extractor")
        return EvaluatorResult(summary=summary, conventions=list(DIST_CONVENTIONS), notes=notes)


# ---- registration -------------------------------------------------------------------------------
EVALUATORS = {"pe_detectability": PEDetectability, "organ_consistency": OrganConsistency,
              "distribution": Distribution}
SEGMENTERS = {"labels": LabelMapSegmenter, "totalsegmentator": TotalSegmentatorSegmenter}


@hookimpl
def register_evaluators(register):
    for name, factory in EVALUATORS.items():
        register(name, factory)


@hookimpl
def register_segmenters(register):
    for name, factory in SEGMENTERS.items():
        register(name, factory)


__all__ = ["PEDetectability", "OrganConsistency", "Distribution", "LabelMapSegmenter", "TotalSegmentatorSegmenter",
           "VolumeClassifier", "XrayClassifier", "RandomFeatures2D", "train_classifier", "orthogonal_slices",
           "load_callable", "EVALUATORS", "SEGMENTERS"]

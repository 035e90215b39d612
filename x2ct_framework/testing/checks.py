"""The contract checks of each component kind: loss, model, dataset, stored geometry, metric, protocol."""

from __future__ import annotations

import pickle
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, default_collate

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.testing.contract import _Contract, _describe, _expect, _Fail, _finite, _grad_ok, _scalar
from x2ct_framework.testing.data import _clone, _noisy, _same, _slice, make_batch


LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---- contracts -------------------------------------------------------------------------------------
def check_loss(loss: Callable[..., torch.Tensor], *, batch: dict | None = None, resolution: int = 16,
               views: Sequence[float] = (0.0, 90.0), batch_size: int = 2, identical: str | None = "zero",
               autocast_dtypes: Sequence[torch.dtype] = LOW_PRECISION, atol: float = 1e-5,
               rtol_low_precision: float = 0.1) -> list[str]:
    """Check a loss: ``loss(pred, target, batch) -> scalar`` as the trainer calls it.

    Checks: a finite floating scalar; a finite, non-zero gradient reaches ``pred``; inputs are not
    modified in place; a batch of one works; under ``torch.autocast("cpu", dtype)`` with a
    low-precision ``pred`` (as a model gives under mixed precision) the value stays finite and
    within ``rtol_low_precision`` of float32 and the gradient is finite. ``identical`` declares the
    value on ``pred == target``: ``"zero"`` (within ``atol``), ``"minimum"`` (no larger than on
    perturbed inputs) or ``None`` (no claim); the gradient there must be finite either way.
    """
    if identical not in ("zero", "minimum", None):
        raise ValueError(f'identical must be "zero", "minimum" or None, got {identical!r}')
    c = _Contract(f"loss {_describe(loss)}")
    batch = batch if batch is not None else make_batch(batch_size, views=views, resolution=resolution)
    target = batch["ct"].float()
    pred = _noisy(target, 0.1, 1).requires_grad_(True)
    before = (_clone(target), _clone(batch), pred.detach().clone())
    value = None
    with c.check("returns a finite scalar"):
        value = _scalar(loss(pred, target, batch))
    with c.check("gradient flows to pred"):
        _expect(value is not None, "skipped: the loss did not return a finite scalar")
        _grad_ok(pred, value)
    with c.check("inputs are not modified"):
        _expect(_same(before[0], target) and _same(before[2], pred.detach()),
                "pred or target changed in place")
        _expect(_same(before[1], batch), "the batch dict or one of its tensors changed in place")
    with c.check("batch of one"):
        one = _slice(batch, 0)
        _scalar(loss(pred.detach()[:1].clone().requires_grad_(True), target[:1], one), "the loss on a batch of one")
    if identical is not None:
        with c.check(f"{identical} on identical inputs"):
            same = target.clone().requires_grad_(True)
            at_same = _scalar(loss(same, target, batch), "the loss on identical inputs")
            if identical == "zero":
                _expect(abs(at_same.item()) <= atol, f"expected 0 (within {atol:g}) when pred == target, "
                                                     f"got {at_same.item():.6g}")
            else:
                for k, scale in enumerate((0.01, 0.1, 0.3)):
                    other = _scalar(loss(_noisy(target, scale, 10 + k), target, batch), "the loss")
                    _expect(at_same.item() <= other.item() + atol,
                            f"the value on identical inputs ({at_same.item():.6g}) is larger than on inputs "
                            f"perturbed by {scale} ({other.item():.6g})")
            if at_same.requires_grad:
                at_same.backward()
                _expect(same.grad is None or _finite(same.grad),
                        "the gradient at pred == target is not finite (sqrt or norm of zero?)")
    for dtype in autocast_dtypes:
        name = f"autocast {str(dtype).replace('torch.', '')}"
        with c.check(name):
            low = pred.detach().to(dtype).requires_grad_(True)
            with torch.autocast("cpu", dtype=dtype):
                out = _scalar(loss(low, target, batch), f"the loss under {name}")
            if value is not None:
                ref, got = value.item(), out.float().item()
                _expect(abs(got - ref) <= rtol_low_precision * abs(ref) + 1e-3,
                        f"value {got:.6g} is far from the float32 value {ref:.6g}")
            _expect(out.requires_grad, "the result does not require grad")
            out.backward()
            _expect(low.grad is not None and _finite(low.grad), "the gradient w.r.t. pred is missing or not finite")
    return c.finish()


def check_model(model: torch.nn.Module, *, resolution: int, views: Sequence[float] = (0.0, 90.0),
                batch_size: int = 2, image_size: int | None = None, geometry: str = "parallel",
                prev: bool = True, autocast_dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> list[str]:
    """Check a model: ``model(xrays [B,V,1,H,W], geometry, prev=None) -> [B, 1, R, R, R]``.

    Checks: shape and floating dtype; finite output; every trainable parameter gets a finite
    gradient and some gradient is non-zero; the gradient reaches the X-rays (a detached encoder
    fails); inputs are not modified; a batch of one works; a previous stage's prediction at half
    the resolution is accepted as ``prev`` (``prev=False`` skips this); eval mode is deterministic;
    the output changes when any one view changes (a model that drops a view fails); the output
    changes when the geometry changes (a model that replaces the batch geometry with a fixed one
    fails; a model that ignores geometry by design declares ``uses_geometry = False``); for a model
    that declares ``uses_prev = True`` (it refines the previous stage's prediction), the output
    changes when ``prev`` changes; autocast in each of ``autocast_dtypes`` gives the right shape
    and finite values.

    A generative model (``training_loss`` and ``sample``, see ``x2ct_framework.generative``) has its
    gradient checks run on ``training_loss`` (a finite scalar and a dict of logged scalars, with and
    without ``prev``) instead of on ``forward``, and more checks: a sample seeded by the same per-case
    generators is the same, another seed gives another sample (it does sample), and ``forward`` gives
    a case the same volume alone as in a batch (its noise is seeded per case).
    """
    from x2ct_framework.generative import is_generative

    generative = is_generative(model)
    c = _Contract(f"model {_describe(model)}")
    batch = make_batch(batch_size, views=views, resolution=resolution, image_size=image_size, geometry=geometry)
    xrays, geom, target = batch["xrays"], batch["geometry"], batch["ct"]
    before = (_clone(xrays), _clone(geom))
    shape = (batch_size, 1, resolution, resolution, resolution)
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    out = None
    xrays_in = xrays.clone().requires_grad_(True)
    with c.check("output shape [B, 1, R, R, R]"):
        if generative:  # its gradients are checked through training_loss below
            with torch.no_grad():
                out = model(xrays, geom)
        else:
            out = model(xrays_in, geom)
        _expect(isinstance(out, torch.Tensor), f"the model returned {type(out).__name__}, expected a tensor")
        _expect(tuple(out.shape) == shape, f"expected {shape}, got {tuple(out.shape)}")
        _expect(out.is_floating_point(), f"expected a floating-point volume, got {out.dtype}")
    with c.check("finite output"):
        _expect(out is not None, "skipped: no output")
        _expect(_finite(out), "the output has NaN or infinite values")
    with c.check("gradients reach every trainable parameter"):
        _expect(out is not None, "skipped: no output")
        if generative:
            _generative_loss(model, xrays_in, geom, target).backward()
        else:  # L1, plus the model's own terms (auxiliary_losses) as the trainer adds them
            from x2ct_framework.generative import model_terms

            extra = model_terms(model)
            ((out.float() - target).abs().mean() + sum(v.float().reshape(()) for v in extra.values())).backward()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        _expect(params, "the model has no trainable parameters")
        none = [n for n, p in params if p.grad is None]
        _expect(not none, f"{len(none)} parameter(s) get no gradient (unused in forward?): {', '.join(none[:5])}")
        bad = [n for n, p in params if not _finite(p.grad)]
        _expect(not bad, f"non-finite gradients in: {', '.join(bad[:5])}")
        _expect(any(bool(p.grad.abs().sum() > 0) for _, p in params), "every gradient is zero")
    with c.check("gradient reaches the X-rays"):
        _expect(out is not None, "skipped: no output")
        grad = xrays_in.grad
        _expect(grad is not None and _finite(grad) and bool(grad.abs().sum() > 0),
                "the loss has no gradient w.r.t. the input X-rays (a detach(), no_grad or integer op between "
                "the images and the output?)")
    model.zero_grad(set_to_none=True)
    with c.check("inputs are not modified"):
        _expect(_same(before[0], xrays) and _same(before[1], geom), "xrays or geometry changed in place")
    with c.check("batch of one"):
        one = model(xrays[:1], _slice(geom, 0))
        _expect(tuple(one.shape) == (1,) + shape[1:], f"expected {(1,) + shape[1:]}, got {tuple(one.shape)}")
    if prev:
        with c.check("accepts the previous stage's prediction"):
            low = max(1, resolution // 2)
            p = torch.rand(batch_size, 1, low, low, low, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                cascade = model(xrays, geom, prev=p)
            _expect(tuple(cascade.shape) == shape,
                    f"with prev at {low}^3: expected {shape}, got {tuple(cascade.shape)}")
            _expect(_finite(cascade), "with prev: the output has NaN or infinite values")
    with c.check("deterministic in eval mode"):
        model.eval()
        with torch.no_grad():
            a, b = model(xrays, geom), model(xrays, geom)
        _expect(torch.equal(a, b), "two calls in eval mode gave different outputs (dropout or noise left on?)")
    model.eval()
    low = max(1, resolution // 2)
    perturbation_checks(c, model, xrays, geom, prev_shape=(1, low, low, low) if prev else None,
                        check_prev=prev and getattr(model, "uses_prev", False))
    if generative:
        _check_generative(c, model, xrays, geom, target, resolution, prev)
    for dtype in autocast_dtypes:
        name = f"autocast {str(dtype).replace('torch.', '')}"
        with c.check(name):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                low_out = model(xrays, geom)
            _expect(tuple(low_out.shape) == shape, f"expected {shape}, got {tuple(low_out.shape)}")
            _expect(_finite(low_out), "the output has NaN or infinite values")
    model.train(was_training)
    return c.finish()


def perturbation_checks(c: _Contract, model: torch.nn.Module, xrays: torch.Tensor, geometry: dict, *,
                        prev_shape: Sequence[int] | None = None, check_prev: bool = False,
                        check_geometry: bool | None = None) -> None:
    """The checks that change one input and watch the output (``model`` in eval mode, under no_grad): each view
    changes it, the geometry changes it (unless the model declares ``uses_geometry = False``), ``prev`` changes it
    (``check_prev``: the model takes the previous stage's prediction, of ``prev_shape`` per case), and each case's
    output does not depend on the other cases of the batch. :func:`check_model` and ``x2ct validate`` share them."""
    with torch.no_grad():
        base = model(xrays, geometry).float()
    tol = 1e-6 * (1.0 + float(base.abs().max()))
    n_views = xrays.shape[1]
    angles = geometry.get("angles") if isinstance(geometry, dict) else None
    with c.check("the output depends on every view"):
        ignored = []
        for v in range(n_views):
            changed = xrays.clone()
            changed[:, v] = 1.0 - changed[:, v]
            with torch.no_grad():
                if (model(changed, geometry).float() - base).abs().max() <= tol:
                    ignored.append(v)
        where = f" (angles {[round(float(a), 1) for a in angles[0]]})" if isinstance(angles, torch.Tensor) else ""
        _expect(not ignored, f"changing view(s) {ignored} of {n_views}{where} leaves the output unchanged: the "
                             f"model ignores them (does it drop a view?)")
    if check_geometry if check_geometry is not None else getattr(model, "uses_geometry", True):
        with c.check("the output depends on the geometry"):
            _expect(isinstance(angles, torch.Tensor), "the batch geometry has no angles")
            other = {**geometry, "angles": angles + 37.0}
            with torch.no_grad():
                moved = model(xrays, other).float()
            _expect((moved - base).abs().max() > tol,
                    "the views' angles moved by 37 degrees and the output is unchanged: the model does not use the "
                    "batch geometry (a fixed geometry inside the model?); a model that ignores geometry by design "
                    "declares uses_geometry = False")
    if check_prev and prev_shape is not None:
        with c.check("the output depends on prev"):
            g = torch.Generator().manual_seed(5)
            p1, p2 = (torch.rand(xrays.shape[0], *prev_shape, generator=g) for _ in range(2))
            with torch.no_grad():
                d = (model(xrays, geometry, prev=p1.to(xrays)).float()
                     - model(xrays, geometry, prev=p2.to(xrays)).float()).abs().max()
            declared = "the model declares uses_prev = True but " if getattr(model, "uses_prev", False) else ""
            _expect(d > tol, f"{declared}two different prev volumes (the previous stage's prediction) give the same "
                             f"output: the model ignores prev, so the cascade feeds it nothing")
    if xrays.shape[0] > 1:
        with c.check("each case's output is independent of the other cases"):
            with torch.no_grad():
                alone = torch.cat([model(xrays[i:i + 1], _slice(geometry, i)).float()
                                   for i in range(xrays.shape[0])])
            worst = float((alone - base).abs().max())
            _expect(worst <= 1e-4 * (1.0 + float(base.abs().max())),
                    f"a case's output in a batch of {xrays.shape[0]} differs from its output alone by {worst:.3g}: it "
                    f"depends on the other cases of the batch (statistics or attention across the batch dimension?)")


def _generative_loss(model: torch.nn.Module, xrays: torch.Tensor, geom: dict, target: torch.Tensor,
                     prev: torch.Tensor | None = None) -> torch.Tensor:
    """A generative model's ``training_loss``, its result checked: a finite scalar and a dict of logged scalars
    (the clean estimate, when there is one, of the target's shape)."""
    from x2ct_framework.generative import ESTIMATE

    result = model.training_loss(xrays, geom, target, prev)
    _expect(isinstance(result, tuple) and len(result) == 2,
            f"training_loss returned {type(result).__name__}, expected (loss, terms)")
    loss, terms = result
    _scalar(loss, "training_loss")
    _expect(isinstance(terms, dict), f"training_loss's terms are {type(terms).__name__}, expected a dict")
    for k, v in terms.items():
        if k == ESTIMATE:
            _expect(isinstance(v, torch.Tensor) and v.shape == target.shape,
                    f"the clean estimate has shape {tuple(getattr(v, 'shape', ()))}, expected {tuple(target.shape)}")
            continue
        _expect(isinstance(k, str) and isinstance(v, torch.Tensor) and v.ndim == 0 and _finite(v),
                f"logged term {k!r} is not a finite scalar tensor")
    return loss


def _check_generative(c: _Contract, model: torch.nn.Module, xrays: torch.Tensor, geom: dict, target: torch.Tensor,
                      resolution: int, prev: bool) -> None:
    """The checks only a generative model has (``check_model``'s docstring)."""
    from x2ct_framework.generative import case_generators

    model.eval()
    if prev:
        with c.check("training_loss with the previous stage's prediction"):
            low = max(1, resolution // 2)
            p = torch.rand(xrays.shape[0], 1, low, low, low, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                _generative_loss(model, xrays, geom, target, p)
    with torch.no_grad():
        first = None
        with c.check("sample: the same per-case generators give the same sample"):
            first = model.sample(xrays, geom, generator=case_generators(xrays, geom, 0, 0))
            second = model.sample(xrays, geom, generator=case_generators(xrays, geom, 0, 0))
            _expect(tuple(first.shape) == tuple(target.shape),
                    f"expected {tuple(target.shape)}, got {tuple(first.shape)}")
            _expect(torch.equal(first, second), "two samples from identically seeded generators differ")
        with c.check("sample: another seed gives another sample"):
            _expect(first is not None, "skipped: no sample")
            other = model.sample(xrays, geom, generator=case_generators(xrays, geom, 0, 1))
            _expect(not torch.equal(first, other), "samples from two seeds are identical: the model ignores its noise "
                                                   "(a regression model should not define training_loss and sample)")
        with c.check("forward: a case gets the same volume alone as in its batch"):
            whole = model(xrays, geom).float()
            alone = model(xrays[:1], _slice(geom, 0)).float()
            gap = float((whole[:1] - alone).abs().max())
            _expect(gap <= 1e-4 * (1.0 + float(whole.abs().max())),
                    f"case 0 alone differs from case 0 in a batch by {gap:.3g} (seed the noise per case: "
                    f"x2ct_framework.generative.case_generators)")


def _check_item(item: Any, i: int, c: _Contract, resolution: int | None, views: Sequence[float] | None,
                require_ct: bool) -> None:
    with c.check(f"item {i}: keys"):
        _expect(isinstance(item, dict), f"expected a dict, got {type(item).__name__}")
        need = ["xrays", "geometry"] + (["ct"] if require_ct else [])
        missing = [k for k in need if k not in item]
        _expect(not missing, f"missing {', '.join(missing)} (has {', '.join(map(str, item))})")
    if not c.ok(f"item {i}: keys"):
        return
    nv = None
    with c.check(f"item {i}: xrays"):
        x = item["xrays"]
        _expect(isinstance(x, torch.Tensor) and x.is_floating_point(), f"expected a float tensor, got {_kind(x)}")
        _expect(x.ndim == 4 and x.shape[1] == 1, f"expected [V, 1, H, W], got {tuple(x.shape)}")
        nv = x.shape[0]
        if views is not None:
            _expect(nv == len(views), f"expected {len(views)} views, got {nv}")
        _expect(_finite(x), "NaN or infinite values")
        _expect(x.min() >= 0 and x.max() <= 1, f"values outside [0, 1]: {x.min().item():.4g}..{x.max().item():.4g}")
    with c.check(f"item {i}: geometry"):
        geom = item["geometry"]
        _expect(isinstance(geom, dict) and "angles" in geom, "expected a dict of tensors with 'angles'")
        for k, v in geom.items():
            _expect(isinstance(v, torch.Tensor) and v.is_floating_point(), f"geometry[{k!r}]: expected a float tensor, "
                                                                            f"got {_kind(v)}")
            _expect(nv is None or (v.ndim >= 1 and v.shape[0] == nv),
                    f"geometry[{k!r}]: expected a first dimension of {nv} (one entry per view), got {tuple(v.shape)}")
        _expect(geom["angles"].ndim == 1, f"geometry['angles']: expected [V], got {tuple(geom['angles'].shape)}")
        if views is not None:
            want = torch.tensor([float(v) for v in views])
            _expect(geom["angles"].shape == want.shape and torch.allclose(geom["angles"].float(), want),
                    f"geometry['angles']: expected {want.tolist()}, got {geom['angles'].tolist()}")
    if "ct" in item:
        with c.check(f"item {i}: ct"):
            ct = item["ct"]
            _expect(isinstance(ct, torch.Tensor) and ct.is_floating_point(),
                    f"expected a float tensor, got {_kind(ct)}")
            _expect(ct.ndim == 4 and ct.shape[0] == 1 and ct.shape[1] == ct.shape[2] == ct.shape[3],
                    f"expected [1, D, D, D], got {tuple(ct.shape)}")
            if resolution is not None:
                _expect(ct.shape[-1] == resolution,
                        f"expected D = {resolution} (the stage resolution), got {ct.shape[-1]}")
            _expect(_finite(ct), "NaN or infinite values")
            _expect(ct.min() >= 0 and ct.max() <= 1,
                    f"values outside [0, 1]: {ct.min().item():.4g}..{ct.max().item():.4g} (apply the HU window)")
    if "labels" in item:
        with c.check(f"item {i}: labels"):
            lab = item["labels"]
            _expect(isinstance(lab, torch.Tensor) and lab.dtype in (torch.uint8, torch.int64),
                    f"expected a uint8 or int64 tensor, got {_kind(lab)}")
            if "ct" in item:
                _expect(lab.shape == item["ct"].shape, f"expected the shape of ct {tuple(item['ct'].shape)}, "
                                                        f"got {tuple(lab.shape)}")
            _expect(lab.numel() == 0 or lab.min() >= 0, "negative label values")
    if "spacing" in item:
        with c.check(f"item {i}: spacing"):
            sp = item["spacing"]
            _expect(isinstance(sp, torch.Tensor) and sp.is_floating_point() and tuple(sp.shape) == (3,),
                    f"expected a float tensor [3], got {_kind(sp)}")
            _expect(_finite(sp) and bool((sp > 0).all()), f"expected positive finite values, got {sp.tolist()}")
    if "case_id" in item:
        with c.check(f"item {i}: case_id"):
            _expect(isinstance(item["case_id"], str), f"expected a str, got {type(item['case_id']).__name__}")


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def check_dataset(dataset: torch.utils.data.Dataset, *, resolution: int | None = None,
                  views: Sequence[float] | None = None, items: int = 2, require_ct: bool = True,
                  deterministic: bool = True, workers: int = 0) -> list[str]:
    """Check a dataset's items against the batch contract and that it survives worker processes.

    Per item (the first ``items``): ``xrays`` float [V, 1, H, W] in [0, 1]; ``geometry`` a dict of
    float tensors [V, ...] with ``angles`` [V] (equal to ``views`` when given); ``ct`` float
    [1, D, D, D] in [0, 1] with D = ``resolution`` when given (required unless ``require_ct=False``);
    optional ``labels`` uint8/int64 on the ct grid, ``spacing`` float [3] > 0, ``case_id`` str; all
    finite. Then: two items collate with the default collate function; the same index gives the same
    item (``deterministic=False`` for random augmentation); the dataset pickles (worker processes
    started with spawn or forkserver receive a pickled copy) and the copy gives the same item; with
    ``workers > 0`` a real multi-process ``DataLoader`` runs.
    """
    c = _Contract(f"dataset {_describe(dataset)}")
    n = None
    with c.check("has items"):
        n = len(dataset)
        _expect(n > 0, "len(dataset) is 0: an empty split")
    if not n:
        return c.finish()
    first = []
    for i in range(min(items, n)):
        with c.check(f"item {i}: loads"):
            first.append(dataset[i])
        if c.ok(f"item {i}: loads"):
            _check_item(first[-1], i, c, resolution, views, require_ct)
    if not first:
        return c.finish()
    with c.check("items collate into a batch"):
        batch = default_collate([first[0], first[-1]])
        _expect(batch["xrays"].shape[0] == 2, "the collated xrays have no batch dimension")
    if deterministic:
        with c.check("same index, same item"):
            _expect(_same(dataset[0], first[0]), "dataset[0] differs between two calls (pass deterministic=False "
                                                  "when the split augments at random)")
    with c.check("picklable for worker processes"):
        try:
            copy_ = pickle.loads(pickle.dumps(dataset))
        except Exception as exc:
            raise _Fail(f"pickling failed ({type(exc).__name__}: {exc}); keep open files, locks and lambdas out "
                        f"of the dataset's attributes or open them lazily in __getitem__") from exc
        if deterministic:
            _expect(_same(copy_[0], first[0]), "the unpickled copy gives a different item 0")
    if workers:
        with c.check(f"loads in {workers} worker process(es)"):
            loader = DataLoader(dataset, batch_size=1, num_workers=workers)
            for k, b in enumerate(loader):
                _expect(isinstance(b, dict) and "xrays" in b, "a worker returned something that is not a batch dict")
                if k + 1 >= min(items, n):
                    break
    return c.finish()


def check_stored_geometry(dataset: torch.utils.data.Dataset, *, cases: int = 2,
                          hu_window: Sequence[float] | None = None) -> list[str]:
    """Check that a dataset's stored X-rays show its CTs in the geometry it declares (``x2ct check-data``).

    For a dataset that hands out stored X-rays beside the CT: the framework's DRR of each of the first
    ``cases`` CTs at each view's declared angle must fit the view better than every other flip/rotation
    of the image and than the opposite angle (:mod:`x2ct_framework.datacheck`). The dataset's
    ``hu_window`` and ``orientation`` attributes are used when present. A failure names the recipe
    setting (``data.orientation`` / ``data.views``) that fixes it.
    """
    from x2ct_framework.datacheck import check_dataset_geometry

    c = _Contract(f"dataset {_describe(dataset)}")
    with c.check("stored X-rays agree with the CT"):
        result = check_dataset_geometry(dataset, cases, hu_window)
        if not result.ok:
            fix = f"; fix: {' and '.join(result.fixes)}" if result.fixes else ""
            raise _Fail("; ".join(result.problems) + fix + "\n" + result.table())
    return c.finish()


def check_metric(metric: Callable[..., torch.Tensor], *, batch_size: int = 3, resolution: int = 16,
                 views: Sequence[float] = (0.0, 90.0), higher_is_better: bool | None = None) -> list[str]:
    """Check a metric: ``metric(pred, target, batch) -> tensor [B]``, one value per case.

    Checks: shape [B], floating, finite; each value equals the metric of that case alone (it does
    not average over the batch); inputs are not modified; it runs under ``torch.no_grad`` as in
    validation. ``higher_is_better`` declares the direction: identical inputs then score at least
    as well as perturbed ones.
    """
    c = _Contract(f"metric {_describe(metric)}")
    batch = make_batch(batch_size, views=views, resolution=resolution)
    target = batch["ct"]
    pred = _noisy(target, 0.1, 2)
    before = (_clone(pred), _clone(target), _clone(batch))
    out = None
    with c.check("one finite value per case [B]"):
        with torch.no_grad():
            out = metric(pred, target, batch)
        _expect(isinstance(out, torch.Tensor), f"returned {type(out).__name__}, expected a tensor [B]")
        _expect(tuple(out.shape) == (batch_size,), f"expected shape ({batch_size},), got {tuple(out.shape)}")
        _expect(out.is_floating_point(), f"expected a floating-point tensor, got {out.dtype}")
        _expect(_finite(out), f"non-finite values: {out.tolist()}")
    with c.check("per case, independent of the batch"):
        _expect(out is not None and out.shape == (batch_size,), "skipped: no [B] output")
        with torch.no_grad():
            alone = torch.cat([metric(pred[i:i + 1], target[i:i + 1], _slice(batch, i)).reshape(-1)
                               for i in range(batch_size)])
        _expect(torch.allclose(alone.float(), out.float(), rtol=1e-4, atol=1e-5),
                f"case by case {alone.tolist()} differs from the batch {out.tolist()} (averaging over the batch?)")
    with c.check("inputs are not modified"):
        _expect(_same(before[0], pred) and _same(before[1], target) and _same(before[2], batch),
                "pred, target or the batch changed in place")
    if higher_is_better is not None:
        with c.check("identical inputs score best"):
            with torch.no_grad():
                best = metric(target.clone(), target, batch).float()
            _expect(out is not None, "skipped: no output")
            worse = (best >= out.float() - 1e-6) if higher_is_better else (best <= out.float() + 1e-6)
            _expect(bool(worse.all()), f"identical inputs score {best.tolist()}, perturbed ones {out.tolist()} "
                                       f"(higher_is_better={higher_is_better})")
    return c.finish()


def protocol_checks(c: _Contract, protocol: Any, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> None:
    """The checks of a built protocol on one batch: a Protocol whose primary metric is one of its metrics, keys
    ``<protocol>/<metric>``, and each metric one value per case (NaN: not scored; never infinite), independent of
    the other cases.
    :func:`check_protocol` and ``x2ct validate`` share them."""
    import dataclasses

    from x2ct_framework.evaluation.protocols import Protocol

    with c.check("a Protocol with its primary metric among its metrics"):
        _expect(isinstance(protocol, Protocol), f"got {type(protocol).__name__}, expected a Protocol")
        _expect(protocol.metrics, "the protocol has no metrics")
        _expect(protocol.primary in protocol.metrics,
                f"primary {protocol.primary!r} is not one of its metrics ({', '.join(protocol.metrics)})")
    if not isinstance(protocol, Protocol):
        return
    n = target.shape[0]
    for name in protocol.metrics:
        with c.check(f"metric {name!r}: one value per case [B], independent of the batch"):
            alone = dataclasses.replace(protocol, metrics={name: protocol.metrics[name]}, exclude=None)
            with torch.no_grad():
                out = alone(pred, target, batch)
            key = protocol.key(name)
            _expect(set(out) == {key}, f"keys {sorted(out)}, expected [{key!r}]")
            v = out[key]
            _expect(tuple(v.shape) == (n,), f"returned shape {tuple(v.shape)}, expected one value per case ({n},)")
            _expect(not bool(torch.isinf(v).any()), f"infinite values: {v.tolist()} (NaN marks a case not scored)")
            if n > 1:
                with torch.no_grad():
                    each = torch.cat([alone(pred[i:i + 1], target[i:i + 1], _slice(batch, i))[key].reshape(-1)
                                      for i in range(n)])
                _expect(torch.allclose(each, v, rtol=1e-4, atol=1e-5, equal_nan=True),
                        f"case by case {each.tolist()} differs from the batch {v.tolist()} (averaging over the batch?)")


def check_protocol(protocol: Any, *, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, batch_size: int = 3,
                   resolution: int = 16, views: Sequence[float] = (0.0, 90.0), **options: Any) -> list[str]:
    """Check a metric protocol: a :class:`~x2ct_framework.api.Protocol` (or the registered name of one, built with
    ``hu_window`` and ``options``) scoring ``pred, target, batch -> {"<protocol>/<metric>": [B]}``.

    Checks: it builds; it is a Protocol whose primary metric is one of its metrics; each metric gives one
    value per case under its ``<protocol>/<metric>`` key (finite, or NaN for a case it cannot score, such as a
    structure the case lacks), the same case by case as in the batch.
    """
    from x2ct_framework.evaluation.protocols import build_protocol

    c = _Contract(f"protocol {protocol if isinstance(protocol, str) else getattr(protocol, 'name', protocol)!r}")
    if isinstance(protocol, str):
        name, protocol = protocol, None
        with c.check("builds"):
            protocol = build_protocol(name, hu_window, **options)
        if protocol is None:
            return c.finish()
    batch = make_batch(batch_size, views=views, resolution=resolution)
    target = batch["ct"]
    protocol_checks(c, protocol, _noisy(target, 0.1, 2), target, batch)
    return c.finish()


def _study_cases(n: int, resolution: int, views: Sequence[float], seed: int) -> list[dict]:
    """Kit cases with per-case study labels (``pe_present`` alternating, one patient per case)."""
    from x2ct_framework.testing.data import make_case

    cases = []
    for i in range(n):
        item = make_case(i, views=views, resolution=resolution, seed=seed)
        item["study"] = {"pe_present": i % 2, "patient_id": f"patient-{seed}-{i:03d}"}
        cases.append(item)
    return cases


def _run_evaluator(evaluator: Any, cases: list[dict], batch_size: int, context: Any) -> Any:
    evaluator.start(context)
    preds = [_noisy(case["ct"][None], 0.05, 100 + k)[0] for k, case in enumerate(cases)]  # seeded per case
    for i in range(0, len(cases), batch_size):
        batch = default_collate(cases[i:i + batch_size])
        target = batch["ct"]
        pred = torch.stack(preds[i:i + batch_size])
        with torch.no_grad():
            evaluator.update(pred, target, batch)
    return evaluator.result()


def check_evaluator(evaluator: Any, *, cases: int = 6, batch_size: int = 2, resolution: int = 16,
                    views: Sequence[float] = (0.0, 90.0), options: dict | None = None, build: Callable | None = None,
                    context: Any = None) -> list[str]:
    """Check an evaluator: ``start(context)``, ``update(pred, target, batch)`` over a split, ``result()``.

    ``evaluator`` is a registered evaluator's name (built with ``options``), an evaluator object, or pass
    ``build`` (a callable returning a fresh evaluator) so the batch-size check can build a second one. Cases
    come from :func:`make_case` with ``study = {"pe_present": 0/1 alternating, "patient_id"}``; the context's
    ``dataset(split)`` serves such cases for every split (a training split for a reference classifier).

    Checks: it builds; ``result()`` is an ``EvaluatorResult``; each per-case column holds one number per case;
    every summary entry has a value and an interval with ``ci_low <= ci_high``; the inputs are not modified;
    the per-case columns and summary values are the same when the split comes one case per batch (it keeps
    each case's values in order and does not depend on the batching); a skipped evaluator gives its reason.
    """
    from x2ct_framework.evaluation.evaluators import (EvaluationContext, EvaluatorResult, EvaluatorSkipped,
                                                     check_result)

    label = evaluator if isinstance(evaluator, str) else _describe(evaluator) if evaluator is not None else "evaluator"
    c = _Contract(f"evaluator {label!r}")
    if isinstance(evaluator, str):
        from x2ct_framework.plugins import get_plugin_manager

        name = evaluator
        reg = get_plugin_manager().registry("evaluator")
        build = build or (lambda: reg.create(name, dict(options or {}), where=f"kit evaluator {name!r}"))
        evaluator = None
    made = [evaluator]
    if evaluator is None:
        with c.check("builds"):
            try:
                made[0] = build()
            except EvaluatorSkipped as exc:
                _expect(str(exc).strip(), "skipped without a reason")
                c.passed.append(f"skipped with its reason: {exc}")
                return c.finish()
        if made[0] is None:
            return c.finish()
    evaluator = made[0]
    data = _study_cases(cases, resolution, views, 0)
    other = {s: _study_cases(max(cases, 8), resolution, views, k) for k, s in enumerate(("train", "val", "test"), 1)}
    import tempfile

    ctx = context or EvaluationContext(split="test", hu_window=DEFAULT_HU_WINDOW, resolution=resolution, seed=0,
                                       n_boot=200, dataset=lambda s: other[s], data_key=f"kit-{resolution}",
                                       cache_dir=Path(tempfile.mkdtemp(prefix="x2ct-kit-evaluator-")))
    before = _clone(data)
    result = None
    with c.check("start, update over the split, result"):
        try:
            result = _run_evaluator(evaluator, data, batch_size, ctx)
        except EvaluatorSkipped as exc:
            _expect(str(exc).strip(), "skipped without a reason")
            c.passed.append(f"skipped with its reason: {exc}")
            return c.finish()
    with c.check("an EvaluatorResult: per-case columns of one value per case, summaries with intervals"):
        _expect(result is not None, "skipped: no result")
        _expect(isinstance(result, EvaluatorResult), f"result() returned {type(result).__name__}")
        check_result(label, "the kit", result, cases)
        _expect(result.skipped or result.per_case or result.summary, "no per-case column and no summary number")
        for key, e in result.summary.items():
            lo, hi = e["ci_low"], e["ci_high"]
            _expect(not (lo == lo and hi == hi) or lo <= hi, f"summary {key!r}: ci_low {lo} > ci_high {hi}")
    with c.check("inputs are not modified"):
        _expect(_same(before, data), "a case's tensors or study labels changed in place")
    if build is not None and isinstance(result, EvaluatorResult) and not result.skipped:
        with c.check("the same values one case per batch"):
            again = _run_evaluator(build(), data, 1, ctx)
            for col, v in result.per_case.items():
                a, b = torch.as_tensor(list(v), dtype=torch.float64), torch.as_tensor(
                    list(again.per_case.get(col, [])), dtype=torch.float64)
                _expect(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True),
                        f"per-case column {col!r}: {a.tolist()} in batches of {batch_size}, {b.tolist()} one by one")
            for key, e in result.summary.items():
                v2 = again.summary.get(key, {}).get("value", float("nan"))
                _expect(abs(e["value"] - v2) <= 1e-4 * max(1.0, abs(e["value"])) or (e["value"] != e["value"]
                                                                                    and v2 != v2),
                        f"summary {key!r}: {e['value']} in batches of {batch_size}, {v2} one by one")
    return c.finish()

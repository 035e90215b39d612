"""Test helpers for plugin authors: register a plugin for one test, and check a component's contract.

```python
from x2ct_framework.testing import check_loss, create, registered

def test_my_loss_keeps_the_contract():
    with registered(my_plugin_module):
        loss = create("loss", "my_loss", {"eps": 1e-3}, hu_window=[-1000, 3000])
    check_loss(loss, identical="zero")
```

Every ``check_*`` runs all of its checks, then raises one :class:`ContractError` (an
``AssertionError``, so pytest shows it as a plain failure) listing every broken check, or returns
the names of the checks that passed. Inputs come from :func:`make_batch`: a small seeded chest-like
volume with DRR views rendered by :mod:`x2ct_framework.physics`, batched exactly as the data loader
batches a dataset's items.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, default_collate

from x2ct_framework import plugins as _plugins
from x2ct_framework.conventions import DEFAULT_HU_WINDOW, hu_to_unit
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.plugins import KINDS, PluginManager, get_plugin_manager
from x2ct_framework.stage import Stage

__all__ = [
    "ContractError",
    "isolated_plugins",
    "registered",
    "registered_component",
    "create",
    "make_stage",
    "make_case",
    "make_batch",
    "check_loss",
    "check_model",
    "check_dataset",
    "check_stored_geometry",
    "check_metric",
    "FakeTrainer",
    "run_hooks",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)


class ContractError(AssertionError):
    """A component broke one or more contract checks; ``failures`` holds each as a sentence."""

    def __init__(self, what: str, failures: list[str]):
        self.what, self.failures = what, list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{what} broke {len(self.failures)} contract check(s):\n{lines}")


# ---- plugin registration ---------------------------------------------------------------------------
@contextmanager
def isolated_plugins(entry_points: bool = True) -> Iterator[PluginManager]:
    """A fresh process-wide plugin manager for the block; the previous one is restored afterwards.

    ``entry_points=False`` skips installed plugins, so the block sees only what it registers plus the
    core's optimizers, schedules and protocols.
    """
    saved = _plugins._MANAGER
    pm = PluginManager()
    if not entry_points:
        pm._entry_points_loaded = True
    _plugins._MANAGER = pm
    try:
        yield pm
    finally:
        _plugins._MANAGER = saved


@contextmanager
def registered(plugin: Any, name: str | None = None) -> Iterator[PluginManager]:
    """Register ``plugin`` (a module, class or object with hook implementations) for the block."""
    pm = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or f"test-plugin-{id(plugin)}"
    pm.register_object(plugin, name, distribution="registered in a test")
    try:
        yield pm
    finally:
        if pm.pm.has_plugin(name):
            pm.unregister(name)


def registered_component(kind: str, name: str, factory: Callable[..., Any]):
    """Register one factory under ``name`` for the block, e.g. ``registered_component("loss", "x", X)``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    hook_name = KINDS[kind]

    def impl(register):
        register(name, factory)

    plugin = type(f"test_{kind}_{name}", (), {hook_name: staticmethod(hookimpl(impl))})
    return registered(plugin, f"test-{kind}-{name}")


def make_stage(resolution: int = 16, name: str = "stage1", index: int = 1, **options: Any) -> Stage:
    """A :class:`Stage` as datasets receive it."""
    return Stage(name=name, index=index, resolution=resolution, options={"resolution": resolution, **options})


def create(kind: str, name: str, options: dict | None = None, **context: Any) -> Any:
    """Build a registered component the way a recipe does.

    ``options`` is the recipe table (checked against the factory's keyword arguments, so a
    misspelt option fails here as it would in a recipe). ``context`` holds what the framework
    offers (``resolution``, ``views``, ``hu_window``, ``geometry``, ``seed``); a factory receives
    only the ones it declares. Datasets also take ``split`` (default ``"train"``) and ``stage``
    (default a stage at ``resolution``, 16 when not given).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    reg = get_plugin_manager().registry(kind)
    fixed = {}
    if kind == "dataset":
        fixed["split"] = context.pop("split", "train")
        fixed["stage"] = context.pop("stage", None) or make_stage(context.get("resolution", 16))
    return reg.create(name, options or {}, where=f"test {kind} {name!r}", context=context, **fixed)


# ---- inputs ----------------------------------------------------------------------------------------
def make_case(index: int = 0, *, views: Sequence[float] = (0.0, 90.0), resolution: int = 16,
              image_size: int | None = None, hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
              geometry: str = "parallel", seed: int = 0) -> dict:
    """One dataset item: a seeded chest-like volume (body, lungs, spine, vessel) and its DRR views."""
    from x2ct_framework.phantom import kit_chest
    from x2ct_framework.physics import drr, make_geometry

    hu, labels = kit_chest(resolution, seed * 7919 + index)
    lo, hi = float(hu_window[0]), float(hu_window[1])
    ct = hu_to_unit(hu, (lo, hi))[None]
    geom = make_geometry([float(v) for v in views], geometry)
    size = image_size or resolution
    xrays = drr(ct[None], {k: v[None] for k, v in geom.items()}, (lo, hi), det_shape=(size, size))[0]
    return {"xrays": xrays.float(), "geometry": geom, "ct": ct, "labels": labels[None],
            "spacing": torch.full((3,), 320.0 / resolution), "case_id": f"testing-{seed}-{index:03d}"}


def make_batch(batch_size: int = 2, *, views: Sequence[float] = (0.0, 90.0), resolution: int = 16,
               image_size: int | None = None, hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
               geometry: str = "parallel", seed: int = 0) -> dict:
    """A batch as the trainer sees it: :func:`make_case` items collated by the default data loader."""
    return default_collate([make_case(i, views=views, resolution=resolution, image_size=image_size,
                                      hu_window=hu_window, geometry=geometry, seed=seed)
                            for i in range(batch_size)])


def _noisy(target: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (target + scale * torch.randn(target.shape, generator=g)).clamp(0, 1)


def _slice(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: _slice(v, i) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[i:i + 1]
    return batch


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return copy.deepcopy(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---- contract bookkeeping --------------------------------------------------------------------------
class _Fail(Exception):
    pass


def _expect(condition: Any, message: str) -> None:
    if not condition:
        raise _Fail(message)


class _Contract:
    def __init__(self, what: str):
        self.what = what
        self.passed: list[str] = []
        self.failed: list[str] = []

    @contextmanager
    def check(self, name: str) -> Iterator[None]:
        try:
            yield
        except _Fail as exc:
            self.failed.append(f"{name}: {exc}")
        except Exception as exc:  # the component raised: that is a failed check, with its message
            self.failed.append(f"{name}: raised {type(exc).__name__}: {exc}")
        else:
            self.passed.append(name)

    def ok(self, name: str) -> bool:
        return name in self.passed

    def finish(self) -> list[str]:
        if self.failed:
            raise ContractError(self.what, self.failed)
        return self.passed


def _describe(component: Any) -> str:
    return type(component).__name__ if not isinstance(component, type) else component.__name__


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _scalar(out: Any, what: str = "the loss") -> torch.Tensor:
    _expect(isinstance(out, torch.Tensor), f"{what} returned {type(out).__name__}, expected a torch.Tensor")
    _expect(out.ndim == 0, f"{what} returned shape {tuple(out.shape)}, expected a scalar (shape ())")
    _expect(out.is_floating_point(), f"{what} returned dtype {out.dtype}, expected a floating-point tensor")
    _expect(_finite(out), f"{what} returned {out.item()}, expected a finite value")
    return out


def _grad_ok(leaf: torch.Tensor, out: torch.Tensor, what: str = "pred") -> None:
    _expect(out.requires_grad, f"the result does not require grad: no gradient can flow to {what} "
                               f"(detached, computed under no_grad, or converted to a Python number?)")
    leaf.grad = None
    out.backward()
    _expect(leaf.grad is not None, f"no gradient reached {what}")
    _expect(_finite(leaf.grad), f"the gradient w.r.t. {what} has non-finite values")
    _expect(bool(leaf.grad.abs().sum() > 0), f"the gradient w.r.t. {what} is zero everywhere")


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
        else:
            (out.float() - target).abs().mean().backward()
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
    with torch.no_grad():
        base = model(xrays, geom).float()
    tol = 1e-6 * (1.0 + float(base.abs().max()))
    with c.check("the output depends on every view"):
        ignored = []
        for v in range(xrays.shape[1]):
            changed = xrays.clone()
            changed[:, v] = 1.0 - changed[:, v]
            with torch.no_grad():
                if (model(changed, geom).float() - base).abs().max() <= tol:
                    ignored.append(v)
        _expect(not ignored, f"changing view(s) {ignored} of {xrays.shape[1]} (angles {list(views)}) leaves the "
                             f"output unchanged: the model ignores them")
    if getattr(model, "uses_geometry", True):
        with c.check("the output depends on the geometry"):
            from x2ct_framework.physics import make_geometry

            other = make_geometry([float(v) + 37.0 for v in views], geometry)
            other = {k: t[None].expand(batch_size, *t.shape).clone() for k, t in other.items()}
            with torch.no_grad():
                moved = model(xrays, other).float()
            _expect((moved - base).abs().max() > tol,
                    "the views' angles moved by 37 degrees and the output is unchanged: the model does not use the "
                    "batch geometry (a fixed geometry inside the model?); a model that ignores geometry by design "
                    "declares uses_geometry = False")
    if prev and getattr(model, "uses_prev", False):
        with c.check("the output depends on prev"):
            low = max(1, resolution // 2)
            g = torch.Generator().manual_seed(5)
            p1, p2 = (torch.rand(batch_size, 1, low, low, low, generator=g) for _ in range(2))
            with torch.no_grad():
                d = (model(xrays, geom, prev=p1).float() - model(xrays, geom, prev=p2).float()).abs().max()
            _expect(d > tol, "the model declares uses_prev = True but two different prev volumes give the same "
                             "output")
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


# ---- lifecycle hooks without training ------------------------------------------------------------------
class FakeAccelerator:
    """What a hook reads from ``trainer.accelerator`` on one process; ``log`` calls are kept in ``logged``."""

    is_main_process = True
    is_local_main_process = True
    process_index = 0
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict]] = []

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((step, dict(values)))

    def wait_for_everyone(self) -> None:
        pass


class FakeTrainer:
    """A stand-in for the trainer in hook tests: ``recipe``, ``run_dir``, ``accelerator``, ``pm``, ``print``.

    ``calls`` records every hook called through :func:`run_hooks` as ``(hook name, kwargs)``.
    """

    def __init__(self, recipe: Any = None, run_dir: str | Path | None = None):
        self.recipe = recipe if recipe is not None else {"name": "fake", "seed": 0}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.accelerator = FakeAccelerator()
        self.pm = get_plugin_manager()
        self.calls: list[tuple[str, dict]] = []

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call ``hook`` on every registered plugin (skipped when the framework has no such hook)."""
        if not hasattr(self.pm.pm.hook, hook):
            return
        self.calls.append((hook, kwargs))
        getattr(self.pm.hook, hook)(trainer=self, **kwargs)


def run_hooks(trainer: FakeTrainer | None = None, *, stages: Sequence[Stage] | None = None, epochs: int = 2,
              steps_per_epoch: int = 2, val_every: int = 1,
              metrics: Callable[[Stage, int], dict] | None = None) -> FakeTrainer:
    """Call the lifecycle hooks in the order a run calls them, with made-up metrics, and no training.

    Per stage: ``on_stage_start``; per epoch (``epoch`` 0-based) ``on_train_step_end`` after every
    optimizer update, ``on_validation_end`` in validation epochs, ``on_checkpoint_saved`` (``last``,
    then ``best``), ``on_epoch_end``; then ``on_stage_end``; finally ``on_run_end``. Hooks the framework
    does not define are skipped. ``metrics(stage, epoch)`` gives the validation metrics
    (default: a PSNR rising by one per epoch). Register the plugin under test first (:func:`registered`).
    """
    trainer = trainer or FakeTrainer()
    stages = list(stages) if stages is not None else [make_stage()]
    metrics = metrics or (lambda stage, epoch: {"val/loss": 1.0 / (epoch + 1), "val/psnr": 20.0 + epoch})
    results: dict[str, dict] = {}
    step = 0
    for stage in stages:
        trainer.call("on_stage_start", stage=stage)
        last: dict = {}
        for epoch in range(epochs):
            for _ in range(steps_per_epoch):
                step += 1
                trainer.call("on_train_step_end", stage=stage, step=step,
                             metrics={"train/loss": 1.0 / step, "train/lr": 1e-4})
            if (epoch + 1) % val_every == 0 or epoch == epochs - 1:
                last = dict(metrics(stage, epoch))
                trainer.call("on_validation_end", stage=stage, epoch=epoch, metrics=last)
            folder = (trainer.run_dir / stage.name) if trainer.run_dir is not None else Path(stage.name)
            trainer.call("on_checkpoint_saved", stage=stage, path=folder / "last", kind="last")
            trainer.call("on_checkpoint_saved", stage=stage, path=folder / "best", kind="best")
            trainer.call("on_epoch_end", stage=stage, epoch=epoch, metrics=last)
        trainer.call("on_stage_end", stage=stage, metrics=last)
        results[stage.name] = last
    trainer.call("on_run_end", results=results)
    return trainer

"""Differentiable, batched DRR projector (parallel and cone beam) and its back-projection.

The projector is slab based (Joseph's method): the volume is cut into slices perpendicular to the
volume axis closest to each view's central ray; every detector ray crosses every slice once, so a
view is the sum over slices of a 2D bilinear resampling of each slice (``grid_sample`` over a chunk of
slices at a time, its adjoint ``grid_sampler_2d_backward`` the same way in the backward), times the
ray's path length through one slice. Channels share the sampling; an elementwise map of the volume
(``pointwise``, e.g. the spectral simulator's material densities) is applied to each chunk of slices as
it is sampled, so its channels are never formed for the whole volume. Before projecting, the volume is
area-averaged down to the detector's footprint at the isocentre (``prefilter``): a detector pixel
integrates over that footprint, and averaging first removes aliasing and most of the work.
The rays' slice coordinates depend only on the geometry, so they are kept in a small cache of
plans (training projects with the same geometry at every step).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ..conventions import DEFAULT_HU_WINDOW, unit_to_hu
from .geometry import batched, magnification, view_frames

MU_WATER = 0.02  # linear attenuation of water per mm at about 60 keV


def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER) -> torch.Tensor:
    """HU -> linear attenuation per mm; air and anything below clamps to 0."""
    return torch.clamp(mu_water * (1.0 + hu / 1000.0), min=0.0)


def _det_shape(g: Mapping[str, torch.Tensor], det_shape) -> tuple[int, int]:
    if det_shape is None:
        rows, cols = g["detector_px"][0, 0].tolist()
        return int(rows), int(cols)
    if isinstance(det_shape, int):
        return det_shape, det_shape
    return int(det_shape[0]), int(det_shape[1])


_WORKSPACE: OrderedDict = OrderedDict()
_WORKSPACE_SIZE = 4


def _workspace(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable scratch tensor for intermediates that are never returned nor saved for backward.

    Large fresh allocations are returned to the system on free, so each call would page-fault
    through them again; reusing the memory saves that (a large share of the time on a busy machine).
    """
    key = (tuple(shape), like.dtype, like.device)
    buf = _WORKSPACE.pop(key, None)
    if buf is None:
        buf = like.new_empty(shape)
    _WORKSPACE[key] = buf
    while len(_WORKSPACE) > _WORKSPACE_SIZE:
        _WORKSPACE.popitem(last=False)
    return buf


class _BoxAverage(torch.autograd.Function):
    """Average over k-voxel windows along the three spatial axes, a partial last window counting air
    for its missing voxels. Forward: strided slice sums (vectorised, one pass per axis, the axis
    with contiguous rows first); backward: the adjoint, each pooled gradient spread over its window."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: tuple[int, int, int]) -> torch.Tensor:
        ctx.k, ctx.shape = k, x.shape
        axes = [a for a in (3, 2, 4) if k[a - 2] > 1]  # H, D, W: the innermost (W) last, on the smallest array
        for axis in axes:
            kk = k[axis - 2]
            n = x.shape[axis]
            full = n // kk
            shape = (*x.shape[:axis], -(-n // kk), *x.shape[axis + 1:])
            out = x.new_empty(shape) if axis == axes[-1] else _workspace(shape, x)
            body = out.narrow(axis, 0, full)
            torch.add(x.narrow(axis, 0, full * kk)[_every(axis, kk, 0)],
                      x.narrow(axis, 0, full * kk)[_every(axis, kk, 1)], out=body)
            for j in range(2, kk):
                body += x.narrow(axis, 0, full * kk)[_every(axis, kk, j)]
            if n % kk:
                torch.sum(x.narrow(axis, full * kk, n % kk), dim=axis, keepdim=True, out=out.narrow(axis, full, 1))
            x = out
        return x * (1.0 / (k[0] * k[1] * k[2]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        b, c, m_d, m_h, m_w = grad.shape
        grad = grad * (1.0 / (k[0] * k[1] * k[2]))
        buf = grad.new_empty(b, c, m_d, k[0], m_h, k[1], m_w, k[2])
        buf.copy_(grad[:, :, :, None, :, None, :, None].expand_as(buf))  # one pass over the full-size gradient
        buf = buf.view(b, c, m_d * k[0], m_h * k[1], m_w * k[2])
        d, h, w = ctx.shape[-3:]
        return buf[:, :, :d, :h, :w], None


def _every(axis: int, k: int, start: int) -> tuple:
    return (slice(None),) * axis + (slice(start, None, k),)


def _prefilter_factors(g: Mapping[str, torch.Tensor], det_shape: tuple[int, int], vox: torch.Tensor,
                       oversample: float) -> tuple[int, int, int]:
    """Voxels averaged along (z, y, x): the smallest detector footprint at the isocentre over the voxel size."""
    mag = magnification(g)
    foot_u = float((g["detector_mm"][..., 0] / det_shape[1] / mag).min()) / oversample
    foot_v = float((g["detector_mm"][..., 1] / det_shape[0] / mag).min()) / oversample
    sx, sy, sz = vox.tolist()
    return max(1, int(foot_v / sz + 1e-6)), max(1, int(foot_u / sy + 1e-6)), max(1, int(foot_u / sx + 1e-6))


def _prefilter(mu: torch.Tensor, g: Mapping[str, torch.Tensor], det_shape: tuple[int, int], vox: torch.Tensor,
               oversample: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area-average ``mu`` to the smallest detector footprint at the isocentre; returns (mu, voxel mm, centre mm).

    A partial window at the far edge of an axis averages the volume padded with air, so the pooled
    grid extends a little past the volume and its centre moves by half the padding (``centre``).
    """
    k = _prefilter_factors(g, det_shape, vox, oversample)
    if k == (1, 1, 1):
        return mu, vox, torch.zeros(3, dtype=vox.dtype)
    pooled = _BoxAverage.apply(mu, k)
    centre = torch.zeros(3, dtype=vox.dtype)
    for axis, (n, kk) in enumerate(zip(mu.shape[-3:], k)):
        if n % kk:
            centre[2 - axis] = (kk - n % kk) / 2 * vox[2 - axis]  # (x, y, z) order
    return pooled, vox * torch.tensor([k[2], k[1], k[0]], dtype=vox.dtype), centre


def detector_rays(g: Mapping[str, torch.Tensor], det_shape: tuple[int, int],
                  shift: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per detector pixel a point on its ray and the ray's direction: ``[B, V, h, w, 3]`` each.

    ``shift`` = (along u, along v) moves every pixel centre back by that fraction of the detector's
    width and height (a strided feature map's centre offset; 0 for the projector's own pixels).
    """
    h, w = det_shape
    fr = view_frames(g)
    dev, dt = g["angles"].device, g["angles"].dtype
    du, dv = g["detector_mm"][..., 0:1], g["detector_mm"][..., 1:2]
    cu = (torch.arange(w, device=dev, dtype=dt) + 0.5 - w / 2) * (du / w) - shift[0] * du  # [B, V, w]
    rv = (torch.arange(h, device=dev, dtype=dt) + 0.5 - h / 2) * (dv / h) - shift[1] * dv  # [B, V, h]
    pix = (fr["center"][:, :, None, None, :] + cu[:, :, None, :, None] * fr["u"][:, :, None, None, :]
           + rv[:, :, :, None, None] * fr["v"][:, :, None, None, :])
    cone = (g["cone"] > 0.5)[:, :, None, None, None]
    src = fr["source"][:, :, None, None, :].expand_as(pix)
    origin = torch.where(cone, src, pix)
    direction = torch.where(cone, pix - src, fr["ray"][:, :, None, None, :].expand_as(pix))
    return origin, direction


_rays = detector_rays  # the projector's name for it


class _Group(NamedTuple):
    """Views of one case that share a slicing axis (0: slices normal to x, 1: normal to y)."""

    axis: int
    views: list[int]
    grid_a: torch.Tensor  # [n, h, w, 2]: normalised slice coordinates = grid_a + s * grid_k
    grid_k: torch.Tensor
    weight: torch.Tensor  # [n, 1, h, w]: path length of each ray through one slice
    s: torch.Tensor  # [T] slice positions in mm
    grid: torch.Tensor | None  # [T, n * h, w, 2] precomputed when small enough, else built per chunk


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 8
GRID_CACHE_ELEMS = 1 << 23  # precompute a group's sampling grid up to this many numbers (32 MB in float32)
PLAN_CACHE_ELEMS = 1 << 25  # and keep at most this many numbers of grids across cached plans


class _Plan(NamedTuple):
    groups: list[_Group]


def _plan(g: Mapping[str, torch.Tensor], det_shape: tuple[int, int], shape: tuple[int, int, int],
          vox: torch.Tensor, centre: torch.Tensor) -> _Plan:
    """Per-ray slice coordinates of one case's views (``g`` batched for one case), cached like an FFT
    plan: training projects with the same geometry at every step."""
    dev, dt = g["angles"].device, g["angles"].dtype
    key = (tuple((k, tuple(t.shape), tuple(t.flatten().tolist())) for k, t in sorted(g.items())), det_shape, shape,
           tuple(vox.tolist()), tuple(centre.tolist()), str(dev), dt)
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    d, hh, ww = shape
    h, w = det_shape
    ray = view_frames(g)["ray"][0]
    axis = (ray[:, 1].abs() >= ray[:, 0].abs()).long()  # [V]
    origin, direction = _rays(g, det_shape)
    origin, direction = origin[0], direction[0]
    ext = vox * torch.tensor([ww, hh, d], dtype=vox.dtype)
    groups = []
    for a in (0, 1):
        views = axis.eq(a).nonzero().flatten().tolist()
        if not views:
            continue
        other = 1 - a
        org, dirn = origin[views], direction[views]
        ra = dirn[..., a]
        k = torch.stack([dirn[..., other], dirn[..., 2]], -1) / ra[..., None]
        a0 = torch.stack([org[..., other], org[..., 2]], -1) - org[..., a:a + 1] * k
        half = torch.tensor([float(ext[other]) / 2, float(ext[2]) / 2], device=dev, dtype=dt)
        ctr = torch.tensor([float(centre[other]), float(centre[2])], device=dev, dtype=dt)
        weight = (float(vox[a]) * dirn.norm(dim=-1) / ra.abs())[:, None]
        t_count = ww if a == 0 else hh
        s = (torch.arange(t_count, device=dev, dtype=dt) + 0.5 - t_count / 2) * float(vox[a]) + float(centre[a])
        grid_a, grid_k = (a0 - ctr) / half, k / half
        grid = None
        if t_count * len(views) * h * w * 2 <= GRID_CACHE_ELEMS:
            grid = _grid(grid_a, grid_k, s)
        groups.append(_Group(a, views, grid_a, grid_k, weight, s, grid))
    groups.sort(key=lambda grp: grp.views[0])  # PA before lateral: the views often come out in order
    groups = _Plan(groups)
    _PLANS[key] = groups

    def cached() -> int:
        return sum(grp.grid.numel() for plan in _PLANS.values() for grp in plan.groups if grp.grid is not None)

    while len(_PLANS) > 1 and (len(_PLANS) > _PLAN_CACHE_SIZE or cached() > PLAN_CACHE_ELEMS):
        _PLANS.popitem(last=False)
    return groups


def _grid(grid_a: torch.Tensor, grid_k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Sampling grid ``[T, n * h, w, 2]`` of the slices at positions ``s`` for rays ``[n, h, w]``."""
    n, h, w, _ = grid_a.shape
    grid = torch.addcmul(grid_a[None], s[:, None, None, None, None], grid_k[None])
    return grid.view(s.shape[0], n * h, w, 2)


_PATTERNS = {0: "b c d h w -> w (b c) d h", 1: "b c d h w -> h (b c) d w"}  # a group's slices, [T, (b c), d, h]
SLICE_CHUNK_ELEMS = 1 << 20  # on CPU, slices are sampled about this many numbers at a time (per slice chunk)


def _slice_chunks(grp: _Group, per_slice: int, device: torch.device, chunk_elems: int):
    """(first slice, end, sampling grid) of each chunk of a group's slices: on CPU about ``SLICE_CHUNK_ELEMS``
    numbers a chunk, elsewhere the whole group; a grid not precomputed is built a chunk at a time, at most
    ``chunk_elems`` numbers."""
    t_count = grp.s.shape[0]
    step = t_count if device.type != "cpu" else max(1, min(t_count, SLICE_CHUNK_ELEMS // max(1, per_slice)))
    if grp.grid is None:
        n, h, w, _ = grp.grid_a.shape
        step = max(1, min(step, chunk_elems // max(1, n * h * w * 2)))
    for t0 in range(0, t_count, step):
        t1 = min(t_count, t0 + step)
        grid = grp.grid[t0:t1] if grp.grid is not None else _grid(grp.grid_a, grp.grid_k, grp.s[t0:t1])
        yield t0, t1, grid


def _slice_sums(mu: torch.Tensor, plan: _Plan, pointwise, chunk_elems: int) -> list[torch.Tensor]:
    """Per group of ``plan``, the sum over its slices of each slice's bilinear samples at the rays' crossings,
    ``[(b c'), n * h, w]``: c' = C, or the channels of ``pointwise`` applied to each slice of a one-channel
    ``mu`` (an elementwise map commutes with the slicing). A chunk of slices at a time: each chunk is
    gathered contiguous from ``mu`` (a transposing copy of a few slices), mapped, sampled and summed."""
    b, c = mu.shape[:2]
    ch = b * c * (pointwise.channels if pointwise is not None else 1)
    outs = []
    for grp in plan.groups:
        n, h, w, _ = grp.grid_a.shape
        view = rearrange(mu, _PATTERNS[grp.axis])
        total = None  # in grid_sample's output dtype (under autocast, not necessarily mu's)
        for t0, t1, grid in _slice_chunks(grp, ch * max(view[0].numel() // (b * c), n * h * w), mu.device,
                                          chunk_elems):
            src = view[t0:t1].contiguous()
            if pointwise is not None:
                src = pointwise.apply(src).flatten(1, 2)
            part = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).sum(0)
            total = part if total is None else total.add_(part)
        outs.append(total)
    return outs


def _slice_adjoint(grads, plan: _Plan, pointwise, mu: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """The adjoint of ``_slice_sums`` (its gradient to ``mu`` for the gradients ``grads`` of its sums): per chunk
    of slices the adjoint of the sampling (``grid_sampler_2d_backward``, each sum's gradient broadcast over
    the chunk's slices), then ``pointwise.vjp``, added into the volume's gradient through the same
    transposed view. Without ``pointwise``, ``mu`` is read for its shape only."""
    b, c = mu.shape[:2]
    ch = b * c * (pointwise.channels if pointwise is not None else 1)
    grad_mu = torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device)
    for grp, grad in zip(plan.groups, grads):
        if grad is None:
            continue
        n, h, w, _ = grp.grid_a.shape
        grad = grad.contiguous()
        view = rearrange(mu, _PATTERNS[grp.axis])
        grad_view = rearrange(grad_mu, _PATTERNS[grp.axis])
        slice_shape = view.shape[2:]
        for t0, t1, grid in _slice_chunks(grp, ch * max(view[0].numel() // (b * c), n * h * w), mu.device,
                                          chunk_elems):
            # one dtype for the sampler's backward: under autocast the sums' gradient is float32 while a
            # low-precision volume's grid may not be
            dt = torch.promote_types(grad.dtype, grid.dtype)
            g, grid = grad.to(dt), grid.to(dt)
            like = g.new_empty((t1 - t0, ch, *slice_shape))  # read for its shape only: never written
            gin, _ = torch.ops.aten.grid_sampler_2d_backward(g.expand(t1 - t0, *g.shape), like, grid,
                                                             0, 0, False, [True, False])
            if pointwise is not None:
                gin = pointwise.vjp(view[t0:t1].contiguous(), gin.view(t1 - t0, b * c, pointwise.channels,
                                                                       *slice_shape))
            grad_view[t0:t1] += gin.to(grad_view.dtype)
    return grad_mu


class _SliceSums(torch.autograd.Function):
    """``_slice_sums`` with ``_slice_adjoint`` as its backward: the mapped channels and the per-slice samples
    never exist for the whole volume (no large allocations, each pass runs in cache), and only ``mu`` is kept
    for backward (and only with a ``pointwise`` map, whose backward reads it). Without a map the backward
    is itself differentiable (``_SliceAdjoint``), so a projection can be differentiated twice; with a map,
    twice-differentiating forms the mapped channels' adjoint whole and differentiates the map's vjp in its
    gradient (a piecewise-linear map's second derivative is zero almost everywhere)."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, plan: _Plan, pointwise, chunk_elems: int) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.pointwise, ctx.chunk_elems = plan, pointwise, chunk_elems
        if pointwise is not None:
            ctx.save_for_backward(mu)
        else:
            ctx.like = mu.new_empty(()).expand(mu.shape)
        return tuple(_slice_sums(mu, plan, pointwise, chunk_elems))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if ctx.pointwise is None:
            return _SliceAdjoint.apply(ctx.like, ctx.plan, ctx.chunk_elems, *grads), None, None, None
        (mu,) = ctx.saved_tensors
        if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
            # differentiated twice: the mapped channels' adjoint whole (differentiable), then the map's vjp
            like = mu.new_empty(()).expand(mu.shape[0], ctx.pointwise.channels, *mu.shape[2:])
            adjoint = _SliceAdjoint.apply(like, ctx.plan, ctx.chunk_elems, *grads)
            return ctx.pointwise.vjp(mu, adjoint.unsqueeze(1)), None, None, None
        return _slice_adjoint(grads, ctx.plan, ctx.pointwise, mu, ctx.chunk_elems), None, None, None


class _SliceAdjoint(torch.autograd.Function):
    """``_slice_adjoint`` without a map (linear in the gradients), its backward the projection ``_SliceSums``."""

    @staticmethod
    def forward(ctx, like: torch.Tensor, plan: _Plan, chunk_elems: int, *grads: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.chunk_elems, ctx.present = plan, chunk_elems, [g is not None for g in grads]
        return _slice_adjoint(grads, plan, None, like, chunk_elems)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sums = _SliceSums.apply(grad, ctx.plan, None, ctx.chunk_elems)
        return (None, None, None, *[s if present else None for s, present in zip(sums, ctx.present)])


def project(mu: torch.Tensor, geometry: Mapping[str, torch.Tensor], det_shape: tuple[int, int] | int | None = None,
            *, prefilter: bool = True, oversample: float = 1.0, chunk_elems: int = 1 << 24,
            pointwise=None) -> torch.Tensor:
    """Line integrals of ``mu`` ``[B, C, D, H, W]`` (per mm) for every view: ``[B, V, C, h, w]``.

    ``det_shape`` is the detector's (rows, columns); by default the geometry's ``detector_px``.
    ``prefilter`` area-averages the volume to the detector footprint (``oversample`` > 1 keeps a
    finer sampling). Differentiable in ``mu``. Cases with different geometries are projected one by one.

    ``pointwise`` (one-channel ``mu`` only) projects the channels of an elementwise map of ``mu`` instead of
    ``mu``: an object with ``channels`` (C'), ``apply(t)`` (``[N0, N1, ...]`` -> ``[N0, N1, C', ...]``),
    ``vjp(t, grad)`` (its backward) and ``__call__`` (the same map, differentiable); the result is
    ``[B, V, C', h, w]``, equal to projecting ``pointwise(mu)``, without the C' volumes ever being formed
    whole (each chunk of slices is mapped as it is sampled). When the prefilter averages voxels, the map
    comes first (it does not commute with averaging) and the averaged channels are projected.
    """
    if mu.dim() != 5:
        raise ValueError(f"project expects a volume [B, C, D, H, W], got shape {tuple(mu.shape)}")
    b, c = mu.shape[:2]
    if pointwise is not None and c != 1:
        raise ValueError(f"project with a pointwise map expects one channel, got {c}")
    g = batched(geometry, b, mu.device, mu.dtype)
    det_shape = _det_shape(g, det_shape)
    vol_mm = g["volume_mm"]
    if not torch.equal(vol_mm, vol_mm[:, :1].expand_as(vol_mm)):
        raise ValueError("all views of a case must share one volume_mm")
    if b > 1 and not all(torch.equal(t, t[:1].expand_as(t)) for t in g.values()):
        kw = {"prefilter": prefilter, "oversample": oversample, "chunk_elems": chunk_elems, "pointwise": pointwise}
        return torch.cat([project(mu[i:i + 1], {k: t[i:i + 1] for k, t in g.items()}, det_shape, **kw)
                          for i in range(b)])
    g = {k: t[:1] for k, t in g.items()}
    d, hh, ww = mu.shape[-3:]
    vox = vol_mm[0, 0].detach().cpu().double() / torch.tensor([ww, hh, d], dtype=torch.float64)
    centre = torch.zeros(3, dtype=torch.float64)
    if prefilter:
        if pointwise is not None and _prefilter_factors(g, det_shape, vox, oversample) != (1, 1, 1):
            mu, pointwise = pointwise(mu).flatten(1, 2), None
        mu, vox, centre = _prefilter(mu, g, det_shape, vox, oversample)
    plan = _plan(g, det_shape, tuple(mu.shape[-3:]), vox, centre)
    sums = _SliceSums.apply(mu, plan, pointwise, chunk_elems)
    parts = [rearrange(t, "(b c) (n h) w -> b n c h w", b=b, n=grp.grid_a.shape[0]) * grp.weight
             for t, grp in zip(sums, plan.groups)]
    if len(parts) == 1:
        return parts[0]
    order = [v for grp in plan.groups for v in grp.views]
    if order == sorted(order):
        return torch.cat(parts, 1)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts, 1)[:, inverse.to(mu.device)]


def _on_detector(g: Mapping[str, torch.Tensor], fr: dict[str, torch.Tensor], dot, per_view) -> tuple[torch.Tensor, ...]:
    """Where points land on each view's detector, the one point-to-detector projection of the package.

    ``dot(vec)`` gives ``(point - source) . vec`` for a per-view frame vector ``vec [B, V, 3]`` over the points'
    layout; ``per_view`` broadcasts a ``[B, V]`` tensor to that layout. Returns ``(gu, gv, depth, cone)``: the
    detector coordinates in ``grid_sample`` units (``align_corners=False``: -1 and 1 are the detector's outer
    edges; u along columns, v along rows), the depth along the central ray, and the cone-beam mask."""
    src = fr["source"]
    cone = per_view(g["cone"] > 0.5)
    depth = dot(fr["ray"])
    scale = torch.where(cone, per_view(g["sdd"]) / depth.clamp_min(1e-3), torch.ones_like(depth))
    base = src - fr["center"]
    cu = per_view((base * fr["u"]).sum(-1)) + scale * dot(fr["u"])
    cv = per_view((base * fr["v"]).sum(-1)) + scale * dot(fr["v"])
    gu = cu / per_view(g["detector_mm"][..., 0] / 2)
    gv = cv / per_view(g["detector_mm"][..., 1] / 2)
    return gu, gv, depth, cone


def project_points(points: torch.Tensor, geometry: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where world points ``[B, N, 3]`` (mm) project in every view: ``(uv [B, V, N, 2], visible [B, V, N])``.

    ``uv`` is in ``grid_sample`` coordinates of the detector image (``align_corners=False``: -1 and 1
    are the detector's outer edges; u along columns, v along rows), from the same geometry as the
    projector; ``visible`` is 1 where the point falls on the detector in front of the source.
    """
    b = points.shape[0]
    g = batched(geometry, b, points.device, torch.float32)
    fr = view_frames(g)
    rel = points.float()[:, None] - fr["source"][:, :, None]          # [B, V, N, 3]

    def dot(vec: torch.Tensor) -> torch.Tensor:  # (p - source) . vec, [B, V, N]
        return (rel * vec[:, :, None]).sum(-1)

    gu, gv, depth, cone = _on_detector(g, fr, dot, lambda t: t[..., None])
    uv = torch.stack([gu, gv], -1)
    visible = (uv.abs() <= 1).all(-1) & (~cone | (depth > 0))
    return uv, visible.float()


def _backproject_voxel(images: torch.Tensor, g: Mapping[str, torch.Tensor], grid_shape) -> torch.Tensor:
    b, v, c, h, w = images.shape
    d, hh, ww = grid_shape
    fr = view_frames(g)
    dev, dt = images.device, images.dtype

    def centres(n: int, axis: int) -> torch.Tensor:  # [B, V, n] voxel centres in mm
        return ((torch.arange(n, device=dev, dtype=dt) + 0.5) / n - 0.5) * g["volume_mm"][..., axis:axis + 1]

    px = centres(ww, 0)[:, :, None, None, :]
    py = centres(hh, 1)[:, :, None, :, None]
    pz = centres(d, 2)[:, :, :, None, None]
    src = fr["source"]

    def dot(vec: torch.Tensor) -> torch.Tensor:  # (p - source) . vec, [B, V, D, H, W]
        e = vec[:, :, None, None, None, :]
        s = src[:, :, None, None, None, :]
        return (px - s[..., 0]) * e[..., 0] + (py - s[..., 1]) * e[..., 1] + (pz - s[..., 2]) * e[..., 2]

    gu, gv, _, _ = _on_detector(g, fr, dot, lambda t: t[:, :, None, None, None])
    grid = rearrange(torch.stack([gu, gv], -1), "b v d h w two -> (b v) d (h w) two")
    out = F.grid_sample(rearrange(images, "b v c h w -> (b v) c h w"), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return rearrange(out, "(b v) c d (h w) -> b v c d h w", b=b, h=hh)


def backproject(images: torch.Tensor, geometry: Mapping[str, torch.Tensor], grid_shape: tuple[int, int, int],
                *, mode: str = "voxel") -> torch.Tensor:
    """Spread each view's image ``[B, V, C, h, w]`` back along its rays: ``[B, V, C, *grid_shape]``.

    ``mode="voxel"`` (default, for lifting 2D features into 3D) gives every voxel the bilinear
    sample of the image where its centre projects. ``mode="adjoint"`` is the exact transpose of
    ``project`` (without prefiltering), weighted by path lengths, for iterative reconstruction.
    The grid spans the geometry's ``volume_mm``.
    """
    if images.dim() != 5:
        raise ValueError(f"backproject expects images [B, V, C, h, w], got shape {tuple(images.shape)}")
    b, v, c, h, w = images.shape
    g = batched(geometry, b, images.device, images.dtype)
    if g["angles"].shape[1] != v:
        raise ValueError(f"images hold {v} views but the geometry has {g['angles'].shape[1]} views")
    grid_shape = tuple(int(x) for x in grid_shape)
    if mode == "voxel":
        return _backproject_voxel(images, g, grid_shape)
    if mode != "adjoint":
        raise ValueError(f"mode must be 'voxel' or 'adjoint', got {mode!r}")
    flat = {k: rearrange(t, "b v ... -> (b v) 1 ...") for k, t in g.items()}
    with torch.enable_grad():
        x = images.new_zeros(b * v, c, *grid_shape, requires_grad=True)
        y = project(x, flat, (h, w), prefilter=False)
        (grad,) = torch.autograd.grad(y, x, grad_outputs=rearrange(images, "b v c h w -> (b v) 1 c h w"),
                                      create_graph=images.requires_grad)
    return rearrange(grad, "(b v) c d h w -> b v c d h w", b=b)


def drr(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
        det_shape: tuple[int, int] | int | None = None, mu_water: float = MU_WATER, beer_lambert: bool = False,
        max_path: float | None = None, **project_options) -> torch.Tensor:
    """DRR in [0, 1] from a CT in [0, 1] (after the HU window) ``[B, 1, D, H, W]``: ``[B, V, 1, h, w]``.

    HU -> attenuation (``hu_to_mu``) -> line integral. Linear mode divides the line integral by
    ``max_path`` (default: water across the volume's largest extent, ``mu_water * max(volume_mm)``)
    and clips to [0, 1]; ``beer_lambert`` returns the absorbed fraction ``1 - exp(-line)``. Both
    show attenuating structures bright.
    """
    mu = hu_to_mu(unit_to_hu(ct01, hu_window), mu_water)
    line = project(mu, geometry, det_shape, **project_options)
    if beer_lambert:
        return 1.0 - torch.exp(-line)
    if max_path is None:
        vol = torch.as_tensor(geometry["volume_mm"])
        max_path = mu_water * float(vol.max())
    return torch.clamp(line / max_path, 0.0, 1.0)

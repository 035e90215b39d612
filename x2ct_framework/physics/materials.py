"""Materials of the spectral simulator: compositions, their mass attenuation, and CT numbers -> material densities.

Compositions are the ICRU Report 44 tissues as NIST lists them (elemental mass fractions, density in
g/cm^3); iodine-enhanced blood is whole blood with 12 mg/ml of iodine (a CT pulmonary angiogram's
contrast-filled vessels). Mass attenuation (cm^2/g, total cross sections incl. coherent scattering)
comes from NIST's data through ``xraydb``, tabulated once by ``make_xray_tables.py`` at 1 keV steps
(``TABLE_ENERGIES_KEV``) so that nothing is computed or downloaded at run time.

CT number -> materials follows Schneider, Bortfeld and Schlegel (Phys. Med. Biol. 45, 2000): a
piecewise-linear scheme over HU nodes, each node a material and a mass density; between two nodes a
voxel is a mix of the two materials whose mass fractions and density are interpolated linearly in HU.
Each material's partial density is itself piecewise linear in HU (its node density at its own
nodes, 0 at the others), so the total density is linear between nodes and a voxel between two
nodes of different materials is their mix. Below the first node a voxel is air; above the last it
is cortical bone, its density extrapolated along the last segment. ``HU_NODES`` is the default
scheme; ``HU_NODES_CONTRAST`` (a CTPA) puts
iodine-enhanced blood between soft tissue and bone, so HU alone cannot tell contrast from trabecular
bone; with a label map, the labels in ``CONTRAST_LABELS`` (vessels, heart) use the contrast scheme
and every other voxel the default one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..conventions import HEART, VESSEL

TABLE_ENERGIES_KEV: tuple[float, ...] = tuple(e + 0.5 for e in range(10, 150))  # spekpy's 1 keV bin centres

_IODINE_MG_PER_ML = 12.0
_BLOOD = {"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001, "S": 0.002, "Cl": 0.003,
          "K": 0.002, "Fe": 0.001}
_W_IODINE = _IODINE_MG_PER_ML / 1000.0 / (1.06 + _IODINE_MG_PER_ML / 1000.0)

# name -> (element -> mass fraction, nominal density g/cm^3)
COMPOSITIONS: dict[str, tuple[dict[str, float], float]] = {
    "air": ({"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}, 0.001205),
    "lung": ({"H": 0.103, "C": 0.105, "N": 0.031, "O": 0.749, "Na": 0.002, "P": 0.002, "S": 0.003, "Cl": 0.003,
              "K": 0.002}, 1.05),
    "adipose": ({"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001, "Cl": 0.001}, 0.95),
    "soft_tissue": ({"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.708, "Na": 0.002, "P": 0.003, "S": 0.003,
                     "Cl": 0.002, "K": 0.003}, 1.06),
    "bone": ({"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001, "Mg": 0.002, "P": 0.103, "S": 0.003,
              "Ca": 0.225}, 1.92),
    "iodine_blood": ({**{k: v * (1 - _W_IODINE) for k, v in _BLOOD.items()}, "I": _W_IODINE},
                     1.06 + _IODINE_MG_PER_ML / 1000.0),
    # not in the body: references and filters
    "water": ({"H": 0.111894, "O": 0.888106}, 1.0),
    "aluminium": ({"Al": 1.0}, 2.699),
    "copper": ({"Cu": 1.0}, 8.96),
}

BODY_MATERIALS: tuple[str, ...] = ("air", "lung", "adipose", "soft_tissue", "bone", "iodine_blood")

# (HU, material, density g/cm^3): the piecewise-linear scheme (see the module's docstring)
HU_NODES: tuple[tuple[float, str, float], ...] = (
    (-1000.0, "air", 0.001205), (-900.0, "lung", 0.10), (-250.0, "lung", 0.75), (-100.0, "adipose", 0.95),
    (40.0, "soft_tissue", 1.05), (100.0, "soft_tissue", 1.10), (1500.0, "bone", 1.92))
HU_NODES_CONTRAST: tuple[tuple[float, str, float], ...] = HU_NODES[:5] + (
    (400.0, "iodine_blood", 1.072), (1500.0, "bone", 1.92))
CONTRAST_LABELS: tuple[int, ...] = (VESSEL, HEART)


def _tables():
    from . import _xray_tables

    return _xray_tables


def mass_attenuation(name: str, energies_kev: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """(mu/rho) of material ``name`` in cm^2/g (float64) at ``energies_kev`` (default: every table energy).

    Between table energies the value is interpolated log-log (exact at the table's 1 keV bin centres,
    which the simulator uses); outside the table's range it raises.
    """
    tables = _tables()
    if name not in tables.MASS_ATTENUATION:
        raise KeyError(f"unknown material {name!r} (known: {', '.join(tables.MASS_ATTENUATION)})")
    table_e = torch.tensor(tables.ENERGIES_KEV, dtype=torch.float64)
    values = torch.tensor(tables.MASS_ATTENUATION[name], dtype=torch.float64)
    if energies_kev is None:
        return values
    e = torch.as_tensor(energies_kev, dtype=torch.float64).flatten()
    if float(e.min()) < float(table_e[0]) - 1e-9 or float(e.max()) > float(table_e[-1]) + 1e-9:
        raise ValueError(f"energies must lie in [{float(table_e[0])}, {float(table_e[-1])}] keV, got "
                         f"[{float(e.min())}, {float(e.max())}]")
    i = torch.searchsorted(table_e, e).clamp(1, len(table_e) - 1)
    e0, e1 = table_e[i - 1], table_e[i]
    t = (e.log() - e0.log()) / (e1.log() - e0.log())
    return torch.exp(values[i - 1].log() * (1 - t) + values[i].log() * t)


def _linear_pieces(nodes, material: str) -> tuple[float, list[tuple[float, float, float]], float, float]:
    """Material ``material``'s partial density as ``const + sum_i coef_i * clamp(hu, lo_i, hi_i) + ext *
    relu(hu - top)``: a piecewise-linear function of HU whose value at each node is the node's density
    when the node is that material and 0 otherwise. Returns (const, [(lo, hi, coef)], ext, top)."""
    dens = [n[2] if n[1] == material else 0.0 for n in nodes]
    const = dens[0]
    pieces = []
    for i in range(len(nodes) - 1):
        lo, hi = nodes[i][0], nodes[i + 1][0]
        coef = (dens[i + 1] - dens[i]) / (hi - lo)
        if coef:
            pieces.append((lo, hi, coef))
            const -= coef * lo
    # above the top node the total density goes on along the last segment's slope
    (h0, _, r0), (h1, _, r1) = nodes[-2], nodes[-1]
    ext = (r1 - r0) / (h1 - h0) if nodes[-1][1] == material else 0.0
    return const, pieces, ext, h1


class _Scheme(NamedTuple):
    """A HU scheme over named materials in the CT's intensity units (``hu = a + b * x``), ready to evaluate."""

    consts: tuple[float, ...]  # [M] each material's ``const`` of ``_linear_pieces`` (thresholds in x)
    segments: tuple[tuple[float, float, tuple[tuple[int, float], ...]], ...]  # (lo, hi, ((material, coef), ...))
    ext: tuple[tuple[int, float], ...]  # (material, slope) above the top node
    top: float
    knots: tuple[float, ...]  # every node, increasing
    slopes: tuple[tuple[float, ...], ...]  # [2 * len(knots) + 1][M], rows as ``_Densities.backward`` buckets x


@functools.lru_cache(maxsize=64)
def _scheme(nodes, materials: tuple[str, ...], a: float, b: float) -> _Scheme:
    consts, per_segment, ext = [], {}, []
    for m, name in enumerate(materials):
        const, pieces, e, _ = _linear_pieces(nodes, name)
        consts.append(const + sum(coef * a for _, _, coef in pieces))
        for lo, hi, coef in pieces:
            per_segment.setdefault(((lo - a) / b, (hi - a) / b), []).append((m, coef * b))
        if e:
            ext.append((m, e * b))
    knots = tuple((n[0] - a) / b for n in nodes)
    # rows: 0 = below the first node, 2j + 1 = exactly at node j (slope 0: there the one-sided slopes disagree),
    # 2j + 2 = strictly between node j and node j + 1 (above the top node: its extension)
    slopes = [[0.0] * len(materials) for _ in range(2 * len(knots) + 1)]
    for j in range(len(knots)):
        terms = ext if j == len(knots) - 1 else per_segment.get((knots[j], knots[j + 1]), [])
        for m, coef in terms:
            slopes[2 * j + 2][m] = coef
    segments = tuple((lo, hi, tuple(terms)) for (lo, hi), terms in sorted(per_segment.items()))
    return _Scheme(tuple(consts), segments, tuple(ext), knots[-1], knots, tuple(tuple(r) for r in slopes))


CHUNK_ELEMS = 1 << 18  # on CPU, densities are formed this many voxels at a time (their passes stay in cache)


def _chunks(x: torch.Tensor):
    """Row ranges of ``x``'s first axis of about ``CHUNK_ELEMS`` voxels each (one range off the CPU)."""
    n = x.shape[0]
    rows = n if x.device.type != "cpu" else max(1, CHUNK_ELEMS // max(1, x[:1].numel()))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _densities_into(x: torch.Tensor, scheme: _Scheme, dim: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (``x``'s shape with the material axis inserted at ``dim``) = every material's density of ``x``.
    Each segment's clamp is formed once, shared by the (at most two) materials that change along it."""
    along = 1 if dim == 0 else 0
    tmp = None
    for i0, i1 in _chunks(x):
        xc, oc = x[i0:i1], out.narrow(along, i0, i1 - i0)
        if tmp is None or tmp.shape != xc.shape:
            tmp = torch.empty(xc.shape, dtype=x.dtype, device=x.device)
        for m, const in enumerate(scheme.consts):
            oc.select(dim, m).fill_(const)
        for lo, hi, terms in scheme.segments:
            torch.clamp(xc, lo, hi, out=tmp)
            for m, coef in terms:
                oc.select(dim, m).add_(tmp, alpha=coef)
        if scheme.ext:
            torch.sub(xc, scheme.top, out=tmp).relu_()
            for m, coef in scheme.ext:
                oc.select(dim, m).add_(tmp, alpha=coef)
    return out


def _densities_vjp(x: torch.Tensor, grad: torch.Tensor, scheme: _Scheme, dim: int) -> torch.Tensor:
    """The gradient to ``x`` of ``sum(grad * densities(x))``: one bucketing of ``x`` (against each node and the
    next representable number above it, so a value exactly at a node gets slope 0 like the forward's clamps),
    then per material its slope in that bucket (a gather from a small table) times its gradient."""
    knots = torch.tensor(scheme.knots, dtype=x.dtype, device=x.device)
    bounds = torch.stack([knots, torch.nextafter(knots, torch.full_like(knots, math.inf))], 1).flatten()
    table = torch.tensor(scheme.slopes, dtype=x.dtype, device=x.device).t().contiguous()  # [M, rows]
    used = [m for m in range(table.shape[0]) if any(row[m] for row in scheme.slopes)]
    grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    along = 1 if dim == 0 else 0
    for i0, i1 in _chunks(x):
        idx = torch.bucketize(x[i0:i1].reshape(-1), bounds, out_int32=True, right=True)  # number of bounds <= x
        flat = grad_x[i0:i1].view(-1)
        gc = grad.narrow(along, i0, i1 - i0)
        for m in used:
            flat.addcmul_(gc.select(dim, m).reshape(-1), table[m].index_select(0, idx))
    return grad_x


class _Densities(torch.autograd.Function):
    """Every material's density of one scheme, the material axis inserted at ``dim``: ``rho_m = const_m +
    sum_i coef_im clamp(x, lo_i, hi_i) + ext_m relu(x - top)``; backward ``_densities_vjp`` (the forward's
    piecewise-constant slope, M multiply-adds over the volume, no masks per segment)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scheme: _Scheme, dim: int) -> torch.Tensor:
        out = x.new_empty((*x.shape[:dim], len(scheme.consts), *x.shape[dim:]))
        ctx.save_for_backward(x)
        ctx.scheme, ctx.dim = scheme, dim
        return _densities_into(x, scheme, dim, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _densities_vjp(x, grad, ctx.scheme, ctx.dim), None, None


class DensityMap:
    """The HU scheme as a pointwise map for ``drr.project(..., pointwise=...)``: a CT in [0, 1] over ``hu_window``
    ``[N0, N1, ...]`` -> every material's density ``[N0, N1, M, ...]`` (g/cm^3). ``apply`` writes it (no
    autograd; into ``out`` when given), ``vjp`` is its backward, calling it is the differentiable map."""

    def __init__(self, materials: Sequence[str] = BODY_MATERIALS, *, contrast: bool = False,
                 hu_window: tuple[float, float] = (0.0, 1.0)):
        a, b = float(hu_window[0]), float(hu_window[1]) - float(hu_window[0])
        self.scheme = _scheme(HU_NODES_CONTRAST if contrast else HU_NODES, tuple(materials), a, b)
        self.channels = len(self.scheme.consts)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = x.new_empty((*x.shape[:2], self.channels, *x.shape[2:]))
        return _densities_into(x, self.scheme, 2, out)

    def vjp(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return _densities_vjp(x, grad, self.scheme, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _Densities.apply(x, self.scheme, 2)


def densities(x: torch.Tensor, materials: Sequence[str] = BODY_MATERIALS, *, contrast: bool = False,
              labels: torch.Tensor | None = None, hu_window: tuple[float, float] = (0.0, 1.0),
              dim: int = 0) -> torch.Tensor:
    """Every material's density (g/cm^3) in one tensor, the material axis inserted at ``dim`` of ``x``'s shape,
    for a CT ``x`` in [0, 1] over ``hu_window`` (the default (0, 1) reads ``x`` as HU). The window is folded
    into the thresholds, so HU is never formed. Differentiable in ``x`` (piecewise linear)."""
    a, b = float(hu_window[0]), float(hu_window[1]) - float(hu_window[0])
    materials = tuple(materials)
    dim = dim % (x.dim() + 1)
    if labels is None:
        return _Densities.apply(x, _scheme(HU_NODES_CONTRAST if contrast else HU_NODES, materials, a, b), dim)
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=x.device)
    for code in CONTRAST_LABELS:
        mask |= labels.to(x.device) == code
    return torch.where(mask.unsqueeze(dim), _Densities.apply(x, _scheme(HU_NODES_CONTRAST, materials, a, b), dim),
                       _Densities.apply(x, _scheme(HU_NODES, materials, a, b), dim))


def material_densities(x: torch.Tensor, materials: Sequence[str] = BODY_MATERIALS, *, contrast: bool = False,
                       labels: torch.Tensor | None = None, hu_window: tuple[float, float] = (0.0, 1.0)):
    """Yield each material's density volume (shaped like ``x``, g/cm^3) in the order of ``materials``, for a
    CT ``x`` in [0, 1] over ``hu_window`` (the default (0, 1) reads ``x`` as HU)."""
    yield from densities(x, materials, contrast=contrast, labels=labels, hu_window=hu_window).unbind(0)


def scheme_materials(contrast: bool = False, labels: bool = False) -> tuple[str, ...]:
    """The body materials a scheme uses (iodine-enhanced blood only with contrast or a label map)."""
    return BODY_MATERIALS if contrast or labels else tuple(m for m in BODY_MATERIALS if m != "iodine_blood")


def hu_to_densities(hu: torch.Tensor, materials: Sequence[str] = BODY_MATERIALS, *, contrast: bool = False,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-material mass densities ``[..., M, D, H, W]`` (g/cm^3) of a HU volume ``[..., D, H, W]``.

    ``contrast`` uses the CTPA scheme everywhere; ``labels`` (the framework's label codes, same shape
    as ``hu``) uses it only inside ``CONTRAST_LABELS``. Differentiable in ``hu`` (piecewise linear).
    """
    materials = list(materials)
    missing = {n[1] for n in HU_NODES + HU_NODES_CONTRAST} - set(materials)
    if missing - ({"iodine_blood"} if not (contrast or labels is not None) else set()):
        raise ValueError(f"the HU scheme needs materials {sorted(missing)}; got {materials}")
    return densities(hu, materials, contrast=contrast, labels=labels, dim=hu.dim() - 3)

"""Materials of the spectral simulator: compositions, their mass attenuation, and CT numbers -> material densities.

Compositions are the ICRU Report 44 tissues as NIST lists them (elemental mass fractions, density in
g/cm^3); iodine-enhanced blood is whole blood with 12 mg/ml of iodine (a CT pulmonary angiogram's
contrast-filled vessels). Mass attenuation (cm^2/g, total cross sections incl. coherent scattering)
comes from NIST's data through ``xraydb``, tabulated once by ``make_xray_tables.py`` at 1 keV steps
(``TABLE_ENERGIES_KEV``) so that nothing is computed or downloaded at run time.

CT number -> materials follows Schneider, Bortfeld and Schlegel (Phys. Med. Biol. 45, 2000): a
piecewise-linear scheme over HU nodes, each node a material and a mass density; between two nodes a
voxel is a mix of the two materials whose mass fractions and density are interpolated linearly in HU.
Below the first node a voxel is air; above the last it is cortical bone, its density extrapolated
along the last segment. ``HU_NODES`` is the default scheme; ``HU_NODES_CONTRAST`` (a CTPA) puts
iodine-enhanced blood between soft tissue and bone, so HU alone cannot tell contrast from trabecular
bone; with a label map, the labels in ``CONTRAST_LABELS`` (vessels, heart) use the contrast scheme
and every other voxel the default one.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _segment_fractions(hu: torch.Tensor, nodes, materials: Sequence[str]) -> torch.Tensor:
    """Per-material densities ``[M, *hu.shape]`` (g/cm^3) of ``hu`` under one node scheme."""
    node_hu = torch.tensor([n[0] for n in nodes], dtype=hu.dtype, device=hu.device)
    node_rho = torch.tensor([n[2] for n in nodes], dtype=hu.dtype, device=hu.device)
    node_mat = torch.tensor([materials.index(n[1]) for n in nodes], device=hu.device)
    seg = (torch.bucketize(hu.detach(), node_hu) - 1).clamp(0, len(nodes) - 2)  # segment of each voxel
    h0, h1 = node_hu[seg], node_hu[seg + 1]
    t = (hu - h0) / (h1 - h0)
    rho = node_rho[seg] + t.clamp(min=0.0) * (node_rho[seg + 1] - node_rho[seg])  # extrapolated above the top
    t = t.clamp(0.0, 1.0)
    out = hu.new_zeros((len(materials), *hu.shape))
    lo, hi = node_mat[seg], node_mat[seg + 1]
    m = torch.arange(len(materials), device=hu.device).view(-1, *([1] * hu.dim()))
    out = out + (m == lo).to(hu.dtype) * ((1 - t) * rho) + (m == hi).to(hu.dtype) * (t * rho)
    return out


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
    lead = hu.dim() - 3
    if labels is not None:
        base = _segment_fractions(hu, HU_NODES, materials)
        enhanced = _segment_fractions(hu, HU_NODES_CONTRAST, materials)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for code in CONTRAST_LABELS:
            mask |= labels == code
        out = torch.where(mask.to(hu.device)[None], enhanced, base)
    else:
        out = _segment_fractions(hu, HU_NODES_CONTRAST if contrast else HU_NODES, materials)
    return out.movedim(0, lead)

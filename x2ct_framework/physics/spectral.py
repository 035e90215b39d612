"""Spectral X-ray simulator behind the same differentiable projector: materials, tube spectrum, scatter,
grid, blur, noise and display processing. Differentiable in the volume (CPU and GPU) up to the noise.

The model, in order (``docs/physics.md`` lists the parameters and what is not modelled):

1. **Materials.** HU -> per-material mass densities ``rho_m`` (``materials.hu_to_densities``: a
   Schneider-style piecewise-linear scheme, or a label map for contrast-filled vessels).
2. **Projection.** Each material's density line integral ``L_m`` (g/cm^2) with ``drr.project``, all
   materials as channels of one call: the volume is projected once per material, never per energy.
3. **Spectrum and detector.** ``I = sum_E w(E) S(E) exp(-sum_m mu_m(E) L_m) / sum_E w(E) S(E)``: the tube
   spectrum ``S`` (spekpy, tungsten, ``kvp``, extra aluminium/copper filtration) in bins of ``bin_kev``,
   mass attenuation ``mu_m`` (NIST via xraydb) at each bin's energy, detector weight ``w(E) = E``
   (energy integrating) or 1 (photon counting). ``I`` is the flat-field-normalised primary.
4. **Scatter and grid.** Scatter-kernel superposition: ``S = K * (P * SPR(t))`` with the scatter-to-primary
   ratio ``SPR(t) = spr * (t / spr_thickness_cm) ** spr_exponent`` of the water-equivalent path
   ``t = sum_m L_m`` (g/cm^2 = cm of water) and ``K`` a normalised Gaussian of ``scatter_sigma_mm``;
   an anti-scatter grid passes ``grid_primary`` of the primary and ``grid_scatter`` of the scatter.
5. **Blur.** Focal spot (``focal_spot_mm`` FWHM, times magnification - 1 at the isocentre) and detector
   (``detector_blur_mm`` FWHM) as one Gaussian MTF; optional heel effect (``heel``: the fractional fall of
   intensity from the bottom row to the top row).
6. **Noise.** Photons per pixel ``N0`` from the spectrum's fluence, ``mas`` and the source-detector
   distance (inverse square) and the pixel area; quantum noise Poisson in the photon count (exact below
   ``POISSON_EXACT_BELOW`` photons, its normal approximation above), electronic noise Gaussian
   (``electronic_noise`` photons rms).
7. **Display processing.** ``log`` (-ln I, else the absorbed fraction 1 - I), ``window`` (``none``,
   ``max``, ``minmax``, ``percentile`` with ``window_percentiles``, or fixed ``[lo, hi]``), ``gamma``,
   unsharp masking (``unsharp_amount``, ``unsharp_sigma_mm``), histogram equalisation blended in by
   ``equalize`` (a soft, differentiable CDF), ``invert`` (MONOCHROME1 look), ``bits`` (quantisation,
   straight-through gradient). Attenuating structures come out bright unless ``invert``.

``ideal`` and ``x2ctgan`` are monoenergetic (``mode = "mono"``): ``ideal`` is exactly ``drr.drr``;
``x2ctgan`` is how X2CT-GAN's stored DRRs were made (kylekma/X2CT CT2XRAY/xraypro.py: Plastimatch's
linear line integral of the attenuation, divided by each image's maximum, saved as 8-bit PNG).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..conventions import DEFAULT_HU_WINDOW, unit_to_hu
from ..errors import RecipeError, did_you_mean
from .drr import MU_WATER, hu_to_mu, project
from .geometry import batched, magnification
from .materials import BODY_MATERIALS, DensityMap, densities, mass_attenuation, scheme_materials

# every parameter, its default (what a table without a preset starts from) and its meaning
XRAY_PARAMETERS: dict[str, tuple[object, str]] = {
    "mode": ("spectral", "\"spectral\" (materials, spectrum) or \"mono\" (one attenuation, as drr.drr)"),
    "mu_water": (MU_WATER, "mono: attenuation of water per mm"),
    "beer_lambert": (False, "mono with window \"none\": 1 - exp(-line) instead of line / max_path"),
    "contrast": (False, "HU 40..1500 as iodine-enhanced blood then bone (a CTPA) instead of soft tissue -> bone"),
    "kvp": (120.0, "tube peak voltage, kV (40..150; spectra tabulated every 10 kV, linear in between)"),
    "filter_al_mm": (0.0, "aluminium filtration beyond the tabulated 2.5 mm, mm"),
    "filter_cu_mm": (0.0, "copper filtration, mm"),
    "bin_kev": (5, "energy bin width, keV (1 = the table's resolution)"),
    "detector": ("energy", "\"energy\" (energy-integrating, weight E) or \"counting\" (weight 1)"),
    "mas": (2.0, "tube current-time product, mAs (photon count and quantum noise)"),
    "distance_mm": (1800.0, "source-detector distance for the photon count when the geometry is parallel"),
    "spr": (0.0, "scatter-to-primary ratio at spr_thickness_cm of water, before the grid"),
    "spr_thickness_cm": (20.0, "water-equivalent thickness where the SPR is spr"),
    "spr_exponent": (1.0, "SPR grows as (thickness / spr_thickness_cm) ** spr_exponent"),
    "scatter_sigma_mm": (40.0, "standard deviation of the scatter kernel at the detector, mm"),
    "grid_primary": (1.0, "anti-scatter grid: primary transmission (1 = no grid)"),
    "grid_scatter": (1.0, "anti-scatter grid: scatter transmission (1 = no grid)"),
    "focal_spot_mm": (0.0, "focal spot FWHM, mm (blur at the detector: times magnification - 1)"),
    "detector_blur_mm": (0.0, "detector blur (MTF) FWHM at the detector, mm"),
    "heel": (0.0, "heel effect: fractional fall of intensity from the bottom row to the top row"),
    "noise": (False, "quantum (Poisson) and electronic noise"),
    "electronic_noise": (0.0, "electronic noise, photons rms per pixel"),
    "log": (True, "log transform -ln(I); false: absorbed fraction 1 - I"),
    "window": ("percentile", "\"none\", \"max\", \"minmax\", \"percentile\" or [lo, hi]"),
    "window_percentiles": ([0.5, 99.5], "percentiles for window = \"percentile\""),
    "gamma": (1.0, "display gamma on the windowed image"),
    "unsharp_amount": (0.0, "unsharp masking amount"),
    "unsharp_sigma_mm": (10.0, "unsharp masking blur, mm at the detector"),
    "equalize": (0.0, "histogram equalisation blended in, 0..1"),
    "invert": (False, "invert the output (MONOCHROME1 look: attenuating structures dark)"),
    "bits": (0, "quantise to 2^bits - 1 levels (0: no quantisation)"),
}

XRAY_PRESETS: dict[str, dict] = {
    "ideal": {"mode": "mono", "window": "none", "log": False,
              "doc": "today's monoenergetic DRR (drr.drr): water 0.02/mm, line / max_path or Beer-Lambert"},
    "x2ctgan": {"mode": "mono", "window": "max", "log": False, "bits": 8,
                "doc": "X2CT-GAN's stored DRRs (CT2XRAY/xraypro.py): Plastimatch line integral / its maximum, "
                       "8-bit PNG"},
    "chest_pa": {"kvp": 120.0, "filter_cu_mm": 0.1, "mas": 2.0, "distance_mm": 1800.0, "spr": 1.0,
                 "grid_primary": 0.7, "grid_scatter": 0.1, "focal_spot_mm": 1.2, "detector_blur_mm": 0.3,
                 "noise": True, "electronic_noise": 3.0, "window": "percentile", "gamma": 1.0,
                 "unsharp_amount": 0.6, "unsharp_sigma_mm": 10.0, "equalize": 0.3, "bits": 12,
                 "doc": "PA chest in a Bucky: 120 kVp + 0.1 mm Cu, 2 mAs at 1.8 m, 10:1 grid, "
                        "SPR 1.0 at 20 cm water before the grid, log, percentile window, unsharp masking"},
    "portable_ap": {"kvp": 90.0, "mas": 3.2, "distance_mm": 1000.0, "spr": 1.5, "scatter_sigma_mm": 50.0,
                    "focal_spot_mm": 1.2, "detector_blur_mm": 0.4, "noise": True, "electronic_noise": 5.0,
                    "window": "percentile", "gamma": 1.1, "unsharp_amount": 1.0, "unsharp_sigma_mm": 8.0,
                    "equalize": 0.5, "bits": 12,
                    "doc": "bedside AP: 90 kVp, 3.2 mAs at 1 m, no grid, SPR 1.5 at 20 cm water, "
                           "stronger processing"},
    "fluoro": {"kvp": 75.0, "filter_cu_mm": 0.3, "mas": 0.02, "distance_mm": 1000.0, "spr": 1.0,
               "grid_primary": 0.75, "grid_scatter": 0.15, "focal_spot_mm": 0.6, "detector_blur_mm": 0.8,
               "heel": 0.1, "noise": True, "electronic_noise": 2.0, "window": "percentile", "gamma": 1.3,
               "unsharp_amount": 0.3, "unsharp_sigma_mm": 6.0, "bits": 10,
               "doc": "fluoroscopy frame: 75 kVp + 0.3 mm Cu, 0.02 mAs, grid, heel effect, noisy"},
}


def resolve_xray(spec: str | Mapping | None, where: str = "xray") -> dict:
    """A preset name or a table ``{preset = "chest_pa", kvp = 110, ...}`` as one full parameter dict."""
    if spec is None:
        spec = "ideal"
    if isinstance(spec, str):
        if spec not in XRAY_PRESETS:
            raise RecipeError([f"{where}: unknown X-ray preset {spec!r}{did_you_mean(spec, XRAY_PRESETS)} "
                               f"(available: {', '.join(XRAY_PRESETS)}; or a table of {', '.join(XRAY_PARAMETERS)})"])
        spec = XRAY_PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise RecipeError([f"{where}: expected an X-ray preset name or a table, got {spec!r}"])
    params = {k: v for k, (v, _) in XRAY_PARAMETERS.items()}
    if "preset" in spec:
        params.update({k: v for k, v in resolve_xray(spec["preset"], where).items() if k != "preset"})
    unknown = [k for k in spec if k not in XRAY_PARAMETERS and k not in ("preset", "doc")]
    if unknown:
        raise RecipeError([f"{where} -> {k}: unknown X-ray parameter{did_you_mean(k, XRAY_PARAMETERS)} "
                           f"(accepted: preset, {', '.join(XRAY_PARAMETERS)})" for k in unknown])
    params.update({k: v for k, v in spec.items() if k not in ("preset", "doc")})
    _check(params, where)
    return params


def _check(p: dict, where: str) -> None:
    errors = []
    if p["mode"] not in ("spectral", "mono"):
        errors.append(f"{where} -> mode: expected \"spectral\" or \"mono\", got {p['mode']!r}")
    if not 40.0 <= float(p["kvp"]) <= 150.0:
        errors.append(f"{where} -> kvp: expected 40..150 kV (the tabulated spectra), got {p['kvp']}")
    if p["detector"] not in ("energy", "counting"):
        errors.append(f"{where} -> detector: expected \"energy\" or \"counting\", got {p['detector']!r}")
    for key in ("grid_primary", "grid_scatter"):
        if not 0.0 < float(p[key]) <= 1.0:
            errors.append(f"{where} -> {key}: expected a transmission in (0, 1], got {p[key]}")
    for key in ("mas", "distance_mm", "bin_kev", "spr_thickness_cm", "gamma"):
        if float(p[key]) <= 0:
            errors.append(f"{where} -> {key}: expected a positive number, got {p[key]}")
    for key in ("spr", "focal_spot_mm", "detector_blur_mm", "electronic_noise", "unsharp_amount",
                "filter_al_mm", "filter_cu_mm", "scatter_sigma_mm"):
        if float(p[key]) < 0:
            errors.append(f"{where} -> {key}: expected a number >= 0, got {p[key]}")
    if not 0.0 <= float(p["equalize"]) <= 1.0:
        errors.append(f"{where} -> equalize: expected 0..1, got {p['equalize']}")
    w = p["window"]
    if not (w in ("none", "max", "minmax", "percentile")
            or (isinstance(w, Sequence) and not isinstance(w, str) and len(w) == 2 and float(w[0]) < float(w[1]))):
        errors.append(f"{where} -> window: expected \"none\", \"max\", \"minmax\", \"percentile\" or [lo, hi] with "
                      f"lo < hi, got {w!r}")
    if errors:
        raise RecipeError(errors)


# ---- spectrum ---------------------------------------------------------------------------------------
def tube_spectrum(kvp: float, filter_al_mm: float = 0.0,
                  filter_cu_mm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies keV, fluence photons / keV / cm^2 / mAs at 1 m) at the table's 1 keV bins, float64.

    Linear between the tabulated peak voltages; bins above ``kvp`` are zero. Extra filtration
    attenuates with the NIST mass attenuation of aluminium / copper.
    """
    from . import _xray_tables as tables

    energies = torch.tensor(tables.ENERGIES_KEV, dtype=torch.float64)
    kvps = sorted(tables.SPECTRA)
    kvp = float(kvp)
    lo = max([k for k in kvps if k <= kvp], default=kvps[0])
    hi = min([k for k in kvps if k >= kvp], default=kvps[-1])
    s_lo = torch.tensor(tables.SPECTRA[lo], dtype=torch.float64)
    if hi == lo:
        phi = s_lo
    else:
        t = (kvp - lo) / (hi - lo)
        phi = (1 - t) * s_lo + t * torch.tensor(tables.SPECTRA[hi], dtype=torch.float64)
    phi = torch.where(energies < kvp, phi, torch.zeros_like(phi))
    if filter_al_mm:
        phi = phi * torch.exp(-mass_attenuation("aluminium") * 2.699 * filter_al_mm / 10.0)
    if filter_cu_mm:
        phi = phi * torch.exp(-mass_attenuation("copper") * 8.96 * filter_cu_mm / 10.0)
    return energies, phi


def energy_bins(p: Mapping, materials: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bin energies [K], normalised detector weights [K], mass attenuation [K, M]) for the parameters ``p``
    (cached: a training run asks for the same few settings again and again)."""
    return _energy_bins(float(p["kvp"]), float(p["filter_al_mm"]), float(p["filter_cu_mm"]), int(p["bin_kev"]),
                        str(p["detector"]), tuple(materials))


@functools.lru_cache(maxsize=256)
def _energy_bins(kvp: float, filter_al_mm: float, filter_cu_mm: float, bin_kev: int, detector: str,
                 materials: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bin energies [K], normalised detector weights [K], mass attenuation [K, M]) for the parameters ``p``.

    Bins group ``bin_kev`` consecutive 1 keV table bins; a bin's energy is its middle table energy
    (exact attenuation there), its fluence the group's sum. Empty bins are dropped.
    """
    energies, phi = tube_spectrum(kvp, filter_al_mm, filter_cu_mm)
    k = max(1, bin_kev)
    n = energies.shape[0] // k * k
    groups_e = energies[:n].view(-1, k)
    groups_phi = phi[:n].view(-1, k)
    e = groups_e[:, (k - 1) // 2]
    fluence = groups_phi.sum(1)
    keep = fluence > 0
    e, fluence = e[keep], fluence[keep]
    weight = fluence * (e if detector == "energy" else torch.ones_like(e))
    mu = torch.stack([mass_attenuation(m, e) for m in materials], 1)
    return e, weight / weight.sum(), mu


def photons_per_pixel(p: Mapping, pixel_mm2: float, distance_mm: float) -> float:
    """Photons reaching an unattenuated pixel of ``pixel_mm2`` at ``distance_mm`` from the source."""
    fluence = _fluence(float(p["kvp"]), float(p["filter_al_mm"]), float(p["filter_cu_mm"]))  # per cm^2 at 1 m
    return fluence * float(p["mas"]) * (1000.0 / distance_mm) ** 2 * pixel_mm2 / 100.0


@functools.lru_cache(maxsize=256)
def _fluence(kvp: float, filter_al_mm: float, filter_cu_mm: float) -> float:
    """photons / cm^2 / mAs at 1 m, the spectrum's sum."""
    return float(tube_spectrum(kvp, filter_al_mm, filter_cu_mm)[1].sum())


# ---- projection -------------------------------------------------------------------------------------
def material_lines(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], *,
                   hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, det_shape=None,
                   materials: Sequence[str] = BODY_MATERIALS, contrast: bool = False,
                   labels: torch.Tensor | None = None, **project_options) -> torch.Tensor:
    """Each material's density line integral ``[B, V, M, h, w]`` in g/cm^2 of a CT ``[B, 1, D, H, W]`` in [0, 1].

    The materials' densities are an elementwise map of the CT (``materials.DensityMap``), projected by one
    ``project`` call as M channels of that map: the rays' sampling grid is shared, the M density volumes are
    formed a chunk of slices at a time as they are sampled (never whole, nor kept for backward), and the
    backward is one pass. With a label map the densities depend on the labels too: they are formed whole
    (``materials.densities``) and projected as M channels.
    """
    if ct01.dim() != 5 or ct01.shape[1] != 1:
        raise ValueError(f"material_lines expects a CT [B, 1, D, H, W], got shape {tuple(ct01.shape)}")
    if labels is None:
        density = DensityMap(materials, contrast=contrast, hu_window=hu_window)
        lines = project(ct01, geometry, det_shape, pointwise=density, **project_options)
    else:
        rho = densities(ct01[:, 0], materials, contrast=contrast, labels=labels.reshape(ct01.shape)[:, 0],
                        hu_window=hu_window, dim=1)
        lines = project(rho, geometry, det_shape, **project_options)
    return lines * 0.1  # mm * g/cm^3 -> g/cm^2


def mono_lines(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], *,
               hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, det_shape=None, mu_water: float = MU_WATER,
               **project_options) -> torch.Tensor:
    """The monoenergetic line integral ``[B, V, 1, h, w]`` (what ``drr.drr`` projects)."""
    return project(hu_to_mu(unit_to_hu(ct01, hu_window), mu_water), geometry, det_shape, **project_options)


POISSON_EXACT_BELOW = 1000.0  # mean photon count above which the normal approximation (error < 1e-3) is drawn


# ---- image operations -------------------------------------------------------------------------------
STENCIL_MAX_RADIUS = 3  # a blur kernel of at most 2 * 3 + 1 taps runs as shifted multiply-adds, wider ones as matrices


def _gaussian_taps(sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    r = int(math.ceil(3.0 * sigma))
    x = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _replicate_blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """``[n, n]`` float64: a normalised Gaussian of ``sigma`` pixels along ``n`` pixels, edges replicated (the
    correlation with ``_gaussian_taps`` of the edge-padded signal, as ``F.conv1d`` of ``F.pad(replicate)``)."""
    k = _gaussian_taps(sigma, torch.float64, "cpu")
    r = (k.shape[0] - 1) // 2
    rows = torch.arange(n)[:, None].expand(n, 2 * r + 1)
    cols = (rows + torch.arange(-r, r + 1)).clamp(0, n - 1)
    return torch.zeros(n, n, dtype=torch.float64).index_put_((rows, cols), k.expand(n, -1), accumulate=True)


@functools.lru_cache(maxsize=64)
def _blur_axis(n: int, sigma: float, dtype: torch.dtype, device: str):
    """How one axis of ``n`` pixels is blurred by a normalised Gaussian of ``sigma`` pixels, edges replicated:
    ``("stencil", taps)`` (shifted multiply-adds) for a narrow kernel, else ``("matrix", A)`` (``[n, n]``)."""
    if int(math.ceil(3.0 * sigma)) <= STENCIL_MAX_RADIUS:
        return ("stencil", _gaussian_taps(sigma, dtype, device))
    return ("matrix", _replicate_blur_matrix(n, sigma).to(dtype=dtype, device=device))


def _stencil(img: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    r = (taps.shape[0] - 1) // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    x = F.pad(img, pad, mode="replicate")
    n = img.shape[dim]
    out = x.narrow(dim, 0, n) * taps[0]
    for j in range(1, 2 * r + 1):
        out = out + x.narrow(dim, j, n) * taps[j]
    return out


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, h, w]`` (normalised kernel, edges replicated). A wide kernel
    (over 4 pixels) runs on the image area-averaged by sigma / 2 and is upsampled bilinearly after: the
    blurred image has no detail at that scale, and a uniform image stays exactly uniform. Each axis is a
    few shifted multiply-adds (kernels up to ``STENCIL_MAX_RADIUS`` pixels wide on each side) or one
    product with a small ``[n, n]`` matrix (``_blur_axis``): no convolution calls."""
    if sigma_px < 0.05 or math.exp(-0.5 / sigma_px ** 2) < torch.finfo(img.dtype).eps / 4:
        return img  # the taps beside the centre are below the dtype's rounding: the image is unchanged
    h, w = img.shape[-2:]
    f = int(sigma_px // 2)
    if f >= 2 and min(h, w) >= 4 * f:
        small = F.interpolate(img, size=(h // f, w // f), mode="area")
        return F.interpolate(gaussian_blur(small, sigma_px / f), size=(h, w), mode="bilinear", align_corners=False)
    dev = str(img.device)
    ah = _blur_axis(h, float(sigma_px), img.dtype, dev)
    aw = _blur_axis(w, float(sigma_px), img.dtype, dev)
    x = _stencil(img, ah[1], -2) if ah[0] == "stencil" else torch.matmul(ah[1], img)
    return _stencil(x, aw[1], -1) if aw[0] == "stencil" else torch.matmul(x, aw[1].t())


def _per_view(fn, img: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(images [N, C, h, w], sigma)`` to ``img`` [B, V, C, h, w] with per-(case, view) sigmas [B, V]."""
    b, v = img.shape[:2]
    if bool((sigma_px == sigma_px.flatten()[0]).all()):
        return fn(img.flatten(0, 1), float(sigma_px.flatten()[0])).view_as(img)
    out = [fn(img[i, j:j + 1], float(sigma_px[i, j])) for i in range(b) for j in range(v)]
    return torch.cat(out).view_as(img)


def soft_equalize(img: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Histogram equalisation of each image ``[..., h, w]`` in [0, 1], differentiable: the CDF is a soft count
    (sigmoid of width 1 / bins) at ``bins`` levels, read per pixel by linear interpolation."""
    flat = img.flatten(-2)
    levels = torch.linspace(0.0, 1.0, bins + 1, device=img.device, dtype=img.dtype)
    cdf = torch.sigmoid((levels[:, None] - flat[..., None, :]) * bins).mean(-1)  # [..., bins + 1]
    cdf = (cdf - cdf[..., :1]) / (cdf[..., -1:] - cdf[..., :1]).clamp_min(1e-6)
    pos = flat.clamp(0, 1) * bins
    i = pos.detach().floor().clamp(0, bins - 1).long()
    t = pos - i
    out = torch.gather(cdf, -1, i) * (1 - t) + torch.gather(cdf, -1, i + 1) * t
    return out.view_as(img)


def equalize_histogram(img: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Plain histogram equalisation of each image ``[..., h, w]`` in [0, 1] (no gradient: for data, not losses)."""
    flat = img.flatten(-2).clamp(0, 1)
    idx = (flat * (bins - 1)).round().long()
    counts = torch.zeros((*flat.shape[:-1], bins), dtype=img.dtype, device=img.device)
    counts.scatter_add_(-1, idx, torch.ones_like(flat))
    cdf = counts.cumsum(-1)
    cdf = (cdf - cdf[..., :1]) / (cdf[..., -1:] - cdf[..., :1]).clamp_min(1)
    return torch.gather(cdf, -1, idx).view_as(img)


def percentile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(flat, q, dim=-1)`` (linear interpolation between the two nearest ranks) from a partial
    sort: the ``k`` smallest or largest values by ``topk``, k the rank's distance from the nearer end (a
    window's 0.5 % / 99.5 % percentiles need 1 % of the pixels sorted, not all). Differentiable like it."""
    n = flat.shape[-1]
    rank = torch.tensor(q, dtype=flat.dtype) * (n - 1)
    lo, hi = int(rank.floor()), int(rank.ceil())
    if hi < n // 2:
        vals = flat.topk(hi + 1, dim=-1, largest=False, sorted=True).values
        below, above = vals[..., lo], vals[..., hi]
    else:
        vals = flat.topk(n - lo, dim=-1, largest=True, sorted=True).values
        below, above = vals[..., n - 1 - lo], vals[..., n - 1 - hi]
    return torch.lerp(below, above, (rank - lo).to(flat.device))


def process(signal: torch.Tensor, p: Mapping, pixel_mm: torch.Tensor) -> torch.Tensor:
    """The display chain on ``signal`` ``[B, V, 1, h, w]`` (already -ln I or 1 - I): window, gamma, unsharp
    masking, equalisation, inversion, quantisation. ``pixel_mm`` [B, V] for the unsharp mask."""
    x = signal
    w = p["window"]
    flat = x.flatten(-2)
    if w == "max":
        x = x / flat.amax(-1).clamp_min(1e-12)[..., None, None]
    elif w == "minmax":
        lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    elif w == "percentile":
        lo, hi = (percentile(flat, float(v) / 100.0)[..., None, None] for v in p["window_percentiles"])
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    elif w != "none":
        lo, hi = float(w[0]), float(w[1])
        x = (x - lo) / (hi - lo)
    if w == "none":
        return x
    x = x.clamp(0.0, 1.0)
    if float(p["gamma"]) != 1.0:
        x = x.clamp_min(1e-6) ** float(p["gamma"])
    if float(p["unsharp_amount"]) > 0:
        a = float(p["unsharp_amount"])
        blurred = _per_view(gaussian_blur, x, float(p["unsharp_sigma_mm"]) / pixel_mm)
        x = torch.add(x * (1.0 + a), blurred, alpha=-a).clamp(0.0, 1.0)  # x + a (x - blurred)
    if float(p["equalize"]) > 0:
        e = float(p["equalize"])
        eq = soft_equalize(x) if torch.is_grad_enabled() and x.requires_grad else equalize_histogram(x)
        x = (1 - e) * x + e * eq
    if p["invert"]:
        x = 1.0 - x
    bits = int(p["bits"])
    if bits:
        levels = float(2 ** bits - 1)
        q = torch.round(x * levels).div_(levels)
        x = x + (q - x).detach() if torch.is_grad_enabled() and x.requires_grad else q  # straight-through
    return x


def _pixel_mm(g: Mapping[str, torch.Tensor], det_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector pixel pitch along u and v, mm ``[B, V]`` each."""
    return g["detector_mm"][..., 0] / det_shape[1], g["detector_mm"][..., 1] / det_shape[0]


def detect(lines: torch.Tensor, geometry: Mapping[str, torch.Tensor], params: Mapping,
           materials: Sequence[str] = BODY_MATERIALS, generator: torch.Generator | None = None,
           return_parts: bool = False):
    """From material line integrals ``[B, V, M, h, w]`` (g/cm^2) to the flat-field-normalised detector
    signal ``I`` ``[B, V, 1, h, w]``: spectrum, scatter, grid, blur, heel effect and noise.

    ``return_parts`` gives ``{"primary", "scatter", "signal"}`` (after the grid, before blur and noise).
    """
    p = params
    b, v, m, h, w = lines.shape
    if m != len(materials):
        raise ValueError(f"lines hold {m} materials but {len(materials)} were named ({list(materials)})")
    g = geometry if _is_batched(geometry, b, lines) else batched(geometry, b, lines.device, lines.dtype)
    weight, neg_mu = _bins_as(p, materials, lines)
    # I = sum_k w_k exp(-sum_m mu_km L_m): two small matrix products and one exp per energy bin and pixel
    expo = torch.matmul(neg_mu, lines.reshape(b * v, m, h * w)).exp_()  # [(b v), K, h w]
    primary = torch.matmul(weight, expo).view(b, v, 1, h, w)
    du, dv = _pixel_mm(g, (h, w))
    pitch = torch.sqrt(du * dv)
    tp, ts = float(p["grid_primary"]), float(p["grid_scatter"])
    scatter = None
    if float(p["spr"]) > 0:
        thickness = lines.sum(2, keepdim=True)  # g/cm^2 ~ cm of water
        ratio = (thickness * (1.0 / float(p["spr_thickness_cm"]))).clamp_min(0)
        if float(p["spr_exponent"]) != 1.0:
            ratio = ratio ** float(p["spr_exponent"])
        scatter = _per_view(gaussian_blur, primary * ratio, float(p["scatter_sigma_mm"]) / pitch) * float(p["spr"])
    if return_parts:
        scatter_g = ts * scatter if scatter is not None else primary.new_zeros(())
        return {"primary": tp * primary, "scatter": scatter_g * torch.ones_like(primary),
                "signal": (tp * primary + scatter_g) / tp}
    # behind the grid: tp P + ts S; carried divided by tp (the flat field behind the grid), as it is returned
    signal = primary if scatter is None else torch.add(primary, scatter, alpha=ts / tp)
    fwhm_det = float(p["detector_blur_mm"])
    fwhm_focal = float(p["focal_spot_mm"]) * (magnification(g) - 1.0).clamp_min(0)
    sigma_mm = torch.sqrt(fwhm_det ** 2 + fwhm_focal ** 2) / 2.3548
    if float(sigma_mm.max()) > 0:
        signal = _per_view(gaussian_blur, signal, sigma_mm / pitch)
    if float(p["heel"]):
        rows = (torch.arange(h, device=lines.device, dtype=lines.dtype) + 0.5) / h  # 0 at the top row
        signal = signal * (1.0 - float(p["heel"]) * (1.0 - rows))[:, None]
    if p["noise"]:
        cone = (g["cone"] > 0.5).tolist()
        dist = [[float(g["sdd"][i, j]) if cone[i][j] else float(p["distance_mm"]) for j in range(v)] for i in range(b)]
        area = (du * dv).tolist()
        # photons behind the grid per unattenuated pixel
        n0 = torch.tensor([[tp * photons_per_pixel(p, area[i][j], dist[i][j]) for j in range(v)] for i in range(b)],
                          dtype=torch.float32)[..., None, None, None]
        rate = (signal.detach().cpu().float() * n0).clamp_min_(0)
        # Poisson counts plus Gaussian electronic noise: one normal draw of their summed variance; the
        # Poisson part drawn exactly where the mean count is below POISSON_EXACT_BELOW photons
        e2 = float(p["electronic_noise"]) ** 2
        counts = torch.addcmul(rate, (rate + e2).sqrt_(), torch.randn(rate.shape, generator=generator))
        small = rate < POISSON_EXACT_BELOW
        if bool(small.any()):
            exact = torch.poisson(rate[small], generator=generator)
            if e2:
                exact = exact + math.sqrt(e2) * torch.randn(exact.shape, generator=generator)
            counts[small] = exact
        noisy = counts.to(lines) / n0.to(lines)
        if not (torch.is_grad_enabled() and signal.requires_grad):
            return noisy
        signal = signal + (noisy - signal).detach()  # the noise as a constant offset: gradients pass as without
    return signal


def _is_batched(geometry: Mapping[str, torch.Tensor], b: int, like: torch.Tensor) -> bool:
    """Whether ``geometry`` is already ``batched(geometry, b, ...)`` for ``like``'s device and dtype."""
    a = geometry.get("angles")
    return (len(geometry) == 8 and isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == b
            and a.dtype == like.dtype and a.device == like.device)


@functools.lru_cache(maxsize=64)
def _bins_cached(kvp: float, filter_al_mm: float, filter_cu_mm: float, bin_kev: int, detector: str,
                 materials: tuple[str, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, weight, mu = _energy_bins(kvp, filter_al_mm, filter_cu_mm, bin_kev, detector, materials)
    return weight.to(dtype=dtype, device=device)[None], (-mu).to(dtype=dtype, device=device)


def _bins_as(p: Mapping, materials: Sequence[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(detector weights ``[1, K]``, minus the mass attenuation ``[K, M]``) in ``like``'s dtype and device."""
    return _bins_cached(float(p["kvp"]), float(p["filter_al_mm"]), float(p["filter_cu_mm"]), int(p["bin_kev"]),
                        str(p["detector"]), tuple(materials), like.dtype, str(like.device))


def render_lines(lines: torch.Tensor, geometry: Mapping[str, torch.Tensor], params: Mapping, *,
                 materials: Sequence[str] = BODY_MATERIALS, generator: torch.Generator | None = None,
                 max_path: float | None = None) -> torch.Tensor:
    """Images ``[B, V, 1, h, w]`` in [0, 1] from line integrals: material lines (g/cm^2) for a spectral
    preset, the monoenergetic line ``[B, V, 1, h, w]`` for a mono one."""
    p = params
    b, v, _, h, w = lines.shape
    g = batched(geometry, b, lines.device, lines.dtype)
    du, dv = _pixel_mm(g, (h, w))
    pitch = torch.sqrt(du * dv)
    if p["mode"] == "mono":
        if p["window"] == "none":
            if p["beer_lambert"]:
                return 1.0 - torch.exp(-lines)
            if max_path is None:
                max_path = float(p["mu_water"]) * float(torch.as_tensor(geometry["volume_mm"]).max())
            return torch.clamp(lines / max_path, 0.0, 1.0)
        return process(lines, p, pitch)
    intensity = detect(lines, g, p, materials, generator)
    signal = -torch.log(intensity.clamp_min(1e-6)) if p["log"] else 1.0 - intensity
    return process(signal, p, pitch)


def simulate(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], xray: str | Mapping = "ideal", *,
             hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, det_shape=None, labels: torch.Tensor | None = None,
             generator: torch.Generator | None = None, **project_options) -> torch.Tensor:
    """X-ray images ``[B, V, 1, h, w]`` in [0, 1] of a CT ``[B, 1, D, H, W]`` in [0, 1] through preset ``xray``."""
    p = resolve_xray(xray)
    if p["mode"] == "mono":
        line = mono_lines(ct01, geometry, hu_window=hu_window, det_shape=det_shape, mu_water=float(p["mu_water"]),
                          **project_options)
        return render_lines(line, geometry, p)
    materials = scheme_materials(bool(p["contrast"]), labels is not None)
    lines = material_lines(ct01, geometry, hu_window=hu_window, det_shape=det_shape, contrast=bool(p["contrast"]),
                           labels=labels, materials=materials, **project_options)
    return render_lines(lines, geometry, p, materials=materials, generator=generator)


# ---- style randomisation ----------------------------------------------------------------------------
STYLE_RANGES: dict[str, str] = {
    "kvp": "[low, high] kV", "mas": "[low, high] mAs", "spr": "[low, high]", "scatter_sigma_mm": "[low, high]",
    "grid": "probability of an anti-scatter grid (grid_primary 0.7, grid_scatter 0.1)",
    "focal_spot_mm": "[low, high]", "detector_blur_mm": "[low, high]", "electronic_noise": "[low, high]",
    "gamma": "[low, high]", "unsharp_amount": "[low, high]", "unsharp_sigma_mm": "[low, high]",
    "equalize": "[low, high]", "heel": "[low, high]", "filter_cu_mm": "[low, high]",
}
STYLE_BIN_KEV = 10  # energy bins of a drawn style: half the exponentials of chest_pa's 5 keV bins
DEFAULT_STYLE: dict[str, object] = {
    "kvp": [70.0, 130.0], "mas": [0.5, 5.0], "spr": [0.3, 1.5], "scatter_sigma_mm": [25.0, 60.0], "grid": 0.5,
    "focal_spot_mm": [0.6, 1.5], "detector_blur_mm": [0.1, 0.6], "electronic_noise": [0.0, 5.0],
    "gamma": [0.8, 1.3], "unsharp_amount": [0.0, 1.0], "unsharp_sigma_mm": [5.0, 15.0], "equalize": [0.0, 0.5],
}


def check_style(ranges: Mapping, where: str = "xray_style") -> dict:
    """``ranges`` merged over ``DEFAULT_STYLE`` (an empty table draws every default range), checked."""
    if not isinstance(ranges, Mapping):
        raise RecipeError([f"{where}: expected a table of ranges ({', '.join(STYLE_RANGES)}), got {ranges!r}"])
    out = dict(DEFAULT_STYLE)
    errors = []
    for k, r in ranges.items():
        if k not in STYLE_RANGES:
            errors.append(f"{where} -> {k}: unknown style range{did_you_mean(k, STYLE_RANGES)} "
                          f"(accepted: {', '.join(STYLE_RANGES)})")
        elif k == "grid":
            if not (isinstance(r, (int, float)) and 0 <= float(r) <= 1):
                errors.append(f"{where} -> grid: expected a probability in [0, 1], got {r!r}")
            out[k] = float(r) if isinstance(r, (int, float)) else r
        elif not (isinstance(r, Sequence) and len(r) == 2 and float(r[0]) <= float(r[1])):
            errors.append(f"{where} -> {k}: expected [low, high] with low <= high, got {r!r}")
        else:
            out[k] = [float(r[0]), float(r[1])]
    if errors:
        raise RecipeError(errors)
    try:
        resolve_xray({k: v[1] for k, v in out.items() if k != "grid"}, where)
        resolve_xray({k: v[0] for k, v in out.items() if k != "grid"}, where)
    except RecipeError as exc:
        raise RecipeError([f"{where}: a range's end is not a valid X-ray parameter: {m}" for m in exc.problems]) \
            from exc
    return out


def draw_style(base: Mapping, ranges: Mapping, generator: torch.Generator) -> dict:
    """Parameters for one item: ``base`` (a resolved spectral preset) with each range of ``ranges`` drawn
    uniformly (always the same number of draws, so later draws do not depend on earlier values)."""
    p = dict(base)
    p["mode"] = "spectral"
    p["noise"] = True
    u = torch.rand(len(STYLE_RANGES), generator=generator, dtype=torch.float64).tolist()
    for (k, _), x in zip(STYLE_RANGES.items(), u):
        if k not in ranges:
            continue
        if k == "grid":
            grid = x < float(ranges["grid"])
            p["grid_primary"], p["grid_scatter"] = (0.7, 0.1) if grid else (1.0, 1.0)
        else:
            lo, hi = ranges[k]
            p[k] = lo + (hi - lo) * x
    p["kvp"] = float(round(p["kvp"]))  # whole kV: the spectrum and attenuation per kVp are computed once
    p["bin_kev"] = max(int(p["bin_kev"]), STYLE_BIN_KEV)
    return p

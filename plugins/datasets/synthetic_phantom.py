"""``synthetic_phantom``: seeded CTPA-like chest phantoms with DRR views rendered by the projector.

Case ``i`` of a split is the same patient on every call and at every stage resolution (the
phantom is described in millimetres); train, val and test draw from disjoint seed ranges.
"""

from __future__ import annotations

import hashlib
import json
import math
import random

import torch
from torch.utils.data import Dataset

from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.phantom import PHANTOM_VERSION, PHANTOM_VERSIONS, chest_phantom, pulmonary_embolism_study
from x2ct_framework.physics import MU_WATER
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (DiskCache, case_geometry, check_common, check_split, drr_key,
                                           hu_to_unit, render_views)

SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}


class SyntheticPhantomDataset(Dataset):
    """Phantom CTs (``chest_phantom``) and their DRRs at ``views``.

    Options: ``views`` (gantry angles, degrees), ``geometry`` (preset name or table), ``hu_window``,
    ``num_train``/``num_val``/``num_test`` cases, ``seed``, ``image_size`` (0: the stage resolution),
    ``volume_mm`` (field of view), ``render_resolution`` (render the DRRs from a finer phantom, the
    target stays at the stage resolution; 0: the stage resolution), ``view_jitter`` (random angle
    offsets in degrees drawn at every access, train split only), ``table``, ``noise_hu``,
    ``mu_water``, ``beer_lambert``, ``cache_dir`` (phantoms and DRRs are written there once and read
    back), ``memory_cache_mb`` (finished cases kept in memory up to this size; 0 = off),
    ``phantom_version`` (the anatomy, ``x2ct_framework.phantom.PHANTOM_VERSIONS``; default the newest),
    ``arms`` (arms at the sides; version 2 only), ``render_oversample`` (render the DRRs from the same
    patient generated at this many times the stage resolution; 1 = the target grid itself),
    ``xray_noise`` (quantum noise: the relative noise of an unattenuated detector pixel, 1/sqrt(photons
    per pixel); 0 = none) and ``xray_blur_mm`` (Gaussian detector blur, sigma in mm at the detector;
    0 = none). Noise and blur are drawn per case from ``seed``: the same images on every call.
    ``pe_fraction`` (version 2): the fraction of cases with pulmonary emboli (label 9), drawn per case
    from its seed; when above 0 every item carries ``study`` = ``{"pe_present", "pe_count",
    "pe_volume_ml", "pe_location"}`` (``x2ct_framework.phantom.pulmonary_embolism_study``).
    ``xray``: an X-ray preset of ``physics.spectral`` (``"chest_pa"``, ``"portable_ap"``, ``"fluoro"``,
    ``"x2ctgan"``) or a table (``{ preset = "chest_pa", kvp = 110 }``), as ``ct_folder``'s; the views are
    then rendered through that simulator (spectral presets from the phantom's materials, its vessels and
    heart as contrast-filled blood from the label map), its noise drawn per case from ``seed``. The
    default ``"ideal"`` is today's DRRs (``mu_water``, ``beer_lambert``, ``xray_noise``, ``xray_blur_mm``).
    """

    def __init__(self, *, split: str, stage: Stage, views: list[float] = (0.0, 90.0), geometry: str | dict = "parallel",
                 hu_window: list[float] = DEFAULT_HU_WINDOW, num_train: int = 16, num_val: int = 4,
                 num_test: int = 4, seed: int = 0, image_size: int = 0, volume_mm: float = 320.0,
                 render_resolution: int = 0, view_jitter: float = 0.0, table: bool = True, noise_hu: float = 8.0,
                 mu_water: float = MU_WATER, beer_lambert: bool = False, cache_dir: str = "",
                 memory_cache_mb: float = 512.0, phantom_version: int = PHANTOM_VERSION, arms: bool = False,
                 render_oversample: int = 1, xray_noise: float = 0.0, xray_blur_mm: float = 0.0,
                 pe_fraction: float = 0.0, xray: str | dict = "ideal"):
        check_split(split)
        if phantom_version not in PHANTOM_VERSIONS:
            raise ValueError(f"synthetic_phantom: phantom_version must be one of {PHANTOM_VERSIONS}, got "
                             f"{phantom_version!r}")
        if arms and phantom_version < 2:
            raise ValueError("synthetic_phantom: arms = true needs phantom_version = 2 (version 1 has no arms)")
        self.phantom_version, self.arms = int(phantom_version), bool(arms)
        if not 0.0 <= pe_fraction <= 1.0:
            raise ValueError(f"synthetic_phantom: pe_fraction must be in [0, 1] (the fraction of cases with "
                             f"pulmonary emboli), got {pe_fraction!r}")
        if pe_fraction and phantom_version < 2:
            raise ValueError("synthetic_phantom: pe_fraction > 0 needs phantom_version = 2 (version 1 has no emboli)")
        self.pe_fraction = float(pe_fraction)
        check_common(views, hu_window, geometry)
        self.split, self.stage = split, stage
        self.views = [float(v) for v in views]
        self.geometry_option = geometry
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.size = {"train": num_train, "val": num_val, "test": num_test}[split]
        if self.size < 1:
            raise ValueError(f"num_{split} must be at least 1 for the {split} split")
        if volume_mm <= 0:
            raise ValueError(f"volume_mm must be positive, got {volume_mm}")
        if render_resolution and render_resolution < stage.resolution:
            raise ValueError(f"render_resolution ({render_resolution}) must be 0 or at least the stage resolution "
                             f"({stage.resolution})")
        if not isinstance(render_oversample, int) or render_oversample < 1:
            raise ValueError(f"synthetic_phantom: render_oversample must be a whole number >= 1 (1 = render from "
                             f"the target grid), got {render_oversample!r}")
        if render_oversample > 1 and render_resolution:
            raise ValueError("synthetic_phantom: set render_resolution or render_oversample, not both")
        if xray_noise < 0 or xray_blur_mm < 0:
            raise ValueError(f"synthetic_phantom: xray_noise and xray_blur_mm must be >= 0 (0 = off), got "
                             f"{xray_noise!r} and {xray_blur_mm!r}")
        self.xray_params = None  # today's DRRs
        if not (isinstance(xray, str) and xray == "ideal"):
            from x2ct_framework.physics.spectral import resolve_xray

            self.xray_params = resolve_xray(xray, "synthetic_phantom -> xray")
            if xray_noise or xray_blur_mm:
                raise ValueError("synthetic_phantom: xray_noise and xray_blur_mm belong to the ideal DRRs; with an "
                                 f"xray preset ({xray!r}) set its own noise and blur (mas, electronic_noise, "
                                 "detector_blur_mm, focal_spot_mm) in the xray table")
        self.seed = seed
        self.image_size = image_size or stage.resolution
        self.volume_mm = float(volume_mm)
        self.render_resolution = render_resolution or stage.resolution * render_oversample
        self.xray_noise, self.xray_blur_mm = float(xray_noise), float(xray_blur_mm)
        self.view_jitter = float(view_jitter) if split == "train" else 0.0
        self.table, self.noise_hu = table, float(noise_hu)
        self.mu_water, self.beer_lambert = float(mu_water), beer_lambert
        self.cache_dir = cache_dir or None
        self.cache = DiskCache(cache_dir)
        self.memory_budget = float(memory_cache_mb) * 2**20
        self.memory: dict[int, dict] = {}
        self.memory_used = 0
        case_geometry(self.views, geometry, self.volume_mm)  # fail early on a bad geometry

    def __len__(self) -> int:
        return self.size

    def case_seed(self, i: int) -> int:
        return self.seed * 7919 + SPLIT_OFFSET[self.split] + i

    def phantom(self, i: int, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """HU volume and label map of case ``i`` (``[R, R, R]`` each)."""
        return chest_phantom(resolution or self.stage.resolution, self.case_seed(i), volume_mm=self.volume_mm,
                             table=self.table, noise_hu=self.noise_hu, cache_dir=self.cache_dir,
                             version=self.phantom_version, arms=self.arms, emboli=self.has_emboli(i))

    def has_emboli(self, i: int) -> bool:
        """Whether case ``i`` has pulmonary emboli: drawn from its seed, ``pe_fraction`` of the cases."""
        if not self.pe_fraction:
            return False
        return random.Random(f"x2ct-pe-case-{self.case_seed(i)}").random() < self.pe_fraction

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"case {i} of a {self.size}-case {self.split} split")
        item = self.memory.get(i)
        if item is None:
            item = self._make(i)
            nbytes = sum(t.numel() * t.element_size() for t in item.values() if isinstance(t, torch.Tensor))
            if self.memory_used + nbytes <= self.memory_budget:
                self.memory[i] = item
                self.memory_used += nbytes
        item = dict(item)
        if self.view_jitter:
            geometry = case_geometry(self.views, self.geometry_option, self.volume_mm, self.view_jitter, random)
            item["geometry"] = geometry
            item["xrays"] = self._render(i, item["ct"], geometry, item["labels"])
        return item

    def _render(self, i: int, ct: torch.Tensor, geometry: dict, labels: torch.Tensor) -> torch.Tensor:
        source = ct
        if self.render_resolution != self.stage.resolution:
            fine, fine_labels = self.phantom(i, self.render_resolution)
            source, labels = hu_to_unit(fine, self.hu_window)[None], fine_labels[None]
        if self.xray_params is not None:
            return self._simulate(i, source, geometry, labels)
        views = render_views(source, geometry, self.hu_window, self.image_size, self.mu_water, self.beer_lambert)
        if self.xray_noise or self.xray_blur_mm:
            seed = int(hashlib.sha1(f"xray-detector:{self.case_seed(i)}".encode()).hexdigest()[:15], 16)
            views = detector(views, geometry, self.xray_noise, self.xray_blur_mm, self.mu_water, self.beer_lambert,
                             torch.Generator().manual_seed(seed))
        return views

    def _simulate(self, i: int, ct: torch.Tensor, geometry: dict, labels: torch.Tensor) -> torch.Tensor:
        """The views ``[V, 1, h, w]`` through the ``xray`` preset, its noise drawn from the case's seed."""
        from x2ct_framework.physics.spectral import simulate

        seed = int(hashlib.sha1(f"xray-preset:{self.case_seed(i)}".encode()).hexdigest()[:15], 16)
        with torch.no_grad():
            views = simulate(ct[None].float(), {k: v[None] for k, v in geometry.items()}, self.xray_params,
                             hu_window=self.hu_window, det_shape=(self.image_size, self.image_size),
                             labels=labels[None], generator=torch.Generator().manual_seed(seed))
        return views[0].float()

    def _make(self, i: int) -> dict:
        r = self.stage.resolution
        hu, labels = self.phantom(i)
        ct = hu_to_unit(hu, self.hu_window)[None]
        geometry = case_geometry(self.views, self.geometry_option, self.volume_mm)
        anatomy = "" if self.phantom_version == 1 else f"-v{self.phantom_version}-{self.arms}"
        if self.xray_noise or self.xray_blur_mm:
            anatomy += f"-detector-{self.xray_noise}-{self.xray_blur_mm}"
        if self.xray_params is not None:
            anatomy += "-xray-" + hashlib.sha1(json.dumps(self.xray_params, sort_keys=True).encode()).hexdigest()[:16]
        if self.has_emboli(i):
            anatomy += "-emboli"
        key = drr_key(f"phantom-{self.case_seed(i)}-{self.table}-{self.noise_hu}-{self.volume_mm}{anatomy}", geometry,
                      self.render_resolution, self.image_size, self.hu_window, self.mu_water, self.beer_lambert)
        cached = self.cache.get("drr", key)
        if cached is not None:
            xrays = cached["xrays"]
        else:
            xrays = self._render(i, ct, geometry, labels[None])
            self.cache.put("drr", key, {"xrays": xrays})
        spacing = torch.full((3,), self.volume_mm / r)
        item = {"xrays": xrays, "geometry": geometry, "ct": ct, "labels": labels[None], "spacing": spacing,
                "case_id": f"phantom-{self.split}-{i:04d}"}
        if self.pe_fraction:
            item["study"] = pulmonary_embolism_study(self.case_seed(i), self.has_emboli(i))
        return item




def detector(views: torch.Tensor, geometry: dict, noise: float, blur_mm: float, mu_water: float,
             beer_lambert: bool, generator: torch.Generator) -> torch.Tensor:
    """A simple detector applied to DRRs ``[V, 1, h, w]`` in [0, 1]: quantum noise, then blur, in transmitted
    intensity.

    The DRR is turned back into the transmitted fraction I = exp(-line integral) (the inverse of
    ``physics.drr``'s linear or Beer-Lambert scaling). Noise: Poisson counts with 1/noise^2 photons per
    unattenuated pixel, drawn in their Gaussian approximation (relative std noise / sqrt(I)). Blur: a
    Gaussian of sigma ``blur_mm`` at the detector (the light spread of a scintillator), applied to the
    noisy intensity so the noise is blurred too. Then back to the DRR's scale.
    """
    if beer_lambert:
        intensity = 1.0 - views
    else:
        max_path = mu_water * float(torch.as_tensor(geometry["volume_mm"]).max())
        intensity = torch.exp(-views * max_path)
    if noise > 0:
        intensity = intensity + noise * intensity.clamp_min(0).sqrt() * torch.randn(views.shape, generator=generator)
    if blur_mm > 0:
        pixel_mm = float(torch.as_tensor(geometry["detector_mm"]).float().mean()) / views.shape[-1]
        sigma = blur_mm / pixel_mm
        size = min(2 * int(math.ceil(3 * sigma)) + 1, 2 * min(views.shape[-2:]) - 1)
        if size >= 3:
            from torchvision.transforms.functional import gaussian_blur  # loaded when blur is used, not listed

            intensity = gaussian_blur(intensity, [size, size], [sigma, sigma])
    intensity = intensity.clamp(1e-7, 1.0)
    if beer_lambert:
        return 1.0 - intensity
    return (-torch.log(intensity) / max_path).clamp(0.0, 1.0)


@hookimpl
def register_datasets(register):
    register("synthetic_phantom", SyntheticPhantomDataset)

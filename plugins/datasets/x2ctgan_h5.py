"""``x2ctgan_h5``: the LIDC-IDRI HDF5 files published with X2CT-GAN (kylekma/X2CT), for comparison with that paper.

Layout (``3DGAN/lib/dataset/alignDataSet*.py``): ``root/<case>/ct_xray_data.h5`` with datasets
``ct`` (a 256^3 volume over a 320 mm cube; values are HU + 1024, the paper clips them to
[0, 2500]), ``xray1`` (PA) and ``xray2`` (lateral), 8-bit DRRs made with Plastimatch in the
``x2ctgan`` geometry, plus ``ori_size`` and ``spacing``; and list files naming the train and
test cases (``train.txt``, ``test.txt``). The CT array is stored in SimpleITK order ``[z, y, x]`` of
an LPS volume whose z runs toward the head; ``flip`` (default ``["z"]``) turns it into the canonical
orientation (head at slice 0).

``xrays = "stored"`` uses the published PA and lateral images (views must be [0, 90]);
``xrays = "render"`` renders DRRs from the CT with this framework's projector, at any views and
geometry (2, 4, 8 views).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import MU_WATER
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (CaseListDataset, DiskCache, bad_case, case_geometry, check_common,
                                           check_split, drr_key, empty_split_error, hu_to_unit, read_list_file,
                                           render_views, resize_volume)

H5_NAME = "ct_xray_data.h5"
REQUIRED_KEYS = ("ct", "xray1", "xray2")
AXES = {"z": 0, "y": 1, "x": 2}


class X2CTGANH5Dataset(CaseListDataset):
    """Cases of the X2CT-GAN LIDC HDF5 set.

    ``train_list``/``test_list`` (relative to ``root``) name the cases; ``val_list`` defaults to the
    test list (the X2CT-GAN code validates on its test cases); ``hu_offset`` is subtracted from the
    stored values to get HU; ``volume_mm`` is the stored cube's size.
    """

    def __init__(self, *, split: str, stage: Stage, root: str, views: list[float] = (0.0, 90.0),
                 geometry: str | dict = "x2ctgan", hu_window: list[float] = (-1000.0, 3000.0), image_size: int = 0,
                 xrays: str = "stored", train_list: str = "train.txt", test_list: str = "test.txt",
                 val_list: str = "", hu_offset: float = 1024.0, volume_mm: float = 320.0, flip: list[str] = ("z",),
                 cache_dir: str = "", on_bad_case: str = "error", mu_water: float = MU_WATER,
                 beer_lambert: bool = False):
        check_split(split)
        check_common(views, hu_window, geometry, on_bad_case)
        if xrays not in ("stored", "render"):
            raise ValueError(f"xrays must be 'stored' (the published PA and lateral DRRs) or 'render', got {xrays!r}")
        if xrays == "stored" and [float(v) for v in views] != [0.0, 90.0]:
            raise RecipeError([f"data.views: the X2CT-GAN files hold only PA (0) and lateral (90) images, got "
                               f"{list(views)}; use views = [0, 90] or xrays = \"render\" to render other views"])
        bad_axes = [a for a in flip if a not in AXES]
        if bad_axes:
            raise ValueError(f"flip: expected axis names among {list(AXES)}, got {bad_axes}")
        self.split, self.stage = split, stage
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: X2CT-GAN data folder not found (data.root of x2ctgan_h5)")
        self.views = [float(v) for v in views]
        self.geometry_option = geometry
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.image_size = image_size or stage.resolution
        self.mode = xrays
        self.hu_offset = float(hu_offset)
        self.volume_mm = float(volume_mm)
        self.flip = [AXES[a] for a in flip]
        self.on_bad_case = on_bad_case
        self.mu_water, self.beer_lambert = float(mu_water), beer_lambert
        self.cache = DiskCache(Path(cache_dir).expanduser() if cache_dir else None)
        case_geometry(self.views, geometry, self.volume_mm)

        list_name = {"train": train_list, "val": val_list or test_list, "test": test_list}[split]
        list_path = Path(list_name).expanduser()
        if not list_path.is_absolute():
            list_path = self.root / list_path
        names = read_list_file(list_path)
        self.cases: list[tuple[str, Path]] = []
        for name in names:
            path = self.root / name / H5_NAME
            if not path.is_file():
                bad_case(on_bad_case, f"{path}: case {name!r} listed in {list_path} has no {H5_NAME}")
                continue
            self.cases.append((name, path))
        if not self.cases:
            raise empty_split_error(split, str(list_path))
        self.bad: set[int] = set()

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in REQUIRED_KEYS if k not in f]
                if missing:
                    raise DataError(f"{path}: missing dataset(s) {', '.join(missing)} (expected ct, xray1, xray2, "
                                    f"ori_size, spacing; found {', '.join(sorted(f.keys())) or 'none'})")
                out = {k: np.asarray(f[k]) for k in REQUIRED_KEYS}
        except DataError:
            raise
        except Exception as exc:  # truncated or not HDF5
            raise DataError(f"{path}: could not read the HDF5 file ({type(exc).__name__}: {exc})") from exc
        if out["ct"].ndim != 3:
            raise DataError(f"{path}: ct: expected a 3D volume, got shape {out['ct'].shape}")
        if not np.isfinite(out["ct"]).all():
            raise DataError(f"{path}: ct: the volume holds NaN or infinite values")
        for key in ("xray1", "xray2"):
            if np.squeeze(out[key]).ndim != 2:
                raise DataError(f"{path}: {key}: expected a 2D image, got shape {out[key].shape}")
        return out

    def _item(self, j: int) -> dict:
        name, path = self.cases[j]
        r = self.stage.resolution
        data = self._read(path)
        hu = torch.from_numpy(data["ct"].astype(np.float32)) - self.hu_offset
        if self.flip:
            hu = hu.flip(self.flip)
        hu = resize_volume(hu.contiguous(), r)
        ct = hu_to_unit(hu, self.hu_window)[None]
        geometry = case_geometry(self.views, self.geometry_option, self.volume_mm)
        if self.mode == "stored":
            images = []
            for key in ("xray1", "xray2"):
                img = torch.from_numpy(np.squeeze(data[key]).astype(np.float32))
                img = img / 255.0 if data[key].dtype == np.uint8 else (img - img.min()) / (img.max() - img.min() + 1e-12)
                img = F.interpolate(img[None, None], size=(self.image_size, self.image_size), mode="area"
                                    if img.shape[-1] >= self.image_size else "bilinear")[0]
                images.append(img.clamp(0, 1))
            xrays = torch.stack(images)
        else:
            key = drr_key(str(path.resolve()), geometry, r, self.image_size, self.hu_window, self.mu_water,
                          self.beer_lambert)
            cached = self.cache.get("drr", key)
            if cached is not None:
                xrays = cached["xrays"]
            else:
                xrays = render_views(ct, geometry, self.hu_window, self.image_size, self.mu_water, self.beer_lambert)
                self.cache.put("drr", key, {"xrays": xrays})
        return {"xrays": xrays, "geometry": geometry, "ct": ct, "spacing": torch.full((3,), self.volume_mm / r),
                "case_id": name}


@hookimpl
def register_datasets(register):
    register("x2ctgan_h5", X2CTGANH5Dataset)

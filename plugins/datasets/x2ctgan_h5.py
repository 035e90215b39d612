"""``x2ctgan_h5``: the LIDC-IDRI HDF5 files published with X2CT-GAN (kylekma/X2CT), for comparison with that paper.

Layout (``3DGAN/lib/dataset/alignDataSet*.py``): ``root/<case>/ct_xray_data.h5`` with datasets
``ct`` (a 256^3 volume over a 320 mm cube; values are HU + 1024, the paper clips them to
[0, 2500]), ``xray1`` (PA) and ``xray2`` (lateral), 8-bit DRRs made with Plastimatch in the
``x2ctgan`` geometry, plus ``ori_size`` and ``spacing``; and list files naming the train and
test cases (``train.txt``, ``test.txt``). The CT array ``[z, y, x]`` has the head at slice 0, the
inverse of SimpleITK's order of their ``.mha`` volumes: X2CT-GAN's ``3DGAN/lib/utils/ct.py`` turns a
SimpleITK array into their layout by ``inverse_z_direction`` ("original CT is inversed in slice
dimension"), and ``3DGAN/visual.py`` reverses the depth of their CT again before writing it as an
``.mha`` with an identity direction (whose slice 0 is the inferior end). So the stored array is in the
canonical orientation already; ``flip`` (default ``[]``) flips axes when a copy was written otherwise.

``xrays = "stored"`` uses the published PA and lateral images. Against this framework's DRRs of the
head-first CT, X2CT-GAN's ``xray1`` is the PA view (0 degrees) as it lies (head at row 0) and
``xray2`` the view from 270 degrees mirrored left-right (the ``x2ctgan`` preset's ``stored_views``);
the defaults ``views = [0, 270]`` and ``orientation = ["identity", "fliplr"]`` say so, and each
stored image is turned back into the detector frame when read, so the CT, the X-rays and the
geometry agree (``x2ct check-data`` verifies it, and reads the CT's anatomy for which end is the
head: a copy flipped head-feet, CT and X-rays together, is refused naming :meth:`head_feet_fixes`).
``xrays = "render"`` renders DRRs from the CT with this framework's projector, at any views and
geometry (2, 4, 8 views).

As X2CT-GAN prepares its data (``3DGAN/lib/dataset``, the ``multiview2500`` experiment): the stored
volume is resized with ``scipy.ndimage.zoom(order=1)`` (``resize = "linear"``, the default; ``"area"``
averages blocks instead), then clipped to [0, 2500] stored = the HU window [-1024, 1476] and divided
by its width; X-rays are zoomed the same way and divided by 255. Integer arrays are rounded after
resizing, as ``zoom`` writes into the input's integer type.

Splits: ``train_list`` and ``test_list`` name the cases, relative to ``root``; ``"x2ctgan:train"`` and
``"x2ctgan:test"`` are X2CT-GAN's own lists (916 and 102 cases), shipped with this plugin, as are PerX2CT's
``"perx2ct:train"``, ``"perx2ct:val"`` and ``"perx2ct:test"`` (855, 17 and 76 of the same cases). The validation
cases are carved from the training list (``val_fraction``, seeded, removed from training), never the
test list unless ``val_list`` names it (X2CT-GAN's own code validates on its test list; a checkpoint
chosen that way is chosen on the test set, so the dataset warns).

Caching (``cache = true``, the default; ``cache_dir`` default ``~/.cache/x2ct`` as for ``ct_folder``,
see ``default_cache_dir``): the resized volume of each case and its X-rays (the stored views after
resizing and reorienting, or the rendered DRRs) are written once to the content-addressed array
cache (``.npy`` files opened memory-mapped) and read back at every later access, stage and epoch,
instead of reading the 256^3 CT and resizing it again. The key covers the file's identity (size,
modification time, content hash) and every option that changes the result (resolution, ``resize``,
``hu_offset``, ``flip``; for X-rays also ``image_size``, ``orientation`` or the geometry,
``hu_window``, ``mu_water``, ``beer_lambert``), so a replaced file is read again. ``x2ct prepare``
fills it ahead of training. ``augment`` takes the image-space augmentations of
``x2ct_plugins.datasets._common.XRAY_AUGMENTS`` (``noise``, ``intensity``), applied to the cached
X-rays of the ``augment_splits`` without re-reading or re-rendering anything.
"""

from __future__ import annotations

import logging
import random
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import MU_WATER, from_stored
from x2ct_framework.physics.geometry import check_orientation, compose_orientation
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (ArrayCache, CaseListDataset, DiskCache, XrayAugment, bad_case,
                                           case_geometry, check_common, check_split, empty_split_error,
                                           file_identity, hu_storage, hu_to_unit, read_list_file, render_views,
                                           rendered_key, resize_volume, resolve_cache_dir)

H5_NAME = "ct_xray_data.h5"


class H5Case(NamedTuple):
    """A case: its name (from the case list) and its ``ct_xray_data.h5`` file."""

    name: str
    path: Path

CACHE_VERSION = 1
REQUIRED_KEYS = ("ct", "xray1", "xray2")
AXES = {"z": 0, "y": 1, "x": 2}
RESIZES = ("linear", "area")
# X2CT-GAN's own case lists (kylekma/X2CT, 3DGAN/data/train.txt and test.txt: 916 and 102 LIDC-IDRI cases)
SHIPPED_LISTS = {f"x2ctgan:{s}": Path(__file__).with_name("lists") / f"x2ctgan_{s}.txt" for s in ("train", "test")}
# PerX2CT's split of the same cases (dek924/PerX2CT: data_preprocessing/dataset_list/train.txt, 855 of X2CT-GAN's
# 916 training cases; the cases of dataset_list/LIDC_CTslice/val.txt and test.txt, 17 and 76 of X2CT-GAN's 102 test
# cases, sorted)
SHIPPED_LISTS.update({f"perx2ct:{s}": Path(__file__).with_name("lists") / f"perx2ct_{s}.txt"
                      for s in ("train", "val", "test")})
X2CTGAN_HU_WINDOW = (-1024.0, 1476.0)  # stored [0, 2500] minus the HU offset 1024
log = logging.getLogger("x2ct_plugins.datasets")


# Largest arrays an X2CT-GAN case may declare (values): a 1024^3 CT, 8192^2 X-rays, short vectors.
MAX_ELEMENTS = {"ct": 1024 ** 3, "xray1": 8192 ** 2, "xray2": 8192 ** 2}


def zoom_linear(x: torch.Tensor, size: tuple[int, ...], integer: bool = False) -> torch.Tensor:
    """``scipy.ndimage.zoom(x, size / shape, order=1)`` for a 2D or 3D array: (bi/tri)linear with the corner
    samples kept (``align_corners``); ``integer`` rounds half away from zero, as zoom does into an integer array."""
    if tuple(x.shape) == tuple(size):
        return x.double() if integer else x
    mode = "bilinear" if x.ndim == 2 else "trilinear"
    out = F.interpolate(x[None, None].double(), size=tuple(size), mode=mode, align_corners=True)[0, 0]
    if integer:
        out = torch.sign(out) * torch.floor(out.abs() + 0.5)
    return out


def carve_validation(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded ``fraction`` of ``names`` (rounded; at least one case stays in train) set aside."""
    if fraction <= 0:
        return list(names), []
    order = list(names)
    random.Random(seed).shuffle(order)
    k = min(len(order) - 1, round(fraction * len(order)))
    val = set(order[:k])
    return [n for n in names if n not in val], [n for n in names if n in val]


class X2CTGANH5Dataset(CaseListDataset):
    """Cases of the X2CT-GAN LIDC HDF5 set.

    ``train_list``/``test_list`` (relative to ``root``) name the cases; ``val_fraction`` of the
    training list (seeded by ``seed``) is set aside for validation unless ``val_list`` names a list;
    ``hu_offset`` is subtracted from the stored values to get HU; ``volume_mm`` is the stored cube's
    size; ``views`` and ``orientation`` give the gantry angle and the stored orientation of ``xray1``
    and ``xray2`` (stored mode); ``resize`` is "linear" (X2CT-GAN's order-1 zoom) or "area";
    ``check_geometry`` ("error", "warn", "off"): what training does when the stored views do not fit
    the CT's DRRs in the declared geometry.
    """

    def __init__(self, *, split: str, stage: Stage, root: str, views: list[float] = (0.0, 270.0),
                 geometry: str | dict = "x2ctgan", hu_window: list[float] = X2CTGAN_HU_WINDOW, image_size: int = 0,
                 xrays: str = "stored", orientation: list[str] = ("identity", "fliplr"), resize: str = "linear",
                 train_list: str = "train.txt", test_list: str = "test.txt", val_list: str = "",
                 val_fraction: float = 0.05, seed: int = 0, hu_offset: float = 1024.0, volume_mm: float = 320.0,
                 flip: list[str] = (), cache_dir: str = "", cache: bool = True, on_bad_case: str = "error",
                 mu_water: float = MU_WATER, beer_lambert: bool = False, check_geometry: str = "error",
                 augment: dict | None = None, augment_splits: list[str] = ("train",)):
        check_split(split)
        check_common(views, hu_window, geometry, on_bad_case)
        if xrays not in ("stored", "render"):
            raise ValueError(f"xrays must be 'stored' (the published PA and lateral DRRs) or 'render', got {xrays!r}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {list(RESIZES)} (linear = X2CT-GAN's zoom order 1), "
                             f"got {resize!r}")
        if not 0 <= float(val_fraction) < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if xrays == "stored" and len(views) != 2:
            raise RecipeError([f"data.views: the X2CT-GAN files hold only PA (0) and lateral (90) images (xray1, "
                               f"xray2; their lateral is the view from 270 degrees, mirrored), got {len(views)} views "
                               f"{list(views)}; use views = [0, 270] or xrays = \"render\" to render other views"])
        if len(orientation) != 2:
            raise RecipeError([f"data.orientation: expected two orientations (xray1, xray2), got {list(orientation)}"])
        self.orientation = [check_orientation(o, f"data.orientation[{i}]") for i, o in enumerate(orientation)]
        if check_geometry not in ("error", "warn", "off"):
            raise ValueError(f"check_geometry must be 'error', 'warn' or 'off', got {check_geometry!r}")
        # training checks the stored views against the CT first (x2ct_framework.datacheck)
        self.geometry_check = check_geometry if xrays == "stored" else "off"
        self.stores_xrays = xrays == "stored"
        if xrays == "render":  # rendered here, in the detector frame
            self.orientation = ["identity"] * len(views)
        self.resize = resize
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
        self.flip_names = list(flip)
        self.on_bad_case = on_bad_case
        self.mu_water, self.beer_lambert = float(mu_water), beer_lambert
        self.cache = ArrayCache(resolve_cache_dir(cache_dir, cache))
        self.seed = int(seed)
        xray_augment = XrayAugment(augment or {}, "augment")  # validated for every split
        self.xray_augment = xray_augment if split in augment_splits and xray_augment else None
        if self.xray_augment is not None:
            self.track_epoch()
        case_geometry(self.views, geometry, self.volume_mm)

        def resolve(name: str) -> Path:
            if name in SHIPPED_LISTS:
                return SHIPPED_LISTS[name]
            path = Path(name).expanduser()
            return path if path.is_absolute() else self.root / path

        if split == "val" and val_list:
            list_path = resolve(val_list)
            if list_path.resolve() == resolve(test_list).resolve():
                log.warning("x2ctgan_h5: data.val_list is the test list (%s): the best checkpoint will be chosen on "
                            "the test set, as X2CT-GAN's own code does; carve validation from train "
                            "(val_fraction) to keep the test set unseen", list_path)
            names = read_list_file(list_path)
        elif split == "test":
            list_path = resolve(test_list)
            names = read_list_file(list_path)
        else:
            list_path = resolve(train_list)
            train_names, val_names = carve_validation(read_list_file(list_path), 0.0 if val_list else val_fraction,
                                                      seed)
            names = train_names if split == "train" else val_names
            if split == "val" and not names:
                raise DataError(f"x2ctgan_h5: no validation cases: val_fraction = {val_fraction} of {list_path} "
                                f"gives none; set data.val_fraction > 0 or data.val_list")
        self.cases: list[H5Case] = []
        for name in names:
            path = self.root / name / H5_NAME
            if not path.is_file():
                bad_case(on_bad_case, f"{path}: case {name!r} listed in {list_path} has no {H5_NAME}")
                continue
            self.cases.append(H5Case(name, path))
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
                for k in REQUIRED_KEYS:  # the declared sizes, before reading a byte of the arrays
                    shape = tuple(getattr(f[k], "shape", ()) or ())
                    limit = MAX_ELEMENTS.get(k, 64)
                    if int(np.prod(shape, dtype=np.float64)) > limit:
                        raise DataError(f"{path}: {k}: declares shape {shape} ({np.prod(shape, dtype=np.float64):.3g} "
                                        f"values), more than the {limit:.3g} an X2CT-GAN case can hold; the file is "
                                        f"damaged or not an X2CT-GAN case: remove it from the list")
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

    # ---- the cache: resized volumes and X-rays ---------------------------------------------------
    def head_feet_fixes(self) -> list[str]:
        """The settings that flip this dataset's CT and its stored views head-feet together (named by ``x2ct
        check-data`` when the CT's anatomy puts the head at the last slice)."""
        flip = [a for a in self.flip_names if a != "z"] + ([] if "z" in self.flip_names else ["z"])
        fixes = [f"data.flip = [{', '.join(chr(34) + a + chr(34) for a in flip)}]"]
        if self.mode == "stored":
            turned = [compose_orientation("flipud", o) for o in self.orientation]
            fixes.append(f"data.orientation = [{', '.join(chr(34) + o + chr(34) for o in turned)}]")
        return fixes

    def _volume_key(self, path: Path) -> str:
        return DiskCache.key("x2ctgan_volume", CACHE_VERSION, file_identity(path), self.stage.resolution,
                             self.resize, self.hu_offset, self.flip)

    def _xray_key(self, volume_key: str, geometry) -> str:
        if self.mode == "stored":  # the stored views depend on the file, not on the resized volume
            return DiskCache.key("x2ctgan_stored", CACHE_VERSION, volume_key, self.image_size, self.orientation)
        return rendered_key(("x2ctgan", CACHE_VERSION), volume_key, geometry, self.image_size, self.hu_window,
                            self.mu_water, self.beer_lambert)

    def _resized(self, stored: np.ndarray) -> torch.Tensor:
        """HU ``[R, R, R]`` (float32, head at slice 0) from the stored array, as X2CT-GAN resizes it."""
        r = self.stage.resolution
        if self.resize == "linear":  # X2CT-GAN: zoom the stored values (order 1), then clip
            raw = zoom_linear(torch.from_numpy(stored.astype(np.float64)), (r, r, r),
                              integer=np.issubdtype(stored.dtype, np.integer))
            hu = (raw - self.hu_offset).float()
        else:
            hu = resize_volume((torch.from_numpy(stored.astype(np.float32)) - self.hu_offset).contiguous(), r)
        if self.flip:
            hu = hu.flip(self.flip)
        return hu.contiguous()

    def _case(self, j: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """HU ``[R, R, R]``, X-rays ``[V, 1, S, S]`` and the geometry of case ``j``, through the cache."""
        name, path = self.cases[j]
        geometry = case_geometry(self.views, self.geometry_option, self.volume_mm)
        volume_key = self._volume_key(path)
        xray_key = self._xray_key(volume_key, geometry)
        vol_hit = self.cache.get("volume", volume_key)
        ray_hit = self.cache.get("xrays" if self.mode == "stored" else "drr", xray_key)
        if vol_hit is not None:
            hu = torch.from_numpy(np.array(vol_hit[0]["hu"])).float()  # one copy out of the memory map
        data = None
        if vol_hit is None or (ray_hit is None and self.mode == "stored"):
            data = self._read(path)
        if vol_hit is None:
            hu = self._resized(data["ct"])
            a = hu.numpy()
            stored = hu_storage(hu) if np.array_equal(a, np.round(a)) else a  # integers exactly, else float32
            self.cache.put("volume", volume_key, {"hu": stored}, {"case": name, "source": str(path)})
        if ray_hit is not None:
            return hu, torch.from_numpy(np.array(ray_hit[0]["xrays"])), geometry
        if self.mode == "stored":
            xrays = torch.stack([self._stored_view(data[key], code)
                                 for key, code in zip(("xray1", "xray2"), self.orientation)])
            self.cache.put("xrays", xray_key, {"xrays": xrays.numpy()}, {"case": name, "source": str(path)})
        else:
            xrays = render_views(hu_to_unit(hu, self.hu_window)[None], geometry, self.hu_window, self.image_size,
                                 self.mu_water, self.beer_lambert)
            self.cache.put("drr", xray_key, {"xrays": xrays.numpy()}, {"case": name, "views": self.views})
        return hu, xrays, geometry

    def prepare_case(self, j: int) -> list[str] | None:
        """Fill the cache for case ``j`` (``x2ct prepare``): [] when done, None when it was cached already."""
        _, path = self.cases[j]
        volume_key = self._volume_key(path)
        xray_key = self._xray_key(volume_key, case_geometry(self.views, self.geometry_option, self.volume_mm))
        if self.cache.has("volume", volume_key) and self.cache.has("xrays" if self.mode == "stored" else "drr",
                                                                   xray_key):
            return None
        self._case(j)
        return []

    def _item(self, j: int) -> dict:
        name, _ = self.cases[j]
        r = self.stage.resolution
        hu, xrays, geometry = self._case(j)
        ct = hu_to_unit(hu, self.hu_window)[None]
        if self.xray_augment is not None:
            xrays = self.xray_augment(xrays, self.seed, self.epoch, j)
        return {"xrays": xrays, "geometry": geometry, "ct": ct, "spacing": torch.full((3,), self.volume_mm / r),
                "case_id": name}

    def _stored_view(self, array: np.ndarray, code: str) -> torch.Tensor:
        """One stored X-ray as ``[1, S, S]`` in [0, 1] in the detector frame (its stored orientation undone)."""
        a = np.squeeze(array)
        size = (self.image_size, self.image_size)
        if self.resize == "linear":
            img = zoom_linear(torch.from_numpy(a.astype(np.float64)), size, integer=np.issubdtype(a.dtype, np.integer))
            img = img.float()
        else:
            img = torch.from_numpy(a.astype(np.float32))
            mode = "area" if img.shape[-1] >= size[-1] else "bilinear"
            img = F.interpolate(img[None, None], size=size, mode=mode)[0, 0]
        img = img / 255.0 if a.dtype == np.uint8 else (img - img.min()) / (img.max() - img.min() + 1e-12)
        return from_stored(img, code)[None].clamp(0, 1).contiguous()


@hookimpl
def register_datasets(register):
    register("x2ctgan_h5", X2CTGANH5Dataset)

"""Pieces shared by the dataset plugins: splits, HU windows, cropping, DRR rendering and the caches.

Cached entries are content-addressed: the key covers the source file's identity
(:func:`file_identity`: size, modification time and a hash of its content) and every option that
changes the result, so a CT replaced at the same path is never served from an old entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import numpy as np
from torch.utils.data import Dataset

from x2ct_framework.cachedir import default_cache_dir
from x2ct_framework.conventions import hu_to_unit  # noqa: F401 (the dataset plugins import it from here)
from x2ct_framework.errors import DataError
from x2ct_framework.physics import drr, geometry_fingerprint, make_geometry, resolve_preset

log = logging.getLogger("x2ct_plugins.datasets")

SPLITS = ("train", "val", "test")
BAD_CASE_POLICIES = ("error", "skip")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def check_common(views: Sequence[float], hu_window: Sequence[float], geometry, on_bad_case: str | None = None) -> None:
    """Validate the options every DRR-rendering dataset shares (raises ValueError/RecipeError)."""
    if len(views) < 1:
        raise ValueError("views: expected at least one gantry angle")
    if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
        raise ValueError(f"hu_window: expected [low, high] with low < high, got {list(hu_window)}")
    resolve_preset(geometry)
    if on_bad_case is not None and on_bad_case not in BAD_CASE_POLICIES:
        raise ValueError(f"on_bad_case must be one of {list(BAD_CASE_POLICIES)}, got {on_bad_case!r}")


def resize_volume(vol: torch.Tensor, size: int | Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resize a ``[D, H, W]`` volume: area averaging when shrinking by whole factors, else trilinear; labels nearest."""
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if tuple(vol.shape[-3:]) == size:
        return vol
    x = vol[None, None].float()
    if labels:
        return F.interpolate(x, size=size, mode="nearest")[0, 0].to(vol.dtype)
    if all(n % s == 0 for n, s in zip(vol.shape[-3:], size)):
        return F.adaptive_avg_pool3d(x, size)[0, 0]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]


def case_geometry(views: Sequence[float], geometry, volume_mm: float, jitter_deg: float = 0.0,
                  rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """The per-case geometry dict, with the gantry angles jittered by up to ``jitter_deg`` when asked."""
    angles = [float(v) for v in views]
    if jitter_deg and rng is not None:
        angles = [a + rng.uniform(-jitter_deg, jitter_deg) for a in angles]
    return make_geometry(angles, geometry, volume_mm=volume_mm)


def render_views(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], hu_window: Sequence[float],
                 image_size: int, mu_water: float, beer_lambert: bool) -> torch.Tensor:
    """DRRs ``[V, 1, h, w]`` of one CT ``[1, D, H, W]`` in [0, 1]."""
    batched = {k: v[None] for k, v in geometry.items()}
    with torch.no_grad():
        out = drr(ct01[None].float(), batched, (float(hu_window[0]), float(hu_window[1])),
                  det_shape=(image_size, image_size), mu_water=mu_water, beer_lambert=beer_lambert)
    return out[0]


class XrayStyle:
    """The ``xray`` option (an X-ray preset of ``physics.spectral`` or a table) and the ``style`` augmentation
    (ranges of ``spectral.STYLE_RANGES`` drawn per item). With a spectral preset or a style, a dataset
    caches each case's material line integrals (``lines``: ``[V, M, h, w]`` g/cm^2) once and makes the
    X-rays from them at every access (:meth:`images`): spectrum, scatter, blur, noise and processing,
    no re-projection. ``ideal`` without a style keeps today's DRRs (:attr:`uses_lines` is False)."""

    def __init__(self, xray, style: Mapping | None = None, where: str = "data"):
        from x2ct_framework.errors import RecipeError
        from x2ct_framework.physics.spectral import check_style, resolve_xray

        try:
            self.params = resolve_xray(xray, f"{where} -> xray")
            self.style = check_style(style, f"{where} -> augment -> style") if style is not None else None
        except RecipeError as exc:
            raise ValueError("; ".join(exc.problems)) from exc
        if self.style is not None and self.params["mode"] == "mono":
            base = resolve_xray("chest_pa")  # a monoenergetic preset has no spectrum to vary: draw around chest_pa
            self.base = {**base, **{k: v for k, v in self.params.items() if k in ("contrast",)}}
        else:
            self.base = self.params
        self.uses_lines = self.params["mode"] != "mono" or self.style is not None

    def key(self) -> list:
        """What changes the cached lines (the scheme's materials)."""
        return ["lines", bool(self.base["contrast"])]

    def materials(self, labels: bool) -> tuple[str, ...]:
        from x2ct_framework.physics.materials import scheme_materials

        return scheme_materials(bool(self.base["contrast"]), labels)

    def lines(self, ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], hu_window: Sequence[float],
              image_size: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Material line integrals ``[V, M, h, w]`` of one CT ``[1, D, H, W]`` in [0, 1]."""
        from x2ct_framework.physics.spectral import material_lines

        with torch.no_grad():
            out = material_lines(ct01[None].float(), {k: v[None] for k, v in geometry.items()},
                                 hu_window=(float(hu_window[0]), float(hu_window[1])),
                                 det_shape=(image_size, image_size), contrast=bool(self.base["contrast"]),
                                 labels=None if labels is None else labels[None],
                                 materials=self.materials(labels is not None))
        return out[0]

    def images(self, lines: torch.Tensor, geometry: Mapping[str, torch.Tensor], seed: int, epoch: int,
               index: int) -> torch.Tensor:
        """X-rays ``[V, 1, h, w]`` from cached ``lines``: the preset's, or a style drawn from (seed, epoch, index);
        noise drawn from the same seed."""
        from x2ct_framework.physics.spectral import draw_style, render_lines

        g = torch.Generator().manual_seed(augment_seed(seed, epoch if self.style is not None else 0, index, "style"))
        params = draw_style(self.base, self.style, g) if self.style is not None else self.base
        m = lines.shape[1]
        with torch.no_grad():
            out = render_lines(lines[None].float(), {k: v[None] for k, v in geometry.items()}, params,
                               materials=self.materials(m == 6), generator=g)
        return out[0].float()


# ---- image-space augmentation of the X-rays ------------------------------------------------------
XRAY_AUGMENTS = {
    "noise": "Gaussian noise added to every X-ray pixel: std (X-ray units, images in [0, 1]: e.g. 0.01; "
             "a number, or [low, high] drawn per item), p",
    "intensity": "per-view contrast, gamma and brightness: scale [low, high], gamma [low, high], "
                 "shift [low, high] (x -> scale * x^gamma + shift), p",
}
_INTENSITY_DEFAULTS = {"scale": (0.9, 1.1), "gamma": (1.0, 1.0), "shift": (-0.05, 0.05)}


def augment_seed(seed: int, epoch: int, index: int, what: str = "") -> int:
    """A 63-bit seed that depends only on (seed, epoch, index): the same augmentation for the same
    case and epoch in any worker, after a resume, in any process."""
    return int(hashlib.sha1(f"{what}:{int(seed)}:{int(epoch)}:{int(index)}".encode()).hexdigest()[:15], 16)


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and float(value[0]) <= float(value[1]):
        return float(value[0]), float(value[1])
    raise ValueError(f"{name}: expected a number or [low, high] with low <= high, got {value!r}")


class XrayAugment:
    """The image-space augmentations (``XRAY_AUGMENTS``) of ``augment`` tables, applied to finished X-rays
    ``[V, 1, H, W]`` (cached or rendered): no volume is read or rendered again. Draws follow
    :func:`augment_seed` of (the dataset's seed, the epoch, the item); the dataset holds the epoch
    (:meth:`CaseListDataset.set_epoch`) and passes it in."""

    def __init__(self, options: Mapping, where: str = "augment"):
        self.noise: dict | None = None
        self.intensity: dict | None = None
        for name, opts in options.items():
            if name not in XRAY_AUGMENTS:
                raise ValueError(f"{where}: unknown X-ray augmentation {name!r}; accepted: "
                                 + "; ".join(f"{k} ({v})" for k, v in XRAY_AUGMENTS.items()))
            if not isinstance(opts, Mapping):
                raise ValueError(f"{where} -> {name}: expected a table of options, got {opts!r}")
            opts = dict(opts)
            p = float(opts.pop("p", 1.0))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{where} -> {name}: p must be in [0, 1], got {p}")
            if name == "noise":
                std = _pair(opts.pop("std", 0.01), f"{where} -> noise -> std")
                if std[0] < 0 or std[1] > 0.5:
                    raise ValueError(f"{where} -> noise -> std = {std[1]:g}: the noise is added to the X-rays, whose "
                                     f"values are in [0, 1], so std is in those units (e.g. 0.01); for noise in HU "
                                     f"on the CT (which re-renders the views at every access) use "
                                     f"ct_noise = {{ std = {std[1]:g} }}")
                self.noise = {"std": std, "p": p}
            else:
                ranges = {k: _pair(opts.pop(k, v), f"{where} -> intensity -> {k}")
                          for k, v in _INTENSITY_DEFAULTS.items()}
                if ranges["scale"][0] <= 0 or ranges["gamma"][0] <= 0:
                    raise ValueError(f"{where} -> intensity: scale and gamma must be positive, got {ranges}")
                self.intensity = {**ranges, "p": p}
            if opts:
                raise ValueError(f"{where} -> {name}: unknown option(s) {sorted(opts)} ({XRAY_AUGMENTS[name]})")

    def __bool__(self) -> bool:
        return self.noise is not None or self.intensity is not None

    def __call__(self, xrays: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(augment_seed(seed, epoch, index, "xray"))
        out = xrays.float()
        views = out.shape[0]

        def uniform(lo_hi: tuple[float, float], n: int) -> torch.Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

        draw = torch.rand(2, generator=g, dtype=torch.float64)  # one draw per transform, used or not
        if self.intensity is not None:
            scale, gamma, shift = (uniform(self.intensity[k], views).float().view(-1, 1, 1, 1).to(out.device)
                                   for k in ("scale", "gamma", "shift"))
            if draw[0] < self.intensity["p"]:
                out = (scale * out.clamp(0, 1).pow(gamma) + shift).clamp(0, 1)
        if self.noise is not None:
            std = float(uniform(self.noise["std"], 1))
            noise = (torch.randn(out.shape, generator=g) * std).to(out.device)
            if draw[1] < self.noise["p"]:
                out = (out + noise).clamp(0, 1)
        return out.contiguous()


class DiskCache:
    """Tensors saved under a hashed key (atomic writes); a damaged entry is rebuilt, never fatal."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.pt"

    def get(self, kind: str, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:
            log.warning("damaged cache entry %s (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.folder is None:
            return
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        tmp.replace(path)


def drr_key(case: str, geometry: Mapping[str, torch.Tensor], resolution: int, image_size: int,
            hu_window: Sequence[float], mu_water: float, beer_lambert: bool, source: str = "") -> str:
    """Key of a case's DRRs; ``source`` is the identity of what they were rendered from (when ``case``
    names an existing file and no ``source`` is given, that file's :func:`file_identity`)."""
    if not source and os.path.isfile(case):
        source = file_identity(case)
    return DiskCache.key("drr", case, source, geometry_fingerprint(geometry), resolution, image_size,
                         [float(h) for h in hu_window], mu_water, beer_lambert)


def rendered_key(namespace: Sequence, volume_key: str, geometry: Mapping[str, torch.Tensor], image_size: int,
                 hu_window: Sequence[float], mu_water: float, beer_lambert: bool) -> str:
    """Key of the DRRs rendered from a cached volume (``volume_key``): every option that changes them.
    ``namespace`` keeps datasets' entries apart (their name, their cache version)."""
    return DiskCache.key("drr", *namespace, volume_key, geometry_fingerprint(geometry), image_size, list(hu_window),
                         mu_water, beer_lambert)


# ---- file identity ----------------------------------------------------------------------------
FULL_HASH_BYTES = 8 << 20   # files up to this size are hashed whole
CHUNK_BYTES = 1 << 20       # else the first, middle and last chunk of this size
_identities: dict[tuple, str] = {}


def file_identity(path: str | Path) -> str:
    """``size:mtime_ns:sha1`` of a file; the hash covers the whole file up to 8 MiB, else three 1 MiB
    chunks (start, middle, end). Memoised per process by (path, size, mtime, inode, change time): a file
    replaced by another of the same size and modification time (copied with its times kept) is hashed again."""
    path = Path(path)
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if memo in _identities:
        return _identities[memo]
    h = hashlib.sha1()
    with path.open("rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            for offset in (0, st.st_size // 2 - CHUNK_BYTES // 2, st.st_size - CHUNK_BYTES):
                f.seek(offset)
                h.update(f.read(CHUNK_BYTES))
    ident = f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"
    _identities[memo] = ident
    return ident


def series_identity(files: Sequence[Path]) -> str:
    """Identity of a DICOM series: every file's name, size and time, plus the content of three of them."""
    h = hashlib.sha1()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns};".encode())
    for f in dict.fromkeys([files[0], files[len(files) // 2], files[-1]]):  # ordered: the same key in every process
        h.update(file_identity(f).encode())
    return f"series:{len(files)}:{h.hexdigest()[:16]}"


# ---- the array cache --------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str, cache: bool) -> Path | None:
    if not cache:
        return None
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def hu_storage(hu: torch.Tensor) -> np.ndarray:
    """Integer HU as int16 when they fit, else int32 (never wrapped)."""
    a = hu.numpy() if isinstance(hu, torch.Tensor) else np.asarray(hu)
    if a.size and (a.min() < -32768 or a.max() > 32767):
        return a.astype(np.int32)
    return a.astype(np.int16)


class ArrayCache:
    """Content-addressed entries ``<folder>/<kind>/<key>/`` of ``.npy`` arrays (opened memory-mapped)
    and a ``meta.json``. An entry is written in a private folder and renamed into place, so readers
    never see half an entry and concurrent writers (workers, ranks, nodes) need no lock: the first
    rename wins, the others drop their copy. A damaged entry is removed and rebuilt."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    def entry(self, kind: str, key: str) -> Path:
        return self.folder / kind / key[:2] / key

    def has(self, kind: str, key: str) -> bool:
        return self.folder is not None and (self.entry(kind, key) / "meta.json").is_file()

    def get(self, kind: str, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        if self.folder is None:
            return None
        folder = self.entry(kind, key)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
            verify_entry(folder, arrays, meta)
        except Exception as exc:
            log.warning("damaged cache entry %s (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return arrays, meta

    def put(self, kind: str, key: str, arrays: Mapping[str, np.ndarray], meta: dict | None = None) -> None:
        if self.folder is None:
            return
        final = self.entry(kind, key)
        if (final / "meta.json").is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.mkdir()
            checks = {}
            for name, a in arrays.items():
                a = np.ascontiguousarray(a)
                np.save(tmp / f"{name}.npy", a)
                checks[name] = {"shape": list(a.shape), "dtype": a.dtype.str, "blake2b": content_checksum(a)}
            (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "arrays": list(arrays), "checks": checks}))
            if final.exists() and not (final / "meta.json").is_file():  # a damaged entry left by a crash
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another writer was first (the folder exists and is not empty)
                pass
        except OSError as exc:  # a full disk, no permission: say which folder
            raise DataError(f"cache folder {self.folder}: could not write the {kind} entry {final.name} ({exc}); "
                            f"free space there, point data.cache_dir at another folder, or set cache = false"
                            ) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def content_checksum(a: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).hexdigest()


_VERIFIED: set[tuple] = set()  # entries this process checked already (folder, meta.json's size and time)


def verify_entry(folder: Path, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    """Raise ValueError unless every array has the shape, dtype and content checksum its entry recorded
    (checked once per process per entry: the arrays are then used memory-mapped)."""
    checks = meta.get("checks")
    if not isinstance(checks, dict) or set(checks) != set(arrays):
        raise ValueError("no shape, dtype and checksum recorded for its arrays (an entry from an older version)")
    st = (folder / "meta.json").stat()
    key = (str(folder), st.st_size, st.st_mtime_ns, st.st_ino)
    for name, a in arrays.items():
        want = checks[name]
        if list(a.shape) != list(want["shape"]) or a.dtype.str != want["dtype"]:
            raise ValueError(f"{name}.npy is {a.dtype.str} {list(a.shape)}, the entry recorded {want['dtype']} "
                             f"{want['shape']}")
    if key in _VERIFIED:
        return
    for name, a in arrays.items():
        if content_checksum(a) != checks[name]["blake2b"]:
            raise ValueError(f"{name}.npy does not match its recorded checksum (changed on disk)")
    _VERIFIED.add(key)


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def seeded_split(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``names`` with ``seed`` and cut them by ``fractions`` (train, val, test).

    Small sets stay usable, by a fixed rule: every split with a positive fraction gets at least one
    case while train keeps at least one (so 3 cases give 1/1/1, 4 give 2/1/1, 5 give 3/1/1); with
    fewer cases than such splits (1 or 2 cases), an empty val or test split reuses the last case of
    the split before it (val reuses train's, test reuses val's) and :func:`split_reuse` says so.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions: expected three non-negative numbers (train, val, test), "
                         f"got {list(fractions)}")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    total = float(sum(fractions))
    n = len(order)
    counts = [int(round(n * f / total)) for f in fractions]
    counts[0] = n - counts[1] - counts[2]
    for k in (1, 2):  # a positive fraction gets a case, taken from train while train keeps one
        if fractions[k] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k], counts[0] = 1, counts[0] - 1
    while counts[0] < 1 and n > 0:  # rounding gave train nothing
        k = 1 if counts[1] >= counts[2] else 2
        counts[k], counts[0] = counts[k] - 1, counts[0] + 1
    out = {"train": order[:counts[0]], "val": order[counts[0]:counts[0] + counts[1]],
           "test": order[counts[0] + counts[1]:]}
    for k, (split, before) in enumerate((("val", "train"), ("test", "val")), start=1):
        if fractions[k] > 0 and not out[split] and out[before]:
            out[split] = [out[before][-1]]
    return out


def split_reuse(splits: Mapping[str, Sequence[str]]) -> list[str]:
    """Warnings for cases that sit in more than one split of a seeded split (tiny sets only)."""
    notes = []
    for a, b in (("train", "val"), ("val", "test"), ("train", "test")):
        both = sorted(set(splits.get(a, [])) & set(splits.get(b, [])))
        if both:
            notes.append(f"{', '.join(both)} in both the {a} and {b} splits (too few cases to hold one out): "
                         f"scores on {b} are not held-out scores")
    return notes


def check_split_overlap(table: Mapping[str, Sequence[str]], source: str) -> None:
    """A split file that puts a case in two splits is an error (it inflates the test scores)."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(table.get(a, [])) & set(table.get(b, [])))
        if both:
            raise DataError(f"{source}: {len(both)} case(s) in both the {a} and {b} splits: "
                            f"{', '.join(both[:5])}{' ...' if len(both) > 5 else ''}; a case belongs to one split")
    for split, names in table.items():
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise DataError(f"{source}: case(s) listed twice in the {split} split: {', '.join(dup[:5])}")


def read_split_file(path: Path) -> dict[str, list[str]]:
    """A JSON or TOML table ``{train = [...], val = [...], test = [...]}`` of case names."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid split file ({exc}); expected a table train/val/test of case names")
    if not isinstance(data, dict) or not set(data) <= set(SPLITS) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()):
        raise DataError(f"{path}: expected a table with keys among {', '.join(SPLITS)}, each a list of case names")
    table = {k: list(v) for k, v in data.items()}
    check_split_overlap(table, str(path))
    return table


def read_list_file(path: Path) -> list[str]:
    """Case names, one a line (blank lines and # comments ignored)."""
    if not path.is_file():
        raise DataError(f"{path}: case list not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def empty_split_error(split: str, source: str) -> DataError:
    return DataError(f"{source}: the {split} split is empty; add cases to it or change the split settings")


def bad_case(policy: str, message: str) -> None:
    """Raise a DataError, or warn and let the caller skip the case."""
    if policy == "error":
        raise DataError(message + ' (set on_bad_case = "skip" to skip such cases with a warning)')
    log.warning("skipping a bad case: %s", message)


STUDY_REDUCE = ("error", "max", "mean", "first")
_TRUE, _FALSE = ("true", "yes", "y", "t"), ("false", "no", "n", "f")


def _study_value(text: str, path: Path, line: int, column: str) -> float:
    v = text.strip()
    if v == "":
        return math.nan
    if v.lower() in _TRUE:
        return 1.0
    if v.lower() in _FALSE:
        return 0.0
    try:
        return float(v)
    except ValueError:
        raise DataError(f"{path}, line {line}, column {column!r}: {text!r} is not a number (study labels are "
                        f"numbers: 0/1, true/false, or a measurement)") from None


def read_study_labels(path: str | Path, id_column: str = "case_id", columns: Sequence[str] = (),
                      reduce: str = "error", where: str = "data.study_labels") -> dict[str, dict[str, float]]:
    """Per-case study labels from a CSV (RSPECT-style: one case-id column and label columns; several rows of one
    case, such as RSPECT's one row per image, are combined by ``reduce``): ``{case id: {column: value}}``.

    ``columns`` chooses the label columns (default every column but the id); ``reduce`` = ``"error"`` (rows of a
    case must agree), ``"max"`` (any positive row makes the case positive), ``"mean"`` or ``"first"``. Every
    problem is a DataError naming the file and the column (and the line of a bad value)."""
    import csv

    path = Path(path).expanduser()
    if reduce not in STUDY_REDUCE:
        raise ValueError(f"study_reduce must be one of {', '.join(STUDY_REDUCE)}, got {reduce!r}")
    if not path.is_file():
        raise DataError(f"{where}: the study-label file {path} was not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if id_column not in header:
            raise DataError(f"{path}: no case-id column {id_column!r} (columns: {', '.join(header) or 'none'}); set "
                            f"data.study_id_column to the column that holds the case names")
        wanted = list(columns) or [h for h in header if h != id_column]
        absent = [c for c in wanted if c not in header]
        if absent:
            raise DataError(f"{path}: no column {absent[0]!r} (data.study_columns; columns: {', '.join(header)})")
        if not wanted:
            raise DataError(f"{path}: no label column beside the case-id column {id_column!r}")
        rows: dict[str, list[dict[str, float]]] = {}
        for line, row in enumerate(reader, start=2):
            case = (row.get(id_column) or "").strip()
            if not case:
                raise DataError(f"{path}, line {line}: the case-id column {id_column!r} is empty")
            rows.setdefault(case, []).append({c: _study_value(row.get(c) or "", path, line, c) for c in wanted})
    table = {}
    for case, found in rows.items():
        out = {}
        for c in wanted:
            vals = [r[c] for r in found]
            if reduce == "first" or len(vals) == 1:
                out[c] = vals[0]
            elif reduce == "error":
                distinct = sorted({v for v in vals if v == v})
                if len(distinct) > 1:
                    raise DataError(f"{path}: case {case!r} has {len(vals)} rows whose column {c!r} disagrees "
                                    f"({', '.join(f'{v:g}' for v in distinct)}); set data.study_reduce = \"max\" "
                                    f"(any positive row: RSPECT's per-image rows) or \"mean\"")
                out[c] = distinct[0] if distinct else math.nan
            else:
                finite = [v for v in vals if v == v]
                out[c] = (max(finite) if reduce == "max" else sum(finite) / len(finite)) if finite else math.nan
        table[case] = out
    return table


def match_study_labels(table: dict[str, dict[str, float]], cases: Sequence[str], path: str | Path, id_column: str,
                       split: str) -> dict[str, dict[str, float]]:
    """The study labels of ``cases``; a case without a row is a DataError naming the file, the id column and the
    unmatched case ids (with a few of the file's ids, so a naming difference shows)."""
    missing = [c for c in cases if c not in table]
    if missing:
        sample = list(table)[:3]
        raise DataError(f"{path}: {len(missing)} case(s) of the {split} split have no row (matched on column "
                        f"{id_column!r}): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; the file's "
                        f"ids look like {', '.join(sample) or '(none)'}")
    return {c: dict(table[c]) for c in cases}


class CaseListDataset(Dataset):
    """A dataset over ``self.cases`` read by ``self._item(j)``; an unreadable case is skipped (with a
    warning, when ``on_bad_case = "skip"``) and the next readable one served in its place."""

    cases: list
    bad: set
    on_bad_case: str
    split: str
    root: Path

    _epoch: torch.Tensor | None = None
    study: dict[str, dict[str, float]] | None = None  # case id -> study labels (attach_study_labels)

    def attach_study_labels(self, path: str, id_column: str = "case_id", columns: Sequence[str] = (),
                            reduce: str = "error") -> None:
        """Give every item ``study`` = its row of the CSV ``path`` (see :func:`read_study_labels`), matched on the
        case name; every case of the split must have one."""
        table = read_study_labels(path, id_column, columns, reduce)
        self.study = match_study_labels(table, [c.name for c in self.cases], path, id_column, self.split)

    def _item(self, j: int) -> dict:
        raise NotImplementedError

    def track_epoch(self) -> None:
        """Keep the epoch for augmentations drawn from (seed, epoch, item): in shared memory, so loader
        workers that live across epochs see :meth:`set_epoch` change it. Datasets without such an
        augmentation never call this and pay nothing."""
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """The epoch augmentations draw from (the trainer calls it before each epoch)."""
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return 0 if self._epoch is None else int(self._epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.cases):
            raise IndexError(f"case {i} of a {len(self.cases)}-case {self.split} split")
        for step in range(len(self.cases)):
            j = (i + step) % len(self.cases)
            if j in self.bad:
                continue
            try:
                item = self._item(j)
            except DataError as exc:
                bad_case(self.on_bad_case, str(exc))
                self.bad.add(j)
                continue
            if self.study is not None:
                item["study"] = dict(self.study[self.cases[j].name])
            return item
        raise DataError(f"{self.root}: every case of the {self.split} split is unreadable")

"""X-ray images -> CT volume in HU as NIfTI: ``x2ct predict CHECKPOINT_OR_RUN INPUT... --geometry G``.

Inputs (PNG/JPEG/TIFF, DICOM, NIfTI or .npy images, read by ``x2ct_framework.io.read_xray``):

- image files: one case, the views in the order given;
- a folder of images: one case, the views in file-name order (or the order of ``files`` in its
  geometry file);
- a folder of case folders: one case per sub-folder (batch mode, with a progress bar).

Geometry: ``--geometry recipe`` (the geometry the model was trained with),
``--geometry PRESET --views A B ...`` (a physics preset and the gantry angles), or a TOML/JSON file
(``--geometry file.toml`` for every case, or ``geometry.toml``/``geometry.json`` inside a case folder)
holding ``views`` (or ``angles``), optionally ``preset``, ``files`` and other ``make_geometry`` options.
Without any of these, DICOM radiographs give it from their tags (``x2ct_framework.radiograph``: view
angles from ViewPosition, distances, detector size from the pixel spacing; each value printed with the
tag it came from or the named assumption that stood in, and kept in the sidecar); other images need one.

Inputs that do not match what the model was trained with are refused with a message (another
number of views; other angles unless ``--allow-geometry-mismatch``) or adapted with a logged note
(image size: resized, after padding to the training aspect ratio; ``--resize off`` refuses instead).

Output: one ``<case>.nii.gz`` per case in HU (float32), in the framework's canonical orientation
(array axes toward patient Left, Posterior, Inferior), plus ``<case>.json`` recording inputs,
geometry, checkpoint, every adaptation and the world frame. The frame (the affine's origin) is

- the reference CT's, with ``--like CT`` or when the case's geometry file names its CT (``ct =
  "ct.nii.gz"``, the ``paired_xray`` layout): the grid the framework cuts from that CT (resampled to
  the output spacing and cropped as the recipe's ``crop`` says), so the prediction overlays the CT
  in 3D Slicer or ITK-SNAP;
- else the isocentre at the world origin.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from x2ct_framework.atomic import follow_umask, write_text
from x2ct_framework.errors import DataError, X2CTError
from x2ct_framework.generative import SampleStats, draw_samples, is_generative, stage_model
from x2ct_framework.io import grid_frame
from x2ct_framework.loading import load_model, pick_device
from x2ct_framework.runs import Target, data_options_with_defaults, hu_window_of, resolve_target

log = logging.getLogger("x2ct_framework.evaluation.predict")

GEOMETRY_FILES = ("geometry.toml", "geometry.json")
# Beam geometry the model's back-projection depends on: another value is refused unless allowed.
# Other keys (the field of view ``volume_mm``) only set the output spacing and are logged.
STRICT_GEOMETRY = ("cone", "sid", "sdd", "detector_mm", "detector_offset_mm")


def _image_suffixes() -> tuple[str, ...]:
    from x2ct_framework.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES

    return IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + (".npy",)


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and (
        name.endswith(".nii.gz") or path.suffix.lower() in _image_suffixes())


# ---- geometry ---------------------------------------------------------------------------------
def _make_geometry_params() -> dict[str, inspect.Parameter]:
    from x2ct_framework.physics import make_geometry

    return dict(inspect.signature(make_geometry).parameters)


def geometry_from_spec(spec: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A per-case geometry dict from ``{"views": [...], "preset": ..., <make_geometry options>}``."""
    from x2ct_framework.physics import make_geometry

    spec = dict(spec)
    spec.pop("files", None)
    spec.pop("ct", None)  # the case's CT (paired_xray layout): the output frame, not geometry
    views = spec.pop("views", None)
    if views is None:
        views = spec.pop("angles", None)
    if not isinstance(views, (list, tuple)) or not views or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in views):
        raise DataError(f"{where}: expected views = [angle, ...] (gantry angles in degrees, one per image), "
                        f"got {views!r}")
    params = _make_geometry_params()
    accepted = [p for p in params if p != "views"]
    unknown = [k for k in spec if k not in params or k == "views"]
    if unknown:
        raise DataError(f"{where}: unknown geometry key(s) {', '.join(map(repr, unknown))} "
                        f"(accepted: views, files, {', '.join(accepted)})")
    try:
        return make_geometry([float(a) for a in views], **spec)
    except X2CTError as exc:
        raise DataError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: the geometry was rejected: {exc}") from exc


def read_geometry_file(path: Path) -> dict[str, Any]:
    """Parse a geometry TOML/JSON file into a spec dict (``files``: image names within each case folder)."""
    if not path.is_file():
        raise DataError(f"{path}: geometry file not found")
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(path.read_text())
        else:
            spec = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} geometry "
                        f"file: {exc}") from exc
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a table of geometry keys (views, preset, ...)")
    if "files" in spec:
        files = spec["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise DataError(f"{path}: files: expected a list of image file names, got {files!r}")
    return spec


def recipe_geometry_spec(target: Target) -> dict[str, Any]:
    """The geometry the model was trained with, from the recipe's data options (and the dataset's defaults)."""
    opts = data_options_with_defaults(target.recipe, target.stage)
    params = _make_geometry_params()
    spec: dict[str, Any] = {"views": list(opts.get("views", []))}
    if not spec["views"]:
        raise DataError(f"{target.recipe.path}: data has no views, so --geometry recipe cannot tell the angles; "
                        f"pass --geometry PRESET --views ...")
    if "geometry" in opts and "preset" in params:
        spec["preset"] = opts["geometry"]
    for k, v in opts.items():
        if k in params and k not in ("views", "preset"):
            spec[k] = v
    return spec


# ---- what the model was trained with ----------------------------------------------------------
@dataclass
class Training:
    """Views, angles, image size and HU window of the model's training data."""

    views: int
    angles: list[float]
    image_shape: tuple[int, int] | None
    hu_window: tuple[float, float]
    resolution: int
    geometry: dict[str, torch.Tensor] | None = None
    source: str = ""
    xrays: torch.Tensor | None = None  # that case's X-rays [V, 1, H, W]: the reference of --match-histogram


def training_inputs(target: Target) -> Training:
    """Read one case of the training data (validation split) to learn the input format; fall back to
    the recipe's data options when the dataset cannot be built here (its files are elsewhere)."""
    from x2ct_framework.config.build import build_dataset

    hu = hu_window_of(target.recipe, target.stage)
    res = target.stage.resolution
    try:
        item = build_dataset(target.recipe, target.stage, "val")[0]
        geo = {k: torch.as_tensor(v) for k, v in item["geometry"].items()}
        angles = [float(a) for a in geo["angles"].reshape(-1)]
        return Training(int(item["xrays"].shape[0]), angles, tuple(int(s) for s in item["xrays"].shape[-2:]),
                        hu, res, geo, "a validation case of the training data", torch.as_tensor(item["xrays"]))
    except Exception as exc:  # the data may live on another machine; the recipe still tells views
        log.info("training data not readable here (%s); taking views from the recipe", exc)
    opts = data_options_with_defaults(target.recipe, target.stage)
    views = [float(a) for a in opts.get("views", [])]
    size = opts.get("image_size") or None
    shape = (int(size), int(size)) if isinstance(size, int) and size > 0 else None
    return Training(len(views), views, shape, hu, res, None, "the recipe's data options")


# ---- cases ------------------------------------------------------------------------------------
@dataclass
class Case:
    case_id: str
    files: list[Path]
    spec: dict[str, Any] | None
    spec_source: str = ""
    notes: list[str] = field(default_factory=list)
    like: Path | None = None


def _case_from_folder(folder: Path, shared: dict[str, Any] | None, shared_src: str) -> Case:
    spec, src = shared, shared_src
    for name in GEOMETRY_FILES:
        if (folder / name).is_file():
            spec, src = read_geometry_file(folder / name), str(folder / name)
            break
    if spec is not None and spec.get("files"):  # names relative to the case folder
        files = [folder / f for f in spec["files"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{src}: files lists image(s) not found in {folder}: {', '.join(missing)}")
    else:
        ct_name = (spec or {}).get("ct")
        files = sorted(p for p in folder.iterdir() if _is_image(p) and p.name != ct_name)
    if not files:
        raise DataError(f"{folder}: no X-ray images found (expected {', '.join(_image_suffixes())} files)")
    like = folder / spec["ct"] if spec is not None and isinstance(spec.get("ct"), str) else None
    if like is not None and not like.exists():
        raise DataError(f"{src}: ct = {spec['ct']!r} not found in {folder}")
    return Case(folder.name, files, spec, src, like=like)


def collect_cases(inputs: list[str | Path], shared: dict[str, Any] | None, shared_src: str) -> list[Case]:
    """Turn the command's inputs into cases (see the module docstring)."""
    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"input not found: {', '.join(map(str, missing))}")
    if all(p.is_file() for p in paths):
        parents = {p.resolve().parent for p in paths}
        stem = parents.pop().name if len(parents) == 1 else paths[0].name.split(".")[0]
        spec = shared
        if spec is None:
            for name in GEOMETRY_FILES:
                if (paths[0].parent / name).is_file():
                    spec, shared_src = read_geometry_file(paths[0].parent / name), str(paths[0].parent / name)
                    break
        return [Case(stem, paths, spec, shared_src)]
    if any(p.is_file() for p in paths):
        raise DataError("inputs: give either image files (one case) or folders, not both")
    cases = []
    for folder in paths:
        subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if subdirs and not any(_is_image(p) for p in folder.iterdir()):
            cases += [_case_from_folder(d, shared, shared_src) for d in subdirs]
        else:
            cases.append(_case_from_folder(folder, shared, shared_src))
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"inputs: several cases are named {', '.join(dup)}; rename the folders")
    return cases


# ---- preparing one case -----------------------------------------------------------------------
def fit_image(img: torch.Tensor, shape: tuple[int, int], mode: str, where: str, notes: list[str]) -> torch.Tensor:
    """Resize ``img`` [1, h, w] to ``shape``; a different aspect ratio is padded (centred, zeros) first."""
    h, w = img.shape[-2:]
    th, tw = shape
    if (h, w) == (th, tw):
        return img
    if mode == "off":
        raise DataError(f"{where}: image is {h}x{w} but the model was trained on {th}x{tw} images "
                        f"(resize it, or drop --resize off to let predict resize it)")
    if abs(h / w - th / tw) > 0.01 * (th / tw):
        # pad the short side so the aspect ratio matches the training detector
        if h / w > th / tw:
            new_w = round(h * tw / th)
            left = (new_w - w) // 2
            img = F.pad(img, (left, new_w - w - left, 0, 0))
        else:
            new_h = round(w * th / tw)
            top = (new_h - h) // 2
            img = F.pad(img, (0, 0, top, new_h - h - top))
        notes.append(f"{where}: padded {h}x{w} to {img.shape[-2]}x{img.shape[-1]} (centred, zeros) to match the "
                     f"training aspect ratio {th}:{tw}")
    ph, pw = img.shape[-2:]
    out = F.interpolate(img[None].float(), size=(th, tw), mode="bilinear", align_corners=False,
                        antialias=th < ph or tw < pw)[0]
    notes.append(f"{where}: resized {ph}x{pw} to {th}x{tw} (bilinear{', antialiased' if th < ph else ''}), "
                 f"the image size the model was trained on")
    return out.clamp(0, 1)


def check_geometry(case: Case, geo: dict[str, torch.Tensor], training: Training, allow_mismatch: bool) -> None:
    n = int(geo["angles"].numel())
    if n != len(case.files):
        raise DataError(f"case {case.case_id}: {len(case.files)} image(s) but the geometry ({case.spec_source}) has "
                        f"{n} view(s)")
    if training.views and n != training.views:
        raise DataError(f"case {case.case_id}: {n} view(s) given, but the model was trained with {training.views} "
                        f"(angles {', '.join(f'{a:g}' for a in training.angles)} degrees); give exactly those views")
    angles = [float(a) for a in geo["angles"]]
    if training.angles and any(abs(a - b) > 0.5 for a, b in zip(angles, training.angles)):
        msg = (f"case {case.case_id}: view angles {', '.join(f'{a:g}' for a in angles)} differ from the training "
               f"angles {', '.join(f'{a:g}' for a in training.angles)} degrees")
        if not allow_mismatch:
            raise DataError(msg + " (put the images in the training order, or pass --allow-geometry-mismatch)")
        case.notes.append(msg + "; used anyway (--allow-geometry-mismatch)")
        log.warning(case.notes[-1])
    if training.geometry is not None:
        for k, ref in training.geometry.items():
            if k in ("angles", "detector_px") or k not in geo:
                continue  # the image size is checked (and adapted) on the images themselves
            mine = torch.as_tensor(geo[k]).float()
            if mine.shape == ref.shape and torch.allclose(mine, ref.float(), rtol=1e-3, atol=1e-3):
                continue
            msg = (f"case {case.case_id}: geometry {k} {_short(mine)} differs from the training geometry's "
                   f"{_short(ref)}")
            if k in STRICT_GEOMETRY and not allow_mismatch:
                raise DataError(msg + " (use the geometry the model was trained with, e.g. --geometry recipe, or "
                                "pass --allow-geometry-mismatch to use it anyway)")
            case.notes.append(msg + ("; used anyway (--allow-geometry-mismatch)" if k in STRICT_GEOMETRY else ""))
            log.warning(case.notes[-1])


def _short(t: torch.Tensor) -> str:
    vals = sorted(set(round(float(x), 3) for x in torch.as_tensor(t).flatten()))
    return "/".join(f"{v:g}" for v in vals[:4]) + ("/..." if len(vals) > 4 else "")


def geometry_from_dicom(case: Case, training: Training, normalize: str) -> None:
    """The case's geometry from its radiographs' DICOM tags (``radiograph.geometry_from_tags``), when the user
    gave none: printed line by line (which tag, or which named assumption) and kept in the case's notes."""
    from x2ct_framework.io import read_radiograph
    from x2ct_framework.radiograph import geometry_from_tags

    infos = [read_radiograph(f, normalize)[1] for f in case.files]
    spec, lines = geometry_from_tags(infos)
    if training.geometry is not None and "volume_mm" in training.geometry:
        spec["volume_mm"] = [float(x) for x in torch.as_tensor(training.geometry["volume_mm"]).reshape(-1, 3)[0]]
        lines.append(f"volume_mm {spec['volume_mm']} from the training geometry (the model's field of view)")
    for info in infos:
        lines += info.notes
    case.spec, case.spec_source = spec, "the DICOM tags"
    for line in lines:
        print(f"{case.case_id}: geometry from the DICOM tags: {line}")
        case.notes.append(f"geometry from the DICOM tags: {line}")


def match_histogram(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``image`` with the grey-level distribution of ``reference``: each pixel takes the reference's quantile
    at its own rank (ties keep one value)."""
    flat = image.flatten()
    ref = reference.flatten().sort().values
    ranks = torch.empty_like(flat)
    order = flat.argsort()
    ranks[order] = torch.arange(flat.numel(), dtype=flat.dtype)
    _, inverse = torch.unique(flat, return_inverse=True)  # equal values share their mean rank
    n = int(inverse.max()) + 1
    mean_rank = (torch.zeros(n, dtype=flat.dtype).index_add_(0, inverse, ranks)
                 / torch.zeros(n, dtype=flat.dtype).index_add_(0, inverse, torch.ones_like(ranks)))
    q = mean_rank[inverse] / max(1, flat.numel() - 1)
    pos = q * (ref.numel() - 1)
    lo = pos.floor().long().clamp(0, ref.numel() - 1)
    hi = (lo + 1).clamp(max=ref.numel() - 1)
    t = pos - lo
    return (ref[lo] * (1 - t) + ref[hi] * t).view_as(image)


def prepare(case: Case, training: Training, resize: str, normalize: str,
            allow_mismatch: bool, match: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(xrays [V, 1, H, W] in [0, 1], geometry) of one case, checked against the training inputs."""
    from x2ct_framework.io import is_dicom, read_xray

    if case.spec is None and case.files and all(is_dicom(Path(f)) for f in case.files):
        geometry_from_dicom(case, training, normalize)
    if case.spec is None:
        raise DataError(f"case {case.case_id}: no geometry; pass --geometry recipe (the training geometry), "
                        f"--geometry PRESET --views A B ..., or --geometry FILE, or put geometry.toml "
                        f"in the case folder")
    geo = geometry_from_spec(case.spec, case.spec_source or f"case {case.case_id}")
    check_geometry(case, geo, training, allow_mismatch)
    images = []
    for f in case.files:
        img = read_xray(f, normalize=normalize)
        if training.image_shape is not None:
            img = fit_image(img, training.image_shape, resize, str(f), case.notes)
        if match:
            if training.xrays is None:
                raise DataError("--match-histogram needs the training data's DRRs, which cannot be read here "
                                f"({training.source})")
            img = match_histogram(img, training.xrays[len(images)])
            case.notes.append(f"{f}: grey levels matched to a training DRR of view {len(images)} (--match-histogram)")
        images.append(img)
    shapes = {tuple(i.shape[-2:]) for i in images}
    if len(shapes) > 1:
        raise DataError(f"case {case.case_id}: the views have different sizes {sorted(shapes)}; "
                        f"give images of one size")
    if "detector_px" in geo:  # the geometry describes the images as they reach the model
        h, w = images[0].shape[-2:]
        geo["detector_px"] = torch.tensor([[float(h), float(w)]] * len(images), dtype=geo["detector_px"].dtype)
    for n in case.notes:
        if "resized" in n or "padded" in n:
            log.info(n)
    return torch.stack(images), geo


# ---- writing NIfTI ----------------------------------------------------------------------------
def canonical_affine(spacing_xyz: tuple[float, float, float], shape_dhw: tuple[int, int, int]) -> np.ndarray:
    """Affine of a canonical ``[W, H, D]`` array (toward patient Left, Posterior, Inferior) in RAS+ mm,
    with the volume centre (the isocentre) at the origin."""
    sx, sy, sz = (float(s) for s in spacing_xyz)
    d, h, w = shape_dhw
    a = np.diag([-sx, -sy, -sz, 1.0])
    centre = np.array([(w - 1) / 2, (h - 1) / 2, (d - 1) / 2])
    a[:3, 3] = -a[:3, :3] @ centre
    return a


def save_nifti(path: str | Path, volume_hu: torch.Tensor, spacing_xyz, dtype: str = "float32",
               affine: np.ndarray | None = None) -> Path:
    """Write a canonical ``[D, H, W]`` HU volume as NIfTI with its affine (default: the isocentre at the
    origin, see :func:`canonical_affine`) and spacing."""
    import nibabel as nib

    vol = volume_hu.detach().float().cpu().reshape(volume_hu.shape[-3:])
    data = vol.permute(2, 1, 0).numpy()  # [W, H, D] = (x, y, z)
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    else:
        data = data.astype(np.float32)
    if affine is None:
        affine = canonical_affine(tuple(spacing_xyz), tuple(vol.shape))
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"x2ct-framework prediction, HU"
    from x2ct_framework.safepaths import guard

    path = guard(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # under a temporary name with the same extension (nibabel picks the format from it), then renamed:
    # a killed prediction never leaves a truncated volume under the final name
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[: len(path.name) - len(ext)]}.{os.getpid()}.tmp{ext}")
    try:
        nib.save(img, str(tmp))
        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"could not write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def output_spacing(geo: dict[str, torch.Tensor], resolution: int, spacing: list[float] | None,
                   fallback_mm: float | None) -> tuple[float, float, float]:
    """Voxel size (x, y, z) in mm: ``--spacing``, else the geometry's volume size / resolution."""
    if spacing:
        if len(spacing) == 1:
            spacing = spacing * 3
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise DataError(f"--spacing: expected one or three positive numbers (mm), got {spacing}")
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]
    if "volume_mm" in geo:
        v = torch.as_tensor(geo["volume_mm"]).float().reshape(-1, 3)[0]
        return tuple(float(x) / resolution for x in v)  # type: ignore[return-value]
    if fallback_mm:
        return (fallback_mm / resolution,) * 3
    raise DataError("the geometry does not give the volume's physical size; pass --spacing MM")


def like_frame(ct: Path, target: Target, resolution: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine of the grid the framework cuts from the CT ``ct`` (resampled to ``spacing``, cropped
    as the recipe's data options say), so a prediction written with it overlays that CT."""
    from x2ct_framework.io import load_grid_ct

    if max(spacing) - min(spacing) > 1e-6:
        raise DataError(f"--like {ct}: the output voxels are not isotropic ({spacing}); the framework's grid is")
    opts = data_options_with_defaults(target.recipe, target.stage)
    grid = load_grid_ct(ct, None, resolution, spacing[0] * resolution, float(opts.get("pad_hu", -1024.0)),
                        str(opts.get("crop", "centre")), float(opts.get("hu_offset", 0.0)), check_hu=False,
                        series=str(opts.get("series", "")))
    return grid.affine


# ---- running ----------------------------------------------------------------------------------
@dataclass
class Prediction:
    case_id: str
    path: Path
    spacing: tuple[float, float, float]
    notes: list[str]


def predict(target: Target, inputs: list[str | Path], out: str | Path, *, geometry: str | None = None,
            views: list[float] | None = None, device: str = "auto", batch_size: int = 1, resize: str = "auto",
            normalize: str = "auto", allow_geometry_mismatch: bool = False, spacing: list[float] | None = None,
            dtype: str = "float32", progress: bool = True, like: str | Path | None = None,
            match_histogram: bool = False, samples: int = 0, keep_samples: bool = False) -> list[Prediction]:
    """Reconstruct every case of ``inputs`` and write ``<out>/<case>.nii.gz`` (or ``out`` itself for one
    case when it ends in .nii/.nii.gz); ``like`` places every output in that CT's frame.

    ``samples = K > 0`` (a generative model): the volume written is the mean of K samples, beside it
    ``<case>_std.nii.gz`` holds their per-voxel standard deviation (HU, same frame), and with
    ``keep_samples`` ``<case>_sample<k>.nii.gz`` each sample; sample k of a case is seeded by the case."""
    if samples < 0:
        raise DataError(f"--samples {samples}: expected a number of samples >= 1 (or 0 for the model's forward)")
    if keep_samples and not samples:
        raise DataError("--keep-samples needs --samples K")
    if like is not None and not Path(like).exists():
        raise DataError(f"--like {like}: reference CT not found (a NIfTI/NRRD/MHA file or a DICOM folder)")
    if like is not None and spacing:
        raise DataError("--like and --spacing: the reference CT's grid sets the frame; give one of them")
    shared, shared_src = None, ""
    if geometry is not None:
        gpath = Path(geometry)
        if geometry == "recipe":
            shared, shared_src = recipe_geometry_spec(target), f"the recipe {target.recipe.path}"
            if views:
                shared["views"] = list(views)
        elif gpath.suffix.lower() in (".toml", ".json") or gpath.is_file():
            shared, shared_src = read_geometry_file(gpath), str(gpath)
            if views:
                shared["views"] = list(views)
        else:
            if not views:
                raise DataError(f"--geometry {geometry}: a preset needs the view angles too (--views A B ...)")
            shared, shared_src = {"views": list(views), "preset": geometry}, f"--geometry {geometry}"
    elif views:
        raise DataError("--views needs --geometry (a preset, a file, or 'recipe')")
    cases = collect_cases(list(inputs), shared, shared_src)
    training = training_inputs(target)
    dev = pick_device(device)
    out = Path(out)
    single_file = len(cases) == 1 and (out.name.endswith(".nii.gz") or out.suffix == ".nii")
    if not single_file and out.suffix in (".nii", ".gz"):
        raise DataError(f"--out {out}: {len(cases)} cases need an output folder, not a file name")
    # read and check every case before running the model, so bad input fails fast
    prepared = [(case, *prepare(case, training, resize, normalize, allow_geometry_mismatch, match_histogram))
                for case in cases]
    model = load_model(target, dev)
    if samples and not is_generative(model):
        raise DataError(f"--samples {samples}: the model of {target.checkpoint} ({type(stage_model(model)).__name__}) "
                        f"is not generative (it has no training_loss and sample); leave --samples out")
    lo, hi = training.hu_window
    results = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prepared), desc="predict", disable=not progress or len(prepared) < 2, dynamic_ncols=True)
    for start in range(0, len(prepared), max(1, batch_size)):
        group = prepared[start:start + max(1, batch_size)]
        try:
            xrays = torch.stack([x for _, x, _ in group]).to(dev)
            geo = {k: torch.stack([torch.as_tensor(g[k]) for _, _, g in group]).to(dev) for k in group[0][2]}
        except RuntimeError:  # cases of different shapes: run them one by one
            xrays, geo = None, None
        if xrays is not None:
            vols, stds, drawn = _reconstruct(model, xrays, geo, samples, keep_samples)
        else:
            parts = [_reconstruct(model, x[None].to(dev), {k: torch.as_tensor(v)[None].to(dev) for k, v in g.items()},
                                  samples, keep_samples) for _, x, g in group]
            vols = torch.cat([v for v, _, _ in parts])
            stds = torch.cat([s for _, s, _ in parts]) if samples else None
            drawn = [torch.cat([d[k] for _, _, d in parts]) for k in range(len(parts[0][2]))]
        for i, ((case, _, g), vol) in enumerate(zip(group, vols)):
            sp = output_spacing(g, vol.shape[-1], spacing, None)
            path = out if single_file else out / f"{case.case_id}.nii.gz"
            ref = Path(like) if like is not None else case.like
            affine = like_frame(ref, target, vol.shape[-1], sp) if ref is not None else None
            path = save_nifti(path, vol * (hi - lo) + lo, sp, dtype, affine=affine)
            extra = {}
            if samples:
                stem = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", ""))
                std_path = save_nifti(f"{stem}_std.nii.gz", stds[i] * (hi - lo), sp, "float32", affine=affine)
                extra = {"samples": samples, "mean_of_samples": True, "std": str(std_path)}
                if keep_samples:
                    extra["sample_files"] = [str(save_nifti(f"{stem}_sample{k}.nii.gz", d[i] * (hi - lo) + lo, sp,
                                                            dtype, affine=affine)) for k, d in enumerate(drawn)]
            frame = grid_frame(affine if affine is not None else canonical_affine(sp, tuple(vol.shape[-3:])))
            frame["like"] = str(ref) if ref is not None else None
            frame["placed"] = ("in the reference CT's frame (the framework's crop of it)" if ref is not None
                               else "isocentre at the world origin (no reference CT; pass --like CT)")
            meta = {"case_id": case.case_id, "inputs": [str(f) for f in case.files], "geometry_from": case.spec_source,
                    "geometry": {k: torch.as_tensor(v).tolist() for k, v in g.items()},
                    "checkpoint": str(target.checkpoint), "recipe": str(target.recipe.path), "stage": target.stage.name,
                    "hu_window": [lo, hi], "spacing_mm_xyz": list(sp), "orientation": "LPI (array axes x, y, z)",
                    "frame": frame, "notes": case.notes, **extra}
            side = path.with_name(path.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
            try:
                write_text(side, json.dumps(meta, indent=2))
            except OSError as exc:
                raise DataError(f"could not write {side}: {exc}") from exc
            results.append(Prediction(case.case_id, path, sp, case.notes))
            bar.update(1)
    bar.close()
    return results


def _reconstruct(model: torch.nn.Module, xrays: torch.Tensor, geo: dict, samples: int, keep: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """``(volume, std, samples)`` on the CPU in [0, 1]: the model's forward (std None), or with ``samples``
    the mean and per-voxel standard deviation of that many samples (each clamped to [0, 1]), and the samples
    themselves when ``keep``."""
    with torch.no_grad():
        if not samples:
            return model(xrays, geo).float().clamp(0, 1).cpu(), None, []
        stats, kept = SampleStats(), []
        seed = getattr(stage_model(model), "sample_seed", 0)
        for s in draw_samples(model, xrays, geo, samples, seed=seed):
            s = s.float().clamp(0, 1)
            stats.add(s)
            if keep:
                kept.append(s.cpu())
        return stats.mean.float().cpu(), stats.std().float().cpu(), kept


def main(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from x2ct_framework.plugins import apply_trust_arguments

    apply_trust_arguments(args)
    target = resolve_target(args.checkpoint, args.recipe, args.overrides, args.stage, args.which)
    results = predict(target, args.inputs, args.out, geometry=args.geometry, views=args.views, device=args.device,
                      batch_size=args.batch_size, resize=args.resize, normalize=args.normalize,
                      allow_geometry_mismatch=args.allow_geometry_mismatch, spacing=args.spacing, dtype=args.dtype,
                      progress=args.progress, like=getattr(args, "like", None),
                      match_histogram=getattr(args, "match_histogram", False),
                      samples=getattr(args, "samples", 0), keep_samples=getattr(args, "keep_samples", False))
    for r in results:
        print(f"{r.case_id}: {r.path} (spacing {', '.join(f'{s:.3g}' for s in r.spacing)} mm)")
    return 0


__all__ = ["predict", "save_nifti", "canonical_affine", "collect_cases", "geometry_from_spec", "Training",
           "training_inputs", "fit_image", "match_histogram"]

"""View geometry as a dict of tensors that torch's default collate batches.

Keys, each ``[V, ...]`` per case and ``[B, V, ...]`` in a batch:
- ``angles`` ``[V]``: gantry angle in degrees (0 = PA, 90 = left lateral; see ``physics/__init__.py``);
- ``cone`` ``[V]``: 1.0 for a cone (point-source) beam, 0.0 for a parallel beam;
- ``sid``, ``sdd`` ``[V]``: source-isocentre and source-detector distances in mm (0 for parallel);
- ``detector_mm`` ``[V, 2]``: physical detector size (width along u, height along z) at the detector;
- ``detector_px`` ``[V, 2]``: the detector's nominal pixel count (rows, columns), used when no
  ``det_shape`` is asked for;
- ``detector_offset_mm`` ``[V, 2]``: shift of the detector centre along (u, z) in mm;
- ``volume_mm`` ``[V, 3]``: physical size of the volume along (x, y, z), centred on the isocentre.

A stored X-ray may be oriented differently from the detector frame (rows along +z from the head,
columns along ``u``): ``ORIENTATIONS`` names the 8 flips/rotations of a square image, and
:func:`to_stored` / :func:`from_stored` turn a detector-frame image into the stored one and back.
Datasets undo the stored orientation when they read an image, so every batch carries detector-frame
images; the orientation of each stored view is a dataset option and, for published data, part of
the preset (``stored_views``: per stored image its key, gantry angle and orientation).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import RecipeError, did_you_mean

GEOMETRY_PRESETS: dict[str, dict] = {
    "parallel": {
        "beam": "parallel",
        "doc": "parallel beam; the detector covers the volume (no magnification)",
    },
    "x2ctgan": {
        "beam": "cone", "sid": 541.0, "sdd": 949.0, "detector_mm": 500.0, "detector_px": 320,
        # their stored images against this framework's DRRs of their CT (head at slice 0): xray1
        # (Plastimatch normal 0 1 0, then mirrored left-right by their savepng) is the PA view as it
        # lies, head at row 0; xray2 (normal 1 0 0) is the view from 270 degrees mirrored left-right
        "stored_views": ({"key": "xray1", "angle": 0.0, "orientation": "identity"},
                         {"key": "xray2", "angle": 270.0, "orientation": "fliplr"}),
        "doc": "X2CT-GAN (kylekma/X2CT, CT2XRAY/xraypro.py): Plastimatch cone beam, source-axis 541 mm, "
               "source-detector 949 mm, 320^2 detector over 500 mm; stored xray1 = view 0 as it lies, "
               "xray2 = view 270 mirrored left-right",
    },
    "perx2ct": {
        "beam": "cone", "sid": 700.0, "sdd": 949.0, "detector_mm": 500.0, "detector_px": 320,
        # their script is X2CT-GAN's with another source distance (the same normals, the same left-right mirror of
        # xray1 when saved), so their stored images lie as X2CT-GAN's
        "stored_views": ({"key": "xray1", "angle": 0.0, "orientation": "identity"},
                         {"key": "xray2", "angle": 270.0, "orientation": "fliplr"}),
        "doc": "PerX2CT's DRRs (dek924/PerX2CT, data_preprocessing/2_xraypro.py): Plastimatch cone beam, "
               "source-axis 700 mm, source-detector 949 mm, 320^2 detector over 500 mm",
    },
    "perx2ct_camera": {
        # PerX2CT's network projects points with a pinhole one volume side from the isocentre (their
        # sample_camera_positions with r = 1 in a volume spanning [-1/2, 1/2]) and a 60 degree field of view
        # (configs/PerX2CT.yaml fov 60): for their 320 mm CT, sid 320 mm; any sdd with a detector of 2 sdd tan 30
        "beam": "cone", "sid": 320.0, "sdd": 640.0, "detector_mm": 2 * 640.0 * math.tan(math.radians(30.0)),
        "detector_px": 128,
        "doc": "PerX2CT's network camera (x2ct_nerf/modules/inr/model.py): a pinhole 320 mm (one side of their 320 mm "
               "CT) from the isocentre, 60 degree field of view; 128^2",
    },
    "difnet": {
        "beam": "cone", "sid": 1000.0, "sdd": 2000.0, "detector_mm": 512.0, "detector_px": 256,
        "doc": "DIF-Net (xmed-lab/DIF-Net, knee_cbct/config.yaml): TIGRE cone beam, source-origin 1000 mm, "
               "source-detector 2000 mm, 256^2 detector of 2 mm pixels",
    },
    "c2rv": {
        "beam": "cone", "sid": 800.0, "sdd": 1200.0, "detector_mm": 614.4, "detector_px": 256,
        "doc": "C2RV (xmed-lab/C2RV-CBCT, LUNA16/config.yaml): TIGRE cone beam, source-origin 800 mm, "
               "source-detector 1200 mm, 256^2 detector of 2.4 mm pixels",
    },
}

CUSTOM_KEYS = ("beam", "sid", "sdd", "detector_mm", "detector_px", "detector_offset_mm", "preset")

# The 8 orientations of a square image (the dihedral group), as the stored image relative to the
# detector-frame one: (transpose first?, then reverse rows?, then reverse columns?).
ORIENTATIONS: dict[str, tuple[bool, bool, bool]] = {
    "identity": (False, False, False),
    "fliplr": (False, False, True),     # columns reversed (mirrored left-right)
    "flipud": (False, True, False),     # rows reversed (upside down)
    "rot180": (False, True, True),
    "transpose": (True, False, False),  # rows and columns swapped
    "rot90": (True, True, False),       # turned 90 degrees counter-clockwise
    "rot270": (True, False, True),      # turned 90 degrees clockwise
    "antitranspose": (True, True, True),
}


def check_orientation(code: str, where: str = "orientation") -> str:
    if code not in ORIENTATIONS:
        raise RecipeError([f"{where}: unknown image orientation {code!r}{did_you_mean(str(code), ORIENTATIONS)} "
                           f"(one of {', '.join(ORIENTATIONS)})"])
    return code


def to_stored(image: torch.Tensor, code: str) -> torch.Tensor:
    """The stored image (``[..., H, W]``) for a detector-frame ``image`` under orientation ``code``."""
    transpose, rows, cols = ORIENTATIONS[check_orientation(code)]
    out = image.transpose(-1, -2) if transpose else image
    dims = [d for d, f in ((-2, rows), (-1, cols)) if f]
    return out.flip(dims) if dims else out


def from_stored(image: torch.Tensor, code: str) -> torch.Tensor:
    """The detector-frame image for a stored ``image`` of orientation ``code`` (the inverse of :func:`to_stored`)."""
    transpose, rows, cols = ORIENTATIONS[check_orientation(code)]
    dims = [d for d, f in ((-2, rows), (-1, cols)) if f]
    out = image.flip(dims) if dims else image
    return out.transpose(-1, -2) if transpose else out


def compose_orientation(first: str, then: str) -> str:
    """The orientation of ``to_stored(to_stored(x, first), then)``."""
    probe = torch.arange(9.0).reshape(3, 3)
    target = to_stored(to_stored(probe, first), then)
    return next(c for c in ORIENTATIONS if torch.equal(to_stored(probe, c), target))


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise RecipeError([f"geometry -> {name}: expected a number or two numbers, got {value!r}"])


def _triple(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, Sequence) and len(value) == 3:
        return float(value[0]), float(value[1]), float(value[2])
    raise RecipeError([f"{name}: expected a number or three numbers (x, y, z) in mm, got {value!r}"])


def resolve_preset(preset: str | Mapping) -> dict:
    """A preset name, or a table ``{preset = "x2ctgan", sid = 600, ...}`` / ``{beam = "cone", ...}``, as one dict."""
    if isinstance(preset, str):
        if preset not in GEOMETRY_PRESETS:
            raise RecipeError([f"unknown geometry preset {preset!r}{did_you_mean(preset, GEOMETRY_PRESETS)} "
                               f"(available: {', '.join(GEOMETRY_PRESETS)}; or a table with beam, sid, sdd, "
                               f"detector_mm, detector_px)"])
        return dict(GEOMETRY_PRESETS[preset])
    if not isinstance(preset, Mapping):
        raise RecipeError([f"geometry: expected a preset name or a table, got {preset!r}"])
    unknown = [k for k in preset if k not in CUSTOM_KEYS + ("stored_views",)]
    if unknown:
        raise RecipeError([f"geometry -> {k}: unknown geometry key{did_you_mean(k, CUSTOM_KEYS)} "
                           f"(accepted: {', '.join(CUSTOM_KEYS)})" for k in unknown])
    spec = resolve_preset(preset["preset"]) if "preset" in preset else {"beam": "cone"}
    spec.update({k: v for k, v in preset.items() if k != "preset"})
    if spec.get("beam") not in ("parallel", "cone"):
        raise RecipeError([f"geometry -> beam: expected \"parallel\" or \"cone\", got {spec.get('beam')!r}"])
    if spec["beam"] == "cone":
        missing = [k for k in ("sid", "sdd", "detector_mm") if k not in spec]
        if missing:
            raise RecipeError([f"geometry -> {k}: a cone-beam geometry needs {k}" for k in missing])
        if not 0 < float(spec["sid"]) < float(spec["sdd"]):
            raise RecipeError([f"geometry: expected 0 < sid < sdd, got sid={spec['sid']}, sdd={spec['sdd']}"])
    return spec


def make_geometry(views: Sequence[float], preset: str | Mapping | None = None,
                  volume_mm: float | Sequence[float] = 320.0,
                  detector_mm: float | Sequence[float] | None = None, *, detector_px: int | Sequence[int] | None = None,
                  sid: float | None = None, sdd: float | None = None,
                  detector_offset_mm: float | Sequence[float] | None = None, beam: str | None = None,
                  stored_views: Sequence[Mapping] | None = None) -> dict[str, torch.Tensor]:
    """Geometry dict for one case: one entry per gantry angle in ``views`` (degrees).

    ``preset`` is a preset name (default ``"parallel"``) or a table; a recipe's table may also be spread as
    keyword arguments, in every form docs/data.md documents: ``make_geometry(views, **{"preset": "x2ctgan",
    "sid": 600})`` or ``make_geometry(views, **{"beam": "cone", "sid": 800, "sdd": 1200, "detector_mm": 400})``.
    Keyword arguments override the preset's values. A parallel beam's detector defaults to the
    volume's extent (largest in-plane size by the z size) and its pixel count to 256. ``stored_views`` (how a
    dataset's stored images map to angles) does not change the geometry and is accepted for the table form.
    """
    if len(views) < 1:
        raise RecipeError(["views: expected at least one gantry angle"])
    overrides = {key: value for key, value in (("sid", sid), ("sdd", sdd), ("detector_mm", detector_mm),
                                               ("detector_px", detector_px),
                                               ("detector_offset_mm", detector_offset_mm)) if value is not None}
    if beam is not None:  # the table form {beam = "cone", ...}, on top of a named preset if one is given
        if isinstance(preset, Mapping):
            raise RecipeError([f"geometry: beam = {beam!r} given beside a table {dict(preset)!r}; put it in the table"])
        table = {"beam": beam, **overrides, **({"preset": preset} if preset is not None else {})}
        spec = resolve_preset(table)
    else:
        spec = resolve_preset("parallel" if preset is None else preset)
    spec.update(overrides)
    vol = _triple(volume_mm, "volume_mm")
    if any(x <= 0 for x in vol):
        raise RecipeError([f"volume_mm: expected positive sizes, got {vol}"])
    cone = spec["beam"] == "cone"
    if cone:
        s_id, s_dd = float(spec["sid"]), float(spec["sdd"])
        if not 0 < s_id < s_dd:
            raise RecipeError([f"geometry: expected 0 < sid < sdd, got sid={s_id}, sdd={s_dd}"])
        det = _pair(spec["detector_mm"], "detector_mm")
    else:
        s_id = s_dd = 0.0
        det = _pair(spec["detector_mm"], "detector_mm") if "detector_mm" in spec else (max(vol[0], vol[1]), vol[2])
    px = spec.get("detector_px", 256)
    rows, cols = (px, px) if isinstance(px, (int, float)) else (px[0], px[1])
    off = _pair(spec.get("detector_offset_mm", 0.0), "detector_offset_mm")
    v = len(views)
    return {
        "angles": torch.tensor([float(a) for a in views], dtype=torch.float32),
        "cone": torch.full((v,), 1.0 if cone else 0.0),
        "sid": torch.full((v,), s_id),
        "sdd": torch.full((v,), s_dd),
        "detector_mm": torch.tensor([det] * v, dtype=torch.float32),
        "detector_px": torch.tensor([(float(rows), float(cols))] * v, dtype=torch.float32),
        "detector_offset_mm": torch.tensor([off] * v, dtype=torch.float32),
        "volume_mm": torch.tensor([vol] * v, dtype=torch.float32),
    }


def num_views(geometry: Mapping[str, torch.Tensor]) -> int:
    return int(geometry["angles"].shape[-1])


def batched(geometry: Mapping[str, torch.Tensor], batch: int | None = None, device=None,
            dtype=torch.float32) -> dict[str, torch.Tensor]:
    """``[B, V, ...]`` tensors with every key present (older dicts lack some; they are parallel beam)."""
    g = {k: torch.as_tensor(v) for k, v in geometry.items()}
    if "angles" not in g:
        raise RecipeError([f"geometry: expected a dict with an 'angles' tensor, got keys {sorted(g)}"])
    if g["angles"].dim() == 1:
        g = {k: t[None] for k, t in g.items()}
    b, v = g["angles"].shape
    vol = g.get("volume_mm", torch.full((b, v, 3), 320.0))
    defaults = {
        "cone": torch.zeros(b, v), "sid": torch.zeros(b, v), "sdd": torch.zeros(b, v),
        "detector_mm": torch.stack([vol[..., :2].amax(-1), vol[..., 2]], -1),
        "detector_px": torch.full((b, v, 2), 256.0), "detector_offset_mm": torch.zeros(b, v, 2), "volume_mm": vol,
    }
    for k, t in defaults.items():
        g.setdefault(k, t)
    if batch is not None and b == 1 and batch > 1:
        g = {k: t.expand(batch, *t.shape[1:]) for k, t in g.items()}
    elif batch is not None and b != batch:
        raise ValueError(f"geometry is batched for {b} cases but the data holds {batch}")
    return {k: t.to(device=device, dtype=dtype) for k, t in g.items()}


def view_frames(g: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per view (``[B, V, 3]``): central ray ``ray``, detector axes ``u``/``v``, ``source`` and ``center``.

    At gantry angle theta the rays run along ``(sin, -cos, 0)``, detector columns along
    ``(cos, sin, 0)`` and rows along +z.
    """
    th = g["angles"] * (math.pi / 180.0)
    c, s = torch.cos(th), torch.sin(th)
    zero = torch.zeros_like(c)
    ray = torch.stack([s, -c, zero], -1)
    u = torch.stack([c, s, zero], -1)
    v = torch.stack([zero, zero, torch.ones_like(c)], -1)
    cone = g["cone"][..., None]
    source = -g["sid"][..., None] * ray
    center = cone * (g["sdd"] - g["sid"])[..., None] * ray
    off = g["detector_offset_mm"]
    center = center + off[..., :1] * u + off[..., 1:] * v
    return {"ray": ray, "u": u, "v": v, "source": source, "center": center}


def magnification(g: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Detector size of an object at the isocentre over its true size: SDD/SID (cone) or 1 (parallel)."""
    cone = g["cone"] > 0.5
    return torch.where(cone, g["sdd"] / g["sid"].clamp_min(1e-6), torch.ones_like(g["sdd"]))


def geometry_fingerprint(geometry: Mapping[str, torch.Tensor], *extra) -> str:
    """A short stable hash of a geometry (and any extra values), for cache keys."""
    h = hashlib.sha1()
    for key in sorted(geometry):
        t = torch.as_tensor(geometry[key]).detach().cpu().double()
        h.update(key.encode())
        h.update(repr([round(x, 4) for x in t.flatten().tolist()]).encode())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()[:16]

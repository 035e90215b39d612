"""Physics: view geometry and a differentiable, batched DRR projector with its back-projection.

Conventions (shared by datasets, models and losses):
- a volume is ``[B, C, D, H, W]`` in the canonical patient orientation of ``x2ct_framework.io``:
  D runs superior -> inferior, H anterior -> posterior, W patient right -> patient left;
- world axes follow the index axes: x along W, y along H, z along D, in millimetres, with the
  isocentre at the volume centre; ``spacing`` and ``volume_mm`` are given in (x, y, z) order;
- a view's gantry angle ``theta`` (degrees) turns the source about the z axis. The central ray runs
  along ``(sin theta, -cos theta, 0)``: at 0 degrees from posterior to anterior (PA), at 90 degrees
  from the patient's right to left (a left lateral), at 180 degrees AP;
- a detector image is ``[h, w]``: rows follow +z (row 0 at the head end), columns follow
  ``u = (cos theta, sin theta, 0)``: the PA view shows the patient's right on the image's left and
  the lateral view anterior on the left, as radiographs are read; opposite views mirror;
- cone beam: the source sits ``sid`` mm from the isocentre and the detector ``sdd`` mm from the
  source, so an object at the isocentre appears ``sdd / sid`` times larger; the detector size is
  given at the detector. Parallel beam: no magnification;
- intensities: CT in [0, 1] after the HU window -> HU -> attenuation per mm (water 0.02 / mm by
  default, air clamps to 0) -> line integral -> [0, 1], attenuating structures bright;
- ``spectral.py`` is the spectral simulator (materials, tube spectrum, scatter, grid, blur, noise, display
  processing) on top of ``project``; ``materials.py`` maps HU to material densities. Presets:
  ``XRAY_PRESETS`` (``ideal`` is exactly ``drr``);
- the batch's ``geometry`` is a dict of tensors batched ``[B, V, ...]`` (see ``geometry.py``);
  users other than the projector treat it as opaque except ``angles``.
"""

from .drr import MU_WATER, backproject, drr, hu_to_mu, project, project_points
from .spectral import XRAY_PRESETS, render_lines, resolve_xray, simulate
from .geometry import (GEOMETRY_PRESETS, ORIENTATIONS, batched, compose_orientation, from_stored, geometry_fingerprint,
                       magnification, make_geometry, num_views, resolve_preset, to_stored, view_frames)

__all__ = ["GEOMETRY_PRESETS", "ORIENTATIONS", "to_stored", "from_stored", "compose_orientation", "MU_WATER",
           "make_geometry", "num_views", "resolve_preset", "batched", "view_frames", "magnification",
           "geometry_fingerprint", "project", "project_points", "backproject", "drr", "hu_to_mu",
           "XRAY_PRESETS", "resolve_xray", "simulate", "render_lines"]

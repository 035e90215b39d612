"""Physics: view geometry and a differentiable, batched DRR projector with its back-projection.

Conventions (shared by datasets, models and losses):
- a volume is ``[B, C, D, H, W]``; world axes follow the index axes: x along W, y along H, z along D,
  in millimetres, with the isocentre at the volume centre;
- a view's gantry angle ``theta`` (degrees) rotates the source about the z axis; at 0 degrees the
  rays run along +y (PA), at 90 degrees along +x (lateral);
- a detector image is ``[h, w]``: rows follow z (row 0 at slice 0), columns follow the in-plane
  detector axis ``u = (cos theta, -sin theta, 0)``;
- the batch's ``geometry`` is a dict of tensors batched ``[B, V, ...]`` (see ``geometry.py``).
"""

from .geometry import GEOMETRY_PRESETS, make_geometry, num_views
from .drr import backproject, drr, hu_to_mu, project

__all__ = ["GEOMETRY_PRESETS", "make_geometry", "num_views", "project", "backproject", "drr", "hu_to_mu"]

"""The simulator's figure: one phantom CT through the monoenergetic projector and each X-ray preset.

``python -m x2ct_framework.physics.figures docs/images/xray_presets.png``. Apart from the simulator
(``spectral``) because it draws a phantom, and the phantom's own figure uses the projector.
"""

from __future__ import annotations

import torch

from x2ct_framework.conventions import hu_to_unit
from x2ct_framework.physics.geometry import make_geometry
from x2ct_framework.physics.spectral import XRAY_PRESETS, mono_lines, simulate

def figure(path: str, resolution: int = 128, seed: int = 0) -> None:
    """The same phantom CT (PA and lateral, X2CT-GAN geometry) through the monoenergetic projector and each
    preset, one column each, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from x2ct_framework.phantom import chest_phantom

    hu, labels = chest_phantom(resolution, seed)
    ct = hu_to_unit(hu)[None, None]
    geo = make_geometry([0.0, 90.0], "x2ctgan")
    det = (resolution, resolution)
    line = mono_lines(ct, geo, det_shape=det)
    columns = {"project (line integral)": line / line.amax((-1, -2), keepdim=True)}
    for name in XRAY_PRESETS:
        columns[name] = simulate(ct, geo, name, det_shape=det, labels=labels[None, None],
                                 generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(2, len(columns), figsize=(2.2 * len(columns), 4.6))
    for j, (name, img) in enumerate(columns.items()):
        for i, view in enumerate(("PA", "lateral")):
            ax = axes[i, j]
            ax.imshow(img[0, i, 0].detach().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(view)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    figure(sys.argv[1] if len(sys.argv) > 1 else "xray_presets.png")

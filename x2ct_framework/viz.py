"""Pictures: orthogonal slices of volumes beside the input views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from x2ct_framework.conventions import PLANES


class _LazyPyplot:
    """``matplotlib.pyplot`` on the Agg backend, imported at its first use: commands that draw nothing
    (``x2ct plugins``, ``x2ct validate``) do not pay for it. ``from x2ct_framework.viz import plt``."""

    def __getattr__(self, name: str):
        module = self.__dict__.get("module")
        if module is None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as module

            self.__dict__["module"] = module
        return getattr(module, name)


plt = _LazyPyplot()


def save_figure(fig, path: str | Path, dpi: int = 90, title: str = "", title_size: int = 9) -> Path:
    """Give ``fig`` its title, lay it out, write it to ``path`` (folders made) and close it."""
    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    from x2ct_framework.safepaths import guard

    path = guard(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(guard(path), dpi=dpi)
    finally:
        plt.close(fig)
    return path


def orthogonal_slices(volume: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Central axial, coronal and sagittal slices of a [D, H, W] volume (z up in the coronal/sagittal)."""
    v = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    v = v.reshape(v.shape[-3:])
    d, h, w = v.shape
    return [v[d // 2], v[:, h // 2, :], v[:, :, w // 2]]


def save_preview(path: str | Path, pred: torch.Tensor, target: torch.Tensor | None = None,
                 xrays: torch.Tensor | None = None, title: str = "") -> Path:
    """Rows: prediction, target, |error|; columns: axial, coronal, sagittal; input views on top."""
    rows: list[tuple[str, list[np.ndarray], dict]] = [("prediction", orthogonal_slices(pred), {"vmin": 0, "vmax": 1})]
    if target is not None:
        rows.append(("target", orthogonal_slices(target), {"vmin": 0, "vmax": 1}))
        err = (pred.detach().float().cpu() - target.detach().float().cpu()).abs()
        rows.append(("|error|", orthogonal_slices(err), {"vmin": 0, "vmax": 0.25, "cmap": "magma"}))
    views = [] if xrays is None else [x.detach().float().cpu().numpy().reshape(x.shape[-2:]) for x in xrays]
    ncols = max(3, len(views))
    nrows = len(rows) + (1 if views else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), squeeze=False)
    r0 = 0
    if views:
        for j in range(ncols):
            ax = axes[0, j]
            ax.axis("off")
            if j < len(views):
                ax.imshow(views[j], cmap="gray")
                ax.set_title(f"view {j + 1}", fontsize=8)
        r0 = 1
    for i, (label, slices, kw) in enumerate(rows):
        for j in range(ncols):
            ax = axes[r0 + i, j]
            ax.axis("off")
            if j < 3:
                ax.imshow(slices[j], cmap=kw.get("cmap", "gray"), vmin=kw["vmin"], vmax=kw["vmax"])
                ax.set_title(f"{label} {PLANES[j]}", fontsize=8)
    return save_figure(fig, path, dpi=80, title=title)

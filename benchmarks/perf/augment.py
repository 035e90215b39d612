"""What each ``ct_folder`` augmentation costs per item, against the un-augmented item from the cache.

One phantom case at R^3 (a NIfTI written here, prepared into a fresh cache), then items of the same
case with each augmentation alone, medians of ``--repeat`` accesses after one warm-up. One process,
one torch thread: per-worker figures. ``ratio`` = augmented item / cached item, the median over
interleaved (cached, augmented) pairs of accesses, so that a busy machine slows both alike. The image-space
augmentations (``noise``, ``intensity``) work on the cached X-rays; ``style`` (X-ray style
randomisation: kVp, dose, scatter, grid, blur, noise, processing drawn per item) makes the X-rays from
the cached material line integrals (its own cache entry, prepared like the DRRs: no re-render), timed three
ways: made per item (a dataset read directly), the item as training loads it (lines and the draw: the trainer
makes the images on the batch's device, ``CTFolderDataset.finish_batch``), and that batch rendering itself
per item on this CPU (on a GPU it runs on the accelerator, between the loader and the model);
``view_jitter`` renders the views again from the cached volume; the torchio volume transforms
(``ct_noise``, ``blur``, ``flip``, ``affine``, ``elastic``) transform the volume and render the views again.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.augment [--resolution 128] [--repeat 5] [--only style]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.perf.common import machine, markdown_table

AUGMENTS = {
    "noise": {"std": 0.01},
    "intensity": {"scale": [0.9, 1.1], "gamma": [0.8, 1.25], "shift": [-0.05, 0.05]},
    "view_jitter": {"degrees": 2},
    "ct_noise": {"std": 10},
    "flip": {"axes": ["LR"]},
    "blur": {"std": 1},
    "affine": {"degrees": 5, "scales": 0.05, "translation": 5},
    "elastic": {"num_control_points": 7, "max_displacement": 4},
    "style": {},  # X-ray style randomisation, every default range (physics.spectral.DEFAULT_STYLE)
}


def run(resolution: int = 128, repeat: int = 5, only: list[str] | None = None) -> list[dict]:
    import nibabel as nib

    from x2ct_framework.phantom import chest_phantom
    from x2ct_framework.stage import Stage
    from x2ct_plugins.datasets.ct_folder import CTFolderDataset

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="x2ct-augment-bench-"))
    try:
        root, cache = tmp / "cts", tmp / "cache"
        root.mkdir()
        hu, _ = chest_phantom(resolution, seed=900)
        s = 320.0 / resolution
        nib.save(nib.Nifti1Image(hu.permute(2, 1, 0).numpy().astype(np.int16), np.diag([-s, -s, -s, 1.0])),
                 str(root / "case.nii"))

        def dataset(augment=None):
            return CTFolderDataset(split="train", stage=Stage("s", 1, resolution, {}), root=str(root), views=[0, 90],
                                   geometry="x2ctgan", split_fractions=[1, 0, 0], cache_dir=str(cache),
                                   augment=augment)

        def timed(ds) -> float:
            t0 = time.perf_counter()
            ds[0]
            return time.perf_counter() - t0

        def per_item(ds, base_ds) -> tuple[float, float, float]:
            """(median base, median augmented, median ratio) over interleaved pairs of accesses."""
            ds[0], base_ds[0]
            pairs = [(timed(base_ds), timed(ds)) for _ in range(repeat)]
            return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
                    statistics.median(b / a for a, b in pairs))

        def per_batch_render(ds, base_ds) -> tuple[float, float]:
            """(median seconds per item of ``finish_batch`` on a collated batch of 2, median ratio to a cached item's
            load), interleaved like :func:`per_item`."""
            from torch.utils.data import default_collate

            def render() -> float:
                batch = default_collate([ds[0], ds[0]])
                t0 = time.perf_counter()
                ds.finish_batch(batch)
                return (time.perf_counter() - t0) / 2

            render()
            pairs = [(timed(base_ds), render()) for _ in range(repeat)]
            return statistics.median(b for _, b in pairs), statistics.median(b / a for a, b in pairs)

        plain = dataset()
        plain.prepare_case(0)
        base_times, rows = [], []
        for name, opts in AUGMENTS.items():
            if only and name not in only:
                continue
            ds = dataset({name: opts})
            if name == "style":
                ds.prepare_case(0)  # the material lines, cached like the DRRs
                # per item, as a dataset read directly makes them (x2ct validate, check-data, your own loop)
                base, t, ratio = per_item(ds, plain)
                base_times.append(base)
                rows.append({"augmentation": f"{name} {opts}, images made per item", "where": "loader worker",
                             "re-renders": "no (cached material lines)", "ms per item": 1e3 * t, "ratio": ratio})
                # in training (StageData): the worker reads the lines and the draw, the batch's device makes the images
                ds.render_on_batch = True
                base, t, ratio = per_item(ds, plain)
                base_times.append(base)
                rows.append({"augmentation": f"{name} {opts}, in training", "where": "loader worker",
                             "re-renders": "no (cached material lines)", "ms per item": 1e3 * t, "ratio": ratio})
                render = per_batch_render(ds, plain)
                rows.append({"augmentation": f"{name} {opts}, in training: the images made on the batch",
                             "where": "training process (CPU here; the accelerator there)", "re-renders": "no",
                             "ms per item": 1e3 * render[0], "ratio": render[1]})
                continue
            base, t, ratio = per_item(ds, plain)
            base_times.append(base)
            renders = "no" if name in ("noise", "intensity") else (
                "yes, from the cached volume" if name == "view_jitter" else "yes (volume transform, then render)")
            rows.append({"augmentation": f"{name} {opts}", "where": "loader worker", "re-renders": renders,
                         "ms per item": 1e3 * t, "ratio": ratio})
        rows.insert(0, {"augmentation": "none (cached item)", "where": "loader worker", "re-renders": "no",
                        "ms per item": 1e3 * statistics.median(base_times), "ratio": 1.0})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="augmentations to time (default: all)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.resolution, args.repeat, args.only)
    print(f"{machine()}; {args.resolution}^3, PA + lateral {args.resolution}^2 (x2ctgan geometry); "
          f"{time.perf_counter() - t0:.0f} s wall")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

"""Data at scale: ``x2ct prepare`` throughput and items/s from the prepared cache, beside a model step.

Synthetic LIDC-sized CTs (512 x 512 in-plane at 0.625 mm, 2.5 mm slices: the size of a LIDC-IDRI
scan; made by upsampling the project's chest phantom, written as uncompressed NIfTI) go through the
real pipeline: ``ct_folder`` with ``x2ct_framework.prepare`` (read, resample to the stage grid,
crop, render PA + lateral DRRs in the X2CT-GAN geometry, write the ``.npy`` cache). Every figure is
for one worker process with one torch thread. Rows:

- ``prepare_<R>``: cases/min per worker at stage resolution R (the first pass over a case);
  reference: the same work without the cache writes, i.e. what an un-prepared dataset pays for
  every access (``ratio`` = prepare / on-the-fly time, the cost of writing the cache);
- ``items_<R>_pass1`` / ``items_<R>_pass2``: items/s per worker served from the prepared cache,
  first and second pass (the first epoch after preparing against the rest), against the model
  step at R measured in the same run (``ratio`` = data items/s x model step s: above 1 means one
  worker feeds the step with room to spare);
- ``model_step_<R>``: forward + backward + AdamW step of a small vit_cascade model at R (``MODEL``:
  tokens 8, dim 32, test_resnet encoder, batch 1) on this CPU: the reference the item rates are set
  against (at 256^3 a single step, it costs about a CPU-minute).
  The goal on a GPU is a 0.07 s step (the H100 bf16 stage-2 figure): ``gpu_goal_ratio`` = items/s x
  0.07 s.
- ``x2ctgan_h5_<R>_uncached`` / ``_first_pass`` / ``_cached``: items/s per worker of ``x2ctgan_h5`` on
  synthetic X2CT-GAN files (``<case>/ct_xray_data.h5``: a 256^3 uint16 CT as HU + 1024, two 320^2
  8-bit X-rays; written with h5py as the tests write them) at stage resolution R (linear resize, the
  stored X-rays): ``cache = false`` (every access reads the 256^3 CT and resizes it), the first pass
  with the cache (read, resize, write) and later passes from the cache, beside the model step at R
  of the same run (``ratio`` = items/s x model step s).

Run: ``python -m benchmarks.perf.data`` (``--quick``: 2 cases, 128^3 only; ``--x2ctgan-only``: the model
step and the x2ctgan_h5 rows at 128^3). Keep under 3 CPU-minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.perf.common import machine, markdown_table

GPU_STEP_S = 0.07
LIDC_SHAPE = (133, 512, 512)  # slices, rows, columns
LIDC_SPACING = (0.625, 0.625, 2.5)  # x, y, z mm
COLUMNS = ["benchmark", "ours", "reference", "unit", "ratio", "gpu_goal_ratio", "note"]


def make_cases(root: Path, n: int, shape=LIDC_SHAPE) -> float:
    """``n`` LIDC-sized CT NIfTI files (int16 HU); returns the seconds it took."""
    import nibabel as nib
    import torch.nn.functional as F

    from x2ct_framework.phantom import chest_phantom

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hu, _ = chest_phantom(64, seed=500 + i, volume_mm=340.0)
        big = F.interpolate(hu[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
        big = big + torch.randn(big.shape, generator=torch.Generator().manual_seed(i)) * 10.0
        sx, sy, sz = LIDC_SPACING
        affine = np.diag([-sx, -sy, -sz, 1.0])
        affine[:3, 3] = [160.0, 160.0, -100.0]
        data = big.permute(2, 1, 0).round().numpy().astype(np.int16)  # [x, y, z] toward L, P, I
        nib.save(nib.Nifti1Image(data, affine), str(root / f"LIDC-{i:04d}.nii"))
    return time.perf_counter() - t0


def _dataset(root: Path, cache: Path | None, resolution: int):
    from x2ct_framework.stage import Stage
    from x2ct_plugins.datasets.ct_folder import CTFolderDataset

    return CTFolderDataset(split="train", stage=Stage("s", 1, resolution, {}), root=str(root), views=[0, 90],
                           geometry="x2ctgan", split_fractions=[1, 0, 0], cache_dir=str(cache) if cache else "",
                           cache=cache is not None)


MODEL = {"tokens": 8, "dim": 32, "depth": 1, "heads": 2, "channels": 4, "encoder": "test_resnet", "decoder_levels": 1}


def model_step_s(resolution: int, repeat: int = 2, warmup: int = 1) -> float:
    """Median seconds of one training step of a small vit_cascade at ``resolution`` (batch 1)."""
    from x2ct_framework.physics import make_geometry
    from x2ct_framework.plugins import get_plugin_manager

    reg = get_plugin_manager().registry("model")
    model = reg.create("vit_cascade", dict(MODEL), context={"resolution": resolution, "views": [0, 90]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    geo = {k: v[None] for k, v in make_geometry([0.0, 90.0], "x2ctgan").items()}
    xrays = torch.rand(1, 2, 1, resolution, resolution)
    target = torch.rand(1, 1, resolution, resolution, resolution)
    times = []
    for k in range(repeat + warmup):
        t0 = time.perf_counter()
        loss = (model(xrays, geo) - target).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_h5_cases(root: Path, n: int, size: int = 256) -> list[str]:
    """``n`` X2CT-GAN cases ``root/<case>/ct_xray_data.h5`` (ct: size^3 uint16 HU + 1024, feet first;
    xray1/xray2: 320^2 uint8) and ``train.txt``; returns the case names."""
    import h5py
    import torch.nn.functional as F

    from x2ct_framework.phantom import chest_phantom
    from x2ct_framework.physics import drr, make_geometry

    names = []
    for i in range(n):
        hu, _ = chest_phantom(64, seed=700 + i)
        big = F.interpolate(hu[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]
        big = big + torch.randn(big.shape, generator=torch.Generator().manual_seed(i)) * 10.0
        ct01 = ((hu.clamp(-1024, 1476) + 1024) / 2500)[None, None]
        views = [drr(ct01, {k: v[None] for k, v in make_geometry([a], "x2ctgan").items()}, (-1024.0, 1476.0),
                     det_shape=(320, 320))[0, 0, 0] for a in (0.0, 270.0)]
        name = f"LIDC-IDRI-{i:04d}.20000101"
        (root / name).mkdir(parents=True)
        with h5py.File(root / name / "ct_xray_data.h5", "w") as f:
            f["ct"] = (big.flip(0) + 1024).round().clamp(0, 4095).numpy().astype(np.uint16)
            for key, img in zip(("xray1", "xray2"), views):
                f[key] = (img / img.max() * 255).round().numpy().astype(np.uint8)
            f["ori_size"] = np.array([size] * 3)
            f["spacing"] = np.array([320.0 / size] * 3)
        names.append(name)
    (root / "train.txt").write_text("\n".join(names) + "\n")
    return names


def x2ctgan_rows(tmp: Path, n: int, resolution: int, step: float, size: int = 256) -> list[dict]:
    """items/s of ``x2ctgan_h5`` without the cache, on the first pass with it, and from it."""
    from x2ct_framework.stage import Stage
    from x2ct_plugins.datasets.x2ctgan_h5 import X2CTGANH5Dataset

    root, cache = tmp / "h5", tmp / "h5-cache"
    t0 = time.perf_counter()
    make_h5_cases(root, n, size)
    made = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in root.glob("*/*.h5")) / n / 2**20

    def dataset(cached: bool):
        return X2CTGANH5Dataset(split="train", stage=Stage("s", 1, resolution, {}), root=str(root), val_fraction=0.0,
                                cache=cached, cache_dir=str(cache), check_geometry="off")

    def rate(ds, passes: int = 1) -> float:
        t0 = time.perf_counter()
        for _ in range(passes):
            for j in range(len(ds)):
                ds[j]
        return passes * len(ds) / (time.perf_counter() - t0)

    plain = dataset(False)
    plain[0]  # warm-up: imports and first-call costs stay out of the rates
    uncached = rate(plain, passes=2)
    first = rate(dataset(True))
    warm = rate(dataset(True), passes=3)  # a new dataset, as a fresh worker: reads the entries only
    note = (f"{n} cases, ct {size}^3 uint16 ({mb:.0f} MiB .h5), linear resize to {resolution}^3, stored X-rays; "
            f"reference: model steps/s on this CPU")
    rows = []
    for what, value in (("uncached", uncached), ("first_pass", first), ("cached", warm)):
        rows.append({"benchmark": f"x2ctgan_h5_{resolution}_{what}", "ours": value, "reference": 1.0 / step,
                     "unit": "items/s per worker", "ratio": value * step, "gpu_goal_ratio": value * GPU_STEP_S,
                     "note": note})
    rows.append({"benchmark": f"x2ctgan_h5_{resolution}_cached_vs_uncached", "ours": warm, "reference": uncached,
                 "unit": "items/s per worker", "ratio": warm / uncached, "note": f"setup {made / n:.1f} s per case"})
    return rows


def run(quick: bool = False, x2ctgan_only: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    n = 2 if quick else 3
    resolutions = (128,) if quick else (128, 256)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="x2ct-data-bench-"))
    try:
        if x2ctgan_only:
            step = model_step_s(128)
            rows.append({"benchmark": "model_step_128", "ours": step, "reference": GPU_STEP_S, "unit": "s",
                         "ratio": step / GPU_STEP_S, "note": "CPU, 1 thread, batch 1, median of 2; reference: the "
                                                             "GPU goal"})
            return rows + x2ctgan_rows(tmp, n, 128, step)
        root, cache = tmp / "cts", tmp / "cache"
        made = make_cases(root, n)
        size_mb = sum(p.stat().st_size for p in root.iterdir()) / n / 2**20
        for r in resolutions:
            on_the_fly = _dataset(root, None, r)
            t0 = time.perf_counter()
            on_the_fly[0]
            fly_s = time.perf_counter() - t0
            ds = _dataset(root, cache, r)
            t0 = time.perf_counter()
            for j in range(len(ds)):
                ds.prepare_case(j)
            prep_s = (time.perf_counter() - t0) / len(ds)
            rows.append({"benchmark": f"prepare_{r}", "ours": 60.0 / prep_s, "reference": 60.0 / fly_s,
                         "unit": "cases/min per worker", "ratio": prep_s / fly_s,
                         "note": f"{n} cases of {'x'.join(map(str, LIDC_SHAPE))} int16 ({size_mb:.0f} MiB .nii); "
                                 f"reference: one un-cached access"})
            big = r >= 256
            step = model_step_s(r, repeat=1, warmup=0) if big else model_step_s(r)
            rows.append({"benchmark": f"model_step_{r}", "ours": step, "reference": GPU_STEP_S, "unit": "s",
                         "ratio": step / GPU_STEP_S,
                         "note": "CPU, 1 thread, batch 1" + (", one step (no warm-up)" if big else ", median of 2")
                                 + "; reference: the GPU goal"})
            fresh = _dataset(root, cache, r)  # a new dataset (a new worker): reads the manifest and the cache
            for p in (1, 2):
                reps = max(8, 4 * n)
                t0 = time.perf_counter()
                for k in range(reps):
                    fresh[k % len(fresh)]
                rate = reps / (time.perf_counter() - t0)
                rows.append({"benchmark": f"items_{r}_pass{p}", "ours": rate, "reference": 1.0 / step,
                             "unit": "items/s per worker", "ratio": rate * step, "gpu_goal_ratio": rate * GPU_STEP_S,
                             "note": "from the prepared cache; reference: model steps/s on this CPU"})
            rows += x2ctgan_rows(tmp / f"x2ctgan_{r}", n, r, step)
        rows.append({"benchmark": "make_cases", "ours": made / n, "unit": "s per case", "note": "synthetic set, setup"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 cases, 128^3 only")
    parser.add_argument("--x2ctgan-only", action="store_true", help="the model step and the x2ctgan_h5 rows (128^3)")
    args = parser.parse_args()
    t0, c0 = time.perf_counter(), time.process_time()
    rows = run(quick=args.quick, x2ctgan_only=args.x2ctgan_only)
    print(f"{machine()}; {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
          f"(this process), pid {os.getpid()}")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

"""The TCIA walk-through of docs/data.md, timed: a TCIA-like download to a training step.

Writes a synthetic LIDC-IDRI-like download (``--patients`` patients, each ``patient/study/series``
with a 133-slice 512 x 512 CT series at 0.625 x 0.625 x 2.5 mm, a 2-slice localizer and a SEG
series beside it), a recipe for it, then runs the documented commands as a user would, each in its
own process: ``x2ct prepare`` (1 worker), ``x2ct validate``, ``x2ct run`` (a few steps of a small
model at 64^3) and ``x2ct predict --like``. Prints the wall time of each step.

Run: ``python -m benchmarks.perf.tcia_walkthrough`` (about 2 CPU-minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

RECIPE = """
name = "lidc_walkthrough"
seed = 0
output_dir = "{out}"

[data]
name = "ct_folder"
root = "{root}"
cache_dir = "{cache}"
views = [0, 90]
geometry = "x2ctgan"
crop = "lung"

[model]
name = "vit_cascade"
tokens = 8
dim = 32
depth = 1
heads = 2
channels = 4
encoder = "test_resnet"
decoder_levels = 1

[train]
batch_size = 1
mixed_precision = "no"
num_workers = 0
trackers = []
progress = false
max_steps_per_epoch = 2

[[stages]]
name = "stage1"
resolution = 64
epochs = 1
lr = 1e-4
losses = {{ l1 = 1.0 }}
"""


def write_slice(path: Path, pixels: np.ndarray, z: float, uid: str, modality: str = "CT", image_type=None) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid + ".0", uid, uid + ".9"
    ds.Modality, ds.PatientID = modality, "walkthrough"
    if image_type:
        ds.ImageType = image_type
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.625, 0.625]
    ds.SliceThickness = 2.5
    ds.ImagePositionPatient = [-160.0, -160.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.PixelData = (pixels + 1024).astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_download(root: Path, patients: int) -> None:
    import torch.nn.functional as F

    from x2ct_framework.phantom import chest_phantom

    for p in range(patients):
        hu, _ = chest_phantom(64, seed=900 + p, volume_mm=340.0)
        vol = F.interpolate(hu[None, None], size=(133, 512, 512), mode="trilinear")[0, 0].round()
        vol = vol.flip(0).numpy()  # DICOM slices from the feet up (z increasing toward the head)
        study = root / f"LIDC-IDRI-{p + 1:04d}" / "01-01-2000-NA-CT CHEST-30178"
        ct = study / "3000566.000000-NA-03192"
        ct.mkdir(parents=True)
        uid = f"1.3.6.1.4.1.14519.5.2.1.{p + 1}"
        for k in range(vol.shape[0]):
            write_slice(ct / f"1-{k + 1:03d}.dcm", vol[k], -300.0 + 2.5 * k, uid)
        loc = study / "1.000000-SCOUT-1"
        loc.mkdir()
        for k in range(2):
            write_slice(loc / f"1-{k + 1}.dcm", vol[60], 5.0 * k, uid + ".7", image_type=["ORIGINAL", "PRIMARY",
                                                                                          "LOCALIZER"])
        seg = study / "300.000000-Segmentation-1"
        seg.mkdir()
        write_slice(seg / "1-1.dcm", np.zeros((512, 512)), 0.0, uid + ".8", modality="SEG")


def step(name: str, cmd: list[str], rows: list[tuple[str, float, str]]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    last = (res.stdout.strip().splitlines() or [""])[-1][:110]
    if res.returncode != 0:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    rows.append((name, dt, last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="x2ct-tcia-"))
    rows: list[tuple[str, float, str]] = []
    try:
        root = tmp / "LIDC-IDRI"
        t0 = time.perf_counter()
        write_download(root, args.patients)
        rows.append(("write the synthetic download", time.perf_counter() - t0, f"{args.patients} patients"))
        recipe = tmp / "lidc.toml"
        recipe.write_text(textwrap.dedent(RECIPE.format(out=tmp / "runs", root=root, cache=tmp / "cache")))
        x2ct = [sys.executable, "-m", "x2ct_framework.cli"]
        step("x2ct prepare (1 worker)", x2ct + ["prepare", str(recipe), "--workers", "1", "--no-progress"], rows)
        step("x2ct prepare again (resume)", x2ct + ["prepare", str(recipe), "--workers", "1", "--no-progress"], rows)
        step("x2ct validate", x2ct + ["validate", str(recipe)], rows)
        step("x2ct run (2 steps at 64^3)", x2ct + ["run", str(recipe)], rows)
        case = tmp / "xrays"
        case.mkdir()
        from PIL import Image

        for i in range(2):
            Image.fromarray(np.full((64, 64), 100 + i, np.uint8)).save(case / f"view{i}.png")
        step("x2ct predict --like", x2ct + ["predict", str(tmp / "runs" / "lidc_walkthrough"), str(case),
                                           "--geometry", "recipe", "--like", str(root / "LIDC-IDRI-0001"),
                                           "--out", str(tmp / "pred"), "--device", "cpu", "--no-progress"], rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| step | wall s | last line |\n|---|---|---|")
    for name, dt, last in rows:
        print(f"| {name} | {dt:.1f} | {last.replace('|', '/')} |")


if __name__ == "__main__":
    main()

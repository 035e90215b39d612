"""The matrix over parallel worker processes gives the serial run's per-seed numbers, digit for digit."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import variants as V  # noqa: E402
from conftest import tiny_tables  # noqa: E402
from x2ct_framework.errors import RecipeError  # noqa: E402

BASE = 'name = "tinybase"\n' + tiny_tables(encoder="test_efficientnet", num_train=2, decoder_levels=None) + """
[train]
batch_size = 2
[eval]
metrics = ["psnr"]
[[stages]]
name = "stage2"
resolution = 16
epochs = 1
lr = 1e-3
losses = { l1 = 1.0 }
"""

# cnn_baseline needs no timm: each worker process starts with torch and the framework only
MATRIX = """
name = "four"
base = "base.toml"
seeds = [0]
set = ['model = { name = "cnn_baseline", channels = 4, levels = 2 }']
[budget]
steps = 1
epochs = 1
[eval]
metrics = ["psnr", "ssim"]
[[cells]]
name = "plain"
[[cells]]
name = "grad"
set = ["stages.stage2.losses.gradient=0.15"]
[[cells]]
name = "lr"
set = ["stages.stage2.lr=3e-3"]
[[cells]]
name = "ssim"
set = ["stages.stage2.losses.ssim=0.5"]
"""

# what a run computes (the timing and memory columns measure the machine, the device column says where)
MEASURED = ("time_per_step_s", "peak_mem_mib", "device")


def _per_seed(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "per_seed.csv").open()))


@pytest.mark.slow
def test_four_cells_over_two_workers_match_the_serial_run(tmp_path):
    (tmp_path / "base.toml").write_text(textwrap.dedent(BASE))
    (tmp_path / "m.toml").write_text(textwrap.dedent(MATRIX))
    m = V.load_matrix(tmp_path / "m.toml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial run with the workers' thread budget
    try:
        serial = V.run_matrix(m, tmp_path / "serial", isolate=False, plot=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    slots = V.make_slots(workers=2, devices="cpu", threads_per_worker=1)
    assert [s.env["OMP_NUM_THREADS"] for s in slots] == ["1", "1"] and slots[0].env["CUDA_VISIBLE_DEVICES"] == ""
    logs: list[str] = []
    parallel = V.run_matrix(m, tmp_path / "parallel", slots=slots, plot=False, log=logs.append)
    assert sorted(parallel["ran"]) == sorted(serial["ran"]) == ["grad-s0", "lr-s0", "plain-s0", "ssim-s0"]
    assert not parallel["failed"] and "2 parallel slots (cpu x1, cpu x1)" in logs[0]

    a, b = _per_seed(tmp_path / "serial"), _per_seed(tmp_path / "parallel")
    assert [r["cell"] for r in a] == [r["cell"] for r in b] == ["plain", "grad", "lr", "ssim"]
    for ra, rb in zip(a, b):
        same = {k: v for k, v in ra.items() if k not in MEASURED}
        assert same == {k: v for k, v in rb.items() if k not in MEASURED}, (ra, rb)  # every printed digit
    assert len({r["psnr"] for r in a}) > 1  # the four cells differ: the comparison is not trivially equal
    # the table says where each cell ran: both workers, one thread each
    assert {r["device"] for r in b} == {"cpu (1 threads, worker 0)", "cpu (1 threads, worker 1)"}
    assert "| device |" in (tmp_path / "parallel" / "matrix.md").read_text()


def test_slots_devices_and_shards(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpus = V.make_slots(workers=0, devices="0,1,2,3", per_device=2, threads_per_worker=3)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "1", "2", "3"] * 2
    assert {s.env["OMP_NUM_THREADS"] for s in gpus} == {"3"} and gpus[5].label == "cuda:1"
    assert len(V.make_slots(workers=3, devices="0,1")) == 2  # at most per_device jobs per GPU
    assert len(V.make_slots(workers=0, devices="auto")) == 1  # no GPU visible: one CPU slot
    with pytest.raises(RecipeError, match="--devices: expected auto, cpu or GPU ids"):
        V.make_slots(devices="gpu0")
    from benchmarks.variants.runner import parse_shard

    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (1, 1)
    with pytest.raises(RecipeError, match="--shard: expected K/N"):
        parse_shard("5/4")

"""Fast start: listing the plugins imports none of the heavy libraries; the start-up benchmark's measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

HEAVY = ("timm", "torchvision", "matplotlib", "lpips", "torchio", "torch._dynamo")

# what `x2ct plugins` does (every plugin module imported, every registry filled), then `x2ct --help`
PROBE = f"""
import contextlib, io, json, sys
from x2ct_framework.cli import main
from x2ct_framework.plugins import get_plugin_manager
with contextlib.redirect_stdout(io.StringIO()) as listing:
    status = main(["plugins"])
    try:
        main(["--help"])
    except SystemExit:
        pass
pm = get_plugin_manager()
print(json.dumps({{"status": status, "failed": list(pm.failed), "listing": listing.getvalue(),
                  "names": {{k: [e.name for e in r.entries()] for k, r in pm.registries().items()}},
                  "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_listing_plugins_imports_no_heavy_library(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "X2CT_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 0 and res["failed"] == []
    # every built-in plugin module was imported and registered its components
    names = res["names"]
    assert {"vit_cascade", "cnn_baseline"} <= set(names["model"]), names
    assert {"l1", "ssim", "vgg", "lpips", "adversarial"} <= set(names["loss"]), names
    assert {"synthetic_phantom", "ct_folder", "x2ctgan_h5", "paired_xray"} <= set(names["dataset"]), names
    assert "vit_cascade" in res["listing"] and "usage:" in res["listing"]
    assert res["heavy"] == [], f"imported at start-up: {res['heavy']}"


def test_startup_measure_counts_the_childs_own_peak_memory():
    from benchmarks.perf import startup

    small_wall, small = startup.measure([sys.executable, "-c", "pass"])
    big_wall, big = startup.measure([sys.executable, "-c", "b = bytearray(64 * 2**20); b[::4096] = b'x' * (2**14)"])
    assert small_wall > 0 and big_wall > 0
    assert big - small > 50, (small, big)  # 64 MiB touched: the child's own maximum, not this process'
    assert [c[-1] for c in startup.commands().values()][:2] == ["--help", "plugins"]

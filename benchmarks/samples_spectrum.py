"""Where a generative run's samples lack (or add) detail: the 3D power spectrum in radial frequency bands of the
regression it refines, the mean of K samples, one sample, and the samples' spread against the mean's error.

Every column is pooled over the cases of the split (the sum of ``|FFT|^2`` over the bins of a band, all cases,
divided by the target's), so the row above the ``hf_energy_ratio`` cutoff (0.25 cycles/voxel) is that metric
pooled rather than averaged per case. The last column asks whether the sampler is calibrated band by band:
with K samples ``s_k`` of mean ``m``, a sampler whose samples are draws from the CT's true conditional
distribution has ``E|s_k - m|^2 (K / (K - 1)) = E|ct - m|^2 (K / (K + 1))`` in every band, so

    spread / error = [sum_band |s_1 - m|^2 K / (K - 1)] / [sum_band |ct - m|^2 K / (K + 1)]

is 1 for such a sampler, below 1 where its samples vary less than the truth does around their mean (the sample
comes out smoother than a CT there), above 1 where they vary more. Samples are clipped to [0, 1] as
``x2ct evaluate`` clips them.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.samples_spectrum benchmarks/out/matrix/cpu_refiner/refiner-s0
--split val --samples 8 --out spectrum.md`` (``--set stages.refiner.model.sampler=\\"sde\\"`` to try another
sampler on the same weights).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

BANDS = (0.0, 0.1, 0.2, 0.25, 0.35, 0.5, math.sqrt(3) / 2)
COLUMNS = ("regression", "mean", "sample")


def band_energy(x: torch.Tensor, edges: tuple[float, ...] = BANDS) -> torch.Tensor:
    """``[len(edges) - 1]``: the sum over the cases of ``x [B, 1, D, H, W]`` of ``|FFT|^2`` in each radial band
    ``(edges[i], edges[i + 1]]`` of cycles per voxel (the first band includes 0)."""
    from x2ct_framework.evaluation.sharpness_metrics import power_spectrum, radial_frequency

    power = power_spectrum(x).sum(0)
    r = radial_frequency(x.shape[-3:], x.device)
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (r > lo) & (r <= hi + 1e-12) if i else (r <= hi + 1e-12)
        out.append(power[inside].sum())
    return torch.stack(out)


class SpectrumTally:
    """Band energies of the target, the regression, the mean, one sample, the spread and the mean's error."""

    def __init__(self, samples: int, edges: tuple[float, ...] = BANDS):
        if samples < 2:
            raise ValueError(f"the spread needs at least 2 samples, got {samples}")
        self.k, self.edges = samples, tuple(edges)
        self.sums: dict[str, torch.Tensor] = {}
        self.cases = 0

    def _add(self, key: str, x: torch.Tensor) -> None:
        e = band_energy(x, self.edges)
        self.sums[key] = self.sums[key] + e if key in self.sums else e

    def add(self, target: torch.Tensor, mean: torch.Tensor, sample: torch.Tensor,
            regression: torch.Tensor | None = None) -> None:
        self._add("target", target)
        self._add("mean", mean)
        self._add("sample", sample)
        if regression is not None:
            self._add("regression", regression)
        self._add("spread", (sample - mean) * math.sqrt(self.k / (self.k - 1)))
        self._add("error", (target - mean) * math.sqrt(self.k / (self.k + 1)))
        self.cases += target.shape[0]

    def table(self, cutoff: float = 0.25) -> dict:
        """``{"bands": [[lo, hi], ...], "<column>": [ratio per band], "above_cutoff": {...}}``."""
        t = self.sums["target"]
        hf = torch.tensor([lo >= cutoff - 1e-12 for lo in self.edges[:-1]])
        out: dict = {"bands": [[lo, hi] for lo, hi in zip(self.edges[:-1], self.edges[1:])], "cases": self.cases,
                     "samples": self.k, "cutoff": cutoff, "above_cutoff": {}}
        for key in (*COLUMNS, "spread"):
            if key not in self.sums:
                continue
            ref = self.sums["error"] if key == "spread" else t
            out[key] = (self.sums[key] / ref).tolist()
            out["above_cutoff"][key] = float(self.sums[key][hf].sum() / ref[hf].sum()) if hf.any() else math.nan
        return out


def markdown(table: dict, title: str) -> str:
    cols = [c for c in (*COLUMNS, "spread") if c in table]
    head = {"regression": "regression / target", "mean": f"mean of {table['samples']} / target",
            "sample": "one sample / target", "spread": "samples' spread / mean's error (1 = calibrated)"}
    lines = [f"# {title}", "", f"{table['cases']} cases, {table['samples']} samples each; energy of the 3D power "
             f"spectrum per radial band (cycles/voxel), pooled over the cases.", "",
             "| band | " + " | ".join(head[c] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for i, (lo, hi) in enumerate(table["bands"]):
        lines.append(f"| {lo:.2f}-{hi:.2f} | " + " | ".join(f"{table[c][i]:.3f}" for c in cols) + " |")
    lines.append(f"| **> {table['cutoff']:g}** | " + " | ".join(f"**{table['above_cutoff'][c]:.3f}**" for c in cols)
                 + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.samples_spectrum", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder of a generative model (or its checkpoint folder)")
    parser.add_argument("--split", default="val", help="split to draw from (default val: no test case seen)")
    parser.add_argument("--samples", type=int, default=8, help="samples per case (>= 2)")
    parser.add_argument("--max-cases", type=int, default=0, help="the first N cases (0: the whole split)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the model (e.g. stages.refiner.model.steps=25)")
    parser.add_argument("--out", help="write the table here (.md; the numbers beside it as .json)")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples: the spread needs at least 2 samples, got {args.samples}")

    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from x2ct_framework.config.build import build_dataset
    from x2ct_framework.evaluation.evaluate import infer_samples
    from x2ct_framework.generative import is_generative
    from x2ct_framework.loading import load_model
    from x2ct_framework.runs import resolve_target

    target = resolve_target(args.run, None, args.overrides)
    model = load_model(target, torch.device("cpu"))
    if not is_generative(model):
        parser.error(f"{args.run}: not a generative model's run (no samples to draw)")
    dataset = build_dataset(target.recipe, target.stage, args.split)
    n = len(dataset) if not args.max_cases else min(args.max_cases, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=target.recipe["train"]["batch_size"])
    tally = SpectrumTally(args.samples)
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"spectrum {args.split}", dynamic_ncols=True):
            drawn = infer_samples(model, batch, args.samples)
            tally.add(batch["ct"].float(), drawn["mean"], drawn["sample"], drawn["regression"])
    table = tally.table()
    table.update(run=str(args.run), split=args.split, overrides=args.overrides)
    text = markdown(table, f"Sample spectrum of `{args.run}` ({args.split})")
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

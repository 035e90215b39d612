"""benchmarks.samples_spectrum: band energies (Parseval, a pure tone) and the spread/error ratio of a sampler that is
calibrated by construction (1) or too narrow (below 1, as the algebra says), and the command on a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.samples_spectrum import BANDS, SpectrumTally, band_energy
from x2ct_framework import checkpoint as ckpt


def test_a_tone_lands_in_its_band_with_parsevals_energy():
    n = 16
    z = torch.arange(n, dtype=torch.float64)
    tone = torch.cos(2 * math.pi * 0.3125 * z)[None, None, :, None, None].expand(2, 1, n, n, n)  # 5 / 16 cycles
    e = band_energy(tone)
    inside = [i for i, (lo, hi) in enumerate(zip(BANDS[:-1], BANDS[1:])) if lo < 0.3125 <= hi]
    assert inside == [3]
    assert torch.allclose(e.sum(), n**3 * tone.pow(2).sum(), rtol=1e-9)  # Parseval, unnormalised FFT
    assert float(e[3]) == pytest.approx(float(e.sum()), rel=1e-9)


def _smooth_field(gen: torch.Generator, shape) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x + 0.5 * torch.roll(x, 1, dims=-1) + 0.5 * torch.roll(x, 1, dims=-2)  # a coloured spectrum


@pytest.mark.parametrize("amplitude", [1.0, 0.5])
def test_spread_over_error_is_one_for_a_calibrated_sampler_and_below_for_a_narrow_one(amplitude):
    """Truth and K samples drawn around the same centre, the samples' deviations scaled by ``a``: the spread is
    a^2 s^2, the mean's error s^2 (1 + a^2 / K) K / (K + 1), their ratio a^2 (K + 1) / (K + a^2) in every band
    (1 for a = 1; within the noise of 40 cases of 8^3)."""
    gen = torch.Generator().manual_seed(0)
    k, shape = 8, (40, 1, 8, 8, 8)
    centre = _smooth_field(gen, shape)
    truth = centre + _smooth_field(gen, shape)
    samples = torch.stack([centre + amplitude * _smooth_field(gen, shape) for _ in range(k)])
    tally = SpectrumTally(k)
    tally.add(truth, samples.mean(0), samples[0], regression=centre)
    table = tally.table()
    assert table["cases"] == 40 and len(table["spread"]) == len(BANDS) - 1
    expected = amplitude**2 * (k + 1) / (k + amplitude**2)
    for ratio in table["spread"][1:]:  # the first band holds few bins: a noisier estimate
        assert ratio == pytest.approx(expected, rel=0.2)
    assert table["above_cutoff"]["spread"] == pytest.approx(expected, rel=0.06)
    with pytest.raises(ValueError, match="at least 2 samples"):
        SpectrumTally(1)


def test_the_command_writes_the_table_of_a_generative_run(tmp_path, monkeypatch):
    from benchmarks import samples_spectrum
    from test_evaluate import make_run
    from test_models_flow import FLOW

    monkeypatch.setattr(ckpt, "FSYNC", False)
    run = make_run(tmp_path, name="flow", model=FLOW, num_test=2)
    out = tmp_path / "spectrum.md"
    assert samples_spectrum.main([str(run), "--split", "test", "--samples", "3", "--out", str(out)]) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    assert table["cases"] == 2 and table["samples"] == 3
    assert all(math.isfinite(v) and v >= 0 for v in table["sample"] + table["spread"] + table["mean"])
    assert "samples' spread / mean's error" in out.read_text() and "| 0.25-0.35 |" in out.read_text()
    (tmp_path / "plain").mkdir()
    plain = make_run(tmp_path / "plain")
    with pytest.raises(SystemExit):
        samples_spectrum.main([str(plain), "--split", "test"])

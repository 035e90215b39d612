"""Run: python benchmarks/results/cpu/sampling/latent_flops.py > benchmarks/results/cpu/sampling/latent_flops.md

Multiply-adds of one velocity-network call (the U-Net, which a sampler calls twice per Heun step) of
recipes/variants/flow_refiner.toml's refiner (on the R^3 voxel grid) against
recipes/variants/latent_flow_refiner.toml's (on the (R/4)^3 latent grid, with the autoencoder's decoder run once
per sample; in training the autoencoder also encodes and decodes every step), counted by torch's
FlopCounterMode on meta tensors: no weights or volumes are allocated, so the 256^3 rows cost nothing to count.
FLOPs are not seconds; they say what the latent grid removes."""
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from x2ct_plugins.models.flow_refiner import UNet3d  # noqa: E402
from x2ct_plugins.models.latent_flow import VolumeAutoencoder, latent_sizes  # noqa: E402

EMB, FEAT, STEPS = 256, 16, 25


def gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


print("| R | flow_refiner U-Net call (R^3, widths 32-256) | latent U-Net call ((R/4)^3 x 4, widths 64-256) | "
      "decoder, once per sample | one 25-step Heun sample: voxel / latent | a training step's forward: voxel / "
      "latent (U-Net + the autoencoder's encode and decode) |")
print("|---|---|---|---|---|---|")
with torch.device("meta"):
    voxel_net = UNet3d(1 + 1 + FEAT, [32, 64, 128, 256], EMB)
    latent_net = UNet3d(4 + 1 + FEAT, [64, 128, 256], EMB, cout=4)
    decoder = VolumeAutoencoder(levels=2, width=32, latent_channels=4)
    emb = torch.zeros(1, EMB)
    for r in (128, 256):
        g = latent_sizes(r, 2)[-1]
        v = gflops(lambda: voxel_net(torch.zeros(1, 18, r, r, r), emb))
        lat = gflops(lambda: latent_net(torch.zeros(1, 21, g, g, g), emb))
        dec = gflops(lambda: decoder.decode(torch.zeros(1, 4, g, g, g), r))
        enc = gflops(lambda: decoder.encode(torch.zeros(1, 1, r, r, r)))
        calls = 2 * STEPS - 1
        print(f"| {r}^3 | {v:,.0f} GFLOP | {lat:,.0f} GFLOP | {dec:,.0f} GFLOP | "
              f"{calls * v:,.0f} / {calls * lat + dec:,.0f} GFLOP ({calls * v / (calls * lat + dec):.1f}x) | "
              f"{v:,.0f} / {lat + enc + dec:,.0f} GFLOP |")

"""Per-term gradient norms of the stage-2 loss terms on a trained-like prediction (issue 15).

The weights of a sum of loss terms decide which term steers training: what matters is each term's
gradient with respect to the prediction, not its value. This script builds a "trained-like"
prediction (the target blurred by a Gaussian of ``--sigma`` voxels plus ``--noise`` of Gaussian
noise, the way an early model is blurred and noisy) for synthetic CTPA phantoms, and prints, for every
term at weight 1, its value and the L2 norm of d(term)/d(prediction), and the weight that would give
the term the same gradient norm as L1::

    OMP_NUM_THREADS=1 python -m benchmarks.loss_balance --resolution 32 --cases 2

VGG and LPIPS use random backbones here (offline machine), so their rows say little about the
ImageNet networks' scale.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import default_collate

from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage

TERMS = {
    "l1": {},
    "ssim": {},
    "ssim_soft": ("ssim", {"windows": [[-160, 240]]}),
    "gradient": {},
    "vgg": {"weights": "random", "slices": 1, "layers": ["relu1_2", "relu2_2"]},
    "vgg_window": ("vgg", {"weights": "random", "slices": 1, "layers": ["relu1_2", "relu2_2"], "random_slices": True,
                           "display_window": [-1000, 1000]}),
    "drr_projection": {},
    "vessel": {"use_labels": False},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=1.0, help="blur of the trained-like prediction (voxels)")
    ap.add_argument("--noise", type=float, default=0.01, help="noise of the trained-like prediction ([0, 1] units)")
    args = ap.parse_args(argv)
    from x2ct_plugins.datasets.synthetic_phantom import SyntheticPhantomDataset
    from x2ct_plugins.losses.vessel import gaussian_blur3d

    torch.manual_seed(0)
    ds = SyntheticPhantomDataset(split="train", stage=Stage("s", 2, args.resolution, {}), geometry="x2ctgan")
    batch = default_collate([ds[i] for i in range(args.cases)])
    target = batch["ct"].float()
    base = (gaussian_blur3d(target, args.sigma) + args.noise * torch.randn_like(target)).clamp(0, 1)
    registry = get_plugin_manager().registry("loss")
    rows = []
    for label, spec in TERMS.items():
        name, options = spec if isinstance(spec, tuple) else (label, spec)
        loss = registry.create(name, options, where=f"loss_balance: {label}", context={"hu_window": [-1000, 3000]})
        pred = base.clone().requires_grad_(True)
        value = loss(pred, target, batch)
        (grad,) = torch.autograd.grad(value, pred)
        rows.append((label, float(value.detach()), float(grad.norm())))
    ref = dict((r[0], r[2]) for r in rows)["l1"]
    print(f"trained-like prediction: target blurred sigma {args.sigma} voxel + noise {args.noise}, "
          f"{args.cases} phantoms at {args.resolution}^3")
    print(f"{'term':16s} {'value':>10s} {'|grad|':>12s} {'weight for |grad| = L1':>24s}")
    for label, value, g in rows:
        print(f"{label:16s} {value:10.4f} {g:12.3e} {ref / g if g > 0 else float('inf'):24.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

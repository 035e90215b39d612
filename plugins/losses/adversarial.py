"""``adversarial``: a 3D PatchGAN discriminator that pushes predictions towards realistic texture.

The user's plan's future-work item "add a discriminator for realistic texture (fine capillaries,
trabecular bone)". The loss owns trainable parts, which the trainer handles generically (see the
"loss with trainable parts" contract in the design):

- ``forward(pred, target, batch)``: the generator objective, added to the stage's loss with the
  term's ``weight`` (LSGAN ``mean((D(pred) - 1)^2)`` or hinge ``-mean(D(pred))``). It is 0 until the
  discriminator has taken its first update, so an untrained critic never steers the generator;
- ``trainable_parts()``: the discriminator; the trainer prepares it, checkpoints its weights and
  optimizer with the run, and restores them on resume;
- ``configure_optimizer(params)``: its own optimizer and learning rate (Adam, betas 0.5/0.999);
- ``parts_loss(pred_detached, target, batch, epoch=, step=)``: the discriminator objective, or
  ``None`` when it should not update at this step (before ``disc_start_epoch``, or between every
  ``update_every`` generator steps).

Recipe::

    [stages.losses.adversarial]
    weight = 0.01
    start_epoch = 10          # trainer: the generator term is off before epoch 10
    disc_start_epoch = 10     # the discriminator starts training at epoch 10 too
    objective = "lsgan"       # or "hinge"
    lr = 2e-4
    update_every = 1

``start_epoch`` belongs to the trainer's weight schedule (it never reaches this plugin), hence the
separate ``disc_start_epoch``; set it earlier than ``start_epoch`` to warm the critic up first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from x2ct_framework.hookspecs import hookimpl

OBJECTIVES = ("lsgan", "hinge")
NORMS = ("instance", "none")
OPTIMIZERS = ("adam", "adamw")


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: ``layers`` stride-2 4^3 convolutions, then two 3^3 convolutions to patch logits.

    The output ``[B, 1, d, h, w]`` scores overlapping patches of the volume (real > fake), so the
    critic judges local texture rather than global layout.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, layers: int = 3, spectral_norm: bool = True,
                 norm: str = "instance"):
        super().__init__()
        wrap = _spectral_norm if spectral_norm else (lambda m: m)
        blocks: list[nn.Module] = []
        width = in_channels
        for i in range(layers + 1):
            out = channels * 2 ** min(i, 3)
            stride, kernel = (2, 4) if i < layers else (1, 3)
            blocks.append(wrap(nn.Conv3d(width, out, kernel, stride, 1, bias=(i == 0 or norm == "none"))))
            if i > 0 and norm == "instance":
                blocks.append(nn.InstanceNorm3d(out, affine=True))
            blocks.append(nn.LeakyReLU(0.2, inplace=True))
            width = out
        blocks.append(wrap(nn.Conv3d(width, 1, 3, 1, 1)))
        self.net = nn.Sequential(*blocks)
        self.layers = layers
        # discriminator updates so far; checkpointed with the weights
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        smallest = min(volume.shape[2:])
        if smallest < 2 ** (self.layers + 1):
            raise ValueError(f"adversarial: a {self.layers}-layer discriminator needs volumes of at least "
                             f"{2 ** (self.layers + 1)} voxels per side, got {tuple(volume.shape[2:])}; "
                             f"lower `layers`")
        return self.net(volume)


class AdversarialLoss(nn.Module):
    """Generator-side adversarial term with a trainable 3D PatchGAN critic (see the module docstring).

    Options: ``objective`` "lsgan" or "hinge"; discriminator ``channels``, ``layers``,
    ``spectral_norm``, ``norm`` ("instance" or "none"); its ``optimizer`` ("adam"/"adamw"), ``lr``,
    ``betas``, ``weight_decay``; ``update_every`` N generator steps; ``disc_start_epoch``.
    """

    def __init__(self, objective: str = "lsgan", channels: int = 32, layers: int = 3, spectral_norm: bool = True,
                 norm: str = "instance", optimizer: str = "adam", lr: float = 2e-4,
                 betas: list[float] = (0.5, 0.999), weight_decay: float = 0.0, update_every: int = 1,
                 disc_start_epoch: int = 0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
        for key, value, low in (("channels", channels, 1), ("layers", layers, 1), ("update_every", update_every, 1),
                                ("disc_start_epoch", disc_start_epoch, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        betas = [float(b) for b in betas]
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.objective, self.optimizer_name = objective, optimizer
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.update_every, self.disc_start_epoch = update_every, disc_start_epoch
        self.discriminator = PatchDiscriminator3D(1, channels, layers, spectral_norm, norm)

    # ---- the trainable-parts contract -------------------------------------------------------
    def trainable_parts(self) -> nn.Module:
        return self.discriminator

    def configure_optimizer(self, params) -> torch.optim.Optimizer:
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def parts_loss(self, pred_detached: torch.Tensor, target: torch.Tensor, batch: dict, *, epoch: int,
                   step: int) -> torch.Tensor | None:
        """Discriminator objective at this generator step, or None when the critic skips it."""
        if epoch < self.disc_start_epoch or step % self.update_every != 0:
            return None
        d_real = self.discriminator(target)
        d_fake = self.discriminator(pred_detached.detach())
        if self.objective == "lsgan":
            loss = 0.5 * (((d_real - 1) ** 2).mean() + (d_fake**2).mean())
        else:
            loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        self.discriminator.updates += 1
        return loss

    # ---- the generator objective -------------------------------------------------------------
    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if int(self.discriminator.updates) == 0:
            return pred.sum() * 0.0  # no trained critic yet
        params = list(self.discriminator.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:  # gradients go to the prediction only, never into the critic
            p.requires_grad_(False)
        try:
            logits = self.discriminator(pred)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        if self.objective == "lsgan":
            return ((logits - 1) ** 2).mean()
        return -logits.mean()


@hookimpl
def register_losses(register):
    register("adversarial", AdversarialLoss)

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

X2CT-GAN's critic (``arch = "x2ctgan"``, ``condition = "xrays"``): their conditional 3D PatchGAN
(``NLayer_3D_Discriminator``, 64 channels, 3 layers: 4^3 convolutions, stride 2, 2, 2, 1, 1, padding
2, instance norm without affine parameters, no spectral norm; 11.06 M parameters with two views),
which sees the volume beside both X-rays, each spread along its rays over the volume's grid (the
framework's back-projection; for a parallel beam this is X2CT-GAN's replicate-and-permute); LSGAN,
weight 0.1, Adam 2e-4 with betas (0.5, 0.99)::

    [stages.losses.adversarial]
    weight = 0.1
    arch = "x2ctgan"
    condition = "xrays"
    betas = [0.5, 0.99]

``start_epoch`` belongs to the trainer's weight schedule (it never reaches this plugin), hence the
separate ``disc_start_epoch``; set it earlier than ``start_epoch`` to warm the critic up first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import backproject

OBJECTIVES = ("lsgan", "hinge")
ARCHS = ("patch", "x2ctgan")
CONDITIONS = ("none", "xrays")
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


class X2CTGANDiscriminator(nn.Module):
    """X2CT-GAN's 3D PatchGAN (``basic3d``): ``layers`` stride-2 4^3 convolutions, one stride-1, then the logits.

    Module names follow theirs (``model.N``), so their ``NN_net_D.pth`` state dicts load.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(in_channels, channels, 4, 2, 2), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            mods += [nn.Conv3d(channels * prev, channels * mult, 4, 2 if n < layers else 1, 2, bias=False),
                     nn.InstanceNorm3d(channels * mult, affine=False, track_running_stats=True),
                     nn.LeakyReLU(0.2, inplace=True)]
        mods.append(nn.Conv3d(channels * mult, 1, 4, 1, 2))
        self.model = nn.Sequential(*mods)
        for m in self.modules():  # X2CT-GAN's init: N(0, 0.02), biases 0
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.model(volume)


class AdversarialLoss(nn.Module):
    """Generator-side adversarial term with a trainable 3D PatchGAN critic (see the module docstring).

    Options: ``objective`` "lsgan" or "hinge"; discriminator ``channels`` (0: 32, or 64 for "x2ctgan"), ``layers``,
    ``spectral_norm``, ``norm`` ("instance" or "none"); its ``optimizer`` ("adam"/"adamw"), ``lr``,
    ``betas``, ``weight_decay``; ``update_every`` N generator steps; ``disc_start_epoch``; ``arch``
    ("patch" or "x2ctgan", X2CT-GAN's critic: ``channels``/``layers``/``norm``/``spectral_norm`` then
    follow theirs unless set); ``condition`` ("none" or "xrays": the critic also sees the batch's
    X-rays spread along their rays, ``views`` of them).
    """

    def __init__(self, objective: str = "lsgan", channels: int = 0, layers: int = 3, spectral_norm: bool = True,
                 norm: str = "instance", optimizer: str = "adam", lr: float = 2e-4,
                 betas: list[float] = (0.5, 0.999), weight_decay: float = 0.0, update_every: int = 1,
                 disc_start_epoch: int = 0, arch: str = "patch", condition: str = "none",
                 views: list[float] = (0.0, 90.0)):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(map(repr, ARCHS))}, got {arch!r}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(map(repr, CONDITIONS))}, got {condition!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}")
        for key, value, low in (("channels", channels, 0), ("layers", layers, 1), ("update_every", update_every, 1),
                                ("disc_start_epoch", disc_start_epoch, 0)):
            check_int(key, value, low)
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
        self.condition = condition
        self.cond_views = len(views) if condition == "xrays" else 0
        if arch == "x2ctgan":
            self.discriminator = X2CTGANDiscriminator(1 + self.cond_views, channels or 64, layers)
        else:
            self.discriminator = PatchDiscriminator3D(1 + self.cond_views, channels or 32, layers, spectral_norm, norm)

    def critic_input(self, volume: torch.Tensor, batch: dict) -> torch.Tensor:
        """The volume, after the X-rays spread over its grid when the critic is conditional (X2CT-GAN's order)."""
        if self.condition == "none":
            return volume
        xrays = batch.get("xrays") if isinstance(batch, dict) else None
        if xrays is None or "geometry" not in batch:
            raise ValueError("adversarial: condition = \"xrays\" needs the batch's xrays and geometry")
        b, v = xrays.shape[:2]
        expected = self.cond_views
        if v != expected:
            raise ValueError(f"adversarial: the conditional critic was built for {expected} views (data.views), "
                             f"the batch holds {v}")
        with torch.autocast(volume.device.type, enabled=False):
            spread = backproject(xrays.float(), batch["geometry"], tuple(volume.shape[2:]))  # [B, V, 1, D, H, W]
        cond = spread.reshape(b, v, *volume.shape[2:]).to(volume.dtype).detach()
        return torch.cat([cond, volume], 1)

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
        d_real = self.discriminator(self.critic_input(target, batch))
        d_fake = self.discriminator(self.critic_input(pred_detached.detach(), batch))
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
            logits = self.discriminator(self.critic_input(pred, batch))
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        if self.objective == "lsgan":
            return ((logits - 1) ** 2).mean()
        return -logits.mean()


@hookimpl
def register_losses(register):
    register("adversarial", AdversarialLoss)

"""The generative-model contract: a model that owns its training objective and draws samples.

A model plugin is *generative* when it defines both

- ``training_loss(xrays, geometry, ct, prev=None) -> (loss, terms)``: the scalar it is trained on and a
  dict of detached scalars logged as ``train/<term>``. ``terms`` may also hold the model's one-step
  estimate of the clean volume under :data:`ESTIMATE` (``[B, 1, R, R, R]``, with gradient): the trainer
  then adds the stage's recipe losses (``[stages.losses]``) on that estimate, and adversarial critics
  see it. A model that returns no estimate is trained on its own loss alone.
- ``sample(xrays, geometry, prev=None, steps=None, generator=None) -> [B, 1, R, R, R]``: one sample per
  case; ``generator`` is one ``torch.Generator`` for the batch or a list of one per case (what
  :func:`case_generators` makes), ``steps`` the number of sampler steps (``None``: the model's own).

``forward(xrays, geometry, prev=None)`` stays what every other part of the framework calls (validation,
``x2ct evaluate``, ``x2ct predict``, the cascade): for a generative model it returns a seeded sample (or the
mean of a few), deterministic for a given case whatever else is in its batch. Everything else (EMA,
checkpoints, exact resume, export) treats a generative model as any other ``nn.Module``.

The regression path is unchanged: a model without ``training_loss`` is trained on the recipe's losses of
its ``forward`` output, plus, when it defines ``auxiliary_losses() -> {name: scalar}``, the terms its last
training forward pass produced (weighted as the model means them; a codebook's commitment loss, a
mixture's balance term): the trainer adds their sum to the total it back-propagates (so gradient
accumulation, loss scaling and DDP treat them as every other term) and logs each as ``train/<name>``;
:func:`model_terms` takes them (and clears them) after each forward pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn as nn

ESTIMATE = "clean_estimate"  # the key of the one-step clean estimate in ``training_loss``'s terms


def is_generative(model: nn.Module) -> bool:
    """Whether ``model`` (or the stage model inside a cascade wrapper) owns its objective and samples."""
    inner = stage_model(model)
    return callable(getattr(inner, "training_loss", None)) and callable(getattr(inner, "sample", None))


def model_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weighted scalar terms ``model`` (or the stage model inside a cascade wrapper) adds to its objective
    for the forward pass just run (``auxiliary_losses()``; {} when it defines none)."""
    take = getattr(stage_model(model), "auxiliary_losses", None)
    terms = take() if callable(take) else None
    if not terms:
        return {}
    if not isinstance(terms, dict) or not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in terms.values()):
        raise TypeError(f"{type(stage_model(model)).__name__}.auxiliary_losses() must return a dict of scalar tensors, "
                        f"got {terms!r}")
    return terms


def stage_model(model: nn.Module) -> nn.Module:
    """The stage's own model: ``model`` itself, or the one inside ``training.cascade.CascadeModel``."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "previous") else model


def case_seed(xrays: torch.Tensor, geometry: dict, seed: int = 0, index: int = 0) -> int:
    """A 63-bit seed from one case's X-rays ``[V, 1, H, W]`` and view angles, a base ``seed`` and a sample
    ``index``: the same case gets the same noise whatever else is in its batch, on any device."""
    h = hashlib.blake2b(digest_size=8)
    h.update(xrays.detach().float().cpu().contiguous().numpy().tobytes())
    angles = geometry.get("angles") if isinstance(geometry, dict) else None
    if isinstance(angles, torch.Tensor):
        h.update(angles.detach().double().cpu().contiguous().numpy().tobytes())
    h.update(f"{int(seed)}/{int(index)}".encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def case_generators(xrays: torch.Tensor, geometry: dict, seed: int = 0, index: int = 0) -> list[torch.Generator]:
    """One CPU generator per case of ``xrays [B, V, 1, H, W]`` (``geometry["angles"] [B, V]``), seeded by
    :func:`case_seed`: sample ``index`` of a case is reproducible on every machine."""
    angles = geometry["angles"]
    return [torch.Generator().manual_seed(case_seed(xrays[i], {"angles": angles[i]}, seed, index))
            for i in range(xrays.shape[0])]


def noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
          device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (``[B, ...]``) from one generator, one per case, or the global RNG."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per case: got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
                       ).to(device)


def draw_samples(model: nn.Module, xrays: torch.Tensor, geometry: dict, count: int, *, seed: int = 0,
                 steps: int | None = None, prev: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """``count`` samples ``[B, 1, R, R, R]`` of a generative ``model`` (a cascade wrapper included: its
    frozen earlier stages give ``prev`` once), sample k of each case seeded by ``case_generators(..., k)``."""
    inner = stage_model(model)
    if prev is None and inner is not model:
        prev = model.previous(xrays, geometry)
    for k in range(count):
        yield inner.sample(xrays, geometry, prev=prev, steps=steps,
                           generator=case_generators(xrays, geometry, seed, k))


class SampleStats:
    """Running per-voxel mean and standard deviation of samples (Welford; float64 sums on the device)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def std(self) -> torch.Tensor:
        """The sample standard deviation (``n - 1`` in the denominator; 0 for one sample)."""
        if self.n < 2:
            return torch.zeros_like(self.mean)
        return (self.m2 / (self.n - 1)).sqrt()

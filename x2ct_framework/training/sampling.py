"""The order of the data: a per-epoch shuffle that depends only on (seed, epoch), and the RNG states.

Exact resume rests on these: epoch ``e`` of a stage sees the same batches (and data-loader workers
the same seeds) whether or not the run was interrupted, and a checkpoint stores every process's
Python, NumPy, torch (and CUDA) RNG states.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler

from x2ct_framework.config.build import loader_options


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffle and of its data-loader workers."""
    return seed * 1_000_003 + epoch


class EpochSampler(Sampler[int]):
    """A shuffle whose order depends only on (seed, epoch), so a resumed run sees the same batches.

    ``limit`` keeps the first cases of each epoch's order (``train.max_steps_per_epoch``).
    """

    def __init__(self, size: int, seed: int, limit: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self.limit = min(limit, size) if limit else size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g)[: self.limit].tolist())

    def __len__(self) -> int:
        return self.limit


class StageData:
    """A stage's training and validation loaders; the training order follows (seed, epoch)."""

    def __init__(self, train_set: Dataset, val_set: Dataset, *, batch_size: int, num_workers: int, seed: int,
                 limit: int = 0, render_on_batch: bool = True):
        self.train_set, self.val_set, self.seed = train_set, val_set, seed
        # A dataset that can leave its X-ray rendering (a spectral preset, style randomisation) to the batch does
        # so when ``render_on_batch``: the loader workers only read cached line integrals and the batch's device
        # makes the images (the trainer asks for it on an accelerator, or without loader workers).
        self.finish = None
        if render_on_batch and hasattr(train_set, "render_on_batch") and callable(getattr(train_set, "finish_batch",
                                                                                           None)):
            train_set.render_on_batch = True
            self.finish = train_set.finish_batch
        self.sampler = EpochSampler(len(train_set), seed, limit=limit)
        self.worker_generator = torch.Generator()  # reseeded each epoch: worker seeds follow (seed, epoch) too
        self.train = DataLoader(train_set, batch_size=batch_size, sampler=self.sampler, **loader_options(num_workers),
                                generator=self.worker_generator)
        self.val = DataLoader(val_set, batch_size=batch_size, shuffle=False, **loader_options(num_workers))

    def epoch(self, acc: Accelerator, epoch: int, skip: int = 0):
        """The batches of ``epoch``, without its first ``skip`` (already trained before an interruption)."""
        self.train.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        set_epoch = getattr(self.train_set, "set_epoch", None)
        if callable(set_epoch):  # augmentation drawn from (seed, epoch, item)
            set_epoch(epoch)
        self.worker_generator.manual_seed(epoch_seed(self.seed, epoch))
        batches = acc.skip_first_batches(self.train, skip) if skip else self.train
        return batches if self.finish is None else map(self.finish, batches)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

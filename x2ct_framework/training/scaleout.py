"""Which of Accelerate's distributed modes the trainer supports end to end.

Single process, DDP on GPUs (MULTI_GPU) and DDP on CPUs over gloo (MULTI_CPU) are supported and tested:
checkpoints, exact resume, EMA and the non-finite guard. FSDP and DeepSpeed are refused at start: the
framework's checkpoints keep only rank 0's optimizer shard under FSDP1, FSDP2's parameters are not
saved by its writer, and DeepSpeed applies the update inside ``backward``, past the guard that skips
non-finite updates.
"""

from __future__ import annotations

from x2ct_framework.errors import X2CTError

UNSUPPORTED = {
    "FSDP": "its sharded optimizer state is not saved by the framework's checkpoints (only rank 0's shard), "
            "so --resume would continue with a wrong optimizer",
    "DEEPSPEED": "DeepSpeed applies the optimizer update inside backward, past the trainer's guard that skips "
                 "non-finite updates, and its optimizer state is not in the framework's checkpoints",
    "MEGATRON_LM": "Megatron-LM's model and optimizer sharding are not saved by the framework's checkpoints",
}


class UnsupportedDistribution(X2CTError):
    """The accelerate configuration chose a distributed mode the trainer does not support (exit status 2)."""


def check_distributed(accelerator) -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM before anything trains, saying why and what works."""
    dist = getattr(accelerator, "distributed_type", None)
    kind = getattr(dist, "name", str(dist))
    if kind in UNSUPPORTED:
        raise UnsupportedDistribution(
            f"accelerate is configured for {kind}, which this trainer does not support: {UNSUPPORTED[kind]}. "
            f"Use DDP (accelerate launch --multi_gpu ...; see docs/training.md, 'Scaling out'), or a single process.")

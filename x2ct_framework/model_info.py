"""Size and cost of a model at a stage: parameters, tokens, forward FLOPs and activation memory per sample.

FLOPs and activations are estimated by running one forward pass of batch 1 on fake tensors (shapes
only, no arithmetic and no memory), so a 256^3 stage is described in about a second:
FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and
attention; element-wise work is not counted) and activation memory is the size of the tensors the
forward pass saves for the backward pass, without and with the model's gradient checkpointing (then
the tensors kept between the checkpointed units plus the largest unit's own, which its backward
rebuilds; a model names those units with ``checkpointed_modules()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention kernels (absent from torch's table)."""
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return FlopCounterMode(display=display, custom_mapping=mapping)


@dataclass
class ModelInfo:
    parameters: int
    trainable: int
    tokens: int | None  # G^3 for token-grid models, else None
    token_grid: int | None
    forward_flops: float | None  # per sample
    activation_bytes: int | None  # saved for backward, per sample, without checkpointing
    activation_bytes_checkpointed: int | None  # the same with the model's gradient checkpointing on
    note: str = ""

    def describe(self) -> str:
        parts = [f"{self.parameters / 1e6:.2f} M params"]
        if self.trainable != self.parameters:
            parts[0] += f" ({self.trainable / 1e6:.2f} M trainable)"
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens ({self.token_grid}^3)")
        if self.forward_flops is not None:
            parts.append(f"{_flops(self.forward_flops)} forward")
        if self.activation_bytes is not None:
            act = f"{_mib(self.activation_bytes)} activations"
            if self.activation_bytes_checkpointed is not None:
                act += f" ({_mib(self.activation_bytes_checkpointed)} with gradient checkpointing)"
            parts.append(act)
        text = ", ".join(parts)
        if self.forward_flops is not None:
            text += " per sample"
        return text + (f"; {self.note}" if self.note else "")


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _saved_bytes(model: nn.Module, state: dict, args: tuple) -> tuple[int, int]:
    """Bytes of the distinct tensors one forward pass saves for backward (parameters and buffers excluded),
    and the largest share of them saved inside one of ``model.checkpointed_modules()``."""
    own = {t.untyped_storage()._cdata for t in state.values()}
    seen: dict[int, int] = {}
    segments: dict[int, dict[int, int]] = {}
    current: list[int] = []

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in own:
            seen[key] = t.untyped_storage().nbytes()
            if current:
                segments.setdefault(current[-1], {})[key] = seen[key]
        return t

    handles = []
    units = model.checkpointed_modules() if callable(getattr(model, "checkpointed_modules", None)) else []
    def enter(i: int):
        def hook(module, args):
            current.append(i)
        return hook

    def leave(module, args, output):
        current.pop()

    for i, unit in enumerate(units):
        handles += [unit.register_forward_pre_hook(enter(i)), unit.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(model, state, args)
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values()), max((sum(s.values()) for s in segments.values()), default=0)


def model_info(model: nn.Module, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> ModelInfo:
    """Describe ``model`` for inputs shaped like ``xrays [B, V, 1, H, W]`` (per sample: the first case is used).

    The forward pass runs on fake tensors (``FakeTensorMode``: shapes and devices, no data), so it
    takes the same kernels as on the model's device, flash attention included, at no cost.
    """
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = getattr(model, "tokens", None)
    g = g if isinstance(g, int) and not isinstance(g, bool) else None
    info = ModelInfo(n_params, trainable, g**3 if g else None, g, None, None, None)
    was_training, flag = model.training, getattr(model, "gradient_checkpointing", None)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            state = {k: fake(v) for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
            args = (fake(xrays[:1]), {k: fake(v[:1] if isinstance(v, torch.Tensor) and v.ndim else v)
                                      for k, v in geometry.items()}, fake(prev[:1]) if prev is not None else None)
            model.train()
            counter = flop_counter()
            with torch.no_grad(), counter:
                functional_call(model, state, args)
            info.forward_flops = float(counter.get_total_flops())
            if isinstance(flag, bool):
                model.gradient_checkpointing = False
            info.activation_bytes, largest_unit = _saved_bytes(model, state, args)
            if isinstance(flag, bool):
                model.gradient_checkpointing = True
                # kept between checkpointed units, plus the largest unit rebuilt during its own backward
                info.activation_bytes_checkpointed = _saved_bytes(model, state, args)[0] + largest_unit
    except Exception as exc:  # a model whose forward pass needs real data cannot be estimated this way
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        info.note = f"FLOPs and memory not estimated ({type(exc).__name__}: {first_line})"
    finally:
        model.train(was_training)
        if isinstance(flag, bool):
            model.gradient_checkpointing = flag
    return info


def describe_for_sample(model: nn.Module, sample: dict) -> str:
    """One line for ``x2ct validate`` from one (unbatched) dataset item."""
    geometry = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in sample["geometry"].items()}
    return model_info(model, sample["xrays"][None], geometry).describe()


def step_flops(model: nn.Module, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None) -> float:
    """FLOPs of one training step (forward + backward of a mean loss) for these input shapes, on fake tensors.

    With the model's gradient checkpointing on, the recomputed forward passes are included.
    """
    was_training = model.training
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            state = {k: fake(v) for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
            args = (fake(xrays), {k: fake(v) for k, v in geometry.items()}, fake(prev))
            model.train()
            counter = flop_counter()
            with counter:
                functional_call(model, state, args).float().mean().backward()
            return float(counter.get_total_flops())
    finally:
        model.train(was_training)

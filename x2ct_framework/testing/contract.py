"""The contract bookkeeping of the kit: each check's pass or failure, one ContractError listing every failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch



class ContractError(AssertionError):
    """A component broke one or more contract checks; ``failures`` holds each as a sentence."""

    def __init__(self, what: str, failures: list[str]):
        self.what, self.failures = what, list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{what} broke {len(self.failures)} contract check(s):\n{lines}")


# ---- plugin registration ---------------------------------------------------------------------------


# ---- contract bookkeeping --------------------------------------------------------------------------
class _Fail(Exception):
    pass


def _expect(condition: Any, message: str) -> None:
    if not condition:
        raise _Fail(message)


class _Contract:
    def __init__(self, what: str):
        self.what = what
        self.passed: list[str] = []
        self.failed: list[str] = []

    @contextmanager
    def check(self, name: str) -> Iterator[None]:
        try:
            yield
        except _Fail as exc:
            self.failed.append(f"{name}: {exc}")
        except Exception as exc:  # the component raised: that is a failed check, with its message
            self.failed.append(f"{name}: raised {type(exc).__name__}: {exc}")
        else:
            self.passed.append(name)

    def ok(self, name: str) -> bool:
        return name in self.passed

    def finish(self) -> list[str]:
        if self.failed:
            raise ContractError(self.what, self.failed)
        return self.passed


def _describe(component: Any) -> str:
    return type(component).__name__ if not isinstance(component, type) else component.__name__


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _scalar(out: Any, what: str = "the loss") -> torch.Tensor:
    _expect(isinstance(out, torch.Tensor), f"{what} returned {type(out).__name__}, expected a torch.Tensor")
    _expect(out.ndim == 0, f"{what} returned shape {tuple(out.shape)}, expected a scalar (shape ())")
    _expect(out.is_floating_point(), f"{what} returned dtype {out.dtype}, expected a floating-point tensor")
    _expect(_finite(out), f"{what} returned {out.item()}, expected a finite value")
    return out


def _grad_ok(leaf: torch.Tensor, out: torch.Tensor, what: str = "pred") -> None:
    _expect(out.requires_grad, f"the result does not require grad: no gradient can flow to {what} "
                               f"(detached, computed under no_grad, or converted to a Python number?)")
    leaf.grad = None
    out.backward()
    _expect(leaf.grad is not None, f"no gradient reached {what}")
    _expect(_finite(leaf.grad), f"the gradient w.r.t. {what} has non-finite values")
    _expect(bool(leaf.grad.abs().sum() > 0), f"the gradient w.r.t. {what} is zero everywhere")


# ---- contracts -------------------------------------------------------------------------------------

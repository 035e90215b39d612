"""What components are told about the stage they are built for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One progressive stage: ``index`` is 1-based (stage1, stage2, ...)."""

    name: str
    index: int
    resolution: int
    options: dict = field(default_factory=dict, compare=False, hash=False)

"""One benchmark figure: samples for kvmpy and (where there is one) QEMU, and its target."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import Enum


class Better(Enum):
    LOWER = "lower"
    HIGHER = "higher"


@dataclass(frozen=True, slots=True)
class Target:
    """What kvmpy should reach: a ratio to QEMU's median, or an absolute bound on its own."""

    ratio: float | None = None  # kvmpy / QEMU, bounded in the metric's ``better`` direction
    absolute: float | None = None  # bound on kvmpy's own median, in the metric's unit

    def describe(self, better: Better, unit: str) -> str:
        sign = "≤" if better is Better.LOWER else "≥"
        if self.ratio is not None:
            return f"{sign} {self.ratio:g}× QEMU"
        return f"{sign} {self.absolute:g} {unit}"


@dataclass(slots=True)
class Metric:
    key: str
    title: str
    unit: str
    where: str  # "this machine (PVM)" or "lab (SVM, npt=on)" and so on
    better: Better = Better.LOWER
    kvmpy: list[float] = field(default_factory=list)
    qemu: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""

    @property
    def kvmpy_median(self) -> float | None:
        return statistics.median(self.kvmpy) if self.kvmpy else None

    @property
    def qemu_median(self) -> float | None:
        return statistics.median(self.qemu) if self.qemu else None

    @property
    def ratio(self) -> float | None:
        """kvmpy's median over QEMU's."""
        ours, theirs = self.kvmpy_median, self.qemu_median
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    def ratio_text(self) -> str:
        """kvmpy's median against QEMU's (or against the bound), in words."""
        ours = self.kvmpy_median
        if ours is None:
            return "not measured"
        text = f"kvmpy {ours:.3g} {self.unit}"
        if self.qemu_median is not None and self.ratio is not None:
            text += f" vs QEMU {self.qemu_median:.3g} {self.unit}, {self.ratio:.2f}×"
        return text

    def met(self) -> bool | None:
        """Whether the target is reached; None where there is no target or no figure."""
        if self.target is None:
            return None
        value: float | None
        bound: float | None
        if self.target.ratio is not None:
            value, bound = self.ratio, self.target.ratio
        else:
            value, bound = self.kvmpy_median, self.target.absolute
        if value is None or bound is None:
            return None
        return value <= bound if self.better is Better.LOWER else value >= bound


def per_unit(totals: list[float], baselines: list[float], count: int) -> list[float]:
    """Per-operation cost from paired runs with ``count`` operations and with none."""
    return [(total - base) / count for total, base in zip(totals, baselines, strict=True)]


__all__ = ["Better", "Metric", "Target", "per_unit"]

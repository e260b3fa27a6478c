"""Token buckets and rate limiters (Firecracker's model), as pure arithmetic on a given time.

A bucket holds up to ``size`` tokens and refills at ``size / refill_time_ms``
per millisecond; ``one_time_burst`` extra tokens are spent first and never
come back. A bandwidth bucket counts bytes, an operations bucket requests.
Nothing here reads a clock or sleeps: every call is given ``now`` (seconds,
monotonic), so the behaviour is exact and testable, and the device that uses
a limiter decides what waiting means (a timer on the event loop, never a spin).

A request larger than the whole bucket would never fit; it is let through
once the bucket is full and leaves it in debt, which later requests wait out
(Firecracker's "over-consumption"), so the long-run rate holds either way.
:meth:`TokenBucket.spend` charges a cost known only afterwards (a received
packet's length) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmpy.errors import ConfigError


@dataclass
class TokenBucket:
    """``size`` tokens refilled every ``refill_time_ms``, plus a one-time burst."""

    size: int
    refill_time_ms: int
    one_time_burst: int = 0
    #: Tokens available now (negative: debt left by a request larger than the bucket).
    budget: float = field(init=False)
    burst: int = field(init=False)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.refill_time_ms <= 0 or self.one_time_burst < 0:
            raise ConfigError(
                f"token bucket size {self.size}, refill_time {self.refill_time_ms} ms and one_time_burst"
                f" {self.one_time_burst}: size and refill_time must be positive, the burst not negative"
            )
        self.budget = float(self.size)
        self.burst = self.one_time_burst

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.size * 1000.0 / self.refill_time_ms

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self.budget = min(float(self.size), self.budget + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def wait(self, tokens: int, now: float) -> float:
        """Seconds until ``tokens`` can be taken (0.0: now)."""
        self._refill(now)
        needed = min(tokens, self.size) - self.burst  # a request past the size waits for a full bucket
        if needed <= self.budget:
            return 0.0
        return (needed - self.budget) / self.rate

    def available(self, now: float) -> float:
        """Tokens that can be taken now, the one-time burst included (negative: debt)."""
        self._refill(now)
        return self.budget + self.burst

    def take(self, tokens: int, now: float) -> bool:
        """Take ``tokens`` if :meth:`wait` says they are there; False (nothing taken) if not."""
        if self.wait(tokens, now) > 0.0:
            return False
        self.spend(tokens, now)
        return True

    def spend(self, tokens: int, now: float) -> None:
        """Take ``tokens`` whatever is there (the burst first): what is missing becomes debt."""
        self._refill(now)
        from_burst = min(self.burst, tokens)
        self.burst -= from_burst
        self.budget -= tokens - from_burst


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request spends: its bytes and one operation."""

    bytes: int
    ops: int = 1


class RateLimiter:
    """A bandwidth bucket and an operations bucket; a request needs both (either may be absent)."""

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None) -> None:
        self.bandwidth, self.ops = bandwidth, ops

    def _pairs(self, cost: Cost) -> list[tuple[TokenBucket, int]]:
        pairs = [(self.bandwidth, cost.bytes), (self.ops, cost.ops)]
        return [(bucket, tokens) for bucket, tokens in pairs if bucket is not None and tokens > 0]

    def wait(self, cost: Cost, now: float) -> float:
        """Seconds until ``cost`` can be spent (0.0: now)."""
        return max((bucket.wait(tokens, now) for bucket, tokens in self._pairs(cost)), default=0.0)

    def take(self, cost: Cost, now: float) -> bool:
        """Spend ``cost`` from both buckets, or from neither (False)."""
        if self.wait(cost, now) > 0.0:
            return False
        self.spend(cost, now)
        return True

    def spend(self, cost: Cost, now: float) -> None:
        """Spend ``cost`` from both buckets whatever they hold (see :meth:`TokenBucket.spend`)."""
        for bucket, tokens in self._pairs(cost):
            bucket.spend(tokens, now)


def retry_delay(seconds: float) -> float:
    """A timer delay for ``seconds`` of waiting: at least 1 ms, so a retry never spins."""
    return max(seconds, 0.001)


__all__ = ["Cost", "RateLimiter", "TokenBucket", "retry_delay"]

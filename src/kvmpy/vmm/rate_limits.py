"""Rate limiters from the configuration (Firecracker's ``rate_limiter`` objects) for the devices."""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.virtio.throttle import Throttle
from kvmpy.virtio.token_bucket import RateLimiter, TokenBucket
from kvmpy.vmm.config import RateLimiterConfig, TokenBucketConfig
from kvmpy.vmm.timerfd import TimerFd


def _bucket(config: TokenBucketConfig | None) -> TokenBucket | None:
    if config is None:
        return None
    return TokenBucket(config.size, config.refill_time_ms, config.one_time_burst)


def throttle_for(
    config: RateLimiterConfig | None, watch: Callable[[int, Callable[[], None]], None]
) -> Throttle | None:
    """A throttle whose retries run on the event loop ``watch`` registers with; None: no limit."""
    if config is None or (config.bandwidth is None and config.ops is None):
        return None
    limiter = RateLimiter(_bucket(config.bandwidth), _bucket(config.ops))
    timer = TimerFd(watch)
    return Throttle(limiter, timer.schedule, close=timer.close)


__all__ = ["throttle_for"]

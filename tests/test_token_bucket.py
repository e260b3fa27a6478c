"""Token buckets and rate limiters: the long-run rate holds, waits are exact, nothing spins."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import ConfigError
from kvmpy.virtio.token_bucket import Cost, RateLimiter, TokenBucket, retry_delay

sizes = st.integers(1, 10_000)
refills = st.integers(1, 5_000)
bursts = st.integers(0, 10_000)
#: (seconds since the previous request, tokens asked)
requests = st.lists(st.tuples(st.floats(0, 2, allow_nan=False), st.integers(0, 20_000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(size=sizes, refill=refills, burst=bursts, steps=requests)
def test_never_more_than_the_bucket_the_burst_and_the_refill(
    size: int, refill: int, burst: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(size, refill, burst)
    now = granted = largest = 0.0
    for gap, tokens in steps:
        now += gap
        if bucket.take(tokens, now):
            granted += tokens
            largest = max(largest, tokens)
        assert bucket.budget <= size
    allowance = size + burst + bucket.rate * now + max(0.0, largest - size)
    assert granted <= allowance * (1 + 1e-9) + 1e-6


@settings(max_examples=300, deadline=None)
@given(size=sizes, refill=refills, burst=bursts, steps=requests)
def test_waiting_what_wait_says_is_enough(
    size: int, refill: int, burst: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(size, refill, burst)
    now = 0.0
    for gap, tokens in steps:
        now += gap
        delay = bucket.wait(tokens, now)
        assert delay >= 0.0
        if delay == 0.0:
            assert bucket.take(tokens, now)
        else:
            assert not bucket.take(tokens, now)  # refused: nothing taken
            now += delay * (1 + 1e-9) + 1e-9
            assert bucket.take(tokens, now)


def test_burst_first_then_the_rate() -> None:
    bucket = TokenBucket(size=100, refill_time_ms=1000, one_time_burst=50)
    assert bucket.take(150, 0.0)  # bucket and burst
    assert not bucket.take(1, 0.0)
    assert bucket.wait(10, 0.0) == pytest.approx(0.1)
    assert bucket.take(10, 0.1)
    assert bucket.burst == 0  # the burst never comes back
    assert bucket.take(100, 10.0) and not bucket.take(1, 10.0)


def test_a_request_larger_than_the_bucket_waits_for_a_full_one_and_leaves_debt() -> None:
    bucket = TokenBucket(size=100, refill_time_ms=1000)
    assert bucket.take(10, 0.0)
    assert bucket.wait(250, 0.0) == pytest.approx(0.1)  # until full
    assert bucket.take(250, 0.1)
    assert bucket.wait(1, 0.1) == pytest.approx(1.51)  # 150 of debt and one token


def test_a_limiter_spends_both_buckets_or_neither() -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(1000, 1000), ops=TokenBucket(2, 1000))
    assert limiter.take(Cost(400), 0.0) and limiter.take(Cost(400), 0.0)
    assert not limiter.take(Cost(100), 0.0)  # out of operations: no bytes spent either
    assert limiter.bandwidth is not None and limiter.bandwidth.budget == pytest.approx(200)
    assert limiter.wait(Cost(100), 0.0) == pytest.approx(0.5)
    assert RateLimiter().take(Cost(1 << 40), 0.0)  # no buckets: no limit


def test_spending_after_the_fact_leaves_debt_that_later_requests_wait_out() -> None:
    limiter = RateLimiter(bandwidth=TokenBucket(1000, 1000))
    assert limiter.wait(Cost(1), 0.0) == 0.0
    limiter.spend(Cost(3000), 0.0)  # a received packet's length, known once it arrived
    assert limiter.wait(Cost(1), 0.0) == pytest.approx(2.001)
    assert limiter.wait(Cost(1), 2.5) == 0.0


def test_bad_bucket_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="size and refill_time must be positive"):
        TokenBucket(0, 100)
    with pytest.raises(ConfigError):
        TokenBucket(10, 0)


def test_retry_delays_never_spin() -> None:
    assert retry_delay(0.0) == 0.001 and retry_delay(2.5) == 2.5

"""The one rate limiter for guest-triggered log lines."""

from __future__ import annotations

import logging

import pytest

from kvmpy.ratelimit import MAX_KEYS, RateLimitedLog


def test_burst_then_one_line_per_period_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = RateLimitedLog(burst=2, period=10.0, clock=lambda: now[0])
    log = logging.getLogger("kvmpy.test")
    with caplog.at_level(logging.WARNING, logger="kvmpy.test"):
        results = [limiter.warning(log, "dev", "bad ring %d", i) for i in range(100)]
        assert results[:2] == [True, True] and not any(results[2:])
        now[0] = 10.5
        assert limiter.warning(log, "dev", "bad ring %d", 100)
        assert limiter.warning(log, "other", "another key logs on its own budget")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:2] == ["bad ring 0", "bad ring 1"]
    assert messages[2] == "bad ring 100 (98 more like it suppressed)"
    assert len(messages) == 4


def test_a_guest_cannot_grow_the_key_table_without_bound() -> None:
    limiter = RateLimitedLog(burst=1, period=1e9, clock=lambda: 0.0)
    log = logging.getLogger("kvmpy.test")
    logged = sum(limiter.warning(log, ("port", n), "unclaimed") for n in range(MAX_KEYS * 4))
    assert logged == MAX_KEYS + 1  # the overflow shares one key

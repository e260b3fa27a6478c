"""Rate-limited devices: a throttled queue waits for a timer on the event loop, never spins."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio.devices import blk
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.throttle import Throttle
from kvmpy.virtio.token_bucket import RateLimiter, TokenBucket
from kvmpy.vmm.config import RateLimiterConfig, TokenBucketConfig

RAM = 1 << 22
HEADER, STATUS, DATA = 0x3E000, 0x3F000, 0x100000


class FakeTime:
    """A clock the test moves, and a scheduler that records instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.scheduled: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self.scheduled.append((delay, callback))

    def fire(self) -> None:
        delay, callback = self.scheduled.pop(0)
        self.now += delay
        callback()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


def test_a_disk_over_its_ops_limit_waits_for_the_timer(mem: GuestMemory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 1024))
    time = FakeTime()
    throttle = Throttle(RateLimiter(ops=TokenBucket(2, 1000)), time.schedule, clock=time.clock)
    device = VirtioBlock(image, throttle=throttle)
    queue = SplitQueue(256)
    driver = MockDriver(mem, queue, 0x10000, size=16)
    device.activate(mem, [queue], device.features, lambda index: None)
    mem.write(HEADER, struct.pack("<IIQ", blk.T_IN, 0, 0))
    for i in range(4):
        status = Buffer(STATUS + i, 1, writable=True)
        driver.add([Buffer(HEADER, 16), Buffer(DATA + 512 * i, 512, writable=True), status])
    device.queue_notify(0)
    assert len(driver.used_entries()) == 2 and throttle.throttled == 1
    assert len(time.scheduled) == 1 and time.scheduled[0][0] == pytest.approx(0.5)
    for _ in range(10):
        device.queue_notify(0)  # the guest kicks again: nothing done, nothing scheduled again
    assert driver.used_entries() == [] and len(time.scheduled) == 1 and throttle.throttled == 1
    time.fire()  # half a second later: one more op
    assert len(driver.used_entries()) == 1 and len(time.scheduled) == 1
    time.fire()
    assert len(driver.used_entries()) == 1 and time.scheduled == []
    device.close()


def test_bandwidth_counts_bytes_moved(mem: GuestMemory) -> None:
    time = FakeTime()
    throttle = Throttle(RateLimiter(bandwidth=TokenBucket(4096, 1000)), time.schedule, clock=time.clock)
    device = VirtioRng(throttle=throttle)
    queue = SplitQueue(256)
    driver = MockDriver(mem, queue, 0x10000, size=16)
    device.activate(mem, [queue], device.features, lambda index: None)
    for i in range(3):
        driver.add([Buffer(DATA + 4096 * i, 4096, writable=True)])
    device.queue_notify(0)
    assert len(driver.used_entries()) == 1  # 4 KiB spent the bucket
    time.fire()  # a token back (1 ms): the next request goes and leaves the bucket 4 KiB in debt
    assert len(driver.used_entries()) == 1
    time.fire()  # the debt paid at 4 KiB/s
    assert time.now == pytest.approx(1.0, abs=0.01)
    assert len(driver.used_entries()) == 1 and time.scheduled == []
    assert device.bytes_served == 3 * 4096 and throttle.throttled == 2


def test_throttle_from_configuration_runs_its_retry_on_the_event_loop() -> None:
    from kvmpy.vmm.event_loop import EventLoop
    from kvmpy.vmm.rate_limits import throttle_for

    assert throttle_for(None, lambda fd, handler: None) is None
    assert throttle_for(RateLimiterConfig(), lambda fd, handler: None) is None
    loop = EventLoop()
    loop.start()
    try:
        config = RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time_ms=20))
        throttle = throttle_for(config, loop.add)
        assert throttle is not None
        assert not throttle.blocked(lambda: None)
        throttle.spend(0)
        retried = threading.Event()
        assert throttle.blocked(retried.set)
        assert retried.wait(2.0)  # the timerfd fired on the event loop thread
        assert not throttle.blocked(lambda: None)
        throttle.close()
    finally:
        loop.stop()


def test_network_limits_each_direction(mem: GuestMemory) -> None:
    from kvmpy.testing.fakes import SocketTap
    from kvmpy.virtio.devices.net import RX, TX, VirtioNet

    time = FakeTime()
    tx = Throttle(RateLimiter(ops=TokenBucket(1, 1000)), time.schedule, clock=time.clock)
    rx = Throttle(RateLimiter(ops=TokenBucket(1, 1000)), time.schedule, clock=time.clock)
    tap = SocketTap()
    watched: dict[int, Callable[[], None]] = {}
    device = VirtioNet(
        tap,  # type: ignore[arg-type]
        bytes(6),
        watch=watched.__setitem__,
        unwatch=lambda fd: watched.pop(fd, None),
        rx_throttle=rx,
        tx_throttle=tx,
    )
    rx_queue, tx_queue = SplitQueue(256), SplitQueue(256)
    rx_driver = MockDriver(mem, rx_queue, 0x10000, size=16)
    tx_driver = MockDriver(mem, tx_queue, 0x20000, size=16)
    device.activate(mem, [rx_queue, tx_queue], 0, lambda index: None)
    for i in range(2):
        tx_driver.add([Buffer(DATA + 256 * i, 60)])
        rx_driver.add([Buffer(DATA + 0x10000 + 2048 * i, 2048, writable=True)])
    device.queue_notify(TX)
    assert len(tx_driver.used_entries()) == 1 and tx.throttled == 1
    tap.host.send(b"\0" * 12 + b"one")
    tap.host.send(b"\0" * 12 + b"two")
    watched[tap.fd]()
    assert len(rx_driver.used_entries()) == 1 and rx.throttled == 1
    assert tap.fd not in watched  # throttled: the readable tap is not watched (no spinning)
    device.queue_notify(RX)  # a kick re-watches; the throttle still holds the packet back
    watched[tap.fd]()
    assert rx_driver.used_entries() == [] and tap.fd not in watched and rx.throttled == 1
    time.fire()
    time.fire()
    assert len(tx_driver.used_entries()) == 1
    watched[tap.fd]()
    assert len(rx_driver.used_entries()) == 1
    device.close()

"""virtio-rng (virtio 1.x, 5.4): the guest's /dev/hwrng, filled from the host's getrandom()."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_RNG, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.throttle import Throttle

#: Bytes handed out per request at most, so one request cannot make us read megabytes.
MAX_REQUEST = 64 * 1024


@dataclass(frozen=True, slots=True)
class RngState:
    """Nothing of its own: the ring is the transport's, the rate limiter restarts full."""


class VirtioRng:
    device_type = TYPE_RNG
    queue_sizes: tuple[int, ...] = (256,)
    features = COMMON_FEATURES

    def __init__(self, throttle: Throttle | None = None) -> None:
        self.guard = DeviceGuard()
        #: The rate limiter (bytes handed out, and requests); None: unlimited.
        self.throttle = throttle
        self._mem: GuestMemory | None = None
        self._queue: SplitQueue | None = None
        self._interrupt: Interrupt | None = None
        self.bytes_served = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)  # no configuration space

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    state_type = RngState

    def save(self) -> RngState:
        return RngState()

    def restore(self, state: RngState) -> None:
        pass

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self.guard.lock:
            self._mem, self._queue, self._interrupt = mem, queues[0], interrupt

    def reset(self) -> None:
        with self.guard.lock:
            self._mem = self._queue = self._interrupt = None

    def queue_notify(self, index: int) -> None:
        with self.guard.lock:
            self._serve()

    def close(self) -> None:
        if self.throttle is not None:
            self.throttle.close()

    def _throttled(self, queue: SplitQueue, mem: GuestMemory) -> bool:
        """Work waits and we are over the rate limit: the queue waits for the throttle's timer."""
        throttle = self.throttle
        return throttle is not None and queue.has_work(mem) and throttle.blocked(self._retry)

    def _retry(self) -> None:
        self.guard.run(self._serve)

    def _serve(self) -> None:
        mem, queue, interrupt = self._mem, self._queue, self._interrupt
        if mem is None or queue is None or interrupt is None:
            return
        served = False
        while not self._throttled(queue, mem) and (chain := queue.pop(mem)) is not None:
            written = 0
            for buffer in chain.writable:
                length = min(len(buffer), MAX_REQUEST - written)
                if length <= 0:
                    break
                _fill_random(buffer[:length])
                written += length
            self.bytes_served += written
            if self.throttle is not None:
                self.throttle.spend(written)
            queue.push(mem, chain.head, written)
            served = True
        if served and queue.needs_interrupt(mem):
            interrupt(0)


def _fill_random(buffer: memoryview) -> None:
    """Fill ``buffer`` from the kernel's random source. getrandom(2) returns fewer bytes than
    asked for when a signal interrupts a request of more than 256 bytes, so it is called until
    the buffer is full (a short result assigned to the whole buffer raised ValueError)."""
    filled = 0
    while filled < len(buffer):
        chunk = os.getrandom(len(buffer) - filled)
        buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


__all__ = ["VirtioRng"]

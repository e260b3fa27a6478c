"""virtio-console (virtio 1.x, 5.3): the guest's hvc0, the virtio twin of the 16550A.

One port, no multiport: receiveq (0) carries host input into buffers the
driver posts, transmitq (1) carries output. A whole write(2) from the guest
arrives as one chain, so where the UART costs an exit per byte this costs
one notification per batch (and none at all once ioeventfd has it).

Input that finds no posted buffer waits in a bounded buffer; the host side
is told how much was accepted and keeps the rest. Host input arrives on the
console input thread and goes through the device's guard: a broken receive
ring marks the device as needing reset instead of killing that thread.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.errors import GuestError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_CONSOLE, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue

RECEIVE, TRANSMIT = 0, 1
#: Host input held while the guest has no receive buffers posted.
PENDING_LIMIT = 64 * 1024


class VirtioConsole:
    device_type = TYPE_CONSOLE
    queue_sizes: tuple[int, ...] = (128, 128)
    features = COMMON_FEATURES

    def __init__(self, output: Callable[[memoryview], object]) -> None:
        self._output = output
        self.guard = DeviceGuard()
        self._lock = self.guard.lock
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        self._pending = bytearray()
        self.bytes_out = 0
        self.bytes_in = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)  # cols, rows, max_nr_ports, emerg_wr: none offered

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self._lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._fill_receive()  # input typed before the driver was ready

    def reset(self) -> None:
        with self._lock:
            self._mem, self._queues, self._interrupt = None, [], None

    def queue_notify(self, index: int) -> None:
        with self._lock:
            if index == TRANSMIT:
                self._drain_transmit()
            elif index == RECEIVE:
                self._fill_receive()

    def _drain_transmit(self) -> None:
        with self._lock:
            mem, interrupt = self._mem, self._interrupt
            if mem is None or interrupt is None:
                return
            queue = self._queues[TRANSMIT]
            sent = False
            while (chain := queue.pop(mem)) is not None:
                for buffer in chain.readable:
                    self._output(buffer)  # a view: the output copies what it keeps, no more
                    self.bytes_out += len(buffer)
                queue.push(mem, chain.head, 0)
                sent = True
            if sent and queue.needs_interrupt(mem):
                interrupt(TRANSMIT)

    def enqueue_input(self, data: bytes) -> int:
        """Host input for the guest (input thread); returns how many bytes were taken.

        The rest is for the caller to offer again later. A broken receive ring is the
        guest's error: the device is marked as needing reset, the thread goes on.
        """
        with self._lock:
            room = PENDING_LIMIT - len(self._pending)
            taken = data[: max(room, 0)]
            self._pending += taken
            self.guard.run(self._fill_receive)
        return len(taken)

    def _fill_receive(self) -> None:
        with self._lock:
            try:
                self._deliver_pending()
            except GuestError:
                # A broken receive ring: the device goes quiet (the transport marks it as
                # needing reset) instead of failing again at every keystroke.
                self._mem, self._queues, self._interrupt = None, [], None
                raise

    def _deliver_pending(self) -> None:
        with self._lock:
            mem, interrupt = self._mem, self._interrupt
            if mem is None or interrupt is None or not self._pending:
                return
            queue = self._queues[RECEIVE]
            delivered = False
            while self._pending and (chain := queue.pop(mem)) is not None:
                written = 0
                for buffer in chain.writable:
                    chunk = self._pending[: len(buffer)]
                    buffer[: len(chunk)] = chunk
                    del self._pending[: len(chunk)]
                    written += len(chunk)
                    if not self._pending:
                        break
                self.bytes_in += written
                queue.push(mem, chain.head, written)
                delivered = True
            if delivered and queue.needs_interrupt(mem):
                interrupt(RECEIVE)


__all__ = ["VirtioConsole"]

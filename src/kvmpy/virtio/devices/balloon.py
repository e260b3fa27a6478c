"""virtio-balloon (virtio 1.x, 5.5): guest memory handed back to the host, and taken again.

The host sets a target (``num_pages`` in the configuration space, 4 KiB pages); the
driver allocates that many pages inside the guest, so nothing there uses them, and
lists their frame numbers on the inflate queue. kvmpy then discards those pages of
guest RAM (``madvise``): the host frames are freed and the VMM's resident memory drops.
Lowering the target makes the driver take pages back through the deflate queue;
they refault as zeros on first touch, so deflating costs the host nothing until then.

Also: the statistics queue (the driver's memory figures, asked for every few seconds),
free page reporting (the driver lists free ranges of its own accord; they are
discarded the same way), and deflate on OOM (the driver may take pages back when
the guest runs out of memory, before the host lowers the target).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmpy.errors import GuestError
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmpy.virtio.device import COMMON_FEATURES, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue
from kvmpy.virtio.throttle import Schedule

TYPE_BALLOON = 5
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_REPORTING = 1 << 5
#: The balloon's page, whatever the guest's own page size (virtio 1.x, 5.5.6).
PAGE = 4096
QUEUE_SIZE = 256
#: Frame numbers one inflate or deflate request may carry (Linux sends at most 256): the bound
#: of what one request makes kvmpy read and do.
MAX_FRAMES = 4096
#: The statistics the driver may report, by tag (virtio 1.x, 5.5.6.3), in Firecracker's names.
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures",
}  # fmt: skip
_STAT = struct.Struct("<HQ")
INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"


@dataclass(frozen=True, slots=True)
class BalloonState:
    """The target and the driver's count of pages in the balloon; the statistics buffer the
    device held is returned at restore (the driver sends a fresh one)."""

    target_pages: int
    actual_pages: int


@dataclass(slots=True)
class BalloonCounters:
    inflated_pages: int = 0
    deflated_pages: int = 0
    reported_bytes: int = 0
    stats_updates: int = 0
    #: The driver's last statistics, by Firecracker's names.
    stats: dict[str, int] = field(default_factory=dict)


class VirtioBalloon:
    device_type = TYPE_BALLOON

    def __init__(
        self,
        target_pages: int,
        *,
        deflate_on_oom: bool = False,
        stats_interval: float = 0.0,
        reporting: bool = False,
        schedule: Schedule | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.guard = DeviceGuard()
        self._on_close = on_close
        self.features = COMMON_FEATURES | F_MUST_TELL_HOST
        if deflate_on_oom:
            self.features |= F_DEFLATE_ON_OOM
        if stats_interval > 0:
            if schedule is None:
                raise ValueError("balloon statistics need a timer")
            self.features |= F_STATS_VQ
        if reporting:
            self.features |= F_REPORTING
        #: inflate, deflate, and room for the statistics and reporting queues (which of them
        #: the driver has depends on the features it takes: see :meth:`activate`).
        self.queue_sizes: tuple[int, ...] = (QUEUE_SIZE,) * 4
        self.target_pages = target_pages
        self.actual_pages = 0
        self.stats_interval = stats_interval
        self._schedule = schedule
        self.counters = BalloonCounters()
        self._mem: GuestMemory | None = None
        self._interrupt: Interrupt | None = None
        self._acked = 0
        #: Queue index -> what it carries, for the features the driver acknowledged.
        self._roles: dict[int, str] = {}
        self._queues: list[SplitQueue] = []
        #: The statistics chain kvmpy holds until it wants the next figures (its head).
        self._stats_head: int | None = None
        self._stats_timer = False

    # --- configuration space: num_pages (the target) and actual (the driver's count) -------------
    def read_config(self, offset: int, size: int) -> bytes:
        with self.guard.lock:
            config = struct.pack("<IIII", self.target_pages, self.actual_pages, 0, 0)
        return config[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:  # actual: the driver says how many pages it holds
            with self.guard.lock:
                self.actual_pages = int.from_bytes(data, "little")

    def set_target(self, pages: int) -> None:
        """The host's new target (the transport then raises a configuration change, which
        makes the driver read it)."""
        with self.guard.lock:
            self.target_pages = pages

    def metrics(self) -> dict[str, int]:
        """For the metrics registry: the target and the balloon's size in pages, what went
        through it, and the driver's last statistics."""
        with self.guard.lock:
            counters = self.counters
            return {
                "target_pages": self.target_pages, "actual_pages": self.actual_pages,
                "inflated_pages": counters.inflated_pages, "deflated_pages": counters.deflated_pages,
                "reported_bytes": counters.reported_bytes, "stats_updates": counters.stats_updates,
                **{f"guest_{name}": value for name, value in counters.stats.items()},
            }  # fmt: skip

    def statistics(self) -> dict[str, int]:
        """GET /balloon/statistics (Firecracker's fields): the target and the balloon's size,
        in pages and MiB, and the driver's last figures."""
        with self.guard.lock:
            target, actual = self.target_pages, self.actual_pages
            stats = dict(self.counters.stats)
        pages_per_mib = (1 << 20) // PAGE
        return {
            "target_pages": target, "actual_pages": actual,
            "target_mib": target // pages_per_mib, "actual_mib": actual // pages_per_mib, **stats,
        }  # fmt: skip

    # --- state ----------------------------------------------------------------------------
    state_type = BalloonState

    def save(self) -> BalloonState:
        with self.guard.lock:
            return BalloonState(self.target_pages, self.actual_pages)

    def restore(self, state: BalloonState) -> None:
        if not (0 <= state.target_pages < 1 << 32 and 0 <= state.actual_pages < 1 << 32):
            raise ValueError("saved balloon page counts are not 32-bit values")
        with self.guard.lock:
            self.target_pages, self.actual_pages = state.target_pages, state.actual_pages

    # --- the VirtioDevice interface -------------------------------------------------------------
    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt, self._acked = mem, queues, interrupt, acked_features
            roles = [INFLATE, DEFLATE]
            if acked_features & F_STATS_VQ:
                roles.append(STATS)
            if acked_features & F_REPORTING:
                roles.append(REPORTING)
            self._roles = dict(enumerate(roles))
            self._stats_head = None
            if STATS in roles:  # Linux adds its first figures before DRIVER_OK: take them now
                self._take_stats(queues[roles.index(STATS)], mem)

    def reset(self) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt, self._roles = None, [], None, {}
            self._stats_head = None
            self.actual_pages = 0  # a new driver starts with an empty balloon

    def close(self) -> None:
        if self._on_close is not None:  # the statistics timer
            self._on_close()

    def queue_notify(self, index: int) -> None:
        with self.guard.lock:
            mem, interrupt = self._mem, self._interrupt
            role = self._roles.get(index)
            if mem is None or interrupt is None or role is None:
                return
            queue = self._queues[index]
            if role == STATS:
                self._take_stats(queue, mem)
                return
            handle = {INFLATE: self._inflate, DEFLATE: self._deflate, REPORTING: self._report}[role]
            done = 0
            while (chain := queue.pop(mem)) is not None:
                handle(mem, chain)
                queue.push(mem, chain.head, 0)
                done += 1
            if done and queue.needs_interrupt(mem):
                interrupt(index)

    # --- inflate, deflate, report ---------------------------------------------------------------
    def _inflate(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        frames = _frames(chain)
        for first, count in _runs(frames):  # one madvise per run of neighbouring pages
            _discard(mem, first * PAGE, count * PAGE)
        self.counters.inflated_pages += len(frames)

    def _deflate(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        """Nothing to do: a page given back refaults (as zeros) when the guest touches it."""
        self.counters.deflated_pages += len(_frames(chain))

    def _report(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        """Free page reporting: each buffer *is* a free range of the guest's; discard it."""
        for buffer in chain.writable:
            address = mem.gpa_of_view(buffer)
            start, end = -(-address // PAGE) * PAGE, (address + len(buffer)) // PAGE * PAGE
            if end > start:
                _discard(mem, start, end - start)
                self.counters.reported_bytes += end - start

    # --- statistics -----------------------------------------------------------------------------
    def _take_stats(self, queue: SplitQueue, mem: GuestMemory) -> None:
        """The driver sent its figures: keep them, and the buffer until the next interval."""
        chain = queue.pop(mem)
        if chain is None:
            return
        data = b"".join(bytes(part) for part in chain.readable)[: _STAT.size * len(STAT_NAMES) * 2]
        for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
            tag, value = _STAT.unpack_from(data, offset)
            if tag in STAT_NAMES:
                self.counters.stats[STAT_NAMES[tag]] = value
        self.counters.stats_updates += 1
        self._stats_head = chain.head
        if not self._stats_timer and self._schedule is not None:
            self._stats_timer = True
            self._schedule(self.stats_interval, self._ask_for_stats)

    def _ask_for_stats(self) -> None:
        """The interval is over: give the driver its buffer back, which it refills."""
        self.guard.run(self._return_stats_buffer)

    def _return_stats_buffer(self) -> None:
        self._stats_timer = False
        mem, interrupt, head = self._mem, self._interrupt, self._stats_head
        index = next((i for i, role in self._roles.items() if role == STATS), None)
        if mem is None or interrupt is None or head is None or index is None:
            return
        self._stats_head = None
        queue = self._queues[index]
        queue.push(mem, head, 0)
        if queue.needs_interrupt(mem):
            interrupt(index)


def _frames(chain: DescriptorChain) -> list[int]:
    """The chain's le32 frame numbers (at most :data:`MAX_FRAMES`: a guest error beyond)."""
    if chain.readable_length > 4 * MAX_FRAMES:
        raise GuestError(f"balloon request of {chain.readable_length} bytes (at most {4 * MAX_FRAMES})")
    data = b"".join(bytes(part) for part in chain.readable)
    return list(struct.unpack_from(f"<{len(data) // 4}I", data))


def _runs(frames: list[int]) -> list[tuple[int, int]]:
    """(first frame, count) of each run of consecutive frames, in order (a driver hands its
    pages over mostly in runs; each run is one system call)."""
    runs: list[tuple[int, int]] = []
    for frame in sorted(set(frames)):
        if runs and runs[-1][0] + runs[-1][1] == frame:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((frame, 1))
    return runs


def _discard(mem: GuestMemory, gpa: int, size: int) -> None:
    try:
        mem.discard(gpa, size)
    except GuestMemoryError as error:
        raise GuestError(f"balloon: {error}") from None


__all__ = ["BalloonState", "TYPE_BALLOON", "VirtioBalloon"]

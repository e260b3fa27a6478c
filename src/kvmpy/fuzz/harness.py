"""What every fuzz target shares: decoding the fuzzer's bytes, the crash rules, the budgets.

The crash rules, the same for every target:

- an exception a target does not document (anything but the errors its
  parser promises, such as :class:`~kvmpy.errors.GuestError` for guest
  input or :class:`~kvmpy.errors.ConfigError` for a kernel file) is a crash;
- a broken invariant is a crash (:class:`InvariantViolation`);
- an input that costs more than :data:`CPU_SECONDS_PER_INPUT` of CPU, or
  raises the process's peak RSS by more than :data:`RSS_GROWTH_PER_INPUT`,
  is a crash: a guest that can make the VMM spin or allocate without bound
  has found a denial of service (the engine adds libFuzzer's own timeout
  and RSS limit for inputs that never return);
- a bug already filed, and pinned by an ``xfail(strict=True)`` regression
  test until its owner fixes it, is recognised by :class:`KnownIssue` and
  counted instead, so a campaign can go on looking for new ones.
"""

from __future__ import annotations

import resource
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

#: CPU time one input may cost. Generous: the slowest honest input (a loader writing
#: megabytes of guest RAM) takes milliseconds; the defects this catches take seconds.
CPU_SECONDS_PER_INPUT = 2.0
#: How much one input may raise the process's peak RSS.
RSS_GROWTH_PER_INPUT = 64 << 20


class InvariantViolation(AssertionError):
    """A target's invariant does not hold: the parser did something it must never do."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvariantViolation(message)


class Target(Protocol):
    """One fuzz target: ``run`` one input, and what it promises."""

    name: str
    #: One line each: what is checked after every input.
    invariants: tuple[str, ...]
    #: Bugs known to be open, recognised and counted rather than reported again.
    known: tuple[KnownIssue, ...]
    #: The longest input worth trying (libFuzzer's -max_len): longer ones only repeat operations.
    max_len: int

    def run(self, data: bytes) -> None:
        """Feed ``data`` to the parser; raise on a crash (see the module docstring)."""

    def seeds(self) -> list[bytes]:
        """Valid inputs made by kvmpy's own code: the corpus the fuzzer starts from."""


@dataclass(frozen=True, slots=True)
class KnownIssue:
    """An open bug: an exception of ``error`` raised from ``function`` in a file ending in ``file``."""

    error: type[BaseException]
    file: str
    function: str
    #: The regression test that pins it (xfail, strict), so the entry goes when the bug does.
    test: str

    def matches(self, error: BaseException) -> bool:
        if not isinstance(error, self.error):
            return False
        frames = traceback.extract_tb(error.__traceback__)
        return any(f.filename.endswith(self.file) and f.name == self.function for f in frames)


class Reader:
    """The fuzzer's bytes as a stream of little-endian integers and byte strings.

    Reads past the end give zeros, so every input decodes to something and a
    mutation that shortens the input still reaches the parser.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    @property
    def remaining(self) -> int:
        return max(len(self._data) - self._at, 0)

    def take(self, count: int) -> bytes:
        chunk = self._data[self._at : self._at + count]
        self._at += count
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def choice(self, options: Sequence[int]) -> int:
        return options[self.u8() % len(options)]

    def rest(self) -> bytes:
        return self.take(self.remaining)


class Writer:
    """The inverse of :class:`Reader`, for building seeds."""

    def __init__(self) -> None:
        self._out = bytearray()

    def uint(self, size: int, value: int) -> Writer:
        self._out += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return self

    def u8(self, value: int) -> Writer:
        return self.uint(1, value)

    def u16(self, value: int) -> Writer:
        return self.uint(2, value)

    def u32(self, value: int) -> Writer:
        return self.uint(4, value)

    def u64(self, value: int) -> Writer:
        return self.uint(8, value)

    def raw(self, data: bytes) -> Writer:
        self._out += data
        return self

    def bytes(self) -> bytes:
        return bytes(self._out)


@dataclass
class Counters:
    """Per-process tallies the engine reports at the end of a run."""

    inputs: int = 0
    known: int = 0


def _usage() -> tuple[float, int]:
    """CPU seconds used and peak RSS in bytes so far, from one system call."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def execute(target: Target, data: bytes, counters: Counters | None = None) -> None:
    """Run one input under the shared rules; raises on a crash, returns otherwise."""
    if counters is not None:
        counters.inputs += 1
    cpu_before, rss_before = _usage()
    try:
        target.run(data)
    except InvariantViolation:
        raise
    except Exception as error:
        if not any(issue.matches(error) for issue in getattr(target, "known", ())):
            raise
        if counters is not None:
            counters.known += 1
        return
    cpu_after, rss_after = _usage()
    spent, grown = cpu_after - cpu_before, rss_after - rss_before
    check(spent <= CPU_SECONDS_PER_INPUT, f"one input cost {spent:.2f} s of CPU")
    check(grown <= RSS_GROWTH_PER_INPUT, f"one input raised peak RSS by {grown >> 20} MiB")


Factory = Callable[[], Target]

__all__ = [
    "CPU_SECONDS_PER_INPUT",
    "RSS_GROWTH_PER_INPUT",
    "Counters",
    "Factory",
    "InvariantViolation",
    "KnownIssue",
    "Reader",
    "Target",
    "Writer",
    "check",
    "execute",
]

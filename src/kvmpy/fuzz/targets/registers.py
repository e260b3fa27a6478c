"""Register-level fuzzing of a bus device: accesses of every size at every offset of its range.

An input is a list of operations, each a few bytes::

    kind    u8    0 read, 1 write, 2 a host-side event, 3 save/restore round trip
    offset  u8    taken modulo the device's range
    size    u8    1, 2, 4 or 8 (index modulo 4); accesses that would leave the range are
                  not sent, as the bus never sends them
    value   size bytes, writes only

Shared invariants: a read fills its buffer and nothing else, neither a read
nor a write raises, and the device's saved state survives a restore into a
fresh device unchanged. Each device adds its own in :meth:`after`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check

READ, WRITE, EVENT, ROUND_TRIP = range(4)
SIZES = (1, 2, 4, 8)
MAX_OPERATIONS = 512


@dataclass(frozen=True, slots=True)
class Operation:
    kind: int
    offset: int
    size: int
    value: int


def encode(operations: list[tuple[int, int, int, int]]) -> bytes:
    """(kind, offset, size, value) tuples as an input (for seeds)."""
    out = Writer()
    for kind, offset, size, value in operations:
        out.u8(kind).u8(offset).u8(SIZES.index(size))
        if kind == WRITE:
            out.uint(size, value)
    return out.bytes()


class RegisterTarget:
    """Base of the legacy device targets: decoding, the shared checks, hooks for the device."""

    name = ""
    span = 1
    invariants: tuple[str, ...] = (
        "no read or write raises, whatever the offset and size",
        "a read fills exactly its buffer",
        "save() then restore() into a fresh device then save() gives the same state, and the "
        "restored device goes on obeying every invariant below",
    )
    known: tuple[KnownIssue, ...] = ()
    max_len = 256

    def fresh(self) -> object:
        """A new device wired to this target's recorders."""
        raise NotImplementedError

    def wired(self) -> object:
        """Another device wired to the same recorders, as a restored one is to the same
        interrupt line (whose level KVM restores with its irqchip)."""
        raise NotImplementedError

    def event(self, device: object, reader: Reader) -> None:
        """A host-side event (input arriving, time passing), from the input's bytes."""

    def after(self, device: object, operation: Operation) -> None:
        """The device's own invariants after each operation."""

    def seeds(self) -> list[bytes]:
        raise NotImplementedError

    def run(self, data: bytes) -> None:
        device = self.fresh()
        reader = Reader(data)
        for _ in range(MAX_OPERATIONS):
            if not reader.remaining:
                break
            kind, offset, size = reader.u8() % 4, reader.u8() % self.span, SIZES[reader.u8() % 4]
            value = reader.uint(size) if kind == WRITE else 0
            if offset + size > self.span and kind in (READ, WRITE):
                continue  # the bus never sends an access that leaves the range
            operation = Operation(kind, offset, size, value)
            if kind == READ:
                buffer = bytearray(b"\x5c" * (size + 2))
                device.read(offset, memoryview(buffer)[1 : 1 + size])  # type: ignore[attr-defined]
                check(buffer[0] == 0x5C and buffer[-1] == 0x5C, f"read of {size} at {offset} overran")
            elif kind == WRITE:
                device.write(offset, value.to_bytes(size, "little"))  # type: ignore[attr-defined]
            elif kind == EVENT:
                self.event(device, reader)
            else:
                device = self.round_trip(device)
            self.after(device, operation)

    def round_trip(self, device: object) -> object:
        """Save, restore into another device, and go on with that one (a snapshot taken and loaded)."""
        saved = device.save()  # type: ignore[attr-defined]
        other = self.wired()
        other.restore(saved)  # type: ignore[attr-defined]
        check(other.save() == saved, f"{self.name}: restore(save()) changed the state")  # type: ignore[attr-defined]
        return other


__all__ = ["EVENT", "READ", "ROUND_TRIP", "SIZES", "WRITE", "Operation", "RegisterTarget", "encode"]

"""kvmpy's monitor routes under ``/kvmpy/``: query strings become monitor actions.

Firecracker has no path starting with ``/kvmpy``, so these never clash with its
API. Every route is a GET whose answer is the action's JSON-ready dict, except
``PUT /kvmpy/stop``, which ends the VM from the host (Firecracker's clients
kill the process instead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvmpy.api.errors import RequestError
from kvmpy.vmm.actions import (
    GetIrqState,
    GetMemoryTree,
    GetMigrationStatus,
    GetRegisters,
    GetStats,
    GetVcpus,
    ReadMemory,
    TranslateAddress,
)

Query = Mapping[str, str]
MonitorAction = (
    GetRegisters
    | TranslateAddress
    | ReadMemory
    | GetMemoryTree
    | GetIrqState
    | GetVcpus
    | GetStats
    | GetMigrationStatus
)

#: Enough for a page table dump or a banner; larger reads belong in a file, not a JSON answer.
MAX_READ = 1 << 20
_MAX_ADDRESS = (1 << 64) - 1


def _allow(query: Query, allowed: tuple[str, ...]) -> None:
    for key in query:
        if key not in allowed:
            names = ", ".join(allowed) if allowed else "none"
            raise RequestError(f"unknown query parameter `{key}` (this route takes: {names}).")


def _number(query: Query, key: str, *, base: int, default: int | None = None) -> int:
    text = query.get(key)
    if text is None:
        if default is None:
            raise RequestError(f"the query parameter `{key}` is required.")
        return default
    try:
        value = int(text, base)
    except ValueError:
        kind = "a hexadecimal address such as 0xffffffff81000000" if base == 16 else "a decimal number"
        raise RequestError(f"`{key}={text}` is not {kind}.") from None
    if not 0 <= value <= _MAX_ADDRESS:
        raise RequestError(f"`{key}={text}` is out of range.")
    return value


def _vcpu(query: Query) -> int:
    return _number(query, "vcpu", base=10, default=0)


def regs(query: Query) -> GetRegisters:
    _allow(query, ("vcpu",))
    return GetRegisters(vcpu=_vcpu(query))


def translate(query: Query) -> TranslateAddress:
    _allow(query, ("gva", "vcpu"))
    return TranslateAddress(gva=_number(query, "gva", base=16), vcpu=_vcpu(query))


def memory(query: Query) -> ReadMemory:
    _allow(query, ("address", "length", "space", "vcpu"))
    space = query.get("space", "gva")
    if space not in ("gva", "gpa"):
        raise RequestError(f"`space={space}` is neither gva nor gpa.")
    length = _number(query, "length", base=10)
    if not 1 <= length <= MAX_READ:
        raise RequestError(f"`length={length}` is out of range: read 1 to {MAX_READ} bytes.")
    return ReadMemory(
        address=_number(query, "address", base=16),
        length=length,
        physical=space == "gpa",
        vcpu=_vcpu(query),
    )


def _no_query(action: Callable[[], MonitorAction]) -> Callable[[Query], MonitorAction]:
    def parse(query: Query) -> MonitorAction:
        _allow(query, ())
        return action()

    return parse


#: GET /kvmpy/NAME -> the parser of its query string.
ROUTES: dict[str, Callable[[Query], MonitorAction]] = {
    "regs": regs,
    "translate": translate,
    "memory": memory,
    "mtree": _no_query(GetMemoryTree),
    "irq": _no_query(GetIrqState),
    "vcpus": _no_query(GetVcpus),
    "stats": _no_query(GetStats),
    "migration": _no_query(GetMigrationStatus),
}


__all__ = ["MAX_READ", "ROUTES", "memory", "regs", "translate"]

"""Where every counter of a machine lives, named once for the metrics registry.

Each function below registers one kind of component with the counters it
keeps: the vCPUs (exits by reason, time in the guest, guest errors), every bus
range (accesses), unclaimed accesses, each virtio device (its transport's guest
errors and its model's own counters, throttling included), the PCI root
(refused BARs), the 16550A, the console output, the event loop and, with
seccomp on, the calls its filters trapped. Adding a
counter to a device means adding its name here, nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmpy.jail import seccomp
from kvmpy.vmm.metrics_registry import MetricsRegistry, component_name

if TYPE_CHECKING:
    from kvmpy.bus import Bus
    from kvmpy.vmm.machine import Machine

#: Counter attributes a virtio device model may keep (blk, net, console, rng, the disk file).
_MODEL_COUNTERS = ("requests", "errors", "host_errors", "bounced", "dropped", "packets_in", "packets_out")


def register_machine(registry: MetricsRegistry, machine: Machine) -> None:
    registry.register("vcpus", lambda: _vcpu_totals(machine))
    for index in range(len(machine.vcpus)):
        registry.register(f"vcpu{index}", lambda index=index: _vcpu(machine, index))  # type: ignore[misc]
    for bus in (machine.pio_bus, machine.mmio_bus):
        _register_bus(registry, bus)
    for device_id, transport in machine.pci.by_id.items():  # by id: a restore may use other slots
        name = component_name(device_id)
        registry.register(name, lambda transport=transport: _virtio(transport))  # type: ignore[misc]
    registry.register("pci", lambda: {"refused_bars": machine.pci.root.refused_bars})
    registry.register(
        "serial", lambda: {"overruns": machine.serial.overruns, "bad_accesses": machine.serial.bad_accesses}
    )
    registry.register("console", lambda: _console(machine))
    registry.register("event-loop", lambda: {"disabled_handlers": len(machine.events.disabled)})
    registry.register("process", _process)
    if seccomp.enabled():
        registry.register("seccomp", lambda: {"num_faults": seccomp.faults()})


def _vcpu(machine: Machine, index: int) -> dict[str, int]:
    if index >= len(machine.threads):
        return {"exits": 0}
    stats = machine.threads[index].stats
    counters = {f"exits_{reason}": counter.count for reason, counter in stats.reasons.items()}
    counters.update(
        exits=stats.total_exits,
        guest_us=stats.guest_ns // 1000,
        guest_errors=stats.guest_errors,
        buffered_writes=stats.coalesced,
    )
    return counters


def _vcpu_totals(machine: Machine) -> dict[str, int]:
    totals: dict[str, int] = {}
    for index in range(len(machine.vcpus)):
        for key, value in _vcpu(machine, index).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _register_bus(registry: MetricsRegistry, bus: Bus) -> None:
    for entry in bus.ranges:
        registry.register(
            f"{bus.kind}.{component_name(entry.name)}",
            lambda entry=entry: {  # type: ignore[misc]
                "reads": entry.reads,
                "writes": entry.writes,
                "bytes": entry.bytes,
                "handle_us": entry.handle_ns // 1000,
            },
        )
    registry.register(f"{bus.kind}.unclaimed", lambda: {"accesses": sum(n for _, n in bus.unclaimed())})


def _virtio(transport: Any) -> dict[str, int]:
    counters = {"guest_errors": transport.guest_errors}
    model = transport.device
    counters.update(_attributes(model, _MODEL_COUNTERS))
    own = getattr(model, "metrics", None)  # a device with counters of its own shape (the balloon)
    if own is not None:
        counters.update(own())
    for name in ("throttle", "rx_throttle", "tx_throttle"):
        throttle = getattr(model, name, None)
        if throttle is not None:
            counters[name + "d"] = throttle.throttled  # throttled, rx_throttled, tx_throttled
    return counters


def _process() -> dict[str, int]:
    """The VMM's resident memory (what a balloon gives back shows here), from /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return {"resident_kib": int(line.split()[1])}
    except OSError:  # no /proc (a jail)
        pass
    return {}


def _console(machine: Machine) -> dict[str, int]:
    console = machine.console
    return _attributes(console, ("bytes_written", "dropped", "rate_limited", "sink_errors"))


def _attributes(thing: object, names: tuple[str, ...]) -> dict[str, int]:
    return {name: int(getattr(thing, name)) for name in names if isinstance(getattr(thing, name, None), int)}


__all__ = ["register_machine"]

"""One registry of every counter in the VMM, under stable names.

Devices keep their counters as plain integers, changed under their own lock
(a device's counters are part of the device, as Firecracker's per-device
metrics are). This registry is the one place that gives each a stable name,
``<component>.<counter>``, with the component named after the device's id
(``virtio-blk0``, ``serial-com1``, ``vcpu1``): ``--stats``, the monitor's
``/kvmpy/stats`` and the Firecracker-style metrics file all read it, so a
counter that exists is shown everywhere the same way.

Sources are functions that read the counters when asked: registering costs
nothing on the hot path.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping

Source = Callable[[], Mapping[str, int]]

_SLUG = re.compile(r"[^a-z0-9]+")


def component_name(label: str) -> str:
    """A stable component name from a device's label: ``serial (COM1)`` -> ``serial-com1``."""
    return _SLUG.sub("-", label.lower()).strip("-") or "unnamed"


class MetricsRegistry:
    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}
        self._lock = threading.Lock()

    def register(self, component: str, source: Source) -> str:
        """Add ``component``'s counters; a second device with the same name gets a suffix."""
        with self._lock:
            name, number = component, 2
            while name in self._sources:
                name, number = f"{component}-{number}", number + 1
            self._sources[name] = source
            return name

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Every component's counters now, as plain data (components in registration order)."""
        with self._lock:
            sources = list(self._sources.items())
        return {name: {key: int(value) for key, value in source().items()} for name, source in sources}

    def flat(self) -> dict[str, int]:
        """The same as ``component.counter`` -> value."""
        return {
            f"{component}.{counter}": value
            for component, counters in self.snapshot().items()
            for counter, value in counters.items()
        }

    @property
    def components(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._sources)


__all__ = ["MetricsRegistry", "Source", "component_name"]

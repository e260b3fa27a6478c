"""The one error a bad snapshot or migration stream gives: it names what is wrong."""

from __future__ import annotations

from kvmpy.errors import ConfigError


class StateError(ConfigError):
    """Saved state that cannot be restored (truncated, corrupted, another version, out of range).

    Saved state is untrusted input: a snapshot file may be edited, a migration
    stream may come from anywhere. Restoring validates every field and raises
    this with a one-line message; nothing is left half restored.
    """


__all__ = ["StateError"]

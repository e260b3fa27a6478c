"""The two roots of kvmpy's errors: whose fault it is.

:class:`HostError` is the user's or the host's side (bad configuration, a
missing file, a failed ioctl): the VMM cannot start or go on. :class:`GuestError`
is the guest's side (a bad address, a malformed request): the guest is
hostile, so these are caught at device boundaries, counted and logged, and the
VM goes on.
"""

from __future__ import annotations


class KvmpyError(Exception):
    """Base of every error kvmpy raises on purpose."""


class HostError(KvmpyError):
    """Something on the host side is wrong: configuration, files, KVM itself."""


class ConfigError(HostError):
    """The user's configuration or input cannot be used as given."""


class RestoreError(ConfigError, ValueError):
    """Saved state cannot be restored: it is corrupt, foreign or from another version.

    Saved state is validated like untrusted input; the message names the device and field.
    A snapshot is the user's input, hence a ConfigError; it is also a ValueError because
    that is what device restores raised before, and callers catch it.
    """


class GuestError(KvmpyError):
    """The guest did something invalid; the VMM survives it."""


__all__ = ["ConfigError", "GuestError", "HostError", "KvmpyError", "RestoreError"]

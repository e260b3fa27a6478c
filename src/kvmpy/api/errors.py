"""A request the HTTP layer refuses before any action exists (Firecracker's ``RequestError``)."""

from __future__ import annotations

#: Firecracker's prefix for a body that does not deserialize.
DESERIALIZE_PREFIX = "An error occurred when deserializing the json body of a request: "
#: Firecracker's prefix for an operation it (here: kvmpy) does not have.
NOT_SUPPORTED_PREFIX = "The requested operation is not supported: "

#: What kvmpy does not have, by Firecracker's resource name, with the reason it answers.
UNSUPPORTED = {
    "cpu-config": "custom CPU templates: kvmpy gives the guest the CPUID KVM supports, unmodified.",
    "hotplug": "memory hotplug: kvmpy has no virtio-mem.",
    "mmds": "MMDS: kvmpy's virtio-net has no microVM metadata service.",
    "pmem": "virtio-pmem devices: kvmpy has none.",
    "vsock": (
        "vsock through Unix sockets (uds_path): kvmpy's virtio-vsock is the host kernel's"
        " vhost-vsock, reached with AF_VSOCK; start kvmpy with --vsock cid=N."
    ),
}


class RequestError(Exception):
    """The request is malformed or cannot be served; ``message`` becomes the fault_message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def not_supported(what: str) -> RequestError:
    """An operation Firecracker has and kvmpy does not, with the reason in ``what``."""
    return RequestError(NOT_SUPPORTED_PREFIX + what)


def invalid_path_method(method: str, path: str) -> RequestError:
    """Firecracker's answer for a path or a method it does not route."""
    return RequestError(f"Invalid request method and/or path: {method} {path}.")


__all__ = [
    "UNSUPPORTED",
    "DESERIALIZE_PREFIX",
    "NOT_SUPPORTED_PREFIX",
    "RequestError",
    "invalid_path_method",
    "not_supported",
]

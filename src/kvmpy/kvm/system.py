"""/dev/kvm itself: API version, capabilities, what the host CPU offers."""

from __future__ import annotations

import errno
import os

from kvmpy.abi import kvm as abi
from kvmpy.kvm.errors import KvmError, KvmUnavailableError
from kvmpy.kvm.ioctl import ioctl
from kvmpy.kvm.vm import Vm

#: The only KVM API version there has ever been in mainline Linux.
EXPECTED_API_VERSION = 12


class System:
    """An open handle on /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (load kvm-intel or kvm-amd, "
                "or run inside `kvmpy lab run`)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: add your user to the 'kvm' group or run as root"
            ) from None
        except OSError as error:
            raise KvmUnavailableError(f"cannot open {path}: {error.strerror}") from None
        version = self.api_version()
        if version != EXPECTED_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}, kvmpy needs {EXPECTED_API_VERSION}"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def api_version(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, name="KVM_GET_API_VERSION")

    def check_extension(self, capability: int) -> int:
        """0 if the capability is absent, otherwise its value (often 1)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability, name="KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, name="KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        """The CPUID leaves KVM can present to a guest on this host."""
        while True:
            cpuid = abi.make_cpuid2(max_entries)
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, name="KVM_GET_SUPPORTED_CPUID")
            except KvmError as error:
                if error.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return [_copy_entry(cpuid.entries[i]) for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        return self._msr_list(abi.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_list(self) -> list[int]:
        return self._msr_list(abi.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, request: int, name: str) -> list[int]:
        count = 256
        while True:
            msr_list = abi.make_msr_list(count)
            try:
                ioctl(self.fd, request, msr_list, name=name)
            except KvmError as error:
                if error.errno == errno.E2BIG and count < 16384:
                    count = max(count * 2, msr_list.nmsrs)
                    continue
                raise
            return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def create_vm(self) -> Vm:
        fd = ioctl(self.fd, abi.KVM_CREATE_VM, 0, name="KVM_CREATE_VM")
        return Vm(fd, self)


def _copy_entry(entry: abi.kvm_cpuid_entry2) -> abi.kvm_cpuid_entry2:
    return abi.kvm_cpuid_entry2.from_buffer_copy(entry)


__all__ = ["EXPECTED_API_VERSION", "System"]

"""The nested lab: an emulated x86 machine with AMD SVM where a real KVM runs.

This host's /dev/kvm (PVM) cannot run stock Linux kernels. QEMU with TCG and
``-cpu max`` emulates a machine with SVM; inside it Debian's kernel loads
kvm-amd, and kvmpy (the host's own checkout and Python, seen through a
read-only 9p mount of /) boots Linux on a real KVM with nested paging, or
shadow paging with ``npt=0``.
"""

from kvmpy.errors import HostError


class LabError(HostError):
    """The lab itself failed: download, module load, mount, QEMU."""


__all__ = ["LabError"]

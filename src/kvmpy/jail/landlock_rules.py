"""The Landlock ruleset: inside the jail, read and write files, never execute or make nodes.

Landlock (Linux 5.13+) restricts what the process may do with paths it opens from now
on, on top of the chroot: even a path that escaped it could not be used. The rights
granted beneath ``/`` (the jail's root) are what the VMM does with files: read a
kernel, read and write a disk, make and remove its sockets and snapshot files.
Everything else Landlock handles is denied: execute, make device nodes, FIFOs and
links, rename across directories, and device ioctls (ABI 5) everywhere but /dev,
where /dev/kvm and /dev/net/tun are. With ABI 6 the process is also scoped: it can
neither signal processes outside its domain nor connect to abstract Unix sockets
made outside it.

The three system calls are made with ctypes: PyPI's ``landlock`` (1.0.0.dev5) finds
libc with ``ctypes.util.find_library``, which runs a compiler or ldconfig and fails in
the jail, checks errno after calls that succeeded, and knows no ABI beyond file systems.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("kvmpy.jail")

_libc = ctypes.CDLL(None, use_errno=True)
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

#: The file-system rights each ABI version knows (a ruleset may only handle those).
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}
ALL_FS_RIGHTS = (1 << 16) - 1
#: What the VMM does with files beneath the jail's root.
FILE_RIGHTS = READ_FILE | WRITE_FILE | READ_DIR | MAKE_REG | MAKE_SOCK | REMOVE_FILE | MAKE_DIR | TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (or has it disabled)."""
    try:
        return _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError:
        return 0


def handled_rights(version: int) -> int:
    return _FS_RIGHTS_BY_ABI.get(version, ALL_FS_RIGHTS)


def restrict(root: str = "/") -> int:
    """Apply the ruleset to this thread and the threads it starts; returns the ABI used (0: none).

    The caller has set ``no_new_privs`` (Landlock requires it of an unprivileged process)."""
    version = abi_version()
    if version == 0:
        log.warning("this kernel has no Landlock: the jail goes on without it")
        return 0
    handled = handled_rights(version)
    attr = _RulesetAttr(handled, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if version >= 6 else 8  # older kernels know one field
    ruleset = _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        _allow(ruleset, root, FILE_RIGHTS & handled)
        _allow(ruleset, os.path.join(root, "dev"), (FILE_RIGHTS | IOCTL_DEV) & handled)
        _syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return version


def _allow(ruleset: int, path: str, rights: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(rights, fd)
        _syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                 ctypes.c_uint32(0))  # fmt: skip
    finally:
        os.close(fd)

"""What a VM is made of, as plain data the CLI (and later the API) fills in."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import msgspec

from kvmpy.errors import ConfigError

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)

MIN_MEMORY = 16 << 20
MAX_VCPUS = 254  # APIC IDs 0..253, the IOAPIC takes the next ID


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``256M``, ``1G``, ``4096`` (bytes) into a byte count."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ConfigError(f"invalid {what} {text!r}: use a number with an optional K, M, G or T suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


class SerialMode(Enum):
    STDIO = "stdio"
    FILE = "file"
    UNIX = "unix"
    NONE = "none"


class SerialConfig(msgspec.Struct, frozen=True):
    mode: SerialMode = SerialMode.STDIO
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> SerialConfig:
        if text in ("stdio", "none"):
            return cls(SerialMode(text))
        if text.startswith("file:") and len(text) > 5:
            return cls(SerialMode.FILE, Path(text[5:]))
        if text.startswith("unix:") and len(text) > 5:
            return cls(SerialMode.UNIX, Path(text[5:]))
        raise ConfigError(f"invalid --serial {text!r}: use stdio, none, file:PATH or unix:PATH")


class TokenBucketConfig(msgspec.Struct, frozen=True):
    """One token bucket (Firecracker's shape): ``size`` tokens refilled every ``refill_time_ms``.

    ``one_time_burst`` extra tokens are available once, at the start, and are not refilled.
    Tokens are bytes for a bandwidth bucket and requests for an operations bucket.
    """

    size: int
    refill_time_ms: int
    one_time_burst: int = 0


class RateLimiterConfig(msgspec.Struct, frozen=True):
    """Limits on a device's bandwidth and operations; a missing bucket means no limit."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None


def rate_limiter_option(limits: dict[str, str], what: str) -> RateLimiterConfig | None:
    """``bandwidth=SIZE`` (bytes per second) and ``ops=N`` (per second) as one-second buckets."""
    if not limits:
        return None
    bandwidth = ops = None
    if "bandwidth" in limits:
        rate = parse_size(limits["bandwidth"], what=f"{what} bandwidth")
        if rate <= 0:
            raise ConfigError(f"{what} bandwidth must be more than 0 bytes per second")
        bandwidth = TokenBucketConfig(size=rate, refill_time_ms=1000)
    if "ops" in limits:
        try:
            count = int(limits["ops"])
        except ValueError:
            raise ConfigError(f"{what} ops={limits['ops']!r} is not a number of requests") from None
        if count <= 0:
            raise ConfigError(f"{what} ops must be at least 1 per second")
        ops = TokenBucketConfig(size=count, refill_time_ms=1000)
    return RateLimiterConfig(bandwidth=bandwidth, ops=ops)


class DiskConfig(msgspec.Struct, frozen=True):
    """A virtio-blk disk: a raw image file, through the host's page cache or with O_DIRECT."""

    path: Path
    read_only: bool = False
    id: str = ""
    direct: bool = False
    #: Firecracker's root drive: the kernel command line gets ``root=/dev/vda`` (or its PARTUUID).
    is_root_device: bool = False
    partuuid: str = ""
    #: "Writeback": flush requests are offered and reach the host's disk (fsync); "Unsafe":
    #: VIRTIO_BLK_F_FLUSH is not offered (Firecracker's default for API-configured drives).
    cache_type: str = "Writeback"
    rate_limiter: RateLimiterConfig | None = None
    #: Who serves the requests: "python" (kvmpy's own virtio-blk) or "vhost-user" (a
    #: qemu-storage-daemon kvmpy starts on ``path``, or the daemon listening at ``socket``).
    backend: str = "python"
    #: A vhost-user back end the user runs (Firecracker's drive ``socket``); ``path`` is unused.
    socket: Path | None = None
    #: The image's format for qemu-storage-daemon: raw or qcow2 ("": read from the image).
    format: str = ""
    #: qemu-storage-daemon's I/O engine: threads, native or io_uring ("": its default).
    aio: str = ""

    @property
    def vhost_user(self) -> bool:
        return self.backend == "vhost-user" or self.socket is not None

    @classmethod
    def parse(cls, text: str) -> DiskConfig:
        """``PATH[,readonly=on|off][,direct=on|off][,id=NAME][,bandwidth=SIZE][,ops=N]``,
        ``PATH,backend=vhost-user[,format=raw|qcow2][,aio=MODE]`` or ``socket=PATH[,id=NAME]``.

        ``bandwidth`` (bytes per second, e.g. 10M) and ``ops`` (requests per second)
        limit the disk with token buckets refilled every second (Firecracker's model).
        """
        path, *options = text.split(",")
        socket: Path | None = None
        if path.startswith("socket="):
            socket, path = Path(path.removeprefix("socket=")), path.removeprefix("socket=")
        if not path:
            raise ConfigError(f"invalid --disk {text!r}: it needs a path")
        read_only, direct, name, backend, fmt, aio = False, False, "", "python", "", ""
        limits: dict[str, str] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key == "readonly" and value in ("on", "off"):
                read_only = value == "on"
            elif key == "direct" and value in ("on", "off"):
                direct = value == "on"
            elif key == "id" and value:
                name = value
            elif key in ("bandwidth", "ops") and value:
                limits[key] = value
            elif key == "backend" and value in ("python", "vhost-user"):
                backend = value
            elif key == "format" and value in ("raw", "qcow2"):
                fmt = value
            elif key == "aio" and value in ("threads", "native", "io_uring"):
                aio = value
            else:
                raise ConfigError(
                    f"invalid --disk option {option!r}: use readonly=on|off, direct=on|off, id=NAME, "
                    "bandwidth=SIZE, ops=N, backend=python|vhost-user, format=raw|qcow2 or "
                    "aio=threads|native|io_uring"
                )
        limiter = rate_limiter_option(limits, "--disk")
        disk = cls(
            Path(path), read_only, name, direct, rate_limiter=limiter, backend=backend, socket=socket,
            format=fmt, aio=aio,
        )  # fmt: skip
        disk.check_backend_options()
        return disk

    def check_backend_options(self) -> None:
        """Options that only one kind of back end has."""
        name = self.socket or self.path
        if self.vhost_user and self.rate_limiter is not None:
            raise ConfigError(f"disk {name}: a vhost-user disk cannot be rate-limited by kvmpy")
        if not self.vhost_user and (self.format or self.aio):
            raise ConfigError(f"disk {name}: format= and aio= need backend=vhost-user")
        if self.socket is not None and (self.format or self.aio or self.direct or self.read_only):
            raise ConfigError(
                f"disk socket={self.socket}: the daemon at the socket decides format, aio, direct and"
                " read-only; give them to it"
            )

    def check_usable(self) -> None:
        """The image (or socket) is there and this back end can serve it."""
        if self.socket is not None:
            if not self.socket.is_socket():
                raise ConfigError(f"disk socket {self.socket} is not a Unix socket (is the daemon running?)")
            return
        check_readable(self.path, "disk")
        if not self.vhost_user and self.format != "raw" and _is_qcow2(self.path):
            raise ConfigError(
                f"disk {self.path} is a qcow2 image: serve it with backend=vhost-user (qemu-storage-daemon)"
            )


class VfioConfig(msgspec.Struct, frozen=True):
    """A host PCI device assigned to the guest through VFIO (``--device vfio=`` or PUT /vfio/{id})."""

    #: The canonical PCI address, DDDD:BB:DD.F (kvmpy.vfio.sysfs.parse_bdf gives it).
    bdf: str
    #: The device id: the API's vfio_id, or vfioN from the command line ("": named by position).
    id: str = ""


class BalloonConfig(msgspec.Struct, frozen=True):
    """A virtio-balloon (Firecracker's PUT /balloon fields, and free page reporting)."""

    amount_mib: int
    deflate_on_oom: bool = False
    #: How often the driver is asked for its memory statistics; 0: no statistics queue.
    stats_polling_interval_s: int = 0
    free_page_reporting: bool = False

    @classmethod
    def parse(cls, text: str) -> BalloonConfig:
        """``amount=MIB[,deflate_on_oom=on][,stats=SECONDS][,reporting=on]``."""
        values: dict[str, str] = {}
        for option in text.split(","):
            key, _, value = option.partition("=")
            numeric = key in ("amount", "stats")
            valid = value.isdigit() if numeric else value in ("on", "off")
            if key not in ("amount", "deflate_on_oom", "stats", "reporting") or not valid or key in values:
                raise ConfigError(
                    f"invalid --balloon option {option!r}: use amount=MIB, deflate_on_oom=on|off,"
                    " stats=SECONDS or reporting=on|off"
                )
            values[key] = value
        if "amount" not in values:
            raise ConfigError(f"invalid --balloon {text!r}: it needs amount=MIB")
        return cls(
            int(values["amount"]),
            deflate_on_oom=values.get("deflate_on_oom") == "on",
            stats_polling_interval_s=int(values.get("stats", "0")),
            free_page_reporting=values.get("reporting") == "on",
        )


class FsConfig(msgspec.Struct, frozen=True):
    """A virtio-fs share: a host directory virtiofsd serves, mounted in the guest by its tag."""

    tag: str
    path: Path
    #: virtiofsd 7.2 has no read-only mode: kvmpy gives it a read-only bind mount of ``path``.
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> FsConfig:
        """``tag=NAME,path=DIR[,readonly=on|off]``."""
        fields: dict[str, str] = {}
        for option in text.split(","):
            key, _, value = option.partition("=")
            known = key in ("tag", "path") or key == "readonly" and value in ("on", "off")
            if not known or not value:
                raise ConfigError(
                    f"invalid --fs option {option!r}: use tag=NAME, path=DIR or readonly=on|off"
                )
            fields[key] = value
        if "tag" not in fields or "path" not in fields:
            raise ConfigError(f"invalid --fs {text!r}: it needs tag=NAME and path=DIR")
        share = cls(fields["tag"], Path(fields["path"]), fields.get("readonly") == "on")
        share.check_usable()
        return share

    def check_usable(self) -> None:
        """A tag the device can hold, and a directory to share."""
        from kvmpy.virtio.vhost.user_fs import check_tag  # loaded only for a VM with a share

        check_tag(self.tag)
        if not self.path.is_dir():
            raise ConfigError(f"--fs path {self.path} is not a directory")


class NetConfig(msgspec.Struct, frozen=True):
    """A virtio-net interface on a tap device."""

    tap: str
    mac: str = ""
    #: Firecracker's iface_id; empty for interfaces from the command line.
    id: str = ""
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None
    #: The data plane: "on" the kernel's vhost-net, "off" kvmpy's Python back end, "auto" vhost-net
    #: where /dev/vhost-net opens (and no limit, seccomp filter or snapshot needs Python's).
    vhost: str = "auto"
    #: Queue pairs (VIRTIO_NET_F_MQ, one tap queue each); 0: one per vCPU where the tap can
    #: have several queues, else one.
    queues: int = 0

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        """``tap=IFNAME[,mac=MAC][,bandwidth=SIZE][,ops=N][,vhost=on|off|auto][,queues=N]``: the
        limits apply to each direction."""
        from kvmpy.virtio.devices.tap import MAX_QUEUE_PAIRS

        tap, mac, vhost, queues = "", "", "auto", 0
        limits: dict[str, str] = {}
        for option in text.split(","):
            key, _, value = option.partition("=")
            if key == "tap" and value:
                tap = value
            elif key == "mac" and value:
                mac = value
            elif key in ("bandwidth", "ops") and value:
                limits[key] = value
            elif key == "vhost" and value in ("on", "off", "auto"):
                vhost = value
            elif key == "queues" and value.isdigit() and 1 <= int(value) <= MAX_QUEUE_PAIRS:
                queues = int(value)
            else:
                raise ConfigError(
                    f"invalid --net option {option!r}: use tap=IFNAME, mac=MAC, bandwidth=SIZE, ops=N,"
                    f" vhost=on|off|auto or queues=1..{MAX_QUEUE_PAIRS}"
                )
        if not tap:
            raise ConfigError(f"invalid --net {text!r}: it needs tap=IFNAME")
        limiter = rate_limiter_option(limits, "--net")
        if limiter is not None and vhost == "on":
            raise ConfigError(f"--net {text}: a vhost-net interface cannot be rate-limited by kvmpy")
        return cls(tap, mac, rx_rate_limiter=limiter, tx_rate_limiter=limiter, vhost=vhost, queues=queues)


class LoggerConfig(msgspec.Struct, frozen=True):
    """Where kvmpy's own log goes (Firecracker's PUT /logger)."""

    path: Path | None = None
    level: str = "Warning"  # Error, Warning, Info, Debug, Trace, Off
    show_level: bool = False
    show_log_origin: bool = False
    module: str = ""


class MetricsConfig(msgspec.Struct, frozen=True):
    """Where metrics are written as newline-delimited JSON (Firecracker's PUT /metrics)."""

    path: Path


class OnReboot(Enum):
    RESTART = "restart"
    EXIT = "exit"


class VmConfig(msgspec.Struct, frozen=True):
    """Everything needed to build one VM."""

    #: None until a boot source is configured (through the API a VM starts empty).
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    cpus: int = 1
    memory: int = 256 << 20
    serial: SerialConfig = SerialConfig()
    on_reboot: OnReboot = OnReboot.RESTART
    flat_address: int | None = None
    hugepages: bool = False
    disks: tuple[DiskConfig, ...] = ()
    rng: bool = False
    nets: tuple[NetConfig, ...] = ()
    #: virtio-fs shares, each served by a virtiofsd kvmpy starts.
    filesystems: tuple[FsConfig, ...] = ()
    #: Where the terminal connects: the emulated 16550A or its virtio twin (hvc0).
    console: str = "serial"
    #: Console output the sink gets at most, bytes per second (None: no limit); the rest is dropped.
    console_rate: int | None = None
    #: Where device and error messages go besides the serial console (stderr by default).
    quiet: bool = False
    rng_rate_limiter: RateLimiterConfig | None = None
    #: Firecracker's machine-config fields kvmpy keeps and reports (smt: two threads per core).
    smt: bool = False
    track_dirty_pages: bool = False
    #: Guest RAM as memfds another process can map (always so with a vhost-user device).
    shared_memory: bool = False
    #: The guest's AF_VSOCK context id (a virtio-vsock device through vhost-vsock), or None.
    vsock_cid: int | None = None
    balloon: BalloonConfig | None = None
    #: Host PCI devices assigned to the guest through VFIO.
    vfio_devices: tuple[VfioConfig, ...] = ()
    logger: LoggerConfig | None = None
    metrics: MetricsConfig | None = None
    #: (device id, PCI slot) of virtio devices that must sit in a given slot: a restored
    #: machine puts each device where the snapshot's guest found it. Others take free slots.
    pci_slots: tuple[tuple[str, int], ...] = ()

    def _check_vfio(self) -> None:
        """Assigned devices DMA into pinned guest RAM: nothing may take pages away or track them."""
        if not self.vfio_devices:
            return
        bdfs = [device.bdf for device in self.vfio_devices]
        if len(set(bdfs)) != len(bdfs):
            named = ", ".join(bdfs)
            raise ConfigError(f"an assigned device (--device vfio=, PUT /vfio) is named twice: {named}")
        if self.balloon is not None:
            raise ConfigError(
                "a balloon and an assigned device (--device vfio=, PUT /vfio) do not go together: the"
                " device may DMA into pages the balloon gives back (VFIO pins all of guest RAM)"
            )
        if self.track_dirty_pages:
            raise ConfigError(
                "track_dirty_pages and an assigned device (--device vfio=, PUT /vfio) do not go together:"
                " device DMA is not logged"
            )

    @property
    def needs_shared_memory(self) -> bool:
        return self.shared_memory or bool(self.filesystems) or any(disk.vhost_user for disk in self.disks)

    def validate(self, host_memory: int | None = None) -> None:
        """Raise ConfigError for anything that cannot work, before touching KVM."""
        if self.kernel is None:
            raise ConfigError("no kernel to boot: configure a boot source (--kernel or PUT /boot-source)")
        check_readable(self.kernel, "kernel")
        if self.initrd is not None:
            check_readable(self.initrd, "initrd")
        for disk in self.disks:
            disk.check_usable()
        tags = [share.tag for share in self.filesystems]
        for share in self.filesystems:
            share.check_usable()
            if tags.count(share.tag) > 1:
                raise ConfigError(f"--fs tag {share.tag!r} is given twice: each share needs its own tag")
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"invalid --console {self.console!r}: use serial or virtio")
        if self.console_rate is not None and self.console_rate <= 0:
            raise ConfigError(f"invalid --console-rate {self.console_rate}: must be positive")
        if not 1 <= self.cpus <= MAX_VCPUS:
            raise ConfigError(f"--cpus {self.cpus} is out of range: use 1 to {MAX_VCPUS}")
        if self.balloon is not None and self.balloon.amount_mib > self.memory >> 20:
            amount, ram = self.balloon.amount_mib, self.memory >> 20
            raise ConfigError(f"--balloon amount {amount} MiB is more than the guest's {ram} MiB")
        self._check_vfio()
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"--memory {self.memory >> 20}M is too small: at least {MIN_MEMORY >> 20}M")
        if self.memory % 4096:
            raise ConfigError("--memory must be a multiple of 4 KiB")
        if host_memory is not None and self.memory > host_memory:
            raise ConfigError(
                f"--memory {self.memory >> 20}M is more than this host has ({host_memory >> 20}M)"
            )


def check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror}") from None


def _is_qcow2(path: Path) -> bool:
    try:
        with path.open("rb") as image:
            return image.read(4) == b"QFI\xfb"
    except OSError:
        return False


def host_memory_bytes() -> int | None:
    """Total RAM of this host, from /proc/meminfo (None if unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = [
    "MAX_VCPUS",
    "DiskConfig",
    "FsConfig",
    "LoggerConfig",
    "MetricsConfig",
    "NetConfig",
    "RateLimiterConfig",
    "TokenBucketConfig",
    "VfioConfig",
    "check_readable",
    "rate_limiter_option",
    "MIN_MEMORY",
    "OnReboot",
    "SerialConfig",
    "SerialMode",
    "VmConfig",
    "host_memory_bytes",
    "parse_size",
]

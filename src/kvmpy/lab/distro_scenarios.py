"""Debian 12 under kvmpy or QEMU in the lab: systemd's boot, TCP over virtio-net, virtio-blk.

The guest (``kvmpy.lab.distro``'s image as its root disk, 2 vCPUs, a tap to the lab)
waits for systemd to finish booting and reports its state and failed units, pings
the lab, sends TCP streams of several sizes to the lab's :mod:`kvmpy.lab.tcp_sink`
(one at a time, then one from each vCPU at once), writes a file to its root disk
with fsync and reads it back after dropping its caches, and reports every kernel
message about virtio or its devices at warning level or worse. The lab checksums
what it received, and after the VM has ended reads the file back out of the image
and checks the file system. :class:`DistroFacts` parses both sides for the tests.

Issue 13's defect (``output.0:id 2 is not a head!`` then ``Unexpected TXQ (0) queue
failure: -5``, the transfer stalled) appeared during a 2 MiB send from this kind of
guest; a stalled stream shows up here as a short or missing checksum.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from kvmpy.lab.distro import ROOT_ARGS
from kvmpy.lab.scenarios import Scenario, ScenarioResult

TAP, MAC = "kvmtap0", "52:54:00:ab:cd:ef"
HOST_ADDRESS, GUEST_ADDRESS, SINK_PORT = "10.0.2.1", "10.0.2.15", 5000
MIB = 1 << 20
#: Rounds of TCP sends: (file name, bytes, the vCPU nc runs on); a round's streams run at once.
Streams = tuple[tuple[tuple[str, int, int], ...], ...]
#: 2 MiB is the send that broke (issue 13), once from each vCPU; then four streams at once,
#: two from each vCPU, beside a ping flood: the load that showed the defect again in the lab
#: (docs/lab.md; the 2 MiB sends alone did not).
STREAMS: Streams = (
    (("a", 2 * MIB, 0),),
    (("b", 2 * MIB, 1),),
    (("c", 8 * MIB, 0), ("d", 8 * MIB, 1), ("e", 8 * MIB, 0), ("f", 8 * MIB, 1)),
)
#: Flood pings (``ping -f``) beside the last round: small packets both ways among the bulk.
PING_FLOOD = 10000
#: What Linux says when a device breaks its rings (virtio_ring's BAD_RING) and when virtio-net
#: then fails to transmit (issue 13's messages).
DEVICE_ERRORS = ("is not a head", "out of range", "queue failure", "Unexpected TXQ")
#: nc gives up on a connection idle this long (a broken transmit queue sends nothing more).
NC_IDLE_SECONDS = 30
#: The virtio-blk check: a file written with fsync, read back cold, and read by the lab.
BLK_FILE, BLK_MIB = "/var/tmp/kvmpy-blk-check", 16
#: Boot, sends and shutdown under kvmpy in the lab, with room to spare (docs/lab.md).
TIMEOUT_SECONDS = 600.0


def _sends(streams: Streams, ping_flood: int) -> list[str]:
    lines = []
    for position, round_ in enumerate(streams):
        for name, size, _cpu in round_:
            lines.append(f"blob {size} {name}")
        sends = " ".join(f"send {cpu} {name} &" for name, _size, cpu in round_)
        if ping_flood and position == len(streams) - 1:  # small packets both ways beside the bulk
            sends = f"ping -q -f -c {ping_flood} {HOST_ADDRESS} | tail -2 & {sends}"
        lines.append(f"{sends} wait")
    return lines


def guest_command(streams: Streams = STREAMS, ping_flood: int = PING_FLOOD) -> str:
    """The shell command the Debian guest runs once systemd has booted.

    ``ping_flood``: that many flood pings (``ping -f``) run beside the last round's sends.
    """
    lines = [
        "echo SYSTEMD=$(timeout 180 systemctl is-system-running --wait)",
        "echo FAILED-UNITS: $(systemctl list-units --failed --plain --no-legend | cut -d' ' -f1)",
        "systemd-analyze time | head -1",
        f"ip link set eth0 up && ip addr add {GUEST_ADDRESS}/24 dev eth0",
        f"ping -c 3 -W 5 {HOST_ADDRESS} | tail -2",
        "blob() { head -c $1 /dev/urandom > /var/tmp/$2; "
        "echo GUEST-MD5 $(md5sum < /var/tmp/$2 | cut -c1-32) $1; }",
        f"send() {{ taskset -c $1 nc -N -w {NC_IDLE_SECONDS} {HOST_ADDRESS} {SINK_PORT} < /var/tmp/$2; "
        "echo NC-EXIT $2 $?; rm /var/tmp/$2; }",
        *_sends(streams, ping_flood),
        f"dd if=/dev/urandom of={BLK_FILE} bs=1M count={BLK_MIB} conv=fsync status=none",
        f"echo BLK-WRITTEN $(md5sum < {BLK_FILE} | cut -c1-32)",
        "sync && echo 3 > /proc/sys/vm/drop_caches",
        f"echo BLK-READ $(md5sum < {BLK_FILE} | cut -c1-32)",
        "dmesg --level=emerg,alert,crit,err,warn | grep -iE 'virtio|eth0|vda' | sed 's/^/VIRTIO-PROBLEM /'",
        "dmesg | grep -E 'is not a head|queue failure' | sed 's/^/VIRTIO-PROBLEM /'",
        "echo GUEST-DONE",
    ]
    return "\n".join(lines)


def prepare(image: Path) -> str:
    """Lab side before the VM: a writable copy of the image, the tap, the TCP sink."""
    sink = f"{sys.executable} -m kvmpy.lab.tcp_sink {HOST_ADDRESS} {SINK_PORT} {{tmp}}/received"
    return (
        f"cp --sparse=always {image} {{tmp}}/root.img && "
        f"ip tuntap add dev {TAP} mode tap vnet_hdr && ip addr add {HOST_ADDRESS}/24 dev {TAP} && "
        f"ip link set {TAP} up && ({sink} > {{tmp}}/sink.log 2>&1 & echo $! > {{tmp}}/sink.pid); sleep 1"
    )


VERIFY = (
    "kill $(cat {tmp}/sink.pid); sleep 1; cat {tmp}/received; cat {tmp}/sink.log; "
    f"ip link del {TAP}; "
    f"debugfs -R 'dump {BLK_FILE} {{tmp}}/blk' {{tmp}}/root.img 2>/dev/null; "
    "echo HOST-BLK $(md5sum < {tmp}/blk | cut -c1-32); "
    "e2fsck -fn {tmp}/root.img > {tmp}/fsck.log 2>&1; echo FSCK-EXIT $?; tail -3 {tmp}/fsck.log"
)


#: The jailed VMM's user in the lab (no such user: the jail needs none), its id and cgroup.
JAIL_UID, JAIL_ID = 4242, "debian-jailed"
JAIL_CGROUPS = (("cpu.weight", "50"), ("pids.max", "512"))
#: The jailed VMM's API socket; the rest of the jail's paths follow from --chroot-base-dir.
JAIL_SOCKET, JAIL_BASE = "{tmp}/api.sock", "{tmp}/jails"
#: One 2 MiB send: the jailed scenario shows the jail, the others the data path under load.
JAILED_STREAMS: Streams = ((("a", 2 * MIB, 0),),)


def _jail_args() -> tuple[str, ...]:
    """``kvmpy run --jail`` with a v2 cgroup (the lab mounts v2 only), the API and seccomp on."""
    cgroups = [arg for name, value in JAIL_CGROUPS for arg in ("--cgroup", f"{name}={value}")]
    return (
        "--jail", "--jail-uid", str(JAIL_UID), "--jail-gid", str(JAIL_UID), "--chroot-base-dir", JAIL_BASE,
        "--id", JAIL_ID, "--cgroup-version", "2", *cgroups, "--api-sock", JAIL_SOCKET,
    )  # fmt: skip


def jailed_prepare(image: Path) -> str:
    """As :func:`prepare`, with the image and the tap the jailed user's, a v2 cgroup hierarchy,
    and :mod:`kvmpy.lab.jail_probe` waiting beside the VMM."""
    pid_file = f"{JAIL_BASE}/kvmpy/{JAIL_ID}/root/kvmpy.pid"
    probe = (
        f"{sys.executable} -m kvmpy.lab.jail_probe {JAIL_SOCKET} {pid_file} /sys/fs/cgroup/kvmpy/{JAIL_ID} "
        "{tmp}/jail.json"
    )
    return (
        "(mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup) && "
        + prepare(image).replace("mode tap vnet_hdr", f"mode tap vnet_hdr user {JAIL_UID}")
        + f" && chown {JAIL_UID}:{JAIL_UID} {{tmp}}/root.img && ({probe} > {{tmp}}/probe.log 2>&1 &)"
    )


def jailed_distro_scenario(name: str, kernel: str, initrd: str, image: Path) -> Scenario:
    """Debian under ``kvmpy run --jail``: disk, tap and API inside the jail, seccomp on."""
    plain = distro_scenario(name, "kvmpy", kernel, initrd, image, streams=JAILED_STREAMS, ping_flood=0)
    return replace(
        plain,
        args=plain.args + _jail_args(),
        prepare=jailed_prepare(image),
        # printf and cat: dash's echo would turn the JSON's escapes (\t) into control characters
        verify=plain.verify + "; printf 'JAIL-FACTS '; cat {tmp}/jail.json; echo; cat {tmp}/probe.log",
    )


def _vmm_args(vmm: str) -> tuple[str, ...]:
    if vmm == "qemu":
        return (
            "-drive",
            "file={tmp}/root.img,if=virtio,format=raw,cache=writeback,aio=threads",
            "-netdev",
            f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={MAC}",
        )
    # vhost=off: these scenarios are where the Python back end meets a distribution's userspace
    # (issue 13's transmit defect); vhost-net has a scenario of its own.
    return ("--disk", "{tmp}/root.img", "--net", f"tap={TAP},mac={MAC},vhost=off")


def distro_scenario(
    name: str,
    vmm: str,
    kernel: str,
    initrd: str,
    image: Path,
    streams: Streams = STREAMS,
    ping_flood: int = PING_FLOOD,
) -> Scenario:
    """Debian on its root disk under ``vmm`` ("kvmpy" or "qemu"), 2 vCPUs, the checks above."""
    return Scenario(
        name,
        kernel,
        initrd,
        guest_command(streams, ping_flood),
        vmm=vmm,
        cpus=2,
        memory="1024M",
        args=_vmm_args(vmm),
        timeout=TIMEOUT_SECONDS,
        prepare=prepare(image),
        verify=VERIFY,
        kernel_args=f"console=ttyS0 {ROOT_ARGS}",
        # The facts the tests parse come before the shutdown's ~100 lines, and before the soft
        # lockup traces (~70 lines every 30 s) of a guest whose transmit queue broke.
        output_lines=2000,
        device_errors=DEVICE_ERRORS,
    )


@dataclass(frozen=True)
class DistroFacts:
    """What the guest and the lab reported, from a distro scenario's result."""

    systemd_state: str
    failed_units: str
    startup: str
    ping: str
    sent: Counter[tuple[str, int]]
    received: Counter[tuple[str, int]]
    #: Connections that did not end with the guest closing its side (stalled, reset, open).
    broken_streams: list[str]
    nc_failures: list[str]
    virtio_problems: list[str]
    blk: tuple[str, str, str]  # md5 written, read back in the guest, read by the lab
    fsck_exit: str
    done: bool
    #: What kvmpy.lab.jail_probe saw beside a jailed VMM (empty for the others).
    jail: dict[str, object]

    @classmethod
    def parse(cls, result: ScenarioResult) -> DistroFacts:
        out, lab = result.output, "\n".join(result.notes)
        received: Counter[tuple[str, int]] = Counter()
        broken = []
        for md5, count, how in re.findall(r"^RECEIVED (\w+) (\d+) (\w+)$", lab, re.M):
            if how == "closed":
                received[(md5, int(count))] += 1
            else:
                broken.append(f"{how} after {count} bytes")
        return cls(
            systemd_state=_first(r"^SYSTEMD=(\S*)", out),
            failed_units=_first(r"^FAILED-UNITS:(.*)$", out).strip(),
            startup=_first(r"^(Startup finished in .*)$", out),
            ping=_first(r"^(\d+ packets transmitted.*)$", out),
            sent=Counter((md5, int(size)) for md5, size in re.findall(r"^GUEST-MD5 (\w+) (\d+)$", out, re.M)),
            received=received,
            broken_streams=broken,
            nc_failures=re.findall(r"^NC-EXIT (\w+ [1-9]\d*)$", out, re.M),
            virtio_problems=re.findall(r"^VIRTIO-PROBLEM (.*)$", out, re.M),
            blk=(
                _first(r"^BLK-WRITTEN (\w+)", out),
                _first(r"^BLK-READ (\w+)", out),
                _first(r"^HOST-BLK (\w+)", lab),
            ),
            fsck_exit=_first(r"^FSCK-EXIT (\d+)", lab),
            done="GUEST-DONE" in out,
            jail=json.loads(_first(r"^JAIL-FACTS (\{.*\})$", lab) or "{}"),
        )


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    return match.group(1) if match else ""


__all__ = ["DEVICE_ERRORS", "STREAMS", "DistroFacts", "distro_scenario", "guest_command"]

"""vhost-user-blk: kvmpy's front end against a real qemu-storage-daemon, and against a hostile one.

The guest is the ring-3 virtio-blk driver of the test kit (guests/virtio_blk.c): it reads
sector 3, writes 0xa5 over sector 5, flushes, then reads sector 3 ``reads`` more times.
With a vhost-user disk every one of those requests goes from the guest's ring to the
daemon and back through eventfds: kvmpy's Python never sees them.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.process import kvmpy, start_kvmpy
from kvmpy.virtio.vhost import user_client
from kvmpy.virtio.vhost.storage_daemon import daemon_arguments, image_format
from kvmpy.virtio.vhost.user_client import VhostUserClient, VhostUserError
from kvmpy.vmm.config import DiskConfig

DAEMON = shutil.which("qemu-storage-daemon")
needs_daemon = pytest.mark.skipif(DAEMON is None, reason="qemu-storage-daemon is not installed")


def _image(path: Path) -> Path:
    """64 sectors, byte i in every byte of sector i (what the guest checks)."""
    path.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
    return path


# --- configuration ----------------------------------------------------------------------------
def test_disk_options_for_vhost_user() -> None:
    disk = DiskConfig.parse("/img.qcow2,backend=vhost-user,format=qcow2,aio=io_uring,id=root")
    assert (disk.backend, disk.format, disk.aio, disk.id, disk.vhost_user) == (
        "vhost-user", "qcow2", "io_uring", "root", True
    )  # fmt: skip
    user = DiskConfig.parse("socket=/run/blk.sock,id=data")
    assert user.socket == Path("/run/blk.sock") and user.vhost_user and user.id == "data"
    assert not DiskConfig.parse("/img").vhost_user


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/img,format=qcow2", "need backend=vhost-user"),
        ("/img,backend=vhost-user,bandwidth=1M", "cannot be rate-limited"),
        ("socket=/s,readonly=on", "the daemon at the socket decides"),
        ("/img,backend=nbd", "invalid --disk option 'backend=nbd'"),
        ("socket=", "it needs a path"),
    ],
)
def test_bad_vhost_user_disk_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DiskConfig.parse(text)


def test_a_qcow2_image_needs_the_daemon(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    assert image_format(image) == "qcow2" and image_format(_image(tmp_path / "raw")) == "raw"
    with pytest.raises(ConfigError, match="is a qcow2 image: serve it with backend=vhost-user"):
        DiskConfig.parse(str(image)).check_usable()
    DiskConfig.parse(f"{image},backend=vhost-user").check_usable()


def test_a_socket_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a Unix socket"):
        DiskConfig.parse(f"socket={tmp_path / 'none'}").check_usable()


def test_daemon_command_line_escapes_commas(tmp_path: Path) -> None:
    arguments = daemon_arguments(
        Path("/a,b.img"), tmp_path / "s", fmt="raw", read_only=True, direct=True, aio="native", queues=2
    )
    assert "filename=/a,,b.img" in arguments[2] and "cache.direct=on" in arguments[2]
    assert "aio=native" in arguments[2] and "read-only=on" in arguments[4]
    assert "writable=off" in arguments[6] and "num-queues=2" in arguments[6]


# --- shared guest memory ------------------------------------------------------------------------
def test_shared_guest_memory_is_a_sealed_memfd_another_mapping_sees() -> None:
    memory = GuestMemory.anonymous([(0, 1 << 20), (1 << 32, 1 << 20)], shared=True)
    try:
        assert memory.shared
        region = memory.regions[1]
        other = mmap.mmap(region.fd, region.size, flags=mmap.MAP_SHARED)  # the back end's view
        memory.write((1 << 32) + 100, b"kvmpy")
        assert other[100:105] == b"kvmpy"
        other.close()
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 4096)  # a back end's mapping can never lose its pages
    finally:
        memory.close()
    assert not GuestMemory.anonymous([(0, 1 << 20)]).shared


# --- the protocol against a scripted, hostile back end -------------------------------------
Answer = Callable[[int, bytes], bytes | None]


@pytest.fixture
def scripted() -> Iterator[Callable[[Answer], VhostUserClient]]:
    """A client connected to a back end that answers each request with ``answer(request,
    payload)`` (raw bytes to send, None for silence)."""
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def connect(answer: Answer) -> VhostUserClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.extend((ours, theirs))

        def serve() -> None:
            while True:
                try:
                    header = theirs.recv(vu.HEADER.size)
                except OSError:
                    return
                if len(header) < vu.HEADER.size:
                    return
                request, _, size = vu.HEADER.unpack(header)
                payload = theirs.recv(size) if size else b""
                reply = answer(request, payload)
                if reply is not None:
                    theirs.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return VhostUserClient(ours, "scripted")

    yield connect
    for sock in sockets:
        sock.close()
    for thread in threads:
        thread.join(2)


def _reply(request: int, payload: bytes, flags: int = vu.VERSION | vu.FLAG_REPLY) -> bytes:
    return vu.HEADER.pack(request, flags, len(payload)) + payload


def test_features_are_read(scripted: Callable[[Answer], VhostUserClient]) -> None:
    client = scripted(lambda request, _: _reply(request, vu.U64.pack(0x1_0000_0206)))
    assert client.get_u64(vu.GET_FEATURES) == 0x1_0000_0206


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda request, _: _reply(request + 1, vu.U64.pack(0)), "answered request 2"),
        (lambda request, _: _reply(request, vu.U64.pack(0), flags=vu.VERSION), "with flags 0x1"),
        (lambda request, _: _reply(request, b"\0" * 4), "replied with 4 bytes, not 8"),
        (lambda request, _: vu.HEADER.pack(request, 5, 1 << 20), "sent a 1048576-byte reply"),
    ],
    ids=["wrong-request", "not-a-reply", "short", "huge"],
)
def test_nonsense_from_the_back_end_is_one_error(
    scripted: Callable[[Answer], VhostUserClient], answer: Answer, message: str
) -> None:
    client = scripted(answer)
    with pytest.raises(VhostUserError, match=f"GET_FEATURES failed: .*{message}"):
        client.get_u64(vu.GET_FEATURES)


def test_a_silent_back_end_times_out(
    scripted: Callable[[Answer], VhostUserClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(user_client, "TIMEOUT", 0.2)
    client = scripted(lambda request, _: None)
    client._sock.settimeout(0.2)
    with pytest.raises(VhostUserError, match="did not answer within 0.2 s"):
        client.get_u64(vu.GET_FEATURES)


def test_a_refused_request_under_reply_ack(scripted: Callable[[Answer], VhostUserClient]) -> None:
    client = scripted(lambda request, _: _reply(request, vu.U64.pack(1)))
    client.protocol_features = vu.PROTOCOL_F_REPLY_ACK
    with pytest.raises(VhostUserError, match="SET_OWNER failed: the back end refused it"):
        client.tell(vu.SET_OWNER)


def test_a_closed_connection_is_seen_between_requests(scripted: Callable[[Answer], VhostUserClient]) -> None:
    client = scripted(lambda request, _: None)
    assert client.hung_up() is None
    client._sock.shutdown(socket.SHUT_RD)  # what a dead back end looks like from here
    assert client.hung_up() == "it closed its connection"


# --- a real qemu-storage-daemon -----------------------------------------------------------------
def _run(guests: Path, disk: str, reads: int = 50, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return kvmpy(
        "run", "--kernel", str(guests / "virtio_blk.elf"), "--cmdline", f"reads={reads}",
        "--disk", disk, "--serial", "stdio", "--stats", timeout=timeout,
    )  # fmt: skip


@needs_daemon
@pytest.mark.kvm
def test_the_guest_driver_reads_and_writes_through_qemu_storage_daemon(guests: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img")
    done = _run(guests, f"{image},backend=vhost-user", reads=200)
    assert done.returncode == 0, done.stderr
    assert "virtio_blk ok, capacity 64 sectors" in done.stdout
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512  # written by the daemon, flushed
    # 203 requests, and only the set-up exited: kicks and interrupts never reached Python.
    bar0 = next(line for line in done.stderr.splitlines() if line.startswith("virtio-blk0 BAR0"))
    reads, writes = (int(field) for field in bar0.split()[3:5])
    assert reads + writes < 30, bar0
    leftover = subprocess.run(["pgrep", "-f", str(image)], capture_output=True, text=True).stdout
    assert not leftover, "the daemon outlived its VM"


@needs_daemon
@pytest.mark.kvm
def test_a_qcow2_image_through_the_daemon(guests: Path, tmp_path: Path) -> None:
    raw = _image(tmp_path / "disk.img")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    done = _run(guests, f"{image},backend=vhost-user")
    assert done.returncode == 0, done.stderr
    assert "virtio_blk ok, capacity 64 sectors" in done.stdout
    back = tmp_path / "back.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(back)], check=True)
    assert back.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512
    assert raw.read_bytes()[5 * 512 : 6 * 512] == b"\x05" * 512  # the qcow2 is its own image


@needs_daemon
@pytest.mark.kvm
def test_a_daemon_the_user_runs(guests: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img")
    sock = tmp_path / "blk.sock"
    daemon = _user_daemon(image, sock)
    try:
        done = _run(guests, f"socket={sock}")
        assert done.returncode == 0, done.stderr
        assert "virtio_blk ok, capacity 64 sectors" in done.stdout
        assert daemon.poll() is None  # kvmpy leaves the user's daemon running
    finally:
        daemon.terminate()
        daemon.wait(10)
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512


def _storage_daemons(pid: int) -> list[int]:
    """qemu-storage-daemon children of ``pid`` (threads come and go while we look)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
            found.extend(c for c in children if "storage" in Path(f"/proc/{c}/comm").read_text())
        except OSError:
            continue
    return found


@needs_daemon
@pytest.mark.kvm
def test_a_killed_daemon_fails_the_disk_and_the_vm_goes_on(guests: Path, tmp_path: Path) -> None:
    """The guest's next request completes with VIRTIO_BLK_S_IOERR (its driver exits 6)."""
    image = _image(tmp_path / "disk.img")
    vm = start_kvmpy(
        "run", "--kernel", str(guests / "virtio_blk.elf"), "--cmdline", "reads=100000000",
        "--disk", f"{image},backend=vhost-user", "--serial", "stdio",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        daemons: list[int] = []
        while not daemons and time.monotonic() < deadline:
            daemons = _storage_daemons(vm.pid)
            time.sleep(0.05)
        assert daemons, "kvmpy started no qemu-storage-daemon"
        time.sleep(1.0)  # the guest is in its read loop by now
        os.kill(daemons[0], signal.SIGKILL)
        out, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == 6, (out, err)  # the guest saw an I/O error and gave up, cleanly
    assert "closed its connection; its requests now fail with I/O errors" in err
    assert "Traceback" not in err


@needs_daemon
@pytest.mark.kvm
def test_a_daemon_that_cannot_start_is_one_line(guests: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"QFI\xfb" + bytes(100))  # a qcow2 magic with a broken header
    done = _run(guests, f"{image},backend=vhost-user")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "qemu-storage-daemon for" in lines[0] and "did not start" in lines[0]


@pytest.mark.kvm
def test_memory_option_shared(guests: Path) -> None:
    done = kvmpy("run", "--kernel", str(guests / "hello.elf"), "--memory", "64M,shared=yes")
    assert done.returncode != 0 and "invalid --memory option 'shared=yes'" in done.stderr
    done = kvmpy("run", "--kernel", str(guests / "hello.elf"), "--memory", "64M,shared=on")
    assert done.returncode == 0, done.stderr


def _user_daemon(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        daemon_arguments(image, sock, fmt="raw", read_only=False, direct=False, aio="", queues=1),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return daemon


@needs_daemon
@pytest.mark.kvm
def test_firecracker_config_with_a_vhost_user_drive(guests: Path, tmp_path: Path) -> None:
    """Firecracker's drive ``socket`` (its vhost-user-block) in a config file drives kvmpy."""
    image = _image(tmp_path / "disk.img")
    sock = tmp_path / "blk.sock"
    config = {
        "boot-source": {"kernel_image_path": str(guests / "virtio_blk.elf"), "boot_args": "reads=5"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "data", "is_root_device": False, "socket": str(sock)}],
    }
    (tmp_path / "vm.json").write_text(json.dumps(config))
    daemon = _user_daemon(image, sock)
    try:
        done = kvmpy("run", "--no-api", "--config-file", str(tmp_path / "vm.json"), "--serial", "stdio")
    finally:
        daemon.terminate()
        daemon.wait(10)
    assert done.returncode == 0, done.stderr
    assert "virtio_blk ok, capacity 64 sectors" in done.stdout
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512


@pytest.mark.kvm
def test_vhost_user_under_seccomp_is_refused_in_one_line(guests: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img")
    done = _run_with(guests, "--seccomp", "--disk", f"{image},backend=vhost-user")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "cannot run under --seccomp or --jail yet" in lines[0]


def _run_with(guests: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return kvmpy("run", "--kernel", str(guests / "virtio_blk.elf"), *args)


@needs_daemon
@pytest.mark.kvm
def test_a_snapshot_of_a_vm_with_a_vhost_user_disk_is_refused_and_the_vm_goes_on(
    guests: Path, tmp_path: Path
) -> None:
    from kvmpy.testing.console import CapturedConsole
    from kvmpy.testing.vmm_client import run_with_client
    from kvmpy.vmm import actions as a
    from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
    from kvmpy.vmm.vmm import Vmm

    image = _image(tmp_path / "disk.img")
    disk = DiskConfig.parse(f"{image},backend=vhost-user")
    config = VmConfig(kernel=guests / "virtio_blk.elf", cmdline="reads=100000000", disks=(disk,),
                      serial=SerialConfig(SerialMode.NONE))  # fmt: skip
    vmm = Vmm(config, serial_sink=CapturedConsole())
    vmm.submit(a.StartInstance())

    def client() -> None:
        vmm.submit(a.Pause())
        with pytest.raises(a.ActionError, match="is a vhost-user device: its requests live in another"):
            vmm.submit(a.CreateSnapshot(tmp_path / "state", tmp_path / "memory"))
        vmm.submit(a.Resume())
        time.sleep(0.3)
        assert vmm.submit(a.GetInstanceInfo()).state.value == "Running"  # type: ignore[attr-defined]
        assert not (tmp_path / "state").exists()  # no half-made snapshot left behind

    run_with_client(vmm, client)
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512  # the guest kept going through it


@needs_daemon
@pytest.mark.kvm
def test_a_lost_daemon_is_started_again_and_the_disk_works_on(guests: Path, tmp_path: Path) -> None:
    """PATCH /drives/{id} with ``reconnect`` after kvmpy's daemon died: a new daemon takes the
    rings from where kvmpy's failing left them, and the guest's reads succeed again."""
    from kvmpy.testing.console import CapturedConsole, wait_until
    from kvmpy.testing.vmm_client import run_with_client
    from kvmpy.virtio.vhost.user_device import VhostUserDevice
    from kvmpy.vmm import actions as a
    from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
    from kvmpy.vmm.vmm import Vmm

    image = _image(tmp_path / "disk.img")
    disk = DiskConfig.parse(f"{image},backend=vhost-user,id=data")
    config = VmConfig(kernel=guests / "virtio_blk.elf", cmdline="reads=40000 tolerate=1", disks=(disk,),
                      serial=SerialConfig(SerialMode.NONE))  # fmt: skip
    console = CapturedConsole()
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())

    def client() -> None:
        machine = vmm.machine
        assert machine is not None
        device = machine.disks["data"].device
        assert isinstance(device, VhostUserDevice)
        with pytest.raises(a.ActionError, match="still connected"):
            vmm.submit(a.UpdateBlockDevice("data", reconnect=True))
        time.sleep(0.3)
        machine.daemons[0]._process.kill()
        wait_until(lambda: device.lost is not None, 10, "kvmpy to see the daemon gone")
        wait_until(lambda: device.failed_requests > 0, 10, "a request to fail")
        vmm.submit(a.UpdateBlockDevice("data", reconnect=True))
        assert device.lost is None
        wait_until(lambda: finished.search(console.text) is not None, 60, "the guest to finish its reads")

    finished = re.compile(r"virtio_blk ok, capacity 64 sectors, failed reads (\d+)\n")
    run_with_client(vmm, client)
    found = finished.search(console.text)
    assert found, console.text[-500:]
    assert int(found.group(1)) > 0, found.group(0)  # some failed while it was gone
    assert len(vmm.machine.daemons if vmm.machine else []) in (0, 2)

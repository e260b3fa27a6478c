"""virtio-fs through a real virtiofsd: the device's configuration and its failure replies
without KVM, the supervisor, the --fs option, and the FUSE client guest end to end.

The guest tests are marked ``kvm``; everything that needs virtiofsd skips where
/usr/lib/qemu/virtiofsd is missing.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import ConfigError, HostError
from kvmpy.testing.console import wait_until
from kvmpy.testing.process import SOURCE, kvmpy, read_until, start_kvmpy
from kvmpy.virtio.queue import DescriptorChain
from kvmpy.virtio.vhost import daemon_process
from kvmpy.virtio.vhost.daemon_process import DaemonProcess
from kvmpy.virtio.vhost.user_client import VhostUserClient
from kvmpy.virtio.vhost.user_fs import TYPE_FS, VhostUserFs, check_tag, fs_config
from kvmpy.virtio.vhost.virtiofsd import BINARY, Virtiofsd, virtiofsd_arguments
from kvmpy.vmm.config import FsConfig, VmConfig

needs_virtiofsd = pytest.mark.skipif(not os.access(BINARY, os.X_OK), reason=f"{BINARY} is not installed")
WRITTEN = "written by the kvmpy virtio_fs guest\n"


# --- the configuration space and the failure replies (no KVM, no daemon) --------------------
class ScriptedClient:
    """The few requests VhostUserDevice makes while it is built, answered like virtiofsd 7.2."""

    name = "scripted"

    def __init__(self, queue_num: int = 2) -> None:
        self.answers = {vu.GET_FEATURES: 0x175000000, vu.GET_QUEUE_NUM: queue_num}
        self.told: list[int] = []

    def get_u64(self, request: int) -> int:
        return self.answers[request]

    def negotiate_protocol(self, wanted: int) -> int:
        return wanted & (vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK)  # no PROTOCOL_F_CONFIG

    def tell(self, request: int, payload: bytes = b"") -> None:
        self.told.append(request)

    def fileno(self) -> int:
        return -1


def scripted_fs(tag: str = "share", queue_num: int = 2) -> VhostUserFs:
    client = ScriptedClient(queue_num)
    return VhostUserFs(client, "virtio-fs0", lambda fd, handler: None, lambda fd: None, tag=tag)  # type: ignore[arg-type]


def test_configuration_space_is_the_tag_then_the_request_queue_count() -> None:
    device = scripted_fs("docs")
    assert device.device_type == TYPE_FS == 26
    assert device.read_config(0, 40) == b"docs" + bytes(32) + struct.pack("<I", 1)
    assert device.queue_sizes == (128, 128)  # hiprio, then the one request queue
    assert device.features == 0x130000000  # VERSION_1, INDIRECT_DESC, EVENT_IDX of what it offers


def test_a_36_byte_tag_fills_the_field_without_a_terminator() -> None:
    tag = "t" * 36
    assert fs_config(tag, 1) == tag.encode() + b"\x01\x00\x00\x00"


@pytest.mark.parametrize("tag", ["", "t" * 37, "a\0b", "é" * 19])
def test_tags_that_do_not_fit_are_refused(tag: str) -> None:
    with pytest.raises(ConfigError, match="1 to 36 bytes"):
        check_tag(tag)


def test_a_back_end_with_too_few_queues_is_refused() -> None:
    with pytest.raises(HostError, match="cannot serve 2 queues"):
        scripted_fs(queue_num=1)


def request(opcode: int, unique: int, body: bytes = b"") -> bytes:
    return struct.pack("<IIQQIIII", 40 + len(body), opcode, unique, 1, 0, 0, 0, 0) + body


def test_a_request_after_the_back_end_is_lost_is_answered_with_eio() -> None:
    raw = request(15, 0x1122334455667788, bytes(40))
    first, second = bytearray(10), bytearray(100)  # the reply header straddles two buffers
    chain = DescriptorChain(0, [memoryview(bytearray(raw[:7])), memoryview(bytearray(raw[7:]))],
                            [memoryview(first), memoryview(second)])  # fmt: skip
    assert scripted_fs().fail_request(chain) == 16
    length, error, unique = struct.unpack("<IiQ", bytes(first + second[:6]))
    assert (length, error, unique) == (16, -errno.EIO, 0x1122334455667788)
    assert second[6:] == bytes(94)


def test_forget_and_short_chains_get_no_reply() -> None:
    device = scripted_fs()
    forget = DescriptorChain(0, [memoryview(bytearray(request(2, 9, bytes(8))))], [])
    assert device.fail_request(forget) == 0
    short = DescriptorChain(1, [memoryview(bytearray(20))], [memoryview(bytearray(64))])
    assert device.fail_request(short) == 0
    no_room = DescriptorChain(2, [memoryview(bytearray(request(15, 3)))], [memoryview(bytearray(15))])
    assert device.fail_request(no_room) == 0
    assert bytes(no_room.writable[0]) == bytes(15)


# --- the supervisor -----------------------------------------------------------------------------
def test_virtiofsd_command_line_escapes_commas_in_the_directory() -> None:
    arguments = virtiofsd_arguments(Path("/srv/a,b"), Path("/run/x/fs.sock"))
    assert arguments[:3] == [str(BINARY), "-f", "--socket-path=/run/x/fs.sock"]
    assert "source=/srv/a\\,b" in arguments
    assert "sandbox=namespace" in arguments


#: A daemon in Python: it listens on SOCKET, then sleeps.
LISTEN = (
    "import socket, time; s = socket.socket(socket.AF_UNIX); s.bind('SOCKET'); s.listen(); time.sleep(60)"
)


class PythonDaemon(DaemonProcess):
    def __init__(self, code: str, prepare: Callable[[], None] | None = None) -> None:
        super().__init__("test daemon", "test.sock")
        self._start([sys.executable, "-c", code.replace("SOCKET", str(self.socket))], prepare)


def _refuse() -> None:
    os.write(2, b"prepare refused\n")
    os._exit(1)


def test_a_failed_preparation_in_the_child_is_the_error() -> None:
    with pytest.raises(HostError, match="test daemon did not start: prepare refused$"):
        PythonDaemon(LISTEN, _refuse)


def test_a_daemon_that_fails_to_start_reports_its_last_line() -> None:
    with pytest.raises(HostError, match="test daemon did not start: the last words$"):
        PythonDaemon("import sys; print('first', file=sys.stderr); sys.exit('the last words')")


def test_a_daemon_has_started_once_its_socket_listens_not_when_it_is_bound() -> None:
    daemon = PythonDaemon(LISTEN.replace("s.listen()", "time.sleep(0.3); s.listen()"))
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(daemon.socket))  # refused if start-up ended at bind()
    finally:
        daemon.stop()


def test_a_daemon_that_ignores_sigterm_is_killed_and_its_directory_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon_process, "STOP_TIMEOUT", 0.2)
    daemon = PythonDaemon("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + LISTEN)
    assert daemon.running()
    directory = daemon.socket.parent
    daemon.stop()
    assert not daemon.running()
    assert not directory.exists()


STARTER = """
import sys
from kvmpy.virtio.vhost.daemon_process import DaemonProcess
class Sleeper(DaemonProcess):
    def __init__(self):
        super().__init__("sleeper", "s.sock")
        self._start([sys.executable, "-c", LISTEN.replace("SOCKET", str(self.socket))])
LISTEN = {listen!r}
daemon = Sleeper()
print(daemon.pid, daemon.socket.parent, flush=True)
input()
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_daemon_gets_sigterm_when_the_process_that_started_it_dies() -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER.format(listen=LISTEN)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SOURCE)),
    )
    assert starter.stdout is not None
    pid, directory = starter.stdout.readline().split()
    try:
        assert _alive(int(pid))
        starter.kill()  # no stop(): only PR_SET_PDEATHSIG can end the daemon now
        starter.wait()
        wait_until(lambda: not _alive(int(pid)), timeout=10, what="the daemon to die with its parent")
    finally:
        if _alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


@needs_virtiofsd
def test_virtiofsd_listens_and_answers_the_handshake(tmp_path: Path) -> None:
    daemon = Virtiofsd(tmp_path)
    try:
        client = VhostUserClient.connect(daemon.socket)
        device = VhostUserFs(client, "virtio-fs0", lambda fd, handler: None, lambda fd: None, tag="share")
        assert device.features & (1 << 32)  # VIRTIO_F_VERSION_1
        assert client.protocol_features & vu.PROTOCOL_F_REPLY_ACK
        assert device.read_config(0, 5) == b"share"
        device.close()
    finally:
        daemon.stop()
    assert not daemon.running()
    assert not daemon.socket.parent.exists()


def test_a_file_is_not_a_shared_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        Virtiofsd(tmp_path / "file")


# --- the --fs option ----------------------------------------------------------------------------
def test_fs_option_parses(tmp_path: Path) -> None:
    share = FsConfig.parse(f"tag=share,path={tmp_path}")
    assert share == FsConfig("share", tmp_path, False)
    assert FsConfig.parse(f"path={tmp_path},tag=t,readonly=on") == FsConfig("t", tmp_path, True)
    assert VmConfig(filesystems=(share,)).needs_shared_memory
    assert not VmConfig().needs_shared_memory


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("tag=share", "it needs tag=NAME and path=DIR"),
        ("path={dir}", "it needs tag=NAME and path=DIR"),
        ("tag=share,path={dir}/missing", "is not a directory"),
        ("tag=share,path={dir},cache=always", "invalid --fs option 'cache=always'"),
        ("tag=" + "t" * 37 + ",path={dir}", "must be 1 to 36 bytes"),
        ("tag=share,path={dir},readonly=yes", "invalid --fs option 'readonly=yes'"),
    ],
)
def test_bad_fs_options_are_one_line_errors(tmp_path: Path, option: str, message: str) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0" * 64)
    done = kvmpy("run", "--kernel", str(kernel), "--fs", option.format(dir=tmp_path))
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_tag_given_twice_is_an_error(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0" * 64)
    share = f"tag=share,path={tmp_path}"
    done = kvmpy("run", "--kernel", str(kernel), "--fs", share, "--fs", share)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "kvmpy: error: --fs tag 'share' is given twice: each share needs its own tag"
    ]


# --- the guest, through virtiofsd ---------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _virtiofsd_pids(pid: int) -> list[int]:
    """The virtiofsd processes below ``pid``, outermost first."""
    found, todo = [], _children(pid)
    while todo:
        child = todo.pop(0)
        try:
            if Path(f"/proc/{child}/exe").resolve() == BINARY.resolve():
                found.append(child)
        except OSError:
            continue
        todo += _children(child)
    return found


def _running_virtiofsd_on(directory: Path) -> list[int]:
    """Processes whose command line names ``directory`` (none should outlive kvmpy)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"source={directory}".encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def share(tmp_path: Path) -> Path:
    directory = tmp_path / "share"
    directory.mkdir()
    (directory / "hello.txt").write_text(f"hello from the host, pid {os.getpid()} at {time.time()}\n")
    return directory


def fs_guest(guests: Path, cmdline: str, fs: str) -> list[str]:
    """kvmpy's arguments for the FUSE client guest with one share."""
    return ["run", "--kernel", str(guests / "virtio_fs.elf"), "--cmdline", cmdline, "--fs", fs]


@pytest.mark.kvm
@needs_virtiofsd
def test_the_guest_reads_a_host_file_and_writes_one_the_host_sees(guests: Path, share: Path) -> None:
    done = kvmpy(*fs_guest(guests, "file=hello.txt new=made.txt", f"tag=hostshare,path={share}"))
    assert done.returncode == 0, done.stdout + done.stderr
    content = (share / "hello.txt").read_text()
    assert f"virtio_fs read {len(content)} bytes: [{content}]" in done.stdout
    assert "virtio_fs ok, tag hostshare" in done.stdout
    assert (share / "made.txt").read_text() == WRITTEN
    assert _running_virtiofsd_on(share) == []


@pytest.mark.kvm
@needs_virtiofsd
def test_a_read_only_share_reads_and_refuses_writes_with_erofs(guests: Path, share: Path) -> None:
    done = kvmpy(*fs_guest(guests, "file=hello.txt new=made.txt", f"tag=share,path={share},readonly=on"))
    assert done.returncode == 8, done.stdout + done.stderr  # CREATE failed
    content = (share / "hello.txt").read_text()
    assert f"[{content}]" in done.stdout
    assert "writing made.txt failed, error 30" in done.stdout  # EROFS
    assert not (share / "made.txt").exists()
    assert str(share) not in Path("/proc/self/mounts").read_text()  # the bind mount was virtiofsd's own


@pytest.mark.kvm
@needs_virtiofsd
def test_a_missing_file_fails_the_lookup(guests: Path, share: Path) -> None:
    done = kvmpy(*fs_guest(guests, "file=absent.txt", f"tag=share,path={share}"))
    assert done.returncode == 4, done.stdout + done.stderr


def _start_reading_loop(guests: Path, share: Path) -> subprocess.Popen[str]:
    """kvmpy with the guest reading a file again and again (until_eio=1), once it has begun."""
    vm = start_kvmpy(*fs_guest(guests, "file=hello.txt until_eio=1", f"tag=share,path={share}"))
    seen = read_until(vm, lambda out: "reading until an error" in out)
    if "reading until an error" not in seen:
        vm.kill()
        vm.wait()
        raise AssertionError(f"the guest did not start its loop: {seen}")
    return vm


@pytest.mark.kvm
@needs_virtiofsd
def test_killing_virtiofsd_fails_the_requests_with_eio_and_the_vm_ends(guests: Path, share: Path) -> None:
    vm = _start_reading_loop(guests, share)
    try:
        daemons = _virtiofsd_pids(vm.pid)
        assert daemons, "no virtiofsd below kvmpy"
        os.kill(daemons[-1], signal.SIGKILL)  # the one serving the queues (inside its namespaces)
        out, err = vm.communicate(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    assert vm.returncode == 0, out + err
    assert "virtio_fs error 5 after " in out
    assert "its requests now fail with I/O errors" in err
    assert _running_virtiofsd_on(share) == []


@pytest.mark.kvm
@needs_virtiofsd
def test_no_virtiofsd_outlives_a_killed_kvmpy(guests: Path, share: Path) -> None:
    vm = _start_reading_loop(guests, share)
    try:
        daemons = _running_virtiofsd_on(share)
        assert daemons
        argument = next(
            a for a in Path(f"/proc/{daemons[0]}/cmdline").read_bytes().split(b"\0") if b"socket-path" in a
        )
        private = Path(os.fsdecode(argument.partition(b"=")[2])).parent
    finally:
        vm.kill()  # no clean-up in kvmpy: its end of the socket closes, and virtiofsd gets SIGTERM
        vm.wait()
    wait_until(lambda: not _running_virtiofsd_on(share), timeout=10, what="virtiofsd to exit")
    assert private.is_dir()  # what a killed kvmpy leaves behind: the test removes it
    shutil.rmtree(private)

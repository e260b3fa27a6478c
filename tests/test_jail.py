"""The jail around the VMM (issue 14): its layout, the cell's walls, and a VM inside it.

As Firecracker tests its jailer: the chroot hierarchy with owners and modes, the device
nodes, cgroup values read back with the pid in the cgroup, resource limits in effect,
/proc/PID/status of the jailed process, namespaces that differ from the parent's; then
escape attempts made from inside the jailed process (``--jail-probe`` runs them there in
place of the VMM) and VMs that run to their end jailed. The seccomp filters have their own
tests (tests/test_jail_seccomp.py); these run with ``--no-seccomp`` where a probe must live
through a denied attempt to report the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmpy.testing.console import wait_until
from kvmpy.testing.process import kvmpy, proc_status, read_until, start_kvmpy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail is built as root")

UID = GID = 4242  # no such user: the jail does not need one
PARENT = "kvmpy-test-jail"

#: Escape attempts, run in the jailed process; each prints NAME ALLOWED or NAME DENIED ERRNO.
ATTEMPTS = r"""
import errno, json, os, socket
def attempt(name, fn):
    try:
        fn()
        print(name, "ALLOWED", flush=True)
    except OSError as error:
        print(name, "DENIED", errno.errorcode.get(error.errno, error.errno), flush=True)
from kvmpy.jail import libc
attempt("open-host-file", lambda: open("/etc/passwd"))
attempt("open-host-dir", lambda: os.listdir("/usr"))
attempt("write-in-jail", lambda: open("/scratch", "w").write("x"))
attempt("mknod-disk", lambda: os.mknod("/dev/sda", stat_mode, os.makedev(8, 0)))
attempt("setuid-root", lambda: os.setuid(0))
attempt("exec", lambda: os.execv("/kernel.elf", ["kernel.elf"]))
attempt("mount-tmpfs", lambda: libc.mount("none", "/", "tmpfs", 0))
attempt("symlink", lambda: os.symlink("/", "/escape"))
attempt("chroot-again", lambda: os.chroot("/dev"))
print("FACTS", json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "hostname": socket.gethostname(), "root": sorted(os.listdir("/")), "environ": dict(os.environ)}))
""".replace("stat_mode", str(stat.S_IFBLK | 0o600))


@pytest.fixture
def base(tmp_path: Path):
    """A chroot base directory; the cgroups the tests made are removed after them."""
    yield tmp_path / "jails"
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        parent = hierarchy / PARENT
        if parent.is_dir():
            for child in sorted(parent.iterdir(), reverse=True):
                if child.is_dir():
                    child.rmdir()
            parent.rmdir()


def _jailer(base: Path, vm_id: str, *extra: str) -> list[str]:
    return [
        "jailer", "--id", vm_id, "--exec-file", shutil.which("true") or "/bin/true", "--uid", str(UID),
        "--gid", str(GID), "--chroot-base-dir", str(base), "--parent-cgroup", PARENT, *extra,
    ]  # fmt: skip


def _results(stdout: str) -> dict[str, str]:
    return {
        line.split()[0]: " ".join(line.split()[1:])
        for line in stdout.splitlines()
        if line.split()[1:2] in (["ALLOWED"], ["DENIED"])
    }


def _facts(stdout: str) -> dict[str, object]:
    line = next(line for line in stdout.splitlines() if line.startswith("FACTS "))
    found: dict[str, object] = json.loads(line[len("FACTS ") :])
    return found


def test_escape_attempts_from_inside_the_jail_fail(base: Path, guests: Path) -> None:
    root = base / "true" / "escape" / "root"
    root.mkdir(parents=True)
    shutil.copy(guests / "hello.elf", root / "kernel.elf")
    done = kvmpy(
        *_jailer(base, "escape", "--no-seccomp", "--jail-probe", ATTEMPTS), "--", "--kernel", "/kernel.elf"
    )
    assert done.returncode == 0, done.stderr
    results = _results(done.stdout)
    assert results == {
        "open-host-file": "DENIED ENOENT",  # the host's file system is not there
        "open-host-dir": "DENIED ENOENT",
        "write-in-jail": "ALLOWED",  # the VMM writes its sockets and snapshots in its root
        "mknod-disk": "DENIED EACCES",  # Landlock (and no CAP_MKNOD)
        "setuid-root": "DENIED EPERM",
        "exec": "DENIED EACCES",  # Landlock: nothing executes, not even a file in the jail
        "mount-tmpfs": "DENIED EPERM",
        "symlink": "DENIED EACCES",
        "chroot-again": "DENIED EPERM",
    }, done.stdout
    facts = _facts(done.stdout)
    assert (facts["uid"], facts["gid"], facts["groups"]) == (UID, GID, [])
    assert facts["hostname"] == "escape"  # a UTS namespace of its own
    assert facts["environ"] == {}
    assert facts["root"] == ["dev", "kernel.elf", "scratch", "true.pid"]


def test_layout_owners_modes_and_device_nodes(base: Path, guests: Path) -> None:
    root = base / "true" / "layout" / "root"
    root.mkdir(parents=True)
    shutil.copy(guests / "hello.elf", root / "hello.elf")
    done = kvmpy(*_jailer(base, "layout"), "--", "--kernel", "/hello.elf")
    assert done.returncode == 0, done.stderr
    assert "Hello from a kvmpy test guest!" in done.stdout
    info = root.stat()
    assert (info.st_uid, info.st_gid) == (UID, GID)  # the VMM makes its API socket here
    kvm = (root / "dev" / "kvm").stat()
    assert stat.S_ISCHR(kvm.st_mode) and stat.S_IMODE(kvm.st_mode) == 0o600
    assert (kvm.st_uid, kvm.st_gid) == (UID, GID)
    assert kvm.st_rdev == os.stat("/dev/kvm").st_rdev
    if Path("/dev/net/tun").exists():
        assert (root / "dev" / "net" / "tun").stat().st_rdev == os.stat("/dev/net/tun").st_rdev
    assert sorted(p.name for p in root.iterdir()) == ["dev", "hello.elf", "true.pid"]
    assert int((root / "true.pid").read_text()) > 0


def _start_jailed_counter(
    base: Path, guests: Path, vm_id: str, *extra: str
) -> tuple[subprocess.Popen[str], Path]:
    root = base / "true" / vm_id / "root"
    root.mkdir(parents=True)
    shutil.copy(guests / "counter.elf", root / "counter.elf")
    process = start_kvmpy(*_jailer(base, vm_id, *extra), "--", "--kernel", "/counter.elf", "--cmdline",
                          "ticks=1000 gap=20000000")  # fmt: skip
    return process, root


def _wait_for_pid_file(root: Path, name: str = "true.pid") -> int:
    pid_file = root / name
    wait_until(lambda: pid_file.exists() and pid_file.read_text().isdigit(), what=f"a pid file in {root}")
    return int(pid_file.read_text())


def _status(pid: int) -> dict[str, str]:
    return proc_status(Path(f"/proc/{pid}/status"))


def _wait_for_uid(pid: int, uid: int) -> dict[str, str]:
    def jailed() -> bool:
        status = _status(pid)
        return status["Uid"].split()[0] == str(uid) and status["NoNewPrivs"] == "1"

    wait_until(jailed, what=f"process {pid} to become uid {uid}")
    return _status(pid)


def test_cgroup_v1_limits_and_process_status(base: Path, guests: Path) -> None:
    process, root = _start_jailed_counter(
        base, guests, "status", "--cgroup", "pids.max=64", "--cgroup", "cpuset.cpus=0",
        "--resource-limit", "no-file=512", "--no-seccomp",
    )  # fmt: skip
    try:
        pid = _wait_for_pid_file(root)
        status = _wait_for_uid(pid, UID)
        assert status["Gid"].split() == [str(GID)] * 4 and status["Groups"] == ""
        assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
        pids = Path("/sys/fs/cgroup/pids") / PARENT / "status"
        assert (pids / "pids.max").read_text().strip() == "64"
        assert str(pid) in (pids / "tasks").read_text().split()
        cpuset = Path("/sys/fs/cgroup/cpuset") / PARENT / "status"
        assert (cpuset / "cpuset.cpus").read_text().strip() == "0"
        assert str(pid) in (cpuset / "tasks").read_text().split()
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["512", "512"]
                   for line in limits.splitlines()), limits  # fmt: skip
        for namespace in ("mnt", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}")
        assert os.readlink(f"/proc/{pid}/root") == "/"  # pivot_root: its / is the jail's root
        assert Path(f"/proc/{pid}/root/counter.elf").exists()
    finally:
        process.kill()
        process.wait()


def test_cgroup_v2_membership(base: Path, guests: Path) -> None:
    unified = next((Path(line.split()[1]) for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[2] == "cgroup2"), None)  # fmt: skip
    if unified is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    process, root = _start_jailed_counter(base, guests, "unified", "--cgroup-version", "2", "--no-seccomp")
    try:
        pid = _wait_for_pid_file(root)
        _wait_for_uid(pid, UID)
        assert str(pid) in (unified / PARENT / "unified" / "cgroup.procs").read_text().split()
    finally:
        process.kill()
        process.wait()
        (unified / PARENT / "unified").rmdir()
        (unified / PARENT).rmdir()


def test_new_pid_namespace_and_pid_file(base: Path, guests: Path) -> None:
    process, root = _start_jailed_counter(base, guests, "pidns", "--new-pid-ns", "--no-seccomp")
    try:
        assert process.wait(timeout=30) == 0  # the jailer's own process ends, as Firecracker's does
        pid = _wait_for_pid_file(root)
        _wait_for_uid(pid, UID)
        assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert _status(pid)["NSpid"].split()[-1] == "1"  # PID 1 of its namespace
    finally:
        os.kill(pid, 9)


def test_file_size_limit_is_in_effect(base: Path) -> None:
    probe = (
        "import os\nfd = os.open('/big', os.O_WRONLY | os.O_CREAT)\nprint(os.write(fd, bytes(8192)))\n"
        "try:\n os.write(fd, b'x')\nexcept OSError as error:\n"
        " print('EFBIG' if error.errno == 27 else error)\n"
    )
    done = kvmpy(
        *_jailer(base, "fsize", "--resource-limit", "fsize=4096", "--no-seccomp", "--jail-probe", probe)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "EFBIG"]  # a short write to the limit, then nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--id", "bad/id"), "invalid jail id 'bad/id'"),
        (("--cgroup", "nonsense"), "invalid --cgroup 'nonsense'"),
        (("--resource-limit", "cpu=1"), "known limits are fsize and no-file"),
        (("--parent-cgroup", "../up"), "invalid --parent-cgroup '../up'"),
        (("--exec-file", "/no/such/kvmpy"), "--exec-file /no/such/kvmpy: no such file"),
        (
            ("--cgroup", "nosuchcontroller.max=1"),
            "no cgroup v1 hierarchy has the nosuchcontroller controller",
        ),
    ],
)
def test_bad_jail_options_are_one_line_errors(base: Path, args: tuple[str, ...], message: str) -> None:
    argv = _jailer(base, "bad", *args)
    if "--id" in args:  # the last --id given wins, as argparse does
        argv += ["--id", args[1]]
    done = kvmpy(*argv, "--", "--kernel", "/k")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.kvm
def test_run_jail_binds_the_files_and_the_api_socket(tmp_path: Path, base: Path, guests: Path) -> None:
    """kvmpy run --jail: the disk is bound writable into the jail, the API socket reached through a
    symlink at the path given, and the guest's writes reach the host's file."""
    from kvmpy.ctl.client import ApiClient

    disk = tmp_path / "records.img"
    disk.write_bytes(bytes(1 << 20))
    os.chown(disk, UID, GID)  # the jailed VMM opens it as its own user
    sock = tmp_path / "api.sock"
    process = start_kvmpy(
        "run", "--jail", "--jail-uid", str(UID), "--jail-gid", str(GID), "--chroot-base-dir", str(base),
        "--id", "bound", "--api-sock", str(sock), "--kernel", str(guests / "blk_records.elf"),
        "--disk", str(disk),
    )  # fmt: skip
    try:
        read_until(process, lambda seen: "record 50 ok" in seen)
        assert sock.is_symlink() and sock.resolve() == base / "kvmpy" / "bound" / "root" / "api.sock"
        info = ApiClient(str(sock)).get("/")
        assert (info["id"], info["state"]) == ("bound", "Running")
        process.terminate()
        assert process.wait(timeout=30) == 143, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert disk.read_bytes() != bytes(1 << 20)  # the guest's records are in the host's image


@pytest.fixture
def netns():
    """A network namespace made with iproute2, as a user of Firecracker's jailer makes one."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    name = f"kvmpy-jail-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield Path("/var/run/netns") / name
    subprocess.run(["ip", "netns", "delete", name], check=True)


def test_the_vmm_joins_the_network_namespace_given(base: Path, guests: Path, netns: Path) -> None:
    process, root = _start_jailed_counter(base, guests, "netns", "--netns", str(netns), "--no-seccomp")
    try:
        pid = _wait_for_pid_file(root)
        _wait_for_uid(pid, UID)
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns.stat().st_ino
    finally:
        process.kill()
        process.wait()


def test_daemonize_detaches_and_silences_the_vmm(base: Path, guests: Path) -> None:
    process, root = _start_jailed_counter(base, guests, "daemon", "--daemonize", "--no-seccomp")
    pid = _wait_for_pid_file(root)
    try:
        _wait_for_uid(pid, UID)
        assert os.getsid(pid) == pid  # a session of its own, no controlling terminal
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    finally:
        os.kill(pid, 9)
        process.wait()


@pytest.mark.kvm
def test_the_monitor_and_snapshots_work_from_inside_the_jail(
    tmp_path: Path, base: Path, guests: Path
) -> None:
    """The API socket, the monitor and a snapshot of a jailed VMM (paths inside its jail); the host
    frame is hidden (no /proc in the jail) and says so instead of failing."""
    sock = tmp_path / "api.sock"
    process = start_kvmpy(
        "run", "--jail", "--jail-uid", str(UID), "--jail-gid", str(GID), "--chroot-base-dir", str(base),
        "--id", "monitored", "--api-sock", str(sock), "--kernel", str(guests / "counter.elf"),
        "--cmdline", "gap=20000000",
    )  # fmt: skip
    root = base / "kvmpy" / "monitored" / "root"
    try:
        banner = read_until(process, lambda seen: "tick 1" in seen).split()[2]
        translated = kvmpy("ctl", str(sock), "translate", banner)
        assert translated.returncode == 0, translated.stderr
        assert "KVM_TRANSLATE: GPA 0x100dc0 (agrees)" in translated.stdout, translated.stdout
        assert "HPA unknown" in translated.stdout and "pagemap" in translated.stdout, translated.stdout
        regs = kvmpy("ctl", str(sock), "regs")
        assert regs.returncode == 0 and "EFER" in regs.stdout, regs.stderr
        (root / "snap").mkdir()
        os.chown(root / "snap", UID, GID)
        snapped = kvmpy("ctl", str(sock), "snapshot", "/snap")
        assert snapped.returncode == 0, snapped.stderr
        assert "where the VMM sees them" in snapped.stdout, snapped.stdout
        assert (root / "snap" / "memory").stat().st_size == 256 << 20
        assert (root / "snap" / "state").stat().st_uid == UID
        done = kvmpy("snapshot", "inspect", str(root / "snap" / "state"))
        assert done.returncode == 0, done.stderr
        assert read_until(process, lambda seen: "tick" in seen)  # it runs on after the snapshot
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 143


#: What a guest that took over the VMM might try once inside, with seccomp on: each ends the VMM
#: with the seccomp status and one line naming the call.
SECCOMP_ATTEMPTS = {
    "execve": "import os; os.execv('/kernel.elf', ['kernel.elf'])",
    "ptrace": "import ctypes; ctypes.CDLL(None).ptrace(16, 1, 0, 0)",  # PTRACE_ATTACH to PID 1
    "mount": "from kvmpy.jail import libc; libc.mount('none', '/', 'tmpfs', 0)",
    "clone": "import os; os.fork()",
    # an ioctl KVM has but kvmpy never makes (KVM_X86_SET_MCE), on the jail's own /dev/kvm
    "ioctl": "import fcntl, os; fcntl.ioctl(os.open('/dev/kvm', os.O_RDWR), 0x4040AE9C, bytes(64))",
}


@pytest.mark.parametrize("call", SECCOMP_ATTEMPTS)
def test_escape_attempts_under_seccomp_end_the_vmm(base: Path, guests: Path, call: str) -> None:
    root = base / "true" / f"seccomp-{call}" / "root"
    root.mkdir(parents=True)
    shutil.copy(guests / "hello.elf", root / "kernel.elf")
    probe = SECCOMP_ATTEMPTS[call] + "\nprint('STILL HERE')"
    done = kvmpy(*_jailer(base, f"seccomp-{call}", "--jail-probe", probe), "--", "--kernel", "/kernel.elf")
    assert done.returncode == 148, (done.returncode, done.stdout, done.stderr)
    assert "STILL HERE" not in done.stdout
    assert "disallowed system call" in done.stderr and f"({call})" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_assigned_device_under_the_jail_is_a_one_line_error(base: Path, guests: Path) -> None:
    """The jail binds neither /dev/vfio nor sysfs: --jail with --device vfio= stops before it is
    built, rather than failing inside it on a path the jail lacks."""
    done = kvmpy(
        "run", "--jail", "--chroot-base-dir", str(base), "--id", "vfio",
        "--kernel", str(guests / "hello.elf"), "--device", "vfio=0000:00:10.0",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--device vfio= cannot run under --jail yet" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

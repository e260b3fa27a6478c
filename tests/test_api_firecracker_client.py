"""A real Firecracker client from PyPI drives kvmpy's API unmodified.

firecracker-python (``firecracker.Api``, the client its ``MicroVM`` and
``VMMManager`` use) covers more of the API over a Unix socket than pyrecracker
or microheart: instance info, version, boot source, machine config, drives,
network, logger, actions, PATCH /vm, GET /vm/config, and it also sends MMDS,
vsock and snapshot requests. Its ``MicroVM`` class itself cannot run here (it
starts a ``firecracker`` binary, sets up a tap and NAT rules, asks Docker and
public address services), so this test speaks through ``Api`` exactly as
``MicroVM.create``, ``VMMManager.update_vmm_state``, ``get_vmm_state`` and
``get_vmm_config`` do, with the same arguments.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from firecracker import Api
from firecracker.api import Resource
from firecracker.exceptions import APIError

from kvmpy.api.server import ApiServer
from kvmpy.testing.fake_vmm import FakeVmm
from kvmpy.testing.process import start_kvmpy
from kvmpy.vmm import actions as a
from kvmpy.vmm.config import DiskConfig, LoggerConfig, NetConfig


@pytest.fixture
def vmm() -> FakeVmm:
    return FakeVmm(vm_id="a1b2c3d4")


@pytest.fixture
def api(tmp_path: Path, vmm: FakeVmm) -> Iterator[Api]:
    sock = tmp_path / "firecracker.socket"
    with ApiServer(sock, vmm.submit):
        client = Api(str(sock))
        yield client
        client.close()


def test_configure_start_pause_resume_as_microvm_create_does(api: Api, vmm: FakeVmm, tmp_path: Path) -> None:
    kernel, rootfs = tmp_path / "vmlinux", tmp_path / "rootfs.img"
    boot_args = "console=ttyS0 reboot=k pci=off panic=1 ip=172.16.0.2::172.16.0.1:255.255.255.0:vm:eth0:on"

    assert api.describe.get().json()["state"] == "Not started"  # MicroVM._run_firecracker's probe
    api.boot.put(kernel_image_path=str(kernel), boot_args=boot_args)  # _configure_vmm_boot_source
    api.drive.put(drive_id="rootfs", path_on_host=str(rootfs), is_root_device=True, is_read_only=False)
    api.machine_config.put(vcpu_count=2, mem_size_mib=512)  # _configure_vmm_resources
    api.network.put(iface_id="eth0", host_dev_name="tap_a1b2c3d4")  # _configure_vmm_network
    api.logger.put(level="Info")
    api.actions.put(action_type="InstanceStart")
    assert vmm.state is a.VmState.RUNNING

    api.vm.patch(state="Paused")  # VMMManager.update_vmm_state(id, "Paused")
    assert api.describe.get().json()["state"] == "Paused"  # VMMManager.get_vmm_state
    api.vm.patch(state="Resumed")
    assert api.describe.get().json()["state"] == "Running"

    config = api.vm_config.get().json()  # VMMManager.get_vmm_config / get_vmm_ip_addr
    assert config["boot-source"]["boot_args"] == boot_args
    assert config["machine-config"]["vcpu_count"] == 2
    assert config["drives"][0]["path_on_host"] == str(rootfs)
    assert api.version.get().json() == {"firecracker_version": "0.1.0"}

    assert [x for x in vmm.actions if not isinstance(x, a.GetInstanceInfo | a.GetVmConfig)] == [
        a.ConfigureBootSource(kernel, None, boot_args),
        a.InsertBlockDevice(DiskConfig(rootfs, id="rootfs", is_root_device=True, cache_type="Unsafe")),
        a.ConfigureMachine(2, 512, smt=False, track_dirty_pages=False, hugepages=False),
        a.InsertNetworkDevice(NetConfig("tap_a1b2c3d4", id="eth0")),
        a.ConfigureLogger(LoggerConfig(level="Info")),
        a.StartInstance(),
        a.Pause(),
        a.Resume(),
    ]


def test_the_clients_error_path_shows_kvmpys_fault_messages(api: Api, vmm: FakeVmm) -> None:
    with pytest.raises(APIError, match="API fault: The requested operation is not supported: vsock"):
        api.vsock.put(guest_cid=3, uds_path="/tmp/v.sock")  # MicroVM._configure_vmm_vsock
    with pytest.raises(APIError, match="API fault: The requested operation is not supported: MMDS"):
        api.mmds_config.put(version="V2", ipv4_address="169.254.169.254", network_interfaces=["eth0"])
    with pytest.raises(APIError, match="not supported before starting the microVM"):
        api.create_snapshot.put(mem_file_path="/tmp/m", snapshot_path="/tmp/s")  # MicroVM.snapshot
    with pytest.raises(APIError, match="not supported before starting the microVM"):
        api.vm.patch(state="Paused")
    with pytest.raises(APIError, match="Invalid request method and/or path: PATCH boot-source"):
        api.boot.patch(kernel_image_path="/other")
    assert vmm.state is a.VmState.NOT_STARTED


# --- the same client, the real VMM, a real guest ------------------------------------------------
def _ticks(path: Path) -> list[int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


def _wait_for_ticks(path: Path, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(_ticks(path)) < count:
        assert time.monotonic() < deadline, f"{_ticks(path)[-3:]} after {timeout} s"
        time.sleep(0.01)
    return _ticks(path)


def test_firecracker_python_boots_pauses_and_resumes_the_counter_guest(guests: Path, tmp_path: Path) -> None:
    """Configured through the API alone: no kernel, no disk, no console given to the VMM."""
    from kvmpy.vmm.vmm import Vmm

    sock, serial_out, image = (
        tmp_path / "firecracker.socket",
        tmp_path / "serial.out",
        tmp_path / "scratch.img",
    )
    image.write_bytes(bytes(1 << 20))
    vmm = Vmm(vm_id="fc-python")
    failures: list[BaseException] = []
    seen: dict[str, object] = {}

    def client() -> None:
        api = Api(str(sock))
        try:
            assert api.describe.get().json()["state"] == "Not started"
            api.boot.put(kernel_image_path=str(guests / "counter.elf"), boot_args="gap=20000000")
            api.machine_config.put(vcpu_count=1, mem_size_mib=64)
            api.drive.put(
                drive_id="scratch", path_on_host=str(image), is_root_device=False, is_read_only=True
            )
            api.network.put(iface_id="eth0", host_dev_name="kvmpyfc0")  # a tap that lives as long as the VM
            Resource(api, "/serial").put(serial_out_path=str(serial_out))
            api.actions.put(action_type="InstanceStart")
            _wait_for_ticks(serial_out, 3)

            api.vm.patch(state="Paused")
            seen["paused_state"] = api.describe.get().json()["state"]
            at_pause = _ticks(serial_out)
            time.sleep(0.5)
            seen["ticks_while_paused"] = _ticks(serial_out)[len(at_pause) :]

            api.vm.patch(state="Resumed")
            seen["resumed_state"] = api.describe.get().json()["state"]
            after = _wait_for_ticks(serial_out, len(at_pause) + 3)
            seen["continued"] = after[len(at_pause)] == at_pause[-1] + 1
            seen["config"] = api.vm_config.get().json()
        except BaseException as error:
            failures.append(error)
        finally:
            Resource(api, "/kvmpy/stop").put(reason="test over")
            api.close()

    with ApiServer(sock, vmm.submit):
        thread = threading.Thread(target=client)
        thread.start()
        result = vmm.run()  # the VMM's loop on the main thread, as kvmpy run has it
        thread.join(10)
    if failures:
        raise failures[0]
    assert result.reason.message == "test over"
    assert seen["paused_state"] == "Paused" and seen["resumed_state"] == "Running"
    assert seen["ticks_while_paused"] == []  # the console stopped
    assert seen["continued"]  # and went on from where it was
    config = seen["config"]
    assert isinstance(config, dict)
    assert config["boot-source"]["kernel_image_path"] == str(guests / "counter.elf")
    assert config["drives"][0]["is_read_only"] is True
    assert config["network-interfaces"][0]["host_dev_name"] == "kvmpyfc0"


def test_firecracker_python_snapshots_the_counter_and_loads_it_in_a_new_kvmpy(
    guests: Path, tmp_path: Path
) -> None:
    """PUT /snapshot/create from a paused VM, PUT /snapshot/load into a fresh ``kvmpy run --api-sock``."""
    state, memory = tmp_path / "state", tmp_path / "memory"
    out1, out2 = tmp_path / "serial1.out", tmp_path / "serial2.out"

    first = _serve(tmp_path / "one.sock")
    api = Api(str(tmp_path / "one.sock"))
    try:
        api.boot.put(kernel_image_path=str(guests / "counter.elf"), boot_args="gap=20000000")
        api.machine_config.put(vcpu_count=1, mem_size_mib=64)
        Resource(api, "/serial").put(serial_out_path=str(out1))
        api.actions.put(action_type="InstanceStart")
        _wait_for_ticks(out1, 3)
        api.vm.patch(state="Paused")
        # as MicroVM.snapshot("create") sends it
        api.create_snapshot.put(mem_file_path=str(memory), snapshot_path=str(state))
        Resource(api, "/kvmpy/stop").put(reason="snapshot taken")
    finally:
        api.close()
        _end(first)

    second = _serve(tmp_path / "two.sock")
    api = Api(str(tmp_path / "two.sock"))
    try:
        assert api.describe.get().json()["state"] == "Not started"
        Resource(api, "/serial").put(serial_out_path=str(out2))
        # MicroVM.snapshot("load") sends these fields, and network_overrides, which kvmpy refuses
        api.load_snapshot.put(
            enable_diff_snapshots=False,
            mem_backend={"backend_type": "File", "backend_path": str(memory)},
            snapshot_path=str(state),
            resume_vm=True,
        )
        assert api.describe.get().json()["state"] == "Running"
        before = len(_ticks(out1))
        deadline = time.monotonic() + 30
        while len(_counted(out1, out2)) < before + 3:
            assert time.monotonic() < deadline, _counted(out1, out2)[-3:]
            time.sleep(0.01)
        counted = _counted(out1, out2)
        assert counted == list(range(1, len(counted) + 1))  # the count went on where it stopped
        Resource(api, "/kvmpy/stop").put(reason="test over")
    finally:
        api.close()
        _end(second)


def _counted(*outputs: Path) -> list[int]:
    """The ticks of consecutive consoles: a line cut by the pause is finished after the load."""
    text = "".join(path.read_text(errors="replace") for path in outputs if path.exists())
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


def _serve(sock: Path) -> subprocess.Popen[str]:
    process = start_kvmpy("run", "--api-sock", str(sock))
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    return process


def _end(process: subprocess.Popen[str]) -> None:
    try:
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

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

from collections.abc import Iterator
from pathlib import Path

import pytest
from firecracker import Api
from firecracker.exceptions import APIError

from kvmpy.api.server import ApiServer
from kvmpy.testing.fake_vmm import FakeVmm
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
    with pytest.raises(APIError, match="snapshots"):
        api.create_snapshot.put(mem_file_path="/tmp/m", snapshot_path="/tmp/s")
    with pytest.raises(APIError, match="not supported before starting the microVM"):
        api.vm.patch(state="Paused")
    with pytest.raises(APIError, match="Invalid request method and/or path: PATCH boot-source"):
        api.boot.patch(kernel_image_path="/other")
    assert vmm.state is a.VmState.NOT_STARTED

"""PUT /vfio/{id} end to end: a Firecracker client configures a VM with an assigned device over
the API socket, the real VMM builds it on this host's KVM over the fake VFIO kernel, and the
test guest finds and drives the function.

The fake kernel reaches the machine through the VMM's one seam for it, ``Vmm(assign_device=)``
(``kvmpy run`` leaves it None: the host's VFIO). What the fake cannot show (a real IOMMU, DMA,
interrupts from hardware) is the passthrough lab's job, as in tests/test_vfio_machine.py.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from firecracker import Api
from firecracker.api import Resource

from kvmpy.api.server import ApiServer
from kvmpy.testing.fake_vfio import FakeVfioKernel, build_host_tree
from kvmpy.vfio import assign
from kvmpy.vmm.stop import StopKind

BDF = "0000:00:04.0"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVfioKernel]:
    paths = build_host_tree(tmp_path, BDF, 9)
    yield FakeVfioKernel(paths, BDF, 9)


def test_a_vfio_device_put_through_the_api_is_found_by_the_guest(
    guests: Path, fake: FakeVfioKernel, tmp_path: Path
) -> None:
    from kvmpy.vmm.vmm import Vmm

    sock, serial_out = tmp_path / "api.sock", tmp_path / "serial.out"
    vmm = Vmm(vm_id="vfio-api", assign_device=functools.partial(assign, kernel=fake, paths=fake.paths))
    failures: list[BaseException] = []
    seen: dict[str, object] = {}

    def client() -> None:
        api = Api(str(sock))
        try:
            api.boot.put(kernel_image_path=str(guests / "vfio_probe.elf"))
            api.machine_config.put(vcpu_count=1, mem_size_mib=64)
            Resource(api, "/serial").put(serial_out_path=str(serial_out))
            Resource(api, "/vfio", id_field="vfio_id").put(vfio_id="gpu", host_bdf="00:04.0")
            seen["vfio"] = api.vm_config.get().json()["vfio"]
            api.actions.put(action_type="InstanceStart")
        except BaseException as error:
            failures.append(error)
            Resource(api, "/kvmpy/stop").put(reason="the client failed")
        finally:
            api.close()

    with ApiServer(sock, vmm.submit):
        thread = threading.Thread(target=client)
        thread.start()
        result = vmm.run()  # until the guest's debug exit
        thread.join(10)
    if failures:
        raise failures[0]
    text = serial_out.read_text(errors="replace")
    assert seen["vfio"] == [{"vfio_id": "gpu", "host_bdf": BDF}]
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0, (result.reason, text)
    said = dict(re.findall(r"^([a-z0-9 ]+?) (0x[0-9a-f]+)$", text, re.M))
    assert "slot" in said and int(said["bar4 reads"], 16) == 0xCAFEF00D  # found, and BAR4 forwarded
    assert int(said["msix data"], 16) == 0x41 and "vfio_probe done" in text
    assert result.stats is not None
    assert {"gpu BAR0", "gpu BAR4"} <= {entry.name for entry in result.stats.mmio}  # named by its vfio_id
    assert fake.function.resets == 2 and fake.dma == {}  # reset at assignment and release; unmapped
    assert sorted(fake.closed()) == ["container", "device", "group"]

"""The host VFIO layer against a fake kernel and a fake sysfs (this host has no IOMMU).

Stepping stones: the real code runs, but the kernel it talks to is kvmpy.testing.fake_vfio.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from kvmpy.abi import vfio as abi
from kvmpy.errors import ConfigError, HostError
from kvmpy.testing import fake_vfio
from kvmpy.testing.fake_vfio import FakeVfioKernel, build_host_tree
from kvmpy.vfio import Assignment, assign, parse_bdf

BDF = "0000:00:04.0"
RAM = [(0x0, 0x10_0000, 0x7F00_0000_0000), (0x1_0000_0000, 0x20_0000, 0x7F00_1000_0000)]


def _assign(tmp_path: Path, **fake: bool) -> tuple[FakeVfioKernel, Assignment]:
    paths = build_host_tree(tmp_path, BDF, 7)
    kernel = FakeVfioKernel(paths, BDF, 7, **fake)
    return kernel, assign("00:04.0", RAM, kernel=kernel, paths=paths)


def test_assign_maps_every_ram_region_at_its_gpa_and_resets(tmp_path: Path) -> None:
    kernel, assignment = _assign(tmp_path)
    assert kernel.dma == {gpa: (size, host) for gpa, size, host in RAM}
    assert kernel.iommu_set == abi.VFIO_TYPE1v2_IOMMU
    assert kernel.function.resets == 1
    assert kernel.calls.index("VFIO_GROUP_SET_CONTAINER") < kernel.calls.index("VFIO_SET_IOMMU")
    assert kernel.calls.index("VFIO_SET_IOMMU") < kernel.calls.index("VFIO_IOMMU_MAP_DMA")
    container = assignment.container
    assert container.translate(0x1_0000_0010) == 0x7F00_1000_0010
    assert container.translate(0x10_0000) is None  # not guest RAM: the IOMMU would fault
    assignment.close()
    assert kernel.function.resets == 2
    assert kernel.dma == {}
    assert sorted(kernel.closed()) == ["container", "device", "group"]


def test_regions_irqs_and_sparse_mmap_areas(tmp_path: Path) -> None:
    kernel, assignment = _assign(tmp_path)
    device = assignment.device
    bar0, bar4 = device.regions[0], device.regions[4]
    assert (bar0.size, bar0.mappable) == (fake_vfio.BAR0_SIZE, True)
    assert bar0.mmap_areas == ((0, fake_vfio.MSIX_TABLE),)
    assert (bar4.size, bar4.mappable) == (fake_vfio.BAR4_SIZE, False)
    assert device.regions[abi.VFIO_PCI_ROM_REGION_INDEX].size == 0
    assert device.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX].count == fake_vfio.MSIX_VECTORS
    assert int.from_bytes(device.read(abi.VFIO_PCI_CONFIG_REGION_INDEX, 0, 2), "little") == fake_vfio.VENDOR
    assert device.read(4, fake_vfio.BAR4_SIZE - 2, 4) == b"\xff" * 4  # past the end
    device.write(4, 8, b"\x12\x34")
    assert device.read(4, 8, 2) == b"\x12\x34"
    mapping = device.map_region(0, 0, mmap.PAGESIZE)
    mapping[0:4] = b"abcd"
    assert device.read(0, 0, 4) == b"abcd"  # the mapping is the region
    mapping.close()
    assignment.close()


def test_irq_eventfds_bind_and_disable(tmp_path: Path) -> None:
    kernel, assignment = _assign(tmp_path)
    device = assignment.device
    device.set_irq_eventfds(abi.VFIO_PCI_MSIX_IRQ_INDEX, 0, [11, 12, -1])
    assert kernel.function.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX] == {0: 11, 1: 12, 2: -1}
    device.disable_irqs(abi.VFIO_PCI_MSIX_IRQ_INDEX)
    assert abi.VFIO_PCI_MSIX_IRQ_INDEX not in kernel.function.irqs
    assignment.close()


def test_bdf_forms() -> None:
    assert parse_bdf("00:04.0") == "0000:00:04.0"
    assert parse_bdf("0000:3B:1f.7") == "0000:3b:1f.7"
    for bad in ("04.0", "0000:00:20.0", "0000:00:04.8", "eth0"):
        with pytest.raises(ConfigError, match="PCI"):
            parse_bdf(bad)


def test_no_such_device(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7)
    with pytest.raises(ConfigError, match=r"vfio=0000:00:05.0: no such PCI device .*lspci"):
        assign("00:05.0", RAM, kernel=FakeVfioKernel(paths, BDF, 7), paths=paths)


def test_no_vfio_module(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7, vfio_node=False)
    with pytest.raises(HostError, match=r"/dev/vfio/vfio is missing: load the vfio-pci module"):
        assign(BDF, RAM, kernel=FakeVfioKernel(paths, BDF, 7), paths=paths)


def test_no_iommu(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7, iommu=False)
    with pytest.raises(HostError, match=r"no IOMMU group: the host has no IOMMU .*intel_iommu=on"):
        assign(BDF, RAM, kernel=FakeVfioKernel(paths, BDF, 7), paths=paths)


def test_bound_to_a_host_driver_names_it_and_the_fix(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7, driver="nvme")
    with pytest.raises(ConfigError) as caught:
        assign(BDF, RAM, kernel=FakeVfioKernel(paths, BDF, 7), paths=paths)
    message = str(caught.value)
    assert "\n" not in message
    assert "is bound to nvme, not vfio-pci" in message
    assert f"echo vfio-pci > {paths.device(BDF)}/driver_override" in message
    assert f"echo {BDF} > {paths.device(BDF)}/driver/unbind" in message
    assert "drivers_probe" in message


def test_unbound_device_gets_the_fix_without_unbind(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7, driver=None)
    fix = r"has no driver, not vfio-pci: echo vfio-pci > .*driver_override; echo"
    with pytest.raises(ConfigError, match=fix):
        assign(BDF, RAM, kernel=FakeVfioKernel(paths, BDF, 7), paths=paths)


def test_group_not_viable_names_the_other_devices(tmp_path: Path) -> None:
    members = {"0000:00:04.1": "e1000e", "0000:00:04.2": None, "0000:00:04.3": "vfio-pci"}
    paths = build_host_tree(tmp_path, BDF, 7, group_members=members)
    kernel = FakeVfioKernel(paths, BDF, 7, viable=False)
    with pytest.raises(ConfigError) as caught:
        assign(BDF, RAM, kernel=kernel, paths=paths)
    message = str(caught.value)
    assert "IOMMU group 7 is not viable: 0000:00:04.1 (bound to e1000e) still has a host driver" in message
    assert "04.2" not in message and "04.3" not in message
    assert sorted(kernel.closed()) == ["container", "group"]  # nothing left open


def test_group_in_use_by_another_process(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7)
    kernel = FakeVfioKernel(paths, BDF, 7)
    first = assign(BDF, RAM, kernel=kernel, paths=paths)
    with pytest.raises(HostError, match=r"/dev/vfio/7 is in use by another process"):
        assign(BDF, RAM, kernel=kernel, paths=paths)
    first.close()


def test_overlapping_dma_fails_with_the_range(tmp_path: Path) -> None:
    paths = build_host_tree(tmp_path, BDF, 7)
    kernel = FakeVfioKernel(paths, BDF, 7)
    why = r"mapping guest RAM 0x80000\+0x100000 for device DMA: VFIO_IOMMU_MAP_DMA failed: EEXIST"
    with pytest.raises(HostError, match=why):
        assign(BDF, [*RAM, (0x8_0000, 0x10_0000, 0x1000)], kernel=kernel, paths=paths)
    assert sorted(kernel.closed()) == ["container", "group"]


def test_device_without_reset_is_still_assigned(tmp_path: Path) -> None:
    kernel, assignment = _assign(tmp_path, reset=False)
    assert kernel.function.resets == 0
    assignment.close()


def test_a_refused_region_access_reads_all_ones_and_drops_the_write(tmp_path: Path) -> None:
    _, assignment = _assign(tmp_path)
    device = assignment.device
    assignment.device.fd, real = os.open("/dev/null", os.O_WRONLY), device.fd  # reads fail: EBADF
    try:
        assert device.read(4, 0, 4) == b"\xff" * 4
        os.close(device.fd)
        device.fd = os.open("/dev/zero", os.O_RDONLY)  # writes fail
        device.write(4, 0, b"\1\2")
    finally:
        os.close(device.fd)
        device.fd = real
    assert device.read(4, 0, 2) == b"\0\0"  # the write never reached the region
    assignment.close()

"""The passthrough lab's QEMU command line and command script (nothing is booted here)."""

from __future__ import annotations

from pathlib import Path

from kvmpy.lab.assets import LAB_MODULES, VFIO_MODULES
from kvmpy.lab.runner import NVME_ADDRESS, command_script, qemu_command


def test_passthrough_lab_is_q35_with_the_iommu_before_every_pci_device() -> None:
    args = qemu_command(
        Path("k"), Path("i"), Path("/s"), npt=True, cpus=2, memory_mib=3072, nvme_disk=Path("/s/nvme.img")
    )
    assert args[args.index("-M") + 1] == "q35"
    devices = [args[i + 1] for i, arg in enumerate(args) if arg in ("-device", "-virtfs")]
    assert devices[0] == "intel-iommu"
    assert "nvme,serial=kvmpy0,drive=nv0,addr=0x10" in devices
    assert "file=/s/nvme.img,if=none,id=nv0,format=raw" in args
    assert args[args.index("-append") + 1].endswith("kvmpy.npt=1 intel_iommu=on iommu=pt")
    assert NVME_ADDRESS == "0000:00:10.0"


def test_plain_lab_is_unchanged() -> None:
    args = qemu_command(Path("k"), Path("i"), Path("/s"), npt=False, cpus=2, memory_mib=3072)
    assert args[args.index("-M") + 1] == "pc"
    assert "intel-iommu" not in args and not any("nvme" in arg for arg in args)
    assert args[args.index("-append") + 1].endswith("kvmpy.npt=0")


def test_passthrough_script_binds_nvme_to_vfio_pci_before_the_command() -> None:
    script = command_script(["kvmpy", "run"], Path("/w"), {}, passthrough=True)
    assert script.index("driver_override") < script.index("drivers_probe") < script.index("exec kvmpy run")
    assert "0x010802" in script and f"KVMPY_LAB_NVME={NVME_ADDRESS}" in script
    assert "driver_override" not in command_script(["true"], Path("/w"), {})
    assert VFIO_MODULES and not set(VFIO_MODULES) & set(LAB_MODULES)


def test_sriov_lab_has_a_subsystem_with_two_functions_and_detached_private_namespaces() -> None:
    from kvmpy.lab.runner import NIC_ADDRESS, SRIOV_NAMESPACE_SIZES

    disks = [Path(f"/s/ns{n}.img") for n in (1, 2)]
    args = qemu_command(Path("k"), Path("i"), Path("/s"), npt=True, cpus=2, memory_mib=3072,
                        namespace_disks=disks)  # fmt: skip
    devices = [args[i + 1] for i, arg in enumerate(args) if arg == "-device"]
    assert args[args.index("-M") + 1] == "q35" and devices[0] == "intel-iommu"
    controller = next(d for d in devices if d.startswith("nvme,"))
    assert "subsys=kvmpy-subsys" in controller and "sriov_max_vfs=2" in controller
    # Two queues and one interrupt per function, two queues left to the primary (QEMU's minimum).
    assert "sriov_vq_flexible=4" in controller and "sriov_vi_flexible=2" in controller
    assert "max_ioqpairs=6" in controller
    namespaces = [d for d in devices if d.startswith("nvme-ns,")]
    assert len(namespaces) == len(SRIOV_NAMESPACE_SIZES) == 2
    assert all("shared=off,detached=on" in ns for ns in namespaces)
    assert f"e1000e,netdev=lan,addr=0x{int(NIC_ADDRESS[8:10], 16):x}" in devices


def test_sriov_script_gives_each_function_its_namespace_before_binding_it_to_vfio_pci() -> None:
    script = command_script(["kvmpy", "run"], Path("/w"), {}, sriov=True)
    assert script.index("sriov_numvfs") < script.index("-a 8") < script.index("-a 9")
    assert script.index("-a 9") < script.index("attach-ns") < script.index("driver_override")
    assert "export KVMPY_LAB_VF$n=$vf" in script and "export KVMPY_LAB_NIC=0000:00:11.0" in script
    assert script.index("KVMPY_LAB_NIC") < script.index("exec kvmpy run")
    assert "0x010802" not in script  # the primary controller keeps the lab's nvme driver

"""A VFIO container: one IOMMU context; guest RAM is mapped into it for device DMA.

The mapping is the lecture's GPA -> HPA step done by hardware: the guest's driver hands
its device guest-physical addresses, the IOMMU translates them (IOVA = GPA) to the host
pages behind kvmpy's mapping of guest RAM, which VFIO pins.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from kvmpy.abi import vfio as abi
from kvmpy.errors import HostError
from kvmpy.kvm.errors import KvmError
from kvmpy.vfio.kernel import VfioKernel


@dataclass(frozen=True, slots=True)
class DmaMapping:
    """One IOMMU mapping: device addresses [iova, iova + size) -> host virtual address."""

    iova: int
    size: int
    vaddr: int


class Container:
    """/dev/vfio/vfio, checked for the API version and the type-1 IOMMU."""

    def __init__(self, kernel: VfioKernel, path: str) -> None:
        self._kernel = kernel
        self.fd = kernel.open(path)
        self.mappings: list[DmaMapping] = []
        self.iommu_type = 0
        try:
            version = kernel.ioctl(self.fd, abi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != abi.VFIO_API_VERSION:
                raise HostError(
                    f"{path} speaks VFIO API version {version}, kvmpy knows {abi.VFIO_API_VERSION}"
                )
            for iommu in (abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_TYPE1_IOMMU):
                if kernel.ioctl(self.fd, abi.VFIO_CHECK_EXTENSION, iommu, "VFIO_CHECK_EXTENSION") > 0:
                    self.iommu_type = iommu
                    break
            else:
                raise HostError(
                    f"{path} has no type-1 IOMMU: load vfio_iommu_type1 (modprobe vfio_iommu_type1)"
                )
        except BaseException:
            os.close(self.fd)
            raise

    def set_iommu(self) -> None:
        """Choose the IOMMU model; the kernel wants a group attached first."""
        self._kernel.ioctl(self.fd, abi.VFIO_SET_IOMMU, self.iommu_type, "VFIO_SET_IOMMU")

    def map_dma(self, iova: int, size: int, vaddr: int) -> None:
        """Let devices in this container read and write [iova, iova + size) as host memory at vaddr."""
        request = abi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(abi.vfio_iommu_type1_dma_map),
            flags=abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        try:
            self._kernel.ioctl(self.fd, abi.VFIO_IOMMU_MAP_DMA, request, "VFIO_IOMMU_MAP_DMA")
        except KvmError as error:
            hint = " (raise the locked-memory limit: ulimit -l)" if error.errno == 12 else ""
            raise HostError(f"mapping guest RAM {iova:#x}+{size:#x} for device DMA: {error}{hint}") from None
        self.mappings.append(DmaMapping(iova, size, vaddr))

    def unmap_dma(self, mapping: DmaMapping) -> None:
        request = abi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(abi.vfio_iommu_type1_dma_unmap), iova=mapping.iova, size=mapping.size
        )
        self._kernel.ioctl(self.fd, abi.VFIO_IOMMU_UNMAP_DMA, request, "VFIO_IOMMU_UNMAP_DMA")
        self.mappings.remove(mapping)

    def translate(self, iova: int) -> int | None:
        """The host virtual address a device access to ``iova`` reaches, or None (an IOMMU fault)."""
        for mapping in self.mappings:
            if mapping.iova <= iova < mapping.iova + mapping.size:
                return mapping.vaddr + iova - mapping.iova
        return None

    def close(self) -> None:
        for mapping in list(self.mappings):
            try:
                self.unmap_dma(mapping)
            except KvmError:
                self.mappings.remove(mapping)  # closing the container drops them all anyway
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["Container", "DmaMapping"]

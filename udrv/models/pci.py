"""A PciTransport backed by an in-process device model.

A model implements `PciDeviceModel` (BAR0 registers, configuration space, a reset) and
reaches host memory only through the `DmaBus` this transport gives it: every device access
is translated IOVA -> buffer the way an IOMMU does, and an access outside the mapped buffers
raises `DmarFault` (the model counts it, as the guest kernel logs a DMAR fault).

DMA buffers are real memfd mappings from `udrv.dma` so the same code paths (allocation,
IOVA assignment, leak counting) run on the model as on VFIO.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from ..dma import PAGE, DmaPool, IovaAllocator
from ..errors import DmaError, DeviceGone
from ..pcitransport import (PCI_COMMAND, PCI_COMMAND_MEMORY, DmaBuffer, DmaMapping, PciInfo,
                           check_config, check_mmio, update_bus_master)


class DmarFault(Exception):
    """The IOMMU refused a device access (unmapped or out-of-range IOVA)."""

    def __init__(self, iova: int, length: int, write: bool):
        super().__init__(f"DMAR fault: device {'write' if write else 'read'} of {length} bytes at IOVA {iova:#x}")
        self.iova = iova
        self.length = length
        self.write = write


class DmaBus(Protocol):
    """The device side of the IOMMU."""
    def dma_read(self, iova: int, length: int) -> bytes: ...
    def dma_write(self, iova: int, data: bytes) -> None: ...


class PciDeviceModel(Protocol):
    vendor_id: int
    device_id: int
    bar0_size: int
    config_size: int
    reset_supported: bool

    def attach(self, bus: DmaBus | None) -> None: ...
    def mmio_read(self, offset: int) -> int: ...
    def mmio_write(self, offset: int, value: int) -> None: ...
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def function_reset(self) -> None: ...


@dataclass(eq=False)
class _Mapping:
    iova: int
    end: int
    buf: DmaBuffer
    device_view: memoryview      # the whole mapped range (page multiple), what the device may touch


class ModelPciTransport:
    """PciTransport over a `PciDeviceModel`, with an IOMMU that enforces the mappings."""

    # Start above zero so a NULL descriptor address is a DMAR fault, like a real IOMMU window
    # with nothing mapped at 0.
    DEFAULT_WINDOW = (0x1000_0000, 0x1_0000_0000)

    device_writes = None             # counts no writes: every datapath fault restores

    def __init__(self, model: PciDeviceModel, bdf: str = "0000:00:03.0",
                 iova_window: tuple[int, int] = DEFAULT_WINDOW, hugepages: bool | None = False):
        self.model = model
        self._iovas = IovaAllocator(*iova_window)
        self._pool = DmaPool(hugepages=hugepages)
        self._maps: list[_Mapping] = []           # sorted by iova
        self._starts: list[int] = []
        self._closed = False
        model.attach(self)
        # vfio-pci enables memory decoding when the device is opened (pci_enable_device);
        # bus mastering stays off until the driver asks for it.
        cmd = model.config_read(PCI_COMMAND, 2)
        model.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY)
        self.info = PciInfo(bdf=bdf, vendor=model.config_read(0x00, 2), device=model.config_read(0x02, 2),
                            subsystem_vendor=model.config_read(0x2C, 2),
                            subsystem_device=model.config_read(0x2E, 2),
                            iommu_group=None, driver="model")

    def _alive(self) -> None:
        if self._closed:
            raise DeviceGone("the PCI transport is closed: open the device again")

    # --- MMIO and config ----------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        self._alive()
        check_mmio(offset, self.model.bar0_size)
        return self.model.mmio_read(offset) & 0xFFFFFFFF

    def write32(self, offset: int, value: int) -> None:
        self._alive()
        check_mmio(offset, self.model.bar0_size)
        self.model.mmio_write(offset, value & 0xFFFFFFFF)

    def config_read(self, offset: int, size: int) -> int:
        self._alive()
        check_config(offset, size, self.model.config_size)
        return self.model.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._alive()
        check_config(offset, size, self.model.config_size)
        self.model.config_write(offset, size, value & ((1 << (8 * size)) - 1))

    def set_bus_master(self, enabled: bool) -> None:
        update_bus_master(self, enabled)

    # --- DMA (host side) ----------------------------------------------------------------------
    def dma_alloc(self, size: int, align: int = PAGE) -> DmaBuffer:
        self._alive()
        mem = self._pool.alloc(size)
        try:
            iova = self._iovas.alloc(mem.size, align)
        except BaseException:
            self._pool.free(mem)
            raise
        buf = DmaBuffer(iova=iova, size=size, view=mem.view(size), vaddr=mem.vaddr, fd=mem.fd,
                        hugepage=mem.hugepage, mapped_size=mem.size, memory=mem)
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self._maps.insert(i, _Mapping(iova, iova + mem.size, buf, mem.view()))
        return buf

    def dma_free(self, buf: DmaBuffer) -> None:
        i = bisect.bisect_left(self._starts, buf.iova)
        if i == len(self._starts) or self._starts[i] != buf.iova or self._maps[i].buf is not buf:
            raise DmaError(f"DMA buffer at IOVA {buf.iova:#x} is not mapped by this transport (freed twice?): "
                           "free each buffer once")
        m = self._maps.pop(i)
        del self._starts[i]
        # Unmap first (the device loses access), then give back the address range, then the memory.
        self._iovas.free(m.iova)
        m.device_view.release()
        buf.view.release()
        self._pool.free(buf.memory)

    def dma_mappings(self) -> list[DmaMapping]:
        return [DmaMapping(m.iova, m.end - m.iova, m.buf.vaddr) for m in self._maps]

    @property
    def iova_allocator(self) -> IovaAllocator:
        return self._iovas

    # --- DMA (device side: the IOMMU) ------------------------------------------------------------
    def _lookup(self, iova: int, length: int, write: bool) -> tuple[_Mapping, int]:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or iova >= self._maps[i].end:
            raise DmarFault(iova, length, write)
        return self._maps[i], iova - self._maps[i].iova

    def dma_read(self, iova: int, length: int) -> bytes:
        if self._closed:
            raise DmarFault(iova, length, False)
        out = bytearray()
        pos, left = iova, length
        # An access may straddle two mappings that are adjacent in IOVA space (the IOMMU
        # translates page by page); any unmapped byte faults the whole access.
        while left > 0:
            m, off = self._lookup(pos, length, False)
            take = min(left, m.end - pos)
            out += m.device_view[off:off + take]
            pos += take
            left -= take
        return bytes(out)

    def dma_write(self, iova: int, data: bytes) -> None:
        if self._closed:
            raise DmarFault(iova, len(data), True)
        # Check the whole range before writing anything: the access is refused as a unit.
        pieces = []
        pos, left = iova, len(data)
        while left > 0:
            m, off = self._lookup(pos, len(data), True)
            take = min(left, m.end - pos)
            pieces.append((m, off, pos - iova, take))
            pos += take
            left -= take
        for m, off, src, take in pieces:
            m.device_view[off:off + take] = data[src:src + take]

    # --- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> bool:
        """Like VFIO_DEVICE_RESET: bus mastering off first, then a function reset if the
        device has one (device registers to power-on state, config space kept)."""
        self._alive()
        self.set_bus_master(False)
        if not self.model.reset_supported:
            return False
        self.model.function_reset()
        return True

    def poll_fds(self) -> tuple[tuple[int, int], ...]:
        """None: the driver runs without interrupts, the daemon polls its rings."""
        return ()

    def mmio_region(self) -> None:
        """The model's registers exist only as Python calls: no C loop on them."""
        return None

    def fds(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self._closed:
            return
        # Like closing a VFIO device: no more DMA, then the mappings go, newest first.
        self.set_bus_master(False)
        for m in reversed(list(self._maps)):
            self.dma_free(m.buf)
        self._pool.close()
        self.model.attach(None)
        self._closed = True

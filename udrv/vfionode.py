"""A PCI device bound to vfio-pci, as the supervisor holds it: container, group, DMA mappings.

The supervisor opens the device once, as root (`VfioTransport.open`), and keeps the container
and the group for its whole life, so IOMMU mappings survive any worker. Each worker gets a dup
of the device fd (BAR0, config space, reset: a VFIO device file carries no per-process I/O
that could complete into a dead process, unlike usbfs) and asks here for DMA memory: a memfd
mapped into the IOMMU by this process, which the worker maps too.

A dead worker's buffers stay mapped: the device may still be DMAing into its rings. They are
unmapped when the successor, its own rings programmed, asks for `release_orphans`.
"""
from __future__ import annotations

import os
from typing import Any

from .pcitransport import DmaBuffer
from .vfio import VfioTransport


class VfioNode:
    def __init__(self, bdf: str):
        self.transport = VfioTransport.open(bdf)
        self.info = self.transport.info
        self._owner: dict[int, tuple[int, DmaBuffer]] = {}        # iova -> (worker pid, buffer)

    def device_fd_for_worker(self) -> int:
        return os.dup(self.transport.fds()["device"])

    def alloc(self, pid: int, size: int, align: int) -> DmaBuffer:
        buf = self.transport.dma_alloc(size, align)
        self._owner[buf.iova] = (pid, buf)
        return buf

    def free(self, pid: int, iova: int) -> None:
        owner = self._owner.get(iova)
        if owner is None or owner[0] != pid:
            raise ValueError(f"no DMA buffer at IOVA {iova:#x} belongs to worker {pid}")
        del self._owner[iova]
        self.transport.dma_free(owner[1])

    def release_orphans(self, living: set[int]) -> int:
        """Unmap and free every buffer of a worker that is no longer alive."""
        gone = [iova for iova, (pid, _b) in self._owner.items() if pid not in living]
        for iova in gone:
            _pid, buf = self._owner.pop(iova)
            self.transport.dma_free(buf)
        return len(gone)

    def describe(self) -> dict[str, Any]:
        return {"bdf": self.info.bdf, "ident": self.info.ident, "dma_buffers": len(self._owner),
                "dma_mappings": len(self.transport.dma_mappings())}

    def close(self) -> None:
        """Bus mastering off, every mapping gone, the container closed (workers are gone)."""
        self.transport.close()

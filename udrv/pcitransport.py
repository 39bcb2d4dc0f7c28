"""The PCI transport interface.

Two implementations: `udrv.vfio.VfioTransport` (a real device bound to vfio-pci) and
`udrv.models.pci.ModelPciTransport` (an in-process device model for tests and the demo).
A PCI driver sees only this interface: 32-bit MMIO on BAR0, config space, bus mastering,
DMA buffers with an IOVA the device can use, and a reset.

DMA buffers are process-local mappings of shareable memory (a memfd), mapped into the
device's IOMMU domain at `iova`. The transport remembers every mapping so a leak check can
compare `len(dma_mappings())` before and after a recovery.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# PCI configuration space facts (PCI Local Bus spec, not device specific).
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x0002   # memory space decoding (MMIO on BARs)
PCI_COMMAND_MASTER = 0x0004   # bus master enable: the device may DMA

ALL_ONES = 0xFFFFFFFF


def is_gone(value: int, size: int = 4) -> bool:
    """True if an MMIO/config read returned all ones: the device was removed, is in D3,
    or stopped decoding. A register that can legitimately read all ones needs a second
    look (read STATUS or the vendor id) before concluding."""
    return value == (1 << (8 * size)) - 1


@dataclass(frozen=True)
class PciInfo:
    bdf: str                          # "0000:03:00.0"
    vendor: int
    device: int
    subsystem_vendor: int = 0
    subsystem_device: int = 0
    iommu_group: int | None = None
    driver: str | None = None         # kernel driver bound now ("vfio-pci", "e1000", None)

    @property
    def ident(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True)
class DmaMapping:
    """One IOMMU mapping: device addresses [iova, iova+size) -> process memory at vaddr."""
    iova: int
    size: int                         # mapped size (whole pages)
    vaddr: int


@dataclass(eq=False)
class DmaBuffer:
    iova: int                         # the address to program into the device
    size: int                         # bytes the caller asked for (view length)
    view: memoryview                  # writable, process-local
    vaddr: int                        # process virtual address of view[0]
    fd: int = -1                      # memfd backing the buffer (-1: not shareable)
    offset: int = 0                   # offset of view[0] inside fd
    hugepage: bool = False
    mapped_size: int = 0              # bytes mapped in the IOMMU (page multiple >= size)
    memory: Any = field(default=None, repr=False)   # owner of the mapping (udrv.dma.DmaMemory)


@dataclass(frozen=True)
class MmioRegion:
    """BAR0 as C code reaches it without Python: the VFIO device fd, BAR0's offset in it, its
    size, and whether the region may be mapped (else pread/pwrite at the offset)."""
    fd: int
    offset: int
    size: int
    mappable: bool


class PciTransport(Protocol):
    """What a PCI driver may do with its device."""

    info: PciInfo
    # state-changing requests counted (a USB transport's device_writes); PCI transports count
    # none, so every datapath fault restores the device
    device_writes: int | None

    # --- BAR0 MMIO: 32-bit accesses only, offset 4-byte aligned ---------------------------
    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...

    # --- configuration space (size 1, 2 or 4) ---------------------------------------------
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def set_bus_master(self, enabled: bool) -> None: ...

    # --- DMA ---------------------------------------------------------------------------------
    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer: ...
    def dma_free(self, buf: DmaBuffer) -> None: ...
    def dma_mappings(self) -> list[DmaMapping]: ...

    # --- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> bool: ...          # False: the device offers no reset (bus mastering is off anyway)
    def fds(self) -> dict[str, int]: ...  # {"container", "group", "device"}; {} for in-process models
    def mmio_region(self) -> MmioRegion | None: ...   # None: BAR0 only through read32/write32 (models)
    def poll_fds(self) -> tuple[tuple[int, int], ...]: ...  # fds that wake the loop; () = polled
    def close(self) -> None: ...


def check_mmio(offset: int, bar_size: int) -> None:
    """Refuse accesses a real BAR would not take as one 32-bit load/store."""
    if offset & 3:
        raise ValueError(f"MMIO offset {offset:#x} is not 4-byte aligned: e1000-class registers take 32-bit accesses only")
    if not 0 <= offset <= bar_size - 4:
        raise ValueError(f"MMIO offset {offset:#x} is outside BAR0 ({bar_size:#x} bytes): check the register offset")


def check_config(offset: int, size: int, space: int) -> None:
    if size not in (1, 2, 4):
        raise ValueError(f"config access size {size} is invalid: use 1, 2 or 4 bytes")
    if offset % size:
        raise ValueError(f"config offset {offset:#x} is not aligned to the {size}-byte access: align it")
    if not 0 <= offset <= space - size:
        raise ValueError(f"config offset {offset:#x} is outside the {space}-byte configuration space")


def update_bus_master(t: PciTransport, enabled: bool) -> None:
    """Read-modify-write of the command register's bus master bit (shared by transports)."""
    cmd = t.config_read(PCI_COMMAND, 2)
    new = (cmd | PCI_COMMAND_MASTER) if enabled else (cmd & ~PCI_COMMAND_MASTER)
    if new != cmd:
        t.config_write(PCI_COMMAND, 2, new)

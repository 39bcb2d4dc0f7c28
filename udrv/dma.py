"""DMA memory and device addresses.

Two independent pieces a PCI transport combines:
- `IovaAllocator`: hands out I/O virtual address ranges (what the device sees) first-fit
  inside the IOMMU's usable window, with alignment; frees coalesce; a double free is an error.
- `DmaPool`: hands out process memory for DMA. Memory comes from a memfd (2 MiB hugepages
  with MFD_HUGETLB when the request is large and the host has hugepages, plain memfd
  otherwise) so the fd can be passed to another process (a warm spare) which maps the same
  pages. `DmaMemory.attach` is that other side.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from dataclasses import dataclass, field

from .errors import DmaError

PAGE = 4096
HUGEPAGE = 2 << 20


def round_up(value: int, granule: int) -> int:
    return (value + granule - 1) // granule * granule


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# --- IOVA allocator ------------------------------------------------------------------------

class IovaAllocator:
    """First-fit allocator over one or more [start, end) windows.

    Sizes are rounded up to `granule` (the IOMMU page). Free ranges are kept sorted and
    merged with their neighbours on free, so fragmentation never outlives the buffers.
    """

    def __init__(self, start: int, end: int, granule: int = PAGE):
        self.granule = granule
        self._free: list[tuple[int, int]] = []      # sorted, non-adjacent (start, end)
        self._used: dict[int, int] = {}             # start -> size
        self.add_window(start, end)

    @classmethod
    def from_ranges(cls, ranges: list[tuple[int, int]], granule: int = PAGE) -> "IovaAllocator":
        """Ranges as the IOMMU reports them: inclusive (first, last) pairs."""
        if not ranges:
            raise DmaError("the IOMMU reports no usable IOVA range: check the IOMMU setup (dmesg)")
        first, *rest = sorted(ranges)
        alloc = cls(first[0], first[1] + 1, granule)
        for lo, hi in rest:
            alloc.add_window(lo, hi + 1)
        return alloc

    def add_window(self, start: int, end: int) -> None:
        # Shrink to whole granules inside the window.
        start, end = round_up(start, self.granule), end // self.granule * self.granule
        if end <= start:
            return
        self._insert_free(start, end)

    # --- queries -----------------------------------------------------------------------------
    @property
    def bytes_free(self) -> int:
        return sum(e - s for s, e in self._free)

    def free_ranges(self) -> list[tuple[int, int]]:
        return list(self._free)

    def allocations(self) -> dict[int, int]:
        return dict(self._used)

    def __len__(self) -> int:
        return len(self._used)

    # --- alloc / free ---------------------------------------------------------------------------
    def alloc(self, size: int, align: int = PAGE) -> int:
        if size <= 0:
            raise ValueError(f"cannot allocate {size} bytes of IOVA space: ask for at least one byte")
        if not _is_pow2(align):
            raise ValueError(f"IOVA alignment {align:#x} is not a power of two: use e.g. 4096 or 2 MiB")
        size = round_up(size, self.granule)
        align = max(align, self.granule)
        for i, (s, e) in enumerate(self._free):
            start = round_up(s, align)
            if start + size <= e:
                self._take(i, start, start + size)
                self._used[start] = size
                return start
        raise DmaError(f"no free IOVA range of {size:#x} bytes aligned to {align:#x} "
                       f"({self.bytes_free:#x} bytes free in {len(self._free)} pieces): free DMA buffers first")

    def reserve(self, iova: int, size: int) -> None:
        """Claim a specific range (a mapping another process made and this one adopts)."""
        size = round_up(size, self.granule)
        if iova % self.granule:
            raise ValueError(f"IOVA {iova:#x} is not aligned to the {self.granule:#x} IOMMU page")
        for i, (s, e) in enumerate(self._free):
            if s <= iova and iova + size <= e:
                self._take(i, iova, iova + size)
                self._used[iova] = size
                return
        raise DmaError(f"IOVA range {iova:#x}+{size:#x} is not free: it overlaps a buffer or lies outside the window")

    def free(self, iova: int) -> int:
        size = self._used.pop(iova, None)
        if size is None:
            inside = [s for s, n in self._used.items() if s < iova < s + n]
            what = (f"it lies inside the buffer at {inside[0]:#x}" if inside
                    else "it was already freed or never allocated (double free?)")
            raise DmaError(f"cannot free IOVA {iova:#x}: {what}; free each buffer once by its start address")
        self._insert_free(iova, iova + size)
        return size

    # --- free-list plumbing -------------------------------------------------------------------
    def _take(self, i: int, start: int, end: int) -> None:
        s, e = self._free.pop(i)
        pieces = [(s, start)] if s < start else []
        if end < e:
            pieces.append((end, e))
        self._free[i:i] = pieces

    def _insert_free(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._free, (start, end))
        if (i > 0 and self._free[i - 1][1] > start) or (i < len(self._free) and self._free[i][0] < end):
            raise DmaError(f"IOVA range {start:#x}-{end:#x} overlaps free space: the allocator is corrupted")
        # Merge with the left and right neighbours when they touch.
        if i > 0 and self._free[i - 1][1] == start:
            i -= 1
            start = self._free.pop(i)[0]
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        self._free.insert(i, (start, end))


# --- DMA memory ------------------------------------------------------------------------------

def _address_of(mm: mmap.mmap) -> int:
    # The temporary ctypes object holds a buffer export; drop it at once so the mmap can be
    # closed later (the address stays valid for as long as the mapping exists).
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@dataclass(eq=False)
class DmaMemory:
    """A shareable, process-local mapping of a memfd."""
    fd: int
    size: int
    hugepage: bool
    mm: mmap.mmap = field(repr=False)
    vaddr: int = 0
    closed: bool = False

    @classmethod
    def allocate(cls, size: int, hugepage: bool = False, name: str = "udrv-dma") -> "DmaMemory":
        granule = HUGEPAGE if hugepage else PAGE
        size = round_up(max(size, 1), granule)
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepage else 0)
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, size)
            # MAP_SHARED: the pages belong to the memfd, so another process mapping the fd
            # sees (and the device writes into) the same memory.
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        mem = cls(fd, size, hugepage, mm)
        mem.vaddr = _address_of(mm)
        return mem

    @classmethod
    def attach(cls, fd: int, size: int, hugepage: bool = False) -> "DmaMemory":
        """Map memory another process allocated (fd received over SCM_RIGHTS); takes the fd."""
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mem = cls(fd, size, hugepage, mm)
        mem.vaddr = _address_of(mm)
        return mem

    def view(self, length: int | None = None) -> memoryview:
        return memoryview(self.mm)[: self.size if length is None else length]

    def close(self) -> bool:
        """Unmap and close the fd. Returns False if views are still alive: the pages are then
        unmapped when the last view is garbage-collected (never while one can reach them)."""
        if self.closed:
            return True
        self.closed = True
        os.close(self.fd)
        try:
            self.mm.close()
            return True
        except BufferError:
            return False


class DmaPool:
    """Hands out DmaMemory: hugepage-backed when the request is at least `huge_threshold`
    bytes and the host has hugepages to give, plain memfd pages otherwise."""

    def __init__(self, hugepages: bool | None = None, huge_threshold: int = HUGEPAGE // 2):
        # hugepages: None = try and remember the answer, True = require, False = never.
        self.hugepages = hugepages
        self.huge_threshold = huge_threshold
        self._huge_works: bool | None = None if hugepages is None else hugepages
        self._live: dict[int, DmaMemory] = {}       # id -> memory
        self.lingering = 0                          # closed while views were still alive

    def alloc(self, size: int) -> DmaMemory:
        if size <= 0:
            raise ValueError(f"cannot allocate {size} bytes of DMA memory: ask for at least one byte")
        mem = None
        if self._huge_works is not False and size >= self.huge_threshold:
            try:
                mem = DmaMemory.allocate(size, hugepage=True)
                self._huge_works = True
            except OSError as e:
                if self.hugepages:
                    raise DmaError(f"no 2 MiB hugepage available for {size} bytes of DMA memory ({e.strerror}): "
                                   "reserve some with: echo 64 > /proc/sys/vm/nr_hugepages") from None
                self._huge_works = False
        if mem is None:
            try:
                mem = DmaMemory.allocate(size, hugepage=False)
            except OSError as e:
                raise DmaError(f"could not allocate {size} bytes of DMA memory ({e.strerror}): free memory or buffers") from None
        self._live[id(mem)] = mem
        return mem

    def adopt(self, mem: DmaMemory) -> DmaMemory:
        self._live[id(mem)] = mem
        return mem

    def free(self, mem: DmaMemory) -> None:
        if self._live.pop(id(mem), None) is None:
            raise DmaError("this DMA memory does not belong to the pool (freed twice?): free each buffer once")
        if not mem.close():
            self.lingering += 1

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        for mem in list(self._live.values()):
            self.free(mem)

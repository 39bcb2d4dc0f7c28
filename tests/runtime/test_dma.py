"""IOVA allocator, DMA memory and the model transport's IOMMU bookkeeping."""
from __future__ import annotations

import mmap
import os

import pytest

from udrv.dma import HUGEPAGE, PAGE, DmaMemory, DmaPool, IovaAllocator
from udrv.errors import DmaError
from udrv.models.pci import DmarFault, ModelPciTransport
from udrv.models.e1000 import E1000Model

BASE = 0x1000_0000


# --- IovaAllocator ---------------------------------------------------------------------------

def test_first_fit_hands_out_consecutive_pages():
    a = IovaAllocator(BASE, BASE + 16 * PAGE)
    assert [a.alloc(PAGE) for _ in range(3)] == [BASE, BASE + PAGE, BASE + 2 * PAGE]
    assert a.bytes_free == 13 * PAGE
    assert a.free_ranges() == [(BASE + 3 * PAGE, BASE + 16 * PAGE)]


def test_sizes_round_up_to_the_iommu_page():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    first = a.alloc(1)
    second = a.alloc(PAGE + 1)
    assert (first, second) == (BASE, BASE + PAGE)
    assert a.allocations() == {BASE: PAGE, BASE + PAGE: 2 * PAGE}
    assert a.bytes_free == PAGE


def test_alignment_skips_ahead_and_leaves_the_gap_for_first_fit():
    a = IovaAllocator(BASE + PAGE, BASE + 0x40000)
    big = a.alloc(PAGE, align=0x10000)
    assert big == BASE + 0x10000
    # The 15 pages before the aligned block stay free and are found first.
    assert a.alloc(PAGE) == BASE + PAGE
    assert a.free_ranges()[0] == (BASE + 2 * PAGE, BASE + 0x10000)


def test_alignment_below_the_page_is_raised_to_the_page():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    a.alloc(PAGE)
    assert a.alloc(16, align=16) == BASE + PAGE


def test_hole_too_small_is_skipped():
    a = IovaAllocator(BASE, BASE + 8 * PAGE)
    blocks = [a.alloc(PAGE) for _ in range(4)]
    a.free(blocks[1])
    a.free(blocks[3])
    # Two one-page holes cannot take two pages; the run after block 3 merged with the tail.
    assert a.alloc(2 * PAGE) == BASE + 3 * PAGE
    assert a.alloc(PAGE) == BASE + PAGE


def test_free_coalesces_both_neighbours():
    a = IovaAllocator(BASE, BASE + 3 * PAGE)
    x, y, z = a.alloc(PAGE), a.alloc(PAGE), a.alloc(PAGE)
    a.free(x)
    a.free(z)
    assert a.free_ranges() == [(BASE, BASE + PAGE), (BASE + 2 * PAGE, BASE + 3 * PAGE)]
    a.free(y)
    assert a.free_ranges() == [(BASE, BASE + 3 * PAGE)]
    assert len(a) == 0
    assert a.alloc(3 * PAGE) == BASE          # the whole window is one piece again


def test_exact_fit_then_exhaustion_then_reuse():
    a = IovaAllocator(BASE, BASE + 2 * PAGE)
    x = a.alloc(2 * PAGE)
    assert x == BASE and a.bytes_free == 0
    with pytest.raises(DmaError, match="no free IOVA range of 0x1000"):
        a.alloc(1)
    a.free(x)
    assert a.alloc(PAGE) == BASE


def test_double_free_is_detected():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    x = a.alloc(PAGE)
    a.free(x)
    with pytest.raises(DmaError, match="double free"):
        a.free(x)
    assert a.free_ranges() == [(BASE, BASE + 4 * PAGE)]   # the failed free changed nothing


def test_free_of_an_address_inside_a_buffer_is_refused():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    x = a.alloc(2 * PAGE)
    with pytest.raises(DmaError, match=f"inside the buffer at {x:#x}"):
        a.free(x + PAGE)
    assert a.allocations() == {x: 2 * PAGE}


def test_bad_arguments():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    with pytest.raises(ValueError):
        a.alloc(0)
    with pytest.raises(ValueError, match="power of two"):
        a.alloc(PAGE, align=3 * PAGE)


def test_window_shrinks_to_whole_pages():
    a = IovaAllocator(BASE + 1, BASE + 3 * PAGE - 1)
    assert a.free_ranges() == [(BASE + PAGE, BASE + 2 * PAGE)]


def test_from_ranges_takes_inclusive_iommu_ranges():
    a = IovaAllocator.from_ranges([(0x2000_0000, 0x2000_0FFF), (BASE, BASE + 2 * PAGE - 1)])
    assert a.free_ranges() == [(BASE, BASE + 2 * PAGE), (0x2000_0000, 0x2000_1000)]
    assert a.alloc(2 * PAGE) == BASE
    assert a.alloc(PAGE) == 0x2000_0000
    with pytest.raises(DmaError):
        IovaAllocator.from_ranges([])


def test_reserve_claims_a_specific_range():
    a = IovaAllocator(BASE, BASE + 4 * PAGE)
    a.reserve(BASE + PAGE, PAGE)
    assert a.alloc(PAGE) == BASE
    assert a.alloc(PAGE) == BASE + 2 * PAGE
    with pytest.raises(DmaError, match="not free"):
        a.reserve(BASE + PAGE, PAGE)
    assert a.free(BASE + PAGE) == PAGE


# --- DMA memory -------------------------------------------------------------------------------

def test_dma_memory_is_a_shareable_memfd():
    mem = DmaMemory.allocate(100)
    try:
        assert mem.size == PAGE and not mem.hugepage
        assert os.readlink(f"/proc/self/fd/{mem.fd}").startswith("/memfd:udrv-dma")
        mem.view()[0:4] = b"\xde\xad\xbe\xef"
        # Another mapping of the same fd (what a second process would do) sees the bytes.
        other = mmap.mmap(mem.fd, mem.size, mmap.MAP_SHARED, mmap.PROT_READ)
        assert other[0:4] == b"\xde\xad\xbe\xef"
        other.close()
        assert mem.vaddr != 0
    finally:
        assert mem.close() is True


def test_attach_maps_an_inherited_fd():
    mem = DmaMemory.allocate(PAGE)
    mem.view()[10:13] = b"abc"
    peer = DmaMemory.attach(os.dup(mem.fd), PAGE)
    assert bytes(peer.view()[10:13]) == b"abc"
    peer.view()[0:1] = b"Z"
    assert bytes(mem.view()[0:1]) == b"Z"
    assert peer.close() and mem.close()


def test_pool_falls_back_to_plain_pages_and_counts_live_memory():
    pool = DmaPool(hugepages=None)
    big = pool.alloc(HUGEPAGE)
    small = pool.alloc(10)
    assert small.size == PAGE and not small.hugepage
    assert big.size == HUGEPAGE                    # hugepage or not, a multiple of the request
    assert len(pool) == 2
    pool.free(small)
    with pytest.raises(DmaError, match="freed twice"):
        pool.free(small)
    pool.close()
    assert len(pool) == 0


def _hugepages_free() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(_hugepages_free() > 0, reason="this host has hugepages")
def test_pool_requiring_hugepages_says_how_to_get_them():
    with pytest.raises(DmaError, match="nr_hugepages"):
        DmaPool(hugepages=True).alloc(HUGEPAGE)


def test_closing_memory_with_a_live_view_defers_the_unmap():
    pool = DmaPool(hugepages=False)
    mem = pool.alloc(PAGE)
    keep = mem.view()[0:8]
    pool.free(mem)
    assert pool.lingering == 1
    keep[0:1] = b"x"                               # still valid memory, never a crash
    keep.release()


# --- the model transport's IOMMU ---------------------------------------------------------------

@pytest.fixture
def t():
    tr = ModelPciTransport(E1000Model())
    yield tr
    tr.close()


def test_dma_alloc_maps_page_aligned_iovas_and_tracks_them(t):
    a = t.dma_alloc(100)
    b = t.dma_alloc(3 * PAGE, align=0x10000)
    assert a.iova == ModelPciTransport.DEFAULT_WINDOW[0]
    assert b.iova % 0x10000 == 0
    assert (a.size, a.mapped_size, len(a.view)) == (100, PAGE, 100)
    assert [(m.iova, m.size) for m in t.dma_mappings()] == [(a.iova, PAGE), (b.iova, 3 * PAGE)]
    a.view[:3] = b"xyz"
    assert t.dma_read(a.iova, 3) == b"xyz"
    t.dma_write(b.iova + 5, b"hello")
    assert bytes(b.view[5:10]) == b"hello"
    t.dma_free(a)
    assert [m.iova for m in t.dma_mappings()] == [b.iova]
    with pytest.raises(DmaError, match="freed twice"):
        t.dma_free(a)


def test_iommu_refuses_unmapped_and_freed_addresses(t):
    buf = t.dma_alloc(PAGE)
    with pytest.raises(DmarFault) as e:
        t.dma_read(0, 4)
    assert e.value.iova == 0 and not e.value.write
    with pytest.raises(DmarFault):
        t.dma_read(buf.iova + PAGE - 2, 4)        # runs off the end of the mapping
    iova = buf.iova
    t.dma_free(buf)
    with pytest.raises(DmarFault):
        t.dma_write(iova, b"x")


def test_iommu_allows_access_across_adjacent_mappings_and_refuses_partial_writes(t):
    a = t.dma_alloc(PAGE)
    b = t.dma_alloc(PAGE)
    assert b.iova == a.iova + PAGE
    t.dma_write(a.iova + PAGE - 2, b"ABCD")
    assert bytes(a.view[PAGE - 2:]) == b"AB" and bytes(b.view[:2]) == b"CD"
    with pytest.raises(DmarFault):
        t.dma_write(b.iova + PAGE - 2, b"WXYZ")  # second half unmapped: nothing is written
    assert bytes(b.view[PAGE - 2:PAGE]) == b"\0\0"


def test_alloc_free_cycles_leak_nothing(t):
    before = (len(t.dma_mappings()), t.iova_allocator.bytes_free, len(t._pool))
    for _ in range(50):
        bufs = [t.dma_alloc(n) for n in (64, PAGE, 5 * PAGE)]
        for b in reversed(bufs):
            t.dma_free(b)
    assert (len(t.dma_mappings()), t.iova_allocator.bytes_free, len(t._pool)) == before
    assert t._pool.lingering == 0                  # every mapping really went away


def test_close_unmaps_everything():
    tr = ModelPciTransport(E1000Model())
    bufs = [tr.dma_alloc(PAGE) for _ in range(3)]
    tr.close()
    assert tr.dma_mappings() == []
    with pytest.raises(ValueError):
        bufs[0].view[0]                            # released: no access after the unmap
    with pytest.raises(DmarFault):
        tr.dma_read(bufs[0].iova, 1)

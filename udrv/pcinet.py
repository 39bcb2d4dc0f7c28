"""PCI network drivers the usbnet way: the driver declares, the framework moves frames.

A `PciNetDriver` names its ring registers (`RingRegs`), its descriptor codec (`RingCodec`: how
a TX descriptor is written, how an RX descriptor's status, length and errors are read, which
bits mean DD and EOP), the offloads its chip takes and its ring bounds, and implements
bring-up, configuration and checkpoint/restore. The framework owns the rest:

  PciNetDriver      ring allocation, programming and release from the declared registers;
                    the C variant (`c_variant()`)
  udrv.pciengine    RingMemory and PciRing, the datapath in Python
  udrv.pciring      the same datapath with the per-frame work in C (native/pci_ring.c) and,
                    where C reaches BAR0, whole turns in C (native/pci_loop.c)

Ring ownership: the driver's open() allocates the rings (frees are on the action list) and
programs the ring registers; every programming bumps `ring_epoch`. The datapath owns the ring
*indices* (hot state, not snapshotted: it re-derives them from the device at every reset) and
re-arms the ring memory when it sees a new epoch. Every descriptor address is computed from the
driver's own buffers, never read back from the ring, so a device or a bug scribbling over
descriptor memory cannot make us point the NIC elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

from . import offload
from .actions import Action, ActionList
from .driver import FrameSink, NetDriver
from .pciengine import ALL_ONES, PciRing, RingMemory
from .pcitransport import PciTransport

# --- what a driver declares ----------------------------------------------------------------------
@dataclass(frozen=True)
class PciId:
    vendor: int
    device: int
    name: str
    flags: int


@dataclass(frozen=True)
class RingRegs:
    """BAR0 offsets of one RX and one TX descriptor queue's registers (base low/high, length in
    bytes, head, tail), as the datasheet names them."""
    rdbal: int
    rdbah: int
    rdlen: int
    rdh: int
    rdt: int
    tdbal: int
    tdbah: int
    tdlen: int
    tdh: int
    tdt: int

    def all(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def bar_min(self) -> int:
        """The BAR0 size that holds every one of them."""
        return max(self.all()) + 4


@dataclass(frozen=True)
class RingBounds:
    """Descriptors a ring may have: `align` keeps the ring length a multiple the chip takes."""
    min: int = 8
    max: int = 4096
    align: int = 8

    def size(self, n: int) -> int:
        """Descriptors for a ring asked to hold n: at least min, a multiple of align, at most max."""
        n = max(self.min, int(n))
        n = (n + self.align - 1) // self.align * self.align
        return min(n, self.max)

    def holds(self, n: int) -> bool:
        return not n % self.align and self.min <= n <= self.max


class RingCodec:
    """A chip's descriptors as the engine reads and writes them. The byte offsets and bits say
    where an RX descriptor keeps its length, status and errors and a TX descriptor its status;
    the methods write the descriptors. A TX packet is a plain descriptor per buffer, or a
    context descriptor (where the chip puts the checksum, TSO's segment size) followed by data
    descriptors under it; EOP and RS go on the packet's last descriptor only.

    `c_layout` names the C rings' codec this one is byte for byte (native/pci_ring.h knows
    "8254x"); None keeps the driver on the Python ring."""
    desc_size: ClassVar[int] = 16
    c_layout: ClassVar[str | None] = None
    rx_length_at: ClassVar[int]
    rx_status_at: ClassVar[int]
    rx_errors_at: ClassVar[int]
    rx_dd: ClassVar[int]
    rx_eop: ClassVar[int]
    rx_frame_errors: ClassVar[int]       # error bits that mean the frame is bad (dropped)
    tx_status_at: ClassVar[int]
    tx_dd: ClassVar[int]
    tx_errors: ClassVar[tuple[tuple[int, str], ...]] = ()   # (status bit, reason), first match wins
    ctx_offset_max: ClassVar[int]        # header offsets a context descriptor can hold
    paylen_max: ClassVar[int]            # TSO payload a context descriptor can hold
    mss_max: ClassVar[int]

    def rx_arm(self, ring: Any, off: int, addr: int) -> None:
        """The descriptor at off owns the buffer at addr, status clear."""
        raise NotImplementedError

    def rx_addr(self, ring: Any, off: int) -> int:
        raise NotImplementedError

    def tx_plain(self, ring: Any, off: int, addr: int, length: int, last: bool) -> None:
        """A legacy descriptor: the packet's bytes at addr (last: EOP + RS)."""
        raise NotImplementedError

    def tx_data(self, ring: Any, off: int, addr: int, length: int, last: bool, dcmd: int, popts: int) -> None:
        """A data descriptor under the last context (dcmd, popts: what context() returned)."""
        raise NotImplementedError

    def tx_csum(self, ring: Any, off: int, start: int, at: int, tcp: bool) -> tuple[int, int]:
        """A checksum context: sum from `start` to the end, store at `at`. Returns (dcmd, popts)
        for the data descriptors under it."""
        raise NotImplementedError

    def tx_tso(self, ring: Any, off: int, v4: bool, l3: int, l4: int, csum_at: int, paylen: int,
               hdr_len: int, mss: int) -> tuple[int, int]:
        """A TCP segmentation context (IPv4 header checksum too when v4). Returns (dcmd, popts)."""
        raise NotImplementedError

    def context(self, p: offload.TxPlan, tcp: bool) -> tuple[bytes, int, int]:
        """(context descriptor, dcmd, popts) for a plan; ValueError if a field cannot hold it.
        Offsets are from the start of the frame."""
        ctx = bytearray(self.desc_size)
        if p.tso:
            lay = p.layout
            assert lay is not None
            if max(lay.l3 + 10, p.csum_at, p.hdr_len) > self.ctx_offset_max:
                raise ValueError("headers beyond what the context's offsets reach")
            if not 0 < p.paylen <= self.paylen_max or not 0 < p.mss <= self.mss_max:
                raise ValueError("PAYLEN/MSS out of range")
            dcmd, popts = self.tx_tso(ctx, 0, lay.ipv4, lay.l3, lay.l4, p.csum_at, p.paylen, p.hdr_len, p.mss)
            return bytes(ctx), dcmd, popts
        if max(p.csum_start, p.csum_at) > self.ctx_offset_max:
            raise ValueError("checksum offsets beyond the context's fields")
        dcmd, popts = self.tx_csum(ctx, 0, p.csum_start, p.csum_at, tcp)
        return bytes(ctx), dcmd, popts


@dataclass
class RingSoft:
    """The ring geometry a PCI driver's soft state carries (its soft dataclass derives from
    this): what the framework allocates and what a checkpoint compares."""
    rx_count: int = 8
    tx_count: int = 8
    rx_bufsize: int = 2048
    tx_bufsize: int = 2048
    opened: bool = False
    rx_ring_iova: int = 0                # 0 = no rings allocated
    tx_ring_iova: int = 0
    rx_buf_iova: int = 0
    tx_buf_iova: int = 0

# --- the driver base ------------------------------------------------------------------------------
class PciNetDriver(NetDriver):
    """What a PCI NIC driver declares for the engine, and the ring work done from it.

    Hooks a driver implements besides the NetDriver entry points: `check_alive()` (raise
    DeviceGone when the device no longer answers), `restart_tx_queue()` (TX off, TDH = TDT = 0,
    TX on: a busy or impossible TX queue after a fault), `reprogram_rings()` (RX/TX off, rings
    programmed, on again) and optionally `rings_programmed()` (chip work after the ring
    registers are written)."""

    ids: ClassVar[tuple[PciId, ...]] = ()
    ring_regs: ClassVar[RingRegs]
    codec: ClassVar[RingCodec]
    ring_bounds: ClassVar[RingBounds] = RingBounds()

    soft: RingSoft
    datapath: PciRing | None = None

    def __init__(self, pci: PciTransport, actions: ActionList):
        self.pci = pci
        self.actions = actions
        self.ident = self.match(pci.info.vendor, pci.info.device)
        self.rings: RingMemory | None = None
        self.ring_epoch = 0                  # bumped whenever ring registers are (re)programmed
        self._rings_action: Action | None = None

    @classmethod
    def match(cls, vendor: int, device: int) -> PciId | None:
        for i in cls.ids:
            if (i.vendor, i.device) == (vendor, device):
                return i
        return None

    # --- register access (a driver may check what it reads) --------------------------------------
    def rd(self, reg: int) -> int:
        return self.pci.read32(reg)

    def wr(self, reg: int, value: int) -> None:
        self.pci.write32(reg, value & ALL_ONES)

    def check_alive(self) -> None:
        """Raise DeviceGone if the device stopped answering (all ones read back)."""

    def restart_tx_queue(self) -> None:
        raise NotImplementedError

    def reprogram_rings(self) -> None:
        raise NotImplementedError

    def rings_programmed(self) -> None:
        """After program_rings wrote the ring registers (nothing by default)."""

    # --- ring memory and registers ----------------------------------------------------------------
    def alloc_rings(self, rx_count: int, tx_count: int, rx_bufsize: int, tx_bufsize: int) -> RingMemory:
        rings = RingMemory.allocate(self.pci, rx_count, tx_count, rx_bufsize, tx_bufsize, self.codec.desc_size)
        self.rings = rings
        self._rings_action = self.actions.record(f"{self.name} rings ({rings.nbufs} DMA buffers)",
                                                 lambda: self._free_rings(rings))
        s = self.soft
        s.rx_count, s.tx_count, s.rx_bufsize, s.tx_bufsize = rx_count, tx_count, rx_bufsize, tx_bufsize
        s.rx_ring_iova, s.tx_ring_iova = rings.rx_ring.iova, rings.tx_ring.iova
        s.rx_buf_iova, s.tx_buf_iova = rings.rx_bufs.iova, rings.tx_bufs.iova
        return rings

    def _free_rings(self, rings: RingMemory) -> None:
        if self.datapath is not None:
            self.datapath.detach(rings)
        if self.rings is rings:
            self.rings = None
        rings.free(self.pci)

    def release_rings(self) -> None:
        """Give the rings back now (stop, MTU change): the device must no longer use them."""
        rings, action = self.rings, self._rings_action
        self._rings_action = None
        if action is not None:
            self.actions.released(action)
        if rings is not None:
            self._free_rings(rings)
        s = self.soft
        s.rx_ring_iova = s.tx_ring_iova = s.rx_buf_iova = s.tx_buf_iova = 0

    def program_rings(self) -> None:
        """Ring bases, lengths, heads and tails (tails 0: no RX buffers yet; the datapath arms
        them). RX and TX must be disabled while heads are written."""
        r, g, ds = self.rings, self.ring_regs, self.codec.desc_size
        assert r is not None
        for bal, bah, length, head, tail, ring, n in (
                (g.rdbal, g.rdbah, g.rdlen, g.rdh, g.rdt, r.rx_ring, r.rx_count),
                (g.tdbal, g.tdbah, g.tdlen, g.tdh, g.tdt, r.tx_ring, r.tx_count)):
            self.wr(bal, ring.iova & ALL_ONES)
            self.wr(bah, ring.iova >> 32)
            self.wr(length, n * ds)
            self.wr(head, 0)
            self.wr(tail, 0)
        self.rings_programmed()
        self.ring_epoch += 1

    def clear_ring_regs(self) -> None:
        """Lengths first: a device that still fetches sees an empty ring, not a half-written one."""
        g = self.ring_regs
        for reg in (g.rdlen, g.rdbal, g.rdbah, g.rdh, g.rdt, g.tdlen, g.tdbal, g.tdbah, g.tdh, g.tdt):
            self.wr(reg, 0)

    def ring_regs_match(self) -> bool:
        """The device holds the rings we programmed and heads/tails it could legally hold."""
        r, g, ds = self.rings, self.ring_regs, self.codec.desc_size
        if r is None:
            return False
        want = ((g.rdbal, r.rx_ring.iova & ALL_ONES), (g.rdbah, r.rx_ring.iova >> 32),
                (g.rdlen, r.rx_count * ds), (g.tdbal, r.tx_ring.iova & ALL_ONES),
                (g.tdbah, r.tx_ring.iova >> 32), (g.tdlen, r.tx_count * ds))
        if any(self.rd(reg) != v for reg, v in want):
            return False
        return all(self.rd(reg) < n for reg, n in ((g.rdh, r.rx_count), (g.rdt, r.rx_count),
                                                    (g.tdh, r.tx_count), (g.tdt, r.tx_count)))

    def ring_invariants(self) -> list[str]:
        """What the framework checks of the rings after a configuration call."""
        s, b = self.soft, self.ring_bounds
        broken = [f"{what} ring of {n} descriptors is not a multiple of {b.align} in {b.min}..{b.max} "
                  f"(ring length must be a multiple of {b.align * self.codec.desc_size} bytes)"
                  for what, n in (("RX", s.rx_count), ("TX", s.tx_count)) if not b.holds(n)]
        if s.opened:
            r = self.rings
            if r is None:
                broken.append("open but no rings allocated")
            elif not (r.rx_ring.iova == s.rx_ring_iova and r.tx_ring.iova == s.tx_ring_iova
                      and r.rx_count == s.rx_count and r.tx_count == s.tx_count):
                broken.append("ring IOVAs/sizes in the soft state differ from the allocated rings")
            elif self.datapath is not None:
                broken += self.datapath.check()
        elif self.rings is not None:
            broken.append("rings allocated while the interface is closed")
        return broken

    # --- the datapath -----------------------------------------------------------------------------
    def make_datapath(self, journal: Any, sink: FrameSink, n_rx: int, n_tx: int,
                      on_progress: Callable[[], None] | None) -> PciRing:
        self.soft.rx_count = self.ring_bounds.size(n_rx)
        self.soft.tx_count = self.ring_bounds.size(n_tx)
        self.datapath = engine_class(type(self))(self, journal, sink, on_progress)
        return self.datapath

    @classmethod
    def has_c_datapath(cls) -> bool:
        """The C rings know this driver's descriptor layout."""
        return cls.codec.c_layout in C_LAYOUTS

C_LAYOUTS = frozenset({"8254x"})     # descriptor codecs native/pci_ring.c implements


def engine_class(driver_cls: type[PciNetDriver]) -> type[PciRing]:
    """The ring a driver class runs: C for its C variant (fast_path), else Python."""
    if driver_cls.fast_path:
        from .pciring import PciNativeRing
        return PciNativeRing
    return PciRing

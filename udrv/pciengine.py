"""The PCI ring engine in Python: descriptor rings in DMA memory as a udrv datapath.

`RingMemory` holds two descriptor rings and two packet-buffer areas (descriptor i always uses
buffer i). `PciRing` is the datapath (udrv.datapath.Datapath) every `udrv.pcinet.PciNetDriver`
runs: journal draining and confirmation, CoDel (`journal.aqm_drop()`), software offload fallback
(udrv.offload), lost-completion and hang policy, invariants of the rings; it reaches the device
only through the registers and the descriptor codec its driver declares. `udrv.pciring` is the
same datapath with the per-frame work in C.

Environment knobs the engine reads (`Knobs.read()`, once per datapath, here only):
  UDRV_E1000_LOOP=0     the C ring never loops whole turns in C, the daemon's Python loop
                        polls instead (to compare; one name for every PCI driver)
  UDRV_TURN_GAP_US=N    after a C-loop turn that caught up, the next begins no sooner than N us
                        after it began (default 1000; interrupt moderation, native/pci_loop.h)
  UDRV_RX_COALESCE=0    no RX coalescing into GSO super-frames (the test is
                        udrv.fastpath.rx_coalesce_allowed, shared with the USB ring)
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from . import offload
from .datapath import Capabilities, DatapathCounters, DatapathDefaults, DatapathReport
from .driver import FrameSink
from .errors import DriverFault, UdrvError
from .pcitransport import DmaBuffer, PciTransport

ALL_ONES = 0xFFFFFFFF
ETH_HLEN = 14


class PciNetError(UdrvError):
    """The ring engine refused what a PCI driver declared or the memory it was given."""


class RingDriver(Protocol):
    """What the ring engine needs of its driver (udrv.pcinet.PciNetDriver gives it)."""
    name: str
    pci: PciTransport
    soft: Any                    # udrv.pcinet.RingSoft: mtu, opened, ...
    rings: RingMemory | None     # allocated and programmed by the driver's open()
    ring_epoch: int              # bumped whenever the ring registers are (re)programmed
    ring_regs: Any               # udrv.pcinet.RingRegs
    codec: Any                   # udrv.pcinet.RingCodec
    offloads: frozenset[str]

    def rd(self, reg: int) -> int: ...
    def wr(self, reg: int, value: int) -> None: ...
    def check_alive(self) -> None: ...
    def restart_tx_queue(self) -> None: ...
    def reprogram_rings(self) -> None: ...


# --- DMA memory for the rings -------------------------------------------------------------------
class RingMemory:
    """Two descriptor rings and two packet-buffer areas; descriptor i always uses buffer i."""

    def __init__(self, rx_ring: DmaBuffer, tx_ring: DmaBuffer, rx_bufs: DmaBuffer, tx_bufs: DmaBuffer,
                 rx_count: int, tx_count: int, rx_bufsize: int, tx_bufsize: int):
        self.rx_ring, self.tx_ring, self.rx_bufs, self.tx_bufs = rx_ring, tx_ring, rx_bufs, tx_bufs
        self.rx_count, self.tx_count = rx_count, tx_count
        self.rx_bufsize, self.tx_bufsize = rx_bufsize, tx_bufsize
        self.nbufs = 4
        self.freed = False

    @classmethod
    def allocate(cls, pci: PciTransport, rx_count: int, tx_count: int, rx_bufsize: int,
                 tx_bufsize: int, desc_size: int) -> RingMemory:
        got: list[DmaBuffer] = []
        try:
            for size in (rx_count * desc_size, tx_count * desc_size, rx_count * rx_bufsize,
                         tx_count * tx_bufsize):
                got.append(pci.dma_alloc(size, 4096))
        except BaseException:
            for b in reversed(got):
                pci.dma_free(b)
            raise
        for b in got[:2]:
            b.view[:] = bytes(len(b.view))
        return cls(*got, rx_count, tx_count, rx_bufsize, tx_bufsize)

    def matches(self, cp: Any) -> bool:
        """The memory a checkpoint (with RingSoft's fields) recorded, still allocated."""
        return (not self.freed and self.rx_ring.iova == cp.rx_ring_iova and self.tx_ring.iova == cp.tx_ring_iova
                and self.rx_bufs.iova == cp.rx_buf_iova and self.tx_bufs.iova == cp.tx_buf_iova
                and (self.rx_count, self.tx_count, self.rx_bufsize, self.tx_bufsize)
                == (cp.rx_count, cp.tx_count, cp.rx_bufsize, cp.tx_bufsize))

    def rx_addr(self, i: int) -> int:
        return self.rx_bufs.iova + i * self.rx_bufsize

    def tx_addr(self, i: int) -> int:
        return self.tx_bufs.iova + i * self.tx_bufsize

    def free(self, pci: PciTransport) -> None:
        if self.freed:
            return
        self.freed = True
        for b in (self.tx_bufs, self.rx_bufs, self.tx_ring, self.rx_ring):
            pci.dma_free(b)


# --- settings from the environment -----------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """The settings above, as one datapath sees them for its whole life."""
    c_loop: bool = True          # UDRV_E1000_LOOP != "0"
    turn_gap: float = 0.001      # UDRV_TURN_GAP_US, in seconds

    @classmethod
    def read(cls) -> Knobs:
        return cls(c_loop=os.environ.get("UDRV_E1000_LOOP", "1") != "0",
                   turn_gap=float(os.environ.get("UDRV_TURN_GAP_US", "1000")) / 1e6)


# --- the Python datapath ---------------------------------------------------------------------------
_U16 = struct.Struct("<H")
_CSUM_FIELDS = struct.Struct("<HH")    # virtio-net header: csum_start, csum_offset at byte 6
_GSO_FIELDS = struct.Struct("<HH")     # virtio-net header: gso_size, csum_start at byte 4


@dataclass
class TxPiece:
    """One packet for the device: a plain frame, or (ctx set) a context descriptor followed by
    data descriptors. `data` may span several buffers (TSO); `packets` is how many wire frames
    it becomes."""
    data: bytes | bytearray
    ctx: bytes | None = None
    dcmd: int = 0
    popts: int = 0
    packets: int = 1
    wire_bytes: int = 0          # 0: len(data) (TSO repeats the headers in every segment)
    tso: offload.TxPlan | None = None   # header edits for TSO, made on the DMA copy

    def descriptors(self, bufsize: int) -> int:
        return (1 if self.ctx else 0) + max(1, -(-len(self.data) // bufsize))


class PciRing(DatapathDefaults):
    """One RX and one TX descriptor ring as a udrv Datapath, in Python, in the driver's codec.

    RX: N descriptors, N-1 armed (head == tail means "no buffers"); the one not armed sits at
    the tail. poll() harvests DD descriptors in order, hands frames to the sink, re-arms each
    and writes the RX tail once per batch. TX: up to N-1 descriptors in flight; xmit() fills
    descriptors from the journal and writes the TX tail once per batch; poll() reclaims
    finished packets in order and confirms the journal through the last one's sequence number.

    TX packets: a plain frame is one plain descriptor. A frame whose virtio-net header asks for
    a checksum or TSO is a context descriptor + data descriptors over as many buffers as it
    needs; RS (so DD) only on its last descriptor, and `tx_eop[i]` says where the packet of
    descriptor i ends. What the chip cannot do (or a ring too small for the packet) goes
    through udrv.offload's software path: finished frames, plain descriptors, handed out as
    room frees up; the journal frame is confirmed with the last.
    """

    caps = Capabilities(handles_vnet=True)   # journal entries may carry a virtio-net header

    def __init__(self, driver: RingDriver, journal: Any, sink: FrameSink,
                 on_progress: Callable[[], None] | None = None):
        self.driver = driver
        self.journal = journal
        self.sink = sink
        self.on_progress = on_progress
        self.codec = driver.codec
        self.regs = driver.ring_regs
        self.knobs = Knobs.read()
        self.counters = DatapathCounters()
        self.running = False
        self.epoch = -1                   # ring_epoch of the rings this datapath armed
        self.mem: RingMemory | None = None
        self.rx_next = 0                  # next RX descriptor to harvest
        self.rx_tail = 0                  # RX tail as last written
        self.tx_next = 0                  # next TX descriptor to fill (TX tail as last written)
        self.tx_clean = 0                 # oldest TX descriptor not yet reclaimed
        self.tx_seq: list[int] = []       # journal seq to confirm when descriptor i completes
        self.tx_len: list[int] = []       # bytes / wire frames of the packet ending at i
        self.tx_pkts: list[int] = []
        self.tx_eop: list[int] = []       # last descriptor of the packet descriptor i belongs to
        self._pending: list[TxPiece] = []  # software pieces of journal frame _pending_seq still to hand out
        self._pending_seq = -1
        # offloads done by the chip; the rest is done in software (tests may narrow it)
        self.chip_offloads = frozenset(driver.offloads)
        self.tx_offload = {"csum": 0, "tso": 0, "software": 0}    # journal frames, by how they went
        self._tx_err_mask = sum(bit for bit, _ in self.codec.tx_errors)
        self._inline_tx = type(self)._put is PciRing._put          # descriptor tables are these lists
        self._rx_discard = False          # inside a frame that spans descriptors: drop to EOP
        self.idle_checks = 0

    @property
    def pci(self) -> PciTransport:
        return self.driver.pci            # looked up each time: the fault injector wraps it

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        d = self.driver
        if not d.soft.opened or d.rings is None:
            self.running = False
            return
        if self.epoch != d.ring_epoch or self.mem is not d.rings:
            self.journal.rewind()          # whatever sat in an older ring goes out again
            self._arm_fresh()              # registers were (re)programmed: heads are 0
        self.running = True

    def stop(self) -> None:
        """Stop moving frames. The ring memory belongs to the driver (freed by stop/rollback);
        frames still in the TX ring stay 'sent' in the journal and are re-issued when the
        rings are next armed."""
        self.running = False

    def detach(self, mem: RingMemory) -> None:
        """The driver is freeing `mem`: forget every view into it."""
        if self.mem is mem:
            self.mem = None
            self.running = False
            self.epoch = -1

    def reset(self) -> int:
        """After a fault (the driver's restore ran first): clean both rings, re-attach where the
        device's heads are (or from 0 when the registers were re-programmed), re-issue every
        unconfirmed journal frame. Returns the number re-issued."""
        d = self.driver
        self._salvage_rx()
        self._rx_discard = False
        again = self.journal.rewind()
        if not d.soft.opened or d.rings is None:
            self.running = False
            return again
        if self.epoch != d.ring_epoch or self.mem is not d.rings:
            self._arm_fresh()
        else:
            self._rearm_in_place()
        self.running = True
        return again

    def _salvage_rx(self) -> None:
        """Frames the device finished writing before the fault are the host's: deliver them
        before the ring is re-armed (re-arming clears their descriptors). Only from memory this
        datapath armed; a device that refuses the tail write leaves it to the re-arm."""
        if not self.running or self.mem is None or self.mem.freed:
            return
        try:
            self._rx_harvest()
        except UdrvError:
            pass

    def _bind(self, mem: RingMemory) -> None:
        self.mem = mem
        self.n_rx, self.n_tx = mem.rx_count, mem.tx_count
        self.rx_ring, self.tx_ring = mem.rx_ring.view, mem.tx_ring.view
        self.rx_buf, self.tx_buf = mem.rx_bufs.view, mem.tx_bufs.view
        self.rx_bufsize, self.tx_bufsize = mem.rx_bufsize, mem.tx_bufsize
        self.rx_addrs = [mem.rx_addr(i) for i in range(mem.rx_count)]
        self.tx_addrs = [mem.tx_addr(i) for i in range(mem.tx_count)]
        self._reset_tx_tables()

    def _reset_tx_tables(self) -> None:
        n = self.n_tx
        self.tx_seq = [-1] * n
        self.tx_len = [0] * n
        self.tx_pkts = [0] * n
        self.tx_eop = list(range(n))
        self._pending = []                 # the journal is rewound with the ring: re-built then
        self._pending_seq = -1

    def _clean_memory(self) -> None:
        """Every RX descriptor points at its own buffer with status 0; TX descriptors zeroed."""
        ring, arm, ds = self.rx_ring, self.codec.rx_arm, self.codec.desc_size
        for i, addr in enumerate(self.rx_addrs):
            arm(ring, i * ds, addr)
        self.tx_ring[:] = bytes(len(self.tx_ring))
        self._reset_tx_tables()

    def _arm_fresh(self) -> None:
        d = self.driver
        self._bind(d.rings)
        self._clean_memory()
        self.rx_next = self.tx_next = self.tx_clean = 0
        self.rx_tail = self.n_rx - 1
        self.epoch = d.ring_epoch
        d.wr(self.regs.rdt, self.rx_tail)            # N-1 buffers to the device

    def _rearm_in_place(self) -> None:
        """Registers unchanged: keep the device's heads. TX: an idle queue (head == tail) is
        taken as it is, a busy or impossible one is restarted at 0 by the driver. RX: re-arm N-1
        buffers from the head on (one tail write); an impossible head makes the driver
        re-program the rings."""
        d, g = self.driver, self.regs
        self._clean_memory()
        tdh, tdt = d.rd(g.tdh), d.rd(g.tdt)
        if tdh < self.n_tx and tdh == tdt:
            self.tx_next = self.tx_clean = tdh
        else:
            d.restart_tx_queue()
            self.tx_next = self.tx_clean = 0
        rdh = d.rd(g.rdh)
        if rdh >= self.n_rx:
            d.reprogram_rings()
            self._arm_fresh()
            return
        self.rx_next = rdh
        self.rx_tail = (rdh - 1) % self.n_rx
        d.wr(g.rdt, self.rx_tail)

    # --- datapath entry points --------------------------------------------------------------------
    def xmit(self) -> int:
        if not self.running:
            return 0
        start = self.tx_next
        sent = self._fill(None)
        if self.tx_next != start:
            self.pci.write32(self.regs.tdt, self.tx_next)
        return sent

    def _free(self) -> int:
        return self.n_tx - 1 - ((self.tx_next - self.tx_clean) % self.n_tx)

    def _fill(self, limit: int | None) -> int:
        """Packets for up to `limit` journal frames (None: as many as fit); returns the number
        handed to the device."""
        n, bs, journal, codec = self.n_tx, self.tx_bufsize, self.journal, self.codec
        ds, plain, put_data = codec.desc_size, codec.tx_plain, codec.tx_data
        inline = self._inline_tx
        csum_hw = "csum" in self.chip_offloads
        tso_hw = "tso4" in self.chip_offloads or "tso6" in self.chip_offloads
        ring, buf, addrs = self.tx_ring, self.tx_buf, self.tx_addrs
        sent = taken = 0
        free = self._free()
        while free > 0 and (limit is None or taken < limit):
            if self._pending:
                free -= self._drain_pending(free)
                if self._pending:
                    break
                continue
            if journal.aqm_drop():           # waited too long (the framework's AQM): in order
                seq = journal.sent
                journal.mark_sent(seq)
                self._tx_drop(seq)
                taken += 1
                continue
            item = journal.peek_unsent()     # after the verdict: a CE mark is in the slot
            if item is None:
                break
            seq, vnet, frame = item
            length = len(frame)
            if inline and not vnet and ETH_HLEN <= length <= bs:
                # the common case, kept short: one plain descriptor
                journal.mark_sent(seq)
                i = self.tx_next
                buf[i * bs:i * bs + length] = frame
                plain(ring, i * ds, addrs[i], length, True)
                self.tx_seq[i], self.tx_len[i], self.tx_pkts[i], self.tx_eop[i] = seq, length, 1, i
                self.tx_next = (i + 1) % n
                free -= 1
                taken += 1
                sent += 1
                continue
            if (inline and csum_hw and free >= 2 and vnet and not vnet[1] and vnet[0] & offload.F_NEEDS_CSUM
                    and ETH_HLEN <= length <= bs):
                start, offset = _CSUM_FIELDS.unpack_from(vnet, 6)
                at = start + offset
                if at <= codec.ctx_offset_max and start < length and at + 2 <= length:
                    # checksum offload, kept short too: a context descriptor + one data descriptor
                    journal.mark_sent(seq)
                    i = self.tx_next
                    j = (i + 1) % n
                    dcmd, popts = codec.tx_csum(ring, i * ds, start, at, offset == 16)
                    buf[j * bs:j * bs + length] = frame
                    put_data(ring, j * ds, addrs[j], length, True, dcmd, popts)
                    self.tx_eop[i] = self.tx_eop[j] = j
                    self.tx_seq[j], self.tx_len[j], self.tx_pkts[j] = seq, length, 1
                    self.tx_next = (j + 1) % n
                    self.tx_offload["csum"] += 1
                    free -= 2
                    taken += 1
                    sent += 1
                    continue
            if inline and tso_hw and vnet and vnet[1] in (1, 4) and vnet[0] & offload.F_NEEDS_CSUM:
                used = self._put_tso_inline(seq, vnet, frame, free)
                if used < 0:
                    break
                if used:
                    free -= used
                    taken += 1
                    sent += 1
                    continue
            pieces = self._pieces(vnet, frame)
            if pieces is not None and max(p.descriptors(bs) for p in pieces) > n - 1:
                # a packet larger than the whole ring (TSO on a small ring): software pieces
                pieces = self._software(vnet, frame)
            if pieces is None:              # cannot go on the wire: counted, confirmed in order
                journal.mark_sent(seq)
                self._tx_drop(seq)
                taken += 1
                continue
            need = sum(p.descriptors(bs) for p in pieces)
            if need > free and need <= n - 1:
                break                       # it fits once the ring drains
            journal.mark_sent(seq)
            taken += 1
            sent += 1
            if need > free:
                # more pieces than the ring holds at once: handed out as room frees up
                self._pending, self._pending_seq = pieces, seq
                continue
            last = len(pieces) - 1
            for i, p in enumerate(pieces):
                self._put(p, seq if i == last else -1)
            free -= need
        return sent

    def _put_tso_inline(self, seq: int, vnet: bytes, frame: bytes, free: int) -> int:
        """TSO for the plain case (untagged IPv4 or IPv6 without extension headers, TCP where
        csum_start says): context + data descriptors without building a plan. Returns the
        descriptors used, 0 to leave the frame to the general path (_pieces)."""
        gso_size, start = _GSO_FIELDS.unpack_from(vnet, 4)
        length, bs, n, codec = len(frame), self.tx_bufsize, self.n_tx, self.codec
        v4 = vnet[1] == 1
        if frame[12:14] != (b"\x08\x00" if v4 else b"\x86\xdd") or not gso_size or length < 54:
            return 0
        if v4:
            if frame[14] >> 4 != 4 or frame[23] != 6 or start != 14 + (frame[14] & 0xF) * 4:
                return 0
        elif frame[14] >> 4 != 6 or frame[20] != 6 or start != 54:
            return 0
        hdr_len = start + (frame[start + 12] >> 4) * 4 if start + 20 <= length else 0
        need = 1 + -(-length // bs)
        if not start + 20 <= hdr_len < length or hdr_len > codec.ctx_offset_max or need > n - 1 \
                or ("tso4" if v4 else "tso6") not in self.chip_offloads or length - hdr_len > codec.paylen_max:
            return 0
        if need > free:
            return -1                          # it fits once the ring drains
        self.journal.mark_sent(seq)
        ring, buf, addrs, ds = self.tx_ring, self.tx_buf, self.tx_addrs, codec.desc_size
        first = i = self.tx_next
        paylen = length - hdr_len
        dcmd, popts = codec.tx_tso(ring, i * ds, v4, ETH_HLEN, start, start + 16, paylen, hdr_len, gso_size)
        i = (i + 1) % n
        data = memoryview(frame)
        h = i * bs
        buf[h:h + min(bs, length)] = data[:bs]
        # the edits a TSO engine expects, on the DMA copy (udrv.offload.tso_prepare)
        if v4:
            buf[h + 24:h + 26] = b"\0\0"
            seed = offload.fold_add(offload.ones_sum(data[26:34]), 6)
        else:
            seed = offload.fold_add(offload.ones_sum(data[22:54]), 6)
        buf[h + start + 16:h + start + 18] = seed.to_bytes(2, "big")
        last = (first + need - 1) % n
        off = 0
        put_data = codec.tx_data
        while True:
            chunk = min(bs, length - off)
            if off:
                buf[i * bs:i * bs + chunk] = data[off:off + chunk]
            off += chunk
            put_data(ring, i * ds, addrs[i], chunk, i == last, dcmd, popts)
            if i == last:
                break
            i = (i + 1) % n
        self._mark_packet(first, last)
        segs = max(1, -(-paylen // gso_size))
        self.tx_seq[i], self.tx_len[i], self.tx_pkts[i] = seq, length + (segs - 1) * hdr_len, segs
        self.tx_next = (i + 1) % n
        self.tx_offload["tso"] += 1
        return need

    def _mark_packet(self, first: int, last: int) -> None:
        """Descriptors first..last (ring order) are one packet ending at last."""
        eop, n = self.tx_eop, self.n_tx
        k = first
        while True:
            eop[k] = last
            if k == last:
                break
            k = (k + 1) % n

    def _drain_pending(self, free: int) -> int:
        used = 0
        bs = self.tx_bufsize
        while self._pending and self._pending[0].descriptors(bs) <= free - used:
            p = self._pending.pop(0)
            used += p.descriptors(bs)
            self._put(p, self._pending_seq if not self._pending else -1)
        return used

    def _tx_drop(self, seq: int) -> None:
        """A journal frame that will never reach the wire leaves in order: now if nothing is in
        flight, else with the packet before it."""
        if self.tx_next == self.tx_clean:
            self.journal.confirm_through(seq)
        else:
            self.tx_seq[(self.tx_next - 1) % self.n_tx] = seq

    def _tx_error(self, reason: str) -> None:
        self.counters.tx_error(reason)

    def _pieces(self, vnet: bytes, frame: bytes) -> list[TxPiece] | None:
        """What the device gets for one journal frame (None: it cannot be sent, counted)."""
        if not vnet:
            if len(frame) < ETH_HLEN or len(frame) > self.tx_bufsize:
                self._tx_error("runt" if len(frame) < ETH_HLEN else "oversize")
                return None
            return [TxPiece(frame)]
        try:
            hdr = offload.VnetHdr.parse(vnet)
            p = offload.plan(hdr, frame)
        except offload.OffloadError:
            self._tx_error("bad_offload")
            return None
        if p is None:
            return self._pieces(b"", frame)
        if p.need in self.chip_offloads:
            try:
                ctx, dcmd, popts = self.codec.context(p, tcp=hdr.csum_offset == 16)
            except ValueError:
                return self._software(vnet, frame)
            if p.tso:
                segs = max(1, -(-p.paylen // p.mss))
                self.tx_offload["tso"] += 1
                return [TxPiece(frame, ctx, dcmd, popts, segs, len(frame) + (segs - 1) * p.hdr_len, p)]
            if len(frame) > self.tx_bufsize:
                self._tx_error("oversize")
                return None
            self.tx_offload["csum"] += 1
            return [TxPiece(frame, ctx, dcmd, popts)]
        return self._software(vnet, frame)

    def _software(self, vnet: bytes, frame: bytes) -> list[TxPiece] | None:
        """udrv.offload does what the chip would: finished frames on plain descriptors."""
        try:
            frames = offload.resolve(offload.VnetHdr.parse(vnet), frame)
        except offload.OffloadError:
            self._tx_error("bad_offload")
            return None
        self.tx_offload["software"] += 1
        if any(len(f) > self.tx_bufsize for f in frames):
            self._tx_error("oversize")
            return None
        return [TxPiece(f) for f in frames]

    def _put(self, p: TxPiece, seq: int) -> None:
        """Descriptors for one packet from tx_next on; RS on the last one only."""
        n, bs, ring, buf, addrs, codec = self.n_tx, self.tx_bufsize, self.tx_ring, self.tx_buf, self.tx_addrs, self.codec
        ds = codec.desc_size
        i = first = self.tx_next
        if p.ctx is not None:
            ring[i * ds:(i + 1) * ds] = p.ctx
            i = (i + 1) % n
        data, total = memoryview(p.data), len(p.data)
        nbuf = max(1, -(-total // bs))
        last = (i + nbuf - 1) % n
        if p.tso is not None:
            # the TSO edits go to the DMA copy of the headers (the first buffer holds them all:
            # the context's header length field is small); the journal keeps the frame as sent
            h = i * bs
            buf[h:h + p.tso.hdr_len] = data[:p.tso.hdr_len]
            offload.tso_prepare(buf[h:h + p.tso.hdr_len], p.tso)
        off = 0
        for k in range(nbuf):
            chunk = min(bs, total - off)
            if off or p.tso is None:
                buf[i * bs:i * bs + chunk] = data[off:off + chunk]
            else:
                head = p.tso.hdr_len
                buf[i * bs + head:i * bs + chunk] = data[head:chunk]
            if p.ctx is None:
                codec.tx_plain(ring, i * ds, addrs[i], chunk, k == nbuf - 1)
            else:
                codec.tx_data(ring, i * ds, addrs[i], chunk, k == nbuf - 1, p.dcmd, p.popts)
            off += chunk
            i = (i + 1) % n
        self._mark_packet(first, last)
        self.tx_seq[last] = seq
        self.tx_len[last] = p.wire_bytes or total
        self.tx_pkts[last] = p.packets
        self.tx_next = i

    def poll(self, timeout: float = 0.0) -> int:
        if not self.running:
            return 0
        work = self._rx_harvest() + self._tx_reclaim()
        if work:
            return work
        self._idle_check()
        if timeout > 0:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                time.sleep(min(0.0002, timeout))
                work = self._rx_harvest() + self._tx_reclaim()
                if work:
                    return work
        return 0

    def reclaim(self) -> int:
        """TX completions only (stop() uses it so frames already sent are not re-issued)."""
        if self.mem is None or self.epoch != self.driver.ring_epoch:
            return 0
        return self._tx_reclaim()

    def _rx_harvest(self) -> int:
        ring, n, codec = self.rx_ring, self.n_rx, self.codec
        ds, st_at, len_at, err_at = codec.desc_size, codec.rx_status_at, codec.rx_length_at, codec.rx_errors_at
        dd, eop, bad, arm = codec.rx_dd, codec.rx_eop, codec.rx_frame_errors, codec.rx_arm
        i = self.rx_next
        got = 0
        limit = n - 1                       # never more than the buffers we armed
        harvested = 0
        counters, sink, bufview, bs, addrs = self.counters, self.sink, self.rx_buf, self.rx_bufsize, self.rx_addrs
        while harvested < limit:
            off = i * ds
            status = ring[off + st_at]
            if not status & dd:
                break
            length = _U16.unpack_from(ring, off + len_at)[0]
            errors = ring[off + err_at]
            if self._rx_discard:
                if status & eop:
                    self._rx_discard = False
            elif not status & eop:
                counters.drop("no_eop")          # longer than our buffer: drop through EOP
                self._rx_discard = True
            elif length == 0:
                counters.drop("zero_length")
            elif length > bs:
                counters.drop("oversize")
            elif errors & bad:
                counters.drop("rx_error")
            elif length < ETH_HLEN:
                counters.drop("runt")
            else:
                base = i * bs
                frame = bytes(bufview[base:base + length])
                counters.rx_packets += 1
                counters.rx_bytes += length
                sink(frame)
                got += 1
            arm(ring, off, addrs[i])            # re-arm: our own buffer, status 0
            i = (i + 1) % n
            harvested += 1
        # the descriptor at the tail was never handed out: DD there is a device bug
        hole = self.rx_tail
        if ring[hole * ds + st_at] & dd:
            counters.drop("dd_not_armed")
            arm(ring, hole * ds, addrs[hole])
        if harvested:
            self.rx_next = i
            self.rx_tail = (i - 1) % n
            self.pci.write32(self.regs.rdt, self.rx_tail)
            if got and self.on_progress:
                self.on_progress()
        return harvested

    def _tx_error_reason(self, status: int) -> str | None:
        for bit, reason in self.codec.tx_errors:
            if status & bit:
                return reason
        return None

    def _tx_reclaim(self) -> int:
        i, end = self.tx_clean, self.tx_next
        if i == end:
            return 0
        ring, n, seqs, lens, pkts, eop = self.tx_ring, self.n_tx, self.tx_seq, self.tx_len, self.tx_pkts, self.tx_eop
        codec = self.codec
        ds, st_at, dd, err_mask = codec.desc_size, codec.tx_status_at, codec.tx_dd, self._tx_err_mask
        last = -1
        done = 0
        nbytes = 0
        while i != end:
            e = eop[i]                     # the packet's last descriptor: the one with RS
            off = e * ds + st_at
            status = ring[off]
            if not status & dd:
                break
            ring[off] = 0                  # so a stale DD is never mistaken for a new one
            if status & err_mask:
                self.counters.tx_error(self._tx_error_reason(status) or "tx_error")
            else:
                done += pkts[e]
                nbytes += lens[e]
            if seqs[e] >= 0:
                last = seqs[e]
            i = (e + 1) % n
        if i == self.tx_clean:
            return 0
        return self._tx_complete(i, last, done, nbytes)

    def _tx_complete(self, i: int, last: int, done: int, nbytes: int) -> int:
        reclaimed = (i - self.tx_clean) % self.n_tx
        self.tx_clean = i
        if last >= 0:                      # -1: only pieces of a frame still being handed out
            self.journal.confirm_through(last)
        self.counters.tx_packets += done
        self.counters.tx_bytes += nbytes
        if self.on_progress:
            self.on_progress()
        return reclaimed

    def _idle_check(self) -> None:
        """Nothing moved. One MMIO read (the RX head; the TX head too while TX is outstanding)
        tells a removed device (all ones) or a head the device could never legally hold from a
        quiet one. It also un-sticks a ring whose head descriptor lost its DD write-back:
        descriptors complete in order, so a DD further on proves the ones before it done."""
        self.idle_checks += 1
        d, pci, g = self.driver, self.pci, self.regs
        rdh = pci.read32(g.rdh)
        if rdh == ALL_ONES:
            d.check_alive()                 # raises DeviceGone if the device agrees
        if rdh >= self.n_rx:
            raise DriverFault("poll", "device", f"RDH {rdh} is beyond the {self.n_rx}-descriptor RX ring")
        if rdh != self.rx_next:
            self._rx_skip_lost(rdh)
        self._tx_check_unarmed()
        if self.tx_clean != self.tx_next:
            tdh = pci.read32(g.tdh)
            if tdh >= self.n_tx:
                if tdh == ALL_ONES:
                    d.check_alive()
                raise DriverFault("poll", "device", f"TDH {tdh} is beyond the {self.n_tx}-descriptor TX ring")
            self._tx_skip_lost()

    def _tx_check_unarmed(self) -> None:
        tx_ring, codec = self.tx_ring, self.codec
        past = self.tx_next * codec.desc_size + codec.tx_status_at
        if tx_ring[past] & codec.tx_dd:      # past the tail: never handed to the device
            self.counters.tx_error("dd_not_armed")
            tx_ring[past] = 0

    def _rx_skip_lost(self, rdh: int) -> None:
        ring, n, codec = self.rx_ring, self.n_rx, self.codec
        ds, st_at, dd = codec.desc_size, codec.rx_status_at, codec.rx_dd
        i = self.rx_next
        span = (rdh - i) % n
        j = next((k for k in range(span) if ring[((i + k) % n) * ds + st_at] & dd), None)
        if j is None:
            return                          # write-back still pending (real hardware): wait
        for k in range(j):
            idx = (i + k) % n
            self.counters.drop("completion_lost")
            codec.rx_arm(ring, idx * ds, self.rx_addrs[idx])
        self.rx_next = (i + j) % n
        self.rx_tail = (self.rx_next - 1) % n
        self.pci.write32(self.regs.rdt, self.rx_tail)

    def _tx_skip_lost(self) -> None:
        ring, n, eop, codec = self.tx_ring, self.n_tx, self.tx_eop, self.codec
        ds, st_at, dd = codec.desc_size, codec.tx_status_at, codec.tx_dd
        i, end = self.tx_clean, self.tx_next
        last_dd = None
        k = i
        while k != end:
            e = eop[k]
            if ring[e * ds + st_at] & dd:
                last_dd = e
            k = (e + 1) % n
        if last_dd is None:
            return
        stop = (last_dd + 1) % n
        done = nbytes = 0
        last = -1
        k = i
        while k != stop:
            e = eop[k]
            if not ring[e * ds + st_at] & dd:
                self.counters.tx_error("completion_lost")
            done += self.tx_pkts[e]
            nbytes += self.tx_len[e]
            if self.tx_seq[e] >= 0:
                last = self.tx_seq[e]
            ring[e * ds + st_at] = 0
            k = (e + 1) % n
        self._tx_complete(stop, last, done, nbytes)

    # --- consistency (checked after configuration calls) ------------------------------------------
    def check(self) -> list[str]:
        broken: list[str] = []
        if self.mem is None:
            return broken if not self.running else ["datapath running without rings"]
        for what, idx, n in (("rx_next", self.rx_next, self.n_rx), ("rx_tail", self.rx_tail, self.n_rx),
                             ("tx_next", self.tx_next, self.n_tx), ("tx_clean", self.tx_clean, self.n_tx)):
            if not 0 <= idx < n:
                broken.append(f"{what} {idx} outside the {n}-descriptor ring")
        if self.running:
            ds, lo = self.codec.desc_size, self.mem.rx_bufs.iova
            hi = lo + self.n_rx * self.rx_bufsize
            for i in range(self.n_rx):
                addr = self.codec.rx_addr(self.rx_ring, i * ds)
                if addr != self.rx_addrs[i] or not lo <= addr < hi:
                    broken.append(f"RX descriptor {i} points at {addr:#x}, not at its buffer")
                    break
        return broken

    # --- the contract's optional parts --------------------------------------------------------------
    def report(self) -> DatapathReport:
        """tx_offload: journal frames by how their offload request went (chip checksum, chip TSO,
        software)."""
        return DatapathReport(tx_offload=dict(self.tx_offload))

"""The PCI ring engine's C implementation: udrv.pciengine.PciRing with the per-frame work in C.

native/pci_ring.c does RX harvest (frames go straight to the TAP fd with write(), or in batches
to the Python sink), TX fill from the journal's memory and TX reclaim. Those functions touch
memory only and return the new tail; this class does the one MMIO write per batch, so it runs
on the model and on VFIO alike. Lifecycle, resets and checks are PciRing's (same rings, same
indices). The C codec is the 8254x one: a driver gets this ring only when its codec says it
has that layout (PciNetDriver.c_variant).

Where C can reach BAR0 itself (VFIO: `pci.mmio_region()`), run() goes further: the whole turn
(harvest, reclaim, TAP read, fill and the tail writes) loops in C (native/pci_loop.c) for up to
a timeout, sleeping between empty turns, and comes back to Python only for what Python decides
(a frame C cannot finish, a head register out of range, a journal error). The four registers it
touches are the driver's (`ring_regs`), handed to C in struct pci_ring_regs. On the in-process
model the daemon's Python loop calls poll() instead.

With a TAP fd the ring also reads the TAP (native/tapread.c, Nic.enqueue's rules) at the start
of xmit() (caps.reads_tap: the runtime must not); the few frames only udrv.offload can judge go
back to the runtime's fallback (set_tap_fallback: Nic.enqueue). Counts: tap_counts().
"""
from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any, Callable

from . import fastpath, heartbeat, offload
from .datapath import Capabilities, DatapathCounters, DatapathReport, TapCounts
from .driver import FrameSink
from .errors import DriverFault, UdrvError
from .tap import tap_behind
from .pciengine import PciNetError, PciRing, RingDriver, RingMemory, TxPiece

_RX_REASONS = ("no_eop", "zero_length", "oversize", "rx_error", "runt", "dd_not_armed", "completion_lost")
_TX_REASONS = ("runt", "oversize", "excess_collisions", "late_collision", "completion_lost", "dd_not_armed")


def tap_fd_of(sink: Any) -> int | None:
    """The fd behind a sink that is a TAP's bound `write` (what the daemon passes): the C ring
    then writes RX frames to it itself, without calling Python per frame."""
    tap = tap_behind(sink)
    if tap is None:
        return None
    try:
        fd = tap.fileno()
    except (OSError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class PciNativeRing(PciRing):
    OUT_CAP = 256 * 1024         # sink mode: frames handed back per C call
    # TCP segments harvested together go to a vnet-header TAP as one GSO frame (native/gro.c)
    coalesce_rx = True
    poll_interval = 0.001        # an empty C-loop turn sleeps this long: the device offers no event fd
    tap_budget = 64              # TAP frames read per turn

    def __init__(self, driver: RingDriver, journal: Any, sink: FrameSink,
                 on_progress: Callable[[], None] | None = None, tap_fd: int | None = None):
        fastpath.require()
        ffi, lib = fastpath.ffi, fastpath.lib
        self._ffi, self._lib = ffi, lib
        r = ffi.new("struct pci_ring *")
        fd = tap_fd if tap_fd is not None else tap_fd_of(sink)
        r.tap_fd = -1 if fd is None else fd
        # a TAP with virtio-net headers needs one in front of every frame C writes to it
        tap = tap_behind(sink)
        r.tap_vnet_hdr = tap.vnet_hdr_len if fd is not None and tap is not None else 0
        if lib.pci_ring_init(r, journal.fd, journal.nslots, journal.slot_size) < 0:
            raise PciNetError("the C ring cannot map the TX journal memory: its layout does not match")
        r.rx_coalesce = int(self.coalesce_rx and fastpath.rx_coalesce_allowed(r.tap_vnet_hdr))
        self._r = r
        self._jptr = ffi.addressof(r, "journal")
        self._fini = weakref.finalize(self, lib.pci_ring_fini, r)
        self._out = ffi.new("uint8_t[]", self.OUT_CAP)
        self._used = ffi.new("uint32_t *")
        self._py_counters = DatapathCounters()
        self._tr = None                         # struct udrv_tapread: the TAP read from C
        self.tap_fallback: Callable[[list[bytes]], int] | None = None
        self._tap_closed: dict[str, Any] | None = None
        self._handoff = fastpath.TapHandoff()     # frames only Python finishes; TAP-side counts
        self._mmio: Any = None                  # struct pci_mmio, opened by run() on first use
        self._mmio_key: tuple[int, int, int] | None = None
        self._loop = ffi.new("struct pci_loop_result *")
        regs = driver.ring_regs
        self._c_regs = ffi.new("struct pci_ring_regs *", {"rdh": regs.rdh, "rdt": regs.rdt,
                                                          "tdh": regs.tdh, "tdt": regs.tdt})
        if fd is not None:
            tr = ffi.new("struct udrv_tapread *")
            if lib.udrv_tapread_init(tr, fd, r.tap_vnet_hdr, driver.soft.mtu + 18) < 0:
                raise PciNetError(f"the C ring cannot read the TAP fd {fd}: not an open descriptor")
            self._tr = tr
        super().__init__(driver, journal, sink, on_progress)
        reads = self._tr is not None
        runs_turns = reads and self._region() is not None and self.knobs.c_loop
        hb = heartbeat.this_process()
        if runs_turns and hb is not None:
            # a supervised worker: the loop in C beats, so a turn may last as long as in process
            self._loop.beat = ffi.cast("int64_t *", hb.beat_address)
        self.caps = Capabilities(reads_tap=reads, pulls_tap=reads, handles_vnet=True, runs_turns=runs_turns,
                                 beats=runs_turns and hb is not None)

    # ring indices live in the C struct
    rx_next = property(lambda self: self._r.rx_next, lambda self, v: setattr(self._r, "rx_next", v))
    rx_tail = property(lambda self: self._r.rx_tail, lambda self, v: setattr(self._r, "rx_tail", v))
    tx_next = property(lambda self: self._r.tx_next, lambda self, v: setattr(self._r, "tx_next", v))
    tx_clean = property(lambda self: self._r.tx_clean, lambda self, v: setattr(self._r, "tx_clean", v))

    @property
    def chip_offloads(self) -> frozenset[str]:
        return self._hw

    @chip_offloads.setter
    def chip_offloads(self, value: frozenset[str]) -> None:
        self._hw = frozenset(value)
        lib = self._lib
        self._r.hw_offloads = ((lib.PCIR_OFF_CSUM if "csum" in self._hw else 0)
                               | (lib.PCIR_OFF_TSO4 if "tso4" in self._hw else 0)
                               | (lib.PCIR_OFF_TSO6 if "tso6" in self._hw else 0))

    def report(self) -> DatapathReport:
        """c_loop: the C loop's turns, sleeps and what moved in them (all runs of this ring);
        rx_coalesce: on/off, segments written inside super-frames, super-frames, frames left
        alone for a wrong checksum, super-frames the TAP refused; tx_offload as PciRing's."""
        r, st, lp = self._r, self._r.st, self._loop
        c_loop = {"turns": lp.turns, "sleeps": lp.sleeps, "rx": lp.rx, "reclaimed": lp.reclaimed,
                  "tap_in": lp.tap_in, "filled": lp.filled, "idle_checks": lp.idle_checks}
        return DatapathReport(
            c_loop=c_loop if self.caps.runs_turns else None,
            rx_coalesce={"on": int(r.rx_coalesce), "segments": st.rx_coalesced, "super_frames": st.rx_super,
                         "bad_checksum": st.rx_csum_bad, "refused": st.rx_super_refused,
                         "acks_merged": st.rx_acks_merged},
            tx_offload={"csum": st.tx_offload_csum + self.tx_offload["csum"],
                        "tso": st.tx_offload_tso + self.tx_offload["tso"],
                        "software": self.tx_offload["software"]})

    @property
    def counters(self) -> DatapathCounters:
        st, py = self._r.st, self._py_counters
        c = DatapathCounters(rx_packets=st.rx_packets + py.rx_packets, rx_bytes=st.rx_bytes + py.rx_bytes,
                             tx_packets=st.tx_packets + py.tx_packets, tx_bytes=st.tx_bytes + py.tx_bytes,
                             rx_dropped=dict(py.rx_dropped), tx_errors=dict(py.tx_errors))
        for code, name in enumerate(_RX_REASONS):
            if st.rx_dropped[code]:
                c.rx_dropped[name] = c.rx_dropped.get(name, 0) + st.rx_dropped[code]
        for code, name in enumerate(_TX_REASONS):
            if st.tx_errors[code]:
                c.tx_errors[name] = c.tx_errors.get(name, 0) + st.tx_errors[code]
        if st.tap_write_errors:
            c.tx_errors["tap_write"] = st.tap_write_errors
        return c

    @counters.setter
    def counters(self, value: DatapathCounters) -> None:
        self._py_counters = value

    # --- memory -------------------------------------------------------------------------------------
    def _bind(self, mem: RingMemory) -> None:
        super()._bind(mem)
        r, ffi = self._r, self._ffi
        # raw addresses, not buffer exports: dma_free must be able to release the views
        r.rx_ring = ffi.cast("uint8_t *", mem.rx_ring.vaddr)
        r.tx_ring = ffi.cast("uint8_t *", mem.tx_ring.vaddr)
        r.rx_buf = ffi.cast("uint8_t *", mem.rx_bufs.vaddr)
        r.tx_buf = ffi.cast("uint8_t *", mem.tx_bufs.vaddr)
        r.rx_buf_iova, r.tx_buf_iova = mem.rx_bufs.iova, mem.tx_bufs.iova
        r.n_rx, r.n_tx, r.rx_bufsize, r.tx_bufsize = mem.rx_count, mem.tx_count, mem.rx_bufsize, mem.tx_bufsize
        if self._lib.pci_ring_bind(r) < 0:
            raise PciNetError("the C ring refused the ring geometry (descriptor counts must be multiples of 8)")

    def detach(self, mem: RingMemory) -> None:
        if self.mem is mem:
            r, null = self._r, self._ffi.NULL
            r.rx_ring = r.tx_ring = r.rx_buf = r.tx_buf = null
        super().detach(mem)

    def _clean_memory(self) -> None:
        self._lib.pci_ring_clean(self._r)
        self._pending, self._pending_seq = [], -1

    def _reset_tx_tables(self) -> None:
        self._pending, self._pending_seq = [], -1      # the tables themselves live in C

    def close(self) -> None:
        """The TAP is no longer read by this ring: its counts survive, and the caps say it does
        nothing itself any more (until a new ring exists, the runtime reads the TAP)."""
        self.running = False
        self._close_mmio()
        if self._tr is not None:
            self._tap_closed = self.tap_reader_stats()
            self._tr = None
            self.caps = replace(self.caps, reads_tap=False, pulls_tap=False, runs_turns=False)
        self._fini()

    # --- TAP -> journal -------------------------------------------------------------------------------
    def set_tap_fallback(self, enqueue: Callable[[list[bytes]], int] | None) -> None:
        self.tap_fallback = enqueue

    def pull_tap(self, budget: int | None = None) -> int:
        """Read up to `budget` frames (default tap_budget) from the TAP into the journal (C, GIL
        released); stops when the TAP is empty or the journal full (frames stay queued in the
        kernel). Returns frames journaled."""
        tr = self._tr
        if tr is None:
            return 0
        left = self.tap_budget if budget is None else budget
        lib, j, total = self._lib, self._jptr, 0
        while left > 0:
            tr.mtu_max = self.driver.soft.mtu + 18      # + Ethernet header + a VLAN tag
            n = lib.udrv_tapread_to_journal(tr, j, left)
            total += n
            left -= n
            if not tr.deferred_len:
                break
            raw = self._ffi.buffer(tr.deferred, tr.deferred_len)[:]
            tr.deferred_len = 0
            left -= 1
            self.journal.sync()
            total += self._handoff.hand(self.tap_fallback, raw)
        if total:
            self.journal.sync()
        return total

    def tap_reader_stats(self) -> dict[str, Any]:
        """Everything C counted on the TAP side, by name (tap_counts() is the contract's part);
        deferred frames are counted by whoever took them (the fallback)."""
        if self._tr is None:
            return self._tap_closed or {"tap_frames_in": 0, "offload_frames": 0, "tap_read_errors": 0,
                                        "tx_dropped": {}}
        st = self._tr.st
        return self._handoff.stats(st.frames_in, st.offload_frames, st.read_errors, st.deferred, st.oversize,
                                   st.short_vnet_header, st.bad_offload_request, tap_journal_full=st.journal_full)

    def tap_counts(self) -> TapCounts:
        t = self.tap_reader_stats()
        return TapCounts(frames_in=t["tap_frames_in"], offload_frames=t["offload_frames"],
                         dropped=dict(t["tx_dropped"]))

    # --- hot paths ------------------------------------------------------------------------------------
    def xmit(self) -> int:
        if self._tr is not None:
            self.pull_tap()
        if not self.running:
            return 0
        r, lib, journal = self._r, self._lib, self.journal
        start = r.tx_next
        sent = 0
        while True:
            if self._pending:
                self._drain_pending(self._free())
                if self._pending:
                    break
            n = lib.pci_tx_fill(r)
            journal.sync()
            if n < 0:
                raise UdrvError("the TX journal refused an operation from the C ring: journal corrupted")
            sent += n
            if not r.python_entry:
                break
            # a frame C leaves to Python (software offload, odd headers, larger than the ring)
            before = journal.sent
            sent += self._fill(1)
            journal.sync()
            if journal.sent == before:
                break                       # waiting for room
        if r.tx_next != start:
            self.pci.write32(self.regs.tdt, r.tx_next)
        return sent

    def _put(self, p: TxPiece, seq: int) -> None:
        ffi = self._ffi
        ctx = ffi.from_buffer("uint8_t[]", p.ctx) if p.ctx is not None else ffi.NULL
        raw = p.data
        if p.tso is not None:                  # rare here (C takes TSO itself): edit a copy
            raw = bytearray(raw)
            offload.tso_prepare(raw, p.tso)
        data = ffi.from_buffer("uint8_t[]", raw)
        if not self._lib.pci_tx_put(self._r, ctx, data, len(p.data), p.dcmd, p.popts, p.packets,
                                    p.wire_bytes or len(p.data), seq):
            raise DriverFault("xmit", "invariant", "no TX descriptors for a packet that was checked to fit")

    def _tx_error(self, reason: str) -> None:
        self._py_counters.tx_error(reason)        # `counters` is a fresh merge of C and Python

    def _tx_drop(self, seq: int) -> None:
        if self._lib.pci_tx_drop(self._r, seq) < 0:
            raise UdrvError("the TX journal refused a confirmation from the C ring: journal corrupted")

    def _rx_harvest(self) -> int:
        r, lib = self._r, self._lib
        before = r.st.rx_packets
        if r.tap_fd >= 0:
            total = lib.pci_rx_harvest(r, 0, self._ffi.NULL, 0, self._used)
        else:
            total = 0
            out, used, sink = self._out, self._used, self.sink
            while True:
                n = lib.pci_rx_harvest(r, 0, out, self.OUT_CAP, used)
                total += n
                buf = self._ffi.buffer(out, used[0])[:]
                pos, end = 0, len(buf)
                while pos < end:
                    length = int.from_bytes(buf[pos:pos + 4], "little")
                    sink(buf[pos + 4:pos + 4 + length])
                    pos += 4 + length
                if n == 0 or total >= self.n_rx - 1:
                    break
        if total:
            self.pci.write32(self.regs.rdt, r.rx_tail)
            if r.st.rx_packets != before and self.on_progress:
                self.on_progress()
        return total

    def _tx_reclaim(self) -> int:
        n = self._lib.pci_tx_reclaim(self._r)
        return self._after_tx(n)

    # --- the loop in C (native/pci_loop.c) ---------------------------------------------------------
    def _region(self) -> Any:
        return self.pci.mmio_region()

    def _mmio_for(self, region: Any) -> Any:
        key = (region.fd, region.offset, region.size)
        if self._mmio_key != key:           # first use, or the transport was reopened
            self._close_mmio()
            m = self._ffi.new("struct pci_mmio *")
            if self._lib.pci_mmio_open(m, region.fd, region.offset, region.size, int(region.mappable),
                                       self._c_regs) < 0:
                raise PciNetError(f"BAR0 is {region.size} bytes: too small for the {self.driver.name} ring "
                                  f"registers (up to {self.regs.bar_min:#x})")
            self._mmio, self._mmio_key = m, key
        return self._mmio

    def _close_mmio(self) -> None:
        if self._mmio is not None:
            self._lib.pci_mmio_close(self._mmio)
        self._mmio, self._mmio_key = None, None

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Turns in C for up to timeout seconds; back early when wake_fd is readable or Python
        must act. A frame C left to Python waits for the caller's next xmit() (the daemon calls
        it after every run). Returns frames and completions moved."""
        region = self._region() if self.running else None
        if region is None or self._tr is None:
            return self.poll(timeout)       # closed transport or no TAP: Python's own turn
        m = self._mmio_for(region)
        r, lib, lp = self._r, self._lib, self._loop
        self._tr.mtu_max = self.driver.soft.mtu + 18
        before = lp.rx + lp.reclaimed + lp.filled + lp.tap_in
        checks = lp.idle_checks
        flags = lib.PCIL_YIELD | (0 if self._pending else lib.PCIL_TX)
        rc = lib.pci_ring_run(r, self._tr, m, wake_fd, max(0, int(timeout * 1e6)), int(self.poll_interval * 1e6),
                              self.tap_budget, int(self.knobs.turn_gap * 1e6), flags, lp)
        self.journal.sync()
        self.idle_checks += lp.idle_checks - checks
        if rc & lib.PCIL_EJOURNAL:
            raise UdrvError("the TX journal refused an operation from the C ring: journal corrupted")
        if rc & lib.PCIL_MMIO_ERROR:
            m.errors = 0
            self.driver.check_alive()           # DeviceGone if the device is; else say what failed
            raise DriverFault("poll", "device", "a register access through the VFIO device fd failed")
        if rc & lib.PCIL_CHECK:
            self._idle_check()                  # raises what Python's checks raise
        if rc & lib.PCIL_WORK and self.on_progress:
            self.on_progress()
        return lp.rx + lp.reclaimed + lp.filled + lp.tap_in - before

    def _after_tx(self, n: int) -> int:
        self.journal.sync()
        if n < 0:
            raise UdrvError("the TX journal refused a confirmation from the C ring: journal corrupted")
        if n and self.on_progress:
            self.on_progress()
        return n

    def _rx_skip_lost(self, rdh: int) -> None:
        if self._lib.pci_rx_skip_lost(self._r, rdh) > 0:
            self.pci.write32(self.regs.rdt, self._r.rx_tail)

    def _tx_skip_lost(self) -> None:
        self._after_tx(self._lib.pci_tx_skip_lost(self._r))

    def _tx_check_unarmed(self) -> None:
        self._lib.pci_tx_check_unarmed(self._r)

    @property
    def writes_tap(self) -> bool:
        """RX frames go straight to the TAP fd from C (no Python call per frame)."""
        return self._r.tap_fd >= 0

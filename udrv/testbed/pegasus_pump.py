"""The pegasus model's bulk data path in C (native/rigs/pegpump.c, in udrv._rigs), as a FfsServer DataOffload.

Why: the pure-Python server moves every frame through the model under the GIL (~0.8 vCPU
under TCG at full rate), so a benchmark of two host drivers on that gadget measures the
gadget. With this offload a C thread owns EP 0x81, EP 0x02 and the wire TAP: it keeps
several AIO transfers queued each way and frames them by the model's rules. The model keeps
its register state and ep0 (the server's loop); `service()` (called by that loop) copies
what the pump needs after every pass, and hands the model what only it can judge:

  * OUT transfers while the model is in a state the C path does not cover (link down,
    loopback, EP 0x02 halted or NAKing, unplugged) go to `model.bulk_out` untouched;
  * IN transfers the model queued itself (inject_rx_garbage, loopback frames) are taken
    with `model.take_in` and sent by the pump ahead of wire frames;
  * a halted EP 0x81 (`ModelStall` from take_in): the pump stops submitting, and the
    endpoint is halted once nothing is queued, as the server does.

Frames the pump moves are counted in the pump and folded into `model.counters`, the
server's `FfsCounters` and the wire's counters by `fold()` (every loop pass, and on demand).
"""
from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Callable

from . import rigs
from udrv.models.usb import ModelGone, ModelNoAnswer, ModelStall, Setup
from udrv.models.pegasus import (CTL2_LOOPBACK, EP_RX, EP_TX, EthCtrl0, EthCtrl1, EthCtrl2, EthID, MulticastHash,
                                 PegasusModel)

from .ffs import FfsCounters

IN_DEPTH = 32            # IN transfers queued at the UDC (the device's RX FIFO, in transfers)
OUT_DEPTH = 16           # OUT reads queued: the host never waits for the device to be ready
PUMP_NICE = -10          # like the server's loop: the device answers in hardware time
HOLD_RETRY = 0.01        # a NAKed OUT transfer is offered to the model again this often
IN_TAKE = 16384

# pump counter -> model counter of the same meaning
_MODEL_COUNTERS = ("tx_transfers", "tx_frames", "tx_bytes", "tx_malformed", "tx_extra_bytes", "tx_missing_pad",
                   "tx_dropped_disabled", "tx_mode_mismatch", "rx_frames", "rx_bytes", "rx_transfers",
                   "rx_dropped_filter", "rx_dropped_disabled", "rx_dropped_link", "rx_dropped_size",
                   "rx_dropped_unplugged")
_FFS_COUNTERS = ("out_transfers", "out_bytes", "in_transfers", "in_bytes", "zlps", "in_lost")
_ALL = _MODEL_COUNTERS + _FFS_COUNTERS + ("out_errors", "in_errors", "wire_in", "wire_out", "deferred_out",
                                          "injected_in", "submit_errors", "wire_read_errors", "wire_write_errors")


def available() -> bool:
    return rigs.available()


class PegasusPump:
    """DataOffload for FfsServer: EP 0x81 / EP 0x02 of a PegasusModel, and its wire TAP."""

    endpoints = frozenset({EP_RX, EP_TX})

    def __init__(self, model: PegasusModel, tap_fd: int, wire: Any = None, *, in_depth: int = IN_DEPTH,
                 out_depth: int = OUT_DEPTH, nice: int = PUMP_NICE):
        if not available():
            raise rigs.RigsUnavailable(rigs.why_unavailable())
        self.model = model
        self.tap_fd = tap_fd
        self.wire = wire                     # PeerWire: to_model / from_model get the pump's counts
        self.in_depth, self.out_depth, self.nice = in_depth, out_depth, nice
        self._ffi, self._lib = rigs.ffi, rigs.lib
        self._p: Any = None
        self._fds: dict[int, int] = {}
        self._ffs: FfsCounters | None = None
        self._on_gone: Callable[[], None] = lambda: None
        self._enabled = False
        self._max_packet = 512
        self._last_cfg: tuple | None = None
        self._cfg = self._ffi.new("struct udrv_pegpump_config *")
        self._gen = 0
        self._halt_in = False                # EP 0x81 to be halted once nothing is queued
        self._hold_gen = 0                   # configuration generation that stopped IN submissions
        self._held_out_until = 0.0           # the model NAKed the deferred OUT transfer at the head
        self._backlog: list[bytes] = []      # taken from the model, not yet accepted by the pump
        self._seen = dict.fromkeys(_ALL, 0)
        self._last_err = {"in": 0, "out": 0}
        self._fold_lock = threading.Lock()

    # --- DataOffload -------------------------------------------------------------------------
    def attach(self, fds: dict[int, int], counters: FfsCounters, on_gone: Callable[[], None]) -> None:
        self._fds, self._ffs, self._on_gone = dict(fds), counters, on_gone
        p = self._lib.udrv_pegpump_new(fds[EP_RX], fds[EP_TX], self.tap_fd, self.in_depth, self.out_depth, self.nice)
        if p == self._ffi.NULL:
            e = self._ffi.errno
            raise OSError(e, f"cannot set up the pegasus pump: {os.strerror(e)} (raise /proc/sys/fs/aio-max-nr?)")
        self._p = p
        self.sync()
        if self._lib.udrv_pegpump_start(p) != 0:
            e = self._ffi.errno
            self.close()
            raise OSError(e, f"cannot start the pegasus pump thread: {os.strerror(e)}")

    def fileno(self) -> int:
        return self._p.py_efd if self._p is not None else -1

    def set_enabled(self, on: bool, max_packet: dict[int, int]) -> None:
        self._enabled = on
        if on:
            self._max_packet = max_packet.get(EP_RX) or self._max_packet
        self.sync()

    def service(self) -> float | None:
        if self._p is None:
            return None
        try:
            os.eventfd_read(self._p.py_efd)
        except BlockingIOError:
            pass
        self.sync()
        wait = self._deferred_out()
        self._model_in()
        self._maybe_halt_in()
        self.fold()
        if self._halt_in:
            wait = HOLD_RETRY if wait is None else min(wait, HOLD_RETRY)
        return wait

    def close(self) -> None:
        if self._p is not None:
            self.fold()
            self._lib.udrv_pegpump_free(self._p)     # joins the thread, cancels and reaps transfers
            self._p = None

    # --- model state -> pump --------------------------------------------------------------------
    def sync(self) -> None:
        """Copy what the C path needs from the model (cheap when nothing changed)."""
        if self._p is None:
            return
        m = self.model
        r = m.regs
        speed, full = m.link_mode
        stalled = m.stalled
        tx_slow = (not m.link_up or bool(r[EthCtrl2] & CTL2_LOOPBACK) or EP_TX in stalled or m.tx_held
                   or m.unplugged)
        state = (self._enabled, tx_slow, self._halt_in, m.link_up, speed == 100, full, m.unplugged,
                 m.rx_status_mcast_bit, m.multicast_hash, m.adm8513, self._max_packet,
                 r[EthCtrl0], r[EthCtrl1], r[EthCtrl2], r[EthID:EthID + 6], r[MulticastHash:MulticastHash + 8])
        if state == self._last_cfg:
            return
        self._last_cfg = state
        c = self._cfg
        (c.enabled, c.tx_slow, c.in_hold, c.link_up, c.link_100, c.link_full, c.unplugged, c.status_mcast_bit,
         c.multicast_hash, c.adm8513, c.max_packet, c.ctl0, c.ctl1, c.ctl2) = (int(x) for x in state[:14])
        c.mac = list(state[14])
        c.hash = list(state[15])
        self._gen = self._lib.udrv_pegpump_configure(self._p, c)
        if self._halt_in:
            self._hold_gen = self._gen

    # --- what only the model can judge ------------------------------------------------------------
    def _deferred_out(self) -> float | None:
        now = time.monotonic()
        if now < self._held_out_until:
            return self._held_out_until - now
        buf = self._ffi.new("uint8_t **")
        while True:
            n = self._lib.udrv_pegpump_deferred_peek(self._p, buf)
            if n < 0:
                return None
            data = bytes(self._ffi.buffer(buf[0], n))
            try:
                self.model.bulk_out(EP_TX, data)
            except ModelNoAnswer:
                # the device NAKs: keep it (and the ones behind it, in the pump) for later
                if self._ffs is not None:
                    self._ffs.out_held += 1
                self._held_out_until = now + HOLD_RETRY
                return HOLD_RETRY
            except ModelStall:
                if self._ffs is not None:
                    self._ffs.out_stalls += 1
                self._halt(EP_TX)
            except ModelGone:
                self._on_gone()
            self._lib.udrv_pegpump_deferred_pop(self._p)
            self.sync()                      # the model may have changed state (link, loopback)

    def _model_in(self) -> None:
        if not self._enabled or self._halt_in:
            return
        while True:
            if not self._backlog:
                try:
                    data = self.model.take_in(EP_RX, IN_TAKE)
                except ModelStall:
                    if self._ffs is not None:
                        self._ffs.in_stalls += 1
                    self._halt_in = True
                    self.sync()              # stop the pump's IN submissions first
                    return
                except ModelGone:
                    self._on_gone()
                    return
                if data is None:
                    return
                self._backlog.append(data)
            data = self._backlog[0]
            if self._lib.udrv_pegpump_inject(self._p, data, len(data)) != 0:
                return                       # the pump's queue is full: next pass
            self._backlog.pop(0)

    def _maybe_halt_in(self) -> None:
        """Halt EP 0x81 once the pump works with in_hold and nothing is queued (a UDC refuses
        to halt an IN endpoint with transfers queued)."""
        p = self._p
        if not self._halt_in or p.cfg_applied < self._hold_gen or p.in_flight_in:
            return
        self._halt(EP_RX)
        self._halt_in = False
        self.sync()

    def _halt(self, addr: int) -> None:
        """STALL the endpoint (I/O in the wrong direction), then tell the model the halt was
        delivered: the host clears it at the UDC with CLEAR_FEATURE, which never reaches us."""
        fd = self._fds[addr]
        try:
            if addr & 0x80:
                os.read(fd, 1)
            else:
                os.write(fd, b"\0")
        except OSError as e:
            if e.errno != errno.EBADMSG and self._ffs is not None:     # EBADMSG = "halted"
                self._ffs.io_error(f"ep{addr:02x}-halt", e.errno or 0)
        try:
            self.model.control(Setup(0x02, 0x01, 0, addr, 0), b"")
        except (ModelStall, ModelNoAnswer):
            pass
        except ModelGone:
            self._on_gone()

    # --- counters ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """The pump's own counters (cumulative)."""
        if self._p is None:
            return dict(self._seen)
        st = self._p.st
        out = {k: int(getattr(st, k)) for k in _ALL}
        out["in_flight_in"], out["in_flight_out"] = int(self._p.in_flight_in), int(self._p.in_flight_out)
        return out

    def fold(self) -> None:
        """Add what the pump counted since the last fold to the model's, the server's and the
        wire's counters (safe from any thread)."""
        if self._p is None:
            return
        with self._fold_lock:
            st = self._p.st
            now = {k: int(getattr(st, k)) for k in _ALL}
            d = {k: now[k] - self._seen[k] for k in _ALL}
            self._seen = now
            self.model.count({k: d[k] for k in _MODEL_COUNTERS if d[k]})
            f = self._ffs
            if f is not None:
                for k in _FFS_COUNTERS:
                    if d[k]:
                        setattr(f, k, getattr(f, k) + d[k])
                for way, ep in (("in", EP_RX), ("out", EP_TX)):
                    if d[f"{way}_errors"]:
                        e = int(getattr(st, f"last_{way}_error"))
                        key = f"ep{ep:02x}:{errno.errorcode.get(e, e)}"
                        f.io_errors[key] = f.io_errors.get(key, 0) + d[f"{way}_errors"]
                if d["submit_errors"]:
                    f.io_errors["pump-submit"] = f.io_errors.get("pump-submit", 0) + d["submit_errors"]
            w = self.wire
            if w is not None:
                w.to_model += d["wire_in"]
                w.from_model += d["wire_out"]
                if hasattr(w, "read_errors"):
                    w.read_errors += d["wire_read_errors"]

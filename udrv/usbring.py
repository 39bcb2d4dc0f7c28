"""The C USB transfer ring: `udrv.usbnet.UsbNetEngine`'s twin with the per-frame work in C
(native/usb_ring.c), so the runtime can swap one for the other (design diversity: the Python
engine stays as the second implementation and the fallback).

The ring moves frames between the device and the TAP fd itself: RX frames are written to the
TAP from C (the Python `sink` is not used), and with `read_tap=True` (the default) `xmit()` and
`poll()` also read the TAP into the journal, so the runtime must not read the TAP itself while
such a ring runs (`caps.reads_tap` says so; wake on the TAP fd and call xmit()). With
`read_tap=False` the runtime keeps feeding the journal from Python (Nic.enqueue) and the ring
only drains it. It needs python-libusb1's own context and handle (a real device through
udrv.libusb): an embedded model runs the Python engines.
"""
from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import replace
from typing import Any, Callable

from . import heartbeat
from .datapath import Capabilities, DatapathCounters, DatapathDefaults, DatapathReport, TapCounts
from .errors import DatapathError, DeviceGone, TransportError, UdrvError
from .fastpath import NativeFraming, NativeUnavailable, TapHandoff, ffi, lib, require, rx_coalesce_allowed, tx_thread_allowed
from .journal import TxJournal

log = logging.getLogger("udrv.usbring")


def _xfer_status_names() -> dict[int, str]:
    # the values of udrv.usbtransport.XferStatus, plus the ring's own failure kinds
    return {
        lib.UDRV_XS_OK: "ok", lib.UDRV_XS_STALL: "stall", lib.UDRV_XS_TIMEOUT: "timeout",
        lib.UDRV_XS_ERROR: "error", lib.UDRV_XS_OVERFLOW: "overflow",
        lib.UDRV_XS_NO_DEVICE: "no_device", lib.UDRV_XS_CANCELLED: "cancelled",
        lib.UDRV_XS_SUBMIT_FAILED: "submit_failed", lib.UDRV_XS_CLEAR_HALT_FAILED: "clear_halt_failed",
        lib.UDRV_XS_JOURNAL_CORRUPT: "journal_corrupt",
    }


_DIRS = {0: "rx", 1: "tx", 2: "status"}


# --- libusb pointers from python-libusb1 --------------------------------------------------------------

def _unwrap(transport: Any) -> Any:
    """The real transport under fault-injection wrappers (udrv.faults.FaultyTransport)."""
    while "_real" in getattr(transport, "__dict__", {}):
        transport = transport.__dict__["_real"]
    return transport


def libusb_pointers(transport: Any) -> tuple[int, int, Any, Any]:
    """(libusb_context *, libusb_device_handle *, context object, handle object) of a
    python-libusb1 transport. python-libusb1 keeps the raw ctypes pointers in private
    attributes (USBContext.__context_p, USBDeviceHandle.__handle); the C ring uses them with the
    same libusb the process already loaded. Keep the two objects alive as long as the ring."""
    real = _unwrap(transport)
    ctx, handle = getattr(real, "ctx", None), getattr(real, "handle", None)
    ctx_p = getattr(ctx, "_USBContext__context_p", None)
    handle_p = getattr(handle, "_USBDeviceHandle__handle", None)
    if ctx_p is None or handle_p is None:
        raise NativeUnavailable(
            f"the C USB ring needs a python-libusb1 device (udrv.libusb.LibusbTransport), not "
            f"{type(real).__name__}: use the Python engine (udrv.usbnet.UsbNetEngine) for it")
    c = ctypes.cast(ctx_p, ctypes.c_void_p).value
    h = ctypes.cast(handle_p, ctypes.c_void_p).value
    if not c or not h:
        raise UdrvError("the python-libusb1 context or device handle is closed: reopen the device first")
    return c, h, ctx, handle


def check_same_libusb() -> None:
    """Context and handle pointers are only meaningful to the libusb that made them."""
    require()
    from usb1 import libusb1 as pylibusb
    try:
        theirs = ctypes.cast(pylibusb.libusb_handle_events_timeout_completed, ctypes.c_void_p).value
    except AttributeError:
        return        # python-libusb1 has not loaded libusb yet: nothing to compare
    ours = lib.udrv_libusb_marker()
    if theirs != ours:
        raise NativeUnavailable(
            f"udrv._native and python-libusb1 use two different libusb libraries "
            f"(python-libusb1: {getattr(pylibusb, 'libusb', '?')}); the C ring needs the one libusb-1.0.so.0 "
            "of the system: remove the libusb bundled with python-libusb1 or rebuild udrv against it")


# --- the USB ring -------------------------------------------------------------------------------------

class NativeUsbRing(DatapathDefaults):
    """UsbNetEngine's twin in C: same lifecycle and entry points, frames never cross into Python.

    xmit(): TAP -> journal (if read_tap) -> bulk OUT, up to n_tx in flight; returns submissions.
    poll(timeout): wait up to timeout for USB/TAP events, RX -> TAP, OUT completions -> journal,
    interrupt packets -> driver.on_status; raises DatapathError / DeviceGone on the errors the
    C ring queued, so the guard runs its recovery (reset: cancel, clear halts, rewind, start).

    TX offloads in software (native/gso.h): with TUN_F_CSUM/TSO4/TSO6 on the TAP, the ring keeps
    a frame's virtio-net header in the journal and fills the checksum / cuts the 64 KiB TCP frame
    into MTU-sized segments as it submits them. A request only Python knows how to finish (UFO,
    ECN) goes to the TAP fallback (Nic.enqueue, which resolves it with udrv.offload: this ring does
    not handle virtio-net headers, so frames Nic journals are finished ones).

    Capabilities: with read_tap it reads the TAP and runs whole turns in C (run()); it keeps the
    TX hang clock itself and can keep its transfers across a fault of the driver's own.
    """

    def __init__(self, driver: Any, journal: TxJournal, tap_fd: int, n_rx: int = 4, n_tx: int = 8,
                 on_progress: Callable[[], None] | None = None, *, read_tap: bool = True,
                 tap_budget: int = 64, zero_packet: bool = False, stop_timeout: float = 1.0,
                 tap_vnet_hdr: int = 0, rx_coalesce: bool = False):
        require()
        check_same_libusb()
        self.driver = driver
        self.journal = journal
        self.tap_fd = tap_fd
        self._vnet = tap_vnet_hdr
        self.n_rx = n_rx
        self.n_tx = n_tx
        self.on_progress = on_progress
        self.caps = Capabilities(reads_tap=read_tap, runs_turns=read_tap, keeps_tx_clock=True,
                                 keeps_in_flight=True)
        self._tap_fallback: Callable[[list[bytes]], int] | None = None
        self._handoff = TapHandoff()
        self.tap_budget = tap_budget if read_tap else 0
        self.stop_timeout = stop_timeout
        self.running = False
        self.leaked_transfers = 0
        self._action: Any = None
        self._framing = driver.framing_now()
        self._nframing = NativeFraming(self._framing)
        ctx_p, handle_p, ctx_obj, handle_obj = libusb_pointers(driver.usb)
        self._keep_alive = (ctx_obj, handle_obj)        # the C ring holds their raw pointers
        cfg = ffi.new("struct udrv_ring_config *")
        cfg.ep_in, cfg.ep_out = driver.EP_IN, driver.EP_OUT
        cfg.ep_status = driver.EP_STATUS or 0
        cfg.status_size = getattr(driver, "status_size", 8)
        cfg.n_rx, cfg.n_tx = n_rx, n_tx
        cfg.zero_packet = int(zero_packet)
        self._tx_max = self._tx_limit()
        cfg.tx_max_frame = self._tx_max
        # OUT buffers hold one wire frame: the largest MTU the driver allows + header + VLAN tag
        max_mtu = getattr(driver, "max_mtu", None)
        cfg.tx_wire_max = max_mtu + 18 if isinstance(max_mtu, int) else 0
        cfg.tap_fd = tap_fd
        cfg.journal_fd = journal.fd
        cfg.journal_nslots, cfg.journal_slot_size = journal.nslots, journal.slot_size
        # RX coalescing into GSO super-frames (native/gro.h) needs the TAP's virtio-net header;
        # UDRV_RX_COALESCE=0 in the environment turns it off (to compare)
        cfg.tap_vnet_hdr = tap_vnet_hdr
        cfg.rx_coalesce = int(rx_coalesce and rx_coalesce_allowed(tap_vnet_hdr))
        err = ffi.new("char[]", 512)
        self._final_stats = ffi.new("struct udrv_ring_stats *")     # what _read_stats gives once closed
        ring = lib.udrv_ring_new(ffi.cast("void *", ctx_p), ffi.cast("void *", handle_p), cfg,
                                 self._nframing.cstruct, err, len(err))
        if ring == ffi.NULL:
            raise UdrvError(f"cannot set up the C USB ring: {ffi.string(err).decode()}")
        # udrv_ring_free refuses (and leaks) while transfers are in flight: never a use-after-free
        self._ring = ffi.gc(ring, lib.udrv_ring_free)
        # the TX half on a thread of its own inside run() (a second CPU for TAP reads, the
        # software TSO cut and the submissions); UDRV_TX_THREAD=0 keeps one thread (to compare)
        self.tx_thread = tx_thread_allowed()
        lib.udrv_ring_set_tx_thread(self._ring, int(self.tx_thread))
        hb = heartbeat.this_process()
        if hb is not None and read_tap:
            # a supervised worker: the loop in C beats, so a turn may last as long as in process
            lib.udrv_ring_set_beat(self._ring, ffi.cast("int64_t *", hb.beat_address),
                                   max(1, int(heartbeat.BEAT_PERIOD * 1000)))
            self.caps = replace(self.caps, beats=True)
        self._res = ffi.new("struct udrv_pump_result *")
        self._err = ffi.new("struct udrv_ring_error *")
        self._status_buf = ffi.new("uint8_t[]", lib.UDRV_STATUS_MAX)
        self._xs_names = _xfer_status_names()
        self._flag_work = lib.UDRV_PUMP_RX | lib.UDRV_PUMP_TX_DONE
        self._flag_bad = lib.UDRV_PUMP_ERROR | lib.UDRV_PUMP_NO_DEVICE
        self._deferred_buf = ffi.new("uint8_t[]", lib.UDRV_TAPREAD_BUF)   # what tapread can hold
        self._epoch: int | None = None      # the transport's endpoint_resets when the transfers went out

    def set_tap_fallback(self, enqueue: Callable[[list[bytes]], int]) -> None:
        self._tap_fallback = enqueue

    # --- helpers ------------------------------------------------------------------------------
    def _tx_limit(self) -> int:
        """Frames the host may send: MTU + Ethernet header + a VLAN tag (as Nic.enqueue)."""
        mtu = getattr(getattr(self.driver, "soft", None), "mtu", None)
        return mtu + 18 if isinstance(mtu, int) else 0

    def _sync_tx_limit(self) -> None:
        limit = self._tx_limit()
        if limit != self._tx_max:
            self._tx_max = limit
            lib.udrv_ring_set_tx_max_frame(self._ring, limit)

    def _usb_error(self, rc: int, what: str) -> TransportError:
        name = ffi.string(lib.udrv_usb_error_name(rc)).decode()
        if name == "LIBUSB_ERROR_NO_DEVICE":
            return DeviceGone(f"the USB device is gone ({what}): it was unplugged or reset; plug it back in")
        return DatapathError(f"{what} failed: {name}")

    def _raise_queued(self, flags: int) -> None:
        errors = []
        while lib.udrv_ring_next_error(self._ring, self._err):
            e = self._err
            errors.append((_DIRS.get(e.dir, str(e.dir)), self._xs_names.get(e.status, str(e.status)), e.code))
        if flags & lib.UDRV_PUMP_NO_DEVICE or any(st == "no_device" for _d, st, _c in errors):
            where = next((d for d, st, _c in errors if st == "no_device"), "rx")
            where = {"rx": "RX", "tx": "TX", "status": "the interrupt endpoint"}.get(where, where)
            raise DeviceGone(f"the USB device disappeared during {where}")
        if not errors:
            return
        d, st, code = errors[0]
        detail = f" ({ffi.string(lib.udrv_usb_error_name(code)).decode()})" if code else ""
        more = f"; {len(errors) - 1} more" if len(errors) > 1 else ""
        raise DatapathError(f"{d} {st}{detail}{more}")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.running:
            return
        framing = self.driver.framing_now()
        if framing != self._framing:
            nf = NativeFraming(framing)
            if lib.udrv_ring_set_framing(self._ring, nf.cstruct) < 0:
                raise UdrvError("cannot change the framing while transfers are in flight: stop the ring first")
            self._framing, self._nframing = framing, nf
        self._sync_tx_limit()
        if self._ring is None:
            raise UdrvError("this C USB ring was closed: make a new one (make_usb_datapath)")
        rc = lib.udrv_ring_start(self._ring)
        if rc == -6:                  # LIBUSB_ERROR_BUSY: the ring's own "still in flight"
            raise UdrvError(f"{self.in_flight()} USB transfers of the last run never came back: the device or "
                            "host controller is stuck; reset or replug the device")
        self.running = True           # even after a partial start: stop() cancels what went out
        self._epoch = getattr(self.driver.usb, "endpoint_resets", None)
        self._action = self.driver.actions.record("C USB ring transfers", self.stop)
        if rc < 0:
            raise self._usb_error(rc, "starting the USB transfers")

    def stop(self) -> None:
        """Cancel every transfer and wait for the cancellations (no leaked transfers)."""
        if self._action is not None:
            self.driver.actions.released(self._action)
            self._action = None
        self.running = False
        if self._ring is None:
            return                    # closed
        left = lib.udrv_ring_cancel_all_and_wait(self._ring, int(self.stop_timeout * 1000))
        self.journal.sync()
        self.leaked_transfers = left
        if left:
            log.warning("%d USB transfers did not come back within %.1f s of cancelling; the ring keeps "
                        "their buffers (the device or the host controller is stuck)", left, self.stop_timeout)

    def reset(self) -> int:
        """Recycle after a fault: drop in-flight transfers, clear halts, re-issue unconfirmed TX."""
        return self._recycle_all(clear_halts=True)

    def _recycle_all(self, clear_halts: bool) -> int:
        self.stop()
        if clear_halts:
            for ep in (self.driver.EP_IN, self.driver.EP_OUT):
                try:
                    self.driver.usb.clear_halt(ep)
                except TransportError:
                    pass
        again = self.journal.rewind()
        self.start()
        return again

    def _queued_still_valid(self) -> bool:
        """The transfers in flight were queued under the endpoints and framing there are now:
        running, nothing reset the device's endpoints since start(), the framing unchanged."""
        if not self.running or self._ring is None:
            return False
        epoch = getattr(self.driver.usb, "endpoint_resets", None)
        return epoch is not None and epoch == self._epoch and self.driver.framing_now() == self._framing

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        """After a fault the device reported: (TX entries re-issued, what was recycled).
        The OUT side always (cancel, confirm what made it, clear its halt, rewind the journal);
        the IN transfers stay queued while the ring runs, its framing is current and nothing
        reset the endpoints (udrv_ring_recycle_tx: cancelling them costs a host-controller round
        trip each, and a failed IN side heals in the ring: its halt is cleared there once its
        transfers are back, never under queued ones). Otherwise, or if OUT transfers never come
        back: everything, as reset()."""
        if (self._queued_still_valid()
                and lib.udrv_ring_recycle_tx(self._ring, int(self.stop_timeout * 1000), int(clear_halts)) == 0):
            self.journal.sync()
            return self.journal.rewind(), "OUT transfers recycled, IN transfers kept"
        return self._recycle_all(clear_halts), "in-flight transfers recycled"

    def resume(self) -> bool:
        """After a fault of the driver's own (not one the device or a transfer reported): keep the
        transfers in flight — True — when they can be trusted: the ring's state changes only inside
        its C calls, which a Python exception or the watchdog's signal cannot interrupt, so it is
        whole; and nothing reset the device's endpoints since they were queued (a restore that
        re-selected an alt setting flushed them: False, and the caller recycles). Cancelling and
        resubmitting every transfer is most of a recovery on a real USB device."""
        return self._queued_still_valid() and bool(lib.udrv_ring_healthy(self._ring))

    def close(self) -> None:
        """Stop and free the ring (its memory stays allocated if transfers never came back).
        Its counts stay readable: a restart absorbs them after the close."""
        if self._ring is None:
            return
        self.stop()
        self._final_stats = self._read_stats()
        ffi.release(self._ring)
        self._ring = None

    # --- datapath entry points ------------------------------------------------------------------
    def xmit(self) -> int:
        """TAP -> journal (when the ring owns the TAP) -> bulk OUT; returns transfers submitted."""
        self._sync_tx_limit()
        flags = lib.udrv_ring_xmit(self._ring, self.tap_budget, self._res)
        self.journal.sync()
        if flags & lib.UDRV_PUMP_DEFERRED:
            self._take_deferred()
        if flags & self._flag_bad:
            self._raise_queued(flags)
        return self._res.tx_submitted

    def poll(self, timeout: float = 0.0) -> int:
        """One turn: handle completions, waiting up to timeout seconds for USB or TAP activity
        (returns as soon as anything happened, like UsbNetEngine.poll)."""
        ms = math.ceil(timeout * 1000) if timeout > 0 else 0
        return self._after(lib.udrv_ring_pump(self._ring, ms, self.tap_budget, self._res))

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Turns in a C loop for up to timeout seconds, back early only when Python is needed
        (interrupt packets, errors) or wake_fd is readable. A Python round trip per turn costs
        more than the turn (milliseconds in a TCG guest): a loop that owns a thread, or a daemon
        passing its control socket as wake_fd, should call this instead of poll()."""
        ms = math.ceil(timeout * 1000) if timeout > 0 else 0
        return self._after(lib.udrv_ring_run(self._ring, ms, self.tap_budget, wake_fd, self._res))

    def watch_tx(self, timeout: float) -> None:
        """run() comes back once OUT transfers have waited `timeout` s with none completing, so the
        TX hang detector (Nic.check_tx_progress, fed by tx_clock) needs no turns of its own.
        0: not watched."""
        lib.udrv_ring_set_tx_stall(self._ring, math.ceil(timeout * 1000) + 1 if timeout > 0 else 0)

    def restart_tx_clock(self) -> None:
        """The OUT transfers in flight count as waiting since now (they wait for a carrier)."""
        lib.udrv_ring_restart_tx_clock(self._ring)

    def tx_clock(self) -> tuple[float, float | None]:
        """(when an OUT transfer last completed OK, since when the OUT transfers in flight have
        waited or None when none is): time.monotonic() seconds, kept by the ring itself, exact
        however rarely Python looks."""
        s = self._read_stats()
        return s.tx_done_ms / 1000, s.tx_waiting_since_ms / 1000 if s.tx_waiting else None

    def _take_deferred(self) -> None:
        """The TAP frame the ring left for Python (Nic.enqueue finishes it in software)."""
        n = lib.udrv_ring_take_deferred(self._ring, self._deferred_buf, len(self._deferred_buf))
        if n < 0:
            return
        self._handoff.hand(self._tap_fallback, ffi.buffer(self._deferred_buf, n)[:])
        self.journal.sync()
        lib.udrv_ring_xmit(self._ring, 0, self._res)    # what Nic journaled goes out now

    def _after(self, flags: int) -> int:
        self.journal.sync()
        if flags < 0:
            raise self._usb_error(flags, "handling USB events")
        if flags & lib.UDRV_PUMP_DEFERRED:
            self._take_deferred()
        if flags & lib.UDRV_PUMP_STATUS:
            buf = self._status_buf
            while (n := lib.udrv_ring_next_status(self._ring, buf, len(buf))) >= 0:
                self.driver.on_status(ffi.buffer(buf, n)[:])
        if flags & self._flag_work and self.on_progress is not None:
            self.on_progress()
        if flags & self._flag_bad:
            self._raise_queued(flags)
        return self._res.completions

    # --- counters -----------------------------------------------------------------------------------
    def _read_stats(self) -> Any:
        """A fresh snapshot of the C counters (struct udrv_ring_stats); after close(), the last."""
        if self._ring is None:
            return self._final_stats
        out = ffi.new("struct udrv_ring_stats *")
        lib.udrv_ring_stats(self._ring, out)
        return out

    @property
    def counters(self) -> DatapathCounters:
        s = self._read_stats()
        c = DatapathCounters(rx_packets=s.rx_packets, rx_bytes=s.rx_bytes, tx_packets=s.tx_packets,
                             tx_bytes=s.tx_bytes, status_packets=s.status_packets)
        for code in range(lib.UDRV_NREASONS):
            n = s.rx_dropped[code]
            if n:
                reason = self._nframing.reason(code)
                c.rx_dropped[reason] = c.rx_dropped.get(reason, 0) + n
        for xs in range(lib.UDRV_NXS):
            if s.tx_errors[xs]:
                c.tx_errors[self._xs_names.get(xs, str(xs))] = s.tx_errors[xs]
        return c

    def tap_counters(self) -> dict[str, int]:
        """What the ring counted on the TAP side (Nic.enqueue counts these in Python mode)."""
        s = self._read_stats()
        return {"tap_frames_in": s.tap_frames_in, "tx_dropped_oversize": s.tap_oversize,
                "tap_read_errors": s.tap_read_errors, "tap_write_errors": s.tap_write_errors,
                "status_overflow": s.status_overflow, "errors_lost": s.errors_lost}

    def tap_counts(self) -> TapCounts:
        """What C counted on the TAP side; deferred frames are counted by whoever took them
        (Nic.enqueue)."""
        s = self._read_stats()
        return self._handoff.counts(s.tap_frames_in, s.tap_offload_frames, s.tap_oversize, s.tap_short_vnet,
                                    s.tap_bad_offload, segments=s.tx_segments)

    def report(self) -> DatapathReport:
        return DatapathReport(tx_thread=self.tx_thread, rx_coalesce=self.rx_coalesce_counts())

    def rx_coalesce_counts(self) -> dict[str, int] | None:
        """RX coalescing (as E1000Native's): on/off, segments written inside super-frames,
        super-frames, frames left alone for a wrong checksum, super-frames the TAP refused.
        None when the TAP has no virtio-net header (coalescing impossible)."""
        if not self._vnet:
            return None
        s = self._read_stats()
        return {"on": int(s.rx_coalesce), "segments": s.rx_coalesced, "super_frames": s.rx_super,
                "bad_checksum": s.rx_csum_bad, "refused": s.rx_super_refused,
                "acks_merged": s.rx_acks_merged}

    @property
    def tx_inflight(self) -> int:
        return self._read_stats().tx_inflight

    @property
    def rx_inflight(self) -> int:
        return self._read_stats().rx_inflight

    def in_flight(self) -> int:
        s = self._read_stats()
        return s.rx_inflight + s.tx_inflight + s.status_inflight


def make_usb_datapath(driver: Any, journal: TxJournal, tap_fd: int, n_rx: int = 4, n_tx: int = 8,
                      on_progress: Callable[[], None] | None = None, **kw: Any) -> NativeUsbRing:
    """The C counterpart of UsbNetDriver.make_datapath: builds the ring and makes it the
    driver's datapath (open() starts it, stop() stops it)."""
    ring = NativeUsbRing(driver, journal, tap_fd, n_rx, n_tx, on_progress, **kw)
    driver.datapath = ring
    return ring

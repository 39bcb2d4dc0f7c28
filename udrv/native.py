"""The C fast path (`udrv._native`, built from native/ by cffi at install time), seen from Python.

What is here:
  * `available()` / `why_unavailable()`: the extension is optional; without a compiler or the
    libusb headers udrv installs anyway and runs the pure-Python datapath (`UsbNetEngine`);
  * `NativeFraming`: framing.py's encode_tx/decode_rx done in C (same bytes, same reasons);
  * `NativeJournal`: the TX journal operations done in C on a `TxJournal`'s memfd;
  * `NativeUsbRing`: the C twin of `udrv.usbnet.UsbNetEngine` (same start/stop/reset/xmit/poll
    and `counters`), so the runtime can swap one for the other (design diversity: the Python
    engine stays as the second implementation and the fallback).

The C ring moves frames between the device and the TAP fd itself: RX frames are written to the
TAP from C (the Python `sink` is not used), and with `read_tap=True` (the default) `xmit()` and
`poll()` also read the TAP into the journal, so the runtime must not read the TAP itself while
such a ring runs (`ring.caps.reads_tap` says so; wake on the TAP fd and call xmit()). With
`read_tap=False` the runtime keeps feeding the journal from Python (Nic.enqueue) and the ring
only drains it.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
from typing import Any, Callable

from .datapath import Capabilities, DatapathCounters, DatapathDefaults, DatapathReport, TapCounts
from .errors import DatapathError, DeviceGone, TransportError, UdrvError
from .framing import Framing, Shape
from .journal import JournalFull, TxJournal

log = logging.getLogger("udrv.native")

try:
    from . import _native  # type: ignore[attr-defined]
    ffi: Any = _native.ffi
    lib: Any = _native.lib
    _IMPORT_ERROR = ""
except ImportError as _e:          # not built, or built against a libusb that is not installed
    ffi = lib = None
    _IMPORT_ERROR = str(_e) or type(_e).__name__

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# what setup.py noted when it could not build the module (regular install; editable install)
_BUILD_NOTES = (os.path.join(_PACKAGE_DIR, "_native_build_error.txt"),
                os.path.join(os.path.dirname(_PACKAGE_DIR), "native", "_build", "build-error.txt"))


class NativeUnavailable(UdrvError):
    """The C fast path cannot be used here; the message says why and what to do."""


def available() -> bool:
    """True if udrv._native is built and loads."""
    return lib is not None


def why_unavailable() -> str:
    """Empty if the C fast path is available, otherwise why not and what to do about it."""
    if lib is not None:
        return ""
    if "_native" not in _IMPORT_ERROR:
        return (f"udrv._native is built but does not load ({_IMPORT_ERROR}): install the libusb "
                "runtime (Debian: apt-get install libusb-1.0-0) or rebuild with `pip install -e .`")
    for path in _BUILD_NOTES:
        try:
            with open(path) as f:
                return f"udrv._native is not built. At install time: {f.read().strip()}"
        except OSError:
            pass
    missing = []
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("a C compiler (apt-get install gcc)")
    if not any(os.path.exists(os.path.join(d, "libusb.h"))
               for d in ("/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0")):
        missing.append("the libusb headers (apt-get install libusb-1.0-0-dev)")
    if missing:
        return (f"udrv._native is not built: it needs {' and '.join(missing)}; install "
                f"{'them' if len(missing) > 1 else 'it'}, then run `pip install -e .` again")
    return ("udrv._native is not built: run `pip install -e .` (or `python3 native/build.py` "
            "for a quick developer build) to compile it")


def require() -> None:
    if lib is None:
        raise NativeUnavailable(why_unavailable())


# --- reason names ------------------------------------------------------------------------------

def _fixed_reasons() -> dict[int, str]:
    return {
        lib.UDRV_DROP_ZERO_LENGTH: "zero_length",
        lib.UDRV_DROP_RUNT: "runt",
        lib.UDRV_DROP_OVERSIZE: "oversize",
        lib.UDRV_DROP_TRUNCATED: "truncated",
        lib.UDRV_DROP_LENGTH_BEYOND_TRANSFER: "length_beyond_transfer",
        # transfer-level drops, named as UsbNetEngine counts them ("rx_" + XferStatus.value)
        lib.UDRV_DROP_RX_STALL: "rx_stall",
        lib.UDRV_DROP_RX_TIMEOUT: "rx_timeout",
        lib.UDRV_DROP_RX_ERROR: "rx_error",
        lib.UDRV_DROP_RX_OVERFLOW: "rx_overflow",
    }


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


# --- framing -------------------------------------------------------------------------------------

def _u32(value: int, what: str) -> int:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{what}={value} does not fit the C framing (0..2**32-1)")
    return value


class NativeFraming:
    """A `Framing` applied in C: encode_tx/decode_rx give the same bytes and reasons as Python."""

    def __init__(self, framing: Framing):
        require()
        if len(framing.rx_error_bits) > lib.UDRV_MAX_ERROR_BITS:
            raise ValueError(f"{len(framing.rx_error_bits)} rx_error_bits: the C framing takes at most "
                             f"{lib.UDRV_MAX_ERROR_BITS}; merge bits that share a reason")
        self.framing = framing
        f = ffi.new("struct udrv_framing *")
        f.shape = {Shape.TRAILER4: lib.UDRV_SHAPE_TRAILER4, Shape.HEADER2: lib.UDRV_SHAPE_HEADER2,
                   Shape.RAW: lib.UDRV_SHAPE_RAW}[framing.shape]
        f.pad_rule = _u32(framing.pad_rule, "pad_rule")
        f.max_frame = min(max(framing.max_frame, 0), 0xFFFFFFFF)   # only ever compared with a u32
        f.rx_size = _u32(framing.rx_transfer_size, "rx_transfer_size")
        f.n_error_bits = len(framing.rx_error_bits)
        for i, (bit, _reason) in enumerate(framing.rx_error_bits):
            f.error_bits[i] = bit & 0xFF      # the status is one byte: only the low bits can match
        self.cstruct = f
        self._reasons = _fixed_reasons()
        for i, (_bit, reason) in enumerate(framing.rx_error_bits):
            self._reasons[lib.UDRV_DROP_ERRBIT0 + i] = reason
        self._out = ffi.new("uint8_t[]", 65536 + 3)
        self._start = ffi.new("uint32_t *")
        self._len = ffi.new("uint32_t *")

    def reason(self, code: int) -> str:
        """The reason string for a C verdict (as framing.py / UsbNetEngine name it)."""
        return self._reasons.get(code, f"reason_{code}")

    def encode_tx(self, frame: bytes) -> bytes:
        n = len(frame)
        out = self._out if n + 3 <= len(self._out) else ffi.new("uint8_t[]", n + 3)
        m = lib.udrv_encode_tx(self.cstruct, frame, n, out, len(out))
        if m < 0:
            raise ValueError(f"a frame of {n} bytes does not fit a 16-bit length prefix")
        return ffi.buffer(out, m)[:]

    def decode_rx(self, buf: bytes) -> tuple[bytes | None, str]:
        cbuf = buf if type(buf) is bytes else ffi.from_buffer(buf)     # bytes pass without a copy
        code = lib.udrv_decode_rx(self.cstruct, cbuf, len(buf), self._start, self._len)
        if code:
            return None, self.reason(code)
        start = self._start[0]
        return bytes(buf[start:start + self._len[0]]), ""


# --- journal --------------------------------------------------------------------------------------

class NativeJournal:
    """The C journal operations on a `TxJournal`'s memory (its memfd mapped a second time).

    Same semantics and exceptions as TxJournal; after C operations call `journal.sync()` so the
    Python object's cached head/sent/tail catch up."""

    def __init__(self, journal: TxJournal):
        require()
        self._j = ffi.new("struct udrv_journal *")
        rc = lib.udrv_journal_map_fd(self._j, journal.fd, journal.nslots, journal.slot_size)
        if rc == lib.UDRV_JOURNAL_MAP_FAILED:
            raise UdrvError(f"cannot map the TX journal memfd {journal.fd}: {os.strerror(ffi.errno)}")
        if rc < 0:
            raise UdrvError("the TX journal memory does not match the expected layout")
        self.nslots, self.slot_size, self.max_frame = journal.nslots, journal.slot_size, self._j.max_frame
        self._seq = ffi.new("uint64_t *")
        self._frame = ffi.new("const uint8_t **")
        self._len = ffi.new("uint32_t *")

    @property
    def head(self) -> int:
        return lib.udrv_journal_head(self._j)

    @property
    def sent(self) -> int:
        return lib.udrv_journal_sent(self._j)

    @property
    def tail(self) -> int:
        return lib.udrv_journal_tail(self._j)

    @property
    def reissued(self) -> int:
        return lib.udrv_journal_reissued(self._j)

    def space(self) -> int:
        return lib.udrv_journal_space(self._j)

    def append(self, frame: bytes) -> int:
        seq = lib.udrv_journal_append(self._j, frame, len(frame))
        if seq == lib.UDRV_JOURNAL_FULL:
            raise JournalFull("TX journal full")
        if seq == lib.UDRV_JOURNAL_TOO_BIG:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the journal slot ({self.max_frame})")
        return seq

    def take_unsent(self) -> tuple[int, bytes] | None:
        rc = lib.udrv_journal_take_unsent(self._j, self._seq, self._frame, self._len)
        if rc == 0:
            return None
        if rc < 0:
            seq = self.sent - 1
            raise UdrvError(f"TX journal slot for seq {seq} holds another seq: journal corrupted")
        return self._seq[0], ffi.buffer(self._frame[0], self._len[0])[:]

    def confirm_through(self, seq: int) -> int:
        n = lib.udrv_journal_confirm_through(self._j, seq)
        if n < 0:
            raise UdrvError(f"confirmation for seq {seq} that was never sent (sent up to {self.sent - 1})")
        return n

    def rewind(self) -> int:
        return lib.udrv_journal_rewind(self._j)

    def aqm_drop(self, now: int | None = None) -> bool:
        return lib.udrv_journal_aqm_drop(self._j, lib.udrv_journal_now_ns() if now is None else now) == 1

    @property
    def aqm_drops(self) -> int:
        return lib.udrv_journal_aqm_drops(self._j)

    @property
    def aqm_marks(self) -> int:
        return lib.udrv_journal_aqm_marks(self._j)

    def close(self) -> None:
        if self._j is not None:
            lib.udrv_journal_unmap(self._j)
            self._j = None


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
            f"the native USB ring needs a python-libusb1 device (udrv.libusb.LibusbTransport), not "
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


def rx_coalesce_allowed(tap_vnet_hdr: int) -> bool:
    """May a C ring hand the TAP coalesced GSO super-frames? It needs a virtio-net header on the
    TAP, and the operator can say no: UDRV_RX_COALESCE=0 in the environment (to compare)."""
    return tap_vnet_hdr >= 10 and os.environ.get("UDRV_RX_COALESCE", "1") != "0"


class TapHandoff:
    """The TAP side of a C ring that reads the TAP itself (the e1000 ring, the USB ring): a frame
    only Python can finish goes to the ring's TAP fallback (Nic.enqueue, which counts it) or,
    with no Nic behind the ring, is counted here and dropped; counts() puts C's counts in the
    runtime's terms."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.drops: dict[str, int] = {}

    def hand(self, enqueue: Callable[[list[bytes]], int] | None, raw: bytes) -> int:
        if enqueue is not None:
            return enqueue([raw])
        self.frames_in += 1
        self.drops["unhandled_offload"] = self.drops.get("unhandled_offload", 0) + 1
        return 0

    def counts(self, frames_in: int, offload_frames: int, oversize: int, short_vnet_header: int,
               bad_offload_request: int, segments: int | None = None) -> TapCounts:
        drops = {k: v for k, v in (("oversize", oversize), ("short_vnet_header", short_vnet_header),
                                   ("bad_offload_request", bad_offload_request)) if v}
        for k, v in self.drops.items():
            drops[k] = drops.get(k, 0) + v
        return TapCounts(frames_in + self.frames_in, offload_frames, drops, segments)

    def stats(self, frames_in: int, offload_frames: int, read_errors: int, deferred: int, oversize: int,
              short_vnet_header: int, bad_offload_request: int, **extra: int) -> dict[str, Any]:
        drops = {k: v for k, v in (("oversize", oversize), ("short_vnet_header", short_vnet_header),
                                   ("bad_offload_request", bad_offload_request)) if v}
        for k, v in self.drops.items():
            drops[k] = drops.get(k, 0) + v
        return {"tap_frames_in": frames_in + self.frames_in, "offload_frames": offload_frames,
                "tap_read_errors": read_errors, "tap_deferred": deferred, **extra, "tx_dropped": drops}


def tx_thread_allowed() -> bool:
    """Does a USB ring's run() move TX on a second thread? Only where a second CPU can run it,
    and the operator can say no: UDRV_TX_THREAD=0 in the environment (to compare)."""
    return len(os.sched_getaffinity(0)) > 1 and os.environ.get("UDRV_TX_THREAD", "1") != "0"


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
            raise UdrvError(f"cannot set up the native USB ring: {ffi.string(err).decode()}")
        # udrv_ring_free refuses (and leaks) while transfers are in flight: never a use-after-free
        self._ring = ffi.gc(ring, lib.udrv_ring_free)
        # the TX half on a thread of its own inside run() (a second CPU for TAP reads, the
        # software TSO cut and the submissions); UDRV_TX_THREAD=0 keeps one thread (to compare)
        self.tx_thread = tx_thread_allowed()
        lib.udrv_ring_set_tx_thread(self._ring, int(self.tx_thread))
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
            raise UdrvError("this native USB ring was closed: make a new one (make_usb_datapath)")
        rc = lib.udrv_ring_start(self._ring)
        if rc == -6:                  # LIBUSB_ERROR_BUSY: the ring's own "still in flight"
            raise UdrvError(f"{self.in_flight()} USB transfers of the last run never came back: the device or "
                            "host controller is stuck; reset or replug the device")
        self.running = True           # even after a partial start: stop() cancels what went out
        self._epoch = getattr(self.driver.usb, "endpoint_resets", None)
        self._action = self.driver.actions.record("native usb ring transfers", self.stop)
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


# --- the usbfs floor (benchmarks) ---------------------------------------------------------------

def usb_floor(vid: int, pid: int, control: int, interface: int, alt: int, ep_out: int, frame: bytes,
              n_inflight: int = 64, seconds: float = 3.0) -> dict[str, float]:
    """What submit + reap through usbfs alone cost per frame here: bulk OUT transfers of `frame`,
    n_inflight queued and resubmitted from their completions, on this thread, for `seconds`
    (native/usbfloor.h); `control` (or -1) is claimed too. The device must not be in use by
    another process."""
    require()
    res = ffi.new("struct udrv_usb_floor *")
    buf = ffi.from_buffer(frame)
    if lib.udrv_usb_floor_run(vid, pid, control, interface, alt, ep_out, buf, len(frame), n_inflight, seconds, res) < 0:
        raise UdrvError(f"usbfs floor on {vid:04x}:{pid:04x}: {ffi.string(res.what).decode()}")
    frames = max(1, res.frames)
    return {"frames": int(res.frames), "errors": int(res.errors), "seconds": round(res.seconds, 3),
            "frames_per_s": round(res.frames / res.seconds, 1) if res.seconds else 0.0,
            "mbit_s": round(res.frames * len(frame) * 8 / res.seconds / 1e6, 1) if res.seconds else 0.0,
            "us_per_frame_user": round(res.cpu_user / frames * 1e6, 2),
            "us_per_frame_sys": round(res.cpu_sys / frames * 1e6, 2)}

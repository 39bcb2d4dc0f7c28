"""The C fast path (`udrv._native`, built from native/ by cffi at install time), seen from Python.

What is here:
  * `available()` / `why_unavailable()` / `require()`: the extension is optional; without a
    compiler or the libusb headers udrv installs anyway and runs the pure-Python datapaths;
  * `NativeFraming`: framing.py's encode_tx/decode_rx done in C (same bytes, same reasons);
  * `NativeJournal`: the TX journal operations done in C on a `TxJournal`'s memfd;
  * what every C ring that reads the TAP shares: `TapHandoff` (the frames only Python can
    finish) and the operator's switches `rx_coalesce_allowed` / `tx_thread_allowed`.
The C rings themselves are the engines' C implementations: `udrv.usbring` (USB transfers) and
`udrv.pciring` (descriptor rings).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from .datapath import TapCounts
from .errors import UdrvError
from .framing import Framing, Shape
from .journal import JournalFull, TxJournal


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

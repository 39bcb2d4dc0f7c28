"""The C fast path against its Python twins, on the host (no USB device needed).

  * C framing == udrv/framing.py on generated inputs, every malformed case included: the same
    bytes out of encode_tx, the same frame or the same reason out of decode_rx;
  * C journal ops == TxJournal semantics, interleaving C and Python on the same memfd;
  * the ring's argument checks, the libusb pointer plumbing, and the build conventions.
The USB ring itself needs a USB device: tests/kernel/test_native_usb_ring.py (QEMU guest).
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from udrv import fastpath, usbring
from udrv.drivers.pegasus import FRAMING_ADM8513, FRAMING_TRAILER
from udrv.errors import UdrvError
from udrv.framing import ETH_MIN, Framing, Shape
from udrv.journal import HEADER, JournalFull, TxJournal

from journal_bytes import unstamped

pytestmark = pytest.mark.skipif(not fastpath.available(), reason=fastpath.why_unavailable() or "native available")

ROOT = Path(__file__).resolve().parents[2]

FRAMINGS = {
    "pegasus_trailer": FRAMING_TRAILER,
    "adm8513_header": FRAMING_ADM8513,
    "raw_ecm": Framing(Shape.RAW, rx_transfer_size=1514, pad_rule=512),
    "raw_nopad": Framing(Shape.RAW),
    "trailer_nopad_small": Framing(Shape.TRAILER4, pad_rule=0, max_frame=100,
                                   rx_error_bits=((0x80, "late"), (0x08, "crc_error"))),
    # duplicate reasons, a bit that is zero, bits wider than the status byte, a negative int
    "trailer_odd_bits": Framing(Shape.TRAILER4, pad_rule=8,
                                rx_error_bits=((0, "never"), (0x1_04, "wide"), (0x04, "runt"),
                                               (-0x80, "negative"), (0x10, "dribble"))),
    "header_with_bits": Framing(Shape.HEADER2, pad_rule=64, rx_error_bits=((0xFF, "any"),)),
}

ALL_REASONS = {"zero_length", "runt", "oversize", "truncated", "length_beyond_transfer"}


def trailer(frame: bytes, status: int = 0, declared: int | None = None) -> bytes:
    d = len(frame) + 4 if declared is None else declared
    return frame + bytes((d & 0xFF, (d >> 8) & 0xFF, status, 0))


def header(frame: bytes, declared: int | None = None, extra: bytes = b"") -> bytes:
    d = len(frame) if declared is None else declared
    return bytes((d & 0xFF, (d >> 8) & 0xFF)) + frame + extra


def rx_cases(fr: Framing, rng: random.Random) -> list[bytes]:
    """Targeted malformed and boundary buffers for the framing's shape, then random ones."""
    body = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731
    cases: list[bytes] = [b"", b"\x00", b"\x01\x02", b"\x01\x02\x03", b"\x00" * 4]
    for n in (0, 1, ETH_MIN - 1, ETH_MIN, 60, 100, 101, 1514, 1536, 1537, 4095):
        f = body(n)
        cases.append(f)                                         # RAW sizes
        if fr.shape is Shape.TRAILER4:
            cases.append(trailer(f))
            for declared in (0, 1, 2, 3, 4, 5, n + 3, n + 4 + 1, n + 4 + 100, 0xF000 | (n + 4),
                             0x0FFF, 0xFFFF):
                cases.append(trailer(f, declared=declared))
            for bit in range(8):
                cases.append(trailer(f, status=1 << bit))
            cases.append(trailer(f, status=0xFF, declared=0))  # zero length wins over status
            cases.append(trailer(f, status=0xFF, declared=3))  # runt (declared) wins over status
        elif fr.shape is Shape.HEADER2:
            cases.append(header(f))
            cases.append(header(f, extra=b"\0\0\0\0"))
            for declared in (0, 1, 13, 14, n - 1 if n else 0, n + 1, 0xF000 | n, 0x0FFF, 0xFFFF):
                cases.append(header(f, declared=declared))
    for _ in range(3000):                                       # random garbage and near-misses
        n = rng.choice((rng.randrange(0, 20), rng.randrange(0, 1700)))
        buf = bytearray(body(n))
        if n >= 4 and fr.shape is Shape.TRAILER4 and rng.random() < 0.6:
            d = rng.choice((n, n - rng.randrange(0, 30), rng.randrange(0, 0x10000)))
            buf[-4:-2] = (d & 0xFFFF).to_bytes(2, "little")
            buf[-2] = rng.choice((0, 0, 0, 1 << rng.randrange(8), rng.getrandbits(8)))
        if n >= 2 and fr.shape is Shape.HEADER2 and rng.random() < 0.6:
            d = rng.choice((n - 2, n - 2 - rng.randrange(0, 30), rng.randrange(0, 0x10000)))
            buf[0:2] = (d & 0xFFFF).to_bytes(2, "little")
        cases.append(bytes(buf))
    return cases


@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_decode_rx_matches_python(name: str) -> None:
    fr = FRAMINGS[name]
    nf = fastpath.NativeFraming(fr)
    seen: set[str] = set()
    for buf in rx_cases(fr, random.Random(name)):
        want = fr.decode_rx(buf)
        got = nf.decode_rx(buf)
        assert got == want, (name, len(buf), buf[-4:].hex(), want[1], got[1])
        seen.add(want[1])
    # the generated inputs reach every verdict this shape can give
    shape_reasons = {Shape.RAW: {"", "zero_length", "runt", "oversize"},
                     Shape.TRAILER4: ALL_REASONS | {""},
                     Shape.HEADER2: ALL_REASONS | {""}}[fr.shape]
    bit_reasons = {r for b, r in fr.rx_error_bits if b & 0xFF} if fr.shape is Shape.TRAILER4 else set()
    assert shape_reasons | bit_reasons <= seen, sorted((shape_reasons | bit_reasons) - seen)


@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_encode_tx_matches_python(name: str) -> None:
    fr = FRAMINGS[name]
    nf = fastpath.NativeFraming(fr)
    rng = random.Random(name)
    sizes = list(range(0, 140)) + [510, 511, 512, 513, 1022, 1024, 1514, 1536, 2046, 2048, 4096, 65533, 65535]
    sizes += [rng.randrange(0, 3000) for _ in range(300)]
    for n in sizes:
        frame = bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
        frame = frame[:n]
        assert nf.encode_tx(frame) == fr.encode_tx(frame), (name, n)


def test_encode_tx_refuses_what_python_refuses() -> None:
    big = b"\x00" * 65536
    for fr in (FRAMING_TRAILER, FRAMING_ADM8513):
        with pytest.raises(ValueError):
            fr.encode_tx(big)
        with pytest.raises(ValueError):
            fastpath.NativeFraming(fr).encode_tx(big)
    raw = Framing(Shape.RAW, pad_rule=512)
    assert fastpath.NativeFraming(raw).encode_tx(big + b"\x01") == raw.encode_tx(big + b"\x01")


def test_framing_limits_are_reported() -> None:
    too_many = Framing(Shape.TRAILER4, rx_error_bits=tuple((1 << (i % 8), f"r{i}") for i in range(9)))
    with pytest.raises(ValueError, match="at most 8"):
        fastpath.NativeFraming(too_many)
    with pytest.raises(ValueError, match="pad_rule"):
        fastpath.NativeFraming(Framing(Shape.RAW, pad_rule=-1))


# --- journal ------------------------------------------------------------------------------------

def _state(j: TxJournal) -> tuple[int, int, int, int]:
    j.sync()
    return j.head, j.sent, j.tail, j.reissued


def _do(target, op: str, arg):
    try:
        if op == "append":
            return ("ok", target.append(arg))
        if op == "take":
            return ("ok", target.take_unsent())
        if op == "confirm":
            return ("ok", target.confirm_through(arg))
        if op == "rewind":
            return ("ok", target.rewind())
        if op == "space":
            return ("ok", target.space())
    except JournalFull:
        return ("full", None)
    except ValueError:
        return ("too_big", None)
    except UdrvError:
        return ("error", None)
    raise AssertionError(op)


@pytest.mark.parametrize("seed", range(6))
def test_journal_c_and_python_interleaved(seed: int) -> None:
    """One journal driven by a random mix of C and Python operations behaves exactly like a
    pure-Python reference journal given the same operations."""
    rng = random.Random(seed)
    nslots, slot_size = 8, 96
    ref = TxJournal(nslots, slot_size)
    shared = TxJournal(nslots, slot_size)
    c = fastpath.NativeJournal(shared)
    try:
        for step in range(4000):
            op = rng.choice(("append", "append", "append", "take", "take", "confirm", "confirm",
                             "rewind", "space"))
            arg = None
            if op == "append":
                arg = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, slot_size - 16 + 4)))
            elif op == "confirm":
                ref_h, ref_s, ref_t, _ = _state(ref)
                arg = rng.randrange(max(0, ref_t - 2), ref_s + 2)
            use_c = rng.random() < 0.5
            if use_c:
                got = _do(c, op, arg)
                shared.sync()               # what the runtime does after every C call
            else:
                shared.sync()
                got = _do(shared, op, arg)
            want = _do(ref, op, arg)
            assert got == want, (seed, step, op, "C" if use_c else "Py", got, want)
            assert _state(shared) == _state(ref), (seed, step, op)
            assert (c.head, c.sent, c.tail, c.reissued) == _state(ref)
    finally:
        c.close()
        ref.close()
        shared.close()


def test_journal_header_bytes_identical_after_same_ops() -> None:
    a, b = TxJournal(16, 64), TxJournal(16, 64)
    c = fastpath.NativeJournal(b)
    try:
        for i in range(10):
            a.append(bytes([i]) * (i + 14))
            c.append(bytes([i]) * (i + 14))
        for _ in range(6):
            a.take_unsent()
            c.take_unsent()
        a.confirm_through(3)
        c.confirm_through(3)
        a.rewind()
        c.rewind()
        assert unstamped(a) == unstamped(b)      # header and every slot, byte for byte
    finally:
        c.close()
        a.close()
        b.close()


def test_journal_corruption_is_reported_the_same_way() -> None:
    for side in ("c", "py"):
        j = TxJournal(8, 64)
        c = fastpath.NativeJournal(j)
        try:
            j.append(b"x" * 20)
            j.append(b"y" * 20)
            struct.pack_into("<Q", j.mem, HEADER + 1 * 64 + 8, 99)     # slot 1 claims seq 99
            assert (c.take_unsent() if side == "c" else j.take_unsent())[0] == 0
            j.sync()
            with pytest.raises(UdrvError, match="corrupt"):
                c.take_unsent() if side == "c" else j.take_unsent()
            j.sync()
            assert j.sent == 2          # both advance `sent` before noticing
        finally:
            c.close()
            j.close()


def test_journal_layout_mismatch_is_refused() -> None:
    j = TxJournal(8, 64)
    try:
        wrong = TxJournal.__new__(TxJournal)
        wrong.fd, wrong.nslots, wrong.slot_size = j.fd, 16, 64
        with pytest.raises(UdrvError, match="layout"):
            fastpath.NativeJournal(wrong)
    finally:
        j.close()


def test_python_can_close_its_journal_while_c_maps_it() -> None:
    """The C side maps the memfd itself: no exported buffer keeps Python's mmap open."""
    j = TxJournal(8, 64)
    c = fastpath.NativeJournal(j)
    c.append(b"z" * 30)
    j.close()
    assert c.head == 1
    c.close()


# --- ring plumbing ----------------------------------------------------------------------------------

def _ring_cfg(journal: TxJournal, tap_fd: int) -> object:
    cfg = fastpath.ffi.new("struct udrv_ring_config *")
    cfg.ep_in, cfg.ep_out, cfg.n_rx, cfg.n_tx = 0x81, 0x02, 4, 4
    cfg.tap_fd, cfg.journal_fd = tap_fd, journal.fd
    cfg.journal_nslots, cfg.journal_slot_size = journal.nslots, journal.slot_size
    return cfg


def _ring_new_error(cfg, ctx: int = 1, handle: int = 1, framing: Framing = FRAMING_TRAILER) -> str:
    ffi, lib = fastpath.ffi, fastpath.lib
    err = ffi.new("char[]", 256)
    r = lib.udrv_ring_new(ffi.cast("void *", ctx), ffi.cast("void *", handle), cfg,
                          fastpath.NativeFraming(framing).cstruct, err, 256)
    assert r == ffi.NULL
    return ffi.string(err).decode()


def test_ring_argument_checks_say_what_to_do() -> None:
    j = TxJournal(8, 2048)
    rfd, wfd = os.pipe()
    try:
        cfg = _ring_cfg(j, rfd)
        assert "python-libusb1" in _ring_new_error(cfg, ctx=0)
        cfg.ep_in = 0x01
        assert "must be IN" in _ring_new_error(cfg)
        cfg.ep_in, cfg.n_rx = 0x81, 0
        assert "n_rx=0" in _ring_new_error(cfg)
        cfg.n_rx, cfg.tap_fd = 4, 9999
        assert "not an open file descriptor" in _ring_new_error(cfg)
        cfg.tap_fd, cfg.journal_nslots = rfd, 16
        assert "TxJournal.fd" in _ring_new_error(cfg)
        cfg.journal_nslots, cfg.ep_status, cfg.status_size = 8, 0x83, 0
        assert "status_size" in _ring_new_error(cfg)
    finally:
        os.close(rfd)
        os.close(wfd)
        j.close()


def test_same_libusb_as_python_libusb1() -> None:
    import usb1
    with usb1.USBContext():
        usbring.check_same_libusb()      # raises if two different libusb libraries are loaded


def test_ring_needs_a_libusb_transport() -> None:
    from udrv.faults import ActiveFault, FaultSpec, FaultyTransport
    from udrv.models.usb import ModelUsbTransport
    from udrv.models.pegasus import PegasusModel
    t = ModelUsbTransport(PegasusModel())
    wrapped = FaultyTransport(t, ActiveFault(FaultSpec("xmit", "raise")))
    assert usbring._unwrap(wrapped) is t
    with pytest.raises(fastpath.NativeUnavailable, match="UsbNetEngine"):
        usbring.libusb_pointers(wrapped)


def test_libusb_pointers_from_python_libusb1_objects() -> None:
    import usb1

    class FakeTransport:
        def __init__(self, ctx):
            self.ctx = ctx
            self.handle = type("H", (), {})()

    with usb1.USBContext() as ctx:
        t = FakeTransport(ctx)
        with pytest.raises(fastpath.NativeUnavailable):
            usbring.libusb_pointers(t)                    # no device handle
        import ctypes
        t.handle._USBDeviceHandle__handle = ctypes.c_void_p(0x1234)
        c, h, _, _ = usbring.libusb_pointers(t)
        assert c and h == 0x1234


# --- build conventions and fallback ------------------------------------------------------------------

def test_build_compiles_every_c_file_with_every_cdef() -> None:
    sys.path.insert(0, str(ROOT / "native"))
    try:
        import build as native_build   # native/build.py
    finally:
        sys.path.pop(0)
    srcs = {Path(s).name for s in native_build.c_sources()}
    assert {"framing.c", "journal.c", "usb_ring.c"} <= srcs
    assert srcs == {p.name for p in (ROOT / "native").glob("*.c")}
    assert {"framing.h", "journal.h", "usb_ring.h"} <= set(native_build.headers_for_cdefs())
    for fn in ("udrv_encode_tx", "udrv_journal_append", "udrv_ring_pump", "udrv_ring_free"):
        assert hasattr(fastpath.lib, fn)


def test_why_unavailable_names_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(fastpath, "lib", None)
    monkeypatch.setattr(fastpath, "_IMPORT_ERROR", "No module named 'udrv._native'")
    monkeypatch.setattr(fastpath, "_BUILD_NOTES", ("/nonexistent/build-error.txt",))
    assert not fastpath.available()
    assert "pip install" in fastpath.why_unavailable()
    with pytest.raises(fastpath.NativeUnavailable, match="pip install"):
        fastpath.NativeFraming(FRAMING_TRAILER)
    monkeypatch.setattr(fastpath, "_IMPORT_ERROR", "libusb-1.0.so.0: cannot open shared object file")
    assert "libusb-1.0-0" in fastpath.why_unavailable()


def test_generated_c_is_not_next_to_the_sources() -> None:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "native", "udrv"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    generated = [line for line in out.stdout.splitlines()
                 if line.endswith(("_native.c", ".o", ".so")) or "/_build/" in line]
    assert generated == []

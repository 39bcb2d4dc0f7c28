"""Transmit offloads: virtio-net headers from the TAP, the software fallback, and the e1000's
TCP/IP context descriptors (checksum offload and TSO) against the e1000 model.

Every check of what reaches the wire uses this file's own checksum (a plain word loop) and its
own header parsing, never udrv.offload's: a test that reused them would agree with their bugs.
Header layouts are literals from RFC 791/793/8200 and the virtio spec (5.1.6)."""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time

import pytest

from udrv import fastpath, offload
from udrv.journal import HEADER, TxJournal

from journal_bytes import unstamped
from udrv.models.pci import DmarFault, ModelPciTransport
from udrv.models.e1000 import E1000Model
from udrv.nic import Nic, NicOptions
from udrv.offload import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, F_NEEDS_CSUM, VnetHdr
from udrv.drivers.e1000 import E1000

E1000Native = E1000.c_variant()     # the same driver on the C ring

IMPLS = [pytest.param(E1000, id="py"),
         pytest.param(E1000Native, id="c", marks=pytest.mark.skipif(
             not fastpath.available(), reason=f"C fast path not built: {fastpath.why_unavailable()}"))]
VARIANTS = ("82540em", "82574l")
from frames import (ACK, CWR, FIN, MODEL_MAC, PEER, PSH, check_segmentation, csum_tcp, csum_udp, gso_tcp,
                    inet_sum, mixed_items, parse_tcp_wire, payload_bytes, pseudo)


def test_vnet_header_parse_and_pack() -> None:
    raw = struct.pack("<BBHHHHH", 1, 0x81, 66, 1448, 34, 16, 0)
    h = VnetHdr.parse(raw)
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset) == (1, 0x81, 66, 1448, 34, 16)
    assert h.needs_csum and h.ecn and h.gso == GSO_TCPV4 and not h.plain
    assert h.pack() == raw and len(h.pack(10)) == 10 and VnetHdr.parse(raw[:10]) == h
    assert VnetHdr.parse(bytes(12)).plain and offload.ZERO_HDR == bytes(12)
    with pytest.raises(offload.OffloadError):
        VnetHdr.parse(b"\x01" * 9)
    assert offload.tun_offload_flags({"csum", "tso4", "tso6"}) == 0x07
    assert offload.tun_offload_flags({"tso4"}) == 0          # TSO without checksum: the kernel refuses
    assert offload.tun_offload_flags(()) == 0


def test_plan_locates_headers() -> None:
    h, f = gso_tcp(payload_bytes(5000))
    p = offload.plan(h, f)
    assert (p.need, p.csum_start, p.csum_at, p.hdr_len, p.mss, p.paylen) == ("tso4", 34, 50, 66, 1448, 5000)
    h, f = gso_tcp(payload_bytes(5000), ipv6=True, vlan=True)
    p = offload.plan(h, f)
    assert (p.need, p.layout.l3, p.layout.l4, p.hdr_len) == ("tso6", 18, 58, 90)
    assert offload.plan(*gso_tcp(payload_bytes(3000), ecn=True)).need == "software"
    assert offload.plan(*csum_udp(b"x" * 100)).need == "csum"
    assert offload.plan(VnetHdr(), f) is None
    with pytest.raises(offload.OffloadError):            # checksum field past the end
        offload.plan(VnetHdr(F_NEEDS_CSUM, 0, 0, 0, len(f) - 2, 6), f)
    with pytest.raises(offload.OffloadError):            # TCPv4 GSO on an IPv6 frame
        offload.plan(VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 0, 1448, 58, 16), f)
    with pytest.raises(offload.OffloadError):
        offload.plan(VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16), gso_tcp(b"x" * 3000)[1])


# --- the software path ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size,mss", [(64000, 1448), (1448 * 3, 1448), (100, 1448), (9001, 536)])
def test_software_segmentation(ipv6: bool, size: int, mss: int) -> None:
    data = payload_bytes(size, salt=size)
    h, f = gso_tcp(data, mss=mss, ipv6=ipv6, flags=ACK | PSH | FIN, seq=0xFFFFF000)   # seq wraps
    wire = offload.resolve(h, f)
    check_segmentation(wire, data, mss, 0xFFFFF000, 0x1234, ACK | PSH | FIN, ipv6=ipv6)
    assert all(w[:14] == f[:14] for w in wire)


def test_software_segmentation_ecn_and_vlan() -> None:
    data = payload_bytes(10000)
    h, f = gso_tcp(data, ecn=True, flags=ACK | PSH | CWR, vlan=True)
    wire = offload.resolve(h, f)
    check_segmentation(wire, data, 1448, 1000, 0x1234, ACK | PSH | CWR, ecn=True)
    assert all(w[12:16] == b"\x81\x00\x00\x05" for w in wire)


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_software_checksum(ipv6: bool) -> None:
    for n in (0, 1, 17, 1400):
        h, f = csum_udp(payload_bytes(n), ipv6=ipv6)
        (out,) = offload.resolve(h, f)
        udp = out[h.csum_start:]
        assert out[:h.csum_start + 6] == f[:h.csum_start + 6]
        assert inet_sum(pseudo(ipv6, 17, len(udp)) + udp) == 0xFFFF
        assert udp[6:8] != b"\0\0"                         # UDP: 0 means "no checksum"
    h, f = csum_tcp(payload_bytes(999))
    (out,) = offload.resolve(h, f)
    assert parse_tcp_wire(out)["tcp_ok"]


def test_software_ufo_fragments() -> None:
    data = payload_bytes(4000)
    h, f = csum_udp(data)
    h = VnetHdr(F_NEEDS_CSUM, GSO_UDP, 0, 1480, h.csum_start, 6)
    frags = offload.resolve(h, f)
    assert len(frags) == 3
    ip_payload = b""
    for i, fr in enumerate(frags):
        tot, ident, ff = struct.unpack_from("!HHH", fr, 16)
        assert inet_sum(fr[14:34]) == 0xFFFF and tot == len(fr) - 14 and ident == 99
        assert (ff & 0x1FFF) * 8 == len(ip_payload) and bool(ff & 0x2000) == (i < 2)
        ip_payload += fr[34:]
    assert ip_payload[8:] == data and inet_sum(pseudo(False, 17, len(ip_payload)) + ip_payload) == 0xFFFF


# --- the journal carries the header -----------------------------------------------------------------------------
def test_journal_vnet_slots() -> None:
    h, f = gso_tcp(payload_bytes(3000))
    j = TxJournal(8, 4096)
    try:
        j.append(b"\x01" * 60)
        seq = j.append(f, h.pack())
        assert j.entry(seq) == (h.pack(), f) and j.frame(seq) == f
        flags = struct.unpack_from("<I", j.mem, HEADER + seq * 4096 + 4)[0]
        assert flags == 1 | 12 << 8                               # the documented layout
        assert j.take_unsent() == (0, b"\x01" * 60)
        assert j.peek_unsent() == (1, h.pack(), f)
        j.mark_sent(1)
        assert j.peek_unsent() is None and j.sent == 2
        with pytest.raises(ValueError):
            j.append(b"x" * 4080, h.pack())                      # header + frame beyond the slot
    finally:
        j.close()


@pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")
def test_journal_vnet_slots_same_in_c() -> None:
    """native/journal.c writes and reads vnet slots byte for byte like udrv/journal.py."""
    ffi, lib = fastpath.ffi, fastpath.lib
    h, f = gso_tcp(payload_bytes(700))
    a, b = TxJournal(8, 2048), TxJournal(8, 2048)
    cj = ffi.new("struct udrv_journal *")
    assert lib.udrv_journal_map_fd(cj, b.fd, 8, 2048) == 0
    try:
        for k in range(3):
            a.append(f, h.pack())
            a.append(f[:60])
            v = ffi.from_buffer("uint8_t[]", h.pack())
            assert lib.udrv_journal_append_vnet(cj, v, 12, ffi.from_buffer("uint8_t[]", f), len(f)) == 2 * k
            assert lib.udrv_journal_append_vnet(cj, ffi.NULL, 0, ffi.from_buffer("uint8_t[]", f), 60) == 2 * k + 1
        assert unstamped(a) == unstamped(b)
        seq, vp, vl, fp, fl = (ffi.new("uint64_t *"), ffi.new("const uint8_t **"), ffi.new("uint32_t *"),
                               ffi.new("const uint8_t **"), ffi.new("uint32_t *"))
        assert lib.udrv_journal_peek_unsent(cj, seq, vp, vl, fp, fl) == 1
        assert (seq[0], ffi.buffer(vp[0], vl[0])[:], ffi.buffer(fp[0], fl[0])[:]) == (0, h.pack(), f)
        assert lib.udrv_journal_mark_sent(cj, 1) < 0 and lib.udrv_journal_mark_sent(cj, 0) == 0
        assert lib.udrv_journal_take_unsent(cj, seq, fp, fl) == 1            # a plain slot
        assert (seq[0], ffi.buffer(fp[0], fl[0])[:]) == (1, f[:60])
        assert lib.udrv_journal_take_unsent(cj, seq, fp, fl) == 1            # header skipped
        assert ffi.buffer(fp[0], fl[0])[:] == f
        b.sync()
        assert b.peek_unsent()[0] == 3 and a.take_unsent()[1] == f          # Python agrees
        # a header longer than the slot's length is corruption, on both sides
        struct.pack_into("<II", b.mem, HEADER + 3 * 2048, 5, 1 | 12 << 8)
        with pytest.raises(Exception, match="corrupt"):
            b.peek_unsent()
        assert lib.udrv_journal_peek_unsent(cj, seq, vp, vl, fp, fl) == lib.UDRV_JOURNAL_CORRUPT
    finally:
        lib.udrv_journal_unmap(cj)
        a.close()
        b.close()


# --- the e1000 on its model ---------------------------------------------------------------------------------------
class Rig:
    def __init__(self, variant: str = "82540em", cls=E1000, hw: frozenset[str] | None = None, **opts):
        self.model = E1000Model(variant)
        self.transport = ModelPciTransport(self.model)
        self.wire: list[bytes] = []
        self.host_rx: list[bytes] = []
        self.model.on_transmit = lambda fr: self.wire.append(bytes(fr))
        opts.setdefault("n_rx", 64)
        opts.setdefault("n_tx", 256)
        self.nic = Nic(cls, self.transport, self.host_rx.append, NicOptions(**opts))
        self.nic.bring_up()
        self.nic.open()
        if hw is not None:
            self.nic.engine.chip_offloads = frozenset(hw)

    def enqueue(self, items: list[tuple[VnetHdr | None, bytes]]) -> int:
        return self.nic.enqueue([(h or VnetHdr()).pack() + fr for h, fr in items], vnet_hdr_len=12)

    def pump(self) -> None:
        for i in range(2000):
            self.nic.xmit()
            self.nic.poll(0.0)
            if i > 2 and self.nic.journal.unconfirmed() == 0:
                break

    def send(self, items: list[tuple[VnetHdr | None, bytes]]) -> None:
        self.enqueue(items)
        self.pump()

    def close(self) -> None:
        self.nic.close()
        self.transport.close()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


def test_tap_offloads_follow_the_chip(impl) -> None:
    r82540, r82574 = Rig("82540em", impl), Rig("82574l", impl)
    try:
        assert r82540.nic.offloads == {"csum", "tso4"}               # no IPv6 TSO on the 8254x
        assert r82574.nic.offloads == {"csum", "tso4", "tso6"}
        assert r82540.nic.journal.max_frame >= 65536 + 12
    finally:
        r82540.close()
        r82574.close()


def test_tso_64k_frame_becomes_correct_wire_frames(impl, variant) -> None:
    r = Rig(variant, impl)
    try:
        data = payload_bytes(64000)
        h, f = gso_tcp(data, flags=ACK | PSH | FIN, seq=0xFFFF0000, ident=0xFFF0)  # seq and id wrap
        r.send([(h, f)])
        check_segmentation(r.wire, data, 1448, 0xFFFF0000, 0xFFF0, ACK | PSH | FIN)
        assert r.nic.engine.report().tx_offload["tso"] == 1
        c = r.nic.engine.counters
        assert c.tx_packets == len(r.wire) and c.tx_bytes == sum(len(w) for w in r.wire)
        assert r.nic.journal.unconfirmed() == 0 and not c.tx_errors
        assert r.model.errors == {}
        # the TSO packet used a context descriptor and spanned buffers: RS on its last one only
        ring = r.nic.driver.rings.tx_ring.view
        last = -(-len(f) // r.nic.driver.soft.tx_bufsize)          # context + one per buffer
        cmd = [ring[i * 16 + 11] for i in range(last + 1)]
        assert cmd[0] & 0x2C == 0x24 and ring[10] >> 4 == 0       # context: DEXT|TSE, DTYP 0
        assert all(c & 0x2D == 0x24 for c in cmd[1:last])          # data: DEXT|TSE, no EOP/RS
        assert cmd[last] & 0x2F == 0x2F                            # last: DEXT|RS|TSE|IFCS|EOP
        assert all(ring[i * 16 + 10] >> 4 == 1 for i in range(1, last + 1))   # data descriptors
        assert ring[last * 16 + 13] == (0x03 if variant else 0)    # POPTS: IXSM|TXSM
    finally:
        r.close()


def test_tso_ipv6(impl, variant) -> None:
    """The 82574 segments IPv6 itself; the 82540 driver does it in software: same wire."""
    r = Rig(variant, impl)
    try:
        data = payload_bytes(30000, salt=3)
        h, f = gso_tcp(data, ipv6=True, mss=1428, flags=ACK | PSH)
        r.send([(h, f)])
        check_segmentation(r.wire, data, 1428, 1000, 0, ACK | PSH, ipv6=True)
        counts = r.nic.engine.report().tx_offload
        assert counts == ({"csum": 0, "tso": 1, "software": 0} if variant == "82574l"
                          else {"csum": 0, "tso": 0, "software": 1})
    finally:
        r.close()


def test_checksum_offload(impl) -> None:
    r = Rig("82540em", impl)
    try:
        items = [csum_udp(payload_bytes(n, n)) for n in (0, 1, 100, 1472)]
        items += [csum_udp(payload_bytes(300), ipv6=True), csum_tcp(payload_bytes(1200))]
        r.send(items)
        assert len(r.wire) == len(items)
        for (h, f), w in zip(items, r.wire):
            w = w[:len(f)]                                 # the model pads short frames to 60
            assert w[:h.csum_start + h.csum_offset] == f[:h.csum_start + h.csum_offset]
            l4 = w[h.csum_start:]
            ipv6 = w[12:14] == b"\x86\xdd"
            proto = 6 if h.csum_offset == 16 else 17
            assert inet_sum(pseudo(ipv6, proto, len(l4)) + l4) == 0xFFFF
        assert r.nic.engine.report().tx_offload["csum"] == len(items)
    finally:
        r.close()


def test_fallback_equals_offload_on_the_wire(impl, variant) -> None:
    """The same frames through the chip's offloads and through the software path: the same
    bytes on the wire (IP ids, checksums, flags, segment boundaries)."""
    items = [gso_tcp(payload_bytes(64000), flags=ACK | PSH | FIN), csum_udp(payload_bytes(777)),
             (None, PEER + MODEL_MAC + b"\x88\xb5" + payload_bytes(100)),
             gso_tcp(payload_bytes(3000, 9), seq=64000 + 1000, ident=0x1235), csum_tcp(payload_bytes(40))]
    hw, sw = Rig(variant, impl), Rig(variant, impl, hw=frozenset())
    try:
        hw.send(items)
        sw.send(items)
        assert len(hw.wire) == 45 + 1 + 1 + 3 + 1
        assert hw.wire == sw.wire
        assert hw.nic.engine.report().tx_offload == {"csum": 2, "tso": 2, "software": 0}
        assert sw.nic.engine.report().tx_offload == {"csum": 0, "tso": 0, "software": 4}
    finally:
        hw.close()
        sw.close()




@pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")
@pytest.mark.parametrize("variant", VARIANTS)
def test_python_and_c_rings_put_the_same_bytes_on_the_wire(variant: str) -> None:
    """Both implementations, every kind of request (TSO v4 behind a VLAN tag, v6, ECN, UDP
    checksum v4/v6, UFO, plain): byte-identical wire, equal to the software path's frames."""
    items = mixed_items()
    want = [w.ljust(60, b"\0") for h, f in items for w in offload.resolve(h or VnetHdr(), f)]
    rigs = [Rig(variant, E1000), Rig(variant, E1000Native)]
    try:
        for r in rigs:
            r.send(items)
            assert r.nic.journal.unconfirmed() == 0 and not r.nic.engine.counters.tx_errors
        assert rigs[0].wire == rigs[1].wire == want
        assert rigs[0].nic.engine.report().tx_offload == rigs[1].nic.engine.report().tx_offload
    finally:
        for r in rigs:
            r.close()


def test_stream_of_gso_and_plain_frames_keeps_order(impl) -> None:
    r = Rig("82574l", impl, n_tx=64)
    try:
        items, payload, seq = [], b"", 1
        for k in range(40):
            data = payload_bytes(1000 + 997 * k, k)
            items.append(gso_tcp(data, seq=seq, ident=k * 100))
            payload += data
            seq += len(data)
        for k in range(0, len(items), 7):
            r.enqueue(items[k:k + 7])
            r.pump()
        got = b"".join(parse_tcp_wire(w)["payload"] for w in r.wire)
        assert got == payload
        assert all(parse_tcp_wire(w)["tcp_ok"] and parse_tcp_wire(w)["ip_ok"] for w in r.wire)
        assert r.nic.journal.unconfirmed() == 0
    finally:
        r.close()


def test_tso_on_a_ring_too_small_for_the_packet(impl) -> None:
    """34 descriptors do not fit an 8-descriptor ring: the segments go out in software, a
    few at a time, and the journal frame is confirmed only with the last one."""
    r = Rig("82540em", impl, n_tx=8)
    try:
        data = payload_bytes(64000)
        h, f = gso_tcp(data)
        r.enqueue([(h, f), (None, PEER + MODEL_MAC + b"\x88\xb5" + b"after" * 20)])
        r.nic.xmit()
        assert 0 < len(r.wire) < 45 and r.nic.journal.tail == 0        # not confirmed yet
        r.pump()
        check_segmentation(r.wire[:45], data, 1448, 1000, 0x1234, ACK | PSH)
        assert r.wire[45][14:19] == b"after"
        assert r.nic.journal.unconfirmed() == 0
        assert r.nic.engine.report().tx_offload["software"] == 1
    finally:
        r.close()


def test_plain_header_is_not_journaled_and_bad_requests_are_dropped(impl) -> None:
    r = Rig("82540em", impl)
    try:
        plain = PEER + MODEL_MAC + b"\x88\xb5" + payload_bytes(50)
        h, f = gso_tcp(payload_bytes(2000))
        n = r.enqueue([(None, plain), (VnetHdr(F_NEEDS_CSUM, GSO_TCPV6, 0, 1448, 34, 16), f),
                       (VnetHdr(F_NEEDS_CSUM, 0, 0, 0, 5000, 6), plain), (h, f)])
        # the checksum outside the frame is refused at once; the GSO type that does not match
        # the frame is journaled (the e1000 reads the header itself) and refused by the ring
        assert n == 3 and r.nic.counters.tx_dropped == {"bad_offload_request": 1}
        assert r.nic.journal.entry(0) == (b"", plain) and r.nic.journal.entry(2)[0] == h.pack()
        # a GSO frame whose segments would not fit the MTU is refused like an oversize frame
        r.nic.set_mtu(1000)
        assert r.enqueue([gso_tcp(payload_bytes(5000))]) == 0
        assert r.nic.counters.tx_dropped["oversize"] == 1
        r.pump()
        assert len(r.wire) == 3 and r.nic.journal.unconfirmed() == 0
        assert r.nic.engine.counters.tx_errors == {"bad_offload": 1}
    finally:
        r.close()


class FlakyBus:
    """The model's DMA bus, refusing one fetch of TX descriptor `index` once armed (a device
    that stops in the middle of a packet)."""

    def __init__(self, real, rig: Rig):
        self.real, self.rig, self.index, self.fired = real, rig, None, 0

    def dma_read(self, iova: int, length: int) -> bytes:
        mem = self.rig.nic.driver.rings
        if self.index is not None and mem is not None and iova == mem.tx_ring.iova + 16 * self.index:
            self.index = None
            self.fired += 1
            raise DmarFault(iova, length, False)
        return self.real.dma_read(iova, length)

    def dma_write(self, iova: int, data: bytes) -> None:
        self.real.dma_write(iova, data)


def test_recovery_mid_tso_loses_nothing(impl, variant) -> None:
    """The device stops after the context and a few data descriptors of a TSO packet (it
    holds half a packet); the TX-hang detector recovers, the ring is restarted and the whole
    journal re-issued: every byte reaches the wire, the half packet never does."""
    r = Rig(variant, impl)
    bus = FlakyBus(r.transport, r)
    r.model.attach(bus)
    try:
        first = payload_bytes(20000, 1)
        r.send([gso_tcp(first, seq=1)])
        assert len(r.wire) == 14
        bus.index = r.nic.engine.tx_next + 5                 # the 5th data descriptor of the next packet
        second, third = payload_bytes(64000, 2), payload_bytes(5000, 3)
        r.enqueue([gso_tcp(second, seq=20001, ident=100), gso_tcp(third, seq=84001, ident=200)])
        r.nic.xmit()
        r.nic.poll(0.0)
        assert bus.fired == 1 and len(r.wire) == 14 and r.nic.journal.unconfirmed() == 2
        assert not r.nic.check_tx_progress(time.monotonic() + 10)    # TX hang: recovered
        assert r.nic.counters.recoveries == 1
        r.pump()
        assert r.nic.journal.unconfirmed() == 0
        got = [parse_tcp_wire(w) for w in r.wire]
        assert all(d["ip_ok"] and d["tcp_ok"] for d in got)
        stream = {d["seq"]: d["payload"] for d in got}
        assert b"".join(stream[k] for k in sorted(stream)) == first + second + third
        assert len(r.wire) == 14 + 45 + 4                    # nothing twice: the half packet never left
    finally:
        r.close()


def test_lost_completion_of_a_tso_packet_is_reissued(impl) -> None:
    """The TSO packet went out but its DD never came back: after the recovery it is sent
    again (possible duplicates, counted), then confirmed; nothing is lost."""
    r = Rig("82540em", impl)
    try:
        data = payload_bytes(64000)
        r.model.faults.drop_tx_completions = 1
        r.enqueue([gso_tcp(data)])
        r.nic.xmit()
        r.nic.poll(0.0)
        assert len(r.wire) == 45 and r.nic.journal.unconfirmed() == 1
        r.nic.check_tx_progress(time.monotonic() + 10)
        r.pump()
        assert r.nic.journal.unconfirmed() == 0 and r.nic.journal.reissued == 1
        check_segmentation(r.wire[45:], data, 1448, 1000, 0x1234, ACK | PSH)
        assert r.wire[:45] == r.wire[45:]
    finally:
        r.close()


def test_fault_in_xmit_with_software_pieces_pending(impl) -> None:
    """An injected xmit fault while a large frame is being handed out piece by piece: the
    pieces are dropped with the ring, the journal frame re-issued whole."""
    r = Rig("82540em", impl, n_tx=8)
    try:
        data = payload_bytes(20000)
        r.enqueue([gso_tcp(data)])
        r.nic.xmit()
        r.nic.poll(0.0)
        assert r.nic.engine._pending
        r.nic.inject("xmit", "raise")
        r.pump()
        assert r.nic.counters.recoveries == 1 and r.nic.journal.unconfirmed() == 0
        d = [parse_tcp_wire(w) for w in r.wire]
        assert {x["seq"] for x in d} == {1000 + i * 1448 for i in range(14)}
        assert b"".join({x["seq"]: x["payload"] for x in d}[k] for k in sorted({x["seq"] for x in d})) == data
    finally:
        r.close()


def test_usb_driver_gets_finished_frames() -> None:
    """A driver without offloads (pegasus) fed vnet frames: the Nic finishes them in software
    before they reach the journal."""
    from udrv.drivers.pegasus import Pegasus
    from udrv.models.usb import ModelUsbTransport
    from udrv.models.pegasus import PegasusModel
    model = PegasusModel()
    wire: list[bytes] = []
    model.on_transmit = wire.append
    nic = Nic(Pegasus, ModelUsbTransport(model), lambda fr: None, NicOptions())
    try:
        assert nic.offloads == frozenset() and nic.journal.slot_size == 2048
        nic.bring_up()
        nic.open()
        data = payload_bytes(5000)
        h, f = gso_tcp(data)
        nic.enqueue([h.pack() + f], vnet_hdr_len=12)
        assert nic.journal.unconfirmed() == 4 and nic.counters.software_frames == 1
        for _ in range(40):
            nic.xmit()
            nic.poll(0.0)
        check_segmentation([bytes(w) for w in wire], data, 1448, 1000, 0x1234, ACK | PSH)
    finally:
        nic.close()


# --- a real TAP (root) ----------------------------------------------------------------------------------------------
SIOCETHTOOL = 0x8946


def _ethtool(ifname: str, buf: ctypes.Array) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(s, SIOCETHTOOL, struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0"))
    finally:
        s.close()


def ethtool_k(ifname: str) -> dict[str, bool]:
    """`ethtool -k`: feature names (ETHTOOL_GSTRINGS of ETH_SS_FEATURES) and their active bits
    (ETHTOOL_GFEATURES)."""
    info = ctypes.create_string_buffer(struct.pack("<IIQI", 0x37, 0, 1 << 4, 0))      # GSSET_INFO
    _ethtool(ifname, info)
    n = struct.unpack_from("<I", info, 16)[0]
    strings = ctypes.create_string_buffer(struct.pack("<III", 0x1B, 4, n) + bytes(32 * n))   # GSTRINGS
    _ethtool(ifname, strings)
    names = [strings.raw[12 + 32 * i:44 + 32 * i].split(b"\0")[0].decode() for i in range(n)]
    blocks = (n + 31) // 32
    feats = ctypes.create_string_buffer(struct.pack("<II", 0x3A, blocks) + bytes(16 * blocks))  # GFEATURES
    _ethtool(ifname, feats)
    return {name: bool(struct.unpack_from("<I", feats, 8 + 16 * (i // 32) + 8)[0] >> (i % 32) & 1)
            for i, name in enumerate(names)}


IFNAME = f"udrvo{os.getpid() % 100000}"


@pytest.mark.root
def test_real_tap_offloads_follow_the_driver() -> None:
    from udrv.drivers.pegasus import Pegasus
    from udrv.models.usb import ModelUsbTransport
    from udrv.models.pegasus import PegasusModel
    from udrv.tap import IFF_VNET_HDR, Tap
    for cls, want in ((E1000, True), (Pegasus, False)):
        tap = Tap(IFNAME)
        ifindex = tap.ifindex
        model = E1000Model("82574l") if cls is E1000 else PegasusModel()
        transport = ModelPciTransport(model) if cls is E1000 else ModelUsbTransport(model)
        nic = Nic(cls, transport, tap.write, NicOptions(n_rx=16, n_tx=64))
        try:
            k = ethtool_k(tap.name)
            assert k["tx-tcp-segmentation"] is want and k["tx-tcp6-segmentation"] is want
            assert k["tx-checksum-ip-generic"] is want
            assert bool(tap.tun_flags() & IFF_VNET_HDR) is want and tap.ifindex == ifindex
            assert nic.vnet_hdr_len == (12 if want else 0)
            if want:                               # the C ring writes RX frames with the header too
                assert getattr(nic.engine, "_r", None) is None or nic.engine._r.tap_vnet_hdr == 12
        finally:
            nic.close()
            tap.close()


@pytest.mark.root
@pytest.mark.parametrize("cls", IMPLS)
def test_real_tap_rx_frames_carry_a_zeroed_header(cls) -> None:
    """With IFF_VNET_HDR every write needs a header: frames the device receives reach the
    host's interface intact (seen by a packet socket), from the Python sink and from C."""
    from udrv.tap import Tap
    tap = Tap(IFNAME)
    model = E1000Model("82540em")
    transport = ModelPciTransport(model)
    nic = Nic(cls, transport, tap.write, NicOptions(n_rx=16, n_tx=64))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        assert tap.vnet_hdr_len == 12
        nic.bring_up()
        tap.set_mac(nic.mac)
        tap.set_up(True)
        nic.open()
        sock.bind((tap.name, 0))
        sock.settimeout(2)
        frames = [nic.mac + PEER + b"\x88\xb5" + payload_bytes(n, n) for n in (46, 100, 1486)]
        for f in frames:
            assert model.wire_receive(f)
        nic.poll(0.0)
        got = [sock.recv(2048) for _ in frames]
        assert got == frames and tap.write_errors == 0
    finally:
        sock.close()
        nic.close()
        transport.close()
        tap.close()


@pytest.mark.root
@pytest.mark.parametrize("cls", IMPLS)
def test_real_kernel_tcp_stream_through_tso(cls) -> None:
    """The host's own TCP stack over the TAP, the e1000 driver on the model, the model's wire
    into a peer namespace: GSO frames from the kernel leave as MSS segments that the peer's
    kernel accepts (it checks every checksum), and every byte arrives."""
    from udrv.daemon import Daemon
    from udrv.peer import PeerConfig, PeerWire, ip
    from udrv.tap import Tap
    name = f"udrvs{os.getpid() % 10000}"
    cfg = PeerConfig.for_interface(name)
    tap = Tap(name)
    model = E1000Model("82574l")
    transport = ModelPciTransport(model)
    peer = PeerWire(cfg)
    peer.connect(model)
    nic = Nic(cls, transport, tap.write, NicOptions())
    daemon = Daemon(nic, tap, extra_fds={peer.fd: peer.pump}, model=model)
    size = 4 << 20
    try:
        daemon.start()
        ip("addr", "add", cfg.host_ip, "dev", tap.name)
        t = threading.Thread(target=daemon.run, args=(30,), daemon=True)
        t.start()
        server = (f"import socket,hashlib;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                  f"s.bind(('{cfg.peer_addr}',5999));s.listen(1);c,_=s.accept();h=hashlib.sha256();n=0\n"
                  f"while True:\n d=c.recv(1<<20)\n if not d: break\n h.update(d);n+=len(d)\n"
                  f"print(n,h.hexdigest(),flush=True)")
        import subprocess
        import hashlib
        srv = subprocess.Popen(peer.netns_exec("python3", "-c", server), stdout=subprocess.PIPE, text=True)
        data = payload_bytes(size)
        for _ in range(100):
            try:
                c = socket.create_connection((cfg.peer_addr, 5999), timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        c.settimeout(60)
        c.sendall(data)
        c.close()
        out, _ = srv.communicate(timeout=60)
        n, digest = out.split()
        assert int(n) == size and digest == hashlib.sha256(data).hexdigest()
        st = nic.status()
        counts = nic.engine.report().tx_offload
        assert counts["tso"] > 0, counts                    # the kernel did send GSO frames
        assert st["tx_packets"] > counts["tso"]
    finally:
        daemon.stop()
        time.sleep(0.1)
        daemon.close()
        transport.close()
        peer.close()
        tap.close()


# --- the C software offloads of the USB rings (native/gso.c) against udrv.offload -------------------------
C_ONLY = pytest.mark.skipif(not fastpath.available(), reason=f"C fast path not built: {fastpath.why_unavailable()}")


def c_gso(h: VnetHdr, f: bytes) -> tuple[int, list[bytes]]:
    """(plan result, wire frames) from native/gso.c."""
    ffi, lib = fastpath.ffi, fastpath.lib
    g = ffi.new("struct udrv_gso *")
    rc = lib.udrv_gso_plan(h.pack(), f, len(f), g)
    if rc != lib.UDRV_GSO_OK:
        return rc, []
    out = ffi.new("uint8_t[]", 70000)
    wire = []
    for i in range(g.nseg):
        n = lib.udrv_gso_build(g, f, len(f), i, out, len(out))
        assert n > 0 and n <= g.wire_max
        wire.append(bytes(ffi.buffer(out, n)))
    assert lib.udrv_gso_build(g, f, len(f), g.nseg, out, len(out)) == -1
    return rc, wire


@C_ONLY
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size,mss", [(64000, 1448), (1448 * 3, 1448), (1449, 1448), (100, 1448), (9001, 536),
                                      (0, 1448)])
@pytest.mark.parametrize("vlan", [False, True], ids=["untagged", "vlan"])
def test_c_segmentation_is_byte_for_byte_the_software_one(ipv6: bool, size: int, mss: int, vlan: bool) -> None:
    data = payload_bytes(size, salt=size)
    h, f = gso_tcp(data, mss=mss, ipv6=ipv6, flags=ACK | PSH | FIN, seq=0xFFFFF000, ident=0xFFFE, vlan=vlan)
    rc, wire = c_gso(h, f)
    assert rc == fastpath.lib.UDRV_GSO_OK
    assert wire == offload.resolve(h, f)
    if size:
        check_segmentation(wire, data, mss, 0xFFFFF000, 0xFFFE, ACK | PSH | FIN, ipv6=ipv6)


@C_ONLY
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_c_checksum_fill_is_the_software_one(ipv6: bool) -> None:
    for n in (0, 1, 2, 3, 7, 8, 17, 31, 32, 33, 1400, 1472):
        h, f = csum_udp(payload_bytes(n, salt=n), ipv6=ipv6)
        rc, wire = c_gso(h, f)
        assert rc == fastpath.lib.UDRV_GSO_OK and wire == offload.resolve(h, f), n
    h, f = csum_tcp(payload_bytes(999))
    assert c_gso(h, f)[1] == offload.resolve(h, f)
    plain = f[:200]
    assert c_gso(VnetHdr(0, GSO_NONE, 0, 0, 0, 0), plain)[1] == [plain]      # asks for nothing


@C_ONLY
def test_c_plan_refuses_what_it_cannot_carry_out() -> None:
    lib = fastpath.lib
    h, f = gso_tcp(payload_bytes(5000))
    bad = [VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, len(f), 6),                # checksum start past the end
           VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, len(f)),                # field past the end
           VnetHdr(h.flags, h.gso_type, h.hdr_len, 0, h.csum_start, 16),     # gso_size 0
           VnetHdr(h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start + 4, 16),   # not the TCP header
           VnetHdr(h.flags, GSO_TCPV6, h.hdr_len, h.gso_size, h.csum_start, 16)]        # v6 GSO on IPv4
    for b in bad:
        assert c_gso(b, f)[0] == lib.UDRV_GSO_BAD, b
    assert c_gso(h, f[:50])[0] == lib.UDRV_GSO_BAD                           # ends inside the TCP header
    for other in (VnetHdr(h.flags, h.gso_type | GSO_ECN, h.hdr_len, h.gso_size, h.csum_start, 16),
                  VnetHdr(h.flags, GSO_UDP, h.hdr_len, h.gso_size, h.csum_start, 16),
                  VnetHdr(0, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, 16)):
        assert c_gso(other, f)[0] == lib.UDRV_GSO_UNSUPPORTED, other        # Python's software does these

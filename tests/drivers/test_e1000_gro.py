"""RX coalescing in the e1000 C ring ("GRO in the driver"), against the e1000 device model.

Frames go in on the model's wire; what the ring writes to a vnet-header TAP (here one end of a
SOCK_SEQPACKET pair: one message per write) is read back. A super-frame is segmented again
the way the host kernel's GSO would (udrv.offload.resolve), and the result must be exactly
the frames that were received: same bytes, same order. Frames are built here with their own
checksum code, not the driver's."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from udrv import fastpath, offload
from udrv.drivers.e1000 import E1000
from udrv.models.e1000 import E1000Model
from udrv.models.pci import ModelPciTransport
from udrv.nic import Nic, NicOptions

E1000Native = E1000.c_variant()     # the same driver on the C ring

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")

MODEL_MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("02aabbccdd01")
SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
ACK, PSH, FIN, RST, URG = 0x10, 0x08, 0x01, 0x04, 0x20
MSS = 1448
TS = b"\x01\x01\x08\x0a" + (1000).to_bytes(4, "big") + (2000).to_bytes(4, "big")   # NOP NOP timestamps


def csum(data: bytes) -> int:
    """Ones' complement sum, folded (plain loop: independent of the code under test)."""
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp4(seq: int, payload: bytes, *, flags: int = ACK, ip_id: int = 0, sport: int = 40000,
         dport: int = 5201, ack: int = 7777, window: int = 502, opts: bytes = TS, ipopts: bytes = b"",
         src: bytes = SRC, bad_tcp_csum: bool = False, urg: int = 0) -> bytes:
    thl = 20 + len(opts)
    th = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, (thl // 4) << 4, flags,
                               window, 0, urg) + opts)
    seg = bytes(th) + payload
    pseudo = src + DST + struct.pack("!BBH", 0, 6, len(seg))
    c = ~csum(pseudo + seg) & 0xFFFF
    if bad_tcp_csum:
        c ^= 0x0101
    th[16:18] = c.to_bytes(2, "big")
    ihl = 20 + len(ipopts)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + thl + len(payload), ip_id & 0xFFFF,
                               0x4000, 64, 6, 0, src, DST) + ipopts)
    ip[10:12] = (~csum(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    return MODEL_MAC + PEER + b"\x08\x00" + bytes(ip) + bytes(th) + payload


def stream(n: int, *, seq0: int = 1_000_000, id0: int = 100, size: int = MSS, psh: bool = True,
           **kw) -> list[bytes]:
    """n full segments of one flow, in order, PSH on the last (what a sender's GSO makes)."""
    out = []
    for k in range(n):
        payload = bytes((seq0 + k * 7 + i) & 0xFF for i in range(size))
        last = psh and k == n - 1
        out.append(tcp4(seq0 + k * size, payload, ip_id=id0 + k, flags=ACK | (PSH if last else 0), **kw))
    return out


class FakeTap:
    """What the daemon passes as the sink: a TAP's bound write(), with a 12-byte vnet header."""
    vnet_hdr_len = 12

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def write(self, f: bytes) -> None:
        os.write(self.fd, bytes(12) + f)


class TapRig:
    def __init__(self, n_rx: int = 128):
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.b.setblocking(False)
        self.model = E1000Model("82540em")
        self.transport = ModelPciTransport(self.model)
        self.nic = Nic(E1000Native, self.transport, FakeTap(self.a.fileno()).write,
                       NicOptions(n_rx=n_rx, n_tx=8))
        self.nic.bring_up()
        self.nic.open()
        assert self.nic.engine.caps.reads_tap and self.nic.engine._r.tap_vnet_hdr == 12

    def receive(self, frames: list[bytes]) -> list[tuple[bytes, bytes]]:
        """All frames on the wire first, then one poll: one harvest sees them all."""
        for f in frames:
            assert self.model.wire_receive(f)
        self.nic.poll(0.0)
        got = []
        while True:
            try:
                m = self.b.recv(1 << 17)
            except BlockingIOError:
                return got
            got.append((m[:12], m[12:]))

    def counts(self) -> dict[str, int]:
        return self.nic.status()["rx_coalesce"]

    def close(self) -> None:
        self.nic.close()
        self.transport.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def rig():
    r = TapRig()
    yield r
    r.close()


def unfold(got: list[tuple[bytes, bytes]]) -> tuple[list[bytes], list[int]]:
    """The wire frames the host would see (super-frames segmented again), and how many
    segments each written message carried."""
    frames, sizes = [], []
    for hdr, f in got:
        if hdr == bytes(12):
            frames.append(f)
            sizes.append(1)
            continue
        h = offload.VnetHdr.parse(hdr)
        assert h.gso_type in (offload.GSO_TCPV4, offload.GSO_TCPV6) and h.needs_csum
        segs = offload.resolve(h, f)
        frames += segs
        sizes.append(len(segs))
    return frames, sizes


def test_in_order_stream_is_one_super_frame(rig):
    sent = stream(40)
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [40]
    assert len(got[0][1]) == 14 + 20 + 32 + 40 * MSS
    c = rig.counts()
    assert (c["on"], c["segments"], c["super_frames"], c["bad_checksum"]) == (1, 40, 1, 0)
    assert rig.nic.status()["rx_packets"] == 40


def test_super_frame_vnet_header_and_headers(rig):
    sent = stream(5, seq0=0xFFFFF000)                 # the sequence number wraps inside
    (hdr, f), = rig.receive(sent)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_off, nbuf = struct.unpack("<BBHHHHH", hdr)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_off, nbuf) == (1, 1, 66, MSS, 34, 16, 0)
    ip, th = f[14:34], f[34:66]
    assert f[:14] == sent[0][:14]
    assert int.from_bytes(ip[2:4], "big") == 20 + 32 + 5 * MSS
    assert ip[4:6] == sent[0][18:20]                  # the first segment's id
    assert csum(ip) == 0xFFFF                         # a valid IPv4 header checksum
    assert th[4:8] == sent[0][38:42] and th[13] == ACK | PSH
    # the TCP checksum field holds the pseudo-header sum (length of the whole), not complemented
    pseudo = csum(SRC + DST + struct.pack("!BBH", 0, 6, 32 + 5 * MSS))
    assert int.from_bytes(th[16:18], "big") == pseudo
    # ... so completing it over the whole gives a valid checksum (what a forwarder's NIC does)
    whole = bytearray(f[34:])
    whole[16:18] = (~csum(bytes(whole)) & 0xFFFF).to_bytes(2, "big")
    assert csum(SRC + DST + struct.pack("!BBH", 0, 6, len(whole)) + bytes(whole)) == 0xFFFF
    assert f[66:] == b"".join(s[66:] for s in sent)


def test_sequence_gap_splits(rig):
    sent = stream(10) + stream(10, seq0=1_000_000 + 11 * MSS, id0=110)    # one segment missing
    frames, sizes = unfold(rig.receive(sent))
    assert frames == sent and sizes == [10, 10]


def test_out_of_order_segment_is_not_merged(rig):
    s = stream(6)
    sent = [s[0], s[1], s[3], s[2], s[4], s[5]]
    frames, sizes = unfold(rig.receive(sent))
    assert frames == sent and sum(sizes) == 6 and max(sizes) <= 2


@pytest.mark.parametrize("flag,urg", [(FIN, 0), (RST, 0), (URG, 5), (0x02, 0), (0x80, 0)],
                         ids=["fin", "rst", "urg", "syn", "cwr"])
def test_other_flags_end_the_run_and_pass_unchanged(rig, flag, urg):
    s = stream(8)
    odd = tcp4(1_000_000 + 4 * MSS, s[4][66:], ip_id=104, flags=ACK | flag, urg=urg)
    sent = s[:4] + [odd] + s[5:]
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [4, 1, 3]
    assert got[1] == (bytes(12), odd)


def test_interleaved_flows_keep_their_order(rig):
    a, b = stream(6), stream(6, sport=40001, seq0=5_000_000, id0=900)
    sent = [f for pair in zip(a, b) for f in pair]
    frames, _ = unfold(rig.receive(sent))
    assert frames == sent


def test_flows_one_after_another_each_merge(rig):
    a, b = stream(6), stream(6, sport=40001, seq0=5_000_000, id0=900)
    frames, sizes = unfold(rig.receive(a + b))
    assert frames == a + b and sizes == [6, 6]


def test_changed_options_split(rig):
    ts2 = TS[:4] + (1001).to_bytes(4, "big") + TS[8:]
    sent = stream(4, id0=100)[:3] + [tcp4(1_000_000 + 3 * MSS, bytes(MSS), ip_id=103, opts=ts2)]
    sent += [tcp4(1_000_000 + 4 * MSS, bytes(range(200)), ip_id=104, opts=ts2)]
    frames, sizes = unfold(rig.receive(sent))
    assert frames == sent and sizes == [3, 2]


@pytest.mark.parametrize("field", ["ack", "window", "ttl", "dst_mac"])
def test_other_header_changes_split(rig, field):
    s = stream(6)
    k = 3
    kw = {"ack": {"ack": 7778}, "window": {"window": 503}}.get(field, {})
    f = bytearray(tcp4(1_000_000 + k * MSS, s[k][66:], ip_id=100 + k, **kw))
    if field == "ttl":
        f[22] = 63
        f[24:26] = b"\0\0"
        f[24:26] = (~csum(bytes(f[14:34])) & 0xFFFF).to_bytes(2, "big")
    if field == "dst_mac":
        f[0:6] = b"\xff" * 6
    sent = s[:k] + [bytes(f)] + s[k + 1:]
    frames, sizes = unfold(rig.receive(sent))
    assert frames == sent and sizes == [3, 1, 2]      # the changed one does not lead the rest either


def test_bad_tcp_checksum_reaches_the_host_unchanged(rig):
    s = stream(7)
    bad = tcp4(1_000_000 + 3 * MSS, s[3][66:], ip_id=103, bad_tcp_csum=True)
    sent = s[:3] + [bad] + s[4:]
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [3, 1, 3]
    assert got[1] == (bytes(12), bad)                 # no offload header: the host checks and drops it
    assert rig.counts()["bad_checksum"] == 1



@pytest.mark.parametrize("last", [1, 2, 3, 5, 7, 9, 31, 33, 999, 1001, 1447])
def test_checksums_of_every_length_tail(rig, last):
    """The last segment's length leaves every possible tail for the checksum code: a right
    checksum merges, a wrong one (in the last byte) does not."""
    s = stream(3, psh=False)
    tail = tcp4(1_000_000 + 3 * MSS, bytes((7 * i + last) & 0xFF for i in range(last)), ip_id=103)
    frames, sizes = unfold(rig.receive(s + [tail]))
    assert frames == s + [tail] and sizes == [4]
    bad = bytearray(tcp4(1_000_000 + 3 * MSS + last + 10 * MSS, bytes(last), ip_id=104))
    bad[-1] ^= 0x5A
    s2 = stream(2, seq0=1_000_000 + 3 * MSS + last + 8 * MSS, id0=102, psh=False)
    assert unfold(rig.receive(s2 + [bytes(bad)])) == (s2 + [bytes(bad)], [2, 1])


def test_bad_ipv4_header_checksum_is_not_merged(rig):
    s = stream(5)
    bad = bytearray(s[2])
    bad[24] ^= 0xFF
    sent = s[:2] + [bytes(bad)] + s[3:]
    frames, sizes = unfold(rig.receive(sent))
    assert frames == sent and sizes == [2, 1, 2]


def test_ipv4_options_are_not_merged(rig):
    nop4 = b"\x01\x01\x01\x00"
    sent = [tcp4(1_000_000 + k * 1000, bytes(1000), ip_id=100 + k, ipopts=nop4) for k in range(4)]
    got = rig.receive(sent)
    assert got == [(bytes(12), f) for f in sent]


def test_fragments_and_non_tcp_are_not_merged(rig):
    frag = bytearray(tcp4(1_000_000, bytes(MSS), ip_id=100))
    frag[20] |= 0x20                                   # more fragments
    frag[24:26] = b"\0\0"
    frag[24:26] = (~csum(bytes(frag[14:34])) & 0xFFFF).to_bytes(2, "big")
    udp = bytearray(tcp4(1_000_000, bytes(MSS), ip_id=101))
    udp[23] = 17
    arp = MODEL_MAC + PEER + b"\x08\x06" + bytes(46)
    sent = [bytes(frag), bytes(frag), bytes(udp), bytes(udp), arp, arp]
    assert rig.receive(sent) == [(bytes(12), f) for f in sent]


def test_short_segment_ends_the_run_and_pure_acks_pass(rig):
    s = stream(3, psh=False)
    short = tcp4(1_000_000 + 3 * MSS, bytes(500), ip_id=103)
    after = tcp4(1_000_000 + 3 * MSS + 500, bytes(MSS), ip_id=104)
    after2 = tcp4(1_000_000 + 4 * MSS + 500, bytes(MSS), ip_id=105)
    pure_ack = tcp4(1_000_000 + 5 * MSS + 500, b"", ip_id=106)
    sent = s + [short, after, after2, pure_ack]
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [4, 2, 1]
    assert got[2] == (bytes(12), pure_ack)


def test_ip_id_must_advance_by_one(rig):
    s = stream(4)
    jump = tcp4(1_000_000 + 4 * MSS, bytes(MSS), ip_id=200)
    frames, sizes = unfold(rig.receive(s[:3] + [tcp4(1_000_000 + 3 * MSS, s[3][66:], ip_id=103), jump]))
    assert sizes == [4, 1]


def test_at_most_64_kib_per_super_frame():
    r = TapRig(n_rx=256)
    try:
        sent = stream(100)
        frames, sizes = unfold(r.receive(sent))
        assert frames == sent and sum(sizes) == 100 and max(sizes) == 45   # 20 + 32 + 45 * 1448 < 65536
        assert all(len(f) <= 14 + 65535 for _, f in r.receive(stream(60, seq0=1_000_000 + 100 * MSS, id0=200)))
    finally:
        r.close()


def test_nothing_is_held_across_polls(rig):
    s = stream(6)
    first = rig.receive(s[:3])
    second = rig.receive(s[3:])
    assert unfold(first) == (s[:3], [3]) and unfold(second) == (s[3:], [3])


def test_off_without_a_vnet_header():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    class PlainTap:
        vnet_hdr_len = 0

        def fileno(self):
            return a.fileno()

        def write(self, f):
            os.write(a.fileno(), f)

    model = E1000Model("82540em")
    transport = ModelPciTransport(model)
    nic = Nic(E1000Native, transport, PlainTap().write, NicOptions(n_rx=64, n_tx=8))
    try:
        nic.bring_up()
        nic.open()
        sent = stream(5)
        for f in sent:
            model.wire_receive(f)
        nic.poll(0.0)
        b.setblocking(False)
        got = [b.recv(65536) for _ in range(5)]
        assert got == sent and nic.status()["rx_coalesce"]["on"] == 0
    finally:
        nic.close()
        transport.close()
        a.close()
        b.close()


SRC6, DST6 = bytes.fromhex("fd000000000000000000000000000001"), bytes.fromhex("fd000000000000000000000000000002")


def tcp6(seq: int, payload: bytes, *, flags: int = ACK, hop: int = 64, opts: bytes = TS,
         next_header: int = 6) -> bytes:
    thl = 20 + len(opts)
    th = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq & 0xFFFFFFFF, 7777, (thl // 4) << 4, flags,
                               502, 0, 0) + opts)
    seg = bytes(th) + payload
    th[16:18] = (~csum(SRC6 + DST6 + struct.pack("!IxxxB", len(seg), 6) + seg) & 0xFFFF).to_bytes(2, "big")
    ip = struct.pack("!IHBB16s16s", 6 << 28 | 0x12345, len(seg), next_header, hop, SRC6, DST6)
    return MODEL_MAC + PEER + b"\x86\xdd" + ip + bytes(th) + payload


def stream6(n: int, seq0: int = 3_000_000, size: int = MSS - 20) -> list[bytes]:
    return [tcp6(seq0 + k * size, bytes((k + i) & 0xFF for i in range(size)),
                 flags=ACK | (PSH if k == n - 1 else 0)) for k in range(n)]


def test_ipv6_stream_is_one_super_frame(rig):
    sent = stream6(20)
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [20]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_off = struct.unpack_from("<BBHHHH", got[0][0])
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_off) == (1, 4, 86, MSS - 20, 54, 16)
    assert int.from_bytes(got[0][1][18:20], "big") == 32 + 20 * (MSS - 20)


def test_ipv6_hop_limit_change_and_bad_checksum_split(rig):
    s = stream6(8)
    hop = tcp6(3_000_000 + 2 * (MSS - 20), s[2][86:], hop=63)
    bad = bytearray(s[5])
    bad[-1] ^= 0xFF
    sent = s[:2] + [hop] + s[3:5] + [bytes(bad)] + s[6:]
    got = rig.receive(sent)
    frames, sizes = unfold(got)
    assert frames == sent and sizes == [2, 1, 2, 1, 2]
    assert got[3] == (bytes(12), bytes(bad)) and rig.counts()["bad_checksum"] == 1


def test_ipv6_extension_headers_are_not_merged(rig):
    sent = [tcp6(3_000_000 + k * 1000, bytes(1000), next_header=0) for k in range(3)]   # hop-by-hop
    assert rig.receive(sent) == [(bytes(12), f) for f in sent]


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a TAP needs root")
def test_the_kernel_tap_takes_a_super_frame():
    """The host kernel accepts what the ring writes: one packet of the whole length, no drop."""
    from udrv.tap import Tap
    tap = Tap(f"ugro{os.getpid() % 100000}", offloads={"csum", "tso4"})
    model = E1000Model("82540em")
    transport = ModelPciTransport(model)
    nic = Nic(E1000Native, transport, tap.write, NicOptions(n_rx=64, n_tx=8))
    stat = lambda k: int(open(f"/sys/class/net/{tap.name}/statistics/{k}").read())  # noqa: E731
    try:
        tap.set_up(True)
        nic.bring_up()
        nic.open()
        assert nic.engine._r.tap_fd == tap.fd and nic.engine._r.tap_vnet_hdr == 12
        sent = stream(30)
        for f in sent:
            model.wire_receive(f)
        nic.poll(0.0)
        assert nic.status()["rx_coalesce"]["super_frames"] == 1
        assert (stat("rx_packets"), stat("rx_bytes"), stat("rx_dropped")) == (1, 66 + 30 * MSS, 0)
        for f in stream6(20):
            model.wire_receive(f)
        nic.poll(0.0)
        assert (stat("rx_packets"), stat("rx_dropped")) == (2, 0)
        assert stat("rx_bytes") == 66 + 30 * MSS + 86 + 20 * (MSS - 20)
        assert nic.status()["rx_coalesce"]["refused"] == 0 and nic.status()["rx_coalesce"]["super_frames"] == 2
    finally:
        nic.close()
        transport.close()
        tap.close()


def test_the_operator_can_turn_rx_coalescing_off(monkeypatch):
    from udrv.fastpath import rx_coalesce_allowed
    assert rx_coalesce_allowed(12) and not rx_coalesce_allowed(0)      # no vnet header: nothing to say GSO with
    monkeypatch.setenv("UDRV_RX_COALESCE", "0")
    assert not rx_coalesce_allowed(12)


# --- ACK filtering: of consecutive cumulative ACKs of one flow, the newest goes up ----------------------

def acks(n: int, *, ack0: int = 5_000_000, step: int = 2 * MSS, **kw) -> list[bytes]:
    """n pure ACKs of one flow, each acknowledging two more segments (a receiver's delayed ACKs)."""
    return [tcp4(777, b"", ip_id=300 + k, ack=(ack0 + k * step) & 0xFFFFFFFF, **kw) for k in range(n)]


def test_consecutive_acks_of_a_flow_go_up_as_the_newest_one(rig):
    sent = acks(20)
    assert rig.receive(sent) == [(bytes(12), sent[-1])]
    assert rig.counts()["acks_merged"] == 19
    assert rig.nic.status()["rx_packets"] == 20           # every frame was received and counted


def test_acks_without_timestamps_and_ipv4_wraparound_merge(rig):
    sent = acks(3, ack0=0xFFFFFFFF - MSS, opts=b"")       # the ack number wraps past 2**32
    assert rig.receive(sent) == [(bytes(12), sent[-1].ljust(60, b"\0"))]   # as the wire padded it
    assert rig.counts()["acks_merged"] == 2


def test_duplicate_acks_all_go_up(rig):
    first = acks(2)
    dup = [tcp4(777, b"", ip_id=400 + k, ack=5_000_000 + 2 * MSS) for k in range(3)]   # fast retransmit's cue
    sent = first + dup
    got = rig.receive(sent)
    assert [f for _, f in got] == [first[1]] + dup        # the ACK they repeat and every repeat
    assert rig.counts()["acks_merged"] == 1


@pytest.mark.parametrize("what", ["sack", "flags", "payload", "ce", "bad_csum", "window_only"])
def test_acks_that_carry_more_than_a_cumulative_ack_are_kept(rig, what):
    older = tcp4(777, b"", ip_id=500, ack=5_000_000)
    newer_ack = 5_000_000 + 2 * MSS
    if what == "sack":
        sack = b"\x01\x01\x05\x0a" + (6_000_000).to_bytes(4, "big") + (6_001_448).to_bytes(4, "big")
        newer = tcp4(777, b"", ip_id=501, ack=newer_ack, opts=sack)
    elif what == "flags":
        newer = tcp4(777, b"", ip_id=501, ack=newer_ack, flags=ACK | FIN)
    elif what == "payload":
        newer = tcp4(777, bytes(10), ip_id=501, ack=newer_ack)
    elif what == "ce":
        f = bytearray(tcp4(777, b"", ip_id=501, ack=newer_ack))
        f[15] |= 3                                         # ECN CE in the IPv4 TOS byte
        f[24:26] = b"\0\0"
        f[24:26] = (~csum(bytes(f[14:34])) & 0xFFFF).to_bytes(2, "big")
        newer = bytes(f)
    elif what == "bad_csum":
        newer = tcp4(777, b"", ip_id=501, ack=newer_ack, bad_tcp_csum=True)
    else:                                                  # same ack number, a larger window: a window update
        newer = tcp4(777, b"", ip_id=501, ack=5_000_000, window=900)
    got = rig.receive([older, newer])
    assert [f for _, f in got] == [older, newer]
    assert rig.counts()["acks_merged"] == 0


def test_acks_of_other_flows_or_between_data_keep_their_place(rig):
    a = acks(2)
    b = acks(2, sport=40001)
    data = stream(2, seq0=9_000_000, id0=900, sport=40002)
    sent = [a[0], b[0], a[1], b[1]] + data + acks(2, ack0=7_000_000)
    got = [f for _, f in rig.receive(sent)]
    assert got[:4] == [a[0], b[0], a[1], b[1]]             # alternating flows: nothing merged
    assert got[-1] == acks(2, ack0=7_000_000)[-1] and len(got) == 6   # data as one super-frame, then one ACK


def test_operator_switch_turns_ack_filtering_off_with_coalescing(monkeypatch):
    monkeypatch.setenv("UDRV_RX_COALESCE", "0")
    r = TapRig()
    try:
        sent = acks(5)
        assert [f for _, f in r.receive(sent)] == sent
    finally:
        r.close()

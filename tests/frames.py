"""Frames built independently of udrv (their own checksum, header layouts as literals from
RFC 791/793/8200 and the virtio spec 5.1.6), and a stand-in TAP; shared by the test areas.
A test that reused udrv.offload's code would agree with its bugs."""
from __future__ import annotations

import socket
import struct

from udrv.offload import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, F_NEEDS_CSUM, VnetHdr

PEER = bytes.fromhex("02aabbccdd01")
MODEL_MAC = bytes.fromhex("525400123456")
SRC4, DST4 = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])
SRC6 = bytes.fromhex("fd00000000000000000000000000000a")
DST6 = bytes.fromhex("fd00000000000000000000000000000b")
ACK, PSH, FIN, CWR = 0x10, 0x08, 0x01, 0x80


# --- an independent checksum and frame builders -------------------------------------------------------
def inet_sum(data: bytes) -> int:
    """RFC 1071, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip4_header(total: int, ident: int, proto: int, flags_frag: int = 0x4000) -> bytearray:
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, flags_frag, 64, proto, 0, SRC4, DST4))
    h[10:12] = struct.pack("!H", ~inet_sum(bytes(h)) & 0xFFFF)
    return h


def ip6_header(payload: int, nh: int) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, payload, nh, 64, SRC6, DST6)


def pseudo(ipv6: bool, proto: int, length: int) -> bytes:
    if ipv6:
        return SRC6 + DST6 + struct.pack("!IxxxB", length, proto)
    return SRC4 + DST4 + struct.pack("!xBH", proto, length)


def tcp_header(seq: int, flags: int) -> bytearray:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)        # NOP NOP timestamps
    return bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 777, 8 << 4, flags, 65000, 0, 0) + opts)


def payload_bytes(n: int, salt: int = 0) -> bytes:
    return bytes((i * 7 + salt + (i >> 8)) & 0xFF for i in range(n))


def gso_tcp(payload: bytes, mss: int = 1448, ipv6: bool = False, seq: int = 1000, flags: int = ACK | PSH,
            ident: int = 0x1234, ecn: bool = False, vlan: bool = False) -> tuple[VnetHdr, bytes]:
    """A GSO frame as the kernel hands it to a TAP: headers for the whole stream, the TCP
    checksum field holding the pseudo-header sum (with the full length), NEEDS_CSUM."""
    tcp = tcp_header(seq, flags)
    l4_len = len(tcp) + len(payload)
    eth = PEER + MODEL_MAC + (b"\x81\x00\x00\x05" if vlan else b"")
    if ipv6:
        l3 = ip6_header(l4_len, 6)
        eth += b"\x86\xdd"
    else:
        l3 = bytes(ip4_header(20 + l4_len, ident, 6))
        eth += b"\x08\x00"
    tcp[16:18] = struct.pack("!H", inet_sum(pseudo(ipv6, 6, l4_len)))
    frame = eth + l3 + bytes(tcp) + payload
    start = len(eth) + len(l3)
    gso = (GSO_TCPV6 if ipv6 else GSO_TCPV4) | (GSO_ECN if ecn else 0)
    return VnetHdr(F_NEEDS_CSUM, gso, start + len(tcp), mss, start, 16), frame


def csum_udp(payload: bytes, ipv6: bool = False) -> tuple[VnetHdr, bytes]:
    udp_len = 8 + len(payload)
    if ipv6:
        l3, et = ip6_header(udp_len, 17), b"\x86\xdd"
    else:
        l3, et = bytes(ip4_header(20 + udp_len, 99, 17)), b"\x08\x00"
    udp = struct.pack("!HHHH", 5353, 7777, udp_len, inet_sum(pseudo(ipv6, 17, udp_len)))
    frame = PEER + MODEL_MAC + et + l3 + udp + payload
    return VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 14 + len(l3), 6), frame


def csum_tcp(payload: bytes, seq: int = 5) -> tuple[VnetHdr, bytes]:
    h, f = gso_tcp(payload, seq=seq)
    return VnetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, h.csum_start, 16), f


# --- an independent view of wire frames ------------------------------------------------------------------
def parse_tcp_wire(f: bytes) -> dict:
    off = 12
    while f[off:off + 2] == b"\x81\x00":
        off += 4
    et, l3 = f[off:off + 2], off + 2
    d: dict = {"len": len(f)}
    if et == b"\x08\x00":
        ihl = (f[l3] & 0xF) * 4
        d.update(ipv6=False, tot_len=struct.unpack_from("!H", f, l3 + 2)[0],
                 ident=struct.unpack_from("!H", f, l3 + 4)[0], frag=struct.unpack_from("!H", f, l3 + 6)[0],
                 ip_ok=inet_sum(f[l3:l3 + ihl]) == 0xFFFF)
        l4 = l3 + ihl
        ip_end = l3 + d["tot_len"]
    else:
        d.update(ipv6=True, plen=struct.unpack_from("!H", f, l3 + 4)[0], ip_ok=True)
        l4 = l3 + 40
        ip_end = l4 + d["plen"]
    doff = (f[l4 + 12] >> 4) * 4
    seg = f[l4:ip_end]
    d.update(seq=struct.unpack_from("!I", f, l4 + 4)[0], flags=f[l4 + 13],
             tcp_ok=inet_sum(pseudo(d["ipv6"], 6, len(seg)) + seg) == 0xFFFF,
             payload=f[l4 + doff:ip_end], padding=f[ip_end:])
    return d


def check_segmentation(wire: list[bytes], payload: bytes, mss: int, seq0: int, id0: int, flags: int,
                       ipv6: bool = False, ecn: bool = False) -> None:
    """The wire frames are exactly what segmenting the stream into mss-sized pieces gives."""
    n = -(-len(payload) // mss)
    assert len(wire) == n, (len(wire), n)
    got = b""
    for i, f in enumerate(wire):
        d = parse_tcp_wire(f)
        assert d["ipv6"] == ipv6
        assert d["ip_ok"] and d["tcp_ok"], (i, d["ip_ok"], d["tcp_ok"])
        assert len(d["payload"]) == min(mss, len(payload) - i * mss)
        assert d["seq"] == (seq0 + i * mss) & 0xFFFFFFFF
        if not ipv6:
            assert d["ident"] == (id0 + i) & 0xFFFF
            assert d["tot_len"] == len(f) - 14 - (4 if f[12:14] == b"\x81\x00" else 0)
            assert d["frag"] == 0x4000                       # DF kept, no fragments
        else:
            assert d["plen"] == len(f) - 14 - 40 - (4 if f[12:14] == b"\x81\x00" else 0)
        want = flags if i == n - 1 else flags & ~(FIN | PSH)
        if ecn and i > 0:
            want &= ~CWR
        assert d["flags"] == want, (i, hex(d["flags"]), hex(want))
        got += d["payload"]
    assert got == payload


# --- the virtio-net header ----------------------------------------------------------------------------------


def mixed_items() -> list[tuple[VnetHdr | None, bytes]]:
    udp_h, udp_f = csum_udp(payload_bytes(4000, 5))
    return [gso_tcp(payload_bytes(20000, 1), vlan=True, flags=ACK | PSH | FIN),
            gso_tcp(payload_bytes(9000, 2), ipv6=True, mss=1200),
            gso_tcp(payload_bytes(7000, 3), ecn=True, flags=ACK | CWR),
            csum_udp(payload_bytes(33)), csum_udp(payload_bytes(500), ipv6=True),
            (VnetHdr(F_NEEDS_CSUM, GSO_UDP, 0, 1480, udp_h.csum_start, 6), udp_f),
            (None, PEER + MODEL_MAC + b"\x88\xb5" + payload_bytes(46)),
            (VnetHdr(flags=2), PEER + MODEL_MAC + b"\x88\xb5" + payload_bytes(1500)),   # DATA_VALID only
            csum_tcp(payload_bytes(1))]


def plain(n: int, size: int = 60) -> bytes:
    return MODEL_MAC + PEER + b"\x88\xb5" + struct.pack("!I", n) + payload_bytes(size - 18, n)


class FakeTap:
    """What the daemon's sink is bound to: a Tap with an fd (here a socketpair end)."""

    def __init__(self, vnet: bool):
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.sock, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)
        self.name = "faketap"
        self.vnet_hdr_len = 12 if vnet else 0
        self.vnet = vnet
        self.offloads: frozenset[str] = frozenset()

    def set_offloads(self, offloads) -> None:
        self.offloads = frozenset(offloads) if self.vnet else frozenset()
        self.vnet_hdr_len = 12 if self.offloads else 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, frame: bytes) -> None:
        self.sock.send((b"\0" * self.vnet_hdr_len) + frame)

    def inject(self, frames: list[bytes]) -> None:
        for f in frames:
            self.peer.send(f)

    def left_in_fd(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()
        self.peer.close()

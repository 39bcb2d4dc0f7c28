"""Transmit offloads: the virtio-net header a TAP puts in front of each frame, and the software
that does what a NIC's offload engine would when the implementation in use cannot.

With IFF_VNET_HDR and TUNSETOFFLOAD the kernel stops segmenting and checksumming for us: a
TCP stream arrives as 64 KiB "GSO" frames plus a small header saying what is still to be done
(virtio spec 1.x, 5.1.6, `struct virtio_net_hdr`; little-endian on the TAP by default here):

    flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16
    [| num_buffers u16]   (the 12-byte form udrv asks for with TUNSETVNETHDRSZ)

  NEEDS_CSUM: the 16-bit ones' complement sum of bytes csum_start..end, complemented, goes at
              csum_start + csum_offset; that field already holds the pseudo-header sum.
  gso_type:   TCPV4 / TCPV6 (segment into gso_size-byte TCP payloads), UDP (IPv4 fragments),
              ECN flag (CWR only on the first segment).
  hdr_len:    only a hint (Linux puts the skb's linear length there); udrv re-derives the
              header length from the frame itself.

What is here, device-independent:
  * `VnetHdr` (parse/pack), the flag and type values;
  * `locate()` (where L3/L4 sit in a frame, behind VLAN tags and IPv6 extension headers),
    `plan()` (what a frame asks of a transmit engine, as offsets a NIC context can use);
  * the software path: `resolve()` turns one journaled frame + header into the finished wire
    frames (segmentation, IPv4 ids/lengths, TCP sequence/flags, every checksum), so
    correctness never depends on the device (e.g. after a swap to an implementation without
    TSO); `tso_prepare()` makes the header edits an Intel-style TSO engine expects.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from .errors import UdrvError

# --- the virtio-net header ------------------------------------------------------------------------
VNET_HDR_LEN = 12            # what udrv asks the TAP for: virtio 1.x's header (with num_buffers)
VNET_HDR_MIN = 10            # legacy struct virtio_net_hdr

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3                  # UFO: the datagram goes out as IPv4 fragments
GSO_TCPV6 = 4
GSO_UDP_L4 = 5               # USO (not requested by udrv; only software handles it)
GSO_ECN = 0x80

# the offload names a driver may declare (class attribute `offloads`)
CSUM, TSO4, TSO6 = "csum", "tso4", "tso6"
KNOWN = frozenset({CSUM, TSO4, TSO6})
SOFTWARE = "software"        # plan() for what no device here does (ECN, UFO, USO)

_HDR = struct.Struct("<BBHHHH")


class OffloadError(UdrvError):
    """A frame whose header asks for something impossible (offsets outside the frame, a GSO
    type for another protocol, ...): it cannot be sent correctly and is dropped, counted."""


@dataclass(slots=True)         # not frozen: a frozen dataclass's __init__ costs 3x per frame
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> "VnetHdr":
        if len(data) < VNET_HDR_MIN:
            raise OffloadError(f"a virtio-net header has at least {VNET_HDR_MIN} bytes, got {len(data)}")
        return cls(*_HDR.unpack_from(data, 0))

    def pack(self, size: int = VNET_HDR_LEN) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                         self.csum_offset).ljust(size, b"\0")

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        return self.gso_type & ~GSO_ECN

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & GSO_ECN)

    @property
    def plain(self) -> bool:
        """Nothing left to do: the frame can go out as it is."""
        return not self.needs_csum and self.gso == GSO_NONE


ZERO_HDR = VnetHdr().pack()      # what goes in front of every frame written to such a TAP


def tun_offload_flags(offloads: Iterable[str]) -> int:
    """TUNSETOFFLOAD bits for a set of offload names (TSO is refused by the kernel without
    CSUM, so it is only asked for together with it)."""
    names = set(offloads)
    if CSUM not in names:
        return 0
    bits = 0x01                          # TUN_F_CSUM
    if TSO4 in names:
        bits |= 0x02                     # TUN_F_TSO4
    if TSO6 in names:
        bits |= 0x04                     # TUN_F_TSO6
    return bits


# --- where the headers are ------------------------------------------------------------------------
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
IPPROTO_TCP, IPPROTO_UDP = 6, 17
_IPV6_EXT = {0: "hop-by-hop", 43: "routing", 60: "destination options", 44: "fragment"}


@dataclass(slots=True)
class Layout:
    """Offsets of one frame's headers."""
    l3: int            # IP header
    ipv4: bool
    l4: int            # transport header
    proto: int         # IPPROTO_*
    hdr_len: int       # through the transport header (TCP: data offset; UDP: 8)


def locate(frame: bytes | bytearray | memoryview, hdr: VnetHdr) -> Layout:
    """Find L3/L4 in an Ethernet frame. The transport header is where csum_start says when
    the header asks for a checksum (that is where the sum must start anyway)."""
    n = len(frame)
    off = 12
    if n < off + 2:
        raise OffloadError("frame shorter than an Ethernet header")
    etype = int.from_bytes(frame[off:off + 2], "big")
    while etype in _VLAN_TPIDS:
        off += 4
        if n < off + 2:
            raise OffloadError("frame ends inside its VLAN tags")
        etype = int.from_bytes(frame[off:off + 2], "big")
    l3 = off + 2
    if etype == ETH_P_IP:
        if n < l3 + 20 or frame[l3] >> 4 != 4 or frame[l3] & 0xF < 5:
            raise OffloadError("malformed IPv4 header")
        l4 = l3 + (frame[l3] & 0xF) * 4
        proto = frame[l3 + 9]
        ipv4 = True
        if hdr.needs_csum and hdr.csum_start != l4 and hdr.gso != GSO_NONE:
            raise OffloadError(f"csum_start {hdr.csum_start} is not the IPv4 payload at {l4}")
    elif etype == ETH_P_IPV6:
        if n < l3 + 40 or frame[l3] >> 4 != 6:
            raise OffloadError("malformed IPv6 header")
        ipv4 = False
        l4, proto = l3 + 40, frame[l3 + 6]
        while proto in _IPV6_EXT and (not hdr.needs_csum or l4 < hdr.csum_start):
            if n < l4 + 8:
                raise OffloadError("frame ends inside an IPv6 extension header")
            step = 8 if proto == 44 else (frame[l4 + 1] + 1) * 8
            proto, l4 = frame[l4], l4 + step
        if hdr.needs_csum and hdr.gso != GSO_NONE and hdr.csum_start != l4:
            raise OffloadError(f"csum_start {hdr.csum_start} is not the IPv6 payload at {l4}")
    else:
        if hdr.gso != GSO_NONE:
            raise OffloadError(f"GSO on a frame of ethertype {etype:#06x}")
        return Layout(l3, False, hdr.csum_start, 0, hdr.csum_start)
    if proto == IPPROTO_TCP:
        if n < l4 + 20:
            raise OffloadError("frame ends inside its TCP header")
        hlen = l4 + (frame[l4 + 12] >> 4) * 4
        if frame[l4 + 12] >> 4 < 5 or hlen > n:
            raise OffloadError("bad TCP data offset")
    elif proto == IPPROTO_UDP:
        hlen = l4 + 8
        if hlen > n:
            raise OffloadError("frame ends inside its UDP header")
    else:
        hlen = l4
    return Layout(l3, ipv4, l4, proto, hlen)


@dataclass(slots=True)
class TxPlan:
    """What one frame asks of a transmit engine, located in the frame.

    need: the offload that does it (CSUM, TSO4, TSO6) or SOFTWARE (nothing here offers it).
    csum_start/csum_at: the L4 checksum covers csum_start..end and is stored at csum_at.
    For TSO: mss, hdr_len (all headers), paylen (bytes after them), the layout."""
    need: str
    csum_start: int
    csum_at: int
    layout: Layout | None = None
    mss: int = 0
    hdr_len: int = 0
    paylen: int = 0

    @property
    def tso(self) -> bool:
        return self.need in (TSO4, TSO6)


def plan(hdr: VnetHdr, frame: bytes | bytearray | memoryview) -> TxPlan | None:
    """None for a frame that needs nothing; raises OffloadError for one that cannot be sent."""
    if hdr.plain:
        return None
    n = len(frame)
    gso = hdr.gso
    if gso == GSO_NONE:
        at = hdr.csum_start + hdr.csum_offset
        if at + 2 > n or hdr.csum_start >= n:
            raise OffloadError(f"checksum at {hdr.csum_start}+{hdr.csum_offset} outside a {n}-byte frame")
        return TxPlan(CSUM, hdr.csum_start, at)
    if hdr.gso_size == 0:
        raise OffloadError("GSO frame with gso_size 0")
    lay = locate(frame, hdr)
    if gso in (GSO_TCPV4, GSO_TCPV6):
        if lay.proto != IPPROTO_TCP or lay.ipv4 != (gso == GSO_TCPV4):
            raise OffloadError(f"gso_type {hdr.gso_type} does not match the frame "
                               f"({'IPv4' if lay.ipv4 else 'IPv6'}, protocol {lay.proto})")
        need = SOFTWARE if hdr.ecn else (TSO4 if lay.ipv4 else TSO6)
        return TxPlan(need, lay.l4, lay.l4 + 16, lay, hdr.gso_size, lay.hdr_len, n - lay.hdr_len)
    if gso in (GSO_UDP, GSO_UDP_L4):
        if lay.proto != IPPROTO_UDP or (gso == GSO_UDP and not lay.ipv4):
            raise OffloadError(f"gso_type {hdr.gso_type} on a frame that is not UDP"
                               f"{' over IPv4' if gso == GSO_UDP else ''}")
        # what every piece repeats: UFO fragments only the IP header, USO the UDP header too
        head = lay.l4 if gso == GSO_UDP else lay.hdr_len
        mss = hdr.gso_size & ~7 if gso == GSO_UDP else hdr.gso_size
        return TxPlan(SOFTWARE, lay.l4, lay.l4 + 6, lay, mss, head, n - head)
    raise OffloadError(f"unknown gso_type {hdr.gso_type:#x}")


# --- checksums ----------------------------------------------------------------------------------------
def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 sum of big-endian 16-bit words, folded to 16 bits, not complemented.
    2**16 == 1 (mod 0xFFFF), so the folded sum is the number mod 0xFFFF (0xFFFF for a
    non-zero multiple): one big-integer operation instead of a loop."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    v = int.from_bytes(b, "big")
    if v == 0:
        return 0
    return v % 0xFFFF or 0xFFFF


def fold_add(a: int, b: int) -> int:
    s = a + b
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(frame: bytes | bytearray | memoryview, lay: Layout, l4_len: int | None) -> int:
    """Pseudo-header sum (addresses, protocol, and the L4 length unless None), folded."""
    if lay.ipv4:
        addrs = frame[lay.l3 + 12:lay.l3 + 20]
    else:
        addrs = frame[lay.l3 + 8:lay.l3 + 40]
    s = fold_add(ones_sum(addrs), lay.proto)
    return s if l4_len is None else fold_add(s, l4_len)


def put_csum(buf: bytearray, start: int, at: int) -> None:
    """What a NIC does for a checksum request: sum start..end (the field at `at` holds the
    seed), store the complement; an all-zero result goes out as 0xFFFF (UDP's rule, harmless
    for TCP, and what the e1000 family writes)."""
    v = ~ones_sum(memoryview(buf)[start:]) & 0xFFFF
    buf[at:at + 2] = (v or 0xFFFF).to_bytes(2, "big")


def ipv4_header_csum(buf: bytearray, l3: int) -> None:
    ihl = (buf[l3] & 0xF) * 4
    buf[l3 + 10:l3 + 12] = b"\0\0"
    buf[l3 + 10:l3 + 12] = (~ones_sum(memoryview(buf)[l3:l3 + ihl]) & 0xFFFF).to_bytes(2, "big")


# --- the software path ----------------------------------------------------------------------------------
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


def segment_tcp(frame: bytes | bytearray, p: TxPlan, ecn: bool = False) -> list[bytes]:
    """TCP segmentation as a TSO engine does it: every segment is the header plus up to mss
    payload bytes; IPv4 total length, id (+1 per segment) and header checksum, IPv6 payload
    length, TCP sequence number, FIN/PSH only on the last segment (CWR only on the first with
    ECN), and each segment's TCP checksum from scratch."""
    lay = p.layout
    assert lay is not None
    head = bytes(frame[:p.hdr_len])
    payload = memoryview(bytes(frame))[p.hdr_len:]
    l3, l4 = lay.l3, lay.l4
    ip_id = int.from_bytes(head[l3 + 4:l3 + 6], "big")
    seq = int.from_bytes(head[l4 + 4:l4 + 8], "big")
    base = pseudo_sum(head, lay, None)          # without the length: it differs per segment
    out: list[bytes] = []
    total = len(payload)
    offsets = range(0, max(total, 1), p.mss)
    for i, off in enumerate(offsets):
        chunk = payload[off:off + p.mss]
        seg = bytearray(head)
        seg += chunk
        if lay.ipv4:
            seg[l3 + 2:l3 + 4] = (len(seg) - l3).to_bytes(2, "big")
            seg[l3 + 4:l3 + 6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            ipv4_header_csum(seg, l3)
        else:
            seg[l3 + 4:l3 + 6] = (len(seg) - l3 - 40).to_bytes(2, "big")
        seg[l4 + 4:l4 + 8] = ((seq + off) & 0xFFFFFFFF).to_bytes(4, "big")
        if off + p.mss < total:
            seg[l4 + 13] &= ~(TCP_FIN | TCP_PSH)
        if ecn and i > 0:
            seg[l4 + 13] &= ~TCP_CWR
        seg[l4 + 16:l4 + 18] = fold_add(base, len(seg) - l4).to_bytes(2, "big")
        put_csum(seg, l4, l4 + 16)
        out.append(bytes(seg))
    return out


def fragment_udp4(frame: bytes | bytearray, p: TxPlan, hdr: VnetHdr) -> list[bytes]:
    """UFO: checksum the whole datagram, then cut the IPv4 payload into fragments of
    gso_size bytes (rounded down to a multiple of 8) that share the datagram's id."""
    lay = p.layout
    assert lay is not None
    buf = bytearray(frame)
    if hdr.needs_csum:
        put_csum(buf, hdr.csum_start, hdr.csum_start + hdr.csum_offset)
    l3, l4 = lay.l3, lay.l4
    step = p.mss
    if step < 8:
        raise OffloadError(f"UFO fragment size {hdr.gso_size} is below 8 bytes")
    head, data = bytes(buf[:l4]), bytes(buf[l4:])
    if len(data) <= step:
        return [bytes(buf)]
    flags_frag = int.from_bytes(head[l3 + 6:l3 + 8], "big") & ~0x3FFF     # keep the reserved bit
    out = []
    for off in range(0, len(data), step):
        part = data[off:off + step]
        more = off + step < len(data)
        f = bytearray(head) + part
        f[l3 + 2:l3 + 4] = (len(f) - l3).to_bytes(2, "big")
        f[l3 + 6:l3 + 8] = (flags_frag | (0x2000 if more else 0) | (off >> 3)).to_bytes(2, "big")
        ipv4_header_csum(f, l3)
        out.append(bytes(f))
    return out


def segment_udp_l4(frame: bytes | bytearray, p: TxPlan) -> list[bytes]:
    """USO: one UDP datagram of gso_size payload bytes per segment, each with its lengths,
    IPv4 id (+1) and checksums."""
    lay = p.layout
    assert lay is not None
    head, payload = bytes(frame[:p.hdr_len]), bytes(frame[p.hdr_len:])
    l3, l4 = lay.l3, lay.l4
    ip_id = int.from_bytes(head[l3 + 4:l3 + 6], "big")
    base = pseudo_sum(head, lay, None)
    out = []
    for i, off in enumerate(range(0, max(len(payload), 1), p.mss)):
        seg = bytearray(head) + payload[off:off + p.mss]
        if lay.ipv4:
            seg[l3 + 2:l3 + 4] = (len(seg) - l3).to_bytes(2, "big")
            seg[l3 + 4:l3 + 6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            ipv4_header_csum(seg, l3)
        else:
            seg[l3 + 4:l3 + 6] = (len(seg) - l3 - 40).to_bytes(2, "big")
        seg[l4 + 4:l4 + 6] = (len(seg) - l4).to_bytes(2, "big")
        seg[l4 + 6:l4 + 8] = fold_add(base, len(seg) - l4).to_bytes(2, "big")
        put_csum(seg, l4, l4 + 6)
        out.append(bytes(seg))
    return out


def resolve(hdr: VnetHdr, frame: bytes | bytearray) -> list[bytes]:
    """Everything the header asks for, in software: the finished wire frames."""
    p = plan(hdr, frame)
    if p is None:
        return [bytes(frame)]
    if p.need == CSUM:
        buf = bytearray(frame)
        put_csum(buf, p.csum_start, p.csum_at)
        return [bytes(buf)]
    g = hdr.gso
    if g in (GSO_TCPV4, GSO_TCPV6):
        return segment_tcp(frame, p, hdr.ecn)
    if g == GSO_UDP:
        return fragment_udp4(frame, p, hdr)
    return segment_udp_l4(frame, p)


def tso_prepare(buf: bytearray | memoryview, p: TxPlan) -> None:
    """The header edits an Intel-style TSO engine expects before it segments (8254x manual,
    TCP segmentation): the IPv4 header checksum zeroed (the engine sums the header with it
    in place) and the TCP checksum field seeded with the pseudo-header sum *without* the
    length, which the engine adds per segment. Lengths and ids are rewritten per segment."""
    lay = p.layout
    assert lay is not None
    if lay.ipv4:
        buf[lay.l3 + 10:lay.l3 + 12] = b"\0\0"
    buf[p.csum_at:p.csum_at + 2] = pseudo_sum(bytes(buf[:p.hdr_len]), lay, None).to_bytes(2, "big")


def wire_frames(hdr: VnetHdr, frame: bytes | bytearray) -> int:
    """How many wire frames the frame becomes (for counters)."""
    p = plan(hdr, frame)
    if p is None or p.need == CSUM:
        return 1
    return max(1, -(-p.paylen // p.mss))

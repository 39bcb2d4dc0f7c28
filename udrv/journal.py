"""The TX journal (nDriver's unfinished-request list) in shareable memory.

Every frame read from the TAP is appended here before any driver sees it, and leaves only
when the device confirms it. A recovery rewinds `sent` to `tail` and the datapath re-issues
what was never confirmed: zero TX loss. Frames between tail and the old `sent` may reach the
wire twice (their completion was lost); the journal counts them as possible duplicates.

The journal is a fixed-slot ring in a memfd, so a worker process (and the C fast path) can
map the very same memory; the layout is plain little-endian integers:

    header (128 bytes): magic u32 | nslots u32 | slot_size u32 | reading u32 @12 |
                        head u64 @16 | sent u64 @24 | tail u64 @32 | reissued u64 @40 |
                        duplicates u64 @48 |
                        AQM: target_ns u64 @56 (0 = off) | interval_ns u64 @64 | drops u64 @72 |
                        marks u64 @80 | CoDel first_above u64 @88 | drop_next u64 @96 |
                        count u32 @104 | lastcount u32 @108 | dropping u32 @112 |
                        flags u32 @116 (bit 0: ECN) | judged u64 @120 (next seq to judge)
    slot i at 128 + i * slot_size: length u32 | flags u32 | seq u64 | stamp u64 | _ u64 |
                                   payload (length bytes)
      stamp: time.monotonic_ns() (CLOCK_MONOTONIC) when the frame was journaled.
      flags bit 0 (SLOT_VNET): the payload starts with a virtio-net header of N bytes,
                  N = flags bits 15:8 (udrv.offload; e.g. 12), then the frame: what the host
                  asked for (checksum, TSO) travels with the frame and survives re-issues.
      flags 0:    the payload is the frame (every slot when the TAP has no vnet header, and
                  frames whose header asks for nothing: their header is not kept).
Sequence numbers grow without wrapping; slot = seq % nslots.
  reading:  a reader of the TAP that reads straight into the slot at head (read_into, the C
            tapread) first zeroes the 6 bytes where the frame's destination MAC will land and
            sets this to head + 1 (low 32 bits); once it publishes, head catches up. A worker
            killed between the read and the publish leaves reading == head + 1 and, if the read
            took a frame, a non-zero MAC there: `unfinished_read()` gives that frame to the
            successor, its length told by its own L3 header, so even that frame is not lost.

The journal is also where frames queue in front of the device: a TAP gives the host's TCP no
backpressure (tun orphans every frame), so without a limit a bulk flow fills it and every flow
waits behind the queue (80-180 ms of RTT under load, measured). `aqm_drop()` is CoDel (RFC 8289)
on how long the next entry waited, judged once per entry as a datapath starts it: the same
rules as Linux's codel/fq_codel, and, like fq_codel, ECN-capable frames are marked rather than
dropped. Its state lives in the header, so the C rings, the Python datapaths and a later worker
process all run one CoDel. An AQM drop is a decision, not a loss: counted in `aqm_drops`, and
never taken on a re-issued entry or on the last one queued.

`frame()`/`take_unsent()` give the frame without its header (what a datapath that knows no
offloads can use); `entry()`/`peek_unsent()` give (header, frame) for those that do.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import time
from typing import Callable

from .errors import UdrvError

MAGIC = 0x324A4455  # "UDJ2"
HEADER = 128
SLOT_HEADER = 32
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_SLOT = struct.Struct("<IIQQ")
_OFF_READING = 12
_OFF_HEAD, _OFF_SENT, _OFF_TAIL, _OFF_REISSUED, _OFF_DUPS = 16, 24, 32, 40, 48
_OFF_AQM_TARGET, _OFF_AQM_INTERVAL, _OFF_AQM_DROPS, _OFF_AQM_MARKS = 56, 64, 72, 80
_OFF_FIRST_ABOVE, _OFF_DROP_NEXT, _OFF_COUNT, _OFF_LASTCOUNT = 88, 96, 104, 108
_OFF_DROPPING, _OFF_AQM_FLAGS, _OFF_JUDGED = 112, 116, 120
_SLOT_OFF_STAMP = 16
AQM_ECN = 0x1
# fq_codel's defaults: 5 ms of standing queue allowed, judged over 100 ms (about a WAN RTT)
AQM_TARGET = 0.005
AQM_INTERVAL = 0.100
SLOT_VNET = 0x1
VNET_LEN_SHIFT = 8
VNET_LEN_MASK = 0xFF


def vnet_len(flags: int) -> int:
    """Bytes of virtio-net header at the start of a slot's payload (0: none)."""
    return (flags >> VNET_LEN_SHIFT) & VNET_LEN_MASK if flags & SLOT_VNET else 0


def _control_law(t: int, interval: int, count: int) -> int:
    """CoDel's next drop time: t + interval / sqrt(count) (as journal.c computes it)."""
    return t + int(interval / math.sqrt(count))


def _frame_length(b: memoryview) -> int | None:
    """An Ethernet frame's length from its own headers (VLAN tags skipped): IPv4's total
    length, IPv6's payload length, ARP's fixed size; None for anything else."""
    if len(b) < 14:
        return None
    et, l3 = b[12] << 8 | b[13], 14
    while et in (0x8100, 0x88A8) and len(b) >= l3 + 4:
        et, l3 = b[l3 + 2] << 8 | b[l3 + 3], l3 + 4
    if et == 0x0800 and len(b) >= l3 + 4 and b[l3] >> 4 == 4:
        total = b[l3 + 2] << 8 | b[l3 + 3]
        return l3 + total if total >= 20 else None
    if et == 0x86DD and len(b) >= l3 + 6 and b[l3] >> 4 == 6:
        return l3 + 40 + (b[l3 + 4] << 8 | b[l3 + 5])
    if et == 0x0806:
        return l3 + 28
    return None


class JournalFull(UdrvError):
    pass


def mark_ce(frame: bytearray | memoryview) -> int:
    """Set CE in an ECN-capable IPv4/IPv6 frame (after up to two VLAN tags), keeping the IPv4
    header checksum right: 1 = marked (or CE already), 0 = not ECN-capable, -1 = not IP."""
    n = len(frame)
    if n < 14:
        return -1
    l3, etype = 14, frame[12] << 8 | frame[13]
    for _ in range(2):                         # up to two VLAN tags (802.1Q, 802.1ad), as gso.c
        if etype not in (0x8100, 0x88A8) or n < l3 + 4:
            break
        l3, etype = l3 + 4, frame[l3 + 2] << 8 | frame[l3 + 3]
    if etype == 0x0800 and n >= l3 + 20 and frame[l3] >> 4 == 4:
        ecn = frame[l3 + 1] & 3
        if ecn in (0, 3):
            return 0 if ecn == 0 else 1
        old = frame[l3] << 8 | frame[l3 + 1]
        frame[l3 + 1] |= 3
        new = frame[l3] << 8 | frame[l3 + 1]
        # RFC 1624: HC' = ~(~HC + ~m + m')
        hc = frame[l3 + 10] << 8 | frame[l3 + 11]
        total = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        hc = ~total & 0xFFFF
        frame[l3 + 10], frame[l3 + 11] = hc >> 8, hc & 0xFF
        return 1
    if etype == 0x86DD and n >= l3 + 40 and frame[l3] >> 4 == 6:
        if not frame[l3 + 1] & 0x30:            # traffic class straddles bytes 0 and 1
            return 0
        frame[l3 + 1] |= 0x30
        return 1
    return -1


class TxJournal:
    # where stamps come from; tests set their own clock
    clock: Callable[[], int] = staticmethod(time.monotonic_ns)

    def __init__(self, nslots: int = 1024, slot_size: int = 2048, fd: int | None = None):
        if nslots & (nslots - 1):
            raise ValueError("nslots must be a power of two")
        self.nslots = nslots
        self.slot_size = slot_size
        self.size = HEADER + nslots * slot_size
        created = fd is None
        self.fd = os.memfd_create("udrv-txjournal", os.MFD_CLOEXEC) if created else fd
        if created:
            os.ftruncate(self.fd, self.size)
        self.mem = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if created:
            struct.pack_into("<III", self.mem, 0, MAGIC, nslots, slot_size)
        elif struct.unpack_from("<III", self.mem, 0) != (MAGIC, nslots, slot_size):
            raise UdrvError("the TX journal memory does not match the expected layout")
        self.max_frame = slot_size - SLOT_HEADER
        # the header as u64 / u32 words: the AQM reads a dozen fields per entry, and a view's
        # index costs a third of struct's unpack_from (the Python datapaths judge every entry)
        self._mv = memoryview(self.mem)
        self._h64 = self._mv[:HEADER].cast("Q")
        self._h32 = self._mv[:HEADER].cast("I")
        # each slot's stamp as a u64 word too, where slots keep 8-byte alignment (any real size)
        self._q = self._mv.cast("Q") if slot_size % 8 == 0 else None
        self._mask = nslots - 1
        # Python-side mirrors of the indices; the header is the source of truth for other
        # processes and is written on every change.
        self.head = self._get(_OFF_HEAD)
        self.sent = self._get(_OFF_SENT)
        self.tail = self._get(_OFF_TAIL)

    @classmethod
    def attach(cls, fd: int, nslots: int, slot_size: int) -> "TxJournal":
        """Map a journal another process created (the fd arrives over SCM_RIGHTS)."""
        return cls(nslots, slot_size, fd=fd)

    def _get(self, off: int) -> int:
        return _U64.unpack_from(self.mem, off)[0]

    def _set(self, off: int, value: int) -> None:
        _U64.pack_into(self.mem, off, value)

    def _slot(self, seq: int) -> int:
        """Offset of the slot that holds seq."""
        return HEADER + (seq & (self.nslots - 1)) * self.slot_size

    # --- producer side (frames from the TAP) -------------------------------------------
    def space(self) -> int:
        return self.nslots - (self.head - self.tail)

    def append(self, frame: bytes, vnet: bytes = b"") -> int:
        """Journal one frame; `vnet` is its virtio-net header when it asks for an offload."""
        if self.head - self.tail >= self.nslots:
            raise JournalFull("TX journal full")
        total = len(vnet) + len(frame)
        if total > self.max_frame:
            raise ValueError(f"frame of {total} bytes exceeds the journal slot ({self.max_frame})")
        if len(vnet) > VNET_LEN_MASK:
            raise ValueError(f"a {len(vnet)}-byte virtio-net header does not fit the slot flags")
        flags = SLOT_VNET | len(vnet) << VNET_LEN_SHIFT if vnet else 0
        seq = self.head
        off = self._slot(seq)
        _SLOT.pack_into(self.mem, off, total, flags, seq, self.clock())
        data = off + SLOT_HEADER
        if vnet:
            self.mem[data: data + len(vnet)] = vnet
            data += len(vnet)
        self.mem[data: data + len(frame)] = frame
        self.head = seq + 1
        self._set(_OFF_HEAD, self.head)
        return seq

    def read_into(self, fd: int, limit: int, scratch: bytearray) -> int:
        """Read one frame from `fd` (a TAP without a virtio-net header) straight into the next
        slot. The frame is in the journal's shared memory the moment the read returns; only
        the index store follows, so a worker killed after a read leaves the frame for its
        successor instead of in its own heap. Returns the frame's length; 0: nothing to read
        (EAGAIN); -n: a frame of n bytes longer than `limit` or the slot (its tail went to
        `scratch`), read and not journaled. Raises JournalFull before reading (the frame stays
        in the kernel's queue) and OSError as os.readv does."""
        if self.head - self.tail >= self.nslots:
            raise JournalFull("TX journal full")
        seq = self.head
        off = self._slot(seq)
        data = off + SLOT_HEADER
        self.mem[data: data + 6] = bytes(6)
        self._h32[_OFF_READING >> 2] = (seq + 1) & 0xFFFFFFFF
        try:
            n = os.readv(fd, (self._mv[data: data + self.max_frame], scratch))
        except BlockingIOError:
            return 0
        if n > limit or n > self.max_frame:
            self.mem[data: data + 6] = bytes(6)      # dropped: nothing here for a successor
            return -n
        _SLOT.pack_into(self.mem, off, n, 0, seq, self.clock())
        self.head = seq + 1
        self._set(_OFF_HEAD, self.head)
        return n

    def unfinished_read(self, vnet_len: int) -> tuple[bool, bytes | None]:
        """After another process's death: did it die between a read from the TAP into the slot
        at head and the publish? (True, raw) with the bytes as read (`vnet_len` bytes of
        virtio-net header, then the frame); (True, None) when it took a frame whose length
        cannot be told (not IPv4, IPv6 or ARP, or longer than the slot); (False, None) when no
        frame is there. Clears the mark: one successor takes it."""
        self.sync()
        h32 = self._h32
        reading = h32[_OFF_READING >> 2]
        if reading == 0 or reading != (self.head + 1) & 0xFFFFFFFF:
            return False, None
        h32[_OFF_READING >> 2] = 0
        data = self._slot(self.head) + SLOT_HEADER
        raw = self._mv[data: data + self.max_frame]
        if not any(raw[vnet_len: vnet_len + 6]):
            return False, None                       # the read found nothing, or never ran
        n = _frame_length(raw[vnet_len:])
        if n is None or vnet_len + n > self.max_frame:
            return True, None
        return True, bytes(raw[: vnet_len + n])

    # --- datapath side ----------------------------------------------------------------
    def unsent(self) -> int:
        return self.head - self.sent

    def unconfirmed(self) -> int:
        return self.head - self.tail

    def in_device(self) -> int:
        return self.sent - self.tail

    def unsent_bytes(self) -> int:
        """Bytes of frame waiting unsent (virtio-net headers not counted): the queue in front of
        the device, what TCP's RTT under load shows."""
        n = 0
        for seq in range(self.sent, self.head):
            length, flags, _seq, _stamp = _SLOT.unpack_from(self.mem, self._slot(seq))
            n += length - vnet_len(flags)
        return n

    def oldest_unsent_age(self) -> float:
        """Seconds the oldest unsent entry has waited (0.0: none waits): the sojourn CoDel
        judges, as it stands now."""
        if self.sent >= self.head:
            return 0.0
        return max(0, self.clock() - self.stamp(self.sent)) / 1e9

    def entry(self, seq: int) -> tuple[bytes, bytes]:
        """(virtio-net header or b"", frame) of a journaled frame."""
        off = self._slot(seq)
        length, flags, stored, _stamp = _SLOT.unpack_from(self.mem, off)
        hlen = vnet_len(flags)
        if stored != seq or length > self.max_frame or hlen > length:
            raise UdrvError(f"TX journal slot for seq {seq} holds seq {stored} (length {length}, flags "
                            f"{flags:#x}): journal corrupted")
        data = off + SLOT_HEADER
        return bytes(self.mem[data: data + hlen]), bytes(self.mem[data + hlen: data + length])

    def frame(self, seq: int) -> bytes:
        return self.entry(seq)[1]

    def peek_unsent(self) -> tuple[int, bytes, bytes] | None:
        """(seq, header, frame) of the next frame to hand to the device, without marking it
        sent: a datapath that needs several descriptors for it first checks they are free."""
        seq = self.sent
        if seq >= self.head:
            return None
        off = self._slot(seq)
        length, flags, stored, _stamp = _SLOT.unpack_from(self.mem, off)
        if flags or stored != seq or length > self.max_frame:
            return (seq, *self.entry(seq))          # header to split off, or corruption to report
        return seq, b"", self.mem[off + SLOT_HEADER: off + SLOT_HEADER + length]

    def mark_sent(self, seq: int) -> None:
        """The frame peek_unsent() returned is in the device now."""
        if seq != self.sent or seq >= self.head:
            raise UdrvError(f"mark_sent({seq}) but the next unsent frame is {self.sent}")
        self.sent = seq + 1
        self._set(_OFF_SENT, self.sent)

    def take_unsent(self) -> tuple[int, bytes] | None:
        """Next frame to hand to the device, marking it sent."""
        if self.sent >= self.head:
            return None
        seq = self.sent
        self.sent = seq + 1
        self._set(_OFF_SENT, self.sent)
        return seq, self.frame(seq)

    def confirm_through(self, seq: int) -> int:
        """The device confirmed every frame up to and including seq (completions are in order)."""
        if seq < self.tail:
            return 0
        if seq >= self.sent:
            raise UdrvError(f"confirmation for seq {seq} that was never sent (sent up to {self.sent - 1})")
        n = seq + 1 - self.tail
        self.tail = seq + 1
        self._set(_OFF_TAIL, self.tail)
        return n

    def rewind(self) -> int:
        """After a recovery: everything not confirmed is sent again. Returns the number re-issued
        (frames the device may already have put on the wire: possible duplicates)."""
        again = self.sent - self.tail
        self.sent = self.tail
        self._set(_OFF_SENT, self.sent)
        self._set(_OFF_REISSUED, self._get(_OFF_REISSUED) + again)
        self._set(_OFF_DUPS, self._get(_OFF_DUPS) + again)
        return again

    def sync(self) -> None:
        """Re-read head/sent/tail from the header after someone else changed them (the C
        fast path in this process, or a worker mapping the same memfd)."""
        self.head = self._get(_OFF_HEAD)
        self.sent = self._get(_OFF_SENT)
        self.tail = self._get(_OFF_TAIL)

    @property
    def reissued(self) -> int:
        return self._get(_OFF_REISSUED)

    # --- the AQM ---------------------------------------------------------------------------
    def set_aqm(self, target: float = AQM_TARGET, interval: float = AQM_INTERVAL, ecn: bool = True) -> None:
        """Turn CoDel on (target > 0, seconds) or off (target 0)."""
        if target < 0 or (target and interval <= 0):
            raise ValueError(f"AQM target {target} s / interval {interval} s: give a target >= 0 and an interval > 0")
        self._set(_OFF_AQM_TARGET, round(target * 1e9))
        self._set(_OFF_AQM_INTERVAL, round(interval * 1e9))
        _U32.pack_into(self.mem, _OFF_AQM_FLAGS, AQM_ECN if ecn else 0)
        # CoDel starts afresh: state left from before (or from while it was off) would drop at
        # once, at an old rate, without the interval's grace
        self._set(_OFF_FIRST_ABOVE, 0)
        self._set(_OFF_DROP_NEXT, 0)
        struct.pack_into("<III", self.mem, _OFF_COUNT, 0, 0, 0)     # count, lastcount, dropping

    @property
    def aqm_target(self) -> float:
        return self._get(_OFF_AQM_TARGET) / 1e9

    @property
    def aqm_interval(self) -> float:
        return self._get(_OFF_AQM_INTERVAL) / 1e9

    @property
    def aqm_ecn(self) -> bool:
        return bool(_U32.unpack_from(self.mem, _OFF_AQM_FLAGS)[0] & AQM_ECN)

    @property
    def aqm_drops(self) -> int:
        return self._get(_OFF_AQM_DROPS)

    @property
    def aqm_marks(self) -> int:
        return self._get(_OFF_AQM_MARKS)

    def stamp(self, seq: int) -> int:
        """When the entry was journaled (the journal's clock, ns)."""
        return _U64.unpack_from(self.mem, self._slot(seq) + _SLOT_OFF_STAMP)[0]

    def aqm_drop(self, now: int | None = None) -> bool:
        """CoDel's verdict on the next unsent entry, once per entry, as a datapath starts it
        (journal.c's udrv_journal_aqm_drop, step for step). True: drop it, which the caller does
        as for any frame that cannot go on the wire (mark it sent; it is confirmed in order with
        the next). With ECN on, an ECN-capable frame is marked CE in place instead (False)."""
        h, w = self._h64, self._h32              # u64 word i = byte 8i; u32 word i = byte 4i
        target = h[_OFF_AQM_TARGET >> 3]
        if not target:
            return False
        seq, head = self.sent, self.head
        if seq >= head or seq < h[_OFF_JUDGED >> 3]:
            return False
        h[_OFF_JUDGED >> 3] = seq + 1
        if now is None:
            now = self.clock()
        interval = h[_OFF_AQM_INTERVAL >> 3]
        q = self._q
        sojourn = now - (q[(HEADER + _SLOT_OFF_STAMP + (seq & self._mask) * self.slot_size) >> 3] if q is not None
                         else self.stamp(seq))
        ok_to_drop = False
        if sojourn < target or head - seq <= 1:
            h[_OFF_FIRST_ABOVE >> 3] = 0
        else:
            first = h[_OFF_FIRST_ABOVE >> 3]
            if not first:
                h[_OFF_FIRST_ABOVE >> 3] = now + interval
            else:
                ok_to_drop = now >= first
        if w[_OFF_DROPPING >> 2]:
            if not ok_to_drop:
                w[_OFF_DROPPING >> 2] = 0
                return False
            drop_next = h[_OFF_DROP_NEXT >> 3]
            if now < drop_next:
                return False
            count = min(w[_OFF_COUNT >> 2] + 1, 0xFFFFFFFF)      # saturates: sqrt(0) never comes
            w[_OFF_COUNT >> 2] = count
            h[_OFF_DROP_NEXT >> 3] = _control_law(drop_next, interval, count)
        else:
            if not ok_to_drop:
                return False
            w[_OFF_DROPPING >> 2] = 1
            count, drop_next = w[_OFF_COUNT >> 2], h[_OFF_DROP_NEXT >> 3]
            delta = (count - w[_OFF_LASTCOUNT >> 2]) & 0xFFFFFFFF
            count = delta if delta > 1 and now - drop_next < 16 * interval else 1
            w[_OFF_COUNT >> 2] = w[_OFF_LASTCOUNT >> 2] = count
            h[_OFF_DROP_NEXT >> 3] = _control_law(now, interval, count)
        if w[_OFF_AQM_FLAGS >> 2] & AQM_ECN:
            off = self._slot(seq)
            length, flags, _seq, _stamp = _SLOT.unpack_from(self.mem, off)
            data = off + SLOT_HEADER + vnet_len(flags)
            with self._mv[data: off + SLOT_HEADER + length] as frame:
                marked = length <= self.max_frame and mark_ce(frame) > 0
            if marked:
                h[_OFF_AQM_MARKS >> 3] += 1
                return False
        h[_OFF_AQM_DROPS >> 3] += 1
        return True

    def close(self) -> None:
        for view in (self._h64, self._h32, self._q, self._mv):       # exports would keep the mmap open
            if view is not None:
                view.release()
        self.mem.close()
        os.close(self.fd)

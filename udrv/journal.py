"""The TX journal (nDriver's unfinished-request list) in shareable memory.

Every frame read from the TAP is appended here before any driver sees it, and leaves only
when the device confirms it. A recovery rewinds `sent` to `tail` and the datapath re-issues
what was never confirmed: zero TX loss. Frames between tail and the old `sent` may reach the
wire twice (their completion was lost); the journal counts them as possible duplicates.

The journal is a fixed-slot ring in a memfd, so a worker process (and the C fast path) can
map the very same memory; the layout is plain little-endian integers:

    header (64 bytes): magic u32 | nslots u32 | slot_size u32 | _ u32 |
                       head u64 @16 | sent u64 @24 | tail u64 @32 | reissued u64 @40 |
                       duplicates u64 @48
    slot i at 64 + i * slot_size: length u32 | flags u32 | seq u64 | payload (length bytes)
      flags bit 0 (SLOT_VNET): the payload starts with a virtio-net header of N bytes,
                  N = flags bits 15:8 (udrv.offload; e.g. 12), then the frame: what the host
                  asked for (checksum, TSO) travels with the frame and survives re-issues.
      flags 0:    the payload is the frame (every slot when the TAP has no vnet header, and
                  frames whose header asks for nothing: their header is not kept).
Sequence numbers grow without wrapping; slot = seq % nslots.

`frame()`/`take_unsent()` give the frame without its header (what a datapath that knows no
offloads can use); `entry()`/`peek_unsent()` give (header, frame) for those that do.
"""
from __future__ import annotations

import mmap
import os
import struct

from .errors import UdrvError

MAGIC = 0x314A4455  # "UDJ1"
HEADER = 64
SLOT_HEADER = 16
_U64 = struct.Struct("<Q")
_SLOT = struct.Struct("<IIQ")
_OFF_HEAD, _OFF_SENT, _OFF_TAIL, _OFF_REISSUED, _OFF_DUPS = 16, 24, 32, 40, 48
SLOT_VNET = 0x1
VNET_LEN_SHIFT = 8
VNET_LEN_MASK = 0xFF


def vnet_len(flags: int) -> int:
    """Bytes of virtio-net header at the start of a slot's payload (0: none)."""
    return (flags >> VNET_LEN_SHIFT) & VNET_LEN_MASK if flags & SLOT_VNET else 0


class JournalFull(UdrvError):
    pass


class TxJournal:
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
        _SLOT.pack_into(self.mem, off, total, flags, seq)
        data = off + SLOT_HEADER
        if vnet:
            self.mem[data: data + len(vnet)] = vnet
            data += len(vnet)
        self.mem[data: data + len(frame)] = frame
        self.head = seq + 1
        self._set(_OFF_HEAD, self.head)
        return seq

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
            length, flags, _seq = _SLOT.unpack_from(self.mem, self._slot(seq))
            n += length - vnet_len(flags)
        return n

    def entry(self, seq: int) -> tuple[bytes, bytes]:
        """(virtio-net header or b"", frame) of a journaled frame."""
        off = self._slot(seq)
        length, flags, stored = _SLOT.unpack_from(self.mem, off)
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
        length, flags, stored = _SLOT.unpack_from(self.mem, off)
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

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)

"""TX admission: the host's frames into the TX journal, and the TAP's offloads that shape them.

The runtime asks the TAP for the offloads the driver declares (`negotiate_offloads`, once,
before the first datapath exists). TAP frames then carry a virtio-net header; `TxAdmission`
keeps it in the journal with the frames that need work (checksum, TSO) and drops it from
those that do not. A datapath that handles the header (`caps.handles_vnet`) does the work in
hardware or falls back to udrv.offload's software; for any other datapath the frames are
finished in software here, before they are journaled. What cannot go out is dropped and
counted by reason: the interface stays up whatever the host sends.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from . import offload
from .journal import SLOT_HEADER, JournalFull, TxJournal

log = logging.getLogger("udrv.admission")
_CSUM_FIELDS = struct.Struct("<HH")       # virtio-net header: csum_start, csum_offset at byte 6
_GSO_FIELDS = struct.Struct("<HH")        # virtio-net header: gso_size, csum_start at byte 4
LINK_OVERHEAD = 14 + 4                    # Ethernet header + one VLAN tag beyond the MTU


@runtime_checkable
class OffloadingTap(Protocol):
    """A TAP whose offloads the runtime sets (udrv.tap.Tap; tests use stand-ins)."""
    name: str
    vnet_hdr_len: int

    def set_offloads(self, offloads: Any, vnet_hdr: bool = False) -> None: ...


class ReadableTap(Protocol):
    """What admission reads frames from (udrv.tap.Tap)."""
    fd: int
    read_errors: int

    def read_batch(self, max_frames: int) -> list[bytes]: ...


def tap_of(sink: Callable[[bytes], None]) -> OffloadingTap | None:
    """The TAP behind a sink that is a TAP's bound `write` (what the daemon passes)."""
    owner = getattr(sink, "__self__", None)
    return owner if isinstance(owner, OffloadingTap) else None


def negotiate_offloads(tap: OffloadingTap | None, wanted: frozenset[str], rx_vnet_hdr: bool) -> tuple[frozenset[str], int]:
    """Ask the TAP for `wanted` (narrowed by UDRV_OFFLOADS, an operator's allow-list such as
    "csum" or "none", for debugging and benches). Returns (offloads on, virtio-net header
    bytes in front of each TAP frame). A datapath that writes GSO super-frames (rx_vnet_hdr)
    needs the header even with no TX offload on."""
    allowed = os.environ.get("UDRV_OFFLOADS")
    if allowed is not None:
        wanted &= frozenset(a.strip() for a in allowed.split(",") if a.strip() not in ("", "none"))
    if tap is None:
        return wanted, 0
    if rx_vnet_hdr:
        tap.set_offloads(wanted, vnet_hdr=True)
    else:
        tap.set_offloads(wanted)
    hlen = tap.vnet_hdr_len
    if hlen:
        log.info("event=offloads tap=%s offloads=%s vnet_hdr=%d", tap.name,
                 ",".join(sorted(wanted)) or "none", hlen)
    return wanted, hlen


def journal_geometry(max_mtu: int, offloads: frozenset[str], slots: int, gso_slots: int) -> tuple[int, int]:
    """(slots, slot size) of a journal whose slot holds the largest frame the driver can send:
    MTU + link headers, 64-byte aligned; with TSO a 64 KiB GSO frame (+ link headers) behind its
    virtio-net header, in fewer slots."""
    slot = max_mtu + LINK_OVERHEAD + SLOT_HEADER
    if offloads:
        slot += offload.VNET_HDR_LEN
    if offloads & {offload.TSO4, offload.TSO6}:
        slot = max(slot, 65536 + 64 + offload.VNET_HDR_LEN + SLOT_HEADER)
        slots = min(slots, gso_slots)
    return slots, max((slot + 63) & ~63, 2048)


def codel_settings(target: float, interval: float, ecn: bool) -> tuple[float, float, bool]:
    """CoDel's settings for the journal (udrv/journal.py: the queue a TAP cannot push back
    on), unless UDRV_AQM says otherwise, for benches and A/B runs: off, drop (no ECN marks),
    on, or TARGET/INTERVAL in ms (e.g. 1/10). Target 0 is off."""
    mode = os.environ.get("UDRV_AQM", "").strip().lower()
    if mode in ("off", "0", "none"):
        target = 0.0
    elif mode == "drop":
        ecn = False
    elif "/" in mode:
        try:
            target, interval = (float(x) / 1e3 for x in mode.split("/"))
        except ValueError:
            log.warning("event=aqm_setting_ignored UDRV_AQM=%r (TARGET/INTERVAL in ms, e.g. 1/10)", mode)
    elif mode not in ("", "on", "1", "ecn"):
        log.warning("event=aqm_setting_ignored UDRV_AQM=%r (use off, drop, on or TARGET/INTERVAL in ms)", mode)
    return target, interval, ecn


@dataclass
class AdmissionCounts:
    frames_in: int = 0               # TAP frames offered
    dropped: dict[str, int] = field(default_factory=dict)   # by reason
    offload_frames: int = 0          # frames that asked for checksum/TSO work
    software_frames: int = 0         # of those, finished in software here

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class TxAdmission:
    """Frames from the TAP into the journal (the driver sees them only from there)."""

    def __init__(self, journal: TxJournal, mtu: Callable[[], int]):
        self.journal = journal
        self.mtu = mtu                    # the driver's MTU now
        self.vnet_hdr_len = 0             # set once the TAP's offloads are negotiated
        self.in_hw = False                # the datapath handles virtio-net headers itself
        self.counts = AdmissionCounts()
        self._scratch = bytearray(65536 + 512)   # the tail of a frame longer than a slot

    def admit(self, frames: Sequence[bytes], vnet_hdr_len: int | None = None) -> int:
        """Journal what can go out; returns frames accepted. With a virtio-net header (default:
        what the TAP was set up with) each frame starts with one."""
        hlen = self.vnet_hdr_len if vnet_hdr_len is None else vnet_hdr_len
        if hlen:
            return self._admit_vnet(frames, hlen)
        accepted = 0
        mtu_max = self.mtu() + LINK_OVERHEAD
        for f in frames:
            self.counts.frames_in += 1
            if len(f) > mtu_max:
                self.counts.drop("oversize")
                continue
            try:
                self.journal.append(f)
                accepted += 1
            except JournalFull:
                self.counts.drop("journal_full")
            except ValueError:          # larger than a journal slot
                self.counts.drop("oversize")
        return accepted

    def pull(self, tap: ReadableTap, budget: int) -> int:
        """Up to `budget` frames from the TAP into the journal; returns frames accepted.
        Without a virtio-net header each frame is read straight into its journal slot (what a
        worker holds of it when it dies is already the journal's); with one, frames are read
        into memory and admitted, as they may need software work first."""
        if self.vnet_hdr_len:
            # one at a time: what a dying worker holds outside the journal is one frame at most
            accepted = 0
            for _ in range(min(budget, self.journal.space())):
                frames = tap.read_batch(1)
                if not frames:
                    break
                accepted += self.admit(frames)
            return accepted
        accepted = 0
        limit = self.mtu() + LINK_OVERHEAD
        counts, read_into, scratch, fd = self.counts, self.journal.read_into, self._scratch, tap.fd
        for _ in range(min(budget, self.journal.space())):
            try:
                n = read_into(fd, limit, scratch)
            except OSError:
                tap.read_errors += 1
                break
            if n == 0:
                break
            counts.frames_in += 1
            if n < 0:
                counts.drop("oversize")
            else:
                accepted += 1
        return accepted

    def _admit_vnet(self, frames: Sequence[bytes], hlen: int) -> int:
        accepted = 0
        mtu_max = self.mtu() + LINK_OVERHEAD
        in_hw, append, counts = self.in_hw, self.journal.append, self.counts
        for raw in frames:
            counts.frames_in += 1
            if len(raw) < hlen:
                counts.drop("short_vnet_header")
                continue
            f = memoryview(raw)[hlen:]          # no copy: the journal copies it once
            flags, gso = raw[0], raw[1]
            keep = b""
            out: list[Any] = [f]
            if gso == offload.GSO_NONE:
                # the common cases, without building a plan: nothing to do / a checksum to fill
                if len(f) > mtu_max:
                    counts.drop("oversize")
                    continue
                if flags & offload.F_NEEDS_CSUM:
                    start, off = _CSUM_FIELDS.unpack_from(raw, 6)
                    if start >= len(f) or start + off + 2 > len(f):
                        counts.drop("bad_offload_request")
                        continue
                    counts.offload_frames += 1
                    if in_hw:
                        keep = raw[:hlen]
                    else:
                        counts.software_frames += 1
                        out = offload.resolve(offload.VnetHdr.parse(raw), f)
            elif in_hw and gso in (offload.GSO_TCPV4, offload.GSO_TCPV6) and flags & offload.F_NEEDS_CSUM:
                # TCP GSO for a datapath that reads the header itself (and checks it as it
                # plans the packet): here only what reaches the wire must fit the MTU, each
                # segment = headers through the TCP data offset + gso_size
                size, start = _GSO_FIELDS.unpack_from(raw, 4)
                if start + 13 > len(f) or start + (f[start + 12] >> 4) * 4 + size > mtu_max:
                    counts.drop("oversize" if start + 13 <= len(f) else "bad_offload_request")
                    continue
                counts.offload_frames += 1
                keep = raw[:hlen]
            else:
                try:
                    hdr = offload.VnetHdr.parse(raw)
                    p = offload.plan(hdr, f)
                except offload.OffloadError:
                    counts.drop("bad_offload_request")
                    continue
                counts.offload_frames += 1
                # what reaches the wire must fit the MTU: each segment of the GSO frame
                if p is None or p.hdr_len + p.mss > mtu_max:
                    counts.drop("oversize")
                    continue
                if in_hw:
                    keep = raw[:hlen]
                else:
                    counts.software_frames += 1
                    out = offload.resolve(hdr, f)
            if self.journal.space() < len(out):
                counts.drop("journal_full")
                continue
            try:
                for piece in out:
                    append(piece, keep)
                accepted += 1
            except ValueError:
                counts.drop("oversize")
        return accepted

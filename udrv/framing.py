"""USB NIC framings a driver declares; the framework (and later the C ring) applies them.

As in Linux usbnet, a driver does not touch transfers: it names how frames sit inside bulk
transfers. Three shapes cover the drivers we ship:

- TRAILER4: RX = frame, then 4 bytes (u16 LE length incl. 4 CRC bytes & 0x0FFF, status, 0);
            TX = u16 LE frame length, then the frame (pegasus).
- HEADER2:  RX = u16 LE length & 0x0FFF, then the frame (ADM8513 variant); TX as TRAILER4.
- RAW:      one frame per transfer both ways (CDC-ECM).

`pad_rule`: when a TX transfer would be an exact multiple of this many bytes, append one byte
so the device never waits for a zero-length packet (0 = no rule).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

ETH_MIN = 14          # a frame shorter than an Ethernet header is a runt
ETH_MAX_RX = 1536     # the chips' own ceiling


class Shape(enum.Enum):
    TRAILER4 = "trailer4"
    HEADER2 = "header2"
    RAW = "raw"


@dataclass(frozen=True)
class Framing:
    shape: Shape
    rx_transfer_size: int = 1536 + 4
    pad_rule: int = 0
    max_frame: int = ETH_MAX_RX
    # RX status bits that mean "drop and count", with the reason to count under.
    rx_error_bits: tuple[tuple[int, str], ...] = ()

    def encode_tx(self, frame: bytes) -> bytes:
        if self.shape is Shape.RAW:
            out = frame
        else:
            n = len(frame)
            out = bytes((n & 0xFF, n >> 8)) + frame
        if self.pad_rule and len(out) % self.pad_rule == 0:
            out += b"\x00"
        return out

    def decode_rx(self, buf: bytes) -> tuple[bytes | None, str]:
        """One RX transfer -> (frame, "") or (None, reason). Never raises on device data."""
        n = len(buf)
        if self.shape is Shape.RAW:
            if n == 0:
                return None, "zero_length"
            if n < ETH_MIN:
                return None, "runt"
            if n > self.max_frame:
                return None, "oversize"
            return buf, ""
        if self.shape is Shape.HEADER2:
            if n < 2:
                return None, "truncated"
            length = (buf[0] | (buf[1] << 8)) & 0x0FFF
            start, avail = 2, n - 2
            status = 0
        else:
            if n < 4:
                return None, "truncated"
            declared = (buf[n - 4] | (buf[n - 3] << 8)) & 0x0FFF
            status = buf[n - 2]
            if declared == 0:
                return None, "zero_length"
            if declared < 4:
                return None, "runt"
            length = declared - 4           # the count includes the CRC the chip stripped
            start, avail = 0, n - 4
        for bit, reason in self.rx_error_bits:
            if status & bit:
                return None, reason
        if length == 0:
            return None, "zero_length"
        if length > self.max_frame:
            return None, "oversize"
        if length > avail:
            return None, "length_beyond_transfer"
        if length < ETH_MIN:
            return None, "runt"
        return buf[start:start + length], ""

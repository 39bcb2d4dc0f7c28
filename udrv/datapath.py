"""The datapath contract: what moves frames between the TX journal, the device and the host.

USB drivers get theirs from the framework (`udrv.usbnet.UsbNetEngine`, driven by the framing
they declare); PCI drivers implement one over their descriptor rings. Either way the runtime
only calls these methods, and the guard wraps `xmit` and `poll` as datapath entry points.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class DatapathCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_dropped: dict[str, int] = field(default_factory=dict)
    tx_errors: dict[str, int] = field(default_factory=dict)
    status_packets: int = 0

    def drop(self, reason: str) -> None:
        self.rx_dropped[reason] = self.rx_dropped.get(reason, 0) + 1

    def tx_error(self, reason: str) -> None:
        self.tx_errors[reason] = self.tx_errors.get(reason, 0) + 1

    def __add__(self, other: DatapathCounters) -> DatapathCounters:
        def merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
        return DatapathCounters(self.rx_packets + other.rx_packets, self.rx_bytes + other.rx_bytes,
                                self.tx_packets + other.tx_packets, self.tx_bytes + other.tx_bytes,
                                merged(self.rx_dropped, other.rx_dropped), merged(self.tx_errors, other.tx_errors),
                                self.status_packets + other.status_packets)


class Datapath(Protocol):
    counters: DatapathCounters
    running: bool

    def start(self) -> None:
        """Begin moving frames (USB: submit RX transfers; PCI: rings armed, RX enabled)."""

    def stop(self) -> None:
        """Stop and give back every in-flight buffer/transfer (no leaks)."""

    def reset(self) -> int:
        """After a fault: recycle buffers, rewind the journal, start again. Returns frames re-issued."""

    def xmit(self) -> int:
        """Hand unsent journal frames to the device; returns how many."""

    def poll(self, timeout: float = 0.0) -> int:
        """Harvest RX into the sink and TX completions into the journal; returns work done."""

"""The datapath contract: what moves frames between the TX journal, the device and the host.

A datapath is built by a framework engine, never by hand in a driver: `udrv.usbnet` for USB
(driven by the framing a driver declares), `udrv.pcinet` for descriptor rings (driven by the
ring codec a driver declares), each in a Python and a C implementation. The runtime calls only
what `Datapath` declares, and asks `caps` — a frozen record fixed when the datapath is built —
what the datapath does itself, instead of probing for attributes. `DatapathDefaults` gives the
answers of a datapath that does none of the optional things, so an engine writes only what it
does. The guard wraps `xmit`, `poll` and `run` as datapath entry points.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable


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
        return DatapathCounters(self.rx_packets + other.rx_packets, self.rx_bytes + other.rx_bytes,
                                self.tx_packets + other.tx_packets, self.tx_bytes + other.tx_bytes,
                                _merged(self.rx_dropped, other.rx_dropped), _merged(self.tx_errors, other.tx_errors),
                                self.status_packets + other.status_packets)


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


@dataclass
class TapCounts:
    """What a datapath that reads the TAP itself counted on the TAP side (the runtime counts
    the same things for the frames it reads: the interface shows the sum)."""
    frames_in: int = 0                      # TAP frames read
    offload_frames: int = 0                 # of those, frames that asked for checksum/TSO work
    dropped: dict[str, int] = field(default_factory=dict)   # TX drops by reason
    segments: int | None = None             # wire frames cut in software from TSO frames

    def __add__(self, other: TapCounts) -> TapCounts:
        seg = None if self.segments is None and other.segments is None else \
            (self.segments or 0) + (other.segments or 0)
        return TapCounts(self.frames_in + other.frames_in, self.offload_frames + other.offload_frames,
                         _merged(self.dropped, other.dropped), seg)


@dataclass(frozen=True)
class Capabilities:
    """What a datapath does itself; fixed when it is built (a reopened transport gets a new one)."""
    reads_tap: bool = False        # reads the TAP in its own xmit()/run(): the runtime must not
    pulls_tap: bool = False        # pull_tap() journals TAP frames while the NIC is not up
    runs_turns: bool = False       # run() loops whole turns (device, TAP, wake fd) in C
    keeps_tx_clock: bool = False   # tx_clock(): its own TX hang clock; run() comes back on a stall
    handles_vnet: bool = False     # journal entries may keep a virtio-net header: it offloads them
    keeps_in_flight: bool = False  # resume(): after a driver-side fault its transfers may stay
    beats: bool = False            # run() stores the worker's heartbeat in C each turn (udrv/heartbeat.py)


@dataclass
class DatapathReport:
    """Sections of `udrv status` only some datapaths have (None: this one has no such thing)."""
    tx_thread: bool | None = None                 # a TX half on a thread of its own
    c_loop: dict[str, int] | None = None          # turns and sleeps of a loop in C
    rx_coalesce: dict[str, int] | None = None     # GRO in the driver
    tx_offload: dict[str, int] | None = None      # journal frames by how their offload went


@runtime_checkable
class Datapath(Protocol):
    counters: DatapathCounters
    running: bool
    caps: Capabilities

    def start(self) -> None:
        """Begin moving frames (USB: submit RX transfers; PCI: rings armed, RX enabled)."""

    def stop(self) -> None:
        """Stop and give back every in-flight buffer/transfer (no leaks)."""

    def close(self) -> None:
        """The datapath is going away for good (free what C holds)."""

    def reset(self) -> int:
        """After a fault: recycle buffers, rewind the journal, start again. Returns frames re-issued."""

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        """reset(), saying what became of the transfers in flight: (frames re-issued, what)."""

    def resume(self) -> bool:
        """After a driver-side fault: carry on with the transfers in flight if nothing reset the
        device's endpoints (caps.keeps_in_flight); False: recycle instead."""

    def xmit(self) -> int:
        """Hand unsent journal frames to the device (reading the TAP first if caps.reads_tap);
        returns how many."""

    def poll(self, timeout: float = 0.0) -> int:
        """Harvest RX into the sink and TX completions into the journal; returns work done."""

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Turns for up to timeout seconds, back early when wake_fd is readable or Python must
        act (caps.runs_turns; otherwise one poll)."""

    def pull_tap(self) -> int:
        """Journal what the TAP holds without sending it (caps.pulls_tap)."""

    def set_tap_fallback(self, enqueue: Callable[[list[bytes]], int]) -> None:
        """Where a datapath that reads the TAP sends the frames only the runtime can judge."""

    def watch_tx(self, timeout: float) -> None:
        """The TX hang budget, for a datapath that keeps its own clock."""

    def tx_clock(self) -> tuple[float, float | None]:
        """(last OUT completion, oldest OUT transfer waiting since or None) on its own clock."""

    def restart_tx_clock(self) -> None:
        """Frames wait for the link: start the hang clock again."""

    def tap_counts(self) -> TapCounts:
        """TAP-side counts of a datapath that reads the TAP (zero otherwise)."""

    def report(self) -> DatapathReport:
        """The optional status sections."""


class DatapathDefaults:
    """The answers of a datapath that does none of the optional things (caps all False)."""
    caps: Capabilities = Capabilities()

    def close(self) -> None:
        pass

    def reset(self) -> int:
        return self.recycle(clear_halts=True)[0]

    def recycle(self, clear_halts: bool) -> tuple[int, str]:
        return self.reset(), "in-flight transfers recycled"

    def resume(self) -> bool:
        return False

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        return self.poll(timeout)                         # type: ignore[attr-defined]

    def pull_tap(self) -> int:
        return 0

    def set_tap_fallback(self, enqueue: Callable[[list[bytes]], int]) -> None:
        pass

    def watch_tx(self, timeout: float) -> None:
        pass

    def tx_clock(self) -> tuple[float, float | None]:
        raise NotImplementedError(f"{type(self).__name__} keeps no TX clock (caps.keeps_tx_clock is False)")

    def restart_tx_clock(self) -> None:
        pass

    def tap_counts(self) -> TapCounts:
        return TapCounts()

    def report(self) -> DatapathReport:
        return DatapathReport()

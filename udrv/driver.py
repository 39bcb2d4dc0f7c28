"""The driver contract.

A driver is one file of device knowledge. It implements the entry points below and declares
which of its attributes are soft state (`soft`, a dataclass the framework snapshots before
every configuration call). It writes no recovery code: the guard (udrv.guard) snapshots,
rolls back, restores and retries; the runtime (udrv.nic) owns journals and transfers.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .actions import ActionList


@dataclass(frozen=True)
class RxMode:
    promisc: bool = False
    allmulti: bool = False
    multicast: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class LinkState:
    up: bool
    speed: int = 0            # Mbit/s
    full_duplex: bool = False


@dataclass
class DriverStats:
    """Device-side counters a driver can read from its hardware (beyond what the framework counts)."""
    rx_missed: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    collisions: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class FrameSink(Protocol):
    def __call__(self, frame: bytes) -> None: ...


class NetDriver(abc.ABC):
    """Entry points, by kind. Configuration entry points run as full transactions (soft-state
    snapshot + device checkpoint, rollback + restore + one retry); datapath entry points run
    with a near-free guard and recover by restoring the last checkpoint."""

    name: ClassVar[str]
    CONFIG_ENTRIES: ClassVar[tuple[str, ...]] = (
        "open", "stop", "set_mac", "set_rx_mode", "set_mtu", "link_check")
    DATAPATH_ENTRIES: ClassVar[tuple[str, ...]] = ("xmit", "poll")
    min_mtu: ClassVar[int] = 68
    max_mtu: ClassVar[int] = 1500

    soft: Any          # the driver's soft state: a dataclass, snapshotted by the framework
    actions: ActionList
    datapath: Any = None

    def bind(self) -> None:
        """Take ownership of the device (claim interfaces, enable the PCI function)."""

    @abc.abstractmethod
    def probe(self) -> None:
        """Bring the device from power-on to ready (reset, identify, read the MAC)."""

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def set_mac(self, mac: bytes) -> None: ...

    @abc.abstractmethod
    def set_rx_mode(self, mode: RxMode) -> None: ...

    def set_mtu(self, mtu: int) -> None:
        if not self.min_mtu <= mtu <= self.max_mtu:
            raise ValueError(f"MTU {mtu} is outside what {self.name} supports "
                             f"({self.min_mtu}..{self.max_mtu})")
        self.soft.mtu = mtu

    @abc.abstractmethod
    def link_check(self) -> LinkState: ...

    @abc.abstractmethod
    def stats(self) -> DriverStats: ...

    @abc.abstractmethod
    def checkpoint(self) -> Any:
        """Capture what a resume needs, without stopping the device (suspend, refactored)."""

    @abc.abstractmethod
    def restore(self, cp: Any) -> None:
        """Bring the device back to `cp` without a full probe (resume, refactored)."""

    @abc.abstractmethod
    def make_datapath(self, journal: Any, sink: FrameSink, n_rx: int, n_tx: int,
                      on_progress: Any) -> Any:
        """Build this driver's `udrv.datapath.Datapath` and keep it as self.datapath
        (open() starts it, stop() stops it)."""

    def invariants(self) -> list[str]:
        """Broken invariants of the soft state (empty = fine); checked after config calls."""
        return []

    @property
    def mac(self) -> bytes:
        return self.soft.mac

    def close(self) -> None:
        """Give everything back (the framework's action list does the undoing)."""
        self.actions.release_all()

"""The driver contract.

A driver is one file of device knowledge. It implements the entry points below and declares
which of its attributes are soft state (`soft`, a dataclass the framework snapshots before
every configuration call). It writes no recovery code: the guard (udrv.guard) snapshots,
rolls back, restores and retries; the framework engines (udrv.usbnet, udrv.pcinet) own
journals, transfers and rings. Every attribute the runtime reads of a driver is declared here.
"""
from __future__ import annotations

import abc
import os
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
    # (RX, TX) transfers or descriptors in flight unless the operator says otherwise
    default_rings: ClassVar[tuple[int, int]] = (4, 8)
    # TX offloads (udrv.offload names) the runtime asks the TAP for; a chip may narrow its
    # class's set on the instance at construction, before the first datapath is built
    offloads: frozenset[str] = frozenset()
    # the datapath writes GSO super-frames to the TAP (RX coalescing): the TAP needs a
    # virtio-net header even when no TX offload is on
    rx_vnet_hdr: ClassVar[bool] = False
    # this class runs its engine's C implementation (made by c_variant())
    fast_path: ClassVar[bool] = False

    soft: Any          # the driver's soft state: a dataclass, snapshotted by the framework
    actions: ActionList
    datapath: Any = None

    @classmethod
    def c_variant(cls) -> type[NetDriver] | None:
        """The same driver on its engine's C datapath: a subclass with fast_path = True and what
        the engine declares differently for it (c_declarations), made once; None where the
        engine has no C datapath for this driver."""
        if cls.fast_path or not cls.has_c_datapath():
            return None
        made = cls.__dict__.get("_c_variant")
        if made is None:
            made = type(f"{cls.__name__}Native", (cls,), {
                "fast_path": True, "__module__": cls.__module__,
                "__doc__": f"{cls.__name__} on its engine's C datapath (same device code).",
                **cls.c_declarations()})
            cls._c_variant = made
        return made

    @classmethod
    def has_c_datapath(cls) -> bool:
        """The engine has a C datapath for this driver (its engine says)."""
        return False

    @classmethod
    def c_declarations(cls) -> dict[str, Any]:
        """Class attributes the C variant declares differently (rings in flight, offloads)."""
        return {}

    @classmethod
    def implementations(cls) -> tuple[type[NetDriver], ...]:
        """The implementations of this driver, best first: the runtime runs the first and swaps
        to the next after repeated escalations (design diversity). The C variant leads when the
        fast path is built and UDRV_DATAPATH=python does not ask for Python alone."""
        from . import fastpath
        c = cls.c_variant()
        if c is None or cls.fast_path or os.environ.get("UDRV_DATAPATH") == "python" or not fastpath.available():
            return (cls,)
        return (c, cls)

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

"""Fault injection into driver entry points (for tests, the demo and the fault campaign).

A fault is armed for one entry point and fires inside its next `count` calls:

  raise       the driver raises an exception after its first device operation (so the call
              has a partial effect on the device that rollback must undo)
  hang        the driver stops making progress at its first device operation (the guard's
              watchdog must notice)
  corrupt     the driver leaves its soft state inconsistent (an invariant check must notice)
  stall       the device STALLs the call's first operation
  timeout     the device does not answer the call's first operation
  disconnect  the device reports itself gone for the call's first operation

Device-side kinds are injected by wrapping the driver's transport for the duration of one
call, so nothing costs anything while no fault is armed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .errors import DeviceGone, InjectedFault, Stall, TransferTimeout, UdrvError

KINDS = ("raise", "hang", "corrupt", "stall", "timeout", "disconnect")
_DEVICE_OPS = frozenset({
    "control_in", "control_out", "submit_in", "submit_out", "clear_halt", "set_alt_setting",
    "read32", "write32", "config_read", "config_write",
})


@dataclass
class FaultSpec:
    entry: str
    kind: str
    count: int = 1          # calls that fault: 1 = transient (the retry succeeds), 2+ = persistent
    after_ops: int = 1      # device operations the call completes before the fault

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UdrvError(f"unknown fault kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.count < 1:
            raise UdrvError("a fault count must be at least 1")


class _Fire(Exception):
    pass


class FaultyTransport:
    """Forwards to the real transport; the armed fault fires on the n-th device operation."""

    def __init__(self, real: Any, active: "ActiveFault"):
        self._real = real
        self._active = active

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in _DEVICE_OPS:
            return attr

        def op(*args: Any, **kw: Any) -> Any:
            self._active.before_op()
            return attr(*args, **kw)
        return op


@dataclass
class ActiveFault:
    spec: FaultSpec
    ops: int = 0
    fired: bool = False
    hang_limit: float = 30.0     # a hang no watchdog catches still ends (as a test failure)

    def before_op(self) -> None:
        if self.fired:
            return
        self.ops += 1
        if self.spec.kind in ("raise", "corrupt") and self.ops <= self.spec.after_ops:
            return
        if self.spec.kind == "corrupt":
            return
        self.fire()

    def fire(self) -> None:
        self.fired = True
        kind = self.spec.kind
        if kind == "raise":
            raise InjectedFault(f"injected exception in {self.spec.entry}")
        if kind == "stall":
            raise Stall("injected STALL")
        if kind == "timeout":
            raise TransferTimeout("injected device timeout")
        if kind == "disconnect":
            raise DeviceGone("injected disconnect")
        if kind == "hang":
            end = time.monotonic() + self.hang_limit
            while time.monotonic() < end:      # the guard's watchdog interrupts this loop
                time.sleep(0.001)
            raise InjectedFault("injected hang was never interrupted by the watchdog")


class FaultInjector:
    def __init__(self) -> None:
        self.armed: dict[str, FaultSpec] = {}
        self.fired: list[FaultSpec] = []

    def arm(self, spec: FaultSpec) -> None:
        self.armed[spec.entry] = spec

    def disarm(self, entry: str | None = None) -> None:
        if entry is None:
            self.armed.clear()
        else:
            self.armed.pop(entry, None)

    def begin(self, entry: str, driver: Any) -> ActiveFault | None:
        spec = self.armed.get(entry)
        if spec is None:
            return None
        spec.count -= 1
        if spec.count <= 0:
            del self.armed[entry]
        active = ActiveFault(FaultSpec(spec.entry, spec.kind, 1, spec.after_ops))
        self.fired.append(active.spec)
        if hasattr(driver, "usb"):
            driver.usb = FaultyTransport(driver.usb, active)
        elif hasattr(driver, "pci"):
            driver.pci = FaultyTransport(driver.pci, active)
        return active

    @staticmethod
    def end(active: ActiveFault, driver: Any, ok: bool) -> None:
        """Unwrap the transport; a fault that found no device operation fires at the exit."""
        for name in ("usb", "pci"):
            t = getattr(driver, name, None)
            if isinstance(t, FaultyTransport):
                setattr(driver, name, t._real)
        if ok and not active.fired:
            if active.spec.kind == "corrupt":
                active.fired = True
                corrupt_soft_state(driver)
            else:
                active.fire()


def corrupt_soft_state(driver: Any) -> None:
    """What a wild write would do: scribble over the soft state the driver relies on."""
    soft = getattr(driver, "soft", None)
    if soft is not None and hasattr(soft, "mac"):
        soft.mac = b"\xff" * 7       # not even the right length: an invariant must catch it

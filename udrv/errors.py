"""Errors udrv raises. Each message says, in one sentence, what happened and what to do."""
from __future__ import annotations


class UdrvError(Exception):
    """Base class; str(e) is meant to be shown to the user as-is."""


# --- transport-level faults (device said no, or did not answer) -----------------------

class TransportError(UdrvError):
    """A device operation failed; the device may still be usable."""


class DatapathError(TransportError):
    """The datapath saw a device error it cannot absorb (the guard restores and re-issues)."""


class DeviceGone(TransportError):
    """The device disappeared (unplugged, reset by the host, or unbound)."""


class Stall(TransportError):
    """The device STALLed a request (protocol error on that endpoint)."""


class TransferTimeout(TransportError):
    """The device did not answer within the timeout."""


class TxHang(TransferTimeout):
    """Frames handed to the device and no TX completion for the hang detector's timeout: the
    device stopped taking frames without reporting anything (Xen's and usbnet's TX watchdog)."""


class DeviceNotFound(UdrvError):
    pass


class PermissionDeniedError(UdrvError):
    pass


class DeviceBusy(UdrvError):
    pass


# --- driver-level faults (the guard turns these into recoveries) ----------------------

class DriverFault(UdrvError):
    """A driver entry point failed: raised, overran its deadline, or broke an invariant."""

    def __init__(self, entry: str, kind: str, detail: str):
        super().__init__(f"{entry}: {kind}: {detail}")
        self.entry = entry
        self.kind = kind
        self.detail = detail


class EntryTimeout(UdrvError):
    """Raised inside an entry point by the guard's watchdog when its deadline passes."""


class InjectedFault(UdrvError):
    """A fault the fault injector raised on purpose."""


class Escalation(UdrvError):
    """In-process recovery failed twice; the supervisor must restart or swap the driver."""

    def __init__(self, fault: DriverFault):
        super().__init__(f"in-process recovery failed, escalating: {fault}")
        self.fault = fault


class BadFrame(UdrvError):
    """A malformed frame from the device; counted by reason, never fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- host setup and DMA (PCI / VFIO) ----------------------------------------------------

class HostSetupError(UdrvError):
    """The host is not set up for the operation (kernel module not loaded, IOMMU off, group not viable)."""


class DeviceNotBound(UdrvError):
    """The device exists but is not bound to the driver udrv needs (vfio-pci)."""


class DmaError(UdrvError):
    """DMA memory or IOVA misuse: window exhausted, double free, unknown buffer, mapping refused."""

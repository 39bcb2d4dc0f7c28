"""The device registry: which udrv driver serves a device, and which of its implementations run.

  open_device(spec, ...)      DEVICE (usb:VID:PID, usb:BUS-PORT, pci:BDF, model:NAME) ->
                              Device(implementations best first, transport, model or None)
  implementations(cls, impl)  a driver's implementations, best first (its own
                              `implementations()`), or the one an operator names (`IMPLS`)
  usb_drivers(), pci_drivers()  every driver udrv ships, per bus, in matching order
  usb_driver_for(info), pci_driver_for(vendor, device)   the driver a device gets, or None
  EMBEDDED                    the device models udrv serves in process (model:NAME)

`udrv run`, `udrv list`, the benches and the tests all ask here, so a device means the same
driver and the same implementations wherever it is opened.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, NamedTuple

from . import drivers
from .driver import NetDriver
from .errors import UdrvError

log = logging.getLogger("udrv")

from .models.catalog import BUS, EMBEDDED
# models behind an in-process USB transport: the drivers' C variants need libusb's own handles
PYTHON_ONLY_MODELS = tuple(k for k in EMBEDDED if BUS[k] == "usb")
# an operator's choice of one implementation (`--impl`): the runtime then has no spare to swap to
IMPLS = ("c", "python")


class Device(NamedTuple):
    implementations: tuple[type[NetDriver], ...]    # best first: Nic runs the first, swaps to the next
    transport: Any
    model: Any                                      # the embedded model, None on real hardware


def usb_drivers() -> list[Any]:
    return [importlib.import_module(f"udrv.drivers.{n}").DRIVER for n in drivers.USB_DRIVERS]


def pci_drivers() -> list[Any]:
    return [importlib.import_module(f"udrv.drivers.{n}").DRIVER for n in drivers.PCI_DRIVERS]


def usb_driver_for(info: Any) -> Any:
    """The driver for a USB device (udrv.usbtransport.DeviceInfo), or None: id matches first;
    class drivers (CDC-ECM) bind by interface class after every id match failed."""
    cls = next((c for c in usb_drivers() if c.match(info.vid, info.pid, info.device_class)), None)
    return cls or next((c for c in usb_drivers() if c.match_device(info)), None)


def pci_driver_for(vendor: int, device: int) -> Any:
    """The driver for a PCI function with these ids, or None."""
    return next((c for c in pci_drivers() if c.match(vendor, device)), None)


_warned_no_fast_path = False


def implementations(cls: type[NetDriver], impl: str | None = None) -> tuple[type[NetDriver], ...]:
    """The implementations of cls (a driver as registered, on its Python datapath), best first;
    impl ("c" or "python") keeps that one alone.

    Without impl a driver that has a C variant but runs without it (the fast path is not built)
    is logged once per process with what to do, since it runs far slower than it could."""
    global _warned_no_fast_path
    if impl is None:
        impls = cls.implementations()
        if (len(impls) == 1 and not impls[0].fast_path and cls.c_variant() is not None
                and os.environ.get("UDRV_DATAPATH") != "python" and not _warned_no_fast_path):
            from . import fastpath
            if not fastpath.available():
                _warned_no_fast_path = True
                log.warning("event=no-fast-path the C fast path (udrv._native) is not built: %s runs its "
                            "Python datapath, far slower: %s", cls.name, fastpath.why_unavailable())
        return impls
    if impl == "python":
        return (cls,)
    if impl == "c":
        variant = cls.c_variant()
        if variant is None:
            raise UdrvError(f"{cls.name} has no C implementation: use --impl python")
        from . import fastpath
        if not fastpath.available():
            raise UdrvError(f"--impl c needs the C fast path: {fastpath.why_unavailable()}")
        return (variant,)
    raise UdrvError(f"no implementation called {impl!r}: use --impl " + " or --impl ".join(IMPLS))


def open_device(spec: str | None, *, wire_mbit: float | None = None, wire_delay_ms: float = 0.0,
                impl: str | None = None) -> Device:
    """Open DEVICE (None: the embedded pegasus model) and pick its driver's implementations.

    wire_mbit / wire_delay_ms pace the wire of an embedded USB model (udrv.models.wire)."""
    if spec is None or spec.startswith("model:"):
        kind = (spec or "model:pegasus").removeprefix("model:")
        cls, transport, model = _embedded(kind, wire_mbit, wire_delay_ms)
        if kind in PYTHON_ONLY_MODELS:
            if impl == "c":
                transport.close()
                raise UdrvError(f"model:{kind} runs the Python engines (the C USB ring moves its transfers "
                                "through libusb, which an embedded model is not behind): use --impl python, or a "
                                "usb: device")
            return Device(usb_model_implementations(cls, impl), transport, model)
        return _picked(cls, impl, transport, model)
    if wire_mbit is not None:
        raise UdrvError("--wire-mbit sets the wire of an embedded model (model:pegasus, model:cdc_ecm); a real "
                        "device's wire runs at its link speed")
    if spec.startswith("usb:"):
        from .libusb import LibusbTransport, UsbSelector
        try:
            selector = UsbSelector.parse(spec)
        except ValueError as e:
            raise UdrvError(str(e)) from None
        transport = LibusbTransport(selector)
        info = transport.info
        cls = usb_driver_for(info)
        if cls is None:
            transport.close()
            raise UdrvError(f"no udrv driver knows USB device {info.ident}: `udrv list` shows supported ones")
        return _picked(cls, impl, transport, None)
    if spec.startswith("pci:"):
        from .pcibind import normalize_bdf, pci_info
        from .vfio import VfioTransport
        bdf = normalize_bdf(spec.removeprefix("pci:"))
        info = pci_info(bdf)
        cls = pci_driver_for(info.vendor, info.device)
        if cls is None:
            raise UdrvError(f"no udrv driver knows PCI device {info.ident} at {bdf}: `udrv list` shows "
                            "supported ones")
        impls = implementations(cls, impl)      # before the device is opened: a refused --impl leaves it alone
        return Device(impls, VfioTransport.open(bdf), None)
    raise UdrvError(f"{spec!r} names no device: use usb:VID:PID, usb:BUS-PORT, pci:BDF or "
                    "model:" + "|".join(EMBEDDED))


def _picked(cls: type[NetDriver], impl: str | None, transport: Any, model: Any) -> Device:
    """The Device, or the transport closed again when impl cannot be had."""
    try:
        return Device(implementations(cls, impl), transport, model)
    except BaseException:
        transport.close()
        raise


def _embedded(kind: str, wire_mbit: float | None, wire_delay_ms: float) -> tuple[Any, Any, Any]:
    """A device model served in process (no hardware): the driver runs on it through the same
    transport interface as on a real device; its wire is the peer namespace's veth, as fast as
    the host unless wire_mbit paces it (USB models: udrv.models.wire)."""
    from .models.catalog import make_model
    made = make_model(kind, wire_mbit, wire_delay_ms)
    cls = embedded_driver(kind)
    if made.bus == "usb":
        from .models.usb import ModelUsbTransport
        return cls, ModelUsbTransport(made.device), made.model
    from .models.pci import ModelPciTransport
    return cls, ModelPciTransport(made.device), made.model


def usb_model_implementations(cls: type[NetDriver], impl: str | None) -> tuple[type[NetDriver], ...]:
    """An embedded USB model's implementations: all but the C ring (it moves transfers through
    libusb, which a model is not behind)."""
    return tuple(c for c in implementations(cls, impl) if not c.fast_path) or (cls,)


def embedded_driver(kind: str) -> type[NetDriver]:
    """The driver of an embedded model."""
    if kind not in EMBEDDED:
        raise UdrvError(f"no embedded model called {kind!r}: use one of " + ", ".join(f"model:{k}" for k in EMBEDDED))
    return importlib.import_module(f"udrv.drivers.{kind}").DRIVER

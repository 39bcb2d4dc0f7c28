"""The embedded device models udrv serves without hardware (`model:NAME`), by name.

Both the in-process daemon (udrv/registry.py, which adds the driver) and the device process of
the supervised daemon (udrv/devicehost.py, which must not import a driver) build them here.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import UdrvError

EMBEDDED = ("pegasus", "e1000", "cdc_ecm")
BUS = {"pegasus": "usb", "e1000": "pci", "cdc_ecm": "usb"}


class Embedded(NamedTuple):
    bus: str            # "usb" | "pci"
    model: Any          # the device model (what the peer wire and device events reach)
    device: Any         # what the transport serves: the model, or a paced wire in front of it


def make_model(kind: str, wire_mbit: float | None = None, wire_delay_ms: float = 0.0) -> Embedded:
    """A fresh model of KIND; wire_mbit paces the wire of a USB model (udrv.models.wire)."""
    if kind == "pegasus":
        from .pegasus import PegasusModel
        return _usb(PegasusModel(), wire_mbit, wire_delay_ms)
    if kind == "cdc_ecm":
        from .cdc_ecm import EcmModel
        return _usb(EcmModel(), wire_mbit, wire_delay_ms)
    if kind == "e1000":
        if wire_mbit is not None:
            raise UdrvError("--wire-mbit paces the USB models (model:pegasus, model:cdc_ecm), not model:e1000")
        from .e1000 import E1000Model
        model = E1000Model("82540em")
        return Embedded("pci", model, model)
    raise UdrvError(f"no embedded model called {kind!r}: use one of " + ", ".join(f"model:{k}" for k in EMBEDDED))


def _usb(model: Any, wire_mbit: float | None, wire_delay_ms: float) -> Embedded:
    if wire_mbit is None:
        return Embedded("usb", model, model)
    from .wire import PacedWire
    return Embedded("usb", model, PacedWire(model, wire_mbit, delay=wire_delay_ms / 1e3))


def device_event(model: Any, action: str) -> str | None:
    """A physical event on an embedded model (a real device needs a real hand): None when done,
    else what is wrong with the request."""
    try:
        if action == "unplug":
            model.unplug()
        elif action == "replug":
            model.replug()
        elif action in ("link-down", "link-up"):
            model.set_link(action == "link-up")
        elif action.startswith("garbage:"):
            model.inject_rx_garbage(action.split(":", 1)[1])
        else:
            return (f"unknown device event {action!r}: use unplug, replug, link-down, link-up or "
                    "garbage:<kind>")
    except AttributeError:
        return f"the {type(model).__name__} has no {action.split(':')[0]} event: try link-down or link-up"
    return None

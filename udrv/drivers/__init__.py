"""Device drivers, imported as udrv.drivers.<name>. Each module exports DRIVER."""
from __future__ import annotations

USB_DRIVERS = ("pegasus", "cdc_ecm")
PCI_DRIVERS: tuple[str, ...] = ("e1000",)

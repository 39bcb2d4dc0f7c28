"""The test bed: what the kernel tier and the benches stand udrv on.

  configfs, ffs, aio   software USB devices: configfs gadgets on a UDC (dummy_hcd), a FunctionFS
                       server that serves any udrv device model as a real USB device, and a
                       helper for the kernel's own CDC-ECM function (ecm_stub: a driver stand-in
                       for the C ring on it)
  pegasus_gadget       the pegasus model as a USB device with a peer network behind it
  pegasus_pump         that gadget's data path in C
  guest                a Debian kernel booted in QEMU (TCG) that runs a command
  rigs                 the bench and test-bed C (udrv._rigs)

    from udrv.testbed import ModelGadget, GadgetConfig, ecm_gadget
"""
from __future__ import annotations

from .configfs import (Gadget, GadgetError, GadgetSpec, default_udc, ecm_gadget, find_host_device,
                       host_endpoints, interface_driver, interface_netdevs, modprobe, wait_host_device)
from .ffs import (DUMMY_HCD_ENDPOINTS, FfsCounters, FfsServer, FunctionPlan, GadgetConfig, LayoutError,
                  ModelGadget, plan_endpoints, plan_function)

__all__ = [
    "DUMMY_HCD_ENDPOINTS", "FfsCounters", "FfsServer", "FunctionPlan", "Gadget", "GadgetConfig", "GadgetError",
    "GadgetSpec", "LayoutError", "ModelGadget", "default_udc", "ecm_gadget", "find_host_device",
    "host_endpoints", "interface_driver", "interface_netdevs", "modprobe", "plan_endpoints", "plan_function",
    "wait_host_device",
]

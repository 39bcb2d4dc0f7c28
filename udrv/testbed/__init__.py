"""Software USB devices for the kernel tier: configfs gadgets on a UDC (dummy_hcd), a
FunctionFS server that serves any udrv device model as a real USB device, and a helper for
the kernel's own CDC-ECM function.

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

"""udrv: userspace network drivers on real USB and PCI hardware that survive their own bugs."""
__version__ = "0.1.0"

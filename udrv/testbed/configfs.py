"""USB gadgets through configfs: create, bind to a UDC, unbind, remove.

A gadget is a directory under /sys/kernel/config/usb_gadget holding the device descriptor
(ids, class, strings), one configuration, and functions linked into it. Binding writes a
UDC name (in the kernel tier: `dummy_udc.0` from dummy_hcd) to the gadget's UDC file; the
host side of the same kernel then enumerates the device like any plugged-in one.

Two kinds of function are used here: FunctionFS (`ffs.<instance>`, the device is served by a
userspace process — see udrv.testbed.ffs) and kernel functions such as CDC-ECM (`ecm.<instance>`,
see `ecm_gadget`). Everything is plain file I/O; `modprobe` is the only external command.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from udrv.errors import UdrvError
from udrv.usbtransport import DeviceInfo

CONFIGFS = Path("/sys/kernel/config/usb_gadget")
UDC_CLASS = Path("/sys/class/udc")
USB_DEVICES = Path("/sys/bus/usb/devices")
LANG_EN_US = "0x409"
CONFIG_DIR = "c.1"

MODPROBE_TIMEOUT = 30.0
UDC_APPEAR_TIMEOUT = 5.0
ENUMERATE_TIMEOUT = 10.0
POLL_STEP = 0.02


class GadgetError(UdrvError):
    """A gadget could not be created, bound or found; the message says what to do."""


# --- small helpers -----------------------------------------------------------------------------

def modprobe(*modules: str, timeout: float = MODPROBE_TIMEOUT) -> None:
    """Load kernel modules (there is no udev in the kernel-tier guest to do it for us)."""
    for mod in modules:
        try:
            cp = subprocess.run(["modprobe", mod], capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise GadgetError("modprobe is missing: apt-get install kmod") from None
        if cp.returncode != 0:
            raise GadgetError(f"modprobe {mod} failed ({cp.stderr.strip() or 'no output'}): the kernel needs "
                              f"CONFIG for {mod} built as a module, and modules for `uname -r` installed")


def wait_for(pred, timeout: float, what: str, hint: str = "") -> None:
    """Poll pred() until true or raise GadgetError naming what did not happen."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= end:
            raise GadgetError(f"{what} did not happen within {timeout:.1f} s{': ' + hint if hint else ''}")
        time.sleep(POLL_STEP)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise GadgetError(f"writing {value.strip()!r} to {path} failed: {e.strerror}") from None


def udcs() -> list[str]:
    return sorted(p.name for p in UDC_CLASS.iterdir()) if UDC_CLASS.is_dir() else []


def default_udc(load_dummy: bool = True, timeout: float = UDC_APPEAR_TIMEOUT) -> str:
    """The first UDC; with none present, load dummy_hcd (software host + device controller)."""
    if not udcs() and load_dummy:
        modprobe("dummy_hcd")
        wait_for(lambda: bool(udcs()), timeout, "dummy_hcd registering a UDC",
                 "check `dmesg` for dummy_hcd errors")
    found = udcs()
    if not found:
        raise GadgetError("no USB device controller (UDC) in /sys/class/udc: modprobe dummy_hcd, "
                          "or run on a board with a UDC")
    return found[0]


def ensure_configfs() -> None:
    if not CONFIGFS.is_dir():
        modprobe("libcomposite")
    if not CONFIGFS.is_dir():
        raise GadgetError(f"{CONFIGFS} is missing: mount configfs at /sys/kernel/config "
                          "(mount -t configfs none /sys/kernel/config) and modprobe libcomposite")


# --- the gadget --------------------------------------------------------------------------------

@dataclass
class GadgetSpec:
    """The device descriptor and strings the host will see."""
    vid: int
    pid: int
    bcd_device: int = 0x0100
    bcd_usb: int = 0x0200
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0
    manufacturer: str = "udrv"
    product: str = "udrv gadget"
    serial: str = "0001"
    configuration: str = "udrv"
    max_power_ma: int = 100

    @classmethod
    def from_device_info(cls, info: DeviceInfo) -> "GadgetSpec":
        return cls(vid=info.vid, pid=info.pid, bcd_device=info.bcd_device, device_class=info.device_class,
                   manufacturer=info.manufacturer or "udrv", product=info.product or "udrv model",
                   serial=info.serial or "0001")


@dataclass
class Gadget:
    """One configfs gadget with a single configuration. Use as a context manager or call
    create() / bind() / unbind() / remove() yourself; remove() also cleans up leftovers of an
    earlier run with the same name."""
    name: str
    spec: GadgetSpec
    root: Path = CONFIGFS
    functions: list[str] = field(default_factory=list)
    udc: str | None = None

    @property
    def path(self) -> Path:
        return self.root / self.name

    def create(self) -> "Gadget":
        ensure_configfs()
        if self.path.exists():
            self.remove()          # a previous run died without cleaning up
        s, p = self.spec, self.path
        try:
            p.mkdir()
        except OSError as e:
            raise GadgetError(f"cannot create gadget {p}: {e.strerror} (run as root; is configfs mounted?)") from None
        for attr, val in (("idVendor", s.vid), ("idProduct", s.pid), ("bcdDevice", s.bcd_device),
                          ("bcdUSB", s.bcd_usb), ("bDeviceClass", s.device_class),
                          ("bDeviceSubClass", s.device_subclass), ("bDeviceProtocol", s.device_protocol)):
            _write(p / attr, f"0x{val:04x}\n")
        (p / "strings" / LANG_EN_US).mkdir(parents=True, exist_ok=True)
        for attr, val in (("manufacturer", s.manufacturer), ("product", s.product), ("serialnumber", s.serial)):
            _write(p / "strings" / LANG_EN_US / attr, val + "\n")
        cfg = p / "configs" / CONFIG_DIR
        (cfg / "strings" / LANG_EN_US).mkdir(parents=True, exist_ok=True)
        _write(cfg / "strings" / LANG_EN_US / "configuration", s.configuration + "\n")
        _write(cfg / "MaxPower", f"{s.max_power_ma}\n")
        return self

    def add_function(self, kind: str, instance: str, attrs: dict[str, str] | None = None) -> Path:
        """mkdir functions/<kind>.<instance>, set attributes, link it into the configuration."""
        fname = f"{kind}.{instance}"
        fdir = self.path / "functions" / fname
        try:
            fdir.mkdir()
        except FileNotFoundError:
            raise GadgetError(f"function kind {kind!r} is unknown to the kernel: modprobe usb_f_{kind}") from None
        except OSError as e:
            raise GadgetError(f"cannot create function {fname}: {e.strerror} (modprobe usb_f_{kind})") from None
        for attr, val in (attrs or {}).items():
            _write(fdir / attr, val + "\n")
        os.symlink(fdir, self.path / "configs" / CONFIG_DIR / fname)
        self.functions.append(fname)
        return fdir

    def function_attr(self, fname: str, attr: str) -> str:
        return (self.path / "functions" / fname / attr).read_text().strip()

    def bind(self, udc: str | None = None) -> str:
        """Attach to a UDC: the host side starts enumerating the device now."""
        name = udc or default_udc()
        try:
            (self.path / "UDC").write_text(name + "\n")
        except OSError as e:
            hint = ("a FunctionFS function is not ready (its ep0 needs descriptors and strings first)"
                    if e.errno == 19 else "another gadget holds the UDC; unbind it first" if e.errno == 16 else e.strerror)
            raise GadgetError(f"binding gadget {self.name} to {name} failed: {hint}") from None
        self.udc = name
        return name

    @property
    def bound_udc(self) -> str:
        try:
            return (self.path / "UDC").read_text().strip()
        except OSError:
            return ""

    def unbind(self) -> None:
        if self.path.exists() and self.bound_udc:
            _write(self.path / "UDC", "\n")
        self.udc = None

    def soft_connect(self, on: bool) -> None:
        """Pull-up on/off without unbinding: the host sees an unplug / a replug."""
        udc = self.udc or self.bound_udc
        if udc:
            _write(UDC_CLASS / udc / "soft_connect", "connect\n" if on else "disconnect\n")

    def remove(self) -> None:
        """Unbind and delete the whole tree (in the reverse order configfs requires)."""
        p = self.path
        if not p.exists():
            return
        self.unbind()
        cfgs = p / "configs"
        for cfg in sorted(cfgs.iterdir()) if cfgs.is_dir() else []:
            for link in cfg.iterdir():
                if link.is_symlink():
                    link.unlink()
            _rmdir_all(cfg / "strings")
            _rmdir(cfg)
        funcs = p / "functions"
        for f in sorted(funcs.iterdir()) if funcs.is_dir() else []:
            _rmdir(f)
        _rmdir_all(p / "strings")
        _rmdir(p)
        self.functions.clear()

    def __enter__(self) -> "Gadget":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _rmdir(p: Path) -> None:
    try:
        p.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise GadgetError(f"cannot remove {p}: {e.strerror} (unmount its functionfs and close its files first)") from None


def _rmdir_all(strings_dir: Path) -> None:
    if strings_dir.is_dir():
        for lang in strings_dir.iterdir():
            _rmdir(lang)


# --- the host side of the same kernel ----------------------------------------------------------

def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


def find_host_device(vid: int, pid: int) -> Path | None:
    """The host-side sysfs device (e.g. /sys/bus/usb/devices/3-1) with these ids, if enumerated."""
    if not USB_DEVICES.is_dir():
        return None
    for d in sorted(USB_DEVICES.iterdir()):
        if ":" in d.name:
            continue       # an interface, not a device
        if _read(d / "idVendor") == f"{vid:04x}" and _read(d / "idProduct") == f"{pid:04x}":
            return d
    return None


def wait_host_device(vid: int, pid: int, timeout: float = ENUMERATE_TIMEOUT) -> Path:
    """Wait until the host enumerated and configured the gadget; returns its sysfs directory."""
    found: list[Path] = []

    def configured() -> bool:
        d = find_host_device(vid, pid)
        if d is not None and _read(d / "bConfigurationValue"):
            found.append(d)
            return True
        return False
    wait_for(configured, timeout, f"host enumeration of {vid:04x}:{pid:04x}",
             "check `dmesg` for 'device descriptor read' or 'duplicate endpoint' errors")
    return found[0]


def host_interface(dev: Path, number: int = 0) -> Path:
    """The sysfs directory of interface `number` of the active configuration (e.g. 3-1:1.0)."""
    cfg = _read(dev / "bConfigurationValue") or "1"
    return dev.parent / f"{dev.name}:{cfg}.{number}"


def interface_driver(dev: Path, number: int = 0) -> str | None:
    """Name of the host driver bound to that interface (pegasus, usbfs, cdc_ether ...) or None."""
    drv = host_interface(dev, number) / "driver"
    return os.path.basename(os.readlink(drv)) if drv.exists() else None


def host_endpoints(dev: Path, number: int = 0) -> dict[int, dict[str, str]]:
    """Endpoint address -> {type, direction, wMaxPacketSize} as the host parsed them."""
    out: dict[int, dict[str, str]] = {}
    itf = host_interface(dev, number)
    for ep in sorted(itf.glob("ep_*")) if itf.is_dir() else []:
        out[int(_read(ep / "bEndpointAddress"), 16)] = {
            "type": _read(ep / "type"), "direction": _read(ep / "direction"),
            "wMaxPacketSize": _read(ep / "wMaxPacketSize")}
    return out


def interface_netdevs(dev: Path, number: int = 0) -> list[str]:
    """Network interfaces a host driver created for that USB interface."""
    net = host_interface(dev, number) / "net"
    return sorted(p.name for p in net.iterdir()) if net.is_dir() else []


# --- a CDC-ECM gadget (the kernel's own f_ecm) -------------------------------------------------

ECM_VID, ECM_PID = 0x0525, 0xA4A1        # Linux-USB Ethernet gadget ids (g_ether uses them too)


def ecm_gadget(name: str = "udrv-ecm", *, vid: int = ECM_VID, pid: int = ECM_PID,
               dev_addr: str | None = None, host_addr: str | None = None,
               qmult: int | None = None) -> Gadget:
    """A created (not yet bound) gadget with one CDC-ECM function `ecm.usb0`.

    Bind it with `.bind()`; the gadget side's netdev name is then
    `gadget.function_attr("ecm.usb0", "ifname")` (usually usb0). dev_addr / host_addr fix the
    two MAC addresses (the kernel picks random ones otherwise).
    """
    modprobe("libcomposite", "usb_f_ecm")
    g = Gadget(name, GadgetSpec(vid=vid, pid=pid, device_class=0x02, manufacturer="udrv",
                                product="udrv CDC-ECM gadget", configuration="ECM")).create()
    attrs: dict[str, str] = {}
    if dev_addr:
        attrs["dev_addr"] = dev_addr
    if host_addr:
        attrs["host_addr"] = host_addr
    if qmult is not None:
        attrs["qmult"] = str(qmult)
    try:
        g.add_function("ecm", "usb0", attrs)
    except GadgetError:
        g.remove()
        raise
    return g

"""Find PCI NICs and hand them to vfio-pci (and back) through sysfs.

    list_nics()        network-class devices with driver, IOMMU group and group viability
    bind(bdf)          driver_override = vfio-pci, unbind from the current driver, reprobe;
                       the original driver is remembered in /run/udrv/<bdf>.json
    unbind(bdf)        back to the original driver, driver_override cleared

Every sysfs access goes through `Sysfs`, whose root is a parameter: tests point it at a fake
tree and subclass `write` to play the kernel's part.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DeviceNotFound, HostSetupError, PermissionDeniedError, UdrvError
from .pcitransport import PciInfo

VFIO_DRIVER = "vfio-pci"
# Drivers that may share an IOMMU group with a vfio-pci device without making it unusable:
# stub drivers and bridges (pcieport manages no DMA of its own).
GROUP_SAFE_DRIVERS = {VFIO_DRIVER, "pci-stub", "pcieport"}
STATE_DIR = Path("/run/udrv")
_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_bdf(text: str) -> str:
    """'03:00.0' -> '0000:03:00.0'; raises ValueError with the expected form."""
    m = _BDF.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a PCI address: write it as 0000:03:00.0 (see `udrv list`)")
    domain = m.group(1) or "0000"
    return f"{domain}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()


class Sysfs:
    """Reads and writes under a sysfs root (default /sys)."""

    def __init__(self, root: str | Path = "/sys"):
        self.root = Path(root)

    @property
    def is_real(self) -> bool:
        return self.root == Path("/sys")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read(self, rel: str) -> str:
        return self.path(rel).read_text().strip()

    def link_name(self, rel: str) -> str | None:
        """Last component of a symlink's target (a driver name, a group number), or None."""
        p = self.path(rel)
        return os.path.basename(os.readlink(p)) if p.is_symlink() else None

    def listdir(self, rel: str) -> list[str]:
        p = self.path(rel)
        return sorted(os.listdir(p)) if p.is_dir() else []

    def write(self, rel: str, value: str) -> None:
        """The only place that changes the system."""
        try:
            with open(self.path(rel), "w") as f:
                f.write(value)
        except PermissionError:
            raise PermissionDeniedError(f"writing {self.path(rel)} was refused: run udrv as root") from None
        except OSError as e:
            raise UdrvError(f"the kernel refused {value.strip()!r} -> {self.path(rel)} ({e.strerror}): "
                            "check dmesg for the reason") from None


@dataclass(frozen=True)
class NicInfo:
    info: PciInfo
    class_code: int
    group_viable: bool | None                       # None: the device has no IOMMU group
    group_members: tuple[tuple[str, str | None], ...] = ()   # (bdf, driver) for every device in the group

    @property
    def bdf(self) -> str:
        return self.info.bdf


def _hex(sysfs: Sysfs, rel: str) -> int:
    try:
        return int(sysfs.read(rel), 16)
    except (OSError, ValueError):
        return 0


def pci_info(bdf: str, sysfs: Sysfs | None = None) -> PciInfo:
    sysfs = sysfs or Sysfs()
    bdf = normalize_bdf(bdf)
    dev = f"bus/pci/devices/{bdf}"
    if not sysfs.exists(dev):
        raise DeviceNotFound(f"no PCI device {bdf}: list network devices with `udrv list` (or lspci -D)")
    group = sysfs.link_name(f"{dev}/iommu_group")
    return PciInfo(bdf=bdf, vendor=_hex(sysfs, f"{dev}/vendor"), device=_hex(sysfs, f"{dev}/device"),
                   subsystem_vendor=_hex(sysfs, f"{dev}/subsystem_vendor"),
                   subsystem_device=_hex(sysfs, f"{dev}/subsystem_device"),
                   iommu_group=int(group) if group is not None else None,
                   driver=sysfs.link_name(f"{dev}/driver"))


def group_members(group: int, sysfs: Sysfs | None = None) -> list[tuple[str, str | None]]:
    sysfs = sysfs or Sysfs()
    return [(bdf, sysfs.link_name(f"bus/pci/devices/{bdf}/driver"))
            for bdf in sysfs.listdir(f"kernel/iommu_groups/{group}/devices")]


def group_viable(members: list[tuple[str, str | None]]) -> bool:
    return all(drv is None or drv in GROUP_SAFE_DRIVERS for _, drv in members)


def describe_nonviable(group: int, members: list[tuple[str, str | None]]) -> str:
    bad = ", ".join(f"{b} ({d})" for b, d in members if d is not None and d not in GROUP_SAFE_DRIVERS)
    return (f"every device in IOMMU group {group} must be bound to vfio-pci or unbound: "
            f"bind or unbind {bad}")


def nic_info(bdf: str, sysfs: Sysfs | None = None) -> NicInfo:
    sysfs = sysfs or Sysfs()
    info = pci_info(bdf, sysfs)
    members: list[tuple[str, str | None]] = []
    viable = None
    if info.iommu_group is not None:
        members = group_members(info.iommu_group, sysfs)
        viable = group_viable(members)
    return NicInfo(info, _hex(sysfs, f"bus/pci/devices/{info.bdf}/class"), viable, tuple(members))


def list_nics(sysfs: Sysfs | None = None) -> list[NicInfo]:
    """PCI class 0x02 (network controller) devices."""
    sysfs = sysfs or Sysfs()
    return [nic_info(bdf, sysfs) for bdf in sysfs.listdir("bus/pci/devices")
            if _hex(sysfs, f"bus/pci/devices/{bdf}/class") >> 16 == 0x02]


# --- bind / unbind -------------------------------------------------------------------------------

def _state_file(bdf: str, state_dir: Path) -> Path:
    return state_dir / f"{bdf}.json"


def _require_root(sysfs: Sysfs) -> None:
    if sysfs.is_real and os.geteuid() != 0:
        raise PermissionDeniedError("binding a PCI device changes kernel drivers: run udrv as root (sudo)")


def _require_iommu(info: PciInfo, sysfs: Sysfs) -> None:
    if info.iommu_group is None:
        if not sysfs.listdir("kernel/iommu_groups"):
            raise HostSetupError("there are no IOMMU groups, so the IOMMU is off: boot with intel_iommu=on "
                                 "(or amd_iommu=on) and enable VT-d / AMD-Vi in the firmware")
        raise HostSetupError(f"{info.bdf} is in no IOMMU group although the IOMMU is on: "
                             "check dmesg for DMAR/IOMMU messages about this device")


def _require_vfio(sysfs: Sysfs) -> None:
    if not sysfs.exists(f"bus/pci/drivers/{VFIO_DRIVER}"):
        raise HostSetupError("the vfio-pci driver is not loaded: run modprobe vfio-pci")


def bind(bdf: str, *, sysfs: Sysfs | None = None, state_dir: Path = STATE_DIR) -> NicInfo:
    """Give the device to vfio-pci. Idempotent. Returns the device's state afterwards; check
    `group_viable` (VfioTransport.open refuses a non-viable group with the fix to apply)."""
    sysfs = sysfs or Sysfs()
    _require_root(sysfs)
    info = pci_info(bdf, sysfs)
    bdf = info.bdf
    dev = f"bus/pci/devices/{bdf}"
    _require_iommu(info, sysfs)
    _require_vfio(sysfs)
    if info.driver == VFIO_DRIVER:
        return nic_info(bdf, sysfs)
    # Remember where the device came from before changing anything.
    state = _state_file(bdf, state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"bdf": bdf, "original_driver": info.driver}) + "\n")
    # driver_override first, so the reprobe below (or a hotplug event) can only pick vfio-pci.
    sysfs.write(f"{dev}/driver_override", VFIO_DRIVER)
    if info.driver is not None:
        sysfs.write(f"bus/pci/drivers/{info.driver}/unbind", bdf)
    sysfs.write("bus/pci/drivers_probe", bdf)
    after = nic_info(bdf, sysfs)
    if after.info.driver != VFIO_DRIVER:
        raise UdrvError(f"{bdf} did not bind to vfio-pci (driver now: {after.info.driver or 'none'}): "
                        "check dmesg, then run: udrv unbind " + bdf)
    return after


def unbind(bdf: str, *, sysfs: Sysfs | None = None, state_dir: Path = STATE_DIR) -> NicInfo:
    """Give the device back to the driver it had before `bind` (the kernel's choice if udrv
    did not bind it), and clear driver_override."""
    sysfs = sysfs or Sysfs()
    _require_root(sysfs)
    info = pci_info(bdf, sysfs)
    bdf = info.bdf
    dev = f"bus/pci/devices/{bdf}"
    state = _state_file(bdf, state_dir)
    known = state.exists()
    original = json.loads(state.read_text()).get("original_driver") if known else None
    sysfs.write(f"{dev}/driver_override", "\n")      # an empty line clears the override
    if info.driver is not None:
        sysfs.write(f"bus/pci/drivers/{info.driver}/unbind", bdf)
    if original is not None and sysfs.exists(f"bus/pci/drivers/{original}"):
        sysfs.write(f"bus/pci/drivers/{original}/bind", bdf)
    elif original is not None or not known:
        sysfs.write("bus/pci/drivers_probe", bdf)    # let the kernel match a driver
    after = nic_info(bdf, sysfs)
    if original is not None and after.info.driver != original:
        # Keep the state file: the next `udrv unbind` still knows where the device belongs.
        raise UdrvError(f"{bdf} did not go back to {original} (driver now: {after.info.driver or 'none'}): "
                        f"run modprobe {original.replace('-', '_')} and then udrv unbind {bdf} again")
    if known:
        state.unlink()
    return after

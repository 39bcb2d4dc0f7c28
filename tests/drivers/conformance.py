"""What the recovery conformance suite (test_recovery_conformance.py) needs to know of each
driver: how to build it on its device model, and how to read the device's state from the
model's side. One entry per module in udrv.drivers' registry; a driver without one fails the
suite (it names what to add), so no driver escapes it.

An adapter reads the model, never the driver: a check that asked the driver what it wrote
would agree with its bugs. Register offsets and bits are literals from the datasheets and
specifications (reference/pegasus.md, CDC-ECM 1.2, the 8254x manual), not the drivers' names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from udrv.driver import LinkState, RxMode
from udrv.drivers import PCI_DRIVERS, USB_DRIVERS
from udrv.models.cdc_ecm import EcmModel
from udrv.models.e1000 import E1000Model
from udrv.models.pci import ModelPciTransport
from udrv.models.pegasus import PegasusModel
from udrv.models.usb import ModelUsbTransport
from udrv.nic import Nic, NicOptions

BASE_MAC = bytes.fromhex("02c0ffee000a")     # what the host set before the call under test
NEW_MAC = bytes.fromhex("02c0ffee0001")      # what the call under test asks for
GROUP_A = bytes.fromhex("01005e000001")
GROUP_B = bytes.fromhex("01005e0000fb")
BASE_MODE = RxMode(allmulti=True)
STRANGER = bytes.fromhex("02ddeeff0011")

# The USB C variants run a C transfer ring on libusb's event loop that writes to a TAP fd: an
# in-process model has neither, so they run on a real USB device (dummy_hcd + FunctionFS) in the
# kernel tier, which injects faults into them mid-traffic.
USB_C_RING = ("runs its C transfer ring on real libusb and a real TAP fd, which an in-process "
              "model cannot give it; its recovery is covered in the kernel tier: "
              "tests/kernel/test_native_usb_ring.py, tests/kernel/test_cdc_ecm.py, "
              "tests/kernel/test_pegasus_gadget.py")


# hangs are caught at these deadlines; a loaded CI box must not turn a slow poll into a recovery
USB_DEADLINES = {"config_deadline": 0.3, "datapath_deadline": 0.3}


@dataclass(frozen=True)
class HostConfig:
    """What the host has asked of the interface: the device and the driver must hold it."""
    mac: bytes
    mode: RxMode
    mtu: int
    opened: bool

    def after(self, entry: str, arg: Any) -> "HostConfig":
        """The configuration once `entry(arg)` has been applied."""
        if entry in ("open", "stop"):
            return replace(self, opened=entry == "open")
        if entry == "set_mac":
            return replace(self, mac=arg)
        if entry == "set_rx_mode":
            return replace(self, mode=arg)
        if entry == "set_mtu":
            return replace(self, mtu=arg)
        return self


class Bed:
    """One driver implementation on its model through udrv.nic.Nic, the wire side captured."""

    def __init__(self, adapter: "Adapter", impl: type, watchdog: Any):
        self.adapter = adapter
        self.model = adapter.model()
        self.transport = adapter.transport(self.model)
        self.host_rx: list[bytes] = []        # what the driver delivered to the host (TAP side)
        self.wire_tx: list[bytes] = []        # what the device put on its wire
        self.model.on_transmit = lambda f: self.wire_tx.append(bytes(f))
        self.nic = Nic(impl, self.transport, self.host_rx.append, NicOptions(**adapter.options),
                       watchdog=watchdog)
        # CoDel drops frames that wait out a hang's deadline in the journal, as it should (see
        # tests/runtime/test_aqm.py); here every frame must survive the fault itself
        self.nic.set_aqm(0.0, self.nic.journal.aqm_interval, self.nic.journal.aqm_ecn)
        self.base_dma = 0                     # DMA buffers a closed, probed device holds

    def bring_up(self) -> None:
        self.nic.bring_up()
        self.base_dma = len(self.dma_mappings())

    def dma_mappings(self) -> list:
        mappings = getattr(self.transport, "dma_mappings", None)
        return mappings() if mappings is not None else []

    def pump(self, rounds: int = 5) -> None:
        """xmit/poll at least `rounds` times, then until the TX journal is drained (a bound high
        enough for stop-and-wait, which moves one frame per round)."""
        for i in range(2000):
            self.nic.xmit()
            self.nic.poll(0.0)
            if i >= rounds and self.nic.journal.unconfirmed() == 0:
                break
        self.nic.xmit()
        self.nic.poll(0.0)

    def view(self) -> dict[str, Any]:
        return self.adapter.view(self)

    def close(self) -> None:
        self.nic.close()
        self.transport.close()


@dataclass
class Adapter:
    driver: str                                   # the registry's module name
    model: Callable[[], Any]
    transport: Callable[[Any], Any]
    # the device's configuration as the model holds it: {field: value}
    view: Callable[[Bed], dict[str, Any]]
    # what `view` must show for a host configuration (only the fields that configuration decides)
    expect: Callable[[Bed, HostConfig], dict[str, Any]]
    # the link as the model has it, in the driver contract's terms
    link: Callable[[Any], LinkState]
    # change the model's link so a link check has something to see; returns the undo
    change_link: Callable[[Any], Callable[[], None]]
    # times the device was brought up from scratch (a reset, an identity read): a probe does
    # that, a restore from a checkpoint must not
    resets: Callable[[Bed], int]
    mtus: tuple[int, int]                         # (set before the call, asked by set_mtu)
    # device-reported fault kinds that mean something on this bus
    device_kinds: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    # implementations (by class name) that cannot run on the model, and where they are covered
    excluded: dict[str, str] = field(default_factory=dict)
    # what must never happen on this device, as sentences (empty: nothing did)
    problems: Callable[[Bed], list[str]] = lambda bed: []
    # the address set_mac asks for: one whose filter the device shows (see CDC_ECM)
    set_mac_to: Callable[[Any], bytes] = lambda model: NEW_MAC


# --- pegasus --------------------------------------------------------------------------------------
def _pegasus_view(bed: Bed) -> dict[str, Any]:
    # no frame-size register: the chip takes up to 1518 bytes whatever the MTU, so set_mtu shows
    # on the wire (assert_traffic) and in the soft state only
    m = bed.model
    ctrl0, ctrl1, ctrl2 = m.reg(0x00), m.reg(0x01), m.reg(0x02)
    return {"station": bytes(m.regs[0x10:0x16]),          # EthID: the address the chip filters on
            "rx_on": bool(ctrl0 & 0x40), "tx_on": bool(ctrl0 & 0x80),
            "allmulti": bool(ctrl0 & 0x02), "promisc": bool(ctrl2 & 0x04),
            "speed_duplex": ctrl1 & 0x30}                  # EthCtrl1: 100 Mbit/s 0x10, full duplex 0x20


def _pegasus_expect(bed: Bed, cfg: HostConfig) -> dict[str, Any]:
    speed, full = bed.model.link_mode
    want: dict[str, Any] = {"station": cfg.mac, "rx_on": cfg.opened, "tx_on": cfg.opened}
    if not cfg.opened:
        # stop clears EthCtrl0/1; EthCtrl2 keeps what it had (it is written again at open)
        return {**want, "allmulti": False, "speed_duplex": 0}
    # the chip has no multicast filter the driver uses: any list means all-multicast (as Linux)
    return {**want, "promisc": cfg.mode.promisc,
            "allmulti": not cfg.mode.promisc and (cfg.mode.allmulti or bool(cfg.mode.multicast)),
            "speed_duplex": (0x20 if full else 0) | (0x10 if speed == 100 else 0)}


def _pegasus_link(m: PegasusModel) -> LinkState:
    speed, full = m.link_mode
    return LinkState(True, speed, full) if m.link_up else LinkState(False)


def _pegasus_change_link(m: PegasusModel) -> Callable[[], None]:
    # the partner drops to 10 Mbit/s half duplex: the link check must reprogram EthCtrl1
    m.set_link(True, 10, False)
    return lambda: m.set_link(True, 100, True)


PEGASUS = Adapter(
    driver="pegasus", model=PegasusModel, transport=ModelUsbTransport,
    view=_pegasus_view, expect=_pegasus_expect, link=_pegasus_link, change_link=_pegasus_change_link,
    resets=lambda bed: bed.model.counters.mac_resets,
    mtus=(1450, 1400), device_kinds=("stall", "timeout", "disconnect"),
    options=USB_DEADLINES,
    excluded={"PegasusNative": USB_C_RING})


# --- cdc_ecm --------------------------------------------------------------------------------------
ECM_PROMISC, ECM_ALL_MULTI, ECM_DIRECTED, ECM_BROADCAST, ECM_MULTICAST = 0x01, 0x02, 0x04, 0x08, 0x10
ECM_MC_FILTERS = 4


def _ecm_view(bed: Bed) -> dict[str, Any]:
    # no frame-size request: wMaxSegmentSize is fixed by the descriptor, so set_mtu shows on the
    # wire (assert_traffic) and in the soft state only
    m = bed.model
    pf = m.packet_filter
    return {"data_alt": m.data_alt,                        # alt 1: the bulk pair runs, alt 0: no traffic
            "promisc": bool(pf & ECM_PROMISC), "allmulti": bool(pf & ECM_ALL_MULTI),
            "directed": bool(pf & ECM_DIRECTED), "broadcast": bool(pf & ECM_BROADCAST),
            # the groups the device passes by its perfect filters (only while the filter uses them)
            "multicast": tuple(sorted(m.multicast)) if pf & ECM_MULTICAST else ()}


def _ecm_expect(bed: Bed, cfg: HostConfig) -> dict[str, Any]:
    m, mode = bed.model, cfg.mode
    if not cfg.opened:
        return {"data_alt": 0}                             # filters matter again at open, which sends them
    fits = bool(mode.multicast) and not (mode.promisc or mode.allmulti) and len(mode.multicast) <= m.mc_filters
    # ECM cannot change the station address: another MAC is taken with promiscuous on
    return {"data_alt": 1, "promisc": mode.promisc or cfg.mac != m.mac,
            "allmulti": mode.allmulti or (bool(mode.multicast) and not fits),
            "directed": True, "broadcast": True,
            "multicast": tuple(sorted(mode.multicast)) if fits else ()}


def _ecm_link(m: EcmModel) -> LinkState:
    # the model keeps its link unexported: what its NETWORK_CONNECTION and CONNECTION_SPEED_CHANGE
    # notifications say (ECM reports no duplex)
    return LinkState(True, m._bitrate // 1_000_000, False) if m._link_up else LinkState(False)


def _ecm_change_link(m: EcmModel) -> Callable[[], None]:
    rate = m._bitrate
    m.set_link(True, bitrate=100_000_000)
    return lambda: m.set_link(True, bitrate=rate)


def _ecm_probes(bed: Bed) -> int:
    # a probe reads iMACAddress (GET_DESCRIPTOR of its string); a restore never does
    m = bed.model
    return sum(1 for s, _ in m.request_log
               if s.request_type == 0x80 and s.request == 0x06 and s.value == (0x03 << 8) | m.mac_string_index)


CDC_ECM = Adapter(
    driver="cdc_ecm", model=lambda: EcmModel(mc_filters=ECM_MC_FILTERS), transport=ModelUsbTransport,
    view=_ecm_view, expect=_ecm_expect, link=_ecm_link, change_link=_ecm_change_link,
    resets=_ecm_probes, mtus=(1450, 1400), device_kinds=("stall", "timeout", "disconnect"),
    options=USB_DEADLINES,
    excluded={"CdcEcmNative": USB_C_RING},
    # any address but its own is emulated with promiscuous on (BASE_MAC too): going back to its
    # own is what turns the device's filter back to directed
    set_mac_to=lambda m: m.mac)


# --- e1000 ------------------------------------------------------------------------------------------
RCTL, TCTL, RDLEN, TDLEN, MTA, RAL0, RAH0 = 0x0100, 0x0400, 0x2808, 0x3808, 0x5200, 0x5400, 0x5404
RCTL_EN, RCTL_UPE, RCTL_MPE, RCTL_LPE, RCTL_BSEX, TCTL_EN, RAH_AV = 0x2, 0x8, 0x10, 0x20, 1 << 25, 0x2, 1 << 31
E1000_RINGS = 8                                         # descriptors per ring (NicOptions n_rx, n_tx)
E1000_RING_BUFFERS = 4                                  # DMA buffers an open device holds: 2 rings + 2 buffer areas


def _e1000_rx_buffer(rctl: int) -> int:
    code = (rctl >> 16) & 3                             # BSIZE, scaled by 16 with BSEX
    return (2048, 16384, 8192, 4096)[code] if rctl & RCTL_BSEX else (2048, 1024, 512, 256)[code]


def _e1000_mta_bit(group: bytes) -> int:
    return ((group[4] >> 4) | (group[5] << 4)) & 0xFFF  # MO = 00: bits 47:36 of the address


def _e1000_view(bed: Bed) -> dict[str, Any]:
    m = bed.model
    rctl, rah = m.reg(RCTL), m.reg(RAH0)
    station = m.reg(RAL0).to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little") if rah & RAH_AV else None
    rx_on = bool(rctl & RCTL_EN)
    return {"station": station, "rx_on": rx_on, "tx_on": bool(m.reg(TCTL) & TCTL_EN),
            "promisc": bool(rctl & RCTL_UPE), "allmulti": bool(rctl & RCTL_MPE),
            "mta": tuple((i, w) for i in range(128) if (w := m.reg(MTA + 4 * i))),
            # frame length and buffer size take effect with the receiver on (open writes them)
            "long_frames": bool(rctl & RCTL_LPE) if rx_on else None,
            "rx_buffer": _e1000_rx_buffer(rctl) if rx_on else None,
            "ring_bytes": (m.reg(RDLEN), m.reg(TDLEN)),
            "dma_buffers": len(bed.dma_mappings()) - bed.base_dma}


def _e1000_expect(bed: Bed, cfg: HostConfig) -> dict[str, Any]:
    mta: dict[int, int] = {}
    for g in cfg.mode.multicast:
        h = _e1000_mta_bit(g)
        mta[h >> 5] = mta.get(h >> 5, 0) | 1 << (h & 31)
    want = {"station": cfg.mac, "rx_on": cfg.opened, "tx_on": cfg.opened,
            "promisc": cfg.mode.promisc, "allmulti": cfg.mode.promisc or cfg.mode.allmulti,
            "mta": tuple(sorted(mta.items())),
            "ring_bytes": (E1000_RINGS * 16, E1000_RINGS * 16) if cfg.opened else (0, 0),
            "dma_buffers": E1000_RING_BUFFERS if cfg.opened else 0}
    if cfg.opened:
        # every frame of the MTU (+ header and a VLAN tag) fits one buffer, the smallest that does
        frame = cfg.mtu + 14 + 4
        want.update(long_frames=cfg.mtu > 1500, rx_buffer=min(b for b in (2048, 4096, 8192, 16384) if b >= frame))
    return want


E1000 = Adapter(
    driver="e1000", model=E1000Model, transport=ModelPciTransport,
    view=_e1000_view, expect=_e1000_expect,
    link=lambda m: LinkState(True, 1000, True) if m.link_up else LinkState(False),
    change_link=lambda m: (m.set_link(False), lambda: m.set_link(True))[1],
    resets=lambda bed: bed.model.resets,
    mtus=(3000, 9000),
    # PCI has no STALL and MMIO no timeout; a device that vanishes from the bus it has
    device_kinds=("disconnect",),
    options={"config_deadline": 0.3, "datapath_deadline": 0.4, "n_rx": E1000_RINGS, "n_tx": E1000_RINGS},
    problems=lambda bed: [f"{bed.model.dmar_faults} DMA accesses outside the mapped buffers"] * bool(bed.model.dmar_faults))


ADAPTERS: dict[str, Adapter] = {a.driver: a for a in (PEGASUS, CDC_ECM, E1000)}


def registry() -> list[tuple[str, type]]:
    """(module name, DRIVER) of every driver udrv.drivers knows."""
    return [(name, importlib.import_module(f"udrv.drivers.{name}").DRIVER) for name in USB_DRIVERS + PCI_DRIVERS]


def missing_adapter(name: str, driver: type) -> str:
    """What to add for a driver the suite has no adapter for."""
    return (f"driver {name!r} ({driver.__name__}) has no entry in tests/drivers/conformance.py ADAPTERS: "
            f"add an Adapter saying how to build it on its device model (model, transport), how to read "
            f"the device's configuration from the model (view, expect: its address filter, multicast and "
            f"promiscuous bits, frame size, enables), its link (link, change_link), what counts as a "
            f"reset (resets), and which implementations cannot run on the model and why (excluded)")

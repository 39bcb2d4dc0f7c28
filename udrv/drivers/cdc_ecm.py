"""CDC-ECM (USB Communications Device Class, Ethernet Control Model) class driver.

Binds by interface class, not by id: a communications interface (class 0x02, subclass 0x06)
whose functional descriptors name a data interface (class 0x0A) with a bulk IN + bulk OUT pair
in an alternate setting (alt 1 in a conforming device; alt 0 has no endpoints and means "no
traffic"). Device knowledge only, from the CDC 1.2 and ECM 1.2 specifications (the behaviour of
Linux cdc_ether/usbnet was read, not copied); the framework (udrv.usbnet) moves the frames with
the RAW framing declared below and the guard makes every entry point a transaction.

What the function offers, and what this driver does with it:
- Ethernet Networking functional descriptor: iMACAddress (a string of 12 hex digits: the MAC
  the host uses), wMaxSegmentSize (largest frame incl. the Ethernet header: MTU = it - 14),
  wNumberMCFilters (perfect multicast filters; bit 15 = "imperfect", i.e. hashed).
- class requests on the control interface (bmRequestType 0x21, wIndex = control interface):
  SET_ETHERNET_PACKET_FILTER (promiscuous / all-multicast / directed / broadcast / multicast)
  and SET_ETHERNET_MULTICAST_FILTERS (when the device advertises filters).
- notifications on the interrupt endpoint: NETWORK_CONNECTION (link) and
  CONNECTION_SPEED_CHANGE (bit rates).
- alternate setting 0 of the data interface = function reset / no traffic; alt 1 = running.

ECM has no request to change the station address. set_mac is *emulated*: the new address is
taken, and while it differs from the device's own (iMACAddress) the packet filter adds
PROMISCUOUS so frames to the new address still arrive (the host stack drops frames addressed to
anyone else); setting the device's own address back returns the filter to directed. Refusing
would break `ip link set udrv0 address ...`, which Linux cdc_ether accepts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from udrv.driver import DriverStats, LinkState, RxMode
from udrv.errors import Stall, UdrvError
from udrv.framing import Framing, Shape
from udrv.usbnet import CONTROL_TIMEOUT, UsbNetDriver, bulk_pair, claim_interface, functional_descriptors
from udrv.usbtransport import DeviceInfo, EpType

log = logging.getLogger("udrv.cdc_ecm")

# --- interface classes (USB class codes, CDC 1.2 tables 3, 4, 6) ------------------------------
USB_CLASS_COMM = 0x02
USB_CDC_SUBCLASS_ETHERNET = 0x06             # Ethernet Networking Control Model
USB_CLASS_CDC_DATA = 0x0A

# --- functional descriptors (CDC 1.2 5.2.3; ECM 1.2 5.4) ------------------------------------
UNION_FUNCTIONAL = 0x06
ETHERNET_NETWORKING_FUNCTIONAL = 0x0F
ETHERNET_DESC_LEN = 13
MC_FILTERS_IMPERFECT = 0x8000                # wNumberMCFilters bit 15: filtering is hashed

# --- ECM class requests (ECM 1.2 table 6) ----------------------------------------------------
REQT_CLASS_OUT = 0x21                        # host-to-device, class, interface
REQT_CLASS_IN = 0xA1
SET_ETHERNET_MULTICAST_FILTERS = 0x40
SET_ETHERNET_POWER_MANAGEMENT_PATTERN_FILTER = 0x41
GET_ETHERNET_POWER_MANAGEMENT_PATTERN_FILTER = 0x42
SET_ETHERNET_PACKET_FILTER = 0x43
GET_ETHERNET_STATISTIC = 0x44

# SET_ETHERNET_PACKET_FILTER wValue bits (ECM 1.2 table 8)
PACKET_TYPE_PROMISCUOUS = 0x01
PACKET_TYPE_ALL_MULTICAST = 0x02
PACKET_TYPE_DIRECTED = 0x04
PACKET_TYPE_BROADCAST = 0x08
PACKET_TYPE_MULTICAST = 0x10                 # the multicast addresses set by SET_ETHERNET_MULTICAST_FILTERS
PACKET_TYPE_ALL = 0x1F

# --- notifications (CDC 1.2 6.3; ECM 1.2 6.3) --------------------------------------------------
NOTIFICATION_REQT = 0xA1
NETWORK_CONNECTION = 0x00
RESPONSE_AVAILABLE = 0x01
CONNECTION_SPEED_CHANGE = 0x2A
NOTIFICATION_HEADER = 8
SPEED_CHANGE_DATA = 8                        # DLBitRate, ULBitRate (u32 LE, bits/s)

ETH_HLEN = 14
VLAN_HLEN = 4
DATA_ALT_IDLE = 0


class NotCdcEcm(UdrvError):
    """The device has no usable CDC-ECM function (said why, and what to try)."""


@dataclass(frozen=True)
class EcmFunction:
    """The ECM function as its descriptors describe it (parsed once, never changes)."""
    control: int                   # control (communications) interface number
    data: int                      # data interface number
    data_alt: int                  # alternate setting with the bulk pair (1 on a conforming device)
    ep_in: int
    ep_out: int
    in_max_packet: int
    out_max_packet: int
    ep_status: int | None          # interrupt IN on the control interface
    status_max_packet: int
    mac_string: int                # iMACAddress
    statistics: int                # bmEthernetStatistics
    max_segment: int               # wMaxSegmentSize
    mc_filters: int                # wNumberMCFilters & 0x7FFF
    mc_imperfect: bool
    power_filters: int


def parse_ecm_function(info: DeviceInfo) -> EcmFunction:
    """Find the ECM function in the device's interfaces; raise NotCdcEcm saying what is missing.

    `info.interfaces` may hold the settings of several configurations (QEMU usb-net has an RNDIS
    one and an ECM one, both with interfaces 0 and 1): the data interface is looked for among
    the settings that sit next to the ECM control interface, preferring a non-zero alt."""
    itfs = info.interfaces
    reasons: list[str] = []
    for pos, ctl in enumerate(itfs):
        if (ctl.cls, ctl.subclass) != (USB_CLASS_COMM, USB_CDC_SUBCLASS_ETHERNET):
            continue
        descs = functional_descriptors(ctl.extra)
        union = next((d for st, d in descs if st == UNION_FUNCTIONAL and len(d) >= 5), None)
        ether = next((d for st, d in descs if st == ETHERNET_NETWORKING_FUNCTIONAL
                      and len(d) >= ETHERNET_DESC_LEN), None)
        if union is None:
            reasons.append(f"interface {ctl.number} has no Union functional descriptor")
            continue
        if ether is None:
            reasons.append(f"interface {ctl.number} has no Ethernet Networking functional descriptor")
            continue
        control, data = union[3], union[4]
        # the data interface's settings: those following this control interface (same configuration)
        settings = [s for s in itfs[pos + 1:] if s.number == data and s.cls == USB_CLASS_CDC_DATA]
        if not settings:
            settings = [s for s in itfs if s.number == data and s.cls == USB_CLASS_CDC_DATA]
        chosen = None
        for s in sorted(settings, key=lambda s: (s.alt == DATA_ALT_IDLE, s.alt)):
            pair = bulk_pair(s)
            if pair is not None:
                chosen = (s.alt, pair)
                break
        if chosen is None:
            reasons.append(f"data interface {data} has no setting with a bulk IN and a bulk OUT endpoint")
            continue
        alt, (ep_in, ep_out, in_mp, out_mp) = chosen
        status = next((e for e in ctl.endpoints if e.type is EpType.INTERRUPT and e.is_in), None)
        mc = ether[10] | (ether[11] << 8)
        return EcmFunction(
            control=control, data=data, data_alt=alt, ep_in=ep_in, ep_out=ep_out,
            in_max_packet=in_mp, out_max_packet=out_mp,
            ep_status=status.address if status else None,
            status_max_packet=status.max_packet if status else 0,
            mac_string=ether[3], statistics=int.from_bytes(ether[4:8], "little"),
            max_segment=ether[8] | (ether[9] << 8), mc_filters=mc & 0x7FFF,
            mc_imperfect=bool(mc & MC_FILTERS_IMPERFECT), power_filters=ether[12])
    if not reasons:
        reasons.append("no interface of class 0x02 subclass 0x06 (CDC Ethernet)")
    raise NotCdcEcm(f"USB device {info.ident} is not a usable CDC-ECM NIC: {'; '.join(reasons)}")


def parse_mac_string(text: str) -> bytes:
    """iMACAddress: 12 hexadecimal digits, most significant first (ECM 1.2 5.4)."""
    t = text.strip()
    if len(t) != 12:
        raise ValueError(f"iMACAddress string {text!r} is not 12 hex digits")
    mac = bytes.fromhex(t)
    return mac


@dataclass
class EcmSoft:
    mac: bytes = b"\x00" * 6          # the address the host uses (set_mac may change it)
    perm_mac: bytes = b"\x00" * 6     # the device's own (iMACAddress)
    mtu: int = 1500
    mode: RxMode = field(default_factory=RxMode)
    opened: bool = False
    data_alt: int = DATA_ALT_IDLE     # alternate setting selected on the data interface
    packet_filter: int = PACKET_TYPE_DIRECTED | PACKET_TYPE_BROADCAST   # last sent
    mc_list: tuple[bytes, ...] = ()   # last sent with SET_ETHERNET_MULTICAST_FILTERS
    filter_supported: bool = True     # False: the device STALLed SET_ETHERNET_PACKET_FILTER at probe
    link: LinkState = field(default_factory=lambda: LinkState(True))
    speed_pending: bool = False       # a CONNECTION_SPEED_CHANGE header arrived without its data
    notifications: int = 0
    link_changes: int = 0
    speed_changes: int = 0
    bad_notifications: int = 0
    dl_bitrate: int = 0
    ul_bitrate: int = 0


@dataclass(frozen=True)
class EcmCheckpoint:
    """What a resume needs: the data interface's alt setting, the packet filter, the multicast list."""
    data_alt: int
    packet_filter: int
    mc_list: tuple[bytes, ...]
    filter_supported: bool


class CdcEcm(UsbNetDriver):
    name = "cdc_ecm"
    ids = ()                              # a class driver: see match_device()
    framing = Framing(Shape.RAW, rx_transfer_size=1536, pad_rule=512, max_frame=1518)
    max_mtu = 1500
    # transfers in flight (RX, TX), as many as Linux usbnet keeps at high speed: one frame per
    # transfer, and a host controller (dummy_hcd: its timer tick) moves only what is queued
    default_rings = (64, 64)
    # ... and with the C ring more OUT transfers than that: a wire frame waits in it for the
    # reap and the TX thread's next turn, not only for the host controller (f_ecm on dummy_hcd,
    # same guest boot: TCP out 205 -> 267 Mbit/s from 64 to 160 in flight, no gain at 256)
    native_rings = (64, 160)
    # the C ring writes in-order TCP segments received together as one GSO super-frame
    # (native/gro.h; the TAP gets a virtio-net header for it, no TX offloads)
    coalesce_rx = True

    def __init__(self, usb, actions):
        super().__init__(usb, actions)
        fn = parse_ecm_function(usb.info)
        self.fn = fn
        # endpoints and framing come from the descriptors (the engine reads these per instance)
        self.EP_IN = fn.ep_in
        self.EP_OUT = fn.ep_out
        self.EP_STATUS = fn.ep_status
        self.status_size = max(fn.status_max_packet, NOTIFICATION_HEADER)
        segment = fn.max_segment if fn.max_segment >= ETH_HLEN + self.min_mtu else ETH_HLEN + 1500
        self.max_mtu = segment - ETH_HLEN
        max_frame = segment + VLAN_HLEN
        mp = fn.in_max_packet
        # a multiple of the packet size, so a frame never ends mid-packet inside our buffer
        self.framing = Framing(Shape.RAW, rx_transfer_size=-(-max_frame // mp) * mp,
                               pad_rule=fn.out_max_packet, max_frame=max_frame)
        self.soft = EcmSoft(mtu=min(1500, self.max_mtu))

    @classmethod
    def match_interfaces(cls, classes: list[tuple[int, int]]) -> bool:
        """Cheap check for listings: (class, subclass) of every interface of the device."""
        return (0x02, 0x06) in classes

    @classmethod
    def match_device(cls, info: DeviceInfo) -> bool:
        """True when the device carries a CDC-ECM function (class match, any vid:pid)."""
        try:
            parse_ecm_function(info)
            return True
        except NotCdcEcm:
            return False

    # --- requests ---------------------------------------------------------------------------
    def _class_out(self, request: int, value: int, data: bytes = b"") -> None:
        self.usb.control_out(REQT_CLASS_OUT, request, value, self.fn.control, data, CONTROL_TIMEOUT)

    def set_ethernet_packet_filter(self, bits: int) -> None:
        self._class_out(SET_ETHERNET_PACKET_FILTER, bits)
        self.soft.packet_filter = bits

    def set_ethernet_multicast_filters(self, addrs: tuple[bytes, ...]) -> None:
        self._class_out(SET_ETHERNET_MULTICAST_FILTERS, len(addrs), b"".join(addrs))
        self.soft.mc_list = addrs

    def select_data_alt(self, alt: int) -> None:
        self.usb.set_alt_setting(self.fn.data, alt)
        self.soft.data_alt = alt

    # --- bring-up -------------------------------------------------------------------------------
    def bind(self) -> None:
        """Claim the control and the data interface (a kernel cdc_ether is detached first)."""
        claim_interface(self.usb, self.fn.control, self.actions)
        if self.fn.data != self.fn.control:
            claim_interface(self.usb, self.fn.data, self.actions)

    def probe(self) -> None:
        fn = self.fn
        if fn.data_alt != DATA_ALT_IDLE:
            self.select_data_alt(DATA_ALT_IDLE)          # quiesce: the function is reset, no traffic
        else:
            self.soft.data_alt = DATA_ALT_IDLE
        if fn.mac_string == 0:
            raise NotCdcEcm(f"USB device {self.usb.info.ident} names no MAC address (iMACAddress = 0): "
                            "it cannot be driven as CDC-ECM")
        text = self.string_descriptor(fn.mac_string)
        try:
            mac = parse_mac_string(text)
        except ValueError as e:
            raise NotCdcEcm(f"USB device {self.usb.info.ident}: {e}; its firmware does not follow ECM") from None
        if mac[0] & 1:
            raise NotCdcEcm(f"USB device {self.usb.info.ident} reports a multicast MAC {mac.hex(':')}: "
                            "its iMACAddress string is wrong")
        self.soft.mac = self.soft.perm_mac = mac
        # does the device take packet filters at all? (QEMU usb-net STALLs every ECM request)
        bits = self.packet_filter_for(self.soft.mode)
        try:
            self.set_ethernet_packet_filter(bits)
            self.soft.filter_supported = True
        except Stall:
            self.soft.filter_supported = False
            log.info("device %s STALLs SET_ETHERNET_PACKET_FILTER: it filters nothing we can change "
                     "(promiscuous/multicast settings are host-side only)", self.usb.info.ident)

    # --- configuration ----------------------------------------------------------------------------
    def multicast_list_for(self, mode: RxMode) -> tuple[bytes, ...] | None:
        """The list for SET_ETHERNET_MULTICAST_FILTERS, or None when all-multicast must do."""
        if mode.promisc or mode.allmulti or not mode.multicast:
            return None
        if self.fn.mc_filters == 0 or len(mode.multicast) > self.fn.mc_filters:
            return None
        return tuple(sorted(mode.multicast))

    def packet_filter_for(self, mode: RxMode) -> int:
        bits = PACKET_TYPE_DIRECTED | PACKET_TYPE_BROADCAST
        if mode.promisc or self.soft.mac != self.soft.perm_mac:     # promiscuous also emulates set_mac
            bits |= PACKET_TYPE_PROMISCUOUS
        if mode.allmulti or (mode.multicast and self.multicast_list_for(mode) is None):
            bits |= PACKET_TYPE_ALL_MULTICAST
        elif self.multicast_list_for(mode):
            bits |= PACKET_TYPE_MULTICAST
        return bits

    def apply_filters(self) -> None:
        """Send the multicast list (if the device has filters) and the packet filter for soft.mode."""
        if not self.soft.filter_supported:
            return
        mc = self.multicast_list_for(self.soft.mode)
        if mc is not None and mc != self.soft.mc_list:
            self.set_ethernet_multicast_filters(mc)
        self.set_ethernet_packet_filter(self.packet_filter_for(self.soft.mode))

    def open(self) -> None:
        fn = self.fn
        if fn.data_alt != DATA_ALT_IDLE:
            self.select_data_alt(DATA_ALT_IDLE)          # reset the data pipes ...
            self.select_data_alt(fn.data_alt)             # ... and start traffic
        self.apply_filters()
        self.soft.opened = True
        self.start_datapath()

    def stop(self) -> None:
        self.stop_datapath()
        if self.fn.data_alt != DATA_ALT_IDLE:
            self.select_data_alt(DATA_ALT_IDLE)          # ECM: alt 0 = no traffic
        self.soft.opened = False

    def set_mac(self, mac: bytes) -> None:
        """Emulated (ECM cannot change the station address): promiscuous while mac != iMACAddress."""
        mac = bytes(mac)
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"{mac.hex(':')} is not a unicast MAC address")
        self.soft.mac = mac
        if self.soft.opened:
            self.apply_filters()

    def set_rx_mode(self, mode: RxMode) -> None:
        self.soft.mode = mode
        if self.soft.opened:
            self.apply_filters()                          # else: open() applies it

    def link_check(self) -> LinkState:
        """The link as the last notifications told it (ECM has no link register to read)."""
        return self.soft.link

    def on_status(self, data: bytes) -> None:
        s = self.soft
        if s.speed_pending:                               # the data half of a split speed change
            s.speed_pending = False
            if len(data) >= SPEED_CHANGE_DATA and not (len(data) == NOTIFICATION_HEADER
                                                        and data[0] == NOTIFICATION_REQT
                                                        and data[1] in (NETWORK_CONNECTION,
                                                                        CONNECTION_SPEED_CHANGE)):
                self._speed(data[:SPEED_CHANGE_DATA])
                return
        if len(data) < NOTIFICATION_HEADER or data[0] != NOTIFICATION_REQT:
            s.bad_notifications += 1
            return
        s.notifications += 1
        code = data[1]
        value = data[2] | (data[3] << 8)
        length = data[6] | (data[7] << 8)
        if code == NETWORK_CONNECTION:
            up = value != 0
            if up != s.link.up:
                s.link_changes += 1
            s.link = LinkState(up, s.link.speed if up else 0, s.link.full_duplex if up else False)
        elif code == CONNECTION_SPEED_CHANGE:
            if length < SPEED_CHANGE_DATA:
                s.bad_notifications += 1
            elif len(data) >= NOTIFICATION_HEADER + SPEED_CHANGE_DATA:
                self._speed(data[NOTIFICATION_HEADER:NOTIFICATION_HEADER + SPEED_CHANGE_DATA])
            else:
                s.speed_pending = True                    # interrupt packet smaller than 16 bytes
        # RESPONSE_AVAILABLE and others carry nothing an ECM function needs

    def _speed(self, data: bytes) -> None:
        s = self.soft
        s.dl_bitrate = int.from_bytes(data[0:4], "little")
        s.ul_bitrate = int.from_bytes(data[4:8], "little")
        s.speed_changes += 1
        s.link = LinkState(s.link.up, s.dl_bitrate // 1_000_000 if s.link.up else 0, s.link.full_duplex)

    def stats(self) -> DriverStats:
        s = self.soft
        return DriverStats(extra={"notifications": s.notifications, "link_changes": s.link_changes,
                                  "speed_changes": s.speed_changes, "bad_notifications": s.bad_notifications,
                                  "dl_bitrate": s.dl_bitrate, "ul_bitrate": s.ul_bitrate,
                                  "packet_filter": s.packet_filter,
                                  "mac_emulated": int(s.mac != s.perm_mac)})

    # --- suspend/resume, refactored into checkpoint/restore ---------------------------------------
    def checkpoint(self) -> EcmCheckpoint:
        s = self.soft
        return EcmCheckpoint(s.data_alt, s.packet_filter, s.mc_list, s.filter_supported)

    def restore(self, cp: EcmCheckpoint) -> None:
        """Re-send the filters; re-select the data interface's alt (alt 0 first: the ECM reset)
        only when the device is not in the checkpoint's alt. GET_INTERFACE tells: one control
        transfer where the reset costs two SET_INTERFACEs, each making the device tear down and
        rebuild its data path (about half of a recovery on f_ecm). A device that will not say
        gets the reset."""
        fn = self.fn
        if self.alt_setting_now(self.fn.data) == cp.data_alt:
            self.soft.data_alt = cp.data_alt
        elif fn.data_alt != DATA_ALT_IDLE:
            self.select_data_alt(DATA_ALT_IDLE)
            if cp.data_alt != DATA_ALT_IDLE:
                self.select_data_alt(cp.data_alt)
        if cp.filter_supported:
            if cp.mc_list:
                self.set_ethernet_multicast_filters(cp.mc_list)
            self.set_ethernet_packet_filter(cp.packet_filter)

    def invariants(self) -> list[str]:
        s = self.soft
        broken = []
        if len(s.mac) != 6 or s.mac[0] & 1:
            broken.append(f"MAC {s.mac.hex()} is not a unicast 6-byte address")
        if s.packet_filter & ~PACKET_TYPE_ALL:
            broken.append(f"packet filter 0x{s.packet_filter:x} has undefined bits")
        if len(s.mc_list) > self.fn.mc_filters:
            broken.append(f"{len(s.mc_list)} multicast filters set, the device has {self.fn.mc_filters}")
        if s.data_alt not in (DATA_ALT_IDLE, self.fn.data_alt):
            broken.append(f"data interface alt {s.data_alt} is neither idle nor {self.fn.data_alt}")
        if not self.min_mtu <= s.mtu <= self.max_mtu:
            broken.append(f"MTU {s.mtu} out of range")
        return broken


DRIVER = CdcEcm

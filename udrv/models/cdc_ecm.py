"""A CDC-ECM USB NIC, modelled from the USB CDC 1.2 and ECM 1.2 specifications.

Shares no code and no constants with `drivers/cdc_ecm` (two independent readings of the same
spec catch each other's misreadings; the kernel tier adds a third: Linux's own f_ecm gadget).
Plug it into a driver with `ModelUsbTransport(EcmModel())`.

The device, in one paragraph: configuration 1 has a communications interface (class 2,
subclass 6) carrying Header, Union and Ethernet Networking functional descriptors and an
interrupt IN endpoint for notifications, and a data interface (class 0x0A) whose alt 0 has no
endpoints and whose alt 1 has a bulk IN and a bulk OUT endpoint. Selecting alt 1 starts the
function (frames flow, the packet filter applies, a NETWORK_CONNECTION and a
CONNECTION_SPEED_CHANGE notification are queued); alt 0 stops it and drops queued frames. The
host filters with class requests on the control interface. Frames are raw Ethernet, one per
transfer; a transfer ends with a short packet, so a frame that is an exact multiple of the
packet size runs into the next transfer unless the host adds a zero-length packet or a pad byte.

Inspection (`packet_filter`, `multicast`, `data_alt`, `counters`, `request_log`) and fault knobs
(`stall_next_control`, `no_answer_next_control`, `stall_endpoint`, `unplug`/`replug`,
`set_link`, `inject_rx_raw`, `hold_tx`, `function_reset`) are for tests.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, NoReturn

from udrv.models.usb import ModelGone, ModelNoAnswer, ModelStall, Setup
from udrv.usbtransport import DeviceInfo, EndpointInfo, EpType, InterfaceInfo

# The spec's numbers, spelled out here independently of the driver.
_CS_INTERFACE = 0x24
_FD_HEADER, _FD_UNION, _FD_ETHERNET = 0x00, 0x06, 0x0F
_REQ_SET_MC_FILTERS = 0x40
_REQ_SET_PM_FILTER = 0x41
_REQ_GET_PM_FILTER = 0x42
_REQ_SET_PACKET_FILTER = 0x43
_REQ_GET_STATISTIC = 0x44
_PF_PROMISC, _PF_ALLMULTI, _PF_DIRECTED, _PF_BROADCAST, _PF_MULTICAST = 0x01, 0x02, 0x04, 0x08, 0x10
_NOTIFY_NETWORK_CONNECTION = 0x00
_NOTIFY_SPEED_CHANGE = 0x2A

STATISTICS = ("XMIT_OK", "RCV_OK", "XMIT_ERROR", "RCV_ERROR", "RCV_NO_BUFFER")   # selectors 1..5

DEFAULT_MAC = bytes.fromhex("02ecec000001")
MIN_FRAME = 14


@dataclass
class EcmCounters:
    control_requests: int = 0
    control_stalls: int = 0
    class_requests: int = 0
    set_interface: int = 0
    clear_halts: int = 0
    tx_transfers: int = 0
    tx_frames: int = 0
    tx_pad_bytes: int = 0            # transfers that ended in one extra byte past a packet boundary
    tx_dropped_idle: int = 0         # OUT data while alt 0 is selected
    tx_dropped_runt: int = 0
    rx_frames: int = 0               # accepted from the wire
    rx_dropped_filter: int = 0
    rx_dropped_idle: int = 0
    rx_dropped_link: int = 0
    rx_transfers: int = 0
    notifications: int = 0
    function_resets: int = 0


class EcmModel:
    """The device side of a CDC-ECM NIC; implements `udrv.models.usb.UsbDeviceModel`."""

    CONTROL, DATA = 0, 1
    EP_NOTIFY, EP_BULK_IN, EP_BULK_OUT = 0x83, 0x81, 0x02

    def __init__(self, *, mac: bytes = DEFAULT_MAC, vid: int = 0x1D6B, pid: int = 0x0103,
                 speed: str = "high", max_segment: int = 1514, mc_filters: int = 0,
                 notify_packet: int = 16, link_up: bool = True, bitrate: int = 425_984_000,
                 support_packet_filter: bool = True, mac_string_index: int = 3,
                 rx_queue_limit: int = 256):
        self.mac = bytes(mac)
        self.bulk_mps = 512 if speed == "high" else 64
        self.max_segment = max_segment
        self.mc_filters = mc_filters
        self.support_packet_filter = support_packet_filter
        self.notify_packet = notify_packet
        self.mac_string_index = mac_string_index
        self.rx_queue_limit = rx_queue_limit
        self._link_up = link_up
        self._bitrate = bitrate
        header = bytes((5, _CS_INTERFACE, _FD_HEADER, 0x10, 0x01))
        union = bytes((5, _CS_INTERFACE, _FD_UNION, self.CONTROL, self.DATA))
        ether = bytes((13, _CS_INTERFACE, _FD_ETHERNET, mac_string_index)) + (0).to_bytes(4, "little") \
            + max_segment.to_bytes(2, "little") + mc_filters.to_bytes(2, "little") + b"\x00"
        self.info = DeviceInfo(
            vid=vid, pid=pid, bcd_device=0x0601, device_class=0, bus=1, address=2, port_path=(1,),
            speed=speed, interfaces=(
                InterfaceInfo(self.CONTROL, 0, 0x02, 0x06, 0x00,
                              (EndpointInfo(self.EP_NOTIFY, EpType.INTERRUPT, notify_packet, 9),),
                              header + union + ether),
                InterfaceInfo(self.DATA, 0, 0x0A, 0x00, 0x00),
                InterfaceInfo(self.DATA, 1, 0x0A, 0x00, 0x00, (
                    EndpointInfo(self.EP_BULK_IN, EpType.BULK, self.bulk_mps),
                    EndpointInfo(self.EP_BULK_OUT, EpType.BULK, self.bulk_mps))),
            ), manufacturer="udrv", product="ECM model", serial="1")
        self.strings = {1: "udrv", 2: "ECM model", mac_string_index: mac.hex().upper()}
        self.counters = EcmCounters()
        self.request_log: list[tuple[Setup, bytes]] = []
        self.on_transmit: Callable[[bytes], None] | None = None
        self._notify: Callable[[], None] | None = None
        self._lock = threading.RLock()
        self._unplugged = False
        self._power_on()

    def _power_on(self) -> None:
        self.data_alt = 0
        self.packet_filter = _PF_DIRECTED | _PF_BROADCAST | _PF_ALLMULTI | _PF_PROMISC   # until told
        self.multicast: tuple[bytes, ...] = ()
        self._rx: deque[bytes] = deque()
        self._irq: deque[bytes] = deque()
        self._out_partial = b""
        self._stalled: set[int] = set()
        self._stall_control = 0
        self._no_answer_control = 0
        self._hold_tx = False
        self.stats = dict.fromkeys(STATISTICS, 0)

    # --- UsbDeviceModel ------------------------------------------------------------------------
    def set_notify(self, fn: Callable[[], None]) -> None:
        self._notify = fn

    def _wake(self) -> None:
        if self._notify is not None:
            self._notify()

    def _present(self) -> None:
        if self._unplugged:
            raise ModelGone("unplugged")

    def _stall(self, why: str) -> NoReturn:
        self.counters.control_stalls += 1
        raise ModelStall(why)

    def control(self, setup: Setup, data: bytes) -> bytes:
        with self._lock:
            self._present()
            self.counters.control_requests += 1
            self.request_log.append((setup, bytes(data)))
            del self.request_log[:-4096]
            if self._stall_control:
                self._stall_control -= 1
                self._stall("injected control stall")
            if self._no_answer_control:
                self._no_answer_control -= 1
                raise ModelNoAnswer("injected: no answer")
            out = self._dispatch(setup, bytes(data))
        self._wake()
        return out

    def _dispatch(self, s: Setup, data: bytes) -> bytes:
        rt, rq = s.request_type, s.request
        if rt == 0x80 and rq == 0x06:                              # GET_DESCRIPTOR (device)
            return self._get_descriptor(s)
        if rt == 0x80 and rq == 0x08:                              # GET_CONFIGURATION
            return b"\x01"
        if rt == 0x01 and rq == 0x0B:                              # SET_INTERFACE
            return self._set_interface(s.index, s.value)
        if rt == 0x81 and rq == 0x0A:                              # GET_INTERFACE: the alt in use
            itf = s.index & 0xFF
            if itf not in (self.CONTROL, self.DATA):
                self._stall(f"no interface {itf}")
            return bytes((self.data_alt if itf == self.DATA else 0,))[:s.length]
        if rt == 0x02 and rq == 0x01 and s.value == 0:            # CLEAR_FEATURE(ENDPOINT_HALT)
            self._stalled.discard(s.index & 0xFF)
            self.counters.clear_halts += 1
            return b""
        if rt in (0x21, 0xA1) and (s.index & 0xFF) == self.CONTROL:
            self.counters.class_requests += 1
            return self._class_request(s, data)
        self._stall(f"request type 0x{rt:02x} request 0x{rq:02x} index {s.index} is not supported")

    def _get_descriptor(self, s: Setup) -> bytes:
        dtype, index = s.value >> 8, s.value & 0xFF
        if dtype != 0x03:
            self._stall("only string descriptors are modelled")
        if index == 0:
            return bytes((4, 3, 0x09, 0x04))
        text = self.strings.get(index)
        if text is None:
            self._stall(f"no string {index}")
        body = text.encode("utf-16-le")
        return (bytes((2 + len(body), 3)) + body)[:s.length]

    def _set_interface(self, itf: int, alt: int) -> bytes:
        self.counters.set_interface += 1
        if itf == self.CONTROL and alt == 0:
            return b""
        if itf != self.DATA or alt not in (0, 1):
            self._stall(f"interface {itf} has no alt {alt}")
        # either way the data endpoints are (re)initialised: halts and toggles cleared, queues flushed
        self._stalled.difference_update({self.EP_BULK_IN, self.EP_BULK_OUT})
        self._rx.clear()
        self._out_partial = b""
        self.data_alt = alt
        if alt == 1:
            self._queue_connection()
        return b""

    def _class_request(self, s: Setup, data: bytes) -> bytes:
        rq = s.request
        if s.request_type == 0x21 and rq == _REQ_SET_PACKET_FILTER:
            if not self.support_packet_filter:
                self._stall("SET_ETHERNET_PACKET_FILTER not implemented")
            if s.length != 0 or s.value & ~0x1F:
                self._stall("malformed SET_ETHERNET_PACKET_FILTER")
            self.packet_filter = s.value
            return b""
        if s.request_type == 0x21 and rq == _REQ_SET_MC_FILTERS:
            n = s.value
            if self.mc_filters == 0 or n > self.mc_filters or len(data) != 6 * n:
                self._stall("SET_ETHERNET_MULTICAST_FILTERS refused")
            self.multicast = tuple(data[6 * i:6 * i + 6] for i in range(n))
            return b""
        if s.request_type == 0xA1 and rq == _REQ_GET_STATISTIC:
            if not 1 <= s.value <= len(STATISTICS):
                self._stall("unknown statistic")
            return self.stats[STATISTICS[s.value - 1]].to_bytes(4, "little")[:s.length]
        self._stall(f"class request 0x{rq:02x} is not supported")

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        with self._lock:
            self._present()
            if endpoint != self.EP_BULK_OUT:
                raise ModelStall(f"no bulk OUT endpoint 0x{endpoint:02x}")
            if self.data_alt != 1:
                self.counters.tx_dropped_idle += 1
                raise ModelStall("the data interface is in alt 0: it has no endpoints")
            if endpoint in self._stalled:
                raise ModelStall("bulk OUT halted")
            if self._hold_tx:
                raise ModelNoAnswer("hold_tx")
            self.counters.tx_transfers += 1
            buf = self._out_partial + bytes(data)
            if data and len(data) % self.bulk_mps == 0:
                self._out_partial = buf          # no short packet: the frame goes on
                return
            self._out_partial = b""
            if len(buf) % self.bulk_mps == 1 and len(buf) > 1:
                self.counters.tx_pad_bytes += 1
            if len(buf) < MIN_FRAME:
                self.counters.tx_dropped_runt += 1
                return
            self.counters.tx_frames += 1
            self.stats["XMIT_OK"] += 1
            if self.on_transmit is not None:
                self.on_transmit(buf)

    def take_in(self, endpoint: int, max_len: int) -> bytes | None:
        with self._lock:
            self._present()
            if endpoint in self._stalled:
                raise ModelStall(f"endpoint 0x{endpoint:02x} halted")
            if endpoint == self.EP_NOTIFY:
                if not self._irq:
                    return None
                self.counters.notifications += 1
                return self._irq.popleft()
            if endpoint != self.EP_BULK_IN or self.data_alt != 1:
                raise ModelStall(f"no IN endpoint 0x{endpoint:02x} in the current setting")
            if not self._rx:
                return None
            self.counters.rx_transfers += 1
            return self._rx.popleft()

    # --- the wire -----------------------------------------------------------------------------
    def _accepts(self, frame: bytes) -> bool:
        dst, pf = frame[:6], self.packet_filter
        if pf & _PF_PROMISC:
            return True
        if dst == b"\xff" * 6:
            return bool(pf & _PF_BROADCAST)
        if dst[0] & 1:
            return bool(pf & _PF_ALLMULTI) or bool(pf & _PF_MULTICAST and dst in self.multicast)
        return bool(pf & _PF_DIRECTED) and dst == self.mac

    def wire_receive(self, frame: bytes) -> bool:
        """A frame arrives from the cable; True if the device queued it for the host."""
        with self._lock:
            if self._unplugged:
                return False
            if not self._link_up:
                self.counters.rx_dropped_link += 1
                return False
            if self.data_alt != 1:
                self.counters.rx_dropped_idle += 1
                return False
            if not self._accepts(frame):
                self.counters.rx_dropped_filter += 1
                return False
            if len(self._rx) >= self.rx_queue_limit:
                self.stats["RCV_NO_BUFFER"] += 1
                return False
            self._rx.append(bytes(frame))
            self.counters.rx_frames += 1
            self.stats["RCV_OK"] += 1
        self._wake()
        return True

    # --- notifications ------------------------------------------------------------------------------
    def _notification(self, code: int, value: int, payload: bytes = b"") -> None:
        msg = bytes((0xA1, code)) + value.to_bytes(2, "little") + self.CONTROL.to_bytes(2, "little") \
            + len(payload).to_bytes(2, "little") + payload
        for i in range(0, len(msg), self.notify_packet):      # split at the endpoint's packet size
            self._irq.append(msg[i:i + self.notify_packet])

    def _queue_connection(self) -> None:
        self._notification(_NOTIFY_NETWORK_CONNECTION, int(self._link_up))
        rate = self._bitrate if self._link_up else 0
        self._notification(_NOTIFY_SPEED_CHANGE, 0, rate.to_bytes(4, "little") * 2)

    # --- knobs ------------------------------------------------------------------------------------
    def set_link(self, up: bool, bitrate: int | None = None) -> None:
        with self._lock:
            self._link_up = up
            if bitrate is not None:
                self._bitrate = bitrate
            if self.data_alt == 1:
                self._queue_connection()
        self._wake()

    def notify_raw(self, packet: bytes) -> None:
        with self._lock:
            self._irq.append(bytes(packet))
        self._wake()

    def inject_rx_raw(self, data: bytes) -> None:
        """Put any bytes on bulk IN as one transfer (runts, zero-length, oversize)."""
        with self._lock:
            self._rx.append(bytes(data))
        self._wake()

    def stall_next_control(self, n: int = 1) -> None:
        self._stall_control += n

    def no_answer_next_control(self, n: int = 1) -> None:
        self._no_answer_control += n

    def stall_endpoint(self, ep: int) -> None:
        with self._lock:
            self._stalled.add(ep)
        self._wake()

    def hold_tx(self, on: bool) -> None:
        with self._lock:
            self._hold_tx = on
        self._wake()

    def function_reset(self) -> None:
        """What a firmware hiccup does: filters back to defaults, data interface idle."""
        with self._lock:
            self.counters.function_resets += 1
            self._power_on()
        self._wake()

    def unplug(self) -> None:
        with self._lock:
            self._unplugged = True
        self._wake()

    def replug(self) -> None:
        with self._lock:
            self._unplugged = False
            self._power_on()
        self._wake()

    def requests(self, request: int) -> list[tuple[Setup, bytes]]:
        """The logged control requests with this bRequest (class or standard)."""
        return [(s, d) for s, d in self.request_log if s.request == request]

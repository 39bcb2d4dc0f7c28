"""ADMtek Pegasus / Pegasus II (ADM8511/8513/8515) USB 10/100 Ethernet.

Device knowledge only: registers, bring-up, configuration, checkpoint/restore. The framework
(udrv.usbnet) moves the frames using the framing declared below and the guard makes every
entry point a transaction. Facts from the Linux driver and FreeBSD's if_aue (described in
docs/reference/pegasus.md), written here independently of the udrv pegasus model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

from udrv.driver import DriverStats, LinkState, RxMode
from udrv.errors import TransferTimeout
from udrv.framing import Framing, Shape
from udrv.usbnet import UsbId, UsbNetDriver, CONTROL_TIMEOUT

# --- vendor requests ------------------------------------------------------------------------
PEGASUS_REQT_READ = 0xC0
PEGASUS_REQT_WRITE = 0x40
PEGASUS_REQ_GET_REGS = 0xF0
PEGASUS_REQ_SET_REGS = 0xF1

# --- registers --------------------------------------------------------------------------------
EthCtrl0 = 0x00
EthCtrl1 = 0x01
EthCtrl2 = 0x02
EthID = 0x10
Reg1d = 0x1D
EpromOffset = 0x20
EpromData = 0x21
EpromCtrl = 0x23
PhyAddr = 0x25
PhyData = 0x26
PhyCtrl = 0x28
Reg7b = 0x7B
Gpio0 = 0x7E
Gpio1 = 0x7F
Reg81 = 0x81

# EthCtrl0
RX_MULTICAST = 0x02
CTRL0_ENABLE = 0xC8          # TX + RX enable, append RX status, strip CRC
# EthCtrl1
MAC_RESET = 0x08
CTRL1_100MBPS = 0x10
CTRL1_FULL_DUPLEX = 0x20
# EthCtrl2
CTRL2_NORMAL = 0x01
RX_PROMISCUOUS = 0x04
# EpromCtrl
EPROM_WRITE = 0x01
EPROM_READ = 0x02
EPROM_DONE = 0x04
# PhyCtrl
PHY_WRITE = 0x20
PHY_READ = 0x40
PHY_DONE = 0x80

# MII registers and bits
MII_BMSR = 0x01
MII_LPA = 0x05
BMSR_LSTATUS = 0x0004
LPA_10FULL = 0x0040
LPA_100HALF = 0x0080
LPA_100FULL = 0x0100

# interrupt packet, byte 0 (TX status)
TX_UNDERRUN = 0x80
EXCESSIVE_COL = 0x40
LATE_COL = 0x20
NO_CARRIER = 0x10
LOSS_CARRIER = 0x08
JABBER_TIMEOUT = 0x04

# RX trailer status bits (drop and count)
RX_RUNT = 0x04
RX_CRC_ERR = 0x08
RX_DRIBBLE = 0x10
RX_TOO_LONG = 0x02

REG_POLLS = 100              # polls of a DONE/self-clearing bit before giving up
DEFAULT_GPIO_SET = 0x26
DEFAULT_GPIO_RESET = 0x24
ADM8513_PROBE = 0xA5

# chip flags (the low byte is the GPIO reset value, as in the Linux table)
PEGASUS_II = 0x80000000
HAS_HOME_PNA = 0x40000000

VENDOR_LINKSYS = 0x066B
VENDOR_DLINK = 0x2001

_G = DEFAULT_GPIO_RESET
_II = _G | PEGASUS_II
_PNA = _G | HAS_HOME_PNA
_IIPNA = _II | HAS_HOME_PNA

PEGASUS_IDS: tuple[UsbId, ...] = tuple(UsbId(v, p, n, f, c) for v, p, f, n, c in [
    (0x0506, 0x4601, _II, "3Com USB Ethernet 3C460B", None),
    (0x0557, 0x2007, _II, "ATEN USB Ethernet UC-110T", None),
    (0x07B8, 0x110C, _IIPNA, "USB HPNA/Ethernet", None),
    (0x07B8, 0x4104, _PNA, "USB HPNA/Ethernet", None),
    (0x07B8, 0x4004, _PNA, "USB HPNA/Ethernet", None),
    (0x07B8, 0x4007, _PNA, "USB HPNA/Ethernet", None),
    (0x07B8, 0x4102, _II, "USB 10/100 Fast Ethernet", None),
    (0x07B8, 0x4002, _G, "USB 10/100 Fast Ethernet", None),
    (0x07B8, 0x400B, _II, "USB 10/100 Fast Ethernet", None),
    (0x07B8, 0x400C, _II, "USB 10/100 Fast Ethernet", None),
    (0x07B8, 0xABC1, _G, "USB 10/100 Fast Ethernet", None),
    (0x07B8, 0x200C, _II, "USB 10/100 Fast Ethernet", None),
    (0x083A, 0x1046, _G, "Accton USB 10/100 Ethernet Adapter", None),
    (0x083A, 0x5046, _II, "SpeedStream USB 10/100 Ethernet", None),
    (0x083A, 0xB004, _II, "Philips USB 10/100 Ethernet", None),
    (0x07A6, 0x8511, _IIPNA, "ADMtek ADM8511 Pegasus II", None),
    (0x07A6, 0x8513, _II, "ADMtek ADM8513 Pegasus II", None),
    (0x07A6, 0x8515, _II, "ADMtek ADM8515 Pegasus II USB-2.0", None),
    (0x07A6, 0x0986, _PNA, "ADMtek AN986 Pegasus (evaluation board)", None),
    (0x07A6, 1986, _II, "AN986A USB MAC", None),
    (0x3334, 0x1701, _II, "AEI USB Fast Ethernet Adapter", None),
    (0x07C9, 0xB100, _II, "Allied Telesyn AT-USB100", None),
    # a Belkin Bluetooth dongle shares this id: match device class 0 only
    (0x050D, 0x0121, _II, "Belkin F5D5050 USB Ethernet", 0x00),
    (0x050D, 0x0122, _II, "Belkin F5U122 10/100 USB Ethernet", None),
    (0x08DD, 0x0986, _G, "Billionton USB-100", None),
    (0x08DD, 0x0987, _PNA, "Billionton USBLP-100", None),
    (0x049F, 0x8511, _II, "iPAQ Networking 10/100 USB", None),
    (0x08DD, 0x0988, _G, "Billionton USBEL-100", None),
    (0x08DD, 0x8511, _II, "Billionton USBE-100", None),
    (0x07AA, 0x0004, _G, "Corega FEther USB-TX", None),
    (0x07AA, 0x000D, _II, "Corega FEther USB-TXS", None),
    (0x2001, 0x4001, _G, "D-Link DSB-650TX", None),
    (0x2001, 0x4002, _G, "D-Link DSB-650TX", None),
    (0x2001, 0x4102, _II, "D-Link DSB-650TX", None),
    (0x2001, 0x400B, _II, "D-Link DSB-650TX", None),
    (0x2001, 0x200C, _II, "D-Link DSB-650TX", None),
    (0x2001, 0x4003, _PNA, "D-Link DSB-650TX(PNA)", None),
    (0x2001, 0xABC1, _G, "D-Link DSB-650", None),
    (0x0DB7, 0x0002, _IIPNA, "GOLDPFEIL USB Adapter", None),
    (0x056E, 0x4010, _II, "ELECOM USB Ethernet LD-USB20", None),
    (0x1342, 0x0304, _G, "EasiDock Ethernet", None),
    (0x05CC, 0x3000, _G, "Elsa Micolink USB2Ethernet", None),
    (0x1044, 0x8002, _G, "GIGABYTE GN-BR402W Wireless Router", None),
    (0x0E66, 0x400C, _II, "Hawking UF100 10/100 Ethernet", None),
    (0x03F0, 0x811C, _II, "HP hn210c Ethernet USB", None),
    (0x04BB, 0x0904, _G, "IO DATA USB ET/TX", None),
    (0x04BB, 0x0913, _II, "IO DATA USB ET/TX-S", None),
    (0x04BB, 0x093A, _II, "IO DATA USB ETX-US2", None),
    (0x0951, 0x000A, _G, "Kingston KNU101TX Ethernet", None),
    (0x056E, 0x4002, _G, "LANEED USB Ethernet LD-USB/TX", None),
    (0x056E, 0x4005, _II, "LANEED USB Ethernet LD-USBL/TX", None),
    (0x056E, 0x400B, _II, "LANEED USB Ethernet LD-USB/TX", None),
    (0x056E, 0xABC1, _G, "LANEED USB Ethernet LD-USB/T", None),
    (0x056E, 0x200C, _II, "LANEED USB Ethernet LD-USB/TX", None),
    (0x066B, 0x2202, _G, "Linksys USB10TX", None),
    (0x066B, 0x2203, _G, "Linksys USB100TX", None),
    (0x066B, 0x2204, _PNA, "Linksys USB100TX", None),
    (0x066B, 0x2206, _II, "Linksys USB10T Ethernet Adapter", None),
    (0x077B, 0x08B4, _G, "Linksys USBVPN1", None),
    (0x066B, 0x400B, _II, "Linksys USB USB100TX", None),
    (0x066B, 0x200C, _II, "Linksys USB10TX", None),
    (0x0411, 0x0001, _G, "MELCO/BUFFALO LUA-TX", None),
    (0x0411, 0x0005, _G, "MELCO/BUFFALO LUA-TX", None),
    (0x0411, 0x0009, _II, "MELCO/BUFFALO LUA2-TX", None),
    (0x045E, 0x007A, _II, "Microsoft MN-110", None),
    (0x0846, 0x1020, _II, "NETGEAR FA101", None),
    (0x0B39, 0x0109, _II, "OCT Inc.", None),
    (0x0B39, 0x0901, _II, "OCT USB TO Ethernet", None),
    (0x08D1, 0x0003, _II, "smartNIC 2 PnP Adapter", None),
    (0x0707, 0x0200, _G, "SMC 202 USB Ethernet", None),
    (0x0707, 0x0201, _II, "SMC 2206 USB Ethernet", None),
    (0x15E8, 0x9100, _G, "SOHOware NUB100 Ethernet", None),
    (0x15E8, 0x9110, _II, "SOHOware NUB110 Ethernet", None),
    (0x067C, 0x1001, _II, "SpeedStream USB 10/100 Ethernet", None),
])

_RX_ERRORS = ((RX_CRC_ERR, "crc_error"), (RX_RUNT, "runt"), (RX_DRIBBLE, "dribble"),
              (RX_TOO_LONG, "too_long"))
FRAMING_TRAILER = Framing(Shape.TRAILER4, rx_transfer_size=1536 + 4, pad_rule=64,
                          rx_error_bits=_RX_ERRORS)
FRAMING_ADM8513 = Framing(Shape.HEADER2, rx_transfer_size=1536 + 4, pad_rule=64)


@dataclass
class PegasusSoft:
    mac: bytes = b"\x00" * 6
    features: int = DEFAULT_GPIO_RESET
    adm8513: bool = False
    phy: int = 1
    intr_interval: int = 0
    eth_regs: bytes = b"\x00\x00\x00"     # EthCtrl0..2 as last programmed
    mode: RxMode = field(default_factory=RxMode)
    mtu: int = 1500
    opened: bool = False
    link: LinkState = field(default_factory=lambda: LinkState(False))
    rx_missed: int = 0
    tx_errors: int = 0
    tx_fifo_errors: int = 0
    tx_aborted: int = 0
    tx_window: int = 0
    carrier_lost: int = 0


@dataclass(frozen=True)
class PegasusCheckpoint:
    """What a resume needs (FGFT's pegasus checkpoint is soft state only: 0 µs)."""
    mac: bytes
    eth_regs: bytes
    gpio: tuple[int, int]
    opened: bool


class Pegasus(UsbNetDriver):
    name = "pegasus"
    ids = PEGASUS_IDS
    framing = FRAMING_TRAILER
    EP_IN = 0x81
    EP_OUT = 0x02
    EP_STATUS = 0x83
    max_mtu = 1500
    mii_mode: ClassVar[bool] = False
    # the C ring writes in-order TCP segments received together as one GSO super-frame, and
    # keeps only the newest of a run of pure ACKs (native/gro.h): one frame per bulk IN transfer
    # here too, so a TAP write per frame is what it saves
    coalesce_rx = True

    def __init__(self, usb, actions):
        super().__init__(usb, actions)
        features = self.ident.flags if self.ident else _II
        self.soft = PegasusSoft(features=features)

    # --- register access ------------------------------------------------------------------
    def get_registers(self, reg: int, size: int) -> bytes:
        data = self.usb.control_in(PEGASUS_REQT_READ, PEGASUS_REQ_GET_REGS, 0, reg, size, CONTROL_TIMEOUT)
        if len(data) != size:
            raise TransferTimeout(f"short register read at 0x{reg:02x}: {len(data)} of {size} bytes")
        return data

    def set_registers(self, reg: int, data: bytes) -> None:
        self.usb.control_out(PEGASUS_REQT_WRITE, PEGASUS_REQ_SET_REGS, 0, reg, data, CONTROL_TIMEOUT)

    def set_register(self, reg: int, value: int) -> None:
        # the chip takes the value from wValue and ignores the data stage
        self.usb.control_out(PEGASUS_REQT_WRITE, PEGASUS_REQ_SET_REGS, value, reg, bytes([value]),
                             CONTROL_TIMEOUT)

    def _wait_bit(self, reg: int, bit: int, want_set: bool, what: str) -> None:
        for _ in range(REG_POLLS):
            if bool(self.get_registers(reg, 1)[0] & bit) == want_set:
                return
        raise TransferTimeout(f"{what} did not complete")

    # --- EEPROM and MII ----------------------------------------------------------------------
    def read_eprom_word(self, index: int) -> int:
        self.set_register(EpromCtrl, 0)
        self.set_register(EpromOffset, index)
        self.set_register(EpromCtrl, EPROM_READ)
        self._wait_bit(EpromCtrl, EPROM_DONE, True, "EEPROM read")
        d = self.get_registers(EpromData, 2)
        return d[0] | (d[1] << 8)

    def read_mii_word(self, phy: int, reg: int) -> int:
        self.set_register(PhyCtrl, 0)
        self.set_registers(PhyAddr, bytes((phy, 0, 0, reg)))
        self.set_register(PhyCtrl, reg | PHY_READ)
        self._wait_bit(PhyCtrl, PHY_DONE, True, "MII read")
        d = self.get_registers(PhyData, 2)
        return d[0] | (d[1] << 8)

    def write_mii_word(self, phy: int, reg: int, value: int) -> None:
        self.set_register(PhyCtrl, 0)
        self.set_registers(PhyAddr, bytes((phy, value & 0xFF, value >> 8, reg)))
        self.set_register(PhyCtrl, reg | PHY_WRITE)
        self._wait_bit(PhyCtrl, PHY_DONE, True, "MII write")

    # --- bring-up -------------------------------------------------------------------------------
    def probe(self) -> None:
        self.reset_mac()
        if self.soft.features & PEGASUS_II:
            self.setup_pegasus_ii()
        self.soft.mac = self.get_node_id()
        self.soft.intr_interval = self.read_eprom_word(4) >> 8
        self.soft.phy = self.find_phy()
        self.soft.eth_regs = self.get_registers(EthCtrl0, 3)

    def reset_mac(self) -> None:
        self.set_register(EthCtrl1, MAC_RESET)
        self._wait_bit(EthCtrl1, MAC_RESET, False, "MAC reset")
        # HomePNA adapters in MII mode want 0x34; we always run them in Ethernet mode
        self.set_register(Gpio1, 0x34 if self.soft.features & HAS_HOME_PNA and self.mii_mode else 0x26)
        self.set_register(Gpio0, self.soft.features & 0xFF)
        self.set_register(Gpio0, DEFAULT_GPIO_SET)
        if self.usb.info.vid in (VENDOR_LINKSYS, VENDOR_DLINK):
            self.set_register(Gpio0, 0x24)
            self.set_register(Gpio0, 0x26)

    def setup_pegasus_ii(self) -> None:
        self.set_register(Reg1d, 0)
        self.set_register(Reg7b, 1)
        time.sleep(0.1)          # the chip needs ~100 ms between the two Reg7b writes
        self.set_register(Reg7b, 2)
        self.set_register(0x83, ADM8513_PROBE)
        self.soft.adm8513 = self.get_registers(0x83, 1)[0] == ADM8513_PROBE
        self.set_register(0x80, 0xC0)
        self.set_register(0x83, 0xFF)
        self.set_register(0x84, 0x01)
        self.set_register(Reg81, 0x02)

    def get_node_id(self) -> bytes:
        if self.soft.features & PEGASUS_II:
            return self.get_registers(EthID, 6)
        mac = b"".join(self.read_eprom_word(i).to_bytes(2, "little") for i in range(3))
        self.set_registers(EthID, mac)
        return mac

    def find_phy(self) -> int:
        for phy in range(32):
            bmsr = self.read_mii_word(phy, MII_BMSR)
            if bmsr not in (0, 0xFFFF):
                return phy
        return 1

    def framing_now(self) -> Framing:
        return FRAMING_ADM8513 if self.soft.adm8513 else FRAMING_TRAILER

    # --- configuration entry points -------------------------------------------------------
    def eth_regs_for(self, lpa: int, mode: RxMode) -> bytes:
        ctrl0 = CTRL0_ENABLE
        ctrl1 = 0
        if lpa & (LPA_100FULL | LPA_10FULL):
            ctrl1 |= CTRL1_FULL_DUPLEX
        if lpa & (LPA_100FULL | LPA_100HALF):
            ctrl1 |= CTRL1_100MBPS
        ctrl2 = CTRL2_NORMAL
        if mode.promisc:
            ctrl2 |= RX_PROMISCUOUS
        elif mode.allmulti or mode.multicast:
            ctrl0 |= RX_MULTICAST     # like Linux: any multicast list means all-multicast
        return bytes((ctrl0, ctrl1, ctrl2))

    def open(self) -> None:
        lpa = self.read_mii_word(self.soft.phy, MII_LPA)
        regs = self.eth_regs_for(lpa, self.soft.mode)
        self.set_registers(EthCtrl0, regs)
        self.soft.eth_regs = regs
        self.soft.opened = True
        self.start_datapath()
        self.soft.link = self._read_link()

    def stop(self) -> None:
        self.stop_datapath()
        self.set_registers(EthCtrl0, b"\x00\x00")
        self.soft.eth_regs = b"\x00\x00" + self.soft.eth_regs[2:]
        self.soft.opened = False

    def set_mac(self, mac: bytes) -> None:
        self.set_registers(EthID, mac)
        self.soft.mac = bytes(mac)

    def set_rx_mode(self, mode: RxMode) -> None:
        self.soft.mode = mode
        if not self.soft.opened:
            return                 # applied by open()
        r = self.soft.eth_regs
        ctrl0 = r[0] & ~RX_MULTICAST
        ctrl2 = r[2] & ~RX_PROMISCUOUS
        if mode.promisc:
            ctrl2 |= RX_PROMISCUOUS
        elif mode.allmulti or mode.multicast:
            ctrl0 |= RX_MULTICAST
        regs = bytes((ctrl0, r[1], ctrl2))
        self.set_registers(EthCtrl0, regs)
        self.soft.eth_regs = regs

    def _read_link(self) -> LinkState:
        self.read_mii_word(self.soft.phy, MII_BMSR)          # BMSR link is latched low
        up = bool(self.read_mii_word(self.soft.phy, MII_BMSR) & BMSR_LSTATUS)
        if not up:
            return LinkState(False)
        lpa = self.read_mii_word(self.soft.phy, MII_LPA)
        return LinkState(True, 100 if lpa & (LPA_100FULL | LPA_100HALF) else 10,
                         bool(lpa & (LPA_100FULL | LPA_10FULL)))

    def link_check(self) -> LinkState:
        link = self._read_link()
        if link.up and self.soft.opened:
            want1 = (CTRL1_FULL_DUPLEX if link.full_duplex else 0) | (CTRL1_100MBPS if link.speed == 100 else 0)
            if want1 != self.soft.eth_regs[1]:
                self.set_register(EthCtrl1, want1)
                self.soft.eth_regs = bytes((self.soft.eth_regs[0], want1, self.soft.eth_regs[2]))
        self.soft.link = link
        return link

    def on_status(self, data: bytes) -> None:
        if len(data) < 6:
            return
        d0 = data[0]
        if d0 & (TX_UNDERRUN | EXCESSIVE_COL | LATE_COL | JABBER_TIMEOUT):
            self.soft.tx_errors += 1
            self.soft.tx_fifo_errors += bool(d0 & TX_UNDERRUN)
            self.soft.tx_aborted += bool(d0 & (EXCESSIVE_COL | JABBER_TIMEOUT))
            self.soft.tx_window += bool(d0 & LATE_COL)
        if d0 & (NO_CARRIER | LOSS_CARRIER):
            self.soft.carrier_lost += 1
        self.soft.rx_missed += ((data[3] & 0x7F) << 8) | data[4]

    def stats(self) -> DriverStats:
        s = self.soft
        return DriverStats(rx_missed=s.rx_missed, tx_errors=s.tx_errors,
                           extra={"tx_fifo_errors": s.tx_fifo_errors, "tx_aborted_errors": s.tx_aborted,
                                  "tx_window_errors": s.tx_window, "carrier_lost": s.carrier_lost})

    # --- suspend/resume, refactored into checkpoint/restore ------------------------------------
    def checkpoint(self) -> PegasusCheckpoint:
        gpio = (DEFAULT_GPIO_SET, 0x26)
        return PegasusCheckpoint(self.soft.mac, self.soft.eth_regs, gpio, self.soft.opened)

    def restore(self, cp: PegasusCheckpoint) -> None:
        # resume = re-write what configuration wrote, then the framework resubmits transfers
        self.set_register(Gpio1, cp.gpio[1])
        self.set_register(Gpio0, cp.gpio[0])
        self.set_registers(EthID, cp.mac)
        self.set_registers(EthCtrl0, cp.eth_regs if cp.opened else b"\x00\x00" + cp.eth_regs[2:])

    def invariants(self) -> list[str]:
        s = self.soft
        broken = []
        if len(s.mac) != 6 or s.mac[0] & 1:
            broken.append(f"MAC {s.mac.hex()} is not a unicast 6-byte address")
        if len(s.eth_regs) != 3:
            broken.append("EthCtrl shadow is not 3 bytes")
        if not 0 <= s.phy < 32:
            broken.append(f"PHY address {s.phy} out of range")
        if not self.min_mtu <= s.mtu <= self.max_mtu:
            broken.append(f"MTU {s.mtu} out of range")
        return broken


DRIVER = Pegasus

"""Register-level model of the ADMtek Pegasus / Pegasus II USB NIC (AN986, ADM8511/8513/8515).

Written from `docs/reference/pegasus.md` alone (the Linux `pegasus.c` and FreeBSD `if_aue.c`
behaviour it summarises were consulted, not copied). It shares no code and no constants with
`drivers/pegasus`: the model and the driver are two independent readings of the same facts, so
each catches the other's misreadings. Plug it into a driver with `ModelUsbTransport(PegasusModel())`.

What the device does, in one paragraph: endpoint 0 carries vendor requests 0xF0 (read
registers) and 0xF1 (write registers; a one-byte write takes its value from wValue). The register
file is 256 bytes; a few registers start operations (MAC reset, EEPROM read/write, MII read/write)
whose completion the host polls for. EP 0x02 bulk OUT takes one frame per transfer behind a
2-byte length prefix; EP 0x81 bulk IN returns one received frame per transfer followed by a
4-byte trailer (length + 4, status, 0); EP 0x83 interrupt IN returns an 8-byte status packet.

Side-effect-free inspection (`regs`, `reg()`, `phy_reg()`, `counters`, `request_log`) and fault
knobs (`stall_next_control`, `no_answer_next_control`, `stall_endpoint`, `unplug`/`replug`,
`inject_rx_garbage`, `hold_tx`, `set_link`) are for tests and the demo.
"""
from __future__ import annotations

import threading
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from udrv.models.usb import ModelGone, ModelNoAnswer, ModelStall, Setup
from udrv.usbtransport import DeviceInfo, EndpointInfo, EpType, InterfaceInfo

# --- control requests -----------------------------------------------------------------------
REQT_READ = 0xC0            # device-to-host, vendor, device recipient
REQT_WRITE = 0x40           # host-to-device, vendor, device recipient
REQ_GET_REGS = 0xF0
REQ_SET_REGS = 0xF1

# --- registers (names as in the reference) ----------------------------------------------------
EthCtrl0 = 0x00
EthCtrl1 = 0x01
EthCtrl2 = 0x02
MulticastHash = 0x08        # 0x08..0x0F, 64-bit hash table
EthID = 0x10                # 0x10..0x15, station address
Reg1d = 0x1D
EpromOffset = 0x20
EpromData = 0x21            # 0x21..0x22, little-endian word
EpromCtrl = 0x23
PhyAddr = 0x25
PhyData = 0x26              # 0x26..0x27, little-endian word
PhyCtrl = 0x28
UsbStst = 0x2A
EthTxStat0 = 0x2B
EthTxStat1 = 0x2C
EthRxStat = 0x2D
RxLostHi = 0x2E             # lost-RX count; interrupt packet bytes 3-4 mirror 0x2E/0x2F
RxLostLo = 0x2F
WakeupControl = 0x78
Reg7b = 0x7B
Gpio0 = 0x7E
Gpio1 = 0x7F
Reg80 = 0x80
Reg81 = 0x81
Reg83 = 0x83                # ADM8513 probe: reads back 0xA5 only on that chip
Reg84 = 0x84

# EthCtrl0: 0xC8 = TX_EN | RX_EN | RXSTAT_APPEND (and INCLUDE_CRC clear = "no CRC")
CTL0_INCLUDE_CRC = 0x01
CTL0_ALLMULTI = 0x02
CTL0_RXSTAT_APPEND = 0x08
CTL0_WOL = 0x10
CTL0_RX_EN = 0x40
CTL0_TX_EN = 0x80
# EthCtrl1
CTL1_RESET_MAC = 0x08
CTL1_100MBIT = 0x10
CTL1_FULL_DUPLEX = 0x20
# EthCtrl2
CTL2_NORMAL = 0x01          # the "normal" bit; in FreeBSD's reading: reading EP3 clears status regs
CTL2_PROMISC = 0x04
CTL2_LOOPBACK = 0x08
CTL2_EEPROM_WR_EN = 0x10
# EpromCtrl
EPROM_WRITE = 0x01
EPROM_READ = 0x02
EPROM_DONE = 0x04
EPROM_WR_EN = 0x10
EPROM_LOAD = 0x20
# PhyCtrl
PHY_REG_MASK = 0x1F
PHY_WRITE = 0x20
PHY_READ = 0x40
PHY_DONE = 0x80
# RX trailer status byte
RXS_MCAST = 0x01            # not an error: multicast/broadcast destination (FreeBSD names it)
RXS_TOO_LONG = 0x02
RXS_RUNT = 0x04
RXS_CRC_ERROR = 0x08
RXS_DRIBBLE = 0x10
# EthTxStat0 / interrupt packet byte 0, EthRxStat / byte 2
TXS_NO_CARRIER = 0x10
RXSTAT_OVERRUN = 0x01

# --- endpoints -------------------------------------------------------------------------------
EP_RX = 0x81
EP_TX = 0x02
EP_INTR = 0x83

# --- MII (IEEE 802.3 clause 22) ------------------------------------------------------------------
MII_BMCR, MII_BMSR, MII_PHYSID1, MII_PHYSID2, MII_ADVERTISE, MII_LPA = 0, 1, 2, 3, 4, 5
BMCR_RESET = 0x8000
BMCR_ANRESTART = 0x0200
BMCR_DEFAULT = 0x3000       # 100 Mbit/s select, autonegotiation enabled
BMSR_CAPS = 0x7809          # 100FD 100HD 10FD 10HD, AN capable, extended registers
BMSR_ANEGCOMPLETE = 0x0020
BMSR_LSTATUS = 0x0004
ADVERTISE_DEFAULT = 0x01E1  # 100FD 100HD 10FD 10HD, CSMA selector
LPA_ACK = 0x4000
LPA_CSMA = 0x0001
LPA_MODE = {(100, True): 0x0100, (100, False): 0x0080, (10, True): 0x0040, (10, False): 0x0020}

# --- sizes ---------------------------------------------------------------------------------------
MAX_TX_FRAME = 1518         # 1514 + a VLAN tag
MAX_RX_FRAME = 1518
MIN_FRAME = 14              # an Ethernet header
EEPROM_WORDS = 64
DEFAULT_MAC = bytes.fromhex("02a685150001")   # locally administered, unicast
BROADCAST = b"\xff" * 6

GARBAGE_KINDS = ("length_beyond_transfer", "zero_length", "crc_error", "runt", "truncated",
                 "oversize", "too_long", "dribble", "empty")


@dataclass
class PegasusCounters:
    """What the device saw. Every drop has its own reason so tests can assert the exact one."""
    # endpoint 0
    control_requests: int = 0
    control_stalls: int = 0           # injected stalls and protocol errors (unknown request ...)
    control_no_answer: int = 0
    unknown_requests: int = 0
    set_one_data_mismatch: int = 0    # one-byte write whose data byte differed from wValue
    clear_halts: int = 0
    # TX (EP 0x02)
    tx_transfers: int = 0
    tx_frames: int = 0                # put on the wire (or looped back)
    tx_bytes: int = 0
    tx_malformed: int = 0             # bad length prefix: dropped
    tx_extra_bytes: int = 0           # transfer longer than prefix + 2 (other than the pad byte)
    tx_missing_pad: int = 0           # len + 2 was a multiple of 64 but no pad byte was sent
    tx_dropped_disabled: int = 0      # EthCtrl0 TX enable clear
    tx_no_carrier: int = 0            # link down
    tx_loopback: int = 0
    tx_mode_mismatch: int = 0         # EthCtrl1 speed/duplex disagree with the link
    tx_held: int = 0                  # refused while hold_tx(True)
    tx_stalled: int = 0
    # RX (EP 0x81)
    rx_frames: int = 0                # accepted from the wire into the RX FIFO
    rx_bytes: int = 0
    rx_transfers: int = 0             # handed to the host (frames and injected garbage)
    rx_dropped_filter: int = 0
    rx_dropped_disabled: int = 0      # EthCtrl0 RX enable clear
    rx_dropped_link: int = 0
    rx_dropped_size: int = 0
    rx_dropped_unplugged: int = 0
    rx_lost: int = 0                  # RX FIFO full
    rx_flushed: int = 0               # discarded by a MAC reset
    rx_garbage_injected: int = 0
    in_stalled: int = 0
    # EP 0x83
    interrupt_packets: int = 0
    # chip operations
    mac_resets: int = 0
    eeprom_reads: int = 0
    eeprom_writes: int = 0
    eeprom_writes_blocked: int = 0    # WRITE without write enable
    mii_reads: int = 0
    mii_writes: int = 0
    calls_while_unplugged: int = 0


@dataclass
class _Busy:
    """An operation in progress: the next `reads_left` reads of its register still see it busy."""
    reads_left: int
    finish: Callable[[], None]


def _le16(b: bytes | bytearray, i: int = 0) -> int:
    return b[i] | (b[i + 1] << 8)


def _hash_bit(addr: bytes) -> int:
    # FreeBSD aue: low 6 bits of the little-endian Ethernet CRC32 (init ~0, no final inversion).
    # zlib.crc32 inverts at the end, so undo that.
    return ((zlib.crc32(addr) ^ 0xFFFFFFFF) & 0x3F)


class PegasusModel:
    """The device side of an ADMtek Pegasus USB NIC; implements `udrv.models.usb.UsbDeviceModel`."""

    def __init__(self, vid: int = 0x07A6, pid: int = 0x8515, *,
                 mac: bytes = DEFAULT_MAC,
                 pegasus_ii: bool = True,
                 adm8513: bool = False,
                 speed: str | None = None,
                 phy_addr: int = 1,
                 phy_id: tuple[int, int] = (0x002E, 0xCC60),
                 link_up: bool = True,
                 link_speed: int = 100,
                 link_full_duplex: bool = True,
                 rx_queue_limit: int = 256,
                 mac_reset_reads: int = 1,
                 eeprom_busy_reads: int = 1,
                 phy_busy_reads: int = 1,
                 interrupt_interval: int = 8,
                 eeprom: Sequence[int] | None = None,
                 multicast_hash: bool = True,
                 rx_status_mcast_bit: bool = True,
                 request_log_limit: int = 4096):
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes")
        self.pegasus_ii = pegasus_ii
        self.adm8513 = adm8513
        self.phy_addr = phy_addr
        self.phy_id = phy_id
        self.rx_queue_limit = rx_queue_limit
        self.mac_reset_reads = mac_reset_reads
        self.eeprom_busy_reads = eeprom_busy_reads
        self.phy_busy_reads = phy_busy_reads
        self.multicast_hash = multicast_hash
        self.rx_status_mcast_bit = rx_status_mcast_bit
        self.request_log_limit = request_log_limit

        # Non-volatile: survives MAC resets and replugs.
        if eeprom is not None:
            words = [int(w) & 0xFFFF for w in eeprom]
            if len(words) != EEPROM_WORDS:
                raise ValueError(f"eeprom must hold {EEPROM_WORDS} words")
        else:
            words = [0xFFFF] * EEPROM_WORDS          # erased cells read all ones
            for i in range(3):                       # words 0-2: MAC, little-endian pairs
                words[i] = mac[2 * i] | (mac[2 * i + 1] << 8)
            words[3] = 0x0000
            words[4] = (interrupt_interval & 0xFF) << 8
        self._eeprom = words

        # Wire-side state: the cable, not the chip, so it also survives replugs.
        self._link_up = link_up
        self._link_speed = link_speed
        self._link_full = link_full_duplex
        self._check_link_mode(link_speed, link_full_duplex)

        if speed is None:
            speed = "high" if pid == 0x8515 else "full"
        mps = 512 if speed == "high" else 64
        self.info = DeviceInfo(
            vid=vid, pid=pid, bcd_device=0x0100,     # < 0x0201: FreeBSD would switch framing
            device_class=0, bus=1, address=2, port_path=(1,), speed=speed,
            interfaces=(InterfaceInfo(number=0, alt=0, cls=0xFF, subclass=0, protocol=0, endpoints=(
                EndpointInfo(EP_RX, EpType.BULK, mps),
                EndpointInfo(EP_TX, EpType.BULK, mps),
                EndpointInfo(EP_INTR, EpType.INTERRUPT, 8, interval=self._eeprom[4] >> 8),
            )),),
            manufacturer="ADMtek", product="USB To LAN Converter", serial="0001")

        self.counters = PegasusCounters()
        self.request_log: list[tuple[Setup, bytes]] = []
        self.on_transmit: Callable[[bytes], None] | None = None
        self._notify: Callable[[], None] | None = None
        self._wake = False
        self._lock = threading.RLock()
        self._unplugged = False
        self._power_on()

    # =========================================================================================
    # power-on state
    # =========================================================================================
    def _power_on(self) -> None:
        self._regs = bytearray(256)
        if self.pegasus_ii:
            # Pegasus II loads the station address from the EEPROM itself (Linux reads it at
            # 0x10); Pegasus I leaves EthID zero and the driver must copy EEPROM words 0-2.
            self._load_ethid_from_eeprom()
        self._last_write: dict[int, int] = {}
        self._busy: dict[int, _Busy] = {}
        self._phy_regs = [0] * 32
        self._phy_reset()
        self._rx: deque[bytes] = deque()
        self._rx_lost_count = 0
        self._irq_pending = False
        self._stalled: set[int] = set()
        self._stall_control = 0
        self._no_answer_control = 0
        self._no_answer_execute = False
        self._hold_tx = False

    def _load_ethid_from_eeprom(self) -> None:
        for i in range(3):
            w = self._eeprom[i]
            self._regs[EthID + 2 * i] = w & 0xFF
            self._regs[EthID + 2 * i + 1] = w >> 8

    def _phy_reset(self) -> None:
        self._phy_regs = [0] * 32
        self._phy_regs[MII_BMCR] = BMCR_DEFAULT
        self._phy_regs[MII_ADVERTISE] = ADVERTISE_DEFAULT

    # =========================================================================================
    # UsbDeviceModel protocol
    # =========================================================================================
    def set_notify(self, fn: Callable[[], None]) -> None:
        self._notify = fn

    def control(self, setup: Setup, data: bytes) -> bytes:
        with self._lock:
            self._check_present()
            self.counters.control_requests += 1
            self._log(setup, bytes(data))
            if self._stall_control > 0:
                self._stall_control -= 1
                self._stall("injected control stall")
            if self._no_answer_control > 0:
                self._no_answer_control -= 1
                self.counters.control_no_answer += 1
                if self._no_answer_execute:
                    # The device acted, only the status stage was lost: the at-most-once case.
                    try:
                        self._dispatch(setup, bytes(data))
                    except ModelStall:
                        pass
                raise ModelNoAnswer("injected: the device did not answer the control request")
            result = self._dispatch(setup, bytes(data))
        self._deliver_notify()
        return result

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        with self._lock:
            self._check_present()
            if endpoint != EP_TX:
                raise ModelStall(f"no bulk OUT endpoint 0x{endpoint:02x}")
            if EP_TX in self._stalled:
                self.counters.tx_stalled += 1
                raise ModelStall("EP 0x02 is halted")
            if self._hold_tx:
                self.counters.tx_held += 1
                raise ModelNoAnswer("the device is not accepting TX (hold_tx)")
            self.counters.tx_transfers += 1
            frame = self._parse_tx(bytes(data))
            if frame is not None:
                self._transmit(frame)
        self._deliver_notify()

    def take_in(self, endpoint: int, max_len: int) -> bytes | None:
        with self._lock:
            self._check_present()
            if endpoint not in (EP_RX, EP_INTR):
                raise ModelStall(f"no IN endpoint 0x{endpoint:02x}")
            if endpoint in self._stalled:
                self.counters.in_stalled += 1
                raise ModelStall(f"EP 0x{endpoint:02x} is halted")
            if endpoint == EP_RX:
                if not self._rx:
                    return None
                self.counters.rx_transfers += 1
                return self._rx.popleft()
            if not self._irq_pending:
                return None
            self._irq_pending = False
            self.counters.interrupt_packets += 1
            return self._interrupt_packet()

    # =========================================================================================
    # endpoint 0
    # =========================================================================================
    def _dispatch(self, s: Setup, data: bytes) -> bytes:
        if s.request_type == REQT_READ and s.request == REQ_GET_REGS:
            return self._get_regs(s.index, s.length)
        if s.request_type == REQT_WRITE and s.request == REQ_SET_REGS:
            self._set_regs(s, data)
            return b""
        if s.request_type & 0x60 == 0x00:
            return self._standard(s)
        self.counters.unknown_requests += 1
        self._stall(f"unknown request type 0x{s.request_type:02x} request 0x{s.request:02x}")

    def _get_regs(self, index: int, length: int) -> bytes:
        if index + length > 256:
            self._stall(f"register read 0x{index:x}+{length} beyond the register file")
        return bytes(self._read_reg(index + i) for i in range(length))

    def _set_regs(self, s: Setup, data: bytes) -> None:
        if s.index + s.length > 256 or len(data) != s.length:
            self._stall(f"register write 0x{s.index:x}+{s.length} is malformed")
        if s.length == 1:
            # One-byte writes: the chip takes the value from wValue and ignores the data stage.
            value = s.value & 0xFF
            if data[0] != value:
                self.counters.set_one_data_mismatch += 1
            self._write_reg(s.index, value)
            return
        for i, b in enumerate(data):          # byte by byte, in address order: side effects
            self._write_reg(s.index + i, b)   # (PhyCtrl, EpromCtrl) fire as they are reached

    def _standard(self, s: Setup) -> bytes:
        rt, rq = s.request_type, s.request
        if rt == 0x02 and rq == 0x01 and s.value == 0:           # CLEAR_FEATURE(ENDPOINT_HALT)
            ep = s.index & 0xFF
            if ep not in (0x00, EP_RX, EP_TX, EP_INTR):
                self._stall(f"CLEAR_FEATURE on unknown endpoint 0x{ep:02x}")
            self._stalled.discard(ep)
            self.counters.clear_halts += 1
            self._wake = True                 # data held behind the halt is available again
            return b""
        if rt == 0x01 and rq == 0x0B:                            # SET_INTERFACE
            if s.index != 0 or s.value != 0:
                self._stall("only interface 0 alt 0 exists")
            self._stalled.clear()             # USB 2.0 9.4.5: SetInterface clears halts
            self._wake = True
            return b""
        if rt == 0x00 and rq == 0x09 and s.value in (0, 1):      # SET_CONFIGURATION
            self._stalled.clear()
            return b""
        if rt in (0x80, 0x81) and rq == 0x00:                    # GET_STATUS device/interface
            return b"\x00\x00"
        if rt == 0x82 and rq == 0x00:                            # GET_STATUS endpoint: halt bit
            return b"\x01\x00" if (s.index & 0xFF) in self._stalled else b"\x00\x00"
        self.counters.unknown_requests += 1
        self._stall(f"unsupported standard request 0x{rt:02x}/0x{rq:02x}")

    # =========================================================================================
    # register file
    # =========================================================================================
    def _read_reg(self, addr: int) -> int:
        value = self._regs[addr]
        busy = self._busy.get(addr)
        if busy is not None:
            # The host sees the operation busy on this read; it completes before the next one.
            busy.reads_left -= 1
            if busy.reads_left <= 0:
                del self._busy[addr]
                busy.finish()
        return value

    def _start(self, addr: int, reads: int, finish: Callable[[], None]) -> None:
        if reads <= 0:
            finish()
        else:
            self._busy[addr] = _Busy(reads, finish)

    def _write_reg(self, addr: int, value: int) -> None:
        self._last_write[addr] = value
        self._busy.pop(addr, None)            # a new command abandons the one in progress
        if EthTxStat0 <= addr <= RxLostLo:
            return                            # status registers are read-only
        if addr == Reg83 and not self.adm8513:
            return                            # not an ADM8513: the 0xA5 probe must not stick
        if addr == EpromCtrl:
            self._eeprom_command(value)
            return
        if addr == PhyCtrl:
            self._mii_command(value)
            return
        self._regs[addr] = value
        if addr == EthCtrl1 and value & CTL1_RESET_MAC:
            self._mac_reset()

    def _mac_reset(self) -> None:
        # Back to defaults: control registers and the multicast filter; EthID stays (the
        # reference's Pegasus II flow reads the MAC at 0x10 after the reset). The RX FIFO and
        # the status registers are cleared too.
        self.counters.mac_resets += 1
        self._regs[EthCtrl0] = 0
        self._regs[EthCtrl2] = 0
        self._regs[MulticastHash:MulticastHash + 8] = bytes(8)
        self._regs[EthTxStat0:RxLostLo + 1] = bytes(RxLostLo + 1 - EthTxStat0)
        self._rx_lost_count = 0
        self.counters.rx_flushed += len(self._rx)
        self._rx.clear()
        self._regs[EthCtrl1] = CTL1_RESET_MAC

        def done() -> None:
            self._regs[EthCtrl1] &= ~CTL1_RESET_MAC & 0xFF
        self._start(EthCtrl1, self.mac_reset_reads, done)

    # --- EEPROM -------------------------------------------------------------------------------
    def _eeprom_command(self, value: int) -> None:
        self._regs[EpromCtrl] = value & ~EPROM_DONE & 0xFF    # DONE is the chip's to set
        offset = self._regs[EpromOffset] % EEPROM_WORDS
        if value & EPROM_READ:
            def done() -> None:
                word = self._eeprom[offset]
                self._regs[EpromData] = word & 0xFF
                self._regs[EpromData + 1] = word >> 8
                self._regs[EpromCtrl] |= EPROM_DONE
                self.counters.eeprom_reads += 1
        elif value & EPROM_WRITE:
            word = _le16(self._regs, EpromData)                # latched when the command starts
            enabled = bool(self._regs[EthCtrl2] & CTL2_EEPROM_WR_EN or value & EPROM_WR_EN)

            def done() -> None:
                if enabled:
                    self._eeprom[offset] = word
                    self.counters.eeprom_writes += 1
                else:
                    self.counters.eeprom_writes_blocked += 1
                self._regs[EpromCtrl] |= EPROM_DONE
        elif value & EPROM_LOAD:
            def done() -> None:
                self._load_ethid_from_eeprom()
                self._regs[EpromCtrl] |= EPROM_DONE
        else:
            return                                              # EpromCtrl = 0: idle
        self._start(EpromCtrl, self.eeprom_busy_reads, done)

    # --- MII ------------------------------------------------------------------------------------
    def _mii_command(self, value: int) -> None:
        self._regs[PhyCtrl] = value & ~PHY_DONE & 0xFF
        phy = self._regs[PhyAddr] & 0x1F
        reg = value & PHY_REG_MASK
        if value & PHY_READ:
            def done() -> None:
                word = self._mdio_read(phy, reg)
                self._regs[PhyData] = word & 0xFF
                self._regs[PhyData + 1] = word >> 8
                self._regs[PhyCtrl] |= PHY_DONE
                self.counters.mii_reads += 1
        elif value & PHY_WRITE:
            word = _le16(self._regs, PhyData)

            def done() -> None:
                self._mdio_write(phy, reg, word)
                self._regs[PhyCtrl] |= PHY_DONE
                self.counters.mii_writes += 1
        else:
            return                            # e.g. Linux writes PhyCtrl = reg before reg|READ
        self._start(PhyCtrl, self.phy_busy_reads, done)

    def _mdio_read(self, phy: int, reg: int) -> int:
        if phy != self.phy_addr:
            return 0xFFFF                     # nobody drives MDIO: the pull-up reads all ones
        return self._phy_read(reg)

    def _phy_read(self, reg: int) -> int:
        if reg == MII_BMSR:
            up = BMSR_LSTATUS | BMSR_ANEGCOMPLETE if self._link_up else 0
            return BMSR_CAPS | up
        if reg == MII_PHYSID1:
            return self.phy_id[0]
        if reg == MII_PHYSID2:
            return self.phy_id[1]
        if reg == MII_LPA:
            if not self._link_up:
                return 0
            # Exactly one ability bit: the mode the partner runs, whatever decoding a driver uses.
            return LPA_ACK | LPA_CSMA | LPA_MODE[(self._link_speed, self._link_full)]
        return self._phy_regs[reg]

    def _mdio_write(self, phy: int, reg: int, word: int) -> None:
        if phy != self.phy_addr:
            return
        if reg in (MII_BMSR, MII_PHYSID1, MII_PHYSID2, MII_LPA):
            return                            # read-only
        if reg == MII_BMCR:
            if word & BMCR_RESET:
                self._phy_reset()             # self-clearing; the link itself stays up
                return
            word &= ~BMCR_ANRESTART           # self-clearing
        self._phy_regs[reg] = word

    # =========================================================================================
    # TX
    # =========================================================================================
    def _parse_tx(self, data: bytes) -> bytes | None:
        n = len(data)
        length = _le16(data) if n >= 2 else 0
        if n < 2 or length == 0 or length > MAX_TX_FRAME or length + 2 > n:
            self.counters.tx_malformed += 1
            return None
        padded = n == length + 3 and (length + 2) % 64 == 0
        if n > length + 2 and not padded:
            self.counters.tx_extra_bytes += 1
        if n == length + 2 and n % 64 == 0:
            self.counters.tx_missing_pad += 1
        return data[2:2 + length]

    def _transmit(self, frame: bytes) -> None:
        if not self._regs[EthCtrl0] & CTL0_TX_EN:
            self.counters.tx_dropped_disabled += 1
            return
        if self._regs[EthCtrl2] & CTL2_LOOPBACK:
            self.counters.tx_frames += 1
            self.counters.tx_bytes += len(frame)
            self.counters.tx_loopback += 1
            self._receive(frame)
            return
        if not self._link_up:
            self.counters.tx_no_carrier += 1
            self._regs[EthTxStat0] |= TXS_NO_CARRIER
            self._raise_interrupt()
            return
        ctl1 = self._regs[EthCtrl1]
        if (bool(ctl1 & CTL1_FULL_DUPLEX) != self._link_full
                or bool(ctl1 & CTL1_100MBIT) != (self._link_speed == 100)):
            self.counters.tx_mode_mismatch += 1
        self.counters.tx_frames += 1
        self.counters.tx_bytes += len(frame)
        if self.on_transmit is not None:
            self.on_transmit(frame)

    # =========================================================================================
    # RX
    # =========================================================================================
    def _accepts(self, dst: bytes) -> bool:
        if self._regs[EthCtrl2] & CTL2_PROMISC:
            return True
        if dst == BROADCAST or dst == bytes(self._regs[EthID:EthID + 6]):
            return True
        if dst[0] & 0x01:
            if self._regs[EthCtrl0] & CTL0_ALLMULTI:
                return True
            if self.multicast_hash:
                h = _hash_bit(dst)
                return bool(self._regs[MulticastHash + (h >> 3)] & (1 << (h & 7)))
        return False

    def _receive(self, frame: bytes) -> bool:
        if not self._regs[EthCtrl0] & CTL0_RX_EN:
            self.counters.rx_dropped_disabled += 1
            return False
        if not MIN_FRAME <= len(frame) <= MAX_RX_FRAME:
            self.counters.rx_dropped_size += 1
            return False
        if not self._accepts(frame[:6]):
            self.counters.rx_dropped_filter += 1
            return False
        if len(self._rx) >= self.rx_queue_limit:
            self._lose_rx()
            return False
        status = RXS_MCAST if self.rx_status_mcast_bit and frame[0] & 0x01 else 0
        self._rx.append(self._rx_transfer(frame, status))
        self.counters.rx_frames += 1
        self.counters.rx_bytes += len(frame)
        self._wake = True
        return True

    def _rx_transfer(self, frame: bytes, status: int, trailer_len: int | None = None,
                     header_len: int | None = None, force_trailer: bool = False) -> bytes:
        """One EP 0x81 transfer: [ADM8513 header] frame [CRC] [trailer]."""
        ctl0 = self._regs[EthCtrl0]
        out = bytearray(frame)
        if ctl0 & CTL0_INCLUDE_CRC:
            out += (zlib.crc32(frame) & 0xFFFFFFFF).to_bytes(4, "little")
        if ctl0 & CTL0_RXSTAT_APPEND or force_trailer:
            # The length counts the 4 CRC bytes whether or not they are in the transfer.
            n = len(frame) + 4 if trailer_len is None else trailer_len
            out += bytes((n & 0xFF, (n >> 8) & 0x0F, status, 0))
        if self.adm8513:
            h = len(frame) if header_len is None else header_len
            out[0:0] = bytes((h & 0xFF, (h >> 8) & 0x0F))
        return bytes(out)

    def _lose_rx(self) -> None:
        self.counters.rx_lost += 1
        self._rx_lost_count = min(self._rx_lost_count + 1, 0x7FFF)
        # Interrupt bytes 3-4 are decoded by Linux as ((d[3] & 0x7f) << 8) | d[4].
        self._regs[RxLostHi] = self._rx_lost_count >> 8
        self._regs[RxLostLo] = self._rx_lost_count & 0xFF
        self._regs[EthRxStat] |= RXSTAT_OVERRUN
        self._raise_interrupt()

    # =========================================================================================
    # EP 0x83
    # =========================================================================================
    def _raise_interrupt(self) -> None:
        self._irq_pending = True
        self._wake = True

    def _interrupt_packet(self) -> bytes:
        r = self._regs
        pkt = bytes((r[EthTxStat0], r[EthTxStat1], r[EthRxStat], r[RxLostHi], r[RxLostLo],
                     0x01 if self._link_up else 0x00, 0, 0))
        if r[EthCtrl2] & CTL2_NORMAL:
            # Status registers are read-to-clear through EP3, so counts are deltas per packet.
            r[EthTxStat0:RxLostLo + 1] = bytes(RxLostLo + 1 - EthTxStat0)
            self._rx_lost_count = 0
        return pkt

    # =========================================================================================
    # helpers
    # =========================================================================================
    def _check_present(self) -> None:
        if self._unplugged:
            self.counters.calls_while_unplugged += 1
            raise ModelGone("the Pegasus model is unplugged")

    def _stall(self, why: str) -> NoReturn:
        self.counters.control_stalls += 1
        raise ModelStall(why)

    def _log(self, setup: Setup, data: bytes) -> None:
        self.request_log.append((setup, data))
        over = len(self.request_log) - self.request_log_limit
        if over > 0:
            del self.request_log[:over]

    def _deliver_notify(self) -> None:
        with self._lock:
            wake, self._wake = self._wake, False
        if wake and self._notify is not None:
            self._notify()

    @staticmethod
    def _check_link_mode(speed: int, full_duplex: bool) -> None:
        if (speed, bool(full_duplex)) not in LPA_MODE:
            raise ValueError(f"link speed must be 10 or 100 Mbit/s, not {speed}")

    # =========================================================================================
    # wire side
    # =========================================================================================
    def wire_receive(self, frame: bytes) -> bool:
        """A frame arrives from the network. False if the NIC dropped it (see counters)."""
        with self._lock:
            if self._unplugged:
                self.counters.rx_dropped_unplugged += 1
                return False
            if not self._link_up:
                self.counters.rx_dropped_link += 1
                return False
            accepted = self._receive(bytes(frame))
        self._deliver_notify()
        return accepted

    def set_link(self, up: bool, speed: int = 100, full_duplex: bool = True) -> None:
        """Plug/unplug the cable or change the partner's mode; queues an interrupt packet."""
        self._check_link_mode(speed, full_duplex)
        with self._lock:
            new = (bool(up), speed, bool(full_duplex))
            if new != (self._link_up, self._link_speed, self._link_full):
                self._link_up, self._link_speed, self._link_full = new
                self._raise_interrupt()
        self._deliver_notify()

    # =========================================================================================
    # inspection (no side effects: reading here does not advance busy operations)
    # =========================================================================================
    @property
    def regs(self) -> bytes:
        return bytes(self._regs)

    def reg(self, addr: int) -> int:
        return self._regs[addr]

    def last_write(self, addr: int) -> int | None:
        """The last value the host wrote to `addr`, even where the chip did not keep it (0x83)."""
        return self._last_write.get(addr)

    def phy_reg(self, addr: int) -> int:
        return self._phy_read(addr & 0x1F)

    @property
    def eeprom(self) -> tuple[int, ...]:
        return tuple(self._eeprom)

    @property
    def mac(self) -> bytes:
        return bytes(self._regs[EthID:EthID + 6])

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def link_mode(self) -> tuple[int, bool]:
        """(speed in Mbit/s, full duplex) of the link partner."""
        return self._link_speed, self._link_full

    @property
    def tx_held(self) -> bool:
        return self._hold_tx

    @property
    def rx_pending(self) -> int:
        return len(self._rx)

    @property
    def interrupt_pending(self) -> bool:
        return self._irq_pending

    @property
    def stalled(self) -> frozenset[int]:
        return frozenset(self._stalled)

    @property
    def unplugged(self) -> bool:
        return self._unplugged

    def count(self, deltas: dict[str, int]) -> None:
        """Add to the counters what an external data path moved for this device (the C pump that
        serves the model over FunctionFS judges bulk transfers itself, by these rules)."""
        with self._lock:
            c = self.counters
            for name, n in deltas.items():
                setattr(c, name, getattr(c, name) + n)

    # =========================================================================================
    # fault knobs
    # =========================================================================================
    def stall_next_control(self, n: int = 1) -> None:
        with self._lock:
            self._stall_control += n

    def no_answer_next_control(self, n: int = 1, execute: bool = False) -> None:
        """The next n control requests time out; with execute=True the device still acts on them."""
        with self._lock:
            self._no_answer_control += n
            self._no_answer_execute = execute

    def stall_endpoint(self, ep: int) -> None:
        """Halt EP 0x81, 0x02 or 0x83 until the host sends CLEAR_FEATURE(ENDPOINT_HALT)."""
        if ep not in (EP_RX, EP_TX, EP_INTR):
            raise ValueError(f"no endpoint 0x{ep:02x}")
        with self._lock:
            self._stalled.add(ep)

    def hold_tx(self, on: bool = True) -> None:
        with self._lock:
            self._hold_tx = on

    def unplug(self) -> None:
        with self._lock:
            self._unplugged = True

    def replug(self) -> None:
        """Back on the bus after a power cycle: power-on register state, empty FIFOs, no faults."""
        with self._lock:
            self._unplugged = False
            self._power_on()
            self._wake = True
        self._deliver_notify()

    def inject_rx_garbage(self, kind: str) -> None:
        """Queue one malformed EP 0x81 transfer (regardless of RX enable and the filter)."""
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"unknown garbage kind {kind!r}; choose one of {', '.join(GARBAGE_KINDS)}")
        with self._lock:
            # Addressed to us, so a driver that ignores the defect would deliver it visibly.
            frame = self.mac + bytes.fromhex("02deadbeef01") + b"\x88\xb5" + bytes(range(46))
            make = self._rx_transfer
            xfer = {
                "length_beyond_transfer": lambda: make(frame, 0, trailer_len=200 + 4, header_len=200,
                                                       force_trailer=True),
                "zero_length": lambda: make(frame, 0, trailer_len=0, header_len=0, force_trailer=True),
                "crc_error": lambda: make(frame, RXS_CRC_ERROR, force_trailer=True),
                "runt": lambda: make(frame[:20], RXS_RUNT, force_trailer=True),
                "truncated": lambda: bytes((0x40, 0x00, 0x00)),
                "oversize": lambda: make(frame, 0, trailer_len=1600 + 4, header_len=1600,
                                         force_trailer=True),
                "too_long": lambda: make(frame, RXS_TOO_LONG, force_trailer=True),
                "dribble": lambda: make(frame, RXS_DRIBBLE, force_trailer=True),
                "empty": lambda: b"",
            }[kind]()
            self._rx.append(xfer)
            self.counters.rx_garbage_injected += 1
            self._wake = True
        self._deliver_notify()

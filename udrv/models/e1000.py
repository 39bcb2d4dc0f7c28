"""Register-level model of the Intel 82540EM (8086:100e) and 82574L (8086:10d3) NICs.

Written from `docs/reference/e1000.md` and the 8254x / 82574 datasheet facts (QEMU's e1000 and the
Linux e1000 headers were consulted, not copied). It shares no code and no constants with
`drivers/e1000`: the model and the driver are two independent readings of the same facts, so
each catches the other's misreadings. Plug it into a driver with
`ModelPciTransport(E1000Model("82540em"))`.

What the device does, in one paragraph: BAR0 holds 32-bit registers. The host puts legacy
(or extended) descriptors in rings in DMA memory and moves the tail pointers; the device
consumes descriptors from head to tail, reads/writes the buffers they point at, writes status
back (TX: DD only when RS is set) and advances the head. Every DMA goes through the transport's
IOMMU (`DmaBus`); a refused access is a DMAR fault and nothing leaves the wire. Frames arrive
from the wire into an on-chip FIFO (sized by PBA), pass the address filters (RAL/RAH exact,
MTA hash, UPE/MPE/BAM) and are written into RX descriptors between RDH and RDT.

Where the datasheet and QEMU differ the model follows the datasheet, strictly, so a driver that
works on both relies on neither: CTRL.RST really resets (knob `qemu_reset_quirk` gives QEMU's
"only clear the bit"), STATUS.LU needs CTRL.SLU (knob `require_slu`), UPE does not imply
multicast, a TX frame without IFCS is dropped, MTA contents are undefined at power-on and are
not cleared by a reset.

Fault knobs (`faults`, `surprise_remove()`, `inject_spurious_dd()`) and side-effect-free
inspection (`reg()`, `phy_reg()`, `eeprom`, `dmar_faults`, `dmar_log`, `errors`) are for tests.
"""
from __future__ import annotations

import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from udrv.models.pci import DmaBus, DmarFault

M32 = 0xFFFFFFFF
ALL_ONES = 0xFFFFFFFF
BAR0_SIZE = 0x20000

# --- BAR0 registers (the model's own names) ------------------------------------------------
CTRL, STATUS, EECD, EERD, CTRL_EXT, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x0020
FCAL, FCAH, FCT, VET = 0x0028, 0x002C, 0x0030, 0x0038
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, FCTTV, TXCW, RXCW = 0x0100, 0x0170, 0x0178, 0x0180
TCTL, TIPG = 0x0400, 0x0410
LEDCTL, EXTCNF_CTRL, PBA = 0x0E00, 0x0F00, 0x1000
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR, RXDCTL, RADV, RSRPD = (
    0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820, 0x2828, 0x282C, 0x2C00)
TDBAL, TDBAH, TDLEN, TDH, TDT, TIDV, TXDCTL, TADV, TSPMT = (
    0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x3820, 0x3828, 0x382C, 0x3830)
RXCSUM, RFCTL = 0x5000, 0x5008
MTA, RA, VFTA = 0x5200, 0x5400, 0x5600          # 128 dwords, 16 (low, high) pairs, 128 dwords
WUC, WUFC, WUS, MANC = 0x5800, 0x5808, 0x5810, 0x5820
GCR, SWSM, FWSM = 0x5B00, 0x5B50, 0x5B54

# Statistics: 0x4000..0x40FF, all clear on read; the 64-bit ones clear when the high half is read.
STATS_BASE, STATS_END = 0x4000, 0x4100
S_CRCERRS, S_MPC, S_GPRC, S_BPRC, S_MPRC, S_GPTC = 0x4000, 0x4010, 0x4074, 0x4078, 0x407C, 0x4080
S_GORC, S_GOTC, S_RNBC, S_RUC, S_ROC = 0x4088, 0x4090, 0x40A0, 0x40A4, 0x40AC
S_TOR, S_TOT, S_TPR, S_TPT, S_MPTC, S_BPTC, S_TSCTC = 0x40C0, 0x40C8, 0x40D0, 0x40D4, 0x40F0, 0x40F4, 0x40F8
STATS64 = (S_GORC, S_GOTC, S_TOR, S_TOT)          # low offsets of (low, high) pairs

# Plain read/write registers: offset -> writable bits.
PLAIN: dict[int, int] = {
    CTRL_EXT: M32, FCAL: M32, FCAH: 0xFFFF, FCT: 0xFFFF, VET: 0xFFFF, ITR: 0xFFFF,
    FCTTV: 0xFFFF, TXCW: M32, RXCW: M32, TIPG: 0x3FFFFFFF, LEDCTL: M32, EXTCNF_CTRL: M32, PBA: 0xFFFF,
    RDBAL: 0xFFFFFFF0, RDBAH: M32, RDLEN: 0x000FFF80, RDTR: 0xFFFF, RXDCTL: M32, RADV: 0xFFFF, RSRPD: 0xFFF,
    TDBAL: 0xFFFFFFF0, TDBAH: M32, TDLEN: 0x000FFF80, TIDV: 0xFFFF, TXDCTL: M32, TADV: 0xFFFF, TSPMT: M32,
    RXCSUM: 0x7FF, RFCTL: M32, WUC: M32, WUFC: M32, WUS: M32, MANC: M32, GCR: M32, SWSM: M32, FWSM: M32,
}

# --- register bits -----------------------------------------------------------------------------
CTRL_GIO_MASTER_DISABLE = 1 << 2     # 82574 only
CTRL_SLU = 1 << 6
CTRL_RST = 1 << 26
CTRL_VME = 1 << 30
CTRL_PHY_RST = 1 << 31
STATUS_FD, STATUS_LU, STATUS_SPEED_1000, STATUS_ASDV_1000 = 0x1, 0x2, 0x80, 0x300
STATUS_GIO_MASTER_EN = 1 << 19       # 82574 only
EECD_SK, EECD_CS, EECD_DI, EECD_DO = 0x1, 0x2, 0x4, 0x8
EECD_REQ, EECD_GNT, EECD_PRES, EECD_AUTO_RD = 0x40, 0x80, 0x100, 0x200
EERD_START = 0x1
MDIC_READY, MDIC_ERROR = 1 << 28, 1 << 30
ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXDMT0, ICR_RXO, ICR_RXT0 = 0x01, 0x02, 0x04, 0x10, 0x40, 0x80
ICR_INT_ASSERTED = 1 << 31           # 82574 only
RCTL_EN, RCTL_UPE, RCTL_MPE, RCTL_LPE = 0x2, 0x8, 0x10, 0x20
RCTL_BAM, RCTL_VFE, RCTL_BSEX, RCTL_SECRC = 0x8000, 1 << 18, 1 << 25, 1 << 26
TCTL_EN, TCTL_PSP = 0x2, 0x8
RAH_AV = 1 << 31

# Descriptor bits (byte 11 is CMD / DCMD / TUCMD: same positions for EOP..DEXT).
TXD_EOP, TXD_IFCS, TXD_IC, TXD_TSE, TXD_RS, TXD_DEXT, TXD_VLE = 0x01, 0x02, 0x04, 0x04, 0x08, 0x20, 0x40
TUCMD_TCP, TUCMD_IP = 0x01, 0x02
POPTS_IXSM, POPTS_TXSM = 0x01, 0x02
STA_DD = 0x01
RXS_DD, RXS_EOP, RXS_IXSM = 0x01, 0x02, 0x04

# PHY (MII) registers at address 1.
PHY_BMCR, PHY_BMSR, PHY_ID1, PHY_ID2, PHY_ANAR, PHY_ANLPAR, PHY_ANER = 0, 1, 2, 3, 4, 5, 6
PHY_GCTRL, PHY_GSTAT, PHY_ESTAT, PHY_SPEC_CTRL, PHY_SPEC_STAT = 9, 10, 15, 0x10, 0x11
PHY_READ_ONLY = {PHY_BMSR, PHY_ID1, PHY_ID2, PHY_ANLPAR, PHY_ANER, PHY_GSTAT, PHY_ESTAT, PHY_SPEC_STAT}

ETH_MIN = 60                 # without FCS
ETH_MAX = 1514               # without FCS; +4 for an 802.1Q tag
ETH_JUMBO_MAX = 16384 - 4
TX_MAX_FRAME = 16288         # largest non-TSO frame a TX packet may assemble
BROADCAST = b"\xff" * 6


@dataclass(frozen=True)
class Variant:
    name: str
    device_id: int
    subsystem_vendor: int
    subsystem_id: int
    revision: int
    eerd_done: int               # EERD DONE bit
    eerd_addr_shift: int         # EERD word address position
    eerd_addr_bits: int
    microwire: bool              # bit-banged microwire EEPROM behind EECD (82540)
    phy_id2: int
    pcie: bool
    pba_rx_kb: int               # RX packet buffer (FIFO) size
    pm_cap: int                  # config offset of the power management capability


VARIANTS: dict[str, Variant] = {
    "82540em": Variant("82540em", 0x100E, 0x8086, 0x001E, 0x02, eerd_done=0x10, eerd_addr_shift=8,
                       eerd_addr_bits=8, microwire=True, phy_id2=0x0C20, pcie=False, pba_rx_kb=48,
                       pm_cap=0xDC),
    "82574l": Variant("82574l", 0x10D3, 0x8086, 0xA01F, 0x00, eerd_done=0x02, eerd_addr_shift=2,
                      eerd_addr_bits=14, microwire=False, phy_id2=0x0CB0, pcie=True, pba_rx_kb=20,
                      pm_cap=0xC8),
}


@dataclass
class Faults:
    """Misbehaviour on demand. Counts decrement as they fire."""
    surprise_removal: bool = False   # every MMIO/config read is all ones, writes and DMA stop
    rx_bad_length: int = 0           # next N RX write-backs report `rx_bad_length_value`
    rx_bad_length_value: int = 0xFFFF
    head_beyond_ring: bool = False   # RDH/TDH read back as head + ring size
    tx_hang: bool = False            # TDT writes are accepted, nothing is processed
    drop_tx_completions: int = 0     # next N TX descriptors with RS: sent, DD never written
    drop_rx_completions: int = 0     # next N RX descriptors: data written, DD never written


@dataclass(frozen=True)
class DmarRecord:
    iova: int
    length: int
    write: bool
    what: str


@dataclass
class _TxContext:
    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    paylen: int = 0
    tucmd: int = 0
    hdrlen: int = 0
    mss: int = 0


@dataclass
class _TxPacket:
    data: bytearray = field(default_factory=bytearray)
    started: bool = False
    extended: bool = False
    tse: bool = False
    popts: int = 0
    bad: bool = False


@dataclass
class _Microwire:
    nbits: int = 0
    shift: int = 0
    reading: bool = False
    addr: int = 0
    bit: int = 0
    do: int = 0


# --- checksums ---------------------------------------------------------------------------------

def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """16-bit ones' complement sum of big-endian words (RFC 1071), folded, not complemented."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    # Summing native (little-endian) words and byte-swapping the folded result is the same
    # sum (RFC 1071 byte-order independence) and avoids a per-word Python loop.
    s = sum(memoryview(b).cast("H"))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ((s & 0xFF) << 8) | (s >> 8)


def _add16(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


def mta_hash(dst: bytes, mo: int) -> int:
    """The 12 address bits RCTL.MO selects: 47:36, 46:35, 45:34 or 43:32."""
    shift = (4, 3, 2, 0)[mo & 3]
    return (((dst[5] << 8) | dst[4]) >> shift) & 0xFFF


def eeprom_image(mac: bytes, variant: Variant) -> list[int]:
    words = [0] * 64
    for i in range(3):
        words[i] = mac[2 * i] | (mac[2 * i + 1] << 8)
    words[0x0B] = variant.subsystem_id
    words[0x0C] = variant.subsystem_vendor
    words[0x0D] = variant.device_id
    words[0x0E] = 0x8086
    words[0x3F] = (0xBABA - sum(words[:0x3F])) & 0xFFFF    # words 0..0x3F sum to 0xBABA
    return words


class E1000Model:
    """One 82540EM / 82574L: BAR0, configuration space, PHY, EEPROM, DMA engine, wire."""

    bar0_size = BAR0_SIZE
    vendor_id = 0x8086

    def __init__(self, variant: str = "82540em", mac: bytes = b"\x52\x54\x00\x12\x34\x56", *,
                 qemu_reset_quirk: bool = False, require_slu: bool = True, reset_supported: bool = True,
                 eerd_busy_reads: int = 1, rx_fifo_bytes: int | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown e1000 variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.variant = VARIANTS[variant]
        self.device_id = self.variant.device_id
        self.config_size = 4096 if self.variant.pcie else 256
        self.mac = bytes(mac)
        self.eeprom = eeprom_image(self.mac, self.variant)
        self.qemu_reset_quirk = qemu_reset_quirk
        self.require_slu = require_slu
        self.reset_supported = reset_supported
        self.eerd_busy_reads = eerd_busy_reads
        self.rx_fifo_bytes = rx_fifo_bytes if rx_fifo_bytes is not None else self.variant.pba_rx_kb * 1024

        self.faults = Faults()
        self.link_up = True
        self.on_transmit: Callable[[bytes], None] | None = None
        self.dmar_faults = 0
        self.dmar_log: deque[DmarRecord] = deque(maxlen=64)
        self.errors: dict[str, int] = {}            # refused / unsupported things, by reason
        self.unknown_offsets: set[int] = set()      # registers the model has no opinion on
        self.resets = 0

        self._lock = threading.RLock()
        self._bus: DmaBus | None = None
        self._regs: dict[int, int] = {}
        self._stats: dict[int, int] = {}
        self._phy: dict[int, int] = {}
        self._eerd_busy = 0
        self._mdic = 0
        self._mw = _Microwire()
        self._rx_fifo: deque[bytes] = deque()
        self._rx_fifo_used = 0
        self._rnbc_counted = False
        self._txp = _TxPacket()
        self._ctx = _TxContext()
        self._tx_busy = False
        self._config = bytearray(self.config_size)
        self._config_wmask = bytearray(self.config_size)
        self._power_on_config()
        self._reset_phy()
        self._reset_mac()
        # MTA and VFTA are not initialised by hardware: power-on contents are undefined (a
        # fixed pseudo-random pattern here, so a driver that forgets to clear them receives
        # stray multicast in tests too). Resets leave them alone.
        seed = 0x9E3779B9
        for i in range(128):
            seed = (seed * 1103515245 + 12345) & M32
            self._regs[MTA + 4 * i] = seed
            self._regs[VFTA + 4 * i] = seed ^ 0xA5A5A5A5

    # ============================================================================================
    # attachment
    # ============================================================================================
    def attach(self, bus: DmaBus | None) -> None:
        with self._lock:
            self._bus = bus

    # ============================================================================================
    # configuration space
    # ============================================================================================
    def _cfg_set(self, off: int, size: int, value: int, wmask: int = 0) -> None:
        self._config[off:off + size] = value.to_bytes(size, "little")
        self._config_wmask[off:off + size] = wmask.to_bytes(size, "little")

    def _power_on_config(self) -> None:
        v = self.variant
        self._config[:] = bytes(self.config_size)
        self._config_wmask[:] = bytes(self.config_size)
        self._cfg_set(0x00, 2, self.vendor_id)
        self._cfg_set(0x02, 2, v.device_id)
        self._cfg_set(0x04, 2, 0, wmask=0x0547)        # command: IO, MEM, BME, PERR, SERR, INTx disable
        self._cfg_set(0x06, 2, 0x0010)                 # status: capability list
        self._cfg_set(0x08, 1, v.revision)
        self._cfg_set(0x09, 3, 0x020000)               # class: network, ethernet
        self._cfg_set(0x0C, 1, 0, wmask=0xFF)          # cache line size
        self._cfg_set(0x0D, 1, 0, wmask=0xFF)          # latency timer
        self._cfg_set(0x10, 4, 0, wmask=~(BAR0_SIZE - 1) & M32)   # BAR0: 32-bit memory, 128 KiB
        self._cfg_set(0x2C, 2, v.subsystem_vendor)
        self._cfg_set(0x2E, 2, v.subsystem_id)
        self._cfg_set(0x34, 1, v.pm_cap)
        self._cfg_set(0x3C, 1, 0, wmask=0xFF)          # interrupt line
        self._cfg_set(0x3D, 1, 1)                      # INTA
        pm = v.pm_cap
        nxt = 0xE0 if v.pcie else 0x00
        self._cfg_set(pm, 1, 0x01)                     # PCI power management
        self._cfg_set(pm + 1, 1, nxt)
        self._cfg_set(pm + 2, 2, 0xC822)               # PMC: version 2, D3cold PME
        self._cfg_set(pm + 4, 2, 0, wmask=0x0003)      # PMCSR: power state (No_Soft_Reset = 0)
        if v.pcie:
            self._cfg_set(0xE0, 1, 0x10)               # PCI Express capability, endpoint, v2
            self._cfg_set(0xE2, 2, 0x0002)

    def _cfg_get(self, off: int, size: int) -> int:
        return int.from_bytes(self._config[off:off + size], "little")

    @property
    def bus_master(self) -> bool:
        return bool(self._cfg_get(0x04, 2) & 0x4)

    @property
    def memory_enabled(self) -> bool:
        return bool(self._cfg_get(0x04, 2) & 0x2)

    @property
    def power_state(self) -> int:
        return self._cfg_get(self.variant.pm_cap + 4, 2) & 3

    def config_read(self, offset: int, size: int) -> int:
        with self._lock:
            if self.faults.surprise_removal:
                return (1 << (8 * size)) - 1
            return self._cfg_get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if self.faults.surprise_removal:
                return
            old_state = self.power_state
            data = value.to_bytes(size, "little")
            for i in range(size):
                mask = self._config_wmask[offset + i]
                cur = self._config[offset + i]
                self._config[offset + i] = (cur & ~mask) | (data[i] & mask)
            new_state = self.power_state
            if old_state == 3 and new_state == 0:
                # D3hot -> D0 with No_Soft_Reset clear: the function comes back uninitialised.
                self._reset_mac()
                self._reset_phy()
                self._cfg_set(0x04, 2, 0, wmask=0x0547)
                self.resets += 1
            # Bus mastering may just have been enabled: let the DMA engines catch up.
            self._tx_run()
            self._rx_flush()

    def function_reset(self) -> None:
        """What VFIO_DEVICE_RESET does to the function: device registers and PHY back to
        power-on state; configuration space is saved and restored by the kernel around it.
        With `qemu_reset_quirk` the registers stay as they were: QEMU 7.2's e1000e reported a
        successful VFIO reset and still read back the old RCTL and TDLEN."""
        with self._lock:
            if not self.qemu_reset_quirk:
                self._reset_mac()
                self._reset_phy()
            self._cfg_set(self.variant.pm_cap + 4, 2, 0, wmask=0x0003)
            self.resets += 1

    # ============================================================================================
    # reset
    # ============================================================================================
    def _reset_mac(self) -> None:
        """Device registers to their reset values. MTA/VFTA are not reset (undefined)."""
        keep = {off: val for off, val in self._regs.items()
                if MTA <= off < MTA + 512 or VFTA <= off < VFTA + 512}
        self._regs = keep
        self._regs[CTRL] = 0
        self._regs[EECD] = EECD_PRES | (EECD_AUTO_RD if not self.variant.microwire else 0)
        self._regs[PBA] = self.variant.pba_rx_kb            # RX share of the packet buffer, in KB
        self._regs[VET] = 0x8100
        self._regs[LEDCTL] = 0x07068302
        # RAL0/RAH0 are loaded from the EEPROM's MAC address words, marked valid.
        w = self.eeprom
        self._regs[RA] = w[0] | (w[1] << 16)
        self._regs[RA + 4] = w[2] | RAH_AV
        self._stats = {}
        self._eerd_busy = 0
        self._mdic = 0
        self._mw = _Microwire()
        self._rx_fifo.clear()
        self._rx_fifo_used = 0
        self._rnbc_counted = False
        self._txp = _TxPacket()
        self._ctx = _TxContext()

    def _reset_phy(self) -> None:
        self._phy = {
            PHY_BMCR: 0x1140,             # autoneg enable, full duplex, 1000 Mb/s
            PHY_ANAR: 0x0DE1,             # 10/100 half/full, pause
            PHY_GCTRL: 0x0300,            # advertise 1000 half/full
            PHY_ESTAT: 0x3000,            # 1000BASE-T half/full capable
            PHY_SPEC_CTRL: 0x0068,
        }

    # ============================================================================================
    # BAR0
    # ============================================================================================
    def _dead(self) -> bool:
        return self.faults.surprise_removal or not self.memory_enabled or self.power_state == 3

    def reg(self, offset: int) -> int:
        """Side-effect-free look at a register's stored value (tests)."""
        with self._lock:
            if STATS_BASE <= offset < STATS_END:
                return self._stat_value(offset)
            return self._regs.get(offset, 0)

    def phy_reg(self, number: int) -> int:
        with self._lock:
            return self._phy_read(number)

    def mmio_read(self, offset: int) -> int:
        with self._lock:
            if self._dead():
                return ALL_ONES
            if offset == STATUS:
                return self._status()
            if offset == EECD:
                return self._eecd_read()
            if offset == EERD:
                return self._eerd_read()
            if offset == MDIC:
                return self._mdic
            if offset == ICR:
                value = self._regs.get(ICR, 0)
                if self.variant.pcie and value & self._regs.get(IMS, 0):
                    value |= ICR_INT_ASSERTED
                self._regs[ICR] = 0                     # read to clear
                return value
            if offset in (ICS, IMC):
                return 0                                # write-only
            if offset in (RDH, TDH) and self.faults.head_beyond_ring:
                n = self._ring_size(RDLEN if offset == RDH else TDLEN) or 1
                return self._regs.get(offset, 0) + n
            if STATS_BASE <= offset < STATS_END:
                return self._stat_read(offset)
            self._note_unknown(offset)
            return self._regs.get(offset, 0)

    def mmio_write(self, offset: int, value: int) -> None:
        with self._lock:
            if self._dead():
                return
            value &= M32
            if offset == CTRL:
                self._ctrl_write(value)
            elif offset == EECD:
                self._eecd_write(value)
            elif offset == EERD:
                self._eerd_write(value)
            elif offset == MDIC:
                self._mdic_write(value)
            elif offset == ICR:
                self._regs[ICR] = self._regs.get(ICR, 0) & ~value      # write 1 to clear
            elif offset == ICS:
                self._raise(value)
            elif offset == IMS:
                self._regs[IMS] = self._regs.get(IMS, 0) | value
            elif offset == IMC:
                self._regs[IMS] = self._regs.get(IMS, 0) & ~value
            elif offset == RCTL:
                self._regs[RCTL] = value & 0x07FFFFFE
                self._rx_flush()
            elif offset == TCTL:
                self._regs[TCTL] = value & 0x07FFFFFE
                if not value & TCTL_EN:
                    self._txp = _TxPacket()                 # a disabled transmitter drops what it assembled
                self._tx_run()
            elif offset in (RDH, TDH):
                self._regs[offset] = value & 0xFFFF
            elif offset == RDT:
                self._regs[RDT] = value & 0xFFFF
                self._rnbc_counted = False
                self._rx_flush()
            elif offset == TDT:
                self._regs[TDT] = value & 0xFFFF
                self._tx_run()
            elif offset == STATUS or STATS_BASE <= offset < STATS_END:
                pass                                        # read-only
            elif offset in PLAIN:
                self._regs[offset] = value & PLAIN[offset]
            elif RA <= offset < RA + 128:
                self._regs[offset] = value & (0x8003FFFF if offset & 4 else M32)
            elif MTA <= offset < MTA + 512 or VFTA <= offset < VFTA + 512:
                self._regs[offset] = value
            else:
                self._note_unknown(offset)
                self._regs[offset] = value

    def _note_unknown(self, offset: int) -> None:
        known = (offset in PLAIN or offset in (CTRL, RCTL, TCTL, IMS, RDH, RDT, TDH, TDT)
                 or RA <= offset < RA + 128 or MTA <= offset < MTA + 512 or VFTA <= offset < VFTA + 512)
        if not known:
            self.unknown_offsets.add(offset)

    # --- CTRL / STATUS -----------------------------------------------------------------------
    def _ctrl_write(self, value: int) -> None:
        if value & CTRL_RST:
            self.resets += 1
            if self.qemu_reset_quirk:
                self._regs[CTRL] = value & ~CTRL_RST       # QEMU: the bit clears, nothing else happens
                return
            self._reset_mac()                              # RST self-clears: CTRL reads its reset value
            return
        old = self._regs.get(CTRL, 0)
        self._regs[CTRL] = value
        if old & CTRL_PHY_RST and not value & CTRL_PHY_RST:
            self._reset_phy()                              # PHY leaves reset with default settings
        if (old ^ value) & CTRL_SLU:
            self._raise(ICR_LSC)

    def _link_ok(self) -> bool:
        ctrl = self._regs.get(CTRL, 0)
        if ctrl & CTRL_PHY_RST or not self.link_up:
            return False
        return bool(ctrl & CTRL_SLU) or not self.require_slu

    def _status(self) -> int:
        value = 0
        if self._link_ok():
            value |= STATUS_FD | STATUS_LU | STATUS_SPEED_1000 | STATUS_ASDV_1000
        if self.variant.pcie and not self._regs.get(CTRL, 0) & CTRL_GIO_MASTER_DISABLE:
            value |= STATUS_GIO_MASTER_EN
        return value

    # --- EEPROM ---------------------------------------------------------------------------------
    def _eeprom_word(self, addr: int) -> int:
        return self.eeprom[addr] if addr < len(self.eeprom) else 0xFFFF     # erased cells read all ones

    def _eerd_write(self, value: int) -> None:
        if value & EERD_START:
            self._eerd_busy = self.eerd_busy_reads
        self._regs[EERD] = value & 0xFFFF

    def _eerd_read(self) -> int:
        req = self._regs.get(EERD, 0)
        if not req & EERD_START:
            return req
        if self._eerd_busy > 0:
            self._eerd_busy -= 1
            return req
        v = self.variant
        addr = (req >> v.eerd_addr_shift) & ((1 << v.eerd_addr_bits) - 1)
        return (req & 0xFFFF) | v.eerd_done | (self._eeprom_word(addr) << 16)

    def _eecd_write(self, value: int) -> None:
        old = self._regs.get(EECD, 0)
        new = value & (EECD_SK | EECD_CS | EECD_DI | EECD_REQ | 0x30)   # 0x30: flash write enable
        if self.variant.microwire and new & EECD_REQ:
            if not new & EECD_CS:
                self._mw = _Microwire()                     # deselect ends any command
            elif new & EECD_SK and not old & EECD_SK:
                self._microwire_clock(1 if new & EECD_DI else 0)
        self._regs[EECD] = new

    def _eecd_read(self) -> int:
        value = self._regs.get(EECD, 0) | EECD_PRES
        if not self.variant.microwire:
            value |= EECD_AUTO_RD
        if value & EECD_REQ:
            value |= EECD_GNT
        if self.variant.microwire and value & EECD_CS and self._mw.do:
            value |= EECD_DO
        else:
            value &= ~EECD_DO
        return value

    def _microwire_clock(self, di: int) -> None:
        """One rising edge of SK on a 64-word microwire EEPROM (6 address bits): READ is
        start bit 1, opcode 10, address; then 16 data bits MSB first, one per edge."""
        mw = self._mw
        abits = 6
        if mw.reading:
            word = self._eeprom_word(mw.addr)
            mw.do = (word >> (15 - mw.bit)) & 1
            mw.bit += 1
            if mw.bit == 16:                                # sequential read continues
                mw.bit = 0
                mw.addr = (mw.addr + 1) % 64
            return
        if mw.nbits == 0 and di == 0:
            return                                          # waiting for the start bit
        mw.shift = (mw.shift << 1) | di
        mw.nbits += 1
        if mw.nbits == 3 + abits:
            if mw.shift >> abits == 0b110:
                mw.reading, mw.addr, mw.bit, mw.do = True, mw.shift & 0x3F, 0, 0
            else:
                self._count("eeprom_unsupported_opcode")
                mw.nbits = 1 << 30                          # ignore until CS drops

    # --- PHY ---------------------------------------------------------------------------------------
    def _mdic_write(self, value: int) -> None:
        op = (value >> 26) & 3
        phy = (value >> 21) & 0x1F
        reg = (value >> 16) & 0x1F
        if phy != 1 or op not in (1, 2):
            self._mdic = (value & ~(MDIC_READY | MDIC_ERROR)) | MDIC_READY | MDIC_ERROR
            return
        if op == 2:
            self._mdic = (value & 0xFFFF0000 & ~(MDIC_READY | MDIC_ERROR)) | self._phy_read(reg) | MDIC_READY
        else:
            self._phy_write(reg, value & 0xFFFF)
            self._mdic = (value & ~(MDIC_READY | MDIC_ERROR)) | MDIC_READY

    def _phy_read(self, reg: int) -> int:
        up = self.link_up and not self._regs.get(CTRL, 0) & CTRL_PHY_RST
        if reg == PHY_BMSR:
            return 0x7949 | (0x0024 if up else 0)        # + link status, autoneg complete
        if reg == PHY_ID1:
            return 0x0141
        if reg == PHY_ID2:
            return self.variant.phy_id2
        if reg == PHY_ANLPAR:
            return 0x45E1 if up else 0
        if reg == PHY_ANER:
            return 0x0001 if up else 0
        if reg == PHY_GSTAT:
            return 0x3C00 if up else 0
        if reg == PHY_SPEC_STAT:
            return 0xAC00 if up else 0                    # 1000 Mb/s, full duplex, resolved, link
        return self._phy.get(reg, 0)

    def _phy_write(self, reg: int, value: int) -> None:
        if reg in PHY_READ_ONLY:
            return
        if reg == PHY_BMCR:
            if value & 0x8000:                            # reset: self-clearing, back to defaults
                self._reset_phy()
                return
            value &= ~0x0200                              # restart autoneg self-clears
        self._phy[reg] = value

    # --- interrupts and statistics ----------------------------------------------------------------
    def _raise(self, cause: int) -> None:
        self._regs[ICR] = self._regs.get(ICR, 0) | (cause & ~ICR_INT_ASSERTED)

    def _stat(self, offset: int, inc: int = 1) -> None:
        limit = (1 << 64) - 1 if offset in STATS64 else M32
        self._stats[offset] = min(self._stats.get(offset, 0) + inc, limit)   # counters stick at max

    def _stat_value(self, offset: int) -> int:
        if offset - 4 in STATS64:
            return self._stats.get(offset - 4, 0) >> 32
        return self._stats.get(offset, 0) & M32

    def _stat_read(self, offset: int) -> int:
        value = self._stat_value(offset)
        if offset in STATS64:
            return value                                  # low half: no side effect
        self._stats.pop(offset - 4 if offset - 4 in STATS64 else offset, None)
        return value

    def _count(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    # ============================================================================================
    # DMA
    # ============================================================================================
    def _fault(self, iova: int, length: int, write: bool, what: str) -> None:
        self.dmar_faults += 1
        self.dmar_log.append(DmarRecord(iova, length, write, what))

    def _dma_read(self, iova: int, length: int, what: str) -> bytes | None:
        if self._bus is None:
            self._fault(iova, length, False, what)
            return None
        try:
            return self._bus.dma_read(iova, length)
        except DmarFault:
            self._fault(iova, length, False, what)
            return None

    def _dma_write(self, iova: int, data: bytes, what: str) -> bool:
        if self._bus is None:
            self._fault(iova, len(data), True, what)
            return False
        try:
            self._bus.dma_write(iova, data)
            return True
        except DmarFault:
            self._fault(iova, len(data), True, what)
            return False

    def _ring_size(self, len_reg: int) -> int:
        return self._regs.get(len_reg, 0) // 16

    def _ring_base(self, lo: int) -> int:
        return (self._regs.get(lo + 4, 0) << 32) | self._regs.get(lo, 0)

    def _can_dma(self) -> bool:
        return self.bus_master and not self._dead()

    # ============================================================================================
    # TX
    # ============================================================================================
    def _tx_run(self) -> None:
        if self._tx_busy:
            return              # re-entered from on_transmit: the running loop re-reads TDT
        self._tx_busy = True
        try:
            self._tx_ring()
        finally:
            self._tx_busy = False

    def _tx_ring(self) -> None:
        if not (self._regs.get(TCTL, 0) & TCTL_EN) or not self._can_dma() or self.faults.tx_hang:
            return
        n = self._ring_size(TDLEN)
        if n == 0:
            return
        base = self._ring_base(TDBAL)
        processed = False
        while True:
            head, tail = self._regs.get(TDH, 0), self._regs.get(TDT, 0)
            if head == tail:
                break
            if head >= n or tail >= n:
                self._count("tx_index_beyond_ring")
                return
            daddr = base + 16 * head
            desc = self._dma_read(daddr, 16, "tx descriptor fetch")
            if desc is None:
                return                                    # the queue stops at a descriptor it cannot fetch
            self._tx_descriptor(desc, daddr)
            self._regs[TDH] = (head + 1) % n
            processed = True
        if processed:
            self._raise(ICR_TXQE)

    def _tx_descriptor(self, desc: bytes, daddr: int) -> None:
        cmd = desc[11]
        if cmd & TXD_DEXT:
            dtyp = (desc[10] >> 4) & 0xF
            if dtyp == 0:
                self._tx_context(desc)
            elif dtyp == 1:
                self._tx_data(desc, legacy=False)
            else:
                self._count("tx_unknown_descriptor_type")
        else:
            self._tx_data(desc, legacy=True)
        if cmd & TXD_RS:
            if self.faults.drop_tx_completions > 0:
                self.faults.drop_tx_completions -= 1
                return
            # Status is dword 3's low byte; only DD is set (no collisions on full duplex).
            if self._dma_write(daddr + 12, bytes([desc[12] | STA_DD]), "tx descriptor write-back"):
                self._raise(ICR_TXDW)

    def _tx_context(self, desc: bytes) -> None:
        ipcss, ipcso, ipcse, tucss, tucso, tucse, dw2, _sta, hdrlen, mss = struct.unpack("<BBHBBHIBBH", desc)
        self._ctx = _TxContext(ipcss, ipcso, ipcse, tucss, tucso, tucse,
                               paylen=dw2 & 0xFFFFF, tucmd=dw2 >> 24, hdrlen=hdrlen, mss=mss)
        if self._ctx.tucmd & TXD_TSE:
            self._stat(S_TSCTC)

    def _tx_data(self, desc: bytes, legacy: bool) -> None:
        addr, dw2, _status, b13, special = struct.unpack("<QIBBH", desc)
        cmd = dw2 >> 24
        length = dw2 & (0xFFFF if legacy else 0xFFFFF)
        p = self._txp
        if not p.started:
            p.started, p.extended = True, not legacy
            if not legacy:
                p.tse, p.popts = bool(cmd & TXD_TSE), b13
        elif p.extended == legacy:
            self._count("tx_mixed_descriptor_types")
            p.bad = True
        if length:
            data = self._dma_read(addr, length, "tx buffer read")
            if data is None:
                p.bad = True                              # the IOMMU refused: this frame never leaves
            elif len(p.data) + length > (1 << 18):
                p.bad = True
                self._count("tx_packet_too_long")
            else:
                p.data += data
        if cmd & TXD_EOP:
            self._txp = _TxPacket()
            if legacy:
                self._tx_finish(p, cmd, special, cso=(dw2 >> 16) & 0xFF, css=b13)
            else:
                self._tx_finish(p, cmd, special)

    def _tx_finish(self, p: _TxPacket, cmd: int, special: int, cso: int = 0, css: int = 0) -> None:
        if p.bad:
            self._count("tx_dropped_dma_fault")
            return
        if not cmd & TXD_IFCS:
            # Without IFCS the MAC sends no FCS: the link partner drops the frame as a CRC error.
            self._count("tx_without_ifcs")
            return
        frames: list[bytearray]
        if not p.extended:
            frame = p.data
            if cmd & TXD_IC:
                self._put_checksum(frame, css, cso, 0)
            frames = [frame]
        elif p.tse:
            frames = self._tso(p.data, p.popts)
        else:
            frame = p.data
            c = self._ctx
            if p.popts & POPTS_IXSM:
                self._put_checksum(frame, c.ipcss, c.ipcso, c.ipcse)
            if p.popts & POPTS_TXSM:
                self._put_checksum(frame, c.tucss, c.tucso, c.tucse)
            frames = [frame]
        for frame in frames:
            if len(frame) > TX_MAX_FRAME and not p.tse:
                self._count("tx_frame_too_long")
                continue
            if cmd & TXD_VLE and self._regs.get(CTRL, 0) & CTRL_VME:
                tag = struct.pack(">HH", self._regs.get(VET, 0x8100), special)
                frame = frame[:12] + tag + frame[12:]
            if len(frame) < ETH_MIN and self._regs.get(TCTL, 0) & TCTL_PSP:
                frame = frame + bytes(ETH_MIN - len(frame))
            self._wire_send(bytes(frame))

    def _put_checksum(self, frame: bytearray, css: int, cso: int, cse: int) -> bool:
        end = cse + 1 if cse else len(frame)
        if css >= len(frame) or cso + 2 > len(frame) or end > len(frame) or end <= css:
            self._count("tx_bad_checksum_offsets")
            return False
        s = ones_sum(frame[css:end])
        value = ~s & 0xFFFF
        frame[cso:cso + 2] = (value or 0xFFFF).to_bytes(2, "big")
        return True

    def _tso(self, packet: bytearray, popts: int) -> list[bytearray]:
        """TCP/UDP segmentation with the current context: each segment is the header plus up
        to MSS payload bytes; IP length/id, TCP sequence/flags or UDP length are rewritten and
        the checksums the driver asked for (POPTS) computed per segment."""
        c = self._ctx
        tcp = bool(c.tucmd & TUCMD_TCP)
        if c.hdrlen == 0 or c.mss == 0 or c.hdrlen > len(packet) or c.tucss + (20 if tcp else 8) > c.hdrlen:
            self._count("tso_bad_context")
            return []
        hdr, payload = bytes(packet[:c.hdrlen]), bytes(packet[c.hdrlen:])
        if len(payload) != c.paylen:
            self._count("tso_paylen_mismatch")
        ipv4 = bool(c.tucmd & TUCMD_IP)
        ip_id = int.from_bytes(hdr[c.ipcss + 4:c.ipcss + 6], "big")
        seq = int.from_bytes(hdr[c.tucss + 4:c.tucss + 8], "big") if tcp else 0
        segments = []
        for i, off in enumerate(range(0, max(len(payload), 1), c.mss)):
            chunk = payload[off:off + c.mss]
            last = off + c.mss >= len(payload)
            seg = bytearray(hdr + chunk)
            if ipv4:
                seg[c.ipcss + 2:c.ipcss + 4] = (len(seg) - c.ipcss).to_bytes(2, "big")
                seg[c.ipcss + 4:c.ipcss + 6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            else:
                seg[c.ipcss + 4:c.ipcss + 6] = (len(seg) - c.ipcss - 40).to_bytes(2, "big")
            l4_len = len(seg) - c.tucss
            if tcp:
                seg[c.tucss + 4:c.tucss + 8] = ((seq + off) & M32).to_bytes(4, "big")
                if not last:
                    seg[c.tucss + 13] &= ~0x09                  # FIN and PSH only on the last segment
            else:
                seg[c.tucss + 4:c.tucss + 6] = l4_len.to_bytes(2, "big")
            if popts & POPTS_IXSM and ipv4:
                self._put_checksum(seg, c.ipcss, c.ipcso, c.ipcse)
            if popts & POPTS_TXSM:
                # The driver seeds the checksum field with the pseudo-header sum without the
                # length; the device adds this segment's L4 length.
                seed = int.from_bytes(seg[c.tucso:c.tucso + 2], "big")
                seg[c.tucso:c.tucso + 2] = _add16(seed, l4_len).to_bytes(2, "big")
                self._put_checksum(seg, c.tucss, c.tucso, 0)
            segments.append(seg)
        return segments

    def _wire_send(self, frame: bytes) -> None:
        if not self._link_ok():
            self._count("tx_link_down")
            return
        octets = len(frame) + 4
        self._stat(S_TPT)
        self._stat(S_TOT, octets)
        self._stat(S_GPTC)
        self._stat(S_GOTC, octets)
        if frame[:6] == BROADCAST:
            self._stat(S_BPTC)
        elif frame[0] & 1:
            self._stat(S_MPTC)
        if self.on_transmit is not None:
            self.on_transmit(frame)

    # ============================================================================================
    # RX
    # ============================================================================================
    def set_link(self, up: bool) -> None:
        with self._lock:
            if up != self.link_up:
                self.link_up = up
                self._raise(ICR_LSC)
                if up:
                    self._rx_flush()

    def wire_receive(self, frame: bytes) -> bool:
        """A frame (without FCS) arrives from the wire. True if the MAC took it (it is in a
        descriptor or waiting in the FIFO); False if dropped (no link, receiver off, filtered,
        bad length, FIFO full)."""
        with self._lock:
            if self._dead() or not self._link_ok():
                return False
            rctl = self._regs.get(RCTL, 0)
            if not rctl & RCTL_EN:
                return False
            if len(frame) < 14:
                self._stat(S_RUC)
                return False
            frame = bytes(frame) + bytes(max(0, ETH_MIN - len(frame)))   # the sender padded it on the wire
            tagged = frame[12:14] == self._regs.get(VET, 0x8100).to_bytes(2, "big")
            limit = ETH_JUMBO_MAX if rctl & RCTL_LPE else ETH_MAX + (4 if tagged else 0)
            if not self._accept(frame, rctl, tagged):
                return False
            self._stat(S_TPR)
            self._stat(S_TOR, len(frame) + 4)
            if len(frame) > limit:
                self._stat(S_ROC)
                return False
            if self._rx_fifo_used + len(frame) > self.rx_fifo_bytes:
                self._stat(S_MPC)
                self._raise(ICR_RXO)
                return False
            self._rx_fifo.append(frame)
            self._rx_fifo_used += len(frame)
            self._rx_flush()
            return True

    @property
    def rx_fifo_frames(self) -> int:
        return len(self._rx_fifo)

    def _accept(self, frame: bytes, rctl: int, tagged: bool) -> bool:
        if tagged and rctl & RCTL_VFE:
            vid = int.from_bytes(frame[14:16], "big") & 0xFFF
            if not self._regs.get(VFTA + 4 * (vid >> 5), 0) & (1 << (vid & 31)):
                return False
        dst = frame[:6]
        if self._exact_match(dst):
            return True
        if dst == BROADCAST:
            return bool(rctl & RCTL_BAM) or self._mta_match(dst, rctl)
        if dst[0] & 1:
            return bool(rctl & RCTL_MPE) or self._mta_match(dst, rctl)
        return bool(rctl & RCTL_UPE)

    def _exact_match(self, dst: bytes) -> bool:
        for i in range(16):
            high = self._regs.get(RA + 8 * i + 4, 0)
            if high & RAH_AV and (high >> 16) & 3 == 0:           # AS = 00: destination address
                addr = self._regs.get(RA + 8 * i, 0).to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little")
                if addr == dst:
                    return True
        return False

    def _mta_match(self, dst: bytes, rctl: int) -> bool:
        h = mta_hash(dst, (rctl >> 12) & 3)
        return bool(self._regs.get(MTA + 4 * (h >> 5), 0) & (1 << (h & 31)))

    def _rx_buffer_size(self, rctl: int) -> int:
        code = (rctl >> 16) & 3
        if rctl & RCTL_BSEX:
            return (2048, 16384, 8192, 4096)[code]             # code 0 with BSEX is reserved
        return (2048, 1024, 512, 256)[code]

    def _rx_flush(self) -> None:
        rctl = self._regs.get(RCTL, 0)
        while self._rx_fifo and rctl & RCTL_EN and self._can_dma() and self._link_ok():
            if (rctl >> 10) & 3 and self.variant.pcie:
                self._count("rx_descriptor_type_unsupported")
                return
            frame = self._rx_fifo[0]
            data = frame if rctl & RCTL_SECRC else frame + zlib.crc32(frame).to_bytes(4, "little")
            bufsize = self._rx_buffer_size(rctl)
            need = -(-len(data) // bufsize)
            n = self._ring_size(RDLEN)
            head, tail = self._regs.get(RDH, 0), self._regs.get(RDT, 0)
            if n and (head >= n or tail >= n):
                self._count("rx_index_beyond_ring")
                return
            available = (tail - head) % n if n else 0
            if available < need:
                if not self._rnbc_counted:
                    self._stat(S_RNBC)                          # counted once per stalled frame
                    self._rnbc_counted = True
                return
            base = self._ring_base(RDBAL)
            slots = [base + 16 * ((head + k) % n) for k in range(need)]
            buffers = []
            for slot in slots:
                raw = self._dma_read(slot, 8, "rx descriptor fetch")
                if raw is None:
                    return                                      # stays in the FIFO; the ring is broken
                buffers.append(int.from_bytes(raw, "little"))
            self._rx_fifo.popleft()
            self._rx_fifo_used -= len(frame)
            self._rnbc_counted = False
            for k, (slot, addr) in enumerate(zip(slots, buffers)):
                chunk = data[k * bufsize:(k + 1) * bufsize]
                # Posted writes: the device cannot tell the IOMMU dropped them; it carries on.
                self._dma_write(addr, chunk, "rx buffer write")
                last = k == need - 1
                status = RXS_DD | RXS_IXSM | (RXS_EOP if last else 0)
                length = len(chunk)
                if self.faults.rx_bad_length > 0:
                    self.faults.rx_bad_length -= 1
                    length = self.faults.rx_bad_length_value
                if self.faults.drop_rx_completions > 0:
                    self.faults.drop_rx_completions -= 1
                    continue
                self._dma_write(slot + 8, struct.pack("<HHBBH", length & 0xFFFF, 0, status, 0, 0),
                                "rx descriptor write-back")
            self._regs[RDH] = (head + need) % n
            self._stat(S_GPRC)
            self._stat(S_GORC, len(frame) + 4)
            if frame[:6] == BROADCAST:
                self._stat(S_BPRC)
            elif frame[0] & 1:
                self._stat(S_MPRC)
            self._raise(ICR_RXT0)
            free = (tail - self._regs[RDH]) % n
            if free < n >> (1 + ((rctl >> 8) & 3)):              # RDMTS: 1/2, 1/4, 1/8 of the ring
                self._raise(ICR_RXDMT0)

    # ============================================================================================
    # fault actions
    # ============================================================================================
    def surprise_remove(self) -> None:
        with self._lock:
            self.faults.surprise_removal = True

    def inject_spurious_dd(self, queue: str = "rx") -> int:
        """Set DD on the descriptor just past the tail: one the host has not handed to the
        device. Returns its index."""
        with self._lock:
            if queue not in ("rx", "tx"):
                raise ValueError("queue is 'rx' or 'tx'")
            len_reg, base_reg, tail_reg = (RDLEN, RDBAL, RDT) if queue == "rx" else (TDLEN, TDBAL, TDT)
            n = self._ring_size(len_reg)
            if n == 0:
                raise ValueError(f"the {queue} ring is not set up")
            index = self._regs.get(tail_reg, 0) % n
            slot = self._ring_base(base_reg) + 16 * index
            if queue == "rx":
                self._dma_write(slot + 8, struct.pack("<HHBBH", 64, 0, RXS_DD | RXS_EOP, 0, 0), "spurious rx write-back")
            else:
                self._dma_write(slot + 12, bytes([STA_DD]), "spurious tx write-back")
            self._count(f"spurious_dd_{queue}")
            return index

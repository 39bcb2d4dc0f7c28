"""Intel PRO/1000: 82540EM (8086:100e) and the 8254x family, 82574L (8086:10d3, e1000e).

Device knowledge only, polled (no interrupts), legacy descriptors on one RX and one TX queue;
on TX also TCP/IP context + extended data descriptors for what the host's TAP leaves undone
(checksum offload, TCP segmentation: `offloads`, see udrv.offload).
Facts from Intel's 8254x and 82574 software developer's manuals as summarised in
shared/reference/e1000.md, cross-read against Linux e1000/e1000e, QEMU and DPDK; written here
independently of the udrv e1000 device model (models and drivers share no constants).

Layout of this file:
  registers and bits                 (names as in the datasheet)
  ids and chip flags                 (a handful of 8254x ids from Linux e1000 + 82574/82583)
  E1000Soft / E1000Checkpoint        (what the framework snapshots / what a resume needs)
  E1000                              bind, probe, open, stop, set_mac, set_rx_mode, set_mtu,
                                     link_check, stats, checkpoint, restore, invariants
  RingMemory                         descriptor rings and packet buffers in DMA memory
  E1000Ring                          the Python datapath (udrv.datapath.Datapath)
  E1000NativeRing / E1000Native      the same datapath with the per-frame work in C
                                     (native/e1000_ring.c); DRIVER stays the Python ring,
                                     E1000Native is the alternative implementation to swap in

Ring ownership: open() allocates the rings (frees are on the action list) and programs the
ring registers; every programming bumps `ring_epoch`. The datapath owns the ring *indices*
(hot state, not snapshotted: it re-derives them from the device at every reset) and re-arms
the ring memory when it sees a new epoch. Every descriptor address the driver writes is
computed from its own buffers (descriptor i <-> buffer i), never read back from the ring, so a
device or a bug scribbling over descriptor memory cannot make us point the NIC elsewhere.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from udrv import offload
from udrv.actions import Action, ActionList
from udrv.datapath import Capabilities, DatapathCounters, DatapathDefaults, DatapathReport, TapCounts
from udrv.driver import DriverStats, FrameSink, LinkState, NetDriver, RxMode
from udrv.errors import DeviceGone, DriverFault, TransferTimeout, UdrvError
from udrv.pcitransport import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, DmaBuffer, PciTransport

# --- registers (BAR0 offsets) ---------------------------------------------------------------
CTRL = 0x0000
STATUS = 0x0008
EECD = 0x0010
EERD = 0x0014
CTRL_EXT = 0x0018
MDIC = 0x0020
ICR = 0x00C0
ITR = 0x00C4
ICS = 0x00C8
IMS = 0x00D0
IMC = 0x00D8
RCTL = 0x0100
TCTL = 0x0400
TIPG = 0x0410
RDBAL = 0x2800
RDBAH = 0x2804
RDLEN = 0x2808
RDH = 0x2810
RDT = 0x2818
RDTR = 0x2820
RXDCTL = 0x2828
TDBAL = 0x3800
TDBAH = 0x3804
TDLEN = 0x3808
TDH = 0x3810
TDT = 0x3818
TXDCTL = 0x3828
RFCTL = 0x5008            # 82574: receive filter control (EXTEN selects extended RX descriptors)
MTA = 0x5200              # 128 dwords
MTA_WORDS = 128
RAL0 = 0x5400
RAH0 = 0x5404
RA_ENTRIES = 16           # RAL/RAH pairs 0..15, 8 bytes apart

# statistics (clear on read; 64-bit octet counters: read low, then high)
CRCERRS = 0x4000
ALGNERRC = 0x4004
SYMERRS = 0x4008
RXERRC = 0x400C
MPC = 0x4010
SCC = 0x4014
ECOL = 0x4018
MCC = 0x401C
LATECOL = 0x4020
COLC = 0x4028
DC = 0x4030
TNCRS = 0x4034
RLEC = 0x4040
GPRC = 0x4074
BPRC = 0x4078
MPRC = 0x407C
GPTC = 0x4080
GORCL = 0x4088
GORCH = 0x408C
GOTCL = 0x4090
GOTCH = 0x4094
RNBC = 0x40A0
RUC = 0x40A4
ROC = 0x40AC
TPR = 0x40D0
TPT = 0x40D4
MPTC = 0x40F0
BPTC = 0x40F4

# CTRL
CTRL_FD = 0x00000001
CTRL_GIO_MASTER_DISABLE = 0x00000004   # 82574 (PCIe): stop issuing master requests
CTRL_LRST = 0x00000008
CTRL_ASDE = 0x00000020
CTRL_SLU = 0x00000040
CTRL_ILOS = 0x00000080
CTRL_FRCSPD = 0x00000800
CTRL_FRCDPX = 0x00001000
CTRL_RST = 0x04000000
CTRL_PHY_RST = 0x80000000

# STATUS
STATUS_FD = 0x00000001
STATUS_LU = 0x00000002
STATUS_FUNC_1 = 0x00000004             # 82546 (dual port): this is port B
STATUS_SPEED_MASK = 0x000000C0
STATUS_SPEED_100 = 0x00000040
STATUS_SPEED_1000 = 0x00000080
STATUS_GIO_MASTER_ENABLE = 0x00080000  # 82574

# EECD / CTRL_EXT
EECD_AUTO_RD = 0x00000200              # 82574: NVM auto-read done
CTRL_EXT_EE_RST = 0x00002000           # 8254x: reload the EEPROM (after a MAC reset)

# EERD, two layouts (data always in bits 31:16)
EERD_START = 0x00000001
EERD_DONE_8254X = 0x00000010           # 82540/82545/82546: DONE bit 4, address in bits 15:8
EERD_ADDR_SHIFT_8254X = 8
EERD_DONE_E1000E = 0x00000002          # 82574/82583: DONE bit 1, address in bits 15:2
EERD_ADDR_SHIFT_E1000E = 2
EERD_DATA_SHIFT = 16

# RCTL
RCTL_EN = 0x00000002
RCTL_SBP = 0x00000004
RCTL_UPE = 0x00000008
RCTL_MPE = 0x00000010
RCTL_LPE = 0x00000020
RCTL_LBM_MASK = 0x000000C0
RCTL_RDMTS_HALF = 0x00000000
RCTL_DTYP_MASK = 0x00000C00            # 82574: descriptor type (00 = legacy)
RCTL_MO_MASK = 0x00003000              # multicast offset: 00 = bits 47:36 of the address
RCTL_BAM = 0x00008000
RCTL_BSIZE_MASK = 0x00030000
RCTL_BSEX = 0x02000000
RCTL_SECRC = 0x04000000
RCTL_SZ = {                            # buffer size -> BSIZE/BSEX bits
    2048: 0x00000000,
    4096: RCTL_BSEX | 0x00030000,
    8192: RCTL_BSEX | 0x00020000,
    16384: RCTL_BSEX | 0x00010000,
}

# TCTL / TIPG / TXDCTL
TCTL_EN = 0x00000002
TCTL_PSP = 0x00000008
TCTL_CT_SHIFT = 4
TCTL_COLD_SHIFT = 12
TCTL_RTLC = 0x01000000
COLLISION_THRESHOLD = 15
COLLISION_DISTANCE = 63                # full duplex (82543 and later)
TIPG_IPGT_COPPER = 8
TIPG_IPGR1 = 8
TIPG_IPGR2 = 6
TIPG_VALUE = TIPG_IPGT_COPPER | (TIPG_IPGR1 << 10) | (TIPG_IPGR2 << 20)
TXDCTL_82574_BIT22 = 1 << 22           # 82571 family: reserved, must be written as 1

RFCTL_EXTEN = 0x00008000
RAH_AV = 0x80000000

# legacy descriptors (16 bytes)
DESC_SIZE = 16
RXD_STAT_DD = 0x01
RXD_STAT_EOP = 0x02
RXD_ERR_CE = 0x01        # CRC / alignment error
RXD_ERR_SE = 0x02        # symbol error
RXD_ERR_SEQ = 0x04       # sequence error
RXD_ERR_CXE = 0x10       # carrier extension error
RXD_ERR_RXE = 0x80       # RX data error
RXD_ERR_FRAME = RXD_ERR_CE | RXD_ERR_SE | RXD_ERR_SEQ | RXD_ERR_CXE | RXD_ERR_RXE
TXD_CMD_EOP = 0x01
TXD_CMD_IFCS = 0x02
TXD_CMD_RS = 0x08
TXD_CMD_DEXT = 0x20
TXD_STAT_DD = 0x01
TXD_STAT_EC = 0x02       # excess collisions
TXD_STAT_LC = 0x04       # late collision
TXD_CMD = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS

# extended TX descriptors (DEXT set): the type sits in bits 23:20 of the length dword
TXD_DTYP_SHIFT = 20
TXD_DTYP_CONTEXT = 0x0   # TCP/IP context: where the checksums go, TSO's MSS/HDRLEN/PAYLEN
TXD_DTYP_DATA = 0x1      # data: buffer + DCMD + POPTS, under the last context
TXD_CMD_TSE = 0x04       # DCMD/TUCMD: TCP segmentation (on a legacy descriptor this bit is IC)
TUCMD_TCP = 0x01         # context: the L4 header is TCP (else UDP)
TUCMD_IP = 0x02          # context: the L3 header is IPv4 (else IPv6)
POPTS_IXSM = 0x01        # data: insert the IPv4 header checksum
POPTS_TXSM = 0x02        # data: insert the TCP/UDP checksum
TX_CTX_OFFSET_MAX = 0xFF  # IPCSS, IPCSO, TUCSS, TUCSO and HDRLEN are 8-bit fields
TX_PAYLEN_MAX = 0xFFFFF  # PAYLEN: 20 bits
TX_MSS_MAX = 0xFFFF

# ring geometry
RING_ALIGN_DESC = 8      # RDLEN/TDLEN must be a multiple of 128 bytes = 8 descriptors
RING_MIN = 8
RING_MAX = 4096
ETH_HLEN = 14
ETH_ZLEN = 60
VLAN_HLEN = 4
ALL_ONES = 0xFFFFFFFF

# reset timing (Linux e1000/e1000e)
RESET_QUIESCE_S = 0.010       # after disabling RX/TX, before CTRL.RST
RESET_SETTLE_S = 0.005        # 8254x: after CTRL.RST
RESET_SETTLE_E1000E_S = 0.025  # 82573/82574/82583: after CTRL.RST
EEPROM_RELOAD_S = 0.002       # 8254x: after CTRL_EXT.EE_RST
EERD_TIMEOUT_S = 0.010
GIO_MASTER_TIMEOUT_S = 0.080
AUTO_RD_TIMEOUT_S = 0.010


# --- ids and chip flags -----------------------------------------------------------------------
E1000E = 1 << 0          # PCIe 8257x generation: GIO master disable, e1000e EERD layout, TXDCTL bit 22
JUMBO = 1 << 1           # long packets (LPE) up to a 9000-byte MTU
DUAL_PORT = 1 << 2       # 82546: port B's MAC is port A's with the last bit flipped
EE_RELOAD = 1 << 3       # 8254x: reload the EEPROM after a MAC reset (CTRL_EXT.EE_RST)
IO_RESET = 1 << 4        # Linux issues CTRL.RST through the I/O BAR (the chip cannot ack a 64-bit
                         # MMIO write during reset); we only have BAR0 and use a 32-bit MMIO write
FIBER = 1 << 5


@dataclass(frozen=True)
class PciId:
    vendor: int
    device: int
    name: str
    flags: int


_8254X = JUMBO | EE_RELOAD | IO_RESET
E1000_IDS: tuple[PciId, ...] = tuple(PciId(0x8086, d, n, f) for d, n, f in [
    (0x100E, "82540EM", _8254X),
    (0x1015, "82540EM (LOM)", _8254X),
    (0x1016, "82540EP (LOM)", _8254X),
    (0x1017, "82540EP", _8254X),
    (0x101E, "82540EP (mobile)", _8254X),
    (0x100F, "82545EM (copper)", _8254X),
    (0x1011, "82545EM (fiber)", _8254X | FIBER),
    (0x1026, "82545GM (copper)", _8254X),
    (0x1010, "82546EB (copper, dual port)", _8254X | DUAL_PORT),
    (0x1079, "82546GB (copper, dual port)", _8254X | DUAL_PORT),
    (0x10D3, "82574L", E1000E | JUMBO),
    (0x10F6, "82574LA", E1000E | JUMBO),
    (0x150C, "82583V", E1000E),           # no jumbo frames on the 82583
])


def match_id(vendor: int, device: int) -> PciId | None:
    for i in E1000_IDS:
        if (i.vendor, i.device) == (vendor, device):
            return i
    return None


# --- helpers (pure) ----------------------------------------------------------------------------
def mta_hash(addr: bytes) -> int:
    """The 12-bit multicast hash with RCTL.MO = 00: address bits 47:36 (the upper nibble of
    byte 4 and all of byte 5, in wire order)."""
    return ((addr[4] >> 4) | (addr[5] << 4)) & 0xFFF


def mta_table(addrs: tuple[bytes, ...]) -> list[int]:
    """The 128 MTA dwords for a multicast list: dword hash[11:5], bit hash[4:0]."""
    table = [0] * MTA_WORDS
    for a in addrs:
        h = mta_hash(a)
        table[h >> 5] |= 1 << (h & 0x1F)
    return table


def ring_size(n: int) -> int:
    """Descriptors for a ring asked to hold n: at least RING_MIN, a multiple of 8 (128 bytes)."""
    n = max(RING_MIN, int(n))
    n = (n + RING_ALIGN_DESC - 1) // RING_ALIGN_DESC * RING_ALIGN_DESC
    return min(n, RING_MAX)


def buffer_size_for(mtu: int) -> int:
    """Smallest RX buffer holding a whole frame (header + VLAN tag; CRC stripped by SECRC),
    so a frame always fits one descriptor."""
    frame = mtu + ETH_HLEN + VLAN_HLEN
    for size in sorted(RCTL_SZ):
        if frame <= size:
            return size
    raise ValueError(f"MTU {mtu} needs a frame larger than the biggest RX buffer (16384 bytes)")


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def valid_unicast(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and mac != b"\x00" * 6


# --- soft state and checkpoint ------------------------------------------------------------------
@dataclass
class E1000Soft:
    mac: bytes = b"\x00" * 6
    perm_mac: bytes = b"\x00" * 6        # from RAL0/RAH0 or the EEPROM at probe
    mode: RxMode = field(default_factory=RxMode)
    mtu: int = 1500
    opened: bool = False
    link: LinkState = field(default_factory=lambda: LinkState(False))
    # ring geometry (the datapath keeps the indices)
    rx_count: int = RING_MIN
    tx_count: int = RING_MIN
    rx_bufsize: int = 2048
    tx_bufsize: int = 2048
    rx_ring_iova: int = 0                # 0 = no rings allocated
    tx_ring_iova: int = 0
    rx_buf_iova: int = 0
    tx_buf_iova: int = 0
    # register values this driver programmed (what a resume re-writes)
    ctrl: int = 0
    rctl: int = 0
    tctl: int = 0
    tipg: int = 0
    # device counters accumulated from the clear-on-read statistics registers
    hw: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class E1000Checkpoint:
    """Linux e1000 suspend, refactored: PCI config words that matter + the soft state a
    resume re-writes (taken without stopping the device: config reads only)."""
    config: tuple[tuple[int, int, int], ...]     # (offset, size, value)
    mac: bytes
    mode: RxMode
    mtu: int
    opened: bool
    rx_count: int
    tx_count: int
    rx_bufsize: int
    tx_bufsize: int
    rx_ring_iova: int
    tx_ring_iova: int
    rx_buf_iova: int
    tx_buf_iova: int
    ctrl: int
    rctl: int
    tctl: int
    tipg: int


# config space words a resume restores (PCI spec offsets): command, cache line size,
# latency timer, BAR0, interrupt line. Status, BIST and the read-only ids are not restored.
CONFIG_WORDS = ((PCI_COMMAND, 2), (0x0C, 1), (0x0D, 1), (0x10, 4), (0x3C, 1))


class E1000Error(UdrvError):
    pass


# --- the driver ---------------------------------------------------------------------------------
class E1000(NetDriver):
    name = "e1000"
    ids = E1000_IDS
    max_mtu = 9000
    default_rings = (256, 256)     # descriptors (RX, TX) that Nic asks for unless told otherwise
    # what the family can take from the TAP (TCP/IP context descriptors); a chip narrows it
    offloads = frozenset({"csum", "tso4", "tso6"})

    def __init__(self, pci: PciTransport, actions: ActionList):
        self.pci = pci
        self.actions = actions
        self.ident = match_id(pci.info.vendor, pci.info.device)
        self.flags = self.ident.flags if self.ident else 0
        # per chip: the 82583 (and unknown parts) stay at 1500
        self.max_mtu = 9000 if self.flags & JUMBO else 1500
        # IPv6 segmentation only on the 8257x generation: Linux e1000 offers no TSO6 for the
        # 8254x, and QEMU's e1000 writes a wrong IPv6 payload length (it counts the header)
        self.offloads = E1000.offloads if self.flags & E1000E else frozenset({"csum", "tso4"})
        self.soft = E1000Soft()
        self.rings: RingMemory | None = None
        self.ring_epoch = 0                  # bumped whenever ring registers are (re)programmed
        self._rings_action: Action | None = None
        self._quiesce_action: Action | None = None
        self.datapath: E1000Ring | None = None
        self.restores = {"light": 0, "full": 0}
        self._mta: tuple[int, ...] | None = None   # what the MTA holds (None: unknown)

    @classmethod
    def match(cls, vendor: int, device: int) -> PciId | None:
        return match_id(vendor, device)

    # --- register access ------------------------------------------------------------------
    def rd(self, reg: int) -> int:
        """32-bit MMIO read; all ones from a register that can read all ones is confirmed by
        STATUS (which never does: it has reserved zero bits) before calling the device gone."""
        v = self.pci.read32(reg)
        if v == ALL_ONES and (reg == STATUS or self.pci.read32(STATUS) == ALL_ONES):
            raise DeviceGone(f"the e1000 at {self.pci.info.bdf} stopped answering (MMIO reads return "
                             "0xFFFFFFFF): it was removed, reset or unbound by the host")
        return v

    def wr(self, reg: int, value: int) -> None:
        self.pci.write32(reg, value & ALL_ONES)

    def flush(self) -> None:
        """Posted writes reach the device before the next read returns."""
        self.rd(STATUS)

    def _wait(self, reg: int, mask: int, want: bool, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            if bool(self.rd(reg) & mask) == want:
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.0005)

    # --- bring-up ---------------------------------------------------------------------------
    def bind(self) -> None:
        if self.ident is None:
            raise E1000Error(f"PCI device {self.pci.info.ident} at {self.pci.info.bdf} is not an Intel "
                             "e1000/e1000e this driver knows: bind it to a matching driver")
        cmd = self.pci.config_read(PCI_COMMAND, 2)
        if cmd == 0xFFFF:
            raise DeviceGone(f"the e1000 at {self.pci.info.bdf} does not answer config reads: it is gone")
        if not cmd & PCI_COMMAND_MEMORY:
            self.pci.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY)
        self.pci.set_bus_master(True)
        self.actions.record("bus mastering on", lambda: self.pci.set_bus_master(False))

    def probe(self) -> None:
        self.reset_hw()
        self.init_hw()
        mac = self.read_mac_addr()
        self.soft.perm_mac = mac
        self.soft.mac = mac
        self.rar_set(0, mac)
        self.soft.link = self.read_link()

    def reset_hw(self) -> None:
        """Global reset, never trusting the chip to reset anything (QEMU's e1000 only clears
        CTRL.RST): mask interrupts, stop RX and TX, let DMA drain, reset the MAC, mask again."""
        self._mta = None
        if self.flags & E1000E:
            # PCIe parts: stop master requests before the reset (Linux e1000e_disable_pcie_master)
            self.wr(CTRL, self.rd(CTRL) | CTRL_GIO_MASTER_DISABLE)
            self._wait(STATUS, STATUS_GIO_MASTER_ENABLE, False, GIO_MASTER_TIMEOUT_S)
        self.wr(IMC, ALL_ONES)
        self.wr(RCTL, 0)
        self.wr(TCTL, TCTL_PSP)
        self.flush()
        time.sleep(RESET_QUIESCE_S)
        ctrl = self.rd(CTRL)
        self.wr(CTRL, ctrl | CTRL_RST)
        if self.flags & E1000E:
            time.sleep(RESET_SETTLE_E1000E_S)
            self._wait(EECD, EECD_AUTO_RD, True, AUTO_RD_TIMEOUT_S)   # absent on some models: go on
        else:
            time.sleep(RESET_SETTLE_S)
            if self.flags & EE_RELOAD:
                self.wr(CTRL_EXT, self.rd(CTRL_EXT) | CTRL_EXT_EE_RST)
                self.flush()
                time.sleep(EEPROM_RELOAD_S)
        self.wr(IMC, ALL_ONES)
        self.rd(ICR)
        self.soft.rctl = 0
        self.soft.tctl = TCTL_PSP

    def init_hw(self) -> None:
        """What a reset may have left anywhere: link forced up by the MAC (no PHY work), no
        address filters but ours, an empty multicast table, no rings, interrupts masked."""
        ctrl = self.rd(CTRL)
        ctrl = (ctrl | CTRL_SLU) & ~(CTRL_FRCSPD | CTRL_FRCDPX | CTRL_LRST | CTRL_PHY_RST | CTRL_RST
                                     | CTRL_GIO_MASTER_DISABLE | CTRL_ILOS)
        self.wr(CTRL, ctrl)
        self.soft.ctrl = ctrl
        for i in range(1, RA_ENTRIES):
            self.wr(RAL0 + 8 * i, 0)
            self.wr(RAH0 + 8 * i, 0)
        self._mta = None
        for i in range(MTA_WORDS):
            self.wr(MTA + 4 * i, 0)
        self._mta = (0,) * MTA_WORDS
        for reg in (RDBAL, RDBAH, RDLEN, RDH, RDT, TDBAL, TDBAH, TDLEN, TDH, TDT):
            self.wr(reg, 0)
        if self.flags & E1000E:
            rfctl = self.rd(RFCTL)
            if rfctl & RFCTL_EXTEN:
                self.wr(RFCTL, rfctl & ~RFCTL_EXTEN)     # legacy RX descriptors
        self.wr(TIPG, TIPG_VALUE)
        self.soft.tipg = TIPG_VALUE
        self.wr(IMC, ALL_ONES)

    def read_eeprom(self, word: int) -> int:
        if self.flags & E1000E:
            shift, done = EERD_ADDR_SHIFT_E1000E, EERD_DONE_E1000E
        else:
            shift, done = EERD_ADDR_SHIFT_8254X, EERD_DONE_8254X
        self.wr(EERD, (word << shift) | EERD_START)
        end = time.monotonic() + EERD_TIMEOUT_S
        while True:
            v = self.rd(EERD)
            if v & done:
                return v >> EERD_DATA_SHIFT
            if time.monotonic() > end:
                raise TransferTimeout(f"EEPROM read of word {word} did not complete (EERD.DONE never set): "
                                      "the NVM may be missing or busy")
            time.sleep(0.0001)

    def read_mac_addr(self) -> bytes:
        """RAL0/RAH0 (loaded from the EEPROM at power-on) when valid, else EEPROM words 0..2."""
        ral, rah = self.rd(RAL0), self.rd(RAH0)
        mac = ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")
        if rah & RAH_AV and valid_unicast(mac):
            return mac
        mac = b"".join(self.read_eeprom(i).to_bytes(2, "little") for i in range(3))
        if self.flags & DUAL_PORT and self.rd(STATUS) & STATUS_FUNC_1:
            mac = mac[:5] + bytes([mac[5] ^ 1])
        if not valid_unicast(mac):
            raise E1000Error(f"the e1000 at {self.pci.info.bdf} has no valid MAC address (RAL0/RAH0 and the "
                             f"EEPROM give {mac_str(mac)}): program the EEPROM or set one with set_mac")
        return mac

    def rar_set(self, index: int, mac: bytes) -> None:
        ral = int.from_bytes(mac[0:4], "little")
        rah = int.from_bytes(mac[4:6], "little") | RAH_AV
        self.wr(RAL0 + 8 * index, ral)
        self.wr(RAH0 + 8 * index, rah)

    def read_link(self) -> LinkState:
        status = self.rd(STATUS)
        if not status & STATUS_LU:
            return LinkState(False)
        speed = status & STATUS_SPEED_MASK
        mbit = 1000 if speed & STATUS_SPEED_1000 else 100 if speed == STATUS_SPEED_100 else 10
        return LinkState(True, mbit, bool(status & STATUS_FD))

    # --- register values from soft state ---------------------------------------------------------
    def rctl_for(self, mode: RxMode, bufsize: int, mtu: int, enabled: bool) -> int:
        rctl = RCTL_BAM | RCTL_SECRC | RCTL_RDMTS_HALF | RCTL_SZ[bufsize]
        if enabled:
            rctl |= RCTL_EN
        if mtu > 1500:
            rctl |= RCTL_LPE
        if mode.promisc:
            rctl |= RCTL_UPE | RCTL_MPE
        elif mode.allmulti:
            rctl |= RCTL_MPE
        return rctl

    @staticmethod
    def tctl_for(enabled: bool) -> int:
        tctl = (TCTL_PSP | TCTL_RTLC | (COLLISION_THRESHOLD << TCTL_CT_SHIFT)
                | (COLLISION_DISTANCE << TCTL_COLD_SHIFT))
        return tctl | TCTL_EN if enabled else tctl

    def write_rctl(self, value: int) -> None:
        """RCTL is written only when it changes: QEMU holds RX off for ~1 s after an RCTL write."""
        if self.rd(RCTL) != value:
            self.wr(RCTL, value)
        self.soft.rctl = value

    def write_tctl(self, value: int) -> None:
        if self.rd(TCTL) != value:
            self.wr(TCTL, value)
        self.soft.tctl = value

    def write_mta(self, addrs: tuple[bytes, ...], force: bool = False) -> None:
        """Program the multicast table. `_mta` mirrors what the device holds (None while a
        write is under way or after a reset): it is device truth, not soft state, so a
        rollback does not touch it and a restore skips the 128 writes when nothing changed."""
        table = tuple(mta_table(addrs))
        if not force and self._mta == table:
            return
        self._mta = None
        for i, word in enumerate(table):
            self.wr(MTA + 4 * i, word)
        self._mta = table

    # --- rings ----------------------------------------------------------------------------------
    def alloc_rings(self, rx_count: int, tx_count: int, rx_bufsize: int, tx_bufsize: int) -> "RingMemory":
        rings = RingMemory.allocate(self.pci, rx_count, tx_count, rx_bufsize, tx_bufsize)
        self.rings = rings
        self._rings_action = self.actions.record(f"e1000 rings ({rings.nbufs} DMA buffers)",
                                                 lambda: self._free_rings(rings))
        s = self.soft
        s.rx_count, s.tx_count, s.rx_bufsize, s.tx_bufsize = rx_count, tx_count, rx_bufsize, tx_bufsize
        s.rx_ring_iova, s.tx_ring_iova = rings.rx_ring.iova, rings.tx_ring.iova
        s.rx_buf_iova, s.tx_buf_iova = rings.rx_bufs.iova, rings.tx_bufs.iova
        return rings

    def _free_rings(self, rings: "RingMemory") -> None:
        if self.datapath is not None:
            self.datapath.detach(rings)
        if self.rings is rings:
            self.rings = None
        rings.free(self.pci)

    def release_rings(self) -> None:
        """Give the rings back now (stop, MTU change): the device must no longer use them."""
        rings, action = self.rings, self._rings_action
        self._rings_action = None
        if action is not None:
            self.actions.released(action)
        if rings is not None:
            self._free_rings(rings)
        s = self.soft
        s.rx_ring_iova = s.tx_ring_iova = s.rx_buf_iova = s.tx_buf_iova = 0

    def program_rings(self) -> None:
        """Ring bases, lengths, heads and tails (tails 0: no RX buffers yet; the datapath arms
        them). RX and TX must be disabled while heads are written."""
        r = self.rings
        assert r is not None
        self.wr(RDBAL, r.rx_ring.iova & ALL_ONES)
        self.wr(RDBAH, r.rx_ring.iova >> 32)
        self.wr(RDLEN, r.rx_count * DESC_SIZE)
        self.wr(RDH, 0)
        self.wr(RDT, 0)
        self.wr(TDBAL, r.tx_ring.iova & ALL_ONES)
        self.wr(TDBAH, r.tx_ring.iova >> 32)
        self.wr(TDLEN, r.tx_count * DESC_SIZE)
        self.wr(TDH, 0)
        self.wr(TDT, 0)
        if self.flags & E1000E:
            txdctl = self.rd(TXDCTL)
            if not txdctl & TXDCTL_82574_BIT22:
                self.wr(TXDCTL, txdctl | TXDCTL_82574_BIT22)
        self.ring_epoch += 1

    def quiesce(self) -> None:
        """RX and TX off, ring registers cleared: the device can no longer DMA into our memory.
        (RCTL is written only if RX is on.)"""
        rctl = self.rd(RCTL)
        if rctl & RCTL_EN:
            self.wr(RCTL, rctl & ~RCTL_EN)
        tctl = self.rd(TCTL)
        if tctl & TCTL_EN:
            self.wr(TCTL, tctl & ~TCTL_EN)
        for reg in (RDLEN, RDBAL, RDBAH, RDH, RDT, TDLEN, TDBAL, TDBAH, TDH, TDT):
            self.wr(reg, 0)
        self.soft.rctl &= ~RCTL_EN
        self.soft.tctl &= ~TCTL_EN

    def _record_quiesce(self) -> None:
        # recorded after the ring allocation, so a rollback quiesces before it frees
        if self._quiesce_action is not None:
            self.actions.released(self._quiesce_action)

        def undo() -> None:
            self._quiesce_action = None
            try:
                self.quiesce()
            except DeviceGone:
                pass
        self._quiesce_action = self.actions.record("e1000 RX/TX enabled", undo)

    def enable_rxtx(self) -> None:
        """TX and RX on over freshly programmed rings (RCTL written only if it changes)."""
        s = self.soft
        self._record_quiesce()
        if self.rd(TIPG) != (s.tipg or TIPG_VALUE):
            self.wr(TIPG, s.tipg or TIPG_VALUE)
        self.write_tctl(self.tctl_for(True))
        self.write_rctl(self.rctl_for(s.mode, s.rx_bufsize, s.mtu, True))

    def start_rxtx(self) -> None:
        """Program the rings and turn TX and RX on (open, MTU change, full restore)."""
        self.program_rings()
        self.enable_rxtx()

    def reprogram_rings(self) -> None:
        """Ring registers wrong or heads impossible: RX/TX off, program, on again."""
        self.quiesce()
        self.start_rxtx()

    # --- configuration entry points ------------------------------------------------------------------
    def open(self) -> None:
        s = self.soft
        if s.opened:
            return
        bufsize = buffer_size_for(s.mtu)
        self.alloc_rings(s.rx_count, s.tx_count, bufsize, bufsize)
        self.write_mta(s.mode.multicast)
        self.start_rxtx()
        s.opened = True
        if self.datapath is not None:
            self.datapath.start()
        s.link = self.read_link()

    def stop(self) -> None:
        s = self.soft
        if self.datapath is not None:
            self.datapath.reclaim()          # confirm what the device already sent
            self.datapath.stop()
        # device first (a fault here leaves memory intact), memory last
        self.quiesce()
        if self._quiesce_action is not None:
            self.actions.released(self._quiesce_action)
            self._quiesce_action = None
        self.release_rings()
        s.opened = False

    def set_mac(self, mac: bytes) -> None:
        mac = bytes(mac)
        if not valid_unicast(mac):
            raise ValueError(f"{mac.hex()} is not a unicast 6-byte MAC address")
        self.rar_set(0, mac)
        self.soft.mac = mac

    def set_rx_mode(self, mode: RxMode) -> None:
        for a in mode.multicast:
            if len(a) != 6 or not a[0] & 1:
                raise ValueError(f"{bytes(a).hex()} is not a 6-byte multicast address")
        mode = RxMode(mode.promisc, mode.allmulti, tuple(bytes(a) for a in mode.multicast))
        s = self.soft
        self.write_mta(mode.multicast)
        self.write_rctl(self.rctl_for(mode, s.rx_bufsize, s.mtu, s.opened))
        s.mode = mode

    def set_mtu(self, mtu: int) -> None:
        """Up to 9000 on chips with long-packet support (LPE): every frame fits one RX buffer
        (2/4/8/16 KiB via BSIZE/BSEX), so the datapath never chains descriptors. A buffer
        size change while open re-creates the rings (as Linux e1000_change_mtu does a
        down/up); within the same buffer size only LPE changes."""
        if not self.min_mtu <= mtu <= self.max_mtu:
            why = "" if self.flags & JUMBO else " (this chip has no jumbo frame support)"
            raise ValueError(f"MTU {mtu} is outside what the {self.ident.name if self.ident else 'e1000'} "
                             f"supports ({self.min_mtu}..{self.max_mtu}){why}")
        s = self.soft
        bufsize = buffer_size_for(mtu)
        if not s.opened:
            s.mtu = mtu
            s.rx_bufsize = s.tx_bufsize = bufsize
            return
        if bufsize == s.rx_bufsize:
            s.mtu = mtu
            self.write_rctl(self.rctl_for(s.mode, bufsize, mtu, True))
            return
        if self.datapath is not None:
            self.datapath.reclaim()
            self.datapath.stop()
        self.quiesce()
        self.release_rings()
        s.mtu = mtu
        self.alloc_rings(s.rx_count, s.tx_count, bufsize, bufsize)
        self.start_rxtx()
        if self.datapath is not None:
            self.datapath.start()

    def link_check(self) -> LinkState:
        ctrl = self.rd(CTRL)
        if not ctrl & CTRL_SLU and self.soft.ctrl & CTRL_SLU:
            # init_hw set it and nothing of ours clears it: a reset behind our back, which took
            # the rings and filters with it. Setting SLU again would hide that from the restore.
            raise DriverFault("link_check", "device_reset",
                              "CTRL.SLU is clear: the device was reset behind the driver's back")
        if not ctrl & CTRL_SLU:
            self.wr(CTRL, ctrl | CTRL_SLU)
            self.soft.ctrl = ctrl | CTRL_SLU
        self.soft.link = self.read_link()
        return self.soft.link

    _STATS = (("crcerrs", CRCERRS), ("algnerrc", ALGNERRC), ("symerrs", SYMERRS), ("rxerrc", RXERRC),
              ("mpc", MPC), ("scc", SCC), ("ecol", ECOL), ("mcc", MCC), ("latecol", LATECOL),
              ("colc", COLC), ("dc", DC), ("tncrs", TNCRS), ("rlec", RLEC), ("gprc", GPRC),
              ("bprc", BPRC), ("mprc", MPRC), ("gptc", GPTC), ("rnbc", RNBC), ("ruc", RUC),
              ("roc", ROC), ("tpr", TPR), ("tpt", TPT), ("mptc", MPTC), ("bptc", BPTC))

    def update_stats(self) -> dict[str, int]:
        """Fold the clear-on-read counters into the soft totals."""
        hw = self.soft.hw
        pci = self.pci
        for name, reg in self._STATS:
            v = pci.read32(reg)
            if v == ALL_ONES and pci.read32(STATUS) == ALL_ONES:
                return hw           # device gone: keep what we have
            hw[name] = hw.get(name, 0) + v
        for name, lo_reg, hi_reg in (("gorc", GORCL, GORCH), ("gotc", GOTCL, GOTCH)):
            lo = pci.read32(lo_reg)
            hi = pci.read32(hi_reg)          # reading the high half clears both
            hw[name] = hw.get(name, 0) + ((hi << 32) | lo)
        return hw

    def stats(self) -> DriverStats:
        hw = self.update_stats()
        g = hw.get
        return DriverStats(
            rx_missed=g("mpc", 0),
            rx_errors=g("crcerrs", 0) + g("algnerrc", 0) + g("rxerrc", 0) + g("rlec", 0) + g("symerrs", 0),
            tx_errors=g("ecol", 0) + g("latecol", 0),
            collisions=g("colc", 0),
            extra=dict(hw))

    # --- suspend/resume, refactored into checkpoint/restore --------------------------------------
    def checkpoint(self) -> E1000Checkpoint:
        s = self.soft
        config = tuple((off, size, self.pci.config_read(off, size)) for off, size in CONFIG_WORDS)
        return E1000Checkpoint(config, s.mac, s.mode, s.mtu, s.opened, s.rx_count, s.tx_count,
                               s.rx_bufsize, s.tx_bufsize, s.rx_ring_iova, s.tx_ring_iova,
                               s.rx_buf_iova, s.tx_buf_iova, s.ctrl, s.rctl, s.tctl, s.tipg)

    def restore(self, cp: E1000Checkpoint) -> None:
        """Linux e1000 resume without the reset when the device kept its state: config space
        back, then re-write what configuration wrote (MAC filter, multicast table; ring
        registers, RCTL and TCTL only where they differ). When CTRL shows the MAC lost its
        state (stuck in reset, link-up forcing gone) the full path runs: reset + init +
        rings + enables, all from the checkpoint."""
        pci = self.pci
        if pci.config_read(0x00, 2) == 0xFFFF:
            raise DeviceGone(f"the e1000 at {pci.info.bdf} does not answer config reads: it is gone")
        for off, size, value in cp.config:
            if off == PCI_COMMAND:
                value |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
            if pci.config_read(off, size) != value:
                pci.config_write(off, size, value)
        s = self.soft
        s.mac, s.mode, s.mtu = cp.mac, cp.mode, cp.mtu
        s.rx_count, s.tx_count = cp.rx_count, cp.tx_count
        s.tipg = cp.tipg or TIPG_VALUE
        fresh = False
        if cp.opened and (self.rings is None or not self.rings.matches(cp)):
            # the checkpoint's rings are gone (a failed stop or MTU change freed them):
            # resume onto fresh rings of the same geometry
            if self.rings is not None:
                self.release_rings()
            self.alloc_rings(cp.rx_count, cp.tx_count, cp.rx_bufsize, cp.tx_bufsize)
            fresh = True
        elif not cp.opened and self.rings is not None:
            self.quiesce()
            self.release_rings()
        s.rx_bufsize, s.tx_bufsize = cp.rx_bufsize, cp.tx_bufsize
        ctrl = self.rd(CTRL)
        if ctrl & CTRL_RST or not ctrl & CTRL_SLU:
            self.restores["full"] += 1
            self.reset_hw()
            self.init_hw()
            self.rar_set(0, cp.mac)
            self.write_mta(cp.mode.multicast)
            if cp.opened:
                self.start_rxtx()
            else:
                self.write_rctl(self.rctl_for(cp.mode, cp.rx_bufsize, cp.mtu, False))
            s.opened = cp.opened
            return
        self.restores["light"] += 1
        self.rar_set(0, cp.mac)
        self.write_mta(cp.mode.multicast)
        self.wr(IMC, ALL_ONES)
        if cp.opened:
            if fresh or not self._ring_regs_match():
                self.reprogram_rings()
            else:
                self.enable_rxtx()
        else:
            if self.rd(RCTL) & RCTL_EN or self.rd(TCTL) & TCTL_EN or self.rd(RDLEN) or self.rd(TDLEN):
                self.quiesce()        # e.g. open() faulted after enabling: no DMA into freed memory
            self.write_rctl(self.rctl_for(cp.mode, cp.rx_bufsize, cp.mtu, False))
        s.opened = cp.opened

    def _ring_regs_match(self) -> bool:
        r = self.rings
        if r is None:
            return False
        want = ((RDBAL, r.rx_ring.iova & ALL_ONES), (RDBAH, r.rx_ring.iova >> 32),
                (RDLEN, r.rx_count * DESC_SIZE), (TDBAL, r.tx_ring.iova & ALL_ONES),
                (TDBAH, r.tx_ring.iova >> 32), (TDLEN, r.tx_count * DESC_SIZE))
        if any(self.rd(reg) != v for reg, v in want):
            return False
        return all(self.rd(reg) < n for reg, n in ((RDH, r.rx_count), (RDT, r.rx_count),
                                                    (TDH, r.tx_count), (TDT, r.tx_count)))

    # --- invariants --------------------------------------------------------------------------------
    @classmethod
    def c_variant(cls) -> type[NetDriver] | None:
        return None if cls.fast_path else E1000Native

    def invariants(self) -> list[str]:
        s = self.soft
        broken: list[str] = []
        probed = s.perm_mac != b"\x00" * 6        # before probe the MAC is not known yet
        if not isinstance(s.mac, bytes) or len(s.mac) != 6 or s.mac[0] & 1 or (probed and not valid_unicast(s.mac)):
            broken.append(f"MAC {bytes(s.mac).hex()} is not a unicast 6-byte address")
        if not self.min_mtu <= s.mtu <= self.max_mtu:
            broken.append(f"MTU {s.mtu} outside {self.min_mtu}..{self.max_mtu}")
        for what, n in (("RX", s.rx_count), ("TX", s.tx_count)):
            if n % RING_ALIGN_DESC or not RING_MIN <= n <= RING_MAX:
                broken.append(f"{what} ring of {n} descriptors is not a multiple of 8 in {RING_MIN}..{RING_MAX} "
                              "(ring length must be a multiple of 128 bytes)")
        if s.rx_bufsize not in RCTL_SZ or s.tx_bufsize not in RCTL_SZ:
            broken.append(f"buffer sizes {s.rx_bufsize}/{s.tx_bufsize} are not ones RCTL.BSIZE can express")
        elif s.mtu + ETH_HLEN + VLAN_HLEN > s.rx_bufsize:
            broken.append(f"MTU {s.mtu} frames do not fit the {s.rx_bufsize}-byte RX buffers")
        for a in s.mode.multicast:
            if len(a) != 6 or not a[0] & 1:
                broken.append(f"multicast list entry {bytes(a).hex()} is not a multicast address")
        if bool(s.rctl & RCTL_UPE) != s.mode.promisc:
            broken.append("RCTL.UPE does not match the promiscuous setting")
        if s.opened:
            r = self.rings
            if r is None:
                broken.append("open but no rings allocated")
            elif not (r.rx_ring.iova == s.rx_ring_iova and r.tx_ring.iova == s.tx_ring_iova
                      and r.rx_count == s.rx_count and r.tx_count == s.tx_count):
                broken.append("ring IOVAs/sizes in the soft state differ from the allocated rings")
            elif self.datapath is not None:
                broken += self.datapath.check()
        elif self.rings is not None:
            broken.append("rings allocated while the interface is closed")
        return broken

    # --- datapath ------------------------------------------------------------------------------------
    datapath_cls: Any = None      # set below (E1000Ring); a subclass may pick the C ring

    def make_datapath(self, journal: Any, sink: FrameSink, n_rx: int, n_tx: int,
                      on_progress: Callable[[], None] | None) -> "E1000Ring":
        self.soft.rx_count = ring_size(n_rx)
        self.soft.tx_count = ring_size(n_tx)
        self.datapath = self.datapath_cls(self, journal, sink, on_progress)
        return self.datapath


# --- DMA memory for the rings -------------------------------------------------------------------
class RingMemory:
    """Two descriptor rings and two packet-buffer areas; descriptor i always uses buffer i."""

    def __init__(self, rx_ring: DmaBuffer, tx_ring: DmaBuffer, rx_bufs: DmaBuffer, tx_bufs: DmaBuffer,
                 rx_count: int, tx_count: int, rx_bufsize: int, tx_bufsize: int):
        self.rx_ring, self.tx_ring, self.rx_bufs, self.tx_bufs = rx_ring, tx_ring, rx_bufs, tx_bufs
        self.rx_count, self.tx_count = rx_count, tx_count
        self.rx_bufsize, self.tx_bufsize = rx_bufsize, tx_bufsize
        self.nbufs = 4
        self.freed = False

    @classmethod
    def allocate(cls, pci: PciTransport, rx_count: int, tx_count: int, rx_bufsize: int,
                 tx_bufsize: int) -> "RingMemory":
        got: list[DmaBuffer] = []
        try:
            for size in (rx_count * DESC_SIZE, tx_count * DESC_SIZE, rx_count * rx_bufsize,
                         tx_count * tx_bufsize):
                got.append(pci.dma_alloc(size, 4096))
        except BaseException:
            for b in reversed(got):
                pci.dma_free(b)
            raise
        for b in got[:2]:
            b.view[:] = bytes(len(b.view))
        return cls(*got, rx_count, tx_count, rx_bufsize, tx_bufsize)

    def matches(self, cp: E1000Checkpoint) -> bool:
        return (not self.freed and self.rx_ring.iova == cp.rx_ring_iova and self.tx_ring.iova == cp.tx_ring_iova
                and self.rx_bufs.iova == cp.rx_buf_iova and self.tx_bufs.iova == cp.tx_buf_iova
                and (self.rx_count, self.tx_count, self.rx_bufsize, self.tx_bufsize)
                == (cp.rx_count, cp.tx_count, cp.rx_bufsize, cp.tx_bufsize))

    def rx_addr(self, i: int) -> int:
        return self.rx_bufs.iova + i * self.rx_bufsize

    def tx_addr(self, i: int) -> int:
        return self.tx_bufs.iova + i * self.tx_bufsize

    def free(self, pci: PciTransport) -> None:
        if self.freed:
            return
        self.freed = True
        for b in (self.tx_bufs, self.rx_bufs, self.tx_ring, self.rx_ring):
            pci.dma_free(b)


# --- the Python datapath ------------------------------------------------------------------------------
_DESC = struct.Struct("<QQ")           # whole descriptor: address, then the upper 8 bytes
_TXD = struct.Struct("<QHBBBBH")       # address, length, CSO, CMD, status, CSS, special
_TXD_DATA = struct.Struct("<QIBBH")    # extended data: address, length|DTYP|DCMD, status, POPTS, special
_TXD_CTX = struct.Struct("<BBHBBHIBBH")  # context: IPCSS, IPCSO, IPCSE, TUCSS, TUCSO, TUCSE,
                                         # PAYLEN|DTYP|TUCMD, status, HDRLEN, MSS
_U16 = struct.Struct("<H")
_CSUM_FIELDS = struct.Struct("<HH")    # virtio-net header: csum_start, csum_offset at byte 6
_GSO_FIELDS = struct.Struct("<HH")     # virtio-net header: gso_size, csum_start at byte 4


@dataclass
class TxPiece:
    """One packet for the device: a legacy frame, or (ctx set) a context descriptor followed by
    extended data descriptors. `data` may span several buffers (TSO); `packets` is how many
    wire frames it becomes."""
    data: bytes | bytearray
    ctx: bytes | None = None
    dcmd: int = 0
    popts: int = 0
    packets: int = 1
    wire_bytes: int = 0          # 0: len(data) (TSO repeats the headers in every segment)
    tso: offload.TxPlan | None = None   # header edits for TSO, made on the DMA copy

    def descriptors(self, bufsize: int) -> int:
        return (1 if self.ctx else 0) + max(1, -(-len(self.data) // bufsize))


def context_descriptor(p: offload.TxPlan, tcp: bool) -> tuple[bytes, int, int]:
    """(context descriptor, DCMD extras, POPTS) for a plan, or ValueError if a field cannot
    hold it. Offsets are from the start of the frame; *CSE 0 = to the end of the packet."""
    if p.tso:
        lay = p.layout
        assert lay is not None
        if max(lay.l3 + 10, p.csum_at, p.hdr_len) > TX_CTX_OFFSET_MAX:
            raise ValueError("headers beyond what the context's 8-bit offsets reach")
        if not 0 < p.paylen <= TX_PAYLEN_MAX or not 0 < p.mss <= TX_MSS_MAX:
            raise ValueError("PAYLEN/MSS out of range")
        tucmd = TUCMD_TCP | TXD_CMD_TSE | TXD_CMD_DEXT
        popts = POPTS_TXSM
        if lay.ipv4:
            tucmd |= TUCMD_IP
            popts |= POPTS_IXSM
            ipcss, ipcso, ipcse = lay.l3, lay.l3 + 10, lay.l4 - 1
        else:
            ipcss, ipcso, ipcse = lay.l3, 0, 0       # IPCSS tells where the payload length is
        ctx = _TXD_CTX.pack(ipcss, ipcso, ipcse, lay.l4, p.csum_at, 0,
                            p.paylen | TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24, 0, p.hdr_len, p.mss)
        return ctx, TXD_CMD_TSE, popts
    if max(p.csum_start, p.csum_at) > TX_CTX_OFFSET_MAX:
        raise ValueError("checksum offsets beyond the context's 8-bit fields")
    tucmd = (TUCMD_TCP if tcp else 0) | TXD_CMD_DEXT
    ctx = _TXD_CTX.pack(0, 0, 0, p.csum_start, p.csum_at, 0, TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24,
                        0, 0, 0)
    return ctx, 0, POPTS_TXSM


class E1000Ring(DatapathDefaults):
    """Legacy-descriptor rings as a udrv Datapath, in Python.

    RX: N descriptors, N-1 armed (RDH == RDT means "no buffers"); the one not armed sits at
    RDT. poll() harvests DD descriptors in order, hands frames to the sink, re-arms each and
    writes RDT once per batch. TX: up to N-1 descriptors in flight; xmit() fills descriptors
    from the journal and writes TDT once per batch; poll() reclaims finished packets in order
    and confirms the journal through the last one's sequence number.

    TX packets: a plain frame is one legacy descriptor (EOP|IFCS|RS). A frame whose virtio-net
    header asks for a checksum or TSO is a context descriptor + extended data descriptors over
    as many buffers as it needs; RS (so DD) only on its last descriptor, and `tx_eop[i]` says
    where the packet of descriptor i ends. What the chip cannot do (or a ring too small for
    the packet) goes through udrv.offload's software path: finished frames, legacy
    descriptors, handed out as room frees up; the journal frame is confirmed with the last.
    """

    handles_vnet = True              # journal entries may carry a virtio-net header
    caps = Capabilities(handles_vnet=True)

    def report(self) -> DatapathReport:
        return DatapathReport(tx_offload=self.offload_counts())

    def __init__(self, driver: E1000, journal: Any, sink: FrameSink,
                 on_progress: Callable[[], None] | None = None):
        self.driver = driver
        self.journal = journal
        self.sink = sink
        self.on_progress = on_progress
        self.counters = DatapathCounters()
        self.running = False
        self.epoch = -1                   # ring_epoch of the rings this datapath armed
        self.mem: RingMemory | None = None
        self.rx_next = 0                  # next RX descriptor to harvest
        self.rx_tail = 0                  # RDT as last written
        self.tx_next = 0                  # next TX descriptor to fill (TDT as last written)
        self.tx_clean = 0                 # oldest TX descriptor not yet reclaimed
        self.tx_seq: list[int] = []       # journal seq to confirm when descriptor i completes
        self.tx_len: list[int] = []       # bytes / wire frames of the packet ending at i
        self.tx_pkts: list[int] = []
        self.tx_eop: list[int] = []       # last descriptor of the packet descriptor i belongs to
        self._pending: list[TxPiece] = []  # software pieces of journal frame _pending_seq still to hand out
        self._pending_seq = -1
        # offloads done by the chip; the rest is done in software (tests may narrow it)
        self.hw_offloads: frozenset[str] = frozenset(getattr(driver, "offloads", frozenset()))
        self.tx_offload = {"csum": 0, "tso": 0, "software": 0}    # journal frames, by how they went
        self._inline_tx = type(self)._put is E1000Ring._put          # descriptor tables are these lists
        self._rx_discard = False          # inside a frame that spans descriptors: drop to EOP
        self.idle_checks = 0

    @property
    def pci(self) -> PciTransport:
        return self.driver.pci            # looked up each time: the fault injector wraps it

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        d = self.driver
        if not d.soft.opened or d.rings is None:
            self.running = False
            return
        if self.epoch != d.ring_epoch or self.mem is not d.rings:
            self.journal.rewind()          # whatever sat in an older ring goes out again
            self._arm_fresh()              # registers were (re)programmed: heads are 0
        self.running = True

    def stop(self) -> None:
        """Stop moving frames. The ring memory belongs to the driver (freed by stop/rollback);
        frames still in the TX ring stay 'sent' in the journal and are re-issued when the
        rings are next armed."""
        self.running = False

    def detach(self, mem: RingMemory) -> None:
        """The driver is freeing `mem`: forget every view into it."""
        if self.mem is mem:
            self.mem = None
            self.running = False
            self.epoch = -1

    def reset(self) -> int:
        """After a fault (the driver's restore ran first): clean both rings, re-attach where the
        device's heads are (or from 0 when the registers were re-programmed), re-issue every
        unconfirmed journal frame. Returns the number re-issued."""
        d = self.driver
        self._rx_discard = False
        again = self.journal.rewind()
        if not d.soft.opened or d.rings is None:
            self.running = False
            return again
        if self.epoch != d.ring_epoch or self.mem is not d.rings:
            self._arm_fresh()
        else:
            self._rearm_in_place()
        self.running = True
        return again

    def _bind(self, mem: RingMemory) -> None:
        self.mem = mem
        self.n_rx, self.n_tx = mem.rx_count, mem.tx_count
        self.rx_ring, self.tx_ring = mem.rx_ring.view, mem.tx_ring.view
        self.rx_buf, self.tx_buf = mem.rx_bufs.view, mem.tx_bufs.view
        self.rx_bufsize, self.tx_bufsize = mem.rx_bufsize, mem.tx_bufsize
        self.rx_addrs = [mem.rx_addr(i) for i in range(mem.rx_count)]
        self.tx_addrs = [mem.tx_addr(i) for i in range(mem.tx_count)]
        self._reset_tx_tables()

    def _reset_tx_tables(self) -> None:
        n = self.n_tx
        self.tx_seq = [-1] * n
        self.tx_len = [0] * n
        self.tx_pkts = [0] * n
        self.tx_eop = list(range(n))
        self._pending = []                 # the journal is rewound with the ring: re-built then
        self._pending_seq = -1

    def _clean_memory(self) -> None:
        """Every RX descriptor points at its own buffer with status 0; TX descriptors zeroed."""
        ring = self.rx_ring
        for i, addr in enumerate(self.rx_addrs):
            _DESC.pack_into(ring, i * DESC_SIZE, addr, 0)
        self.tx_ring[:] = bytes(len(self.tx_ring))
        self._reset_tx_tables()

    def _arm_fresh(self) -> None:
        d = self.driver
        self._bind(d.rings)
        self._clean_memory()
        self.rx_next = self.tx_next = self.tx_clean = 0
        self.rx_tail = self.n_rx - 1
        self.epoch = d.ring_epoch
        d.wr(RDT, self.rx_tail)            # N-1 buffers to the device

    def _rearm_in_place(self) -> None:
        """Registers unchanged: keep the device's heads. TX: an idle queue (TDH == TDT) is
        taken as it is, a busy or impossible one is stopped and restarted at 0 (TCTL, not
        RCTL). RX: re-arm N-1 buffers from RDH on (one RDT write); an impossible RDH makes
        the driver re-program the rings."""
        d = self.driver
        self._clean_memory()
        tdh, tdt = d.rd(TDH), d.rd(TDT)
        if tdh < self.n_tx and tdh == tdt:
            self.tx_next = self.tx_clean = tdh
        else:
            tctl = d.rd(TCTL)
            d.wr(TCTL, tctl & ~TCTL_EN)
            d.wr(TDH, 0)
            d.wr(TDT, 0)
            d.wr(TCTL, tctl | TCTL_EN)
            self.tx_next = self.tx_clean = 0
        rdh = d.rd(RDH)
        if rdh >= self.n_rx:
            d.reprogram_rings()
            self._arm_fresh()
            return
        self.rx_next = rdh
        self.rx_tail = (rdh - 1) % self.n_rx
        d.wr(RDT, self.rx_tail)

    # --- datapath entry points --------------------------------------------------------------------
    def xmit(self) -> int:
        if not self.running:
            return 0
        start = self.tx_next
        sent = self._fill(None)
        if self.tx_next != start:
            self.pci.write32(TDT, self.tx_next)
        return sent

    def _free(self) -> int:
        return self.n_tx - 1 - ((self.tx_next - self.tx_clean) % self.n_tx)

    def _fill(self, limit: int | None) -> int:
        """Packets for up to `limit` journal frames (None: as many as fit); returns the number
        handed to the device."""
        n, bs, journal = self.n_tx, self.tx_bufsize, self.journal
        inline = self._inline_tx
        csum_hw = "csum" in self.hw_offloads
        tso_hw = "tso4" in self.hw_offloads or "tso6" in self.hw_offloads
        ring, buf, addrs = self.tx_ring, self.tx_buf, self.tx_addrs
        sent = taken = 0
        free = self._free()
        while free > 0 and (limit is None or taken < limit):
            if self._pending:
                free -= self._drain_pending(free)
                if self._pending:
                    break
                continue
            if journal.aqm_drop():           # waited too long (the framework's AQM): in order
                seq = journal.sent
                journal.mark_sent(seq)
                self._tx_drop(seq)
                taken += 1
                continue
            item = journal.peek_unsent()     # after the verdict: a CE mark is in the slot
            if item is None:
                break
            seq, vnet, frame = item
            length = len(frame)
            if inline and not vnet and ETH_HLEN <= length <= bs:
                # the common case, kept short: one legacy descriptor (EOP|IFCS|RS)
                journal.mark_sent(seq)
                i = self.tx_next
                buf[i * bs:i * bs + length] = frame
                _TXD.pack_into(ring, i * DESC_SIZE, addrs[i], length, 0, TXD_CMD, 0, 0, 0)
                self.tx_seq[i], self.tx_len[i], self.tx_pkts[i], self.tx_eop[i] = seq, length, 1, i
                self.tx_next = (i + 1) % n
                free -= 1
                taken += 1
                sent += 1
                continue
            if (inline and csum_hw and free >= 2 and vnet and not vnet[1] and vnet[0] & offload.F_NEEDS_CSUM
                    and ETH_HLEN <= length <= bs):
                start, offset = _CSUM_FIELDS.unpack_from(vnet, 6)
                at = start + offset
                if at <= TX_CTX_OFFSET_MAX and start < length and at + 2 <= length:
                    # checksum offload, kept short too: a context descriptor + one data descriptor
                    journal.mark_sent(seq)
                    i = self.tx_next
                    j = (i + 1) % n
                    tucmd = (TUCMD_TCP if offset == 16 else 0) | TXD_CMD_DEXT
                    _TXD_CTX.pack_into(ring, i * DESC_SIZE, 0, 0, 0, start, at, 0,
                                       TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24, 0, 0, 0)
                    buf[j * bs:j * bs + length] = frame
                    _TXD_DATA.pack_into(ring, j * DESC_SIZE, addrs[j], length | TXD_DTYP_DATA << TXD_DTYP_SHIFT
                                        | (TXD_CMD | TXD_CMD_DEXT) << 24, 0, POPTS_TXSM, 0)
                    self.tx_eop[i] = self.tx_eop[j] = j
                    self.tx_seq[j], self.tx_len[j], self.tx_pkts[j] = seq, length, 1
                    self.tx_next = (j + 1) % n
                    self.tx_offload["csum"] += 1
                    free -= 2
                    taken += 1
                    sent += 1
                    continue
            if inline and tso_hw and vnet and vnet[1] in (1, 4) and vnet[0] & offload.F_NEEDS_CSUM:
                used = self._put_tso_inline(seq, vnet, frame, free)
                if used < 0:
                    break
                if used:
                    free -= used
                    taken += 1
                    sent += 1
                    continue
            pieces = self._pieces(vnet, frame)
            if pieces is not None and max(p.descriptors(bs) for p in pieces) > n - 1:
                # a packet larger than the whole ring (TSO on a small ring): software pieces
                pieces = self._software(vnet, frame)
            if pieces is None:              # cannot go on the wire: counted, confirmed in order
                journal.mark_sent(seq)
                self._tx_drop(seq)
                taken += 1
                continue
            need = sum(p.descriptors(bs) for p in pieces)
            if need > free and need <= n - 1:
                break                       # it fits once the ring drains
            journal.mark_sent(seq)
            taken += 1
            sent += 1
            if need > free:
                # more pieces than the ring holds at once: handed out as room frees up
                self._pending, self._pending_seq = pieces, seq
                continue
            last = len(pieces) - 1
            for i, p in enumerate(pieces):
                self._put(p, seq if i == last else -1)
            free -= need
        return sent

    def offload_counts(self) -> dict[str, int]:
        """Journal frames by how their offload request went: chip checksum, chip TSO, software."""
        return dict(self.tx_offload)

    def _put_tso_inline(self, seq: int, vnet: bytes, frame: bytes, free: int) -> int:
        """TSO for the plain case (untagged IPv4 or IPv6 without extension headers, TCP where
        csum_start says): context + data descriptors without building a plan. Returns the
        descriptors used, 0 to leave the frame to the general path (_pieces)."""
        gso_size, start = _GSO_FIELDS.unpack_from(vnet, 4)
        length, bs, n = len(frame), self.tx_bufsize, self.n_tx
        v4 = vnet[1] == 1
        if frame[12:14] != (b"\x08\x00" if v4 else b"\x86\xdd") or not gso_size or length < 54:
            return 0
        if v4:
            if frame[14] >> 4 != 4 or frame[23] != 6 or start != 14 + (frame[14] & 0xF) * 4:
                return 0
        elif frame[14] >> 4 != 6 or frame[20] != 6 or start != 54:
            return 0
        hdr_len = start + (frame[start + 12] >> 4) * 4 if start + 20 <= length else 0
        need = 1 + -(-length // bs)
        if not start + 20 <= hdr_len < length or hdr_len > TX_CTX_OFFSET_MAX or need > n - 1 \
                or ("tso4" if v4 else "tso6") not in self.hw_offloads or length - hdr_len > TX_PAYLEN_MAX:
            return 0
        if need > free:
            return -1                          # it fits once the ring drains
        self.journal.mark_sent(seq)
        ring, buf, addrs, eop = self.tx_ring, self.tx_buf, self.tx_addrs, self.tx_eop
        first = i = self.tx_next
        tucmd = TUCMD_TCP | TXD_CMD_TSE | TXD_CMD_DEXT | (TUCMD_IP if v4 else 0)
        paylen = length - hdr_len
        _TXD_CTX.pack_into(ring, i * DESC_SIZE, 14, 24 if v4 else 0, start - 1 if v4 else 0, start, start + 16, 0,
                           paylen | TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24, 0, hdr_len, gso_size)
        i = (i + 1) % n
        data = memoryview(frame)
        h = i * bs
        buf[h:h + min(bs, length)] = data[:bs]
        # the edits a TSO engine expects, on the DMA copy (udrv.offload.tso_prepare)
        if v4:
            buf[h + 24:h + 26] = b"\0\0"
            seed = offload.fold_add(offload.ones_sum(data[26:34]), 6)
        else:
            seed = offload.fold_add(offload.ones_sum(data[22:54]), 6)
        buf[h + start + 16:h + start + 18] = seed.to_bytes(2, "big")
        dcmd = TXD_CMD_IFCS | TXD_CMD_DEXT | TXD_CMD_TSE
        popts = POPTS_TXSM | (POPTS_IXSM if v4 else 0)
        last = (first + need - 1) % n
        off = 0
        while True:
            chunk = min(bs, length - off)
            if off:
                buf[i * bs:i * bs + chunk] = data[off:off + chunk]
            off += chunk
            cmd = dcmd | (TXD_CMD_EOP | TXD_CMD_RS if i == last else 0)
            _TXD_DATA.pack_into(ring, i * DESC_SIZE, addrs[i], chunk | TXD_DTYP_DATA << TXD_DTYP_SHIFT | cmd << 24,
                                0, popts, 0)
            if i == last:
                break
            i = (i + 1) % n
        k = first
        while True:
            eop[k] = last
            if k == last:
                break
            k = (k + 1) % n
        segs = max(1, -(-paylen // gso_size))
        self.tx_seq[i], self.tx_len[i], self.tx_pkts[i] = seq, length + (segs - 1) * hdr_len, segs
        self.tx_next = (i + 1) % n
        self.tx_offload["tso"] += 1
        return need

    def _drain_pending(self, free: int) -> int:
        used = 0
        bs = self.tx_bufsize
        while self._pending and self._pending[0].descriptors(bs) <= free - used:
            p = self._pending.pop(0)
            used += p.descriptors(bs)
            self._put(p, self._pending_seq if not self._pending else -1)
        return used

    def _tx_drop(self, seq: int) -> None:
        """A journal frame that will never reach the wire leaves in order: now if nothing is in
        flight, else with the packet before it."""
        if self.tx_next == self.tx_clean:
            self.journal.confirm_through(seq)
        else:
            self.tx_seq[(self.tx_next - 1) % self.n_tx] = seq

    def _tx_error(self, reason: str) -> None:
        self.counters.tx_error(reason)

    def _pieces(self, vnet: bytes, frame: bytes) -> list[TxPiece] | None:
        """What the device gets for one journal frame (None: it cannot be sent, counted)."""
        if not vnet:
            if len(frame) < ETH_HLEN or len(frame) > self.tx_bufsize:
                self._tx_error("runt" if len(frame) < ETH_HLEN else "oversize")
                return None
            return [TxPiece(frame)]
        try:
            hdr = offload.VnetHdr.parse(vnet)
            p = offload.plan(hdr, frame)
        except offload.OffloadError:
            self._tx_error("bad_offload")
            return None
        if p is None:
            return self._pieces(b"", frame)
        if p.need in self.hw_offloads:
            try:
                ctx, dcmd, popts = context_descriptor(p, tcp=hdr.csum_offset == 16)
            except ValueError:
                return self._software(vnet, frame)
            if p.tso:
                segs = max(1, -(-p.paylen // p.mss))
                self.tx_offload["tso"] += 1
                return [TxPiece(frame, ctx, dcmd, popts, segs, len(frame) + (segs - 1) * p.hdr_len, p)]
            if len(frame) > self.tx_bufsize:
                self._tx_error("oversize")
                return None
            self.tx_offload["csum"] += 1
            return [TxPiece(frame, ctx, dcmd, popts)]
        return self._software(vnet, frame)

    def _software(self, vnet: bytes, frame: bytes) -> list[TxPiece] | None:
        """udrv.offload does what the chip would: finished frames on legacy descriptors."""
        try:
            frames = offload.resolve(offload.VnetHdr.parse(vnet), frame)
        except offload.OffloadError:
            self._tx_error("bad_offload")
            return None
        self.tx_offload["software"] += 1
        if any(len(f) > self.tx_bufsize for f in frames):
            self._tx_error("oversize")
            return None
        return [TxPiece(f) for f in frames]

    def _put(self, p: TxPiece, seq: int) -> None:
        """Descriptors for one packet from tx_next on; RS on the last one only."""
        n, bs, ring, buf, addrs = self.n_tx, self.tx_bufsize, self.tx_ring, self.tx_buf, self.tx_addrs
        i = first = self.tx_next
        if p.ctx is not None:
            ring[i * DESC_SIZE:(i + 1) * DESC_SIZE] = p.ctx
            i = (i + 1) % n
        data, total = memoryview(p.data), len(p.data)
        nbuf = max(1, -(-total // bs))
        last = (i + nbuf - 1) % n
        if p.tso is not None:
            # the TSO edits go to the DMA copy of the headers (the first buffer holds them all:
            # HDRLEN is at most 255); the journal keeps the frame as the host sent it
            h = i * bs
            buf[h:h + p.tso.hdr_len] = data[:p.tso.hdr_len]
            offload.tso_prepare(buf[h:h + p.tso.hdr_len], p.tso)
        off = 0
        for k in range(nbuf):
            chunk = min(bs, total - off)
            if off or p.tso is None:
                buf[i * bs:i * bs + chunk] = data[off:off + chunk]
            else:
                head = p.tso.hdr_len
                buf[i * bs + head:i * bs + chunk] = data[head:chunk]
            cmd = TXD_CMD_IFCS | (TXD_CMD_EOP | TXD_CMD_RS if k == nbuf - 1 else 0)
            if p.ctx is None:
                _TXD.pack_into(ring, i * DESC_SIZE, addrs[i], chunk, 0, cmd, 0, 0, 0)
            else:
                _TXD_DATA.pack_into(ring, i * DESC_SIZE, addrs[i],
                                    chunk | TXD_DTYP_DATA << TXD_DTYP_SHIFT | (cmd | TXD_CMD_DEXT | p.dcmd) << 24,
                                    0, p.popts, 0)
            off += chunk
            i = (i + 1) % n
        eop = self.tx_eop
        k = first
        while True:
            eop[k] = last
            if k == last:
                break
            k = (k + 1) % n
        self.tx_seq[last] = seq
        self.tx_len[last] = p.wire_bytes or total
        self.tx_pkts[last] = p.packets
        self.tx_next = i

    def poll(self, timeout: float = 0.0) -> int:
        if not self.running:
            return 0
        work = self._rx_harvest() + self._tx_reclaim()
        if work:
            return work
        self._idle_check()
        if timeout > 0:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                time.sleep(min(0.0002, timeout))
                work = self._rx_harvest() + self._tx_reclaim()
                if work:
                    return work
        return 0

    def reclaim(self) -> int:
        """TX completions only (stop() uses it so frames already sent are not re-issued)."""
        if self.mem is None or self.epoch != self.driver.ring_epoch:
            return 0
        return self._tx_reclaim()

    def _rx_harvest(self) -> int:
        ring, n = self.rx_ring, self.n_rx
        i = self.rx_next
        got = 0
        limit = n - 1                       # never more than the buffers we armed
        harvested = 0
        counters, sink, bufview, bs, addrs = self.counters, self.sink, self.rx_buf, self.rx_bufsize, self.rx_addrs
        while harvested < limit:
            off = i * DESC_SIZE
            status = ring[off + 12]
            if not status & RXD_STAT_DD:
                break
            length = _U16.unpack_from(ring, off + 8)[0]
            errors = ring[off + 13]
            if self._rx_discard:
                if status & RXD_STAT_EOP:
                    self._rx_discard = False
            elif not status & RXD_STAT_EOP:
                counters.drop("no_eop")          # longer than our buffer: drop through EOP
                self._rx_discard = True
            elif length == 0:
                counters.drop("zero_length")
            elif length > bs:
                counters.drop("oversize")
            elif errors & RXD_ERR_FRAME:
                counters.drop("rx_error")
            elif length < ETH_HLEN:
                counters.drop("runt")
            else:
                base = i * bs
                frame = bytes(bufview[base:base + length])
                counters.rx_packets += 1
                counters.rx_bytes += length
                sink(frame)
                got += 1
            _DESC.pack_into(ring, off, addrs[i], 0)      # re-arm: our own buffer, status 0
            i = (i + 1) % n
            harvested += 1
        # the descriptor at RDT was never handed out: DD there is a device bug
        hole = self.rx_tail
        if ring[hole * DESC_SIZE + 12] & RXD_STAT_DD:
            counters.drop("dd_not_armed")
            _DESC.pack_into(ring, hole * DESC_SIZE, addrs[hole], 0)
        if harvested:
            self.rx_next = i
            self.rx_tail = (i - 1) % n
            self.pci.write32(RDT, self.rx_tail)
            if got and self.on_progress:
                self.on_progress()
        return harvested

    def _tx_reclaim(self) -> int:
        i, end = self.tx_clean, self.tx_next
        if i == end:
            return 0
        ring, n, seqs, lens, pkts, eop = self.tx_ring, self.n_tx, self.tx_seq, self.tx_len, self.tx_pkts, self.tx_eop
        last = -1
        done = 0
        nbytes = 0
        while i != end:
            e = eop[i]                     # the packet's last descriptor: the one with RS
            off = e * DESC_SIZE + 12
            status = ring[off]
            if not status & TXD_STAT_DD:
                break
            ring[off] = 0                  # so a stale DD is never mistaken for a new one
            if status & (TXD_STAT_EC | TXD_STAT_LC):
                self.counters.tx_error("excess_collisions" if status & TXD_STAT_EC else "late_collision")
            else:
                done += pkts[e]
                nbytes += lens[e]
            if seqs[e] >= 0:
                last = seqs[e]
            i = (e + 1) % n
        if i == self.tx_clean:
            return 0
        return self._tx_complete(i, last, done, nbytes)

    def _tx_complete(self, i: int, last: int, done: int, nbytes: int) -> int:
        reclaimed = (i - self.tx_clean) % self.n_tx
        self.tx_clean = i
        if last >= 0:                      # -1: only pieces of a frame still being handed out
            self.journal.confirm_through(last)
        self.counters.tx_packets += done
        self.counters.tx_bytes += nbytes
        if self.on_progress:
            self.on_progress()
        return reclaimed

    def _idle_check(self) -> None:
        """Nothing moved. One MMIO read (RDH; TDH too while TX is outstanding) tells a removed
        device (all ones) or a head the device could never legally hold from a quiet one.
        It also un-sticks a ring whose head descriptor lost its DD write-back: descriptors
        complete in order, so a DD further on proves the ones before it done."""
        self.idle_checks += 1
        d, pci = self.driver, self.pci
        rdh = pci.read32(RDH)
        if rdh == ALL_ONES:
            d.rd(STATUS)                    # raises DeviceGone if STATUS agrees
        if rdh >= self.n_rx:
            raise DriverFault("poll", "device", f"RDH {rdh} is beyond the {self.n_rx}-descriptor RX ring")
        if rdh != self.rx_next:
            self._rx_skip_lost(rdh)
        self._tx_check_unarmed()
        if self.tx_clean != self.tx_next:
            tdh = pci.read32(TDH)
            if tdh >= self.n_tx:
                if tdh == ALL_ONES:
                    d.rd(STATUS)
                raise DriverFault("poll", "device", f"TDH {tdh} is beyond the {self.n_tx}-descriptor TX ring")
            self._tx_skip_lost()

    def _tx_check_unarmed(self) -> None:
        tx_ring = self.tx_ring
        past = self.tx_next * DESC_SIZE + 12
        if tx_ring[past] & TXD_STAT_DD:      # past TDT: never handed to the device
            self.counters.tx_error("dd_not_armed")
            tx_ring[past] = 0

    def _rx_skip_lost(self, rdh: int) -> None:
        ring, n = self.rx_ring, self.n_rx
        i = self.rx_next
        span = (rdh - i) % n
        j = next((k for k in range(span) if ring[((i + k) % n) * DESC_SIZE + 12] & RXD_STAT_DD), None)
        if j is None:
            return                          # write-back still pending (real hardware): wait
        for k in range(j):
            idx = (i + k) % n
            self.counters.drop("completion_lost")
            _DESC.pack_into(ring, idx * DESC_SIZE, self.rx_addrs[idx], 0)
        self.rx_next = (i + j) % n
        self.rx_tail = (self.rx_next - 1) % n
        self.pci.write32(RDT, self.rx_tail)

    def _tx_skip_lost(self) -> None:
        ring, n, eop = self.tx_ring, self.n_tx, self.tx_eop
        i, end = self.tx_clean, self.tx_next
        last_dd = None
        k = i
        while k != end:
            e = eop[k]
            if ring[e * DESC_SIZE + 12] & TXD_STAT_DD:
                last_dd = e
            k = (e + 1) % n
        if last_dd is None:
            return
        stop = (last_dd + 1) % n
        done = nbytes = 0
        last = -1
        k = i
        while k != stop:
            e = eop[k]
            if not ring[e * DESC_SIZE + 12] & TXD_STAT_DD:
                self.counters.tx_error("completion_lost")
            done += self.tx_pkts[e]
            nbytes += self.tx_len[e]
            if self.tx_seq[e] >= 0:
                last = self.tx_seq[e]
            ring[e * DESC_SIZE + 12] = 0
            k = (e + 1) % n
        self._tx_complete(stop, last, done, nbytes)

    # --- consistency (checked after configuration calls) ------------------------------------------
    def check(self) -> list[str]:
        broken: list[str] = []
        if self.mem is None:
            return broken if not self.running else ["datapath running without rings"]
        for what, idx, n in (("rx_next", self.rx_next, self.n_rx), ("rx_tail", self.rx_tail, self.n_rx),
                             ("tx_next", self.tx_next, self.n_tx), ("tx_clean", self.tx_clean, self.n_tx)):
            if not 0 <= idx < n:
                broken.append(f"{what} {idx} outside the {n}-descriptor ring")
        if self.running:
            lo, hi = self.mem.rx_bufs.iova, self.mem.rx_bufs.iova + self.n_rx * self.rx_bufsize
            for i in range(self.n_rx):
                addr = _DESC.unpack_from(self.rx_ring, i * DESC_SIZE)[0]
                if addr != self.rx_addrs[i] or not lo <= addr < hi:
                    broken.append(f"RX descriptor {i} points at {addr:#x}, not at its buffer")
                    break
        return broken


E1000.datapath_cls = E1000Ring


# --- the C datapath -----------------------------------------------------------------------------------
_RX_REASONS = ("no_eop", "zero_length", "oversize", "rx_error", "runt", "dd_not_armed", "completion_lost")
_TX_REASONS = ("runt", "oversize", "excess_collisions", "late_collision", "completion_lost", "dd_not_armed")


def tap_fd_of(sink: Any) -> int | None:
    """The fd behind a sink that is a TAP's bound `write` (what the daemon passes): the C ring
    then writes RX frames to it itself, without calling Python per frame."""
    owner = getattr(sink, "__self__", None)
    if getattr(sink, "__name__", "") == "write" and owner is not None and hasattr(owner, "fileno"):
        try:
            fd = owner.fileno()
        except (OSError, ValueError):
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None
    return None


class E1000NativeRing(E1000Ring):
    """E1000Ring with the per-frame work in C (native/e1000_ring.c): RX harvest (frames go
    straight to the TAP fd with write(), or in batches to the Python sink), TX fill from the
    journal's memory, TX reclaim. The C functions touch memory only and return the new tail;
    this class does the one MMIO write per batch, so it runs on the model and on VFIO alike.
    Lifecycle, resets and checks are the Python ring's (same rings, same indices).

    Where C can reach BAR0 itself (VFIO: `pci.mmio_region()`), run() goes further: the whole
    turn (harvest, reclaim, TAP read, fill and the RDT/TDT writes) loops in C
    (native/e1000_loop.c) for up to a timeout, sleeping between empty turns, and comes back to
    Python only for what Python decides (a frame C cannot finish, a head register out of range,
    a journal error). On the in-process model the daemon's Python loop calls poll() instead.

    With a TAP fd the ring also reads the TAP (native/tapread.c, Nic.enqueue's rules) at the
    start of xmit(), so the runtime must not (`owns_tap`); the few frames only udrv.offload can
    judge go back to `tap_enqueue` (Nic.enqueue). Counts: tap_stats(), merged by Nic.status()."""

    OUT_CAP = 256 * 1024         # sink mode: frames handed back per C call
    # TCP segments harvested together go to a vnet-header TAP as one GSO frame (native/gro.c)
    coalesce_rx = True

    def __init__(self, driver: E1000, journal: Any, sink: FrameSink,
                 on_progress: Callable[[], None] | None = None, tap_fd: int | None = None):
        from udrv import native
        native.require()
        ffi, lib = native.ffi, native.lib
        self._ffi, self._lib = ffi, lib
        r = ffi.new("struct e1000_ring *")
        fd = tap_fd if tap_fd is not None else tap_fd_of(sink)
        r.tap_fd = -1 if fd is None else fd
        # a TAP with virtio-net headers needs one in front of every frame C writes to it
        r.tap_vnet_hdr = getattr(getattr(sink, "__self__", None), "vnet_hdr_len", 0) if fd is not None else 0
        if lib.e1000_ring_init(r, journal.fd, journal.nslots, journal.slot_size) < 0:
            raise E1000Error("the C ring cannot map the TX journal memory: its layout does not match")
        r.rx_coalesce = int(self.coalesce_rx and native.rx_coalesce_allowed(r.tap_vnet_hdr))
        self._r = r
        self._jptr = ffi.addressof(r, "journal")
        import weakref
        self._fini = weakref.finalize(self, lib.e1000_ring_fini, r)
        self._out = ffi.new("uint8_t[]", self.OUT_CAP)
        self._used = ffi.new("uint32_t *")
        self._py_counters = DatapathCounters()
        # TAP -> journal in C (native/tapread.c): with a TAP fd the ring reads the TAP itself at
        # the start of xmit(), so the runtime must not (owns_tap); frames C leaves to Python
        # (offload requests only udrv.offload can judge) go to `tap_enqueue` (Nic.enqueue)
        self._tr = None
        self.owns_tap = False
        self.tap_enqueue: Callable[[list[bytes]], int] | None = None
        self._handoff = native.TapHandoff()     # frames only Python finishes; TAP-side counts
        self._mmio: Any = None                  # struct e1000_mmio, opened by run() on first use
        self._mmio_key: tuple[int, int, int] | None = None
        self._loop = ffi.new("struct e1000_loop_result *")
        if fd is not None:
            tr = ffi.new("struct udrv_tapread *")
            mtu = getattr(getattr(driver, "soft", None), "mtu", 1500)
            if lib.udrv_tapread_init(tr, fd, r.tap_vnet_hdr, mtu + 18) < 0:
                raise E1000Error(f"the C ring cannot read the TAP fd {fd}: not an open descriptor")
            self._tr = tr
            self.owns_tap = True
        super().__init__(driver, journal, sink, on_progress)
        self.caps = Capabilities(reads_tap=self.owns_tap, pulls_tap=self.owns_tap, runs_turns=self.can_run,
                                 handles_vnet=True)

    def set_tap_fallback(self, enqueue: Callable[[list[bytes]], int]) -> None:
        self.tap_enqueue = enqueue

    def tap_counts(self) -> TapCounts:
        t = self.tap_stats()
        return TapCounts(t["tap_frames_in"], t["offload_frames"], dict(t["tx_dropped"]))

    def report(self) -> DatapathReport:
        return DatapathReport(c_loop=self.loop_counts(), rx_coalesce=self.rx_coalesce_counts(),
                              tx_offload=self.offload_counts())

    # ring indices live in the C struct
    rx_next = property(lambda self: self._r.rx_next, lambda self, v: setattr(self._r, "rx_next", v))
    rx_tail = property(lambda self: self._r.rx_tail, lambda self, v: setattr(self._r, "rx_tail", v))
    tx_next = property(lambda self: self._r.tx_next, lambda self, v: setattr(self._r, "tx_next", v))
    tx_clean = property(lambda self: self._r.tx_clean, lambda self, v: setattr(self._r, "tx_clean", v))

    @property
    def writes_tap(self) -> bool:
        return self._r.tap_fd >= 0

    @property
    def hw_offloads(self) -> frozenset[str]:
        return self._hw

    @hw_offloads.setter
    def hw_offloads(self, value: frozenset[str]) -> None:
        self._hw = frozenset(value)
        lib = self._lib
        self._r.hw_offloads = ((lib.E1000R_OFF_CSUM if "csum" in self._hw else 0)
                               | (lib.E1000R_OFF_TSO4 if "tso4" in self._hw else 0)
                               | (lib.E1000R_OFF_TSO6 if "tso6" in self._hw else 0))

    def offload_counts(self) -> dict[str, int]:
        st = self._r.st
        return {"csum": st.tx_offload_csum + self.tx_offload["csum"],
                "tso": st.tx_offload_tso + self.tx_offload["tso"], "software": self.tx_offload["software"]}

    def rx_coalesce_counts(self) -> dict[str, int]:
        """RX coalescing: on/off, segments written inside super-frames, super-frames, frames
        left alone for a wrong checksum, super-frames the TAP refused."""
        r, st = self._r, self._r.st
        return {"on": int(r.rx_coalesce), "segments": st.rx_coalesced, "super_frames": st.rx_super,
                "bad_checksum": st.rx_csum_bad, "refused": st.rx_super_refused,
                "acks_merged": st.rx_acks_merged}

    @property
    def counters(self) -> DatapathCounters:
        st, py = self._r.st, self._py_counters
        c = DatapathCounters(rx_packets=st.rx_packets + py.rx_packets, rx_bytes=st.rx_bytes + py.rx_bytes,
                             tx_packets=st.tx_packets + py.tx_packets, tx_bytes=st.tx_bytes + py.tx_bytes,
                             rx_dropped=dict(py.rx_dropped), tx_errors=dict(py.tx_errors))
        for code, name in enumerate(_RX_REASONS):
            if st.rx_dropped[code]:
                c.rx_dropped[name] = c.rx_dropped.get(name, 0) + st.rx_dropped[code]
        for code, name in enumerate(_TX_REASONS):
            if st.tx_errors[code]:
                c.tx_errors[name] = c.tx_errors.get(name, 0) + st.tx_errors[code]
        if st.tap_write_errors:
            c.tx_errors["tap_write"] = st.tap_write_errors
        return c

    @counters.setter
    def counters(self, value: DatapathCounters) -> None:
        self._py_counters = value

    # --- memory -------------------------------------------------------------------------------------
    def _bind(self, mem: RingMemory) -> None:
        super()._bind(mem)
        r, ffi = self._r, self._ffi
        # raw addresses, not buffer exports: dma_free must be able to release the views
        r.rx_ring = ffi.cast("uint8_t *", mem.rx_ring.vaddr)
        r.tx_ring = ffi.cast("uint8_t *", mem.tx_ring.vaddr)
        r.rx_buf = ffi.cast("uint8_t *", mem.rx_bufs.vaddr)
        r.tx_buf = ffi.cast("uint8_t *", mem.tx_bufs.vaddr)
        r.rx_buf_iova, r.tx_buf_iova = mem.rx_bufs.iova, mem.tx_bufs.iova
        r.n_rx, r.n_tx, r.rx_bufsize, r.tx_bufsize = mem.rx_count, mem.tx_count, mem.rx_bufsize, mem.tx_bufsize
        if self._lib.e1000_ring_bind(r) < 0:
            raise E1000Error("the C ring refused the ring geometry (descriptor counts must be multiples of 8)")

    def detach(self, mem: RingMemory) -> None:
        if self.mem is mem:
            r, null = self._r, self._ffi.NULL
            r.rx_ring = r.tx_ring = r.rx_buf = r.tx_buf = null
        super().detach(mem)

    def _clean_memory(self) -> None:
        self._lib.e1000_ring_clean(self._r)
        self._pending, self._pending_seq = [], -1

    def _reset_tx_tables(self) -> None:
        self._pending, self._pending_seq = [], -1      # the tables themselves live in C

    def close(self) -> None:
        self.running = False
        self._close_mmio()
        if self._tr is not None:
            self._tap_closed = self.tap_stats()     # the counts survive; the TAP is no longer read
            self._tr = None
            self.owns_tap = False                   # by us: until a new ring exists, the runtime reads it
        self._fini()

    # --- TAP -> journal -------------------------------------------------------------------------------
    def pull_tap(self, budget: int | None = None) -> int:
        """Read up to `budget` frames (default tap_budget) from the TAP into the journal (C, GIL
        released); stops when the TAP is empty or the journal full (frames stay queued in the
        kernel). Returns frames journaled."""
        tr = self._tr
        if tr is None:
            return 0
        left = self.tap_budget if budget is None else budget
        lib, j, total = self._lib, self._jptr, 0
        while left > 0:
            tr.mtu_max = self.driver.soft.mtu + 18      # + Ethernet header + a VLAN tag
            n = lib.udrv_tapread_to_journal(tr, j, left)
            total += n
            left -= n
            if not tr.deferred_len:
                break
            raw = self._ffi.buffer(tr.deferred, tr.deferred_len)[:]
            tr.deferred_len = 0
            left -= 1
            self.journal.sync()
            total += self._handoff.hand(self.tap_enqueue, raw)
        if total:
            self.journal.sync()
        return total

    tap_budget = 64

    def tap_stats(self) -> dict[str, Any]:
        """What C counted on the TAP side (Nic.enqueue counts the same in Python mode); deferred
        frames are counted by whoever took them (Nic.enqueue)."""
        if self._tr is None:
            return getattr(self, "_tap_closed", None) or {"tap_frames_in": 0, "offload_frames": 0,
                                                          "tap_read_errors": 0, "tx_dropped": {}}
        st = self._tr.st
        return self._handoff.stats(st.frames_in, st.offload_frames, st.read_errors, st.deferred, st.oversize,
                                   st.short_vnet_header, st.bad_offload_request, tap_journal_full=st.journal_full)

    # --- hot paths ------------------------------------------------------------------------------------
    def xmit(self) -> int:
        if self._tr is not None:
            self.pull_tap()
        if not self.running:
            return 0
        r, lib, journal = self._r, self._lib, self.journal
        start = r.tx_next
        sent = 0
        while True:
            if self._pending:
                self._drain_pending(self._free())
                if self._pending:
                    break
            n = lib.e1000_tx_fill(r)
            journal.sync()
            if n < 0:
                raise UdrvError("the TX journal refused an operation from the C ring: journal corrupted")
            sent += n
            if not r.python_entry:
                break
            # a frame C leaves to Python (software offload, odd headers, larger than the ring)
            before = journal.sent
            sent += self._fill(1)
            journal.sync()
            if journal.sent == before:
                break                       # waiting for room
        if r.tx_next != start:
            self.pci.write32(TDT, r.tx_next)
        return sent

    def _put(self, p: TxPiece, seq: int) -> None:
        ffi = self._ffi
        ctx = ffi.from_buffer("uint8_t[]", p.ctx) if p.ctx is not None else ffi.NULL
        raw = p.data
        if p.tso is not None:                  # rare here (C takes TSO itself): edit a copy
            raw = bytearray(raw)
            offload.tso_prepare(raw, p.tso)
        data = ffi.from_buffer("uint8_t[]", raw)
        if not self._lib.e1000_tx_put(self._r, ctx, data, len(p.data), p.dcmd, p.popts, p.packets,
                                      p.wire_bytes or len(p.data), seq):
            raise DriverFault("xmit", "invariant", "no TX descriptors for a packet that was checked to fit")

    def _tx_error(self, reason: str) -> None:
        self._py_counters.tx_error(reason)        # `counters` is a fresh merge of C and Python

    def _tx_drop(self, seq: int) -> None:
        if self._lib.e1000_tx_drop(self._r, seq) < 0:
            raise UdrvError("the TX journal refused a confirmation from the C ring: journal corrupted")

    def _rx_harvest(self) -> int:
        r, lib = self._r, self._lib
        before = r.st.rx_packets
        if r.tap_fd >= 0:
            total = lib.e1000_rx_harvest(r, 0, self._ffi.NULL, 0, self._used)
        else:
            total = 0
            out, used, sink = self._out, self._used, self.sink
            while True:
                n = lib.e1000_rx_harvest(r, 0, out, self.OUT_CAP, used)
                total += n
                buf = self._ffi.buffer(out, used[0])[:]
                pos, end = 0, len(buf)
                while pos < end:
                    length = int.from_bytes(buf[pos:pos + 4], "little")
                    sink(buf[pos + 4:pos + 4 + length])
                    pos += 4 + length
                if n == 0 or total >= self.n_rx - 1:
                    break
        if total:
            self.pci.write32(RDT, r.rx_tail)
            if r.st.rx_packets != before and self.on_progress:
                self.on_progress()
        return total

    def _tx_reclaim(self) -> int:
        n = self._lib.e1000_tx_reclaim(self._r)
        return self._after_tx(n)

    # --- the loop in C (native/e1000_loop.c) ------------------------------------------------------
    poll_interval = 0.001        # an empty turn sleeps this long: the device offers no event fd
    # a turn that caught up is followed by the next this long after it began (interrupt
    # moderation: see native/e1000_loop.h)
    turn_gap = float(os.environ.get("UDRV_TURN_GAP_US", "1000")) / 1e6

    def _region(self) -> Any:
        f = getattr(self.pci, "mmio_region", None)
        return f() if f is not None else None

    @property
    def can_run(self) -> bool:
        """run() needs C to reach BAR0 (VFIO); on a model the daemon's Python loop polls.
        UDRV_E1000_LOOP=0 in the environment keeps the Python loop (to compare)."""
        return (self._tr is not None and self._r.tap_fd >= 0 and self._region() is not None
                and os.environ.get("UDRV_E1000_LOOP", "1") != "0")

    def _mmio_for(self, region: Any) -> Any:
        key = (region.fd, region.offset, region.size)
        if self._mmio_key != key:           # first use, or the transport was reopened
            self._close_mmio()
            m = self._ffi.new("struct e1000_mmio *")
            if self._lib.e1000_mmio_open(m, region.fd, region.offset, region.size, int(region.mappable)) < 0:
                raise E1000Error(f"BAR0 is {region.size} bytes: too small for the e1000's ring registers")
            self._mmio, self._mmio_key = m, key
        return self._mmio

    def _close_mmio(self) -> None:
        if self._mmio is not None:
            self._lib.e1000_mmio_close(self._mmio)
        self._mmio, self._mmio_key = None, None

    def loop_counts(self) -> dict[str, int]:
        """The C loop's turns, sleeps and what moved in them (all runs of this ring)."""
        lp = self._loop
        return {"turns": lp.turns, "sleeps": lp.sleeps, "rx": lp.rx, "reclaimed": lp.reclaimed,
                "tap_in": lp.tap_in, "filled": lp.filled, "idle_checks": lp.idle_checks}

    def run(self, timeout: float, wake_fd: int = -1) -> int:
        """Turns in C for up to timeout seconds (see the class notes); back early when wake_fd is
        readable or Python must act. A frame C left to Python waits for the caller's next
        xmit() (the daemon calls it after every run). Returns frames and completions moved."""
        region = self._region() if self.running else None
        if region is None or self._tr is None:
            return self.poll(timeout)       # closed transport or no TAP: Python's own turn
        m = self._mmio_for(region)
        r, lib, lp = self._r, self._lib, self._loop
        self._tr.mtu_max = self.driver.soft.mtu + 18
        before = lp.rx + lp.reclaimed + lp.filled + lp.tap_in
        checks = lp.idle_checks
        flags = lib.E1000L_YIELD | (0 if self._pending else lib.E1000L_TX)
        rc = lib.e1000_ring_run(r, self._tr, m, wake_fd, max(0, int(timeout * 1e6)),
                                int(self.poll_interval * 1e6), self.tap_budget, int(self.turn_gap * 1e6), flags, lp)
        self.journal.sync()
        self.idle_checks += lp.idle_checks - checks
        if rc & lib.E1000L_EJOURNAL:
            raise UdrvError("the TX journal refused an operation from the C ring: journal corrupted")
        if rc & lib.E1000L_MMIO_ERROR:
            m.errors = 0
            self.driver.rd(STATUS)              # DeviceGone if the device is; else say what failed
            raise DriverFault("poll", "device", "a register access through the VFIO device fd failed")
        if rc & lib.E1000L_CHECK:
            self._idle_check()                  # raises what Python's checks raise
        if rc & lib.E1000L_WORK and self.on_progress:
            self.on_progress()
        return lp.rx + lp.reclaimed + lp.filled + lp.tap_in - before

    def _after_tx(self, n: int) -> int:
        self.journal.sync()
        if n < 0:
            raise UdrvError("the TX journal refused a confirmation from the C ring: journal corrupted")
        if n and self.on_progress:
            self.on_progress()
        return n

    def _rx_skip_lost(self, rdh: int) -> None:
        if self._lib.e1000_rx_skip_lost(self._r, rdh) > 0:
            self.pci.write32(RDT, self._r.rx_tail)

    def _tx_skip_lost(self) -> None:
        self._after_tx(self._lib.e1000_tx_skip_lost(self._r))

    def _tx_check_unarmed(self) -> None:
        self._lib.e1000_tx_check_unarmed(self._r)


class E1000Native(E1000):
    """The e1000 driver with the C ring (same device code; the datapath implementation differs)."""
    datapath_cls = E1000NativeRing
    fast_path = True


DRIVER = E1000

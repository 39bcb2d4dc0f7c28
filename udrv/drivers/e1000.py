"""Intel PRO/1000: 82540EM (8086:100e) and the 8254x family, 82574L (8086:10d3, e1000e).

Device knowledge only, polled (no interrupts), legacy descriptors on one RX and one TX queue;
on TX also TCP/IP context + extended data descriptors for what the host's TAP leaves undone
(checksum offload, TCP segmentation: `offloads`, see udrv.offload). The framework's PCI ring
engine (udrv.pcinet, udrv.pciengine; in C udrv.pciring) moves the frames through the ring
registers and the descriptor codec declared here; the guard makes every entry point a
transaction. Facts from Intel's 8254x and 82574 software developer's manuals as summarised in
docs/reference/e1000.md, cross-read against Linux e1000/e1000e, QEMU and DPDK; written here
independently of the udrv e1000 device model (models and drivers share no constants).

Layout: the register map is udrv/drivers/e1000_regs.py (datasheet names); here
  ids and chip flags                 (a handful of 8254x ids from Linux e1000 + 82574/82583)
  E1000Soft / E1000Checkpoint        (what the framework snapshots / what a resume needs)
  E1000Codec                         the 8254x descriptor layout (the C rings' "8254x" codec)
  E1000                              bind, probe, open, stop, set_mac, set_rx_mode, set_mtu,
                                     link_check, stats, checkpoint, restore, invariants
  E1000Native                        E1000.c_variant(): the same driver on the C ring
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from udrv.actions import Action, ActionList
from udrv.driver import DriverStats, LinkState, RxMode
from udrv.drivers.e1000_regs import *  # noqa: F403 -- the datasheet's names, unprefixed
from udrv.errors import DeviceGone, DriverFault, TransferTimeout, UdrvError
from udrv.pcinet import PciId, PciNetDriver, RingBounds, RingCodec, RingRegs, RingSoft
from udrv.pcitransport import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PciTransport

# --- ids and chip flags -----------------------------------------------------------------------
E1000E = 1 << 0          # PCIe 8257x generation: GIO master disable, e1000e EERD layout, TXDCTL bit 22
JUMBO = 1 << 1           # long packets (LPE) up to a 9000-byte MTU
DUAL_PORT = 1 << 2       # 82546: port B's MAC is port A's with the last bit flipped
EE_RELOAD = 1 << 3       # 8254x: reload the EEPROM after a MAC reset (CTRL_EXT.EE_RST)
IO_RESET = 1 << 4        # Linux issues CTRL.RST through the I/O BAR (the chip cannot ack a 64-bit
                         # MMIO write during reset); we only have BAR0 and use a 32-bit MMIO write
FIBER = 1 << 5


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
class E1000Soft(RingSoft):
    mac: bytes = b"\x00" * 6
    perm_mac: bytes = b"\x00" * 6        # from RAL0/RAH0 or the EEPROM at probe
    mode: RxMode = field(default_factory=RxMode)
    mtu: int = 1500
    opened: bool = False
    link: LinkState = field(default_factory=lambda: LinkState(False))
    # ring geometry: RingSoft's fields (the datapath keeps the indices)
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


# --- descriptors ---------------------------------------------------------------------------------
_DESC = struct.Struct("<QQ")           # whole descriptor: address, then the upper 8 bytes
_TXD = struct.Struct("<QHBBBBH")       # address, length, CSO, CMD, status, CSS, special
_TXD_DATA = struct.Struct("<QIBBH")    # extended data: address, length|DTYP|DCMD, status, POPTS, special
_TXD_CTX = struct.Struct("<BBHBBHIBBH")  # context: IPCSS, IPCSO, IPCSE, TUCSS, TUCSO, TUCSE,
                                         # PAYLEN|DTYP|TUCMD, status, HDRLEN, MSS


class E1000Codec(RingCodec):
    """Legacy RX/TX descriptors and the TCP/IP context + data pair (16 bytes each, little-endian):
    RX status at byte 12, errors at 13, length at 8; TX status at 12."""
    desc_size = DESC_SIZE
    c_layout = "8254x"
    rx_length_at, rx_status_at, rx_errors_at = 8, 12, 13
    rx_dd, rx_eop, rx_frame_errors = RXD_STAT_DD, RXD_STAT_EOP, RXD_ERR_FRAME
    tx_status_at, tx_dd = 12, TXD_STAT_DD
    tx_errors = ((TXD_STAT_EC, "excess_collisions"), (TXD_STAT_LC, "late_collision"))
    ctx_offset_max, paylen_max, mss_max = TX_CTX_OFFSET_MAX, TX_PAYLEN_MAX, TX_MSS_MAX

    def rx_arm(self, ring: Any, off: int, addr: int) -> None:
        _DESC.pack_into(ring, off, addr, 0)

    def rx_addr(self, ring: Any, off: int) -> int:
        return _DESC.unpack_from(ring, off)[0]

    def tx_plain(self, ring: Any, off: int, addr: int, length: int, last: bool) -> None:
        _TXD.pack_into(ring, off, addr, length, 0, TXD_CMD if last else TXD_CMD_IFCS, 0, 0, 0)

    def tx_data(self, ring: Any, off: int, addr: int, length: int, last: bool, dcmd: int, popts: int) -> None:
        cmd = TXD_CMD_IFCS | TXD_CMD_DEXT | dcmd | (TXD_CMD_EOP | TXD_CMD_RS if last else 0)
        _TXD_DATA.pack_into(ring, off, addr, length | TXD_DTYP_DATA << TXD_DTYP_SHIFT | cmd << 24, 0, popts, 0)

    def tx_csum(self, ring: Any, off: int, start: int, at: int, tcp: bool) -> tuple[int, int]:
        tucmd = (TUCMD_TCP if tcp else 0) | TXD_CMD_DEXT
        _TXD_CTX.pack_into(ring, off, 0, 0, 0, start, at, 0, TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24,
                           0, 0, 0)
        return 0, POPTS_TXSM

    def tx_tso(self, ring: Any, off: int, v4: bool, l3: int, l4: int, csum_at: int, paylen: int,
               hdr_len: int, mss: int) -> tuple[int, int]:
        tucmd = TUCMD_TCP | TXD_CMD_TSE | TXD_CMD_DEXT
        popts = POPTS_TXSM
        if v4:
            tucmd |= TUCMD_IP
            popts |= POPTS_IXSM
            ipcss, ipcso, ipcse = l3, l3 + 10, l4 - 1
        else:
            ipcss, ipcso, ipcse = l3, 0, 0       # IPCSS tells where the payload length is
        _TXD_CTX.pack_into(ring, off, ipcss, ipcso, ipcse, l4, csum_at, 0,
                           paylen | TXD_DTYP_CONTEXT << TXD_DTYP_SHIFT | tucmd << 24, 0, hdr_len, mss)
        return TXD_CMD_TSE, popts


# --- the driver ---------------------------------------------------------------------------------
class E1000(PciNetDriver):
    name = "e1000"
    ids = E1000_IDS
    max_mtu = 9000
    default_rings = (256, 256)     # descriptors (RX, TX) that Nic asks for unless told otherwise
    # what the family can take from the TAP (TCP/IP context descriptors); a chip narrows it
    offloads = frozenset({"csum", "tso4", "tso6"})
    ring_regs: ClassVar[RingRegs] = RingRegs(RDBAL, RDBAH, RDLEN, RDH, RDT, TDBAL, TDBAH, TDLEN, TDH, TDT)
    codec: ClassVar[RingCodec] = E1000Codec()
    # RDLEN/TDLEN: a multiple of 128 bytes (8 descriptors)
    ring_bounds: ClassVar[RingBounds] = RingBounds(RING_MIN, RING_MAX, RING_ALIGN_DESC)

    def __init__(self, pci: PciTransport, actions: ActionList):
        super().__init__(pci, actions)
        self.flags = self.ident.flags if self.ident else 0
        # per chip: the 82583 (and unknown parts) stay at 1500
        self.max_mtu = 9000 if self.flags & JUMBO else 1500
        # IPv6 segmentation only on the 8257x generation: Linux e1000 offers no TSO6 for the
        # 8254x, and QEMU's e1000 writes a wrong IPv6 payload length (it counts the header)
        self.offloads = E1000.offloads if self.flags & E1000E else frozenset({"csum", "tso4"})
        self.soft = E1000Soft()
        self._quiesce_action: Action | None = None
        self.restores = {"light": 0, "full": 0}
        self._mta: tuple[int, ...] | None = None   # what the MTA holds (None: unknown)

    # --- register access ------------------------------------------------------------------
    def rd(self, reg: int) -> int:
        """32-bit MMIO read; all ones from a register that can read all ones is confirmed by
        STATUS (which never does: it has reserved zero bits) before calling the device gone."""
        v = self.pci.read32(reg)
        if v == ALL_ONES and (reg == STATUS or self.pci.read32(STATUS) == ALL_ONES):
            raise DeviceGone(f"the e1000 at {self.pci.info.bdf} stopped answering (MMIO reads return "
                             "0xFFFFFFFF): it was removed, reset or unbound by the host")
        return v

    def check_alive(self) -> None:
        self.rd(STATUS)

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
        for reg in self.ring_regs.all():
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

    # --- rings (the framework allocates and programs them from ring_regs) ----------------------
    def rings_programmed(self) -> None:
        if self.flags & E1000E:
            txdctl = self.rd(TXDCTL)
            if not txdctl & TXDCTL_82574_BIT22:
                self.wr(TXDCTL, txdctl | TXDCTL_82574_BIT22)

    def quiesce(self) -> None:
        """RX and TX off, ring registers cleared: the device can no longer DMA into our memory.
        (RCTL is written only if RX is on.)"""
        rctl = self.rd(RCTL)
        if rctl & RCTL_EN:
            self.wr(RCTL, rctl & ~RCTL_EN)
        tctl = self.rd(TCTL)
        if tctl & TCTL_EN:
            self.wr(TCTL, tctl & ~TCTL_EN)
        self.clear_ring_regs()
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

    def restart_tx_queue(self) -> None:
        """TX off, heads and tails to 0, TX on (TCTL, not RCTL: RX keeps running)."""
        tctl = self.rd(TCTL)
        self.wr(TCTL, tctl & ~TCTL_EN)
        self.wr(self.ring_regs.tdh, 0)
        self.wr(self.ring_regs.tdt, 0)
        self.wr(TCTL, tctl | TCTL_EN)

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
            if fresh or not self.ring_regs_match():
                self.reprogram_rings()
            else:
                self.enable_rxtx()
        else:
            if self.rd(RCTL) & RCTL_EN or self.rd(TCTL) & TCTL_EN or self.rd(self.ring_regs.rdlen) \
                    or self.rd(self.ring_regs.tdlen):
                self.quiesce()        # e.g. open() faulted after enabling: no DMA into freed memory
            self.write_rctl(self.rctl_for(cp.mode, cp.rx_bufsize, cp.mtu, False))
        s.opened = cp.opened

    # --- invariants --------------------------------------------------------------------------------
    def invariants(self) -> list[str]:
        s = self.soft
        broken: list[str] = []
        probed = s.perm_mac != b"\x00" * 6        # before probe the MAC is not known yet
        if not isinstance(s.mac, bytes) or len(s.mac) != 6 or s.mac[0] & 1 or (probed and not valid_unicast(s.mac)):
            broken.append(f"MAC {bytes(s.mac).hex()} is not a unicast 6-byte address")
        if not self.min_mtu <= s.mtu <= self.max_mtu:
            broken.append(f"MTU {s.mtu} outside {self.min_mtu}..{self.max_mtu}")
        if s.rx_bufsize not in RCTL_SZ or s.tx_bufsize not in RCTL_SZ:
            broken.append(f"buffer sizes {s.rx_bufsize}/{s.tx_bufsize} are not ones RCTL.BSIZE can express")
        elif s.mtu + ETH_HLEN + VLAN_HLEN > s.rx_bufsize:
            broken.append(f"MTU {s.mtu} frames do not fit the {s.rx_bufsize}-byte RX buffers")
        for a in s.mode.multicast:
            if len(a) != 6 or not a[0] & 1:
                broken.append(f"multicast list entry {bytes(a).hex()} is not a multicast address")
        if bool(s.rctl & RCTL_UPE) != s.mode.promisc:
            broken.append("RCTL.UPE does not match the promiscuous setting")
        return broken + self.ring_invariants()


E1000Native = E1000.c_variant()

DRIVER = E1000

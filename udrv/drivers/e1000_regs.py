"""Intel PRO/1000 (8254x, 82574/82583) register map: BAR0 offsets, bits and descriptor fields,
named as in Intel's software developer's manuals (summarised in docs/reference/e1000.md).
The driver's own copy: the e1000 device model keeps another (models and drivers share no
constants)."""

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

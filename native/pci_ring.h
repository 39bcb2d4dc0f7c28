/* PCI descriptor rings in C: memory-only operations.
 *
 * The descriptor codec here is the Intel 8254x one (legacy RX/TX, TCP/IP context + data on TX),
 * which the e1000 family and the igb/ixgbe parts in legacy-descriptor mode share. A driver whose
 * descriptors look otherwise needs its own codec in C before it gets a C variant
 * (udrv.pcinet.PciNetDriver.c_variant checks the codec's c_layout); the Python ring
 * (udrv.pcinet.PciRing) always follows the driver's own codec. Register offsets are the
 * driver's too, and only pci_loop.h needs them.
 *
 * Nothing here touches a device register. Each function works on the rings and buffers in
 * DMA memory (and on the TX journal's memfd) and returns how far it got; Python does the one
 * MMIO write per batch (RDT after a harvest, TDT after a fill). So the same code runs on the
 * in-process model and on a real NIC behind VFIO.
 *
 * Descriptor layout (16 bytes, little-endian), from the 8254x manual:
 *   RX: u64 buffer address | u16 length @8 | u16 checksum @10 | u8 status @12 | u8 errors @13 |
 *       u16 special @14            status: DD 0x01, EOP 0x02
 *   TX: u64 buffer address | u16 length @8 | u8 CSO @10 | u8 CMD @11 | u8 status @12 | u8 CSS @13 |
 *       u16 special @14            CMD: EOP 0x01, IFCS 0x02, RS 0x08; status: DD 0x01, EC 0x02, LC 0x04
 *   TX context (DEXT, DTYP 0): u8 IPCSS | u8 IPCSO | u16 IPCSE | u8 TUCSS | u8 TUCSO | u16 TUCSE |
 *       u32 PAYLEN (19:0) / DTYP (23:20) / TUCMD (31:24: TCP 0x01, IP 0x02, TSE 0x04, DEXT 0x20) |
 *       u8 status | u8 HDRLEN | u16 MSS
 *   TX data (DEXT, DTYP 1): u64 buffer address | u32 length (19:0) / DTYP / DCMD (31:24: EOP, IFCS,
 *       TSE 0x04, RS, DEXT) | u8 status | u8 POPTS (IXSM 0x01, TXSM 0x02) | u16 special
 *
 * A TX packet is one legacy descriptor, or (a journal frame whose virtio-net header asks for a
 * checksum or TSO) a context descriptor + data descriptors over consecutive buffers; RS only
 * on the packet's last descriptor, which tx_eop[] names for each of its descriptors. Cases the
 * chip cannot take (hw_offloads, 8-bit offsets, ECN/UDP GSO, a packet larger than the ring)
 * stop pci_tx_fill with python_entry = 1: Python finishes that frame (udrv.offload's
 * software path) and hands the pieces back through pci_tx_put.
 *
 * Descriptor i always points at buffer i: addresses are computed from the buffer areas' IOVAs,
 * never read back from the ring.
 */
#ifndef UDRV_PCI_RING_H
#define UDRV_PCI_RING_H

#include <stdint.h>

#include "journal.h"

/* RX drop reasons (index into rx_dropped) */
#define PCIR_RX_NO_EOP 0
#define PCIR_RX_ZERO_LENGTH 1
#define PCIR_RX_OVERSIZE 2
#define PCIR_RX_ERROR 3
#define PCIR_RX_RUNT 4
#define PCIR_RX_DD_NOT_ARMED 5
#define PCIR_RX_COMPLETION_LOST 6
#define PCIR_RX_NREASONS 7

/* TX error reasons (index into tx_errors) */
#define PCIR_TX_RUNT 0
#define PCIR_TX_OVERSIZE 1
#define PCIR_TX_EXCESS_COLLISIONS 2
#define PCIR_TX_LATE_COLLISION 3
#define PCIR_TX_COMPLETION_LOST 4
#define PCIR_TX_DD_NOT_ARMED 5
#define PCIR_TX_NREASONS 6

/* hw_offloads bits: what the chip does (the rest is Python's software path) */
#define PCIR_OFF_CSUM 0x1
#define PCIR_OFF_TSO4 0x2
#define PCIR_OFF_TSO6 0x4

/* negative results */
#define PCIR_EINVAL (-1)          /* bad geometry at init */
#define PCIR_EJOURNAL (-2)        /* the journal refused an operation (corrupt / never sent) */
#define PCIR_ENOMEM (-3)

struct pci_ring_stats {
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    uint64_t rx_dropped[PCIR_RX_NREASONS];
    uint64_t tx_errors[PCIR_TX_NREASONS];
    uint64_t tap_write_errors;
    uint64_t tx_offload_csum, tx_offload_tso;   /* journal frames the chip checksummed / segmented */
    /* RX coalescing (rx_coalesce): TCP segments written inside super-frames, super-frames
     * written, frames not merged because a checksum (IPv4 header or TCP) was wrong,
     * super-frames the TAP refused (coalescing then turns itself off) */
    uint64_t rx_coalesced, rx_super, rx_csum_bad, rx_super_refused, rx_acks_merged;
};

struct pci_ring {
    /* geometry and memory (set by Python, then pci_ring_init) */
    uint8_t *rx_ring, *rx_buf, *tx_ring, *tx_buf;
    uint64_t rx_buf_iova, tx_buf_iova;
    uint32_t n_rx, n_tx, rx_bufsize, tx_bufsize;
    int tap_fd;                     /* RX frames are written here; < 0: into the caller's out buffer */
    uint32_t tap_vnet_hdr;          /* bytes of zeroed virtio-net header before each frame written */
    uint32_t hw_offloads;           /* PCIR_OFF_* */
    uint32_t python_entry;          /* pci_tx_fill stopped at a frame Python must handle */
    uint32_t rx_coalesce;           /* merge TCP segments into GSO super-frames (needs a
                                     * TAP with a virtio-net header, tap_vnet_hdr >= 10) */
    /* indices (Python reads and sets them between calls) */
    uint32_t rx_next, rx_tail, tx_next, tx_clean;
    uint32_t rx_discard;            /* inside a frame longer than one buffer: drop through EOP */
    int64_t *tx_seq;                /* journal seq to confirm when descriptor i completes (-1: none) */
    uint32_t *tx_len;               /* wire bytes / frames of the packet ending at descriptor i */
    uint32_t *tx_pkts;
    uint32_t *tx_eop;               /* last descriptor of the packet descriptor i belongs to */
    struct udrv_journal journal;    /* the TX journal's memfd, mapped by pci_ring_init */
    int64_t journal_error;          /* the last journal error code (PCIR_EJOURNAL cause) */
    struct pci_ring_stats st;
};

/* Map the journal memfd, allocate the per-descriptor tables. 0 or a negative code. */
int pci_ring_init(struct pci_ring *r, int journal_fd, uint32_t nslots, uint32_t slot_size);
/* Free the tables and unmap the journal (the ring memory belongs to Python). */
void pci_ring_fini(struct pci_ring *r);
/* Point the ring at (new) memory: geometry must already be set in r. 0 or PCIR_EINVAL/ENOMEM. */
int pci_ring_bind(struct pci_ring *r);
/* Every RX descriptor at its own buffer with status 0; TX descriptors and tables zeroed. */
void pci_ring_clean(struct pci_ring *r);

/* RX: harvest up to `budget` DD descriptors (0 = up to n_rx - 1) from rx_next, deliver good
 * frames (to tap_fd, or packed as u32 length + bytes into out[0..out_cap) when tap_fd < 0;
 * *out_used = bytes used), re-arm each, and check the never-armed descriptor at rx_tail.
 * With rx_coalesce and a vnet-header TAP, consecutive in-order TCP segments (IPv4/IPv6) of one flow
 * within the call go out as one GSO super-frame (the kernel's GRO, done here: see
 * pci_ring.c, "RX coalescing"); nothing is held across calls.
 * Returns descriptors harvested; rx_next/rx_tail are updated: Python writes RDT = rx_tail
 * when the result is > 0. */
int pci_rx_harvest(struct pci_ring *r, uint32_t budget, uint8_t *out, uint32_t out_cap,
                     uint32_t *out_used);
/* RX: the device's head is past rx_next but rx_next has no DD: if a later descriptor in
 * [rx_next, rdh) has DD the ones before it lost their write-back; re-arm them and move on.
 * Returns descriptors skipped (Python writes RDT = rx_tail when > 0). */
int pci_rx_skip_lost(struct pci_ring *r, uint32_t rdh);

/* TX: fill packets from the journal's unsent frames while descriptors are free (at most n_tx - 1
 * in flight). Returns journal frames handed out (Python writes TDT = tx_next when tx_next
 * moved), or PCIR_EJOURNAL; python_entry = 1 when it stopped at a frame left to Python. */
int pci_tx_fill(struct pci_ring *r);
/* TX: one packet Python built (ctx: a 16-byte context descriptor or NULL for legacy; seq < 0
 * confirms nothing). Returns descriptors used, 0 when they are not free. */
int pci_tx_put(struct pci_ring *r, const uint8_t *ctx, const uint8_t *data, uint32_t len,
                 uint8_t dcmd, uint8_t popts, uint32_t packets, uint64_t wire_bytes, int64_t seq);
/* TX: a journal frame that will never be sent, confirmed in order. 0 or PCIR_EJOURNAL. */
int pci_tx_drop(struct pci_ring *r, uint64_t seq);
/* TX: reclaim finished packets (DD on their last descriptor) in order from tx_clean, confirm
 * the journal through the last one's seq. Returns descriptors reclaimed or PCIR_EJOURNAL. */
int pci_tx_reclaim(struct pci_ring *r);
/* TX: a DD further on proves the descriptors before it done (in-order completion). */
int pci_tx_skip_lost(struct pci_ring *r);
/* TX: DD on the descriptor at tx_next (never handed out)? Counted and cleared; returns 1/0. */
int pci_tx_check_unarmed(struct pci_ring *r);

#endif

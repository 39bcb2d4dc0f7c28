/* The PCI ring's loop in C: harvest, reclaim, TAP -> journal -> fill, and the register
 * writes that go with them, turn after turn without a Python round trip.
 *
 * pci_ring.h keeps to memory; this is the one place the C side touches device registers,
 * and only four, whose offsets the driver declares (udrv.pcinet.RingRegs, passed in through
 * struct pci_ring_regs: nothing here knows a register map): the RX tail after a harvest, the
 * TX tail after a fill, the RX head (and the TX head while TX is outstanding) when a turn
 * found nothing, to tell a quiet ring from a removed device or a lost write-back. Anything
 * unexpected ends the loop with a flag and Python (the engine's own checks in udrv/pcinet.py)
 * decides: a head out of range, all ones, a frame only Python can finish, a journal error.
 *
 * BAR0 is reached through the VFIO device fd: mapped a second time here when the region can
 * be mapped (no Python buffer is held, so Python may unmap its own view whenever it likes),
 * else with pread/pwrite at the region's offset.
 */
#ifndef UDRV_PCI_LOOP_H
#define UDRV_PCI_LOOP_H

#include <stdint.h>

#include "pci_ring.h"
#include "tapread.h"

/* BAR0 offsets of the ring registers the loop uses (the driver's RDH, RDT, TDH, TDT) */
struct pci_ring_regs {
    uint32_t rdh, rdt, tdh, tdt;
};

struct pci_mmio {
    volatile uint8_t *bar;          /* BAR0 mapped by pci_mmio_open (NULL: pread/pwrite) */
    uint64_t size;
    int fd;                         /* VFIO device fd */
    uint64_t offset;                /* BAR0's offset in it */
    uint64_t errors;                /* pread/pwrite that failed */
    struct pci_ring_regs regs;      /* copied by pci_mmio_open */
};

/* 0, or -1 with errno EINVAL (BAR0 of `size` bytes does not hold every register in regs, or
 * one is not 4-byte aligned). try_mmap: map BAR0. */
int pci_mmio_open(struct pci_mmio *m, int fd, uint64_t offset, uint64_t size, int try_mmap,
                  const struct pci_ring_regs *regs);
void pci_mmio_close(struct pci_mmio *m);
uint32_t pci_mmio_read32(struct pci_mmio *m, uint32_t reg);
void pci_mmio_write32(struct pci_mmio *m, uint32_t reg, uint32_t value);

/* run flags */
#define PCIL_TX 0x1               /* fill TX from the journal (Python has no pieces pending) */
#define PCIL_YIELD 0x2            /* sched_yield() after each turn that wrote frames to the TAP */

/* run results (bits) */
#define PCIL_WORK 0x1             /* frames moved (the watchdog's progress) */
#define PCIL_PYTHON_TX 0x2        /* pci_tx_fill stopped at a frame Python finishes */
#define PCIL_DEFERRED 0x4         /* the TAP reader left a frame for Python (tr->deferred_len) */
#define PCIL_WAKE 0x8             /* wake_fd became readable */
#define PCIL_CHECK 0x10           /* quiet, and a head register Python must judge */
#define PCIL_EJOURNAL 0x20        /* the journal refused an operation (r->journal_error) */
#define PCIL_MMIO_ERROR 0x40      /* a register access through the fd failed (errno) */

struct pci_loop_result {
    uint64_t turns, sleeps, rx, reclaimed, tap_in, filled, idle_checks;
    int64_t *beat;              /* NULL, or a supervisor's heartbeat word: each turn stores CLOCK_MONOTONIC ns */
};

/* Turns until timeout_us passed (or something above needs Python). A turn that moved nothing
 * sleeps up to poll_us in ppoll() on the TAP (while the journal has room) and wake_fd (< 0:
 * none), the device having no event fd. A turn that moved frames but caught up (fewer than a
 * batch from the device and from the TAP) is followed by the next no sooner than gap_us after
 * it began: interrupt moderation, as the chip's ITR does for a kernel driver. The first frame
 * after a quiet spell goes at once, the ones behind it in batches, and neither the sender
 * writing to the TAP nor the reader of what the loop writes is preempted for every frame.
 * Returns PCIL_* bits; counts add up in *res. */
int pci_ring_run(struct pci_ring *r, struct udrv_tapread *tr, struct pci_mmio *m, int wake_fd,
                   uint32_t timeout_us, uint32_t poll_us, uint32_t tap_budget, uint32_t gap_us,
                   uint32_t flags, struct pci_loop_result *res);

#endif

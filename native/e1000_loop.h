/* The e1000 datapath's loop in C: harvest, reclaim, TAP -> journal -> fill, and the register
 * writes that go with them, turn after turn without a Python round trip.
 *
 * e1000_ring.h keeps to memory; this is the one place the C side touches device registers,
 * and only these (8254x manual offsets): RDT after a harvest, TDT after a fill, RDH (and TDH
 * while TX is outstanding) when a turn found nothing, to tell a quiet ring from a removed
 * device or a lost write-back. Anything unexpected ends the loop with a flag and Python (the
 * ring's own checks in drivers/e1000.py) decides: a head out of range, all ones, a frame only
 * Python can finish, a journal error.
 *
 * BAR0 is reached through the VFIO device fd: mapped a second time here when the region can
 * be mapped (no Python buffer is held, so Python may unmap its own view whenever it likes),
 * else with pread/pwrite at the region's offset.
 */
#ifndef UDRV_E1000_LOOP_H
#define UDRV_E1000_LOOP_H

#include <stdint.h>

#include "e1000_ring.h"
#include "tapread.h"

struct e1000_mmio {
    volatile uint8_t *bar;          /* BAR0 mapped by e1000_mmio_open (NULL: pread/pwrite) */
    uint64_t size;
    int fd;                         /* VFIO device fd */
    uint64_t offset;                /* BAR0's offset in it */
    uint64_t errors;                /* pread/pwrite that failed */
};

/* 0, or -1 with errno (size too small for the rings' registers). try_mmap: map BAR0. */
int e1000_mmio_open(struct e1000_mmio *m, int fd, uint64_t offset, uint64_t size, int try_mmap);
void e1000_mmio_close(struct e1000_mmio *m);
uint32_t e1000_mmio_read32(struct e1000_mmio *m, uint32_t reg);
void e1000_mmio_write32(struct e1000_mmio *m, uint32_t reg, uint32_t value);

/* run flags */
#define E1000L_TX 0x1               /* fill TX from the journal (Python has no pieces pending) */
#define E1000L_YIELD 0x2            /* sched_yield() after each turn that wrote frames to the TAP */

/* run results (bits) */
#define E1000L_WORK 0x1             /* frames moved (the watchdog's progress) */
#define E1000L_PYTHON_TX 0x2        /* e1000_tx_fill stopped at a frame Python finishes */
#define E1000L_DEFERRED 0x4         /* the TAP reader left a frame for Python (tr->deferred_len) */
#define E1000L_WAKE 0x8             /* wake_fd became readable */
#define E1000L_CHECK 0x10           /* quiet, and a head register Python must judge */
#define E1000L_EJOURNAL 0x20        /* the journal refused an operation (r->journal_error) */
#define E1000L_MMIO_ERROR 0x40      /* a register access through the fd failed (errno) */

struct e1000_loop_result {
    uint64_t turns, sleeps, rx, reclaimed, tap_in, filled, idle_checks;
};

/* Turns until timeout_us passed (or something above needs Python). A turn that moved nothing
 * sleeps up to poll_us in ppoll() on the TAP (while the journal has room) and wake_fd (< 0:
 * none), the device having no event fd. A turn that moved frames but caught up (fewer than a
 * batch from the device and from the TAP) is followed by the next no sooner than gap_us after
 * it began: interrupt moderation, as the chip's ITR does for a kernel driver. The first frame
 * after a quiet spell goes at once, the ones behind it in batches, and neither the sender
 * writing to the TAP nor the reader of what the loop writes is preempted for every frame.
 * Returns E1000L_* bits; counts add up in *res. */
int e1000_ring_run(struct e1000_ring *r, struct udrv_tapread *tr, struct e1000_mmio *m, int wake_fd,
                   uint32_t timeout_us, uint32_t poll_us, uint32_t tap_budget, uint32_t gap_us,
                   uint32_t flags, struct e1000_loop_result *res);

#endif

/* Benchmark helpers (udrv bench ring / udrv bench tap, see udrv/bench/ring.py); nothing in the
 * datapath calls these.
 *
 *   * the bare TAP forwarding loop: read a frame from one fd, write it to another, until the
 *     first fd has nothing more (non-blocking) -- the baseline udrv's path is compared with;
 *   * a packet generator: the same frame written `count` times to an fd (an AF_PACKET socket
 *     bound to a TAP interface: the kernel transmits it on the TAP, so the frames queue up for
 *     whoever reads the TAP's fd; or /dev/null, to measure what a write() costs alone);
 *   * a TAP -> TX journal reader (reserve/commit straight into the slot): what udrv's path
 *     would cost with the TAP read in C instead of Python;
 *   * a fake e1000 device side for the ring benches: after the driver writes TDT it marks the
 *     TX descriptors done (DD), optionally copying each packet into the next free RX buffer
 *     (loopback); after RDT it fills the RX descriptors with DD|EOP and a length (the frame
 *     bytes are left in the buffers beforehand). Legacy descriptors and extended data /
 *     context descriptors (the layouts in pci_ring.h); no checksum, no TSO, no filtering.
 */
#ifndef UDRV_TAPFWD_H
#define UDRV_TAPFWD_H

#include <stdint.h>

#include "../journal.h"

struct udrv_tapfwd_stats {
    uint64_t frames;          /* frames read (and handed on) */
    uint64_t bytes;
    uint64_t read_errors;     /* read() failed with something other than EAGAIN */
    uint64_t write_errors;    /* write() failed (the frame is counted in frames: it was read) */
    uint64_t journal_full;    /* to_journal: stopped because the journal had no free slot */
};

/* Forward frames from in_fd to out_fd (both non-blocking is fine) until in_fd has none left or
 * max_frames (0 = no limit) were forwarded. Returns the frames forwarded by this call. */
int64_t udrv_tapfwd_bare(int in_fd, int out_fd, uint64_t max_frames, struct udrv_tapfwd_stats *st);

/* write(fd, frame, len) `count` times; stops at the first error. Returns frames written. */
int64_t udrv_tapfwd_inject(int fd, const uint8_t *frame, uint32_t len, uint64_t count);

/* Read up to `budget` frames from in_fd straight into journal slots (udrv_journal_reserve /
 * commit). Returns frames appended (Python calls TxJournal.sync() afterwards). */
int64_t udrv_tapfwd_to_journal(int in_fd, struct udrv_journal *j, uint32_t budget,
                               struct udrv_tapfwd_stats *st);

struct udrv_fakedev {
    uint8_t *tx_ring, *tx_buf, *rx_ring, *rx_buf;
    uint64_t tx_buf_iova, rx_buf_iova;
    uint32_t n_tx, n_rx, tx_bufsize, rx_bufsize;
    uint32_t tdh, rdh, rdt;        /* the device's heads; the last RDT written */
    uint32_t loop;                 /* 1: TX packets come back as RX frames */
    uint32_t rx_len;               /* RX fill: length written into every RX descriptor (0: none) */
    uint32_t rx_off;               /* loop: bytes of the packet being assembled in RX buffer rdh */
    uint64_t tx_done, rx_done, rx_missed, bad;
};

/* The driver wrote TDT = tdt: every descriptor from tdh up to it gets DD; with loop, each
 * packet's data is copied into the RX ring (rx_missed when it has no free buffer). Returns
 * descriptors completed. */
uint32_t udrv_fakedev_tdt(struct udrv_fakedev *d, uint32_t tdt);
/* The driver wrote RDT = rdt. Without loop and with rx_len > 0: every descriptor from rdh up to
 * it is written back as a received frame of rx_len bytes (rdh = rdt). Returns descriptors
 * written back. */
uint32_t udrv_fakedev_rdt(struct udrv_fakedev *d, uint32_t rdt);

#endif

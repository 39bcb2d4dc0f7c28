/* TAP -> TX journal in C: what Tap.read_batch + Nic.enqueue do in Python, for a datapath that
 * owns the TAP fd (the e1000 C ring; see drivers/e1000.py E1000NativeRing.xmit).
 *
 * Each frame is read (readv) straight into the next free journal slot, a scratch buffer
 * catching the tail of a frame longer than a slot (so it is seen whole and dropped, never
 * truncated). With a virtio-net header on the TAP (vnet_hdr bytes in front of every frame):
 *   * GSO_NONE: a frame longer than mtu_max is "oversize"; with NEEDS_CSUM the checksum
 *     fields must lie inside the frame ("bad_offload_request"), and the header is kept;
 *     otherwise (asks for nothing) the header is dropped;
 *   * TCP GSO (v4/v6) with NEEDS_CSUM: the TCP header must be inside the frame
 *     ("bad_offload_request"), and every segment (headers through the TCP data offset +
 *     gso_size) must fit mtu_max ("oversize"); the header is kept;
 *   * anything else (UFO, ECN, GSO without NEEDS_CSUM...): the raw frame is copied into
 *     `deferred` and the call returns; the caller hands it to Python (Nic.enqueue), which
 *     counts it itself (it is not in frames_in).
 * Exactly the rules of Nic._enqueue_vnet for a datapath with handles_vnet. A payload that
 * does not fit the slot is "oversize". Without a header: frames longer than mtu_max or a slot
 * are "oversize". A full journal stops the call before reading: frames stay in the kernel's
 * queue (backpressure).
 */
#ifndef UDRV_TAPREAD_H
#define UDRV_TAPREAD_H

#include <stdint.h>

#include "journal.h"

#define UDRV_TAPREAD_BUF (65536 + 512) /* a TAP frame (64 KiB GSO + headers) never exceeds this */

struct udrv_tapread_stats {
    uint64_t frames_in;           /* frames read and judged here (deferred ones are not) */
    uint64_t bytes_in;
    uint64_t oversize;
    uint64_t short_vnet_header;
    uint64_t bad_offload_request;
    uint64_t offload_frames;      /* frames whose header asked for checksum/TSO work */
    uint64_t deferred;            /* frames handed to Python */
    uint64_t read_errors;         /* read() failed with something other than EAGAIN */
    uint64_t journal_full;        /* calls that stopped because the journal had no free slot */
};

struct udrv_tapread {
    int fd;
    uint32_t vnet_hdr;            /* bytes of virtio-net header in front of every frame read */
    uint32_t mtu_max;             /* MTU + 14 + 4: longest frame (without header) allowed */
    uint32_t deferred_len;        /* > 0: deferred[0..deferred_len) holds a raw frame for Python */
    struct udrv_tapread_stats st;
    uint8_t scratch[UDRV_TAPREAD_BUF];
    uint8_t deferred[UDRV_TAPREAD_BUF];
};

/* Set up (fd made non-blocking: a blocking read of an empty TAP would stall the datapath).
 * Returns 0, or -1 with errno when fd is not an open descriptor. */
int udrv_tapread_init(struct udrv_tapread *t, int fd, uint32_t vnet_hdr, uint32_t mtu_max);

/* Read up to budget frames into the journal. Returns frames appended; stops early when the
 * fd has nothing more, the journal is full, a read fails, or a frame was deferred
 * (t->deferred_len > 0: the caller must take it and set deferred_len = 0). */
int64_t udrv_tapread_to_journal(struct udrv_tapread *t, struct udrv_journal *j, uint32_t budget);

#endif

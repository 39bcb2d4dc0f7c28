/* USB NIC framings in C: the twin of udrv/framing.py, byte for byte and reason for reason.
 *
 *   TRAILER4: RX = frame, then u16 LE (length incl. 4 CRC bytes) & 0x0FFF, status, 0;
 *             TX = u16 LE frame length, then the frame (pegasus).
 *   HEADER2:  RX = u16 LE length & 0x0FFF, then the frame (ADM8513); TX as TRAILER4.
 *   RAW:      one frame per transfer both ways (CDC-ECM).
 *   pad_rule: a TX transfer that is an exact multiple of pad_rule bytes gets one zero byte more.
 */
#ifndef UDRV_FRAMING_H
#define UDRV_FRAMING_H

#include <stdint.h>

#define UDRV_SHAPE_TRAILER4 0
#define UDRV_SHAPE_HEADER2 1
#define UDRV_SHAPE_RAW 2

/* RX verdicts. 0 = a good frame; udrv/fastpath.py maps the others to framing.py's reason strings. */
#define UDRV_RX_OK 0
#define UDRV_DROP_ZERO_LENGTH 1
#define UDRV_DROP_RUNT 2
#define UDRV_DROP_OVERSIZE 3
#define UDRV_DROP_TRUNCATED 4
#define UDRV_DROP_LENGTH_BEYOND_TRANSFER 5
/* Transfer-level RX drops (counted by the ring, named like UsbNetEngine's "rx_<status>"). */
#define UDRV_DROP_RX_STALL 6
#define UDRV_DROP_RX_TIMEOUT 7
#define UDRV_DROP_RX_ERROR 8
#define UDRV_DROP_RX_OVERFLOW 9
/* Status bit i of the driver's rx_error_bits matched: verdict UDRV_DROP_ERRBIT0 + i. */
#define UDRV_DROP_ERRBIT0 16
#define UDRV_MAX_ERROR_BITS 8
#define UDRV_NREASONS 24

#define UDRV_ETH_MIN 14 /* shorter than an Ethernet header: a runt */

struct udrv_framing {
    uint32_t shape;
    uint32_t pad_rule;     /* 0 = no rule */
    uint32_t max_frame;    /* longest frame accepted on RX */
    uint32_t rx_size;      /* bytes per bulk-IN transfer */
    uint32_t n_error_bits;
    uint32_t error_bits[8]; /* checked in this order; the first match decides the reason */
};

/* 0 if the description is usable, -1 otherwise (unknown shape, too many error bits). */
int udrv_framing_check(const struct udrv_framing *f);
/* Largest encoded size of a frame of `len` bytes (header + pad byte). */
uint32_t udrv_tx_encoded_max(const struct udrv_framing *f, uint32_t len);
/* Encode one frame into out; returns the transfer length, or -1 if it does not fit in out or
 * the frame is too long for a 16-bit length prefix. */
int64_t udrv_encode_tx(const struct udrv_framing *f, const uint8_t *frame, uint32_t len,
                       uint8_t *out, uint32_t cap);
/* Decode one RX transfer without copying: on UDRV_RX_OK the frame is buf[*start, *start+*len). */
int udrv_decode_rx(const struct udrv_framing *f, const uint8_t *buf, uint32_t n, uint32_t *start,
                   uint32_t *len);
/* Encode `frame` and decode `rx` `iters` times in C (tools/bench_native.py): the per-frame cost
 * the ring pays, without a Python call in between. Returns elapsed nanoseconds. */
uint64_t udrv_framing_bench(const struct udrv_framing *f, const uint8_t *frame, uint32_t len,
                            uint8_t *rx, uint32_t rx_len, uint64_t iters);

#endif

/* Software TX offloads for a device that has none (the USB rings): what a TAP with
 * TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 asks for in a frame's virtio-net header, done in C
 * when the frame goes to the device, by the rules of udrv/offload.py (resolve):
 *
 *   * NEEDS_CSUM without GSO: the ones' complement sum of csum_start..end (the field holds the
 *     pseudo-header seed) is stored at csum_start + csum_offset; 0 goes out as 0xFFFF;
 *   * TCP GSO (v4/v6, NEEDS_CSUM, no ECN): every segment is the headers (through the TCP data
 *     offset) plus up to gso_size payload bytes; IPv4 total length, id + i and header
 *     checksum, IPv6 payload length, TCP sequence number, FIN/PSH on the last segment only,
 *     and each segment's TCP checksum from scratch.
 *
 * Why: the host's stack then hands the TAP one 64 KiB frame per read instead of ~44 (one
 * read, one skb, one queue pass), and the ring cuts it where the frames go out anyway.
 */
#ifndef UDRV_GSO_H
#define UDRV_GSO_H

#include <stdint.h>

/* udrv_gso_plan results */
#define UDRV_GSO_OK 0
#define UDRV_GSO_BAD (-1)          /* the header asks for something the frame does not allow */
#define UDRV_GSO_UNSUPPORTED (-2)  /* a GSO kind done elsewhere (ECN, UDP): Python's software */

struct udrv_gso {
    uint32_t nseg;        /* wire frames the entry becomes (>= 1) */
    uint32_t wire_max;    /* the longest of them */
    uint32_t csum_start;  /* NEEDS_CSUM without GSO: sum csum_start..end ... */
    uint32_t csum_at;     /* ... into the field here; 0 = nothing to fill */
    uint32_t tso;         /* 1: TCP segmentation with the fields below */
    uint32_t ipv4;
    uint32_t l3, l4, hdr_len, mss;
};

/* Plan the work a frame's virtio-net header (vnet, at least 10 bytes) asks for. */
int udrv_gso_plan(const uint8_t *vnet, const uint8_t *frame, uint32_t len, struct udrv_gso *g);

/* Build wire frame i (0 .. nseg-1) of a planned frame into out (cap bytes). Returns its
 * length, or -1 if out is too small or i out of range. */
int64_t udrv_gso_build(const struct udrv_gso *g, const uint8_t *frame, uint32_t len, uint32_t i,
                       uint8_t *out, uint32_t cap);

#endif

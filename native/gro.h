/* RX coalescing ("GRO in the driver"), shared by the C rings (pci_ring.c, usb_ring.c).
 *
 * A TAP write per 1500-byte frame makes the host's TCP stack run once per frame; the kernel's
 * own drivers hand it ~64 KiB GRO aggregates. So, within one batch of received frames, runs of
 * in-order TCP segments of one flow over IPv4 (no options, no fragments) or IPv6 (no extension
 * headers) (Linux GRO's rules: same addresses, ports, ack, window, options, TTL/TOS/DF or hop
 * limit/class/flow label; contiguous sequence numbers and IPv4 ids; only ACK/PSH; checksums
 * right) become one frame behind a virtio-net header asking for GSO TCPV4/TCPV6 (NEEDS_CSUM,
 * gso_size = the first segment's payload, TCP checksum field = pseudo-header sum): the kernel
 * takes it as one skb and could segment it back exactly (udrv.offload.resolve does).
 *
 * Zero copy: the caller hands frame pointers that must stay valid until its udrv_gro_flush
 * (udrv_gro_frame returns 1 for a frame it holds); payloads go out with one writev.
 * Frames that cannot merge are written at once, with a zeroed virtio-net header.
 * If the TAP refuses a super-frame (EINVAL) coalescing turns itself off (*enable = 0) and the
 * held segments are written one by one: nothing is lost.
 *
 * Pure ACKs are thinned the same way (ACK filtering, RFC 3449 5.2.2; Linux's cake qdisc does
 * it with ack-filter): of consecutive pure ACKs of one flow in a batch, each newer one making
 * the one before it redundant (cumulative ACK strictly ahead), only the newest goes to the host.
 * A sender bound by ACK processing (a userspace driver's TAP write and the TCP work behind each
 * ACK) then runs that work once per batch. Only plain cumulative ACKs: flags exactly ACK, no
 * payload, no TCP option but timestamps (no SACK), no ECN CE mark, checksums right;
 * duplicate ACKs (fast retransmit counts them) and anything else go through untouched.
 */
#ifndef UDRV_GRO_H
#define UDRV_GRO_H

#include <stdint.h>
#include <sys/uio.h>

#define UDRV_GRO_MAX_SEGS 64
#define UDRV_GRO_VNET_MIN 10     /* struct virtio_net_hdr */
#define UDRV_GRO_VNET_MAX 64

/* Checksums the hardware already verified (udrv_gro_frame's hw_ok); the rest is checked in C. */
#define UDRV_GRO_IP_OK 0x1
#define UDRV_GRO_TCP_OK 0x2

/* Where the counters live (in the ring's own stats struct, which Python reads). */
struct udrv_gro_counters {
    uint64_t *coalesced;         /* TCP segments written inside super-frames */
    uint64_t *super;             /* super-frames written */
    uint64_t *csum_bad;          /* frames not merged because a checksum was wrong */
    uint64_t *refused;           /* super-frames the TAP refused */
    uint64_t *tap_write_errors;  /* frames the TAP write lost (queue full, interface down) */
    uint64_t *acks_merged;       /* pure ACKs not written: a newer one of the same flow followed */
};

struct udrv_gro {
    int tap_fd;
    uint32_t vnet_hdr;                  /* bytes of virtio-net header the TAP expects */
    uint32_t *enable;                   /* the ring's switch; cleared on a refused super-frame */
    struct udrv_gro_counters c;
    /* the aggregate being built */
    uint32_t n;                         /* segments held */
    uint32_t l3len, hlen, thl, mss, payload, next_seq;
    uint16_t next_id;
    uint8_t flags;                      /* ACK, PSH if the last one had it */
    int closed;                         /* a short or PSH segment ends the aggregate */
    const uint8_t *frame[UDRV_GRO_MAX_SEGS];  /* whole frames (the first one's headers are the template) */
    uint32_t flen[UDRV_GRO_MAX_SEGS];
    struct iovec iov[UDRV_GRO_MAX_SEGS + 1];  /* [0]: vnet header + headers, then each payload */
    /* the pure ACK held (ack != NULL): written at the next other frame or flush, or dropped
     * for a newer one of its flow */
    const uint8_t *ack;
    uint32_t ack_len, ack_l3, ack_no;
};

/* Ready for a batch: 1 if coalescing is usable (enabled, a TAP fd, a vnet header of a size
 * it can build), 0 if the caller should write frames its own way. */
int udrv_gro_begin(struct udrv_gro *g, int tap_fd, uint32_t vnet_hdr, uint32_t *enable,
                   const struct udrv_gro_counters *c);
/* One good frame in arrival order: 1 = held (keep its buffer until udrv_gro_flush), 0 = written
 * now (the buffer is free again). Writing it may first flush the aggregate (or ACK) before it. */
int udrv_gro_frame(struct udrv_gro *g, const uint8_t *f, uint32_t len, uint32_t hw_ok);
/* Write what is held. After it every buffer handed to udrv_gro_frame is free. */
void udrv_gro_flush(struct udrv_gro *g);
/* One frame to the TAP with a zeroed virtio-net header of vnet_hdr bytes (0 = none). */
void udrv_tap_write(int fd, uint32_t vnet_hdr, const uint8_t *frame, uint32_t len, uint64_t *errors);

#endif

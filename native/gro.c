/* RX coalescing into GSO super-frames (see gro.h for the contract). */
#include "gro.h"
#include "csum.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

enum {
    ETH_HLEN = 14,
    GRO_HDR_MAX = ETH_HLEN + 40 + 60,
    VNET_F_NEEDS_CSUM = 0x01, VNET_GSO_TCPV4 = 1, VNET_GSO_TCPV6 = 4,
    IPPROTO_TCP = 6,
    TCP_FIN = 0x01, TCP_SYN = 0x02, TCP_RST = 0x04, TCP_PSH = 0x08, TCP_ACK = 0x10,
};

struct gro_seg {
    uint32_t l3len, hlen, thl, payload, seq;   /* l3len 20: IPv4, 40: IPv6 */
    uint16_t id;
    uint8_t flags;
};

static inline uint16_t rd16be(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16be(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

void udrv_tap_write(int fd, uint32_t vnet_hdr, const uint8_t *frame, uint32_t len, uint64_t *errors)
{
    /* a TAP with IFF_VNET_HDR wants a header in front of every frame: zeroed = nothing known
     * about the checksum */
    static const uint8_t zero_hdr[UDRV_GRO_VNET_MAX];
    struct iovec iov[2] = {{(void *)zero_hdr, vnet_hdr}, {(void *)frame, len}};
    ssize_t w;
    do
        w = vnet_hdr ? writev(fd, iov, 2) : write(fd, frame, len);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        (*errors)++;                    /* interface down or queue full: the kernel drops, we count */
}

int udrv_gro_begin(struct udrv_gro *g, int tap_fd, uint32_t vnet_hdr, uint32_t *enable,
                   const struct udrv_gro_counters *c)
{
    g->n = 0;
    g->ack = NULL;
    g->tap_fd = tap_fd;
    g->vnet_hdr = vnet_hdr;
    g->enable = enable;
    g->c = *c;
    return *enable && tap_fd >= 0 && vnet_hdr >= UDRV_GRO_VNET_MIN && vnet_hdr <= UDRV_GRO_VNET_MAX;
}

/* 1: a TCP data segment (IPv4 or IPv6) that may be merged (s filled). Anything else, including a
 * frame with a wrong checksum (counted: it goes to the host unchanged and the host drops it),
 * is delivered as it is. */
static int gro_parse(struct udrv_gro *g, const uint8_t *f, uint32_t len, uint32_t hw_ok,
                     struct gro_seg *s)
{
    uint32_t l3len, l4len;              /* l4len: TCP header + payload */
    if (len >= ETH_HLEN + 40 && f[12] == 0x08 && f[13] == 0x00 && f[14] == 0x45 && f[23] == IPPROTO_TCP) {
        uint32_t tot = rd16be(f + 16);
        if ((rd16be(f + 20) & 0x3FFF) || tot < 40 || ETH_HLEN + tot > len)
            return 0;                   /* a fragment, or lengths that do not fit */
        l3len = 20;
        l4len = tot - 20;
    } else if (len >= ETH_HLEN + 60 && f[12] == 0x86 && f[13] == 0xDD && f[14] >> 4 == 6
               && f[20] == IPPROTO_TCP) {
        l3len = 40;                     /* IPv6 without extension headers */
        l4len = rd16be(f + 18);
        if (ETH_HLEN + 40 + l4len > len)
            return 0;
    } else {
        return 0;                       /* not TCP over IPv4 without options or plain IPv6 */
    }
    const uint8_t *th = f + ETH_HLEN + l3len;
    uint32_t thl = (uint32_t)(th[12] >> 4) * 4;
    uint8_t flags = th[13];
    if (thl < 20 || thl >= l4len || (th[12] & 0x0F) || !(flags & TCP_ACK)
        || (flags & ~(TCP_ACK | TCP_PSH)))
        return 0;                       /* no payload, reserved bits, or SYN/FIN/RST/URG/ECE/CWR */
    int ip_ok = l3len == 40 || (hw_ok & UDRV_GRO_IP_OK);
    int tcp_ok = hw_ok & UDRV_GRO_TCP_OK;
    uint32_t pseudo = l3len == 20 ? udrv_csum16(f + 26, 8, IPPROTO_TCP + l4len)
                                  : udrv_csum16(f + 22, 32, IPPROTO_TCP + l4len);
    if ((!ip_ok && udrv_csum16(f + ETH_HLEN, 20, 0) != 0xFFFF)
        || (!tcp_ok && udrv_csum16(th, l4len, pseudo) != 0xFFFF)) {
        (*g->c.csum_bad)++;
        return 0;
    }
    s->l3len = l3len;
    s->hlen = ETH_HLEN + l3len + thl;
    s->thl = thl;
    s->payload = l4len - thl;
    s->seq = rd32be(th + 4);
    s->id = l3len == 20 ? rd16be(f + 18) : 0;
    s->flags = flags;
    return 1;
}

/* Can segment s (frame f) follow the aggregate's last segment? */
static int gro_follows(const struct udrv_gro *g, const uint8_t *f, const struct gro_seg *s)
{
    const uint8_t *h = g->frame[0];
    uint32_t l3 = s->l3len;
    const uint8_t *th = f + ETH_HLEN + l3, *gth = h + ETH_HLEN + l3;
    if (g->closed || g->n >= UDRV_GRO_MAX_SEGS || l3 != g->l3len || s->thl != g->thl || s->payload > g->mss
        || (l3 == 20 ? 20 : 0) + g->thl + g->payload + s->payload > 0xFFFF   /* IPv4 total / IPv6 payload length */
        || s->seq != g->next_seq || s->id != g->next_id || memcmp(f, h, ETH_HLEN))  /* MACs, EtherType */
        return 0;
    if (l3 == 20) {
        if (f[15] != h[15]                                  /* TOS */
            || memcmp(f + 20, h + 20, 4)                    /* DF, TTL, protocol */
            || memcmp(f + 26, h + 26, 8))                   /* addresses */
            return 0;
    } else if (memcmp(f + 14, h + 14, 4)                    /* traffic class, flow label */
               || memcmp(f + 20, h + 20, 34)) {             /* next header, hop limit, addresses */
        return 0;
    }
    return !memcmp(th, gth, 4)                              /* ports */
           && !memcmp(th + 8, gth + 8, 5)                   /* ack, data offset */
           && !memcmp(th + 14, gth + 14, 2)                 /* window */
           && !memcmp(th + 18, gth + 18, s->thl - 18);      /* urgent pointer, options */
}

static void write_plain(struct udrv_gro *g, const uint8_t *f, uint32_t len)
{
    udrv_tap_write(g->tap_fd, g->vnet_hdr, f, len, g->c.tap_write_errors);
}

/* A plain cumulative ACK (see gro.h): 1 and its L3 header length and ack number, or 0. */
static int pure_ack(struct udrv_gro *g, const uint8_t *f, uint32_t len, uint32_t hw_ok, uint32_t *l3,
                    uint32_t *ack_no)
{
    uint32_t l3len, l4len;
    if (len >= ETH_HLEN + 40 && f[12] == 0x08 && f[13] == 0x00 && f[14] == 0x45 && f[23] == IPPROTO_TCP) {
        uint32_t tot = rd16be(f + 16);
        if ((rd16be(f + 20) & 0x3FFF) || (f[15] & 3) == 3 || tot < 40 || ETH_HLEN + tot > len)
            return 0;                   /* a fragment, a CE mark, or lengths that do not fit */
        l3len = 20;
        l4len = tot - 20;
    } else if (len >= ETH_HLEN + 60 && f[12] == 0x86 && f[13] == 0xDD && f[14] >> 4 == 6
               && f[20] == IPPROTO_TCP) {
        if (((f[14] << 8 | f[15]) >> 4 & 3) == 3)
            return 0;                   /* CE */
        l3len = 40;
        l4len = rd16be(f + 18);
        if (ETH_HLEN + 40 + l4len > len)
            return 0;
    } else {
        return 0;
    }
    const uint8_t *th = f + ETH_HLEN + l3len;
    uint32_t thl = (uint32_t)(th[12] >> 4) * 4;
    if (th[13] != TCP_ACK || (th[12] & 0x0F) || l4len != thl)
        return 0;                       /* other flags, reserved bits, or a payload */
    if (thl == 32) {                    /* NOP NOP TIMESTAMP only */
        if (th[20] != 1 || th[21] != 1 || th[22] != 8 || th[23] != 10)
            return 0;
    } else if (thl != 20) {
        return 0;
    }
    int ip_ok = l3len == 40 || (hw_ok & UDRV_GRO_IP_OK);
    int tcp_ok = hw_ok & UDRV_GRO_TCP_OK;
    uint32_t pseudo = l3len == 20 ? udrv_csum16(f + 26, 8, IPPROTO_TCP + l4len)
                                  : udrv_csum16(f + 22, 32, IPPROTO_TCP + l4len);
    if ((!ip_ok && udrv_csum16(f + ETH_HLEN, 20, 0) != 0xFFFF)
        || (!tcp_ok && udrv_csum16(th, l4len, pseudo) != 0xFFFF))
        return 0;                       /* the host judges it (and drops it) */
    *l3 = l3len;
    *ack_no = rd32be(th + 8);
    return 1;
}

/* Same flow as the held ACK: MACs, EtherType, addresses, ports. */
static int same_ack_flow(const struct udrv_gro *g, const uint8_t *f, uint32_t l3)
{
    const uint8_t *h = g->ack;
    if (l3 != g->ack_l3 || memcmp(f, h, ETH_HLEN))
        return 0;
    if (l3 == 20 ? memcmp(f + 26, h + 26, 8) : memcmp(f + 22, h + 22, 32))
        return 0;
    return !memcmp(f + ETH_HLEN + l3, h + ETH_HLEN + l3, 4);
}

static void flush_ack(struct udrv_gro *g)
{
    if (g->ack) {
        write_plain(g, g->ack, g->ack_len);
        g->ack = NULL;
    }
}

void udrv_gro_flush(struct udrv_gro *g)
{
    flush_ack(g);
    uint32_t n = g->n;
    g->n = 0;
    if (n == 0)
        return;
    if (n == 1) {                       /* nothing merged: the frame exactly as it came */
        write_plain(g, g->frame[0], g->flen[0]);
        return;
    }
    /* virtio-net header (little-endian, as the TAP reads it) + the first segment's headers
     * with the lengths, IPv4 checksum and flags of the whole; the TCP checksum field holds the
     * pseudo-header sum over the whole length, as Linux's GSO expects for CHECKSUM_PARTIAL */
    uint8_t buf[UDRV_GRO_VNET_MAX + GRO_HDR_MAX];
    uint32_t vlen = g->vnet_hdr, hlen = g->hlen, l3 = g->l3len, l4len = g->thl + g->payload;
    uint16_t v16[4] = {(uint16_t)hlen, (uint16_t)g->mss, (uint16_t)(ETH_HLEN + l3), 16};
    memset(buf, 0, vlen);
    buf[0] = VNET_F_NEEDS_CSUM;
    buf[1] = l3 == 20 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
    memcpy(buf + 2, v16, sizeof v16);   /* hdr_len, gso_size, csum_start, csum_offset (LE host) */
    uint8_t *h = buf + vlen;
    memcpy(h, g->frame[0], hlen);
    uint32_t pseudo;
    if (l3 == 20) {
        wr16be(h + 16, (uint16_t)(20 + l4len));
        h[24] = h[25] = 0;
        wr16be(h + 24, (uint16_t)~udrv_csum16(h + ETH_HLEN, 20, 0));
        pseudo = udrv_csum16(h + 26, 8, IPPROTO_TCP + l4len);
    } else {
        wr16be(h + 18, (uint16_t)l4len);
        pseudo = udrv_csum16(h + 22, 32, IPPROTO_TCP + l4len);
    }
    h[ETH_HLEN + l3 + 13] = g->flags;
    wr16be(h + ETH_HLEN + l3 + 16, (uint16_t)pseudo);
    g->iov[0].iov_base = buf;
    g->iov[0].iov_len = vlen + hlen;
    ssize_t w;
    do
        w = writev(g->tap_fd, g->iov, (int)n + 1);
    while (w < 0 && errno == EINTR);
    if (w < 0 && errno == EINVAL) {
        /* this kernel's TAP refuses the super-frame: stop coalescing, nothing is lost */
        (*g->c.refused)++;
        *g->enable = 0;
        for (uint32_t k = 0; k < n; k++)
            write_plain(g, g->frame[k], g->flen[k]);
        return;
    }
    if (w < 0)
        *g->c.tap_write_errors += n;    /* queue full or interface down: the kernel drops, we count */
    *g->c.coalesced += n;
    (*g->c.super)++;
}

int udrv_gro_frame(struct udrv_gro *g, const uint8_t *f, uint32_t len, uint32_t hw_ok)
{
    struct gro_seg s;
    uint32_t l3, ack_no;
    if (*g->enable && pure_ack(g, f, len, hw_ok, &l3, &ack_no)) {
        if (g->n)
            udrv_gro_flush(g);          /* the data before it goes first */
        if (g->ack && same_ack_flow(g, f, l3) && (int32_t)(ack_no - g->ack_no) > 0)
            (*g->c.acks_merged)++;      /* the newer ACK says all the held one did */
        else
            flush_ack(g);
        g->ack = f;
        g->ack_len = len;
        g->ack_l3 = l3;
        g->ack_no = ack_no;
        return 1;
    }
    flush_ack(g);
    if (!*g->enable || !gro_parse(g, f, len, hw_ok, &s)) {
        udrv_gro_flush(g);
        write_plain(g, f, len);
        return 0;
    }
    if (g->n && !gro_follows(g, f, &s))
        udrv_gro_flush(g);
    uint32_t k = g->n++;
    g->frame[k] = f;
    g->flen[k] = len;
    g->iov[k + 1].iov_base = (void *)(f + s.hlen);
    g->iov[k + 1].iov_len = s.payload;
    if (k == 0) {
        g->l3len = s.l3len;
        g->hlen = s.hlen;
        g->thl = s.thl;
        g->mss = s.payload;
        g->payload = 0;
        g->closed = 0;
    }
    g->payload += s.payload;
    g->next_seq = s.seq + s.payload;
    g->next_id = s.l3len == 20 ? (uint16_t)(s.id + 1) : 0;
    g->flags = s.flags;
    if (s.payload < g->mss || (s.flags & TCP_PSH))
        g->closed = 1;
    return 1;
}

/* Software TX offloads (see gso.h for the contract). */
#include "gso.h"
#include "csum.h"

#include <string.h>

enum {
    VNET_F_NEEDS_CSUM = 0x01,
    VNET_GSO_NONE = 0, VNET_GSO_TCPV4 = 1, VNET_GSO_TCPV6 = 4,
    ETH_P_IP = 0x0800, ETH_P_IPV6 = 0x86DD, ETH_P_8021Q = 0x8100, ETH_P_8021AD = 0x88A8,
    IPPROTO_TCP = 6,
    TCP_FIN = 0x01, TCP_PSH = 0x08,
};

static inline uint32_t rd16le(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static inline uint32_t rd16be(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t rd32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16be(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void wr32be(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Complement of a folded sum; an all-zero result goes out as 0xFFFF (offload.put_csum). */
static inline uint32_t finish(uint32_t sum)
{
    uint32_t v = ~sum & 0xFFFF;
    return v ? v : 0xFFFF;
}

int udrv_gso_plan(const uint8_t *vnet, const uint8_t *frame, uint32_t len, struct udrv_gso *g)
{
    memset(g, 0, sizeof *g);
    uint32_t flags = vnet[0], gso = vnet[1], size = rd16le(vnet + 4);
    uint32_t start = rd16le(vnet + 6), offset = rd16le(vnet + 8);
    g->nseg = 1;
    g->wire_max = len;
    if (gso == VNET_GSO_NONE) {
        if (!(flags & VNET_F_NEEDS_CSUM))
            return UDRV_GSO_OK;
        if (start >= len || start + offset + 2 > len)
            return UDRV_GSO_BAD;
        g->csum_start = start;
        g->csum_at = start + offset;
        return UDRV_GSO_OK;
    }
    if ((gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6) || !(flags & VNET_F_NEEDS_CSUM))
        return UDRV_GSO_UNSUPPORTED;
    if (size == 0)
        return UDRV_GSO_BAD;
    /* L3 behind the Ethernet header and up to two VLAN tags; L4 where csum_start says */
    uint32_t off = 12;
    if (len < off + 2)
        return UDRV_GSO_BAD;
    uint32_t etype = rd16be(frame + off);
    for (int tags = 0; (etype == ETH_P_8021Q || etype == ETH_P_8021AD) && tags < 2; tags++) {
        off += 4;
        if (len < off + 2)
            return UDRV_GSO_BAD;
        etype = rd16be(frame + off);
    }
    uint32_t l3 = off + 2, l4 = start;
    if (gso == VNET_GSO_TCPV4) {
        if (etype != ETH_P_IP || len < l3 + 20 || frame[l3] >> 4 != 4 || (frame[l3] & 0xF) < 5 ||
            l3 + (frame[l3] & 0xFu) * 4 != l4 || frame[l3 + 9] != IPPROTO_TCP)
            return UDRV_GSO_BAD;
        g->ipv4 = 1;
    } else if (etype != ETH_P_IPV6 || len < l3 + 40 || frame[l3] >> 4 != 6 || l4 < l3 + 40) {
        return UDRV_GSO_BAD;
    }
    if (len < l4 + 20)
        return UDRV_GSO_BAD;
    uint32_t thl = (uint32_t)(frame[l4 + 12] >> 4) * 4;
    if (thl < 20 || l4 + thl > len)
        return UDRV_GSO_BAD;
    g->tso = 1;
    g->l3 = l3;
    g->l4 = l4;
    g->hdr_len = l4 + thl;
    g->mss = size;
    uint32_t payload = len - g->hdr_len;
    g->nseg = payload ? (payload + size - 1) / size : 1;
    g->wire_max = g->hdr_len + (payload < size ? payload : size);
    return UDRV_GSO_OK;
}

int64_t udrv_gso_build(const struct udrv_gso *g, const uint8_t *frame, uint32_t len, uint32_t i,
                       uint8_t *out, uint32_t cap)
{
    if (i >= g->nseg)
        return -1;
    if (!g->tso) {
        if (len > cap)
            return -1;
        memcpy(out, frame, len);
        if (g->csum_at)
            wr16be(out + g->csum_at, finish(udrv_csum16(out + g->csum_start, len - g->csum_start, 0)));
        return len;
    }
    uint32_t h = g->hdr_len, l3 = g->l3, l4 = g->l4;
    uint32_t off = i * g->mss, payload = len - h;
    uint32_t seg = payload - off < g->mss ? payload - off : g->mss;
    if (h + seg > cap)
        return -1;
    memcpy(out, frame, h);
    memcpy(out + h, frame + h + off, seg);
    uint32_t total = h + seg, l4len = total - l4;
    uint32_t pseudo;
    if (g->ipv4) {
        wr16be(out + l3 + 2, total - l3);
        wr16be(out + l3 + 4, (rd16be(frame + l3 + 4) + i) & 0xFFFF);
        wr16be(out + l3 + 10, 0);
        uint32_t ihl = (out[l3] & 0xFu) * 4;
        wr16be(out + l3 + 10, ~udrv_csum16(out + l3, ihl, 0) & 0xFFFF);
        pseudo = udrv_csum16(out + l3 + 12, 8, IPPROTO_TCP + l4len);
    } else {
        wr16be(out + l3 + 4, total - l3 - 40);
        pseudo = udrv_csum16(out + l3 + 8, 32, IPPROTO_TCP + l4len);
    }
    wr32be(out + l4 + 4, rd32be(frame + l4 + 4) + off);
    if (i + 1 < g->nseg)
        out[l4 + 13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
    wr16be(out + l4 + 16, 0);
    wr16be(out + l4 + 16, finish(udrv_csum16(out + l4, l4len, pseudo)));
    return total;
}

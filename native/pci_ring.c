/* PCI descriptor rings (8254x layout): RX harvest, TX fill and reclaim, in memory only.
 * See pci_ring.h for the layout and the division of work with Python (udrv/pcinet.py). */
#include "pci_ring.h"
#include "gro.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "8254x descriptors are little-endian; this build assumes a little-endian CPU"
#endif

enum {
    DESC = 16,
    RXD_STAT_DD = 0x01, RXD_STAT_EOP = 0x02,
    RXD_ERR_FRAME = 0x01 | 0x02 | 0x04 | 0x10 | 0x80,   /* CE, SE, SEQ, CXE, RXE */
    TXD_CMD_EOP = 0x01, TXD_CMD_IFCS = 0x02, TXD_CMD_TSE = 0x04, TXD_CMD_RS = 0x08,
    TXD_CMD_DEXT = 0x20,
    TXD_DTYP_CONTEXT = 0x0, TXD_DTYP_DATA = 0x1,       /* bits 23:20 of an extended descriptor */
    TUCMD_TCP = 0x01, TUCMD_IP = 0x02,                  /* context: TCP (else UDP), IPv4 (else v6) */
    POPTS_IXSM = 0x01, POPTS_TXSM = 0x02,
    TXD_STAT_DD = 0x01, TXD_STAT_EC = 0x02, TXD_STAT_LC = 0x04,
    ETH_HLEN = 14,
    /* virtio-net header (udrv/offload.py) */
    VNET_HDR_MIN = 10, VNET_F_NEEDS_CSUM = 0x01,
    VNET_GSO_NONE = 0, VNET_GSO_TCPV4 = 1, VNET_GSO_TCPV6 = 4,
    IPPROTO_TCP = 6,
};

/* The device writes status last; read it with acquire so the length and the buffer read after
 * it are the ones the device wrote before setting DD. */
static inline uint8_t status_of(const uint8_t *desc)
{
    return __atomic_load_n(desc + 12, __ATOMIC_ACQUIRE);
}

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline void rx_arm(struct pci_ring *r, uint32_t i)
{
    uint8_t *d = r->rx_ring + (uint64_t)i * DESC;
    put64(d, r->rx_buf_iova + (uint64_t)i * r->rx_bufsize);
    memset(d + 8, 0, 8);
}

int pci_ring_init(struct pci_ring *r, int journal_fd, uint32_t nslots, uint32_t slot_size)
{
    r->tx_seq = NULL;
    r->tx_len = NULL;
    r->tx_pkts = NULL;
    r->tx_eop = NULL;
    r->python_entry = 0;
    memset(&r->st, 0, sizeof r->st);
    r->journal_error = 0;
    int rc = udrv_journal_map_fd(&r->journal, journal_fd, nslots, slot_size);
    return rc < 0 ? PCIR_EJOURNAL : 0;
}

static void free_tables(struct pci_ring *r)
{
    free(r->tx_seq);
    free(r->tx_len);
    free(r->tx_pkts);
    free(r->tx_eop);
    r->tx_seq = NULL;
    r->tx_len = NULL;
    r->tx_pkts = NULL;
    r->tx_eop = NULL;
}

void pci_ring_fini(struct pci_ring *r)
{
    free_tables(r);
    udrv_journal_unmap(&r->journal);
}

int pci_ring_bind(struct pci_ring *r)
{
    if (r->n_rx < 8 || r->n_tx < 8 || r->n_rx % 8 || r->n_tx % 8 || !r->rx_ring || !r->tx_ring
        || !r->rx_buf || !r->tx_buf || r->rx_bufsize < 256 || r->tx_bufsize < 256)
        return PCIR_EINVAL;
    free_tables(r);
    r->tx_seq = calloc(r->n_tx, sizeof *r->tx_seq);
    r->tx_len = calloc(r->n_tx, sizeof *r->tx_len);
    r->tx_pkts = calloc(r->n_tx, sizeof *r->tx_pkts);
    r->tx_eop = calloc(r->n_tx, sizeof *r->tx_eop);
    if (!r->tx_seq || !r->tx_len || !r->tx_pkts || !r->tx_eop)
        return PCIR_ENOMEM;
    for (uint32_t i = 0; i < r->n_tx; i++)
        r->tx_eop[i] = i;
    r->rx_next = r->rx_tail = r->tx_next = r->tx_clean = r->rx_discard = 0;
    return 0;
}

void pci_ring_clean(struct pci_ring *r)
{
    for (uint32_t i = 0; i < r->n_rx; i++)
        rx_arm(r, i);
    memset(r->tx_ring, 0, (size_t)r->n_tx * DESC);
    for (uint32_t i = 0; i < r->n_tx; i++) {
        r->tx_seq[i] = -1;
        r->tx_len[i] = 0;
        r->tx_pkts[i] = 0;
        r->tx_eop[i] = i;
    }
    r->rx_discard = 0;
}

/* --- RX ------------------------------------------------------------------------------------ */

static int deliver(struct pci_ring *r, const uint8_t *frame, uint32_t len, uint8_t *out,
                   uint32_t out_cap, uint32_t *out_used)
{
    if (r->tap_fd >= 0) {
        /* a TAP with IFF_VNET_HDR wants a header in front of every frame: zeroed = nothing
         * known about the checksum */
        static const uint8_t zero_hdr[64];
        struct iovec iov[2] = {{(void *)zero_hdr, r->tap_vnet_hdr}, {(void *)frame, len}};
        ssize_t w;
        do
            w = r->tap_vnet_hdr ? writev(r->tap_fd, iov, 2) : write(r->tap_fd, frame, len);
        while (w < 0 && errno == EINTR);
        if (w < 0)
            r->st.tap_write_errors++;   /* interface down or queue full: the kernel drops, we count */
        return 1;
    }
    if (*out_used + 4 + len > out_cap)
        return 0;                       /* no room: leave the descriptor for the next call */
    memcpy(out + *out_used, &len, 4);
    memcpy(out + *out_used + 4, frame, len);
    *out_used += 4 + len;
    return 1;
}

/* --- RX coalescing ------------------------------------------------------------------------- */
/* Within one harvest call, in-order TCP segments of one flow go to the TAP as one GSO
 * super-frame (native/gro.c). The payloads are written straight from the DMA buffers (writev);
 * the descriptors are re-armed in memory only, the device gets them back with the RDT write
 * after this call returns, and every aggregate is written before it returns. */
enum {
    RXD_STAT_IXSM = 0x04, RXD_STAT_TCPCS = 0x20, RXD_STAT_IPCS = 0x40,
    RXD_ERR_TCPE = 0x20, RXD_ERR_IPE = 0x40,
};

/* The checksums the chip verified (IXSM: it did not look) */
static uint32_t hw_csum_ok(uint8_t status, uint8_t errors)
{
    if (status & RXD_STAT_IXSM)
        return 0;
    return ((status & RXD_STAT_IPCS) && !(errors & RXD_ERR_IPE) ? UDRV_GRO_IP_OK : 0)
           | ((status & RXD_STAT_TCPCS) && !(errors & RXD_ERR_TCPE) ? UDRV_GRO_TCP_OK : 0);
}

int pci_rx_harvest(struct pci_ring *r, uint32_t budget, uint8_t *out, uint32_t out_cap,
                     uint32_t *out_used)
{
    uint32_t n = r->n_rx, i = r->rx_next, done = 0;
    uint32_t limit = n - 1;             /* never more than the buffers we armed */
    if (budget && budget < limit)
        limit = budget;
    *out_used = 0;
    struct udrv_gro g;
    const struct udrv_gro_counters gc = {&r->st.rx_coalesced, &r->st.rx_super, &r->st.rx_csum_bad,
                                         &r->st.rx_super_refused, &r->st.tap_write_errors,
                                         &r->st.rx_acks_merged};
    int coalesce = udrv_gro_begin(&g, r->tap_fd, r->tap_vnet_hdr, &r->rx_coalesce, &gc);
    while (done < limit) {
        uint8_t *d = r->rx_ring + (uint64_t)i * DESC;
        uint8_t status = status_of(d);
        if (!(status & RXD_STAT_DD))
            break;
        uint32_t len = get16(d + 8);
        uint8_t errors = d[13];
        if (r->rx_discard) {
            if (status & RXD_STAT_EOP)
                r->rx_discard = 0;
        } else if (!(status & RXD_STAT_EOP)) {
            r->st.rx_dropped[PCIR_RX_NO_EOP]++;
            r->rx_discard = 1;
        } else if (len == 0) {
            r->st.rx_dropped[PCIR_RX_ZERO_LENGTH]++;
        } else if (len > r->rx_bufsize) {
            r->st.rx_dropped[PCIR_RX_OVERSIZE]++;
        } else if (errors & RXD_ERR_FRAME) {
            r->st.rx_dropped[PCIR_RX_ERROR]++;
        } else if (len < ETH_HLEN) {
            r->st.rx_dropped[PCIR_RX_RUNT]++;
        } else {
            const uint8_t *f = r->rx_buf + (uint64_t)i * r->rx_bufsize;
            if (coalesce)
                udrv_gro_frame(&g, f, len, hw_csum_ok(status, errors));
            else if (!deliver(r, f, len, out, out_cap, out_used))
                break;
            r->st.rx_packets++;
            r->st.rx_bytes += len;
        }
        rx_arm(r, i);
        i = (i + 1) % n;
        done++;
    }
    if (coalesce)
        udrv_gro_flush(&g);             /* never held across calls */
    /* the descriptor at RDT was never handed out: DD there is a device bug */
    uint8_t *hole = r->rx_ring + (uint64_t)r->rx_tail * DESC;
    if (status_of(hole) & RXD_STAT_DD) {
        r->st.rx_dropped[PCIR_RX_DD_NOT_ARMED]++;
        rx_arm(r, r->rx_tail);
    }
    if (done) {
        r->rx_next = i;
        r->rx_tail = (i + n - 1) % n;
        __atomic_thread_fence(__ATOMIC_RELEASE);   /* re-armed descriptors before the RDT write */
    }
    return (int)done;
}

int pci_rx_skip_lost(struct pci_ring *r, uint32_t rdh)
{
    uint32_t n = r->n_rx, i = r->rx_next;
    if (rdh >= n)
        return 0;
    uint32_t span = (rdh + n - i) % n, j;
    for (j = 0; j < span; j++)
        if (status_of(r->rx_ring + (uint64_t)((i + j) % n) * DESC) & RXD_STAT_DD)
            break;
    if (j == span || j == 0)
        return 0;                       /* write-back still pending, or nothing lost */
    for (uint32_t k = 0; k < j; k++) {
        r->st.rx_dropped[PCIR_RX_COMPLETION_LOST]++;
        rx_arm(r, (i + k) % n);
    }
    r->rx_next = (i + j) % n;
    r->rx_tail = (r->rx_next + n - 1) % n;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return (int)j;
}

/* --- TX ------------------------------------------------------------------------------------ */

/* Descriptors for one packet from tx_next on: an optional context descriptor, then the data
 * over as many buffers as it needs (legacy descriptors without ctx, extended data descriptors
 * with it); RS only on the last one, which every descriptor of the packet names in tx_eop.
 * Returns the index of the first data descriptor (its buffer holds the packet's headers). */
static uint32_t put_packet(struct pci_ring *r, const uint8_t *ctx, const uint8_t *data,
                           uint32_t len, uint8_t dcmd, uint8_t popts, uint32_t packets,
                           uint64_t wire_bytes, int64_t seq)
{
    uint32_t n = r->n_tx, bs = r->tx_bufsize, first = r->tx_next, i = first;
    if (ctx) {
        memcpy(r->tx_ring + (uint64_t)i * DESC, ctx, DESC);
        i = (i + 1) % n;
    }
    uint32_t data_first = i;
    uint32_t nbuf = len ? (len + bs - 1) / bs : 1;
    uint32_t last = (i + nbuf - 1) % n, off = 0;
    for (uint32_t k = 0; k < nbuf; k++) {
        uint32_t chunk = len - off < bs ? len - off : bs;
        uint8_t *d = r->tx_ring + (uint64_t)i * DESC;
        memcpy(r->tx_buf + (uint64_t)i * bs, data + off, chunk);
        put64(d, r->tx_buf_iova + (uint64_t)i * bs);
        uint8_t cmd = TXD_CMD_IFCS | (k == nbuf - 1 ? TXD_CMD_EOP | TXD_CMD_RS : 0);
        if (ctx) {
            uint32_t dw = chunk | (uint32_t)TXD_DTYP_DATA << 20
                          | (uint32_t)(cmd | TXD_CMD_DEXT | dcmd) << 24;
            memcpy(d + 8, &dw, 4);
            d[12] = 0;                 /* status */
            d[13] = popts;
        } else {
            uint16_t l16 = (uint16_t)chunk;
            memcpy(d + 8, &l16, 2);
            d[10] = 0;                 /* CSO */
            d[11] = cmd;
            d[12] = 0;                 /* status */
            d[13] = 0;                 /* CSS */
        }
        d[14] = d[15] = 0;             /* special */
        off += chunk;
        i = (i + 1) % n;
    }
    for (uint32_t k = first;; k = (k + 1) % n) {
        r->tx_eop[k] = last;
        if (k == last)
            break;
    }
    r->tx_seq[last] = seq;
    r->tx_len[last] = (uint32_t)wire_bytes;
    r->tx_pkts[last] = packets;
    r->tx_next = i;
    return data_first;
}

/* A journal frame that never goes on the wire is confirmed in order: now when nothing is in
 * flight, else together with the packet before it. */
int pci_tx_drop(struct pci_ring *r, uint64_t seq)
{
    if (r->tx_next == r->tx_clean) {
        int64_t c = udrv_journal_confirm_through(&r->journal, seq);
        if (c < 0) {
            r->journal_error = c;
            return PCIR_EJOURNAL;
        }
    } else {
        r->tx_seq[(r->tx_next + r->n_tx - 1) % r->n_tx] = (int64_t)seq;
    }
    return 0;
}

int pci_tx_put(struct pci_ring *r, const uint8_t *ctx, const uint8_t *data, uint32_t len,
                 uint8_t dcmd, uint8_t popts, uint32_t packets, uint64_t wire_bytes, int64_t seq)
{
    uint32_t n = r->n_tx, bs = r->tx_bufsize;
    uint32_t need = (ctx ? 1 : 0) + (len ? (len + bs - 1) / bs : 1);
    uint32_t free_d = n - 1 - (r->tx_next + n - r->tx_clean) % n;
    if (need > free_d)
        return 0;
    put_packet(r, ctx, data, len, dcmd, popts, packets, wire_bytes, seq);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return (int)need;
}

/* What the chip is asked to do for one frame with a virtio-net header. */
struct tx_plan {
    uint8_t ctx[DESC];
    uint8_t dcmd, popts;
    int tso, ipv4;
    uint32_t l3, l4, packets;
    uint64_t wire_bytes;
};

static inline uint16_t get16be(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* RFC 1071 sum of big-endian words, folded (not complemented). */
static uint32_t ones_sum(const uint8_t *p, uint32_t len, uint32_t sum)
{
    for (uint32_t i = 0; i + 1 < len; i += 2)
        sum += get16be(p + i);
    if (len & 1)
        sum += (uint32_t)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return sum;
}

static void put_ctx(uint8_t *c, uint8_t ipcss, uint8_t ipcso, uint16_t ipcse, uint8_t tucss,
                    uint8_t tucso, uint32_t paylen, uint8_t tucmd, uint8_t hdrlen, uint16_t mss)
{
    uint32_t dw = paylen | (uint32_t)TXD_DTYP_CONTEXT << 20 | (uint32_t)tucmd << 24;
    uint16_t tucse = 0;
    c[0] = ipcss;
    c[1] = ipcso;
    memcpy(c + 2, &ipcse, 2);
    c[4] = tucss;
    c[5] = tucso;
    memcpy(c + 6, &tucse, 2);
    memcpy(c + 8, &dw, 4);
    c[12] = 0;
    c[13] = hdrlen;
    memcpy(c + 14, &mss, 2);
}

/* 1: the chip does it (plan filled); 0: a case left to Python (software path, error
 * reporting, or a packet larger than the ring). Mirrors udrv/pcinet.py (PciRing._pieces) and
 * the 8254x codec in drivers/e1000.py (E1000Codec.context) and udrv/offload.py (plan),
 * for the common cases only. */
static int plan_offload(const struct pci_ring *r, const uint8_t *v, uint32_t vlen,
                        const uint8_t *f, uint32_t len, struct tx_plan *p)
{
    if (vlen < VNET_HDR_MIN)
        return 0;
    uint8_t flags = v[0], gso = v[1];
    uint16_t gso_size = get16(v + 4), cs = get16(v + 6), co = get16(v + 8);
    uint32_t bs = r->tx_bufsize;
    memset(p, 0, sizeof *p);
    p->packets = 1;
    p->wire_bytes = len;
    if (gso == VNET_GSO_NONE) {
        if (!(flags & VNET_F_NEEDS_CSUM))
            return 0;                   /* nothing to do: Python's path treats it as plain */
        uint32_t at = (uint32_t)cs + co;
        if (!(r->hw_offloads & PCIR_OFF_CSUM) || cs >= len || at + 2 > len || at > 0xFF
            || len > bs)
            return 0;
        put_ctx(p->ctx, 0, 0, 0, (uint8_t)cs, (uint8_t)at, 0,
                (co == 16 ? TUCMD_TCP : 0) | TXD_CMD_DEXT, 0, 0);
        p->popts = POPTS_TXSM;
        return 1;
    }
    if (gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6)
        return 0;                       /* ECN, UDP: software */
    if (!(flags & VNET_F_NEEDS_CSUM) || gso_size == 0)
        return 0;
    int v4 = gso == VNET_GSO_TCPV4;
    if (!(r->hw_offloads & (v4 ? PCIR_OFF_TSO4 : PCIR_OFF_TSO6)))
        return 0;
    uint32_t off = 12;
    if (len < off + 2)
        return 0;
    uint16_t etype = get16be(f + off);
    while (etype == 0x8100 || etype == 0x88A8 || etype == 0x9100) {
        off += 4;
        if (len < off + 2)
            return 0;
        etype = get16be(f + off);
    }
    uint32_t l3 = off + 2, l4;
    if (v4) {
        if (etype != 0x0800 || len < l3 + 20 || f[l3] >> 4 != 4 || (f[l3] & 0xF) < 5)
            return 0;
        l4 = l3 + (f[l3] & 0xF) * 4u;
        if (f[l3 + 9] != IPPROTO_TCP)
            return 0;
    } else {
        if (etype != 0x86DD || len < l3 + 40 || f[l3] >> 4 != 6)
            return 0;
        uint8_t nh = f[l3 + 6];
        l4 = l3 + 40;
        while ((nh == 0 || nh == 43 || nh == 60 || nh == 44) && l4 < cs) {
            if (len < l4 + 8)
                return 0;
            uint32_t step = nh == 44 ? 8 : (f[l4 + 1] + 1u) * 8;
            nh = f[l4];
            l4 += step;
        }
        if (nh != IPPROTO_TCP)
            return 0;
    }
    if (cs != l4 || len < l4 + 20 || (f[l4 + 12] >> 4) < 5)
        return 0;
    uint32_t hdr_len = l4 + (f[l4 + 12] >> 4) * 4u, at = l4 + 16;
    if (hdr_len >= len || hdr_len > 0xFF || at > 0xFF || l3 + 10 > 0xFF)
        return 0;
    uint32_t paylen = len - hdr_len;
    if (paylen > 0xFFFFF)
        return 0;
    uint32_t need = 1 + (len + bs - 1) / bs;
    if (need > r->n_tx - 1)
        return 0;                       /* larger than the ring: software pieces */
    uint8_t tucmd = TUCMD_TCP | TXD_CMD_TSE | TXD_CMD_DEXT | (v4 ? TUCMD_IP : 0);
    put_ctx(p->ctx, (uint8_t)l3, v4 ? (uint8_t)(l3 + 10) : 0, v4 ? (uint16_t)(l4 - 1) : 0,
            (uint8_t)l4, (uint8_t)at, paylen, tucmd, (uint8_t)hdr_len, gso_size);
    p->dcmd = TXD_CMD_TSE;
    p->popts = POPTS_TXSM | (v4 ? POPTS_IXSM : 0);
    p->tso = 1;
    p->ipv4 = v4;
    p->l3 = l3;
    p->l4 = l4;
    p->packets = (paylen + gso_size - 1) / gso_size;
    p->wire_bytes = len + (uint64_t)(p->packets - 1) * hdr_len;
    return 1;
}

/* The edits a TSO engine expects (see udrv.offload.tso_prepare), on our copy of the headers:
 * IPv4 header checksum 0, TCP checksum = pseudo-header sum without the length. */
static void tso_prepare(uint8_t *h, const struct tx_plan *p)
{
    uint32_t sum;
    if (p->ipv4) {
        h[p->l3 + 10] = h[p->l3 + 11] = 0;
        sum = ones_sum(h + p->l3 + 12, 8, IPPROTO_TCP);
    } else {
        sum = ones_sum(h + p->l3 + 8, 32, IPPROTO_TCP);
    }
    h[p->l4 + 16] = (uint8_t)(sum >> 8);
    h[p->l4 + 17] = (uint8_t)sum;
}

int pci_tx_fill(struct pci_ring *r)
{
    uint32_t n = r->n_tx, bs = r->tx_bufsize;
    int filled = 0;
    uint64_t now = udrv_journal_now_ns();     /* the AQM's clock, once per fill */
    r->python_entry = 0;
    for (;;) {
        uint32_t free_d = n - 1 - (r->tx_next + n - r->tx_clean) % n;
        if (free_d == 0)
            break;
        uint64_t seq;
        const uint8_t *vnet, *frame;
        uint32_t vlen, len;
        int rc = udrv_journal_peek_unsent(&r->journal, &seq, &vnet, &vlen, &frame, &len);
        if (rc == 0)
            break;
        if (rc < 0) {
            r->journal_error = rc;
            return PCIR_EJOURNAL;
        }
        if (udrv_journal_aqm_drop(&r->journal, now)) {   /* waited too long: leaves in order */
            udrv_journal_mark_sent(&r->journal, seq);
            if (pci_tx_drop(r, seq) < 0)
                return PCIR_EJOURNAL;
            continue;
        }
        struct tx_plan plan;
        const uint8_t *ctx = NULL;
        if (vlen) {
            if (!plan_offload(r, vnet, vlen, frame, len, &plan)) {
                r->python_entry = 1;    /* Python handles this one, then calls again */
                break;
            }
            ctx = plan.ctx;
        } else if (len < ETH_HLEN || len > bs) {
            /* cannot go on the wire: counted, and confirmed in order with its predecessor */
            r->st.tx_errors[len < ETH_HLEN ? PCIR_TX_RUNT : PCIR_TX_OVERSIZE]++;
            udrv_journal_mark_sent(&r->journal, seq);
            if (pci_tx_drop(r, seq) < 0)
                return PCIR_EJOURNAL;
            continue;
        }
        uint32_t need = (ctx ? 1 : 0) + (len + bs - 1) / bs;
        if (need > free_d)
            break;
        udrv_journal_mark_sent(&r->journal, seq);
        if (ctx) {
            uint32_t d = put_packet(r, ctx, frame, len, plan.dcmd, plan.popts, plan.packets,
                                    plan.wire_bytes, (int64_t)seq);
            if (plan.tso) {
                tso_prepare(r->tx_buf + (uint64_t)d * bs, &plan);
                r->st.tx_offload_tso++;
            } else {
                r->st.tx_offload_csum++;
            }
        } else {
            put_packet(r, NULL, frame, len, 0, 0, 1, len, (int64_t)seq);
        }
        filled++;
    }
    if (filled)
        __atomic_thread_fence(__ATOMIC_RELEASE);   /* descriptors and buffers before the TDT write */
    return filled;
}

static int tx_complete(struct pci_ring *r, uint32_t upto, int64_t last, uint64_t done,
                       uint64_t nbytes)
{
    int reclaimed = (int)((upto + r->n_tx - r->tx_clean) % r->n_tx);
    r->tx_clean = upto;
    if (last >= 0) {
        int64_t c = udrv_journal_confirm_through(&r->journal, (uint64_t)last);
        if (c < 0) {
            r->journal_error = c;
            return PCIR_EJOURNAL;
        }
    }
    r->st.tx_packets += done;
    r->st.tx_bytes += nbytes;
    return reclaimed;
}

int pci_tx_reclaim(struct pci_ring *r)
{
    uint32_t n = r->n_tx, i = r->tx_clean, end = r->tx_next;
    int64_t last = -1;
    uint64_t done = 0, nbytes = 0;
    while (i != end) {
        uint32_t e = r->tx_eop[i];     /* the packet's last descriptor: the one with RS */
        uint8_t *d = r->tx_ring + (uint64_t)e * DESC;
        uint8_t status = status_of(d);
        if (!(status & TXD_STAT_DD))
            break;
        d[12] = 0;                     /* a stale DD must never pass for a new one */
        if (status & (TXD_STAT_EC | TXD_STAT_LC)) {
            r->st.tx_errors[status & TXD_STAT_EC ? PCIR_TX_EXCESS_COLLISIONS : PCIR_TX_LATE_COLLISION]++;
        } else {
            done += r->tx_pkts[e];
            nbytes += r->tx_len[e];
        }
        if (r->tx_seq[e] >= 0)
            last = r->tx_seq[e];
        i = (e + 1) % n;
    }
    if (i == r->tx_clean)
        return 0;
    return tx_complete(r, i, last, done, nbytes);
}

int pci_tx_skip_lost(struct pci_ring *r)
{
    uint32_t n = r->n_tx, i = r->tx_clean, end = r->tx_next, k;
    int64_t last_dd = -1;
    for (k = i; k != end; k = (r->tx_eop[k] + 1) % n) {
        uint32_t e = r->tx_eop[k];
        if (status_of(r->tx_ring + (uint64_t)e * DESC) & TXD_STAT_DD)
            last_dd = e;
    }
    if (last_dd < 0)
        return 0;
    uint32_t stop = ((uint32_t)last_dd + 1) % n;
    uint64_t done = 0, nbytes = 0;
    int64_t last = -1;
    for (k = i; k != stop; k = (r->tx_eop[k] + 1) % n) {
        uint32_t e = r->tx_eop[k];
        uint8_t *d = r->tx_ring + (uint64_t)e * DESC;
        if (!(status_of(d) & TXD_STAT_DD))
            r->st.tx_errors[PCIR_TX_COMPLETION_LOST]++;
        d[12] = 0;
        done += r->tx_pkts[e];
        nbytes += r->tx_len[e];
        if (r->tx_seq[e] >= 0)
            last = r->tx_seq[e];
    }
    return tx_complete(r, stop, last, done, nbytes);
}

int pci_tx_check_unarmed(struct pci_ring *r)
{
    uint8_t *d = r->tx_ring + (uint64_t)r->tx_next * DESC;
    if (!(status_of(d) & TXD_STAT_DD))
        return 0;
    r->st.tx_errors[PCIR_TX_DD_NOT_ARMED]++;
    d[12] = 0;
    return 1;
}

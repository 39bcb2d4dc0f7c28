/* e1000 legacy-descriptor rings: RX harvest, TX fill and reclaim, in memory only.
 * See e1000_ring.h for the layout and the division of work with Python (drivers/e1000.py). */
#include "e1000_ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "e1000 descriptors are little-endian; this build assumes a little-endian CPU"
#endif

enum {
    DESC = 16,
    RXD_STAT_DD = 0x01, RXD_STAT_EOP = 0x02,
    RXD_ERR_FRAME = 0x01 | 0x02 | 0x04 | 0x10 | 0x80,   /* CE, SE, SEQ, CXE, RXE */
    TXD_CMD = 0x01 | 0x02 | 0x08,                       /* EOP | IFCS | RS */
    TXD_STAT_DD = 0x01, TXD_STAT_EC = 0x02, TXD_STAT_LC = 0x04,
    ETH_HLEN = 14,
};

/* The device writes status last; read it with acquire so the length and the buffer read after
 * it are the ones the device wrote before setting DD. */
static inline uint8_t status_of(const uint8_t *desc)
{
    return __atomic_load_n(desc + 12, __ATOMIC_ACQUIRE);
}

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline void rx_arm(struct e1000_ring *r, uint32_t i)
{
    uint8_t *d = r->rx_ring + (uint64_t)i * DESC;
    put64(d, r->rx_buf_iova + (uint64_t)i * r->rx_bufsize);
    memset(d + 8, 0, 8);
}

int e1000_ring_init(struct e1000_ring *r, int journal_fd, uint32_t nslots, uint32_t slot_size)
{
    r->tx_seq = NULL;
    r->tx_len = NULL;
    memset(&r->st, 0, sizeof r->st);
    r->journal_error = 0;
    int rc = udrv_journal_map_fd(&r->journal, journal_fd, nslots, slot_size);
    return rc < 0 ? E1000R_EJOURNAL : 0;
}

void e1000_ring_fini(struct e1000_ring *r)
{
    free(r->tx_seq);
    free(r->tx_len);
    r->tx_seq = NULL;
    r->tx_len = NULL;
    udrv_journal_unmap(&r->journal);
}

int e1000_ring_bind(struct e1000_ring *r)
{
    if (r->n_rx < 8 || r->n_tx < 8 || r->n_rx % 8 || r->n_tx % 8 || !r->rx_ring || !r->tx_ring
        || !r->rx_buf || !r->tx_buf || r->rx_bufsize < 256 || r->tx_bufsize < 256)
        return E1000R_EINVAL;
    free(r->tx_seq);
    free(r->tx_len);
    r->tx_seq = calloc(r->n_tx, sizeof *r->tx_seq);
    r->tx_len = calloc(r->n_tx, sizeof *r->tx_len);
    if (!r->tx_seq || !r->tx_len)
        return E1000R_ENOMEM;
    r->rx_next = r->rx_tail = r->tx_next = r->tx_clean = r->rx_discard = 0;
    return 0;
}

void e1000_ring_clean(struct e1000_ring *r)
{
    for (uint32_t i = 0; i < r->n_rx; i++)
        rx_arm(r, i);
    memset(r->tx_ring, 0, (size_t)r->n_tx * DESC);
    for (uint32_t i = 0; i < r->n_tx; i++) {
        r->tx_seq[i] = -1;
        r->tx_len[i] = 0;
    }
    r->rx_discard = 0;
}

/* --- RX ------------------------------------------------------------------------------------ */

static int deliver(struct e1000_ring *r, const uint8_t *frame, uint32_t len, uint8_t *out,
                   uint32_t out_cap, uint32_t *out_used)
{
    if (r->tap_fd >= 0) {
        ssize_t w;
        do
            w = write(r->tap_fd, frame, len);
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

int e1000_rx_harvest(struct e1000_ring *r, uint32_t budget, uint8_t *out, uint32_t out_cap,
                     uint32_t *out_used)
{
    uint32_t n = r->n_rx, i = r->rx_next, done = 0;
    uint32_t limit = n - 1;             /* never more than the buffers we armed */
    if (budget && budget < limit)
        limit = budget;
    *out_used = 0;
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
            r->st.rx_dropped[E1000R_RX_NO_EOP]++;
            r->rx_discard = 1;
        } else if (len == 0) {
            r->st.rx_dropped[E1000R_RX_ZERO_LENGTH]++;
        } else if (len > r->rx_bufsize) {
            r->st.rx_dropped[E1000R_RX_OVERSIZE]++;
        } else if (errors & RXD_ERR_FRAME) {
            r->st.rx_dropped[E1000R_RX_ERROR]++;
        } else if (len < ETH_HLEN) {
            r->st.rx_dropped[E1000R_RX_RUNT]++;
        } else {
            if (!deliver(r, r->rx_buf + (uint64_t)i * r->rx_bufsize, len, out, out_cap, out_used))
                break;
            r->st.rx_packets++;
            r->st.rx_bytes += len;
        }
        rx_arm(r, i);
        i = (i + 1) % n;
        done++;
    }
    /* the descriptor at RDT was never handed out: DD there is a device bug */
    uint8_t *hole = r->rx_ring + (uint64_t)r->rx_tail * DESC;
    if (status_of(hole) & RXD_STAT_DD) {
        r->st.rx_dropped[E1000R_RX_DD_NOT_ARMED]++;
        rx_arm(r, r->rx_tail);
    }
    if (done) {
        r->rx_next = i;
        r->rx_tail = (i + n - 1) % n;
        __atomic_thread_fence(__ATOMIC_RELEASE);   /* re-armed descriptors before the RDT write */
    }
    return (int)done;
}

int e1000_rx_skip_lost(struct e1000_ring *r, uint32_t rdh)
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
        r->st.rx_dropped[E1000R_RX_COMPLETION_LOST]++;
        rx_arm(r, (i + k) % n);
    }
    r->rx_next = (i + j) % n;
    r->rx_tail = (r->rx_next + n - 1) % n;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return (int)j;
}

/* --- TX ------------------------------------------------------------------------------------ */

int e1000_tx_fill(struct e1000_ring *r)
{
    uint32_t n = r->n_tx, nxt = r->tx_next;
    uint32_t free_slots = n - 1 - (nxt + n - r->tx_clean) % n;
    int filled = 0;
    while (free_slots > 0) {
        uint64_t seq;
        const uint8_t *frame;
        uint32_t len;
        int rc = udrv_journal_take_unsent(&r->journal, &seq, &frame, &len);
        if (rc == 0)
            break;
        if (rc < 0) {
            r->journal_error = rc;
            return E1000R_EJOURNAL;
        }
        if (len < ETH_HLEN || len > r->tx_bufsize) {
            /* cannot go on the wire: counted, and confirmed in order with its predecessor */
            r->st.tx_errors[len < ETH_HLEN ? E1000R_TX_RUNT : E1000R_TX_OVERSIZE]++;
            if (nxt == r->tx_clean) {
                int64_t c = udrv_journal_confirm_through(&r->journal, seq);
                if (c < 0) {
                    r->journal_error = c;
                    return E1000R_EJOURNAL;
                }
            } else {
                r->tx_seq[(nxt + n - 1) % n] = (int64_t)seq;
            }
            continue;
        }
        uint8_t *d = r->tx_ring + (uint64_t)nxt * DESC;
        memcpy(r->tx_buf + (uint64_t)nxt * r->tx_bufsize, frame, len);
        put64(d, r->tx_buf_iova + (uint64_t)nxt * r->tx_bufsize);
        uint16_t l16 = (uint16_t)len;
        memcpy(d + 8, &l16, 2);
        d[10] = 0;                     /* CSO */
        d[11] = TXD_CMD;
        d[12] = 0;                     /* status */
        d[13] = 0;                     /* CSS */
        d[14] = d[15] = 0;             /* special */
        r->tx_seq[nxt] = (int64_t)seq;
        r->tx_len[nxt] = len;
        nxt = (nxt + 1) % n;
        free_slots--;
        filled++;
    }
    if (filled) {
        r->tx_next = nxt;
        __atomic_thread_fence(__ATOMIC_RELEASE);   /* descriptors and buffers before the TDT write */
    }
    return filled;
}

static int tx_complete(struct e1000_ring *r, uint32_t upto, int64_t last, uint64_t done,
                       uint64_t nbytes)
{
    int reclaimed = (int)((upto + r->n_tx - r->tx_clean) % r->n_tx);
    r->tx_clean = upto;
    if (last >= 0) {
        int64_t c = udrv_journal_confirm_through(&r->journal, (uint64_t)last);
        if (c < 0) {
            r->journal_error = c;
            return E1000R_EJOURNAL;
        }
    }
    r->st.tx_packets += done;
    r->st.tx_bytes += nbytes;
    return reclaimed;
}

int e1000_tx_reclaim(struct e1000_ring *r)
{
    uint32_t n = r->n_tx, i = r->tx_clean, end = r->tx_next;
    int64_t last = -1;
    uint64_t done = 0, nbytes = 0;
    while (i != end) {
        uint8_t *d = r->tx_ring + (uint64_t)i * DESC;
        uint8_t status = status_of(d);
        if (!(status & TXD_STAT_DD))
            break;
        d[12] = 0;                     /* a stale DD must never pass for a new one */
        if (status & (TXD_STAT_EC | TXD_STAT_LC)) {
            r->st.tx_errors[status & TXD_STAT_EC ? E1000R_TX_EXCESS_COLLISIONS : E1000R_TX_LATE_COLLISION]++;
        } else {
            done++;
            nbytes += r->tx_len[i];
        }
        last = r->tx_seq[i];
        i = (i + 1) % n;
    }
    if (i == r->tx_clean)
        return 0;
    return tx_complete(r, i, last, done, nbytes);
}

int e1000_tx_skip_lost(struct e1000_ring *r)
{
    uint32_t n = r->n_tx, i = r->tx_clean, end = r->tx_next, k;
    int64_t last_dd = -1;
    for (k = i; k != end; k = (k + 1) % n)
        if (status_of(r->tx_ring + (uint64_t)k * DESC) & TXD_STAT_DD)
            last_dd = k;
    if (last_dd < 0)
        return 0;
    uint32_t stop = ((uint32_t)last_dd + 1) % n;
    uint64_t done = 0, nbytes = 0;
    for (k = i; k != stop; k = (k + 1) % n) {
        uint8_t *d = r->tx_ring + (uint64_t)k * DESC;
        if (!(status_of(d) & TXD_STAT_DD))
            r->st.tx_errors[E1000R_TX_COMPLETION_LOST]++;
        d[12] = 0;
        done++;
        nbytes += r->tx_len[k];
    }
    return tx_complete(r, stop, r->tx_seq[last_dd], done, nbytes);
}

int e1000_tx_check_unarmed(struct e1000_ring *r)
{
    uint8_t *d = r->tx_ring + (uint64_t)r->tx_next * DESC;
    if (!(status_of(d) & TXD_STAT_DD))
        return 0;
    r->st.tx_errors[E1000R_TX_DD_NOT_ARMED]++;
    d[12] = 0;
    return 1;
}

/* Benchmark helpers: bare TAP forwarding loop, packet generator, TAP -> journal reader, and a
 * fake e1000 device side. See tapfwd.h. */
#include "tapfwd.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

enum {
    DESC = 16,
    RXD_STAT_DD = 0x01, RXD_STAT_EOP = 0x02,
    TXD_CMD_EOP = 0x01, TXD_CMD_DEXT = 0x20, TXD_STAT_DD = 0x01,
    FRAME_MAX = 65536 + 256,
};

int64_t udrv_tapfwd_bare(int in_fd, int out_fd, uint64_t max_frames, struct udrv_tapfwd_stats *st)
{
    static uint8_t buf[FRAME_MAX];
    int64_t done = 0;
    while (!max_frames || (uint64_t)done < max_frames) {
        ssize_t n = read(in_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                st->read_errors++;
            break;
        }
        ssize_t w;
        do
            w = write(out_fd, buf, (size_t)n);
        while (w < 0 && errno == EINTR);
        if (w < 0)
            st->write_errors++;
        st->frames++;
        st->bytes += (uint64_t)n;
        done++;
    }
    return done;
}

int64_t udrv_tapfwd_inject(int fd, const uint8_t *frame, uint32_t len, uint64_t count)
{
    int64_t sent = 0;
    while ((uint64_t)sent < count) {
        ssize_t w = write(fd, frame, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        sent++;
    }
    return sent;
}

int64_t udrv_tapfwd_to_journal(int in_fd, struct udrv_journal *j, uint32_t budget,
                               struct udrv_tapfwd_stats *st)
{
    int64_t done = 0;
    while ((uint32_t)done < budget) {
        uint32_t cap;
        uint8_t *p = udrv_journal_reserve(j, &cap);
        if (!p) {
            st->journal_full++;
            break;
        }
        ssize_t n = read(in_fd, p, cap);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                st->read_errors++;
            break;
        }
        udrv_journal_commit(j, (uint32_t)n);
        st->frames++;
        st->bytes += (uint64_t)n;
        done++;
    }
    return done;
}

/* --- fake device side ------------------------------------------------------------------ */

static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline void set_status(uint8_t *desc, uint8_t status)
{
    __atomic_store_n(desc + 12, status, __ATOMIC_RELEASE);   /* status last, as a device does */
}

/* Copy one TX descriptor's data into the RX ring; EOP closes the RX frame. */
static void loop_data(struct udrv_fakedev *d, const uint8_t *txd, uint32_t len, int eop)
{
    uint64_t addr = get64(txd);
    uint64_t tx_area = (uint64_t)d->n_tx * d->tx_bufsize;
    if (addr < d->tx_buf_iova || addr - d->tx_buf_iova + len > tx_area) {
        d->bad++;                       /* not one of the driver's TX buffers: a DMAR fault */
        return;
    }
    if (d->rdh == d->rdt) {             /* no RX buffer armed: the frame is missed */
        if (eop) {
            d->rx_missed++;
            d->rx_off = 0;
        }
        return;
    }
    uint8_t *rxd = d->rx_ring + (uint64_t)d->rdh * DESC;
    uint64_t raddr = get64(rxd);
    uint64_t rx_area = (uint64_t)d->n_rx * d->rx_bufsize;
    if (raddr < d->rx_buf_iova || raddr - d->rx_buf_iova + d->rx_bufsize > rx_area
        || d->rx_off + len > d->rx_bufsize) {
        d->bad++;
        d->rx_off = 0;
        return;
    }
    memcpy(d->rx_buf + (raddr - d->rx_buf_iova) + d->rx_off, d->tx_buf + (addr - d->tx_buf_iova), len);
    d->rx_off += len;
    if (!eop)
        return;
    uint16_t l16 = (uint16_t)d->rx_off;
    memcpy(rxd + 8, &l16, 2);
    rxd[10] = rxd[11] = rxd[13] = rxd[14] = rxd[15] = 0;
    set_status(rxd, RXD_STAT_DD | RXD_STAT_EOP);
    d->rx_off = 0;
    d->rdh = (d->rdh + 1) % d->n_rx;
    d->rx_done++;
}

uint32_t udrv_fakedev_tdt(struct udrv_fakedev *d, uint32_t tdt)
{
    uint32_t n = d->n_tx, done = 0;
    if (tdt >= n || d->tdh >= n)
        return 0;
    while (d->tdh != tdt) {
        uint8_t *txd = d->tx_ring + (uint64_t)d->tdh * DESC;
        uint8_t cmd = txd[11];
        if (d->loop) {
            if (cmd & TXD_CMD_DEXT) {
                uint32_t dw;
                memcpy(&dw, txd + 8, 4);
                if (((dw >> 20) & 0xF) == 1)            /* data; a context descriptor carries none */
                    loop_data(d, txd, dw & 0xFFFFF, cmd & TXD_CMD_EOP);
            } else {
                uint16_t len;
                memcpy(&len, txd + 8, 2);
                loop_data(d, txd, len, cmd & TXD_CMD_EOP);
            }
        }
        set_status(txd, (uint8_t)(txd[12] | TXD_STAT_DD));
        d->tdh = (d->tdh + 1) % n;
        d->tx_done++;
        done++;
    }
    return done;
}

uint32_t udrv_fakedev_rdt(struct udrv_fakedev *d, uint32_t rdt)
{
    uint32_t n = d->n_rx, done = 0;
    if (rdt >= n)
        return 0;
    d->rdt = rdt;
    if (d->loop || !d->rx_len)
        return 0;
    uint16_t l16 = (uint16_t)d->rx_len;
    while (d->rdh != rdt) {
        uint8_t *rxd = d->rx_ring + (uint64_t)d->rdh * DESC;
        memcpy(rxd + 8, &l16, 2);
        rxd[10] = rxd[11] = rxd[13] = rxd[14] = rxd[15] = 0;
        set_status(rxd, RXD_STAT_DD | RXD_STAT_EOP);
        d->rdh = (d->rdh + 1) % n;
        d->rx_done++;
        done++;
    }
    return done;
}

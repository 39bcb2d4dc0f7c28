/* The Pegasus device's bulk data path (see pegpump.h). The rules are the model's
 * (udrv/models/pegasus.py: _parse_tx, _transmit, _receive, _accepts, _rx_transfer), read from
 * it and restated here; nothing is shared with the udrv driver's framing. */
#define _GNU_SOURCE
#include "pegpump.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* --- the chip (names as in udrv/models/pegasus.py) --- */
enum {
    CTL0_INCLUDE_CRC = 0x01, CTL0_ALLMULTI = 0x02, CTL0_RXSTAT_APPEND = 0x08,
    CTL0_RX_EN = 0x40, CTL0_TX_EN = 0x80,
    CTL1_100MBIT = 0x10, CTL1_FULL_DUPLEX = 0x20,
    CTL2_PROMISC = 0x04,
    RXS_MCAST = 0x01,
    MAX_TX_FRAME = 1518, MAX_RX_FRAME = 1518, MIN_FRAME = 14,
};

enum { TAG_OUT = 1, TAG_IN = 2, TAG_ZLP = 3 };
#define RETRY_NS (10 * 1000 * 1000ull)   /* after a failed transfer (reset, disable): retry later */
#define SAFETY_MS 500                    /* poll timeout when nothing is pending */
#define TAP_BUDGET 128                   /* TAP reads per pass: the OUT side gets its turn */

struct out_slot {
    uint8_t *buf;
    int64_t result;
    int done;
};

struct in_slot {
    uint8_t *buf;
    uint32_t len;
};

struct queue {                           /* fixed slots of UDRV_PEGPUMP_BUF bytes, FIFO */
    uint8_t *mem;
    uint32_t len[UDRV_PEGPUMP_DEFER_SLOTS > UDRV_PEGPUMP_INJECT_SLOTS ? UDRV_PEGPUMP_DEFER_SLOTS
                                                                        : UDRV_PEGPUMP_INJECT_SLOTS];
    uint32_t slots, head, count;
};

struct udrv_pegpump_io {
    aio_context_t ctx;
    int aio_efd;
    struct udrv_pegpump_config cfg;      /* the pump's own copy */
    uint32_t cfg_gen;
    struct out_slot out[UDRV_PEGPUMP_DEPTH_MAX];
    uint64_t out_next, out_deliver;      /* sequence numbers: next read to submit / to deliver */
    struct in_slot in[UDRV_PEGPUMP_DEPTH_MAX];
    uint32_t in_free[UDRV_PEGPUMP_DEPTH_MAX], n_free;
    uint64_t out_retry_at, in_retry_at;
    struct queue defer, inject;
    uint8_t zero[8];
    uint32_t crc_table[256];
};

/* ----------------------------------------------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void poke(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof one);
    (void)r;
}

static void drain(int efd)
{
    uint64_t v;
    ssize_t r = read(efd, &v, sizeof v);
    (void)r;
}

static void crc_init(uint32_t *t)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
    }
}

/* zlib.crc32: reflected IEEE 802.3, init and final xor 0xFFFFFFFF */
static uint32_t crc32_ieee(const uint32_t *t, const uint8_t *p, uint32_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = t[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static int queue_init(struct queue *q, uint32_t slots)
{
    q->mem = aligned_alloc(64, (size_t)slots * UDRV_PEGPUMP_BUF);
    q->slots = slots;
    q->head = q->count = 0;
    return q->mem ? 0 : -1;
}

static uint8_t *queue_slot(struct queue *q, uint32_t i)
{
    return q->mem + (size_t)((q->head + i) % q->slots) * UDRV_PEGPUMP_BUF;
}

/* caller holds p->lock */
static int queue_push(struct queue *q, const uint8_t *data, uint32_t len)
{
    if (q->count == q->slots || len > UDRV_PEGPUMP_BUF)
        return -1;
    uint32_t i = (q->head + q->count) % q->slots;
    memcpy(q->mem + (size_t)i * UDRV_PEGPUMP_BUF, data, len);
    q->len[i] = len;
    q->count++;
    return 0;
}

static void queue_pop(struct queue *q)
{
    if (q->count) {
        q->head = (q->head + 1) % q->slots;
        q->count--;
    }
}

/* --- AIO ------------------------------------------------------------------------------------ */

static int io_submit_n(aio_context_t ctx, long n, struct iocb **cbs)
{
    return (int)syscall(SYS_io_submit, ctx, n, cbs);
}

static void prep(struct iocb *cb, int efd, int fd, int write, void *buf, uint32_t len, uint64_t tag)
{
    memset(cb, 0, sizeof *cb);
    cb->aio_data = tag;
    cb->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)buf;
    cb->aio_nbytes = len;
    cb->aio_flags = IOCB_FLAG_RESFD;
    cb->aio_resfd = (uint32_t)efd;
}

static uint64_t tag(uint32_t kind, uint32_t index)
{
    return (uint64_t)kind << 32 | index;
}

/* --- TX: host -> wire --------------------------------------------------------------------- */

static void tx_fast(struct udrv_pegpump *p, const struct udrv_pegpump_config *c, const uint8_t *d, uint32_t n)
{
    struct udrv_pegpump_stats *s = &p->st;
    s->tx_transfers++;
    uint32_t length = n >= 2 ? (uint32_t)(d[0] | d[1] << 8) : 0;
    if (n < 2 || length == 0 || length > MAX_TX_FRAME || length + 2 > n) {
        s->tx_malformed++;
        return;
    }
    int padded = n == length + 3 && (length + 2) % 64 == 0;
    if (n > length + 2 && !padded)
        s->tx_extra_bytes++;
    if (n == length + 2 && n % 64 == 0)
        s->tx_missing_pad++;
    if (!(c->ctl0 & CTL0_TX_EN)) {
        s->tx_dropped_disabled++;
        return;
    }
    if (!!(c->ctl1 & CTL1_FULL_DUPLEX) != !!c->link_full || !!(c->ctl1 & CTL1_100MBIT) != !!c->link_100)
        s->tx_mode_mismatch++;
    s->tx_frames++;
    s->tx_bytes += length;
    s->wire_out++;
    if (write(p->tap_fd, d + 2, length) < 0)
        s->wire_write_errors++;    /* the peer's queue is full: the wire drops, like a real one */
}

/* Completed OUT reads, in the order the host sent them. */
static void deliver_out(struct udrv_pegpump *p)
{
    struct udrv_pegpump_io *io = p->io;
    while (io->out_deliver < io->out_next) {
        struct out_slot *sl = &io->out[io->out_deliver % p->out_depth];
        if (!sl->done)
            break;
        if (sl->result < 0) {
            p->st.out_errors++;
            p->st.last_out_error = (int32_t)-sl->result;
            io->out_retry_at = now_ns() + RETRY_NS;
        } else {
            uint32_t n = (uint32_t)sl->result;
            p->st.out_transfers++;
            p->st.out_bytes += n;
            pthread_mutex_lock(&p->lock);
            int slow = io->cfg.tx_slow || io->defer.count;   /* keep the order behind Python's */
            int queued = slow ? queue_push(&io->defer, sl->buf, n) : 0;
            pthread_mutex_unlock(&p->lock);
            if (slow) {
                if (queued < 0)
                    break;               /* Python is behind: hold it (the host's next ones wait) */
                p->st.deferred_out++;
                poke(p->py_efd);
            } else {
                tx_fast(p, &io->cfg, sl->buf, n);
            }
        }
        sl->done = 0;
        io->out_deliver++;
    }
}

static void submit_out(struct udrv_pegpump *p, uint64_t now)
{
    struct udrv_pegpump_io *io = p->io;
    if (!io->cfg.enabled || now < io->out_retry_at)
        return;
    struct iocb cb[UDRV_PEGPUMP_DEPTH_MAX], *cbs[UDRV_PEGPUMP_DEPTH_MAX];
    long n = 0;
    for (uint64_t seq = io->out_next; seq - io->out_deliver < p->out_depth; seq++, n++) {
        uint32_t i = (uint32_t)(seq % p->out_depth);
        prep(&cb[n], io->aio_efd, p->ep_out, 0, io->out[i].buf, UDRV_PEGPUMP_BUF, tag(TAG_OUT, i));
        cbs[n] = &cb[n];
        io->out[i].done = 0;
    }
    if (!n)
        return;
    /* one system call for all of them (they queue in this order) */
    int got = io_submit_n(io->ctx, n, cbs);
    if (got < n) {
        p->st.submit_errors++;
        io->out_retry_at = now + RETRY_NS;
    }
    if (got > 0) {
        io->out_next += (uint64_t)got;
        p->in_flight_out += (uint32_t)got;
    }
}

/* --- RX: wire -> host --------------------------------------------------------------------- */

static int accepts(const struct udrv_pegpump_io *io, const uint8_t *dst)
{
    const struct udrv_pegpump_config *c = &io->cfg;
    static const uint8_t bcast[6] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    if (c->ctl2 & CTL2_PROMISC)
        return 1;
    if (!memcmp(dst, bcast, 6) || !memcmp(dst, c->mac, 6))
        return 1;
    if (dst[0] & 0x01) {
        if (c->ctl0 & CTL0_ALLMULTI)
            return 1;
        if (c->multicast_hash) {
            /* low 6 bits of the CRC before its final inversion */
            uint32_t h = (crc32_ieee(io->crc_table, dst, 6) ^ 0xFFFFFFFFu) & 0x3F;
            return !!(c->hash[h >> 3] & (1u << (h & 7)));
        }
    }
    return 0;
}

/* Judge a frame read from the wire at buf + 2 (room for the ADM8513 header) and build the
 * transfer in place; its length, or 0 when the NIC drops the frame (counted). */
static uint32_t rx_build(struct udrv_pegpump *p, uint8_t *buf, uint32_t flen)
{
    struct udrv_pegpump_io *io = p->io;
    const struct udrv_pegpump_config *c = &io->cfg;
    struct udrv_pegpump_stats *s = &p->st;
    uint8_t *frame = buf + 2;
    if (c->unplugged) {
        s->rx_dropped_unplugged++;
        return 0;
    }
    if (!c->link_up) {
        s->rx_dropped_link++;
        return 0;
    }
    if (!(c->ctl0 & CTL0_RX_EN)) {
        s->rx_dropped_disabled++;
        return 0;
    }
    if (flen < MIN_FRAME || flen > MAX_RX_FRAME) {
        s->rx_dropped_size++;
        return 0;
    }
    if (!accepts(io, frame)) {
        s->rx_dropped_filter++;
        return 0;
    }
    uint8_t status = c->status_mcast_bit && (frame[0] & 0x01) ? RXS_MCAST : 0;
    uint32_t end = 2 + flen;
    if (c->ctl0 & CTL0_INCLUDE_CRC) {
        uint32_t crc = crc32_ieee(io->crc_table, frame, flen);
        for (int k = 0; k < 4; k++)
            buf[end++] = (uint8_t)(crc >> (8 * k));
    }
    if (c->ctl0 & CTL0_RXSTAT_APPEND) {
        uint32_t n = flen + 4;           /* counts the CRC whether or not it is in the transfer */
        buf[end++] = (uint8_t)(n & 0xFF);
        buf[end++] = (uint8_t)((n >> 8) & 0x0F);
        buf[end++] = status;
        buf[end++] = 0;
    }
    s->rx_frames++;
    s->rx_bytes += flen;
    if (c->adm8513) {
        buf[0] = (uint8_t)(flen & 0xFF);
        buf[1] = (uint8_t)((flen >> 8) & 0x0F);
        return end;                      /* starts at buf */
    }
    memmove(buf, frame, end - 2);
    return end - 2;
}

/* IN transfers built in one pass, submitted with one system call (they queue in order). */
struct in_batch {
    struct iocb cb[2 * UDRV_PEGPUMP_DEPTH_MAX];
    struct iocb *cbs[2 * UDRV_PEGPUMP_DEPTH_MAX];
    long n;
};

/* Add slot i (len bytes) for EP 0x81, with a ZLP behind a packet-size multiple. */
static void batch_in(struct udrv_pegpump *p, struct in_batch *b, uint32_t i, uint32_t len)
{
    struct udrv_pegpump_io *io = p->io;
    uint32_t mps = io->cfg.max_packet ? io->cfg.max_packet : 512;
    prep(&b->cb[b->n], io->aio_efd, p->ep_in, 1, io->in[i].buf, len, tag(TAG_IN, i));
    b->cbs[b->n] = &b->cb[b->n];
    b->n++;
    if (len && len % mps == 0) {
        /* without a ZLP the host would merge the next transfer into this one */
        prep(&b->cb[b->n], io->aio_efd, p->ep_in, 1, io->zero, 0, tag(TAG_ZLP, 0));
        b->cbs[b->n] = &b->cb[b->n];
        b->n++;
    }
}

static void flush_in(struct udrv_pegpump *p, struct in_batch *b, uint64_t now)
{
    struct udrv_pegpump_io *io = p->io;
    if (!b->n)
        return;
    int got = io_submit_n(io->ctx, b->n, b->cbs);
    if (got < 0)
        got = 0;
    for (long k = 0; k < b->n; k++) {
        uint32_t kind = (uint32_t)(b->cb[k].aio_data >> 32), i = (uint32_t)b->cb[k].aio_data;
        if (k < got) {
            p->in_flight_in++;
            if (kind == TAG_IN)
                p->st.rx_transfers++;
            else
                p->st.zlps++;
        } else if (kind == TAG_IN) {
            p->st.in_lost++;
            io->in_free[io->n_free++] = i;
        }
    }
    if (got < b->n) {
        p->st.submit_errors++;
        io->in_retry_at = now + RETRY_NS;
    }
    b->n = 0;
}

/* Fill free IN slots: Python's injected transfers first, then frames from the wire.
 * Returns 1 when the TAP should be watched (a slot is free and the TAP ran dry). */
static int fill_slots(struct udrv_pegpump *p, struct in_batch *b)
{
    struct udrv_pegpump_io *io = p->io;
    while (io->n_free) {
        uint32_t i = io->in_free[io->n_free - 1];
        pthread_mutex_lock(&p->lock);
        int have = io->inject.count > 0;
        uint32_t len = 0;
        if (have) {
            len = io->inject.len[io->inject.head];
            memcpy(io->in[i].buf, queue_slot(&io->inject, 0), len);
            queue_pop(&io->inject);
        }
        pthread_mutex_unlock(&p->lock);
        if (!have)
            break;
        io->n_free--;
        p->st.injected_in++;
        batch_in(p, b, i, len);
    }
    for (int budget = TAP_BUDGET; io->n_free; budget--) {
        if (!budget)
            return 1;
        uint32_t i = io->in_free[io->n_free - 1];
        uint8_t *buf = io->in[i].buf;
        /* leave room for the header in front and the CRC + trailer behind */
        ssize_t r = read(p->tap_fd, buf + 2, UDRV_PEGPUMP_BUF - 2 - 8);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                p->st.wire_read_errors++;
            return errno == EAGAIN || errno == EWOULDBLOCK;
        }
        if (r == 0)
            return 1;
        p->st.wire_in++;
        uint32_t len = rx_build(p, buf, (uint32_t)r);
        if (!len)
            continue;
        io->n_free--;
        batch_in(p, b, i, len);
    }
    return 0;
}

/* Fill and submit the free IN slots; 1 when the TAP should be watched. */
static int fill_in(struct udrv_pegpump *p, uint64_t now)
{
    struct udrv_pegpump_io *io = p->io;
    if (!io->cfg.enabled || io->cfg.in_hold || now < io->in_retry_at)
        return 0;
    struct in_batch b;
    b.n = 0;
    int want_tap = fill_slots(p, &b);
    flush_in(p, &b, now);
    return want_tap;
}

/* --- completions ------------------------------------------------------------------------- */

static void reap(struct udrv_pegpump *p)
{
    struct udrv_pegpump_io *io = p->io;
    struct io_event ev[64];
    struct timespec zero = {0, 0};
    drain(io->aio_efd);
    for (;;) {
        long n = syscall(SYS_io_getevents, io->ctx, 0L, 64L, ev, &zero);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        for (long k = 0; k < n; k++) {
            uint32_t kind = (uint32_t)(ev[k].data >> 32), i = (uint32_t)ev[k].data;
            int64_t res = ev[k].res;
            if (kind == TAG_OUT) {
                io->out[i].result = res;
                io->out[i].done = 1;
                p->in_flight_out--;
                continue;
            }
            p->in_flight_in--;
            if (res < 0) {
                p->st.in_errors++;
                p->st.last_in_error = (int32_t)-res;
                io->in_retry_at = now_ns() + RETRY_NS;
                if (kind == TAG_IN)
                    p->st.in_lost++;
            } else if (kind == TAG_IN) {
                p->st.in_transfers++;
                p->st.in_bytes += (uint64_t)res;
            }
            if (kind == TAG_IN)
                io->in_free[io->n_free++] = i;
        }
        if (n < 64)
            return;
    }
}

static void refresh_config(struct udrv_pegpump *p)
{
    struct udrv_pegpump_io *io = p->io;
    if (__atomic_load_n(&p->cfg_gen, __ATOMIC_ACQUIRE) == io->cfg_gen)
        return;
    pthread_mutex_lock(&p->lock);
    io->cfg = p->cfg_shared;
    io->cfg_gen = p->cfg_gen;
    pthread_mutex_unlock(&p->lock);
    __atomic_store_n(&p->cfg_applied, io->cfg_gen, __ATOMIC_RELEASE);
}

static void *pump_main(void *arg)
{
    struct udrv_pegpump *p = arg;
    struct udrv_pegpump_io *io = p->io;
    /* we are the device: it answers in hardware time whatever the host runs */
    if (p->nice)
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), p->nice);
    while (!p->stop) {
        refresh_config(p);
        uint64_t now = now_ns();
        deliver_out(p);
        submit_out(p, now);
        int want_tap = fill_in(p, now);
        struct pollfd fds[3] = {{io->aio_efd, POLLIN, 0}, {p->ctl_efd, POLLIN, 0}, {p->tap_fd, POLLIN, 0}};
        int timeout = SAFETY_MS;
        uint64_t next = 0;
        if (io->cfg.enabled) {
            if (io->out_retry_at > now)
                next = io->out_retry_at;
            if (io->in_retry_at > now && (!next || io->in_retry_at < next))
                next = io->in_retry_at;
        }
        if (next)
            timeout = (int)((next - now) / 1000000) + 1;
        int r = poll(fds, want_tap ? 3 : 2, timeout);
        if (r < 0)
            continue;
        if (fds[1].revents)
            drain(p->ctl_efd);
        if (fds[0].revents)
            reap(p);
    }
    return NULL;
}

/* --- API --------------------------------------------------------------------------------- */

struct udrv_pegpump *udrv_pegpump_new(int ep_in, int ep_out, int tap_fd, uint32_t in_depth,
                                      uint32_t out_depth, int nice)
{
    if (!in_depth || !out_depth || in_depth > UDRV_PEGPUMP_DEPTH_MAX || out_depth > UDRV_PEGPUMP_DEPTH_MAX) {
        errno = EINVAL;
        return NULL;
    }
    struct udrv_pegpump *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->ctl_efd = p->py_efd = -1;
    pthread_mutex_init(&p->lock, NULL);
    struct udrv_pegpump_io *io = p->io = calloc(1, sizeof *io);
    if (!io)
        goto fail;
    io->aio_efd = -1;
    p->ep_in = ep_in;
    p->ep_out = ep_out;
    p->tap_fd = tap_fd;
    p->in_depth = in_depth;
    p->out_depth = out_depth;
    p->nice = nice;
    crc_init(io->crc_table);
    int fl = fcntl(tap_fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(tap_fd, F_SETFL, fl | O_NONBLOCK) < 0))
        goto fail;
    for (uint32_t i = 0; i < out_depth; i++)
        if (!(io->out[i].buf = aligned_alloc(64, UDRV_PEGPUMP_BUF)))
            goto fail;
    for (uint32_t i = 0; i < in_depth; i++) {
        if (!(io->in[i].buf = aligned_alloc(64, UDRV_PEGPUMP_BUF)))
            goto fail;
        io->in_free[io->n_free++] = i;
    }
    if (queue_init(&io->defer, UDRV_PEGPUMP_DEFER_SLOTS) || queue_init(&io->inject, UDRV_PEGPUMP_INJECT_SLOTS))
        goto fail;
    p->ctl_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->py_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    io->aio_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->ctl_efd < 0 || p->py_efd < 0 || io->aio_efd < 0)
        goto fail;
    if (syscall(SYS_io_setup, 2 * in_depth + out_depth + 8, &io->ctx) < 0)
        goto fail;
    return p;
fail:;
    int e = errno ? errno : ENOMEM;
    udrv_pegpump_free(p);
    errno = e;
    return NULL;
}

int udrv_pegpump_start(struct udrv_pegpump *p)
{
    if (p->started)
        return 0;
    int e = pthread_create(&p->thread, NULL, pump_main, p);
    if (e) {
        errno = e;
        return -1;
    }
    pthread_setname_np(p->thread, "udrv-pegpump");
    p->started = 1;
    return 0;
}

uint32_t udrv_pegpump_configure(struct udrv_pegpump *p, const struct udrv_pegpump_config *cfg)
{
    pthread_mutex_lock(&p->lock);
    p->cfg_shared = *cfg;
    uint32_t gen = __atomic_add_fetch(&p->cfg_gen, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    poke(p->ctl_efd);
    return gen;
}

int udrv_pegpump_inject(struct udrv_pegpump *p, const uint8_t *data, uint32_t len)
{
    pthread_mutex_lock(&p->lock);
    int r = queue_push(&p->io->inject, data, len);
    pthread_mutex_unlock(&p->lock);
    if (!r)
        poke(p->ctl_efd);
    return r;
}

int64_t udrv_pegpump_deferred_peek(struct udrv_pegpump *p, uint8_t **buf)
{
    struct queue *q = &p->io->defer;
    int64_t r = -1;
    pthread_mutex_lock(&p->lock);
    if (q->count) {
        *buf = queue_slot(q, 0);
        r = q->len[q->head];
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

void udrv_pegpump_deferred_pop(struct udrv_pegpump *p)
{
    pthread_mutex_lock(&p->lock);
    queue_pop(&p->io->defer);
    pthread_mutex_unlock(&p->lock);
    poke(p->ctl_efd);               /* a held OUT transfer may go now */
}

void udrv_pegpump_free(struct udrv_pegpump *p)
{
    if (!p)
        return;
    struct udrv_pegpump_io *io = p->io;
    if (p->started) {
        p->stop = 1;
        poke(p->ctl_efd);
        pthread_join(p->thread, NULL);
        p->started = 0;
    }
    if (io) {
        if (io->ctx)
            syscall(SYS_io_destroy, io->ctx);    /* cancels what is queued and waits for it */
        for (uint32_t i = 0; i < UDRV_PEGPUMP_DEPTH_MAX; i++) {
            free(io->out[i].buf);
            free(io->in[i].buf);
        }
        free(io->defer.mem);
        free(io->inject.mem);
        if (io->aio_efd >= 0)
            close(io->aio_efd);
        free(io);
    }
    if (p->ctl_efd >= 0)
        close(p->ctl_efd);
    if (p->py_efd >= 0)
        close(p->py_efd);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

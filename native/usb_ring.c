/* The USB transfer ring (see usb_ring.h for the contract). */
#define _GNU_SOURCE   /* pthread_setname_np */
#include "usb_ring.h"
#include "gro.h"
#include "gso.h"
#include "tapread.h"

#include <errno.h>
#include <fcntl.h>
#include <libusb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_POLLFDS 64

enum xfer_kind { KIND_RX, KIND_TX, KIND_STATUS };

struct xfer {
    struct udrv_ring *ring;
    struct libusb_transfer *t;
    uint8_t *buf;
    uint32_t cap;
    uint8_t kind;
    uint8_t in_flight;
    uint8_t dev_mem;    /* buf is usbfs-mapped memory (libusb_dev_mem_alloc) */
    uint32_t frame_len; /* TX: bytes of the frame (for tx_bytes) */
    uint8_t last;       /* TX: carries the last wire frame of its journal entry */
    uint64_t seq;       /* TX: journal sequence number */
};

struct udrv_ring {
    int64_t *beat;              /* NULL, or a supervisor's heartbeat word (udrv_ring_set_beat) */
    int beat_ms;
    libusb_context *ctx;
    libusb_device_handle *h;
    struct udrv_ring_config cfg;
    struct udrv_framing fr;
    struct udrv_journal j;
    struct xfer *rx;
    struct xfer *tx;
    struct xfer status;
    struct xfer **tx_idle; /* stack of OUT transfers not in flight (under `lock`) */
    uint32_t n_tx_idle;

    /* Set by completions, read by the TX thread too: volatile, no ordering needed. */
    volatile int running;
    volatile int tx_blocked; /* after a TX error nothing more is confirmed or sent until restart:
                                a later completion must not confirm the frame that failed */
    int rx_stalled;     /* pump clears the halt and resubmits (outside the callback, where a
                           synchronous libusb call would be unsafe) */
    int status_stalled;
    volatile int no_device;

    /* The TX thread (udrv_ring_set_tx_thread): during udrv_ring_run the TAP -> journal -> OUT
     * half runs on a thread of its own, so it can use a second CPU while this one reaps
     * completions and writes RX frames; it is parked whenever run() is not running, so Python
     * only ever sees a quiescent ring. `lock` guards tx_idle, tx_inflight, the error queue and
     * txt_flags; the journal's head/sent (the TX thread's) and tail (confirmations) are atomic. */
    int txt_wanted;
    int txt_started, txt_go, txt_parked, txt_quit;
    pthread_t txt;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int txt_evfd;             /* wakes the TX thread: completions freed transfers or slots, park */
    int main_evfd;            /* wakes run(): the TX thread needs Python (deferred frame, error) */
    int txt_budget;
    uint32_t txt_flags;       /* UDRV_PUMP_* the TX thread raised, merged by run() */

    /* OUT completions are only noted in the callback and applied to the journal in pump:
     * callbacks may also run inside Python's own control transfers, and the journal must only
     * change while Python is inside a ring call. */
    int confirm_pending;
    uint64_t confirm_seq;
    uint64_t confirm_frames;
    uint64_t confirm_bytes;

    /* the journal entry being cut into wire frames (gso.h): its seq, plan and next segment;
     * `sent` moves past it when its last segment is submitted */
    int seg_active;
    uint64_t seg_seq;
    uint32_t seg_next;
    struct udrv_gso seg;
    uint8_t seg_buf[UDRV_TAPREAD_BUF]; /* one wire frame, built before the framing encodes it */

    uint32_t flags;       /* UDRV_PUMP_RX / TX_DONE since the last pump */
    uint32_t tx_completions; /* OUT completions since the TX thread was last woken */
    /* while OUT transfers are being cancelled: the lowest journal seq that came back cancelled.
     * Cancels go out in slot order, not submission order, so a later transfer may still
     * complete after an earlier one was cancelled: nothing at or past it is confirmed. */
    int cancel_seen;
    uint64_t cancel_min;
    uint32_t completions; /* since the last pump */

    /* the TX hang clock (udrv_ring_set_tx_stall): st.tx_done_ms is set by confirmations on
     * this thread, tx_busy_ms by the TX thread when the OUT side goes from idle to busy */
    uint32_t tx_stall_ms;
    volatile uint64_t tx_busy_ms;

    /* libusb's poll fds, fetched at start: libusb_get_pollfds allocates and locks on every
     * call, and a turn that sleeps would pay that each time. Only our device handle's fd and
     * the context's own fds matter here, and they do not change while the ring runs. */
    struct pollfd usb_fds[MAX_POLLFDS];
    nfds_t n_usb_fds;

    struct udrv_ring_stats st;
    struct udrv_ring_error errq[UDRV_ERRQ];
    uint32_t err_first, err_count;
    uint8_t statq[UDRV_STATQ][UDRV_STATUS_MAX];
    uint32_t statq_len[UDRV_STATQ];
    uint32_t stat_first, stat_count;
    struct udrv_tapread tap;   /* TAP -> journal, with tapread.h's rules for the vnet header */

    /* RX coalescing: a batch opens at the first RX completion and is flushed (written, then
     * its held transfers resubmitted) when the ring call that handled the events is done */
    struct udrv_gro gro;
    int batch_open;
    int batch_gro;        /* gro usable for this batch */
    struct xfer **held;   /* RX transfers whose buffers gro still points into */
    uint32_t n_held;
};

/* --- small helpers --------------------------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint32_t xs_of(enum libusb_transfer_status s)
{
    switch (s) {
    case LIBUSB_TRANSFER_COMPLETED: return UDRV_XS_OK;
    case LIBUSB_TRANSFER_STALL: return UDRV_XS_STALL;
    case LIBUSB_TRANSFER_TIMED_OUT: return UDRV_XS_TIMEOUT;
    case LIBUSB_TRANSFER_NO_DEVICE: return UDRV_XS_NO_DEVICE;
    case LIBUSB_TRANSFER_CANCELLED: return UDRV_XS_CANCELLED;
    case LIBUSB_TRANSFER_OVERFLOW: return UDRV_XS_OVERFLOW;
    default: return UDRV_XS_ERROR;
    }
}

static void push_error(struct udrv_ring *r, uint32_t dir, uint32_t status, uint32_t ep, int code,
                       uint64_t seq)
{
    pthread_mutex_lock(&r->lock);
    if (r->err_count == UDRV_ERRQ) {
        r->st.errors_lost++; /* Python sees the first ones; recovery handles them all alike */
    } else {
        struct udrv_ring_error *e = &r->errq[(r->err_first + r->err_count++) % UDRV_ERRQ];
        e->dir = dir;
        e->status = status;
        e->endpoint = ep;
        e->code = code;
        e->seq = seq;
    }
    pthread_mutex_unlock(&r->lock);
}

static uint32_t in_flight(const struct udrv_ring *r)
{
    return r->st.rx_inflight + r->st.tx_inflight + r->st.status_inflight;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A run turn's wait, capped so that the loop goes round (and beats) at least every beat_ms;
 * and the beat itself: CLOCK_MONOTONIC ns into the supervisor's heartbeat word. */
static int beat_wait(struct udrv_ring *r, int left)
{
    if (!r->beat)
        return left;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    __atomic_store_n(r->beat, (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, __ATOMIC_RELAXED);
    return left > r->beat_ms ? r->beat_ms : left;
}

void udrv_ring_set_beat(struct udrv_ring *r, int64_t *beat, int period_ms)
{
    r->beat = beat;
    r->beat_ms = period_ms > 0 ? period_ms : 1;
}

static void submit_failed(struct udrv_ring *r, uint32_t dir, uint32_t ep, int rc, uint64_t seq)
{
    if (rc == LIBUSB_ERROR_NO_DEVICE) {
        r->no_device = 1;
        push_error(r, dir, UDRV_XS_NO_DEVICE, ep, rc, seq);
    } else {
        push_error(r, dir, UDRV_XS_SUBMIT_FAILED, ep, rc, seq);
    }
}

/* --- RX ----------------------------------------------------------------------------------- */

static void LIBUSB_CALL rx_done(struct libusb_transfer *t);

static int submit_rx(struct udrv_ring *r, struct xfer *x)
{
    libusb_fill_bulk_transfer(x->t, r->h, (unsigned char)r->cfg.ep_in, x->buf, (int)r->fr.rx_size,
                              rx_done, x, 0);
    int rc = libusb_submit_transfer(x->t);
    if (rc < 0) {
        submit_failed(r, UDRV_DIR_RX, r->cfg.ep_in, rc, 0);
        return rc;
    }
    x->in_flight = 1;
    r->st.rx_inflight++;
    return 0;
}

/* Write what the batch holds and give its transfers back to the device. */
static void rx_flush(struct udrv_ring *r)
{
    if (!r->batch_open)
        return;
    r->batch_open = 0;
    if (r->batch_gro)
        udrv_gro_flush(&r->gro);
    uint32_t n = r->n_held;
    r->n_held = 0;
    for (uint32_t k = 0; k < n; k++)
        if (r->running && !r->rx_stalled && !r->no_device)
            submit_rx(r, r->held[k]);     /* else start / the clear-halt path resubmits */
}

/* Returns 1 if the coalescer holds the frame: x's buffer must wait for rx_flush. */
static int deliver(struct udrv_ring *r, struct xfer *x, uint32_t n)
{
    uint32_t start = 0, len = 0;
    int verdict = udrv_decode_rx(&r->fr, x->buf, n, &start, &len);
    if (verdict != UDRV_RX_OK) {
        r->st.rx_dropped[verdict]++;
        return 0;
    }
    r->st.rx_packets++;
    r->st.rx_bytes += len;
    r->flags |= UDRV_PUMP_RX;
    if (!r->batch_open) {
        const struct udrv_gro_counters c = {&r->st.rx_coalesced, &r->st.rx_super, &r->st.rx_csum_bad,
                                            &r->st.rx_super_refused, &r->st.tap_write_errors,
                                         &r->st.rx_acks_merged};
        r->batch_gro = udrv_gro_begin(&r->gro, r->cfg.tap_fd, r->cfg.tap_vnet_hdr,
                                      &r->cfg.rx_coalesce, &c);
        r->batch_open = 1;
    }
    if (!r->batch_gro) {
        udrv_tap_write(r->cfg.tap_fd, r->cfg.tap_vnet_hdr, x->buf + start, len, &r->st.tap_write_errors);
        return 0;
    }
    /* USB gives no checksum verdicts: gro checks them all */
    if (!udrv_gro_frame(&r->gro, x->buf + start, len, 0))
        return 0;
    r->held[r->n_held++] = x;
    return 1;
}

static void LIBUSB_CALL rx_done(struct libusb_transfer *t)
{
    struct xfer *x = t->user_data;
    struct udrv_ring *r = x->ring;
    x->in_flight = 0;
    r->st.rx_inflight--;
    r->completions++;
    switch (t->status) {
    case LIBUSB_TRANSFER_COMPLETED:
        if (deliver(r, x, (uint32_t)t->actual_length)) {
            /* held: resubmitted by rx_flush; flush early rather than starve the device */
            if (r->n_held * 2 >= r->cfg.n_rx)
                rx_flush(r);
            return;
        }
        break;
    case LIBUSB_TRANSFER_CANCELLED:
        return;
    case LIBUSB_TRANSFER_NO_DEVICE:
        r->no_device = 1;
        push_error(r, UDRV_DIR_RX, UDRV_XS_NO_DEVICE, r->cfg.ep_in, 0, 0);
        return;
    case LIBUSB_TRANSFER_STALL:
        r->st.rx_dropped[UDRV_DROP_RX_STALL]++;
        r->rx_stalled = 1;
        return;
    case LIBUSB_TRANSFER_OVERFLOW:
        r->st.rx_dropped[UDRV_DROP_RX_OVERFLOW]++; /* the device sent more than rx_size: drop */
        break;
    case LIBUSB_TRANSFER_TIMED_OUT:
        r->st.rx_dropped[UDRV_DROP_RX_TIMEOUT]++;
        push_error(r, UDRV_DIR_RX, UDRV_XS_TIMEOUT, r->cfg.ep_in, 0, 0);
        break;
    default:
        r->st.rx_dropped[UDRV_DROP_RX_ERROR]++;
        push_error(r, UDRV_DIR_RX, UDRV_XS_ERROR, r->cfg.ep_in, 0, 0);
        break;
    }
    if (r->running && !r->rx_stalled && !r->no_device)
        submit_rx(r, x);
}

/* --- interrupt endpoint --------------------------------------------------------------------- */

static void LIBUSB_CALL status_done(struct libusb_transfer *t);

static int submit_status(struct udrv_ring *r)
{
    struct xfer *x = &r->status;
    libusb_fill_interrupt_transfer(x->t, r->h, (unsigned char)r->cfg.ep_status, x->buf,
                                   (int)r->cfg.status_size, status_done, x, 0);
    int rc = libusb_submit_transfer(x->t);
    if (rc < 0) {
        submit_failed(r, UDRV_DIR_STATUS, r->cfg.ep_status, rc, 0);
        return rc;
    }
    x->in_flight = 1;
    r->st.status_inflight++;
    return 0;
}

static void queue_status(struct udrv_ring *r, const uint8_t *data, uint32_t n)
{
    r->st.status_packets++;
    if (r->stat_count == UDRV_STATQ) {
        r->st.status_overflow++;
        return;
    }
    uint32_t i = (r->stat_first + r->stat_count++) % UDRV_STATQ;
    if (n > UDRV_STATUS_MAX)
        n = UDRV_STATUS_MAX;
    memcpy(r->statq[i], data, n);
    r->statq_len[i] = n;
}

static void LIBUSB_CALL status_done(struct libusb_transfer *t)
{
    struct xfer *x = t->user_data;
    struct udrv_ring *r = x->ring;
    x->in_flight = 0;
    r->st.status_inflight--;
    r->completions++;
    switch (t->status) {
    case LIBUSB_TRANSFER_COMPLETED:
        queue_status(r, x->buf, (uint32_t)t->actual_length);
        break;
    case LIBUSB_TRANSFER_CANCELLED:
        return;
    case LIBUSB_TRANSFER_NO_DEVICE:
        r->no_device = 1;
        push_error(r, UDRV_DIR_STATUS, UDRV_XS_NO_DEVICE, r->cfg.ep_status, 0, 0);
        return;
    case LIBUSB_TRANSFER_STALL:
        r->status_stalled = 1;
        return;
    default:
        break; /* a lost interrupt packet is not worth a recovery (as in UsbNetEngine) */
    }
    if (r->running && !r->no_device)
        submit_status(r);
}

/* --- TX ------------------------------------------------------------------------------------- */

static void LIBUSB_CALL tx_done(struct libusb_transfer *t)
{
    struct xfer *x = t->user_data;
    struct udrv_ring *r = x->ring;
    pthread_mutex_lock(&r->lock);
    x->in_flight = 0;
    r->st.tx_inflight--;
    r->tx_idle[r->n_tx_idle++] = x;
    pthread_mutex_unlock(&r->lock);
    r->tx_completions++;
    r->completions++;
    switch (t->status) {
    case LIBUSB_TRANSFER_COMPLETED:
        /* OUT transfers on one endpoint complete in submission order, so the newest OK
         * completion confirms everything before it. */
        if (r->tx_blocked)
            return;
        if (x->last && (!r->confirm_pending || x->seq > r->confirm_seq)) {
            r->confirm_pending = 1;
            r->confirm_seq = x->seq;
        }
        r->confirm_frames++;
        r->confirm_bytes += x->frame_len;
        return;
    case LIBUSB_TRANSFER_CANCELLED:
        /* still in the journal as sent: the recovery's rewind re-issues it */
        if (!r->cancel_seen || x->seq < r->cancel_min) {
            r->cancel_seen = 1;
            r->cancel_min = x->seq;
        }
        return;
    case LIBUSB_TRANSFER_NO_DEVICE:
        r->no_device = 1;
        r->tx_blocked = 1;
        push_error(r, UDRV_DIR_TX, UDRV_XS_NO_DEVICE, r->cfg.ep_out, 0, x->seq);
        return;
    default: {
        uint32_t xs = xs_of(t->status);
        r->st.tx_errors[xs]++;
        r->tx_blocked = 1;
        push_error(r, UDRV_DIR_TX, xs, r->cfg.ep_out, 0, x->seq);
        return;
    }
    }
}

/* Counted per wire frame the device took (a TSO entry is many); the journal is confirmed
 * through the newest entry whose last frame went out. */
static void apply_confirm(struct udrv_ring *r)
{
    if (r->confirm_frames) {
        r->st.tx_done_ms = now_ms();
        r->st.tx_packets += r->confirm_frames;
        r->st.tx_bytes += r->confirm_bytes;
        r->flags |= UDRV_PUMP_TX_DONE;
        r->confirm_frames = r->confirm_bytes = 0;
    }
    if (!r->confirm_pending)
        return;
    r->confirm_pending = 0;
    if (r->cancel_seen && r->confirm_seq >= r->cancel_min) {
        if (r->cancel_min == 0)
            return;
        r->confirm_seq = r->cancel_min - 1;   /* the cancelled entry and what follows go again */
    }
    if (udrv_journal_confirm_through(&r->j, r->confirm_seq) < 0) {
        /* Someone rewound the journal under us: stop and let Python recover. */
        r->tx_blocked = 1;
        push_error(r, UDRV_DIR_TX, UDRV_XS_JOURNAL_CORRUPT, r->cfg.ep_out, 0, r->confirm_seq);
    }
}

/* The next wire frame: the next segment of the entry being cut, or the next unsent entry.
 * 1 = frame, len, seq and last set, 0 = nothing to send, -1 = journal corrupt (error queued). */
static int next_wire_frame(struct udrv_ring *r, const uint8_t **frame, uint32_t *len, uint64_t *seq,
                           uint8_t *last, uint64_t now)
{
    for (;;) {
        const uint8_t *vnet, *f;
        uint32_t vlen, flen;
        int rc = udrv_journal_peek_unsent(&r->j, seq, &vnet, &vlen, &f, &flen);
        if (rc == 0) {
            r->seg_active = 0;
            return 0;
        }
        if (rc < 0) {
            r->tx_blocked = 1;
            push_error(r, UDRV_DIR_TX, UDRV_XS_JOURNAL_CORRUPT, r->cfg.ep_out, 0, *seq);
            return -1;
        }
        if (udrv_journal_aqm_drop(&r->j, now)) {  /* waited too long: confirmed with the next */
            r->seg_active = 0;
            udrv_journal_mark_sent(&r->j, *seq);
            continue;
        }
        if (!vlen) {                            /* a finished frame: as it is */
            r->seg_active = 0;
            udrv_journal_mark_sent(&r->j, *seq);
            *frame = f;
            *len = flen;
            *last = 1;
            return 1;
        }
        if (!r->seg_active || r->seg_seq != *seq) {  /* a new entry (or the journal was rewound) */
            if (vlen < UDRV_GRO_VNET_MIN || udrv_gso_plan(vnet, f, flen, &r->seg) != UDRV_GSO_OK) {
                /* tapread checks less than the plan: this request cannot be carried out */
                r->seg_active = 0;
                udrv_journal_mark_sent(&r->j, *seq);
                r->st.tap_bad_offload++;
                continue;
            }
            r->seg_active = 1;
            r->seg_seq = *seq;
            r->seg_next = 0;
        }
        int64_t n = udrv_gso_build(&r->seg, f, flen, r->seg_next, r->seg_buf, sizeof r->seg_buf);
        if (n < 0) {
            r->seg_active = 0;
            udrv_journal_mark_sent(&r->j, *seq);
            r->st.tap_bad_offload++;
            continue;
        }
        if (r->seg.tso)
            r->st.tx_segments++;
        *frame = r->seg_buf;
        *len = (uint32_t)n;
        *last = ++r->seg_next == r->seg.nseg;
        if (*last) {
            r->seg_active = 0;
            udrv_journal_mark_sent(&r->j, *seq);
        }
        return 1;
    }
}

static uint32_t tx_fill(struct udrv_ring *r)
{
    uint32_t sent = 0;
    uint64_t now = udrv_journal_now_ns();     /* the AQM's clock, once per batch */
    while (r->running && !r->tx_blocked && !r->no_device && r->n_tx_idle > 0) {
        uint64_t seq;
        const uint8_t *frame;
        uint32_t len;
        uint8_t last;
        if (next_wire_frame(r, &frame, &len, &seq, &last, now) <= 0)
            break;
        pthread_mutex_lock(&r->lock);   /* completions push transfers back from the other thread */
        struct xfer *x = r->tx_idle[--r->n_tx_idle];
        pthread_mutex_unlock(&r->lock);
        /* Copy into the transfer's own buffer: the framing adds a header and maybe a pad
         * byte, and the journal slot may be rewritten once confirmed. ~1 us per 1500 B. */
        int64_t n = udrv_encode_tx(&r->fr, frame, len, x->buf, x->cap);
        if (n < 0) {
            pthread_mutex_lock(&r->lock);
            r->tx_idle[r->n_tx_idle++] = x;
            pthread_mutex_unlock(&r->lock);
            r->tx_blocked = 1;
            push_error(r, UDRV_DIR_TX, UDRV_XS_JOURNAL_CORRUPT, r->cfg.ep_out, 0, seq);
            break;
        }
        libusb_fill_bulk_transfer(x->t, r->h, (unsigned char)r->cfg.ep_out, x->buf, (int)n, tx_done,
                                  x, 0);
        x->t->flags = r->cfg.zero_packet ? LIBUSB_TRANSFER_ADD_ZERO_PACKET : 0;
        x->seq = seq;
        x->last = last;
        x->frame_len = len;
        /* in flight before the submit: its completion may run on the other thread at once */
        pthread_mutex_lock(&r->lock);
        x->in_flight = 1;
        if (!r->st.tx_inflight)
            r->tx_busy_ms = now_ms();      /* the hang clock starts with the first frame waiting */
        r->st.tx_inflight++;
        pthread_mutex_unlock(&r->lock);
        int rc = libusb_submit_transfer(x->t);
        if (rc < 0) {
            /* The frame stays in the journal as sent; the recovery's rewind re-issues it. */
            pthread_mutex_lock(&r->lock);
            x->in_flight = 0;
            r->st.tx_inflight--;
            r->tx_idle[r->n_tx_idle++] = x;
            pthread_mutex_unlock(&r->lock);
            r->tx_blocked = 1;
            submit_failed(r, UDRV_DIR_TX, r->cfg.ep_out, rc, seq);
            break;
        }
        sent++;
    }
    return sent;
}

/* --- TAP -> journal --------------------------------------------------------------------------- */

static uint32_t tap_to_journal(struct udrv_ring *r, int budget, uint32_t *flags)
{
    if (budget <= 0)
        return 0;
    int64_t moved = udrv_tapread_to_journal(&r->tap, &r->j, (uint32_t)budget);
    if (moved > 0)
        *flags |= UDRV_PUMP_TAP_IN;
    if (r->tap.deferred_len)
        *flags |= UDRV_PUMP_DEFERRED;     /* reading stops until Python takes it */
    else if (!udrv_journal_space(&r->j))
        *flags |= UDRV_PUMP_JOURNAL_FULL; /* leave frames in the kernel's queue */
    return moved > 0 ? (uint32_t)moved : 0;
}

/* --- event handling ------------------------------------------------------------------------------ */

/* Sleep until a libusb fd, the TAP (if we read it and the journal has room), wake_fd or alt_fd
 * (the TX thread asking for Python) is readable, or timeout. Returns 1 if wake_fd became readable. */
static int wait_events(struct udrv_ring *r, int timeout_ms, int tap_budget, int wake_fd, int alt_fd)
{
    struct pollfd fds[MAX_POLLFDS];
    nfds_t n = r->n_usb_fds;
    memcpy(fds, r->usb_fds, n * sizeof *fds);
    if (tap_budget > 0 && udrv_journal_space(&r->j) > 0 && !r->tap.deferred_len) {
        fds[n].fd = r->cfg.tap_fd;
        fds[n].events = POLLIN;
        fds[n].revents = 0;
        n++;
    }
    nfds_t wake = n;
    if (wake_fd >= 0) {
        fds[n].fd = wake_fd;
        fds[n].events = POLLIN;
        fds[n].revents = 0;
        n++;
    }
    if (alt_fd >= 0) {          /* readable = the TX thread needs Python: just return */
        fds[n].fd = alt_fd;
        fds[n].events = POLLIN;
        fds[n].revents = 0;
        n++;
    }
    if (!libusb_pollfds_handle_timeouts(r->ctx)) {
        struct timeval tv;
        if (libusb_get_next_timeout(r->ctx, &tv) == 1) {
            long ms = tv.tv_sec * 1000L + (tv.tv_usec + 999) / 1000;
            if (ms < timeout_ms)
                timeout_ms = (int)ms;
        }
    }
    r->st.waits++;
    int ready = poll(fds, n, timeout_ms);
    if (ready == 0)
        r->st.wait_timeouts++;
    return ready > 0 && wake_fd >= 0 && fds[wake].revents ? 1 : 0;
}

static void fetch_usb_fds(struct udrv_ring *r)
{
    r->n_usb_fds = 0;
    const struct libusb_pollfd **lfds = libusb_get_pollfds(r->ctx);
    if (!lfds)
        return;
    for (int i = 0; lfds[i] && r->n_usb_fds < MAX_POLLFDS - 2; i++) {
        struct pollfd *p = &r->usb_fds[r->n_usb_fds++];
        p->fd = lfds[i]->fd;
        p->events = lfds[i]->events;
        p->revents = 0;
    }
    libusb_free_pollfds(lfds);
}

static int handle_events_now(struct udrv_ring *r)
{
    struct timeval zero = {0, 0};
    int rc = libusb_handle_events_timeout_completed(r->ctx, &zero, NULL);
    return rc == LIBUSB_ERROR_INTERRUPTED ? 0 : rc;
}

/* What a completion asked for that must not run inside a callback. */
static void after_events(struct udrv_ring *r)
{
    apply_confirm(r);
    if (r->rx_stalled && r->running && !r->no_device) {
        r->rx_stalled = 0;
        int rc = libusb_clear_halt(r->h, (unsigned char)r->cfg.ep_in);
        if (rc < 0) {
            if (rc == LIBUSB_ERROR_NO_DEVICE)
                r->no_device = 1;
            push_error(r, UDRV_DIR_RX, rc == LIBUSB_ERROR_NO_DEVICE ? UDRV_XS_NO_DEVICE
                                                                    : UDRV_XS_CLEAR_HALT_FAILED,
                       r->cfg.ep_in, rc, 0);
        } else {
            for (uint32_t i = 0; i < r->cfg.n_rx; i++)
                if (!r->rx[i].in_flight && submit_rx(r, &r->rx[i]) < 0)
                    break;
        }
    }
    if (r->status_stalled && r->running && !r->no_device) {
        r->status_stalled = 0;
        if (libusb_clear_halt(r->h, (unsigned char)r->cfg.ep_status) == 0 && !r->status.in_flight)
            submit_status(r);
    }
}

static uint32_t level_flags(struct udrv_ring *r)
{
    uint32_t f = 0;
    if (r->err_count)
        f |= UDRV_PUMP_ERROR;
    if (r->stat_count)
        f |= UDRV_PUMP_STATUS;
    if (r->no_device)
        f |= UDRV_PUMP_NO_DEVICE;
    return f;
}

static uint64_t tx_waiting_since(const struct udrv_ring *r)
{
    uint64_t done = r->st.tx_done_ms, busy = r->tx_busy_ms;
    return done > busy ? done : busy;
}

/* ms until the OUT transfers in flight count as stalled (0: they do now), -1: nothing to watch */
static int64_t stall_in(const struct udrv_ring *r, uint64_t now)
{
    if (!r->tx_stall_ms || !r->st.tx_inflight || r->tx_blocked || !r->running)
        return -1;
    uint64_t at = tx_waiting_since(r) + r->tx_stall_ms;
    return at > now ? (int64_t)(at - now) : 0;
}

/* The time a run loop may still wait: until its deadline or until TX would count as stalled;
 * -1 when TX is stalled now (UDRV_PUMP_TX_STALL is set in *flags). */
static int turn_left(const struct udrv_ring *r, uint64_t deadline, uint32_t *flags)
{
    uint64_t now = now_ms();
    int left = now < deadline ? (int)(deadline - now) : 0;
    int64_t stall = stall_in(r, now);
    if (stall == 0) {
        *flags |= UDRV_PUMP_TX_STALL;
        return -1;
    }
    return stall > 0 && stall < left ? (int)stall : left;
}

/* --- public API ------------------------------------------------------------------------------------ */

uintptr_t udrv_libusb_marker(void)
{
    return (uintptr_t)&libusb_handle_events_timeout_completed;
}

const char *udrv_usb_error_name(int code)
{
    return libusb_error_name(code);
}

/* A transfer buffer. usbfs-mapped memory first: usbfs then uses it in place instead of a
 * kmalloc + copy (and kfree) per URB, the biggest cost of a submission after the HCD's own;
 * plain memory where the kernel or the host controller cannot map it. */
static int set_buf(struct udrv_ring *r, struct xfer *x, uint32_t cap)
{
    uint8_t *b = cap ? libusb_dev_mem_alloc(r->h, cap) : NULL;
    x->dev_mem = b != NULL;
    if (!b)
        b = malloc(cap ? cap : 1);
    x->buf = b;
    x->cap = cap;
    return b ? 0 : -1;
}

static void drop_buf(struct udrv_ring *r, struct xfer *x)
{
    if (x->buf && x->dev_mem)
        libusb_dev_mem_free(r->h, x->buf, x->cap);
    else
        free(x->buf);
    x->buf = NULL;
    x->dev_mem = 0;
}

/* The longest frame an OUT transfer carries: a wire frame, never a 64 KiB TSO entry. */
static uint32_t wire_max(const struct udrv_ring *r)
{
    uint32_t n = r->cfg.tx_wire_max;
    return n && n < r->j.max_frame ? n : r->j.max_frame;
}

static int alloc_xfer(struct udrv_ring *r, struct xfer *x, enum xfer_kind kind, uint32_t cap)
{
    x->ring = r;
    x->kind = (uint8_t)kind;
    x->t = libusb_alloc_transfer(0);
    return x->t && set_buf(r, x, cap) == 0 ? 0 : -1;
}

static void free_xfer(struct udrv_ring *r, struct xfer *x)
{
    if (x->t)
        libusb_free_transfer(x->t);
    drop_buf(r, x);
    x->t = NULL;
}

static void txt_stop(struct udrv_ring *r);

static void free_all(struct udrv_ring *r)
{
    txt_stop(r);
    if (r->txt_evfd >= 0)
        close(r->txt_evfd);
    if (r->main_evfd >= 0)
        close(r->main_evfd);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cond);
    if (r->rx)
        for (uint32_t i = 0; i < r->cfg.n_rx; i++)
            free_xfer(r, &r->rx[i]);
    if (r->tx)
        for (uint32_t i = 0; i < r->cfg.n_tx; i++)
            free_xfer(r, &r->tx[i]);
    free_xfer(r, &r->status);
    free(r->rx);
    free(r->tx);
    free(r->tx_idle);
    free(r->held);
    udrv_journal_unmap(&r->j);
    free(r);
}

struct udrv_ring *udrv_ring_new(void *ctx, void *handle, const struct udrv_ring_config *cfg,
                                const struct udrv_framing *f, char *err, size_t errlen)
{
    if (!ctx || !handle) {
        set_err(err, errlen, "no libusb context/device handle: open the device with python-libusb1 first");
        return NULL;
    }
    if (!(cfg->ep_in & 0x80) || (cfg->ep_out & 0x80) || (cfg->ep_status && !(cfg->ep_status & 0x80))) {
        set_err(err, errlen, "endpoints 0x%02x/0x%02x/0x%02x: ep_in and ep_status must be IN (0x8N), "
                "ep_out OUT", cfg->ep_in, cfg->ep_out, cfg->ep_status);
        return NULL;
    }
    if (cfg->n_rx < 1 || cfg->n_rx > UDRV_RING_MAX_XFERS || cfg->n_tx < 1 ||
        cfg->n_tx > UDRV_RING_MAX_XFERS) {
        set_err(err, errlen, "n_rx=%u n_tx=%u: each must be 1..%d", cfg->n_rx, cfg->n_tx,
                UDRV_RING_MAX_XFERS);
        return NULL;
    }
    if (cfg->ep_status && (cfg->status_size < 1 || cfg->status_size > UDRV_STATUS_MAX)) {
        set_err(err, errlen, "status_size=%u: must be 1..%d", cfg->status_size, UDRV_STATUS_MAX);
        return NULL;
    }
    if (udrv_framing_check(f) < 0 || f->rx_size < 1 || f->rx_size > (1u << 20)) {
        set_err(err, errlen, "bad framing (shape %u, %u error bits, rx_size %u): shape must be "
                "TRAILER4/HEADER2/RAW, at most %d error bits, rx_size 1..1 MiB",
                f->shape, f->n_error_bits, f->rx_size, UDRV_MAX_ERROR_BITS);
        return NULL;
    }
    int fl = fcntl(cfg->tap_fd, F_GETFL);
    if (fl < 0) {
        set_err(err, errlen, "tap_fd %d is not an open file descriptor", cfg->tap_fd);
        return NULL;
    }
    /* A blocking read of an empty TAP would stall the whole datapath. */
    if (!(fl & O_NONBLOCK) && fcntl(cfg->tap_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        set_err(err, errlen, "cannot make tap_fd %d non-blocking: %s", cfg->tap_fd, strerror(errno));
        return NULL;
    }

    if (cfg->tap_vnet_hdr && (cfg->tap_vnet_hdr < UDRV_GRO_VNET_MIN || cfg->tap_vnet_hdr > UDRV_GRO_VNET_MAX)) {
        set_err(err, errlen, "tap_vnet_hdr=%u: must be 0 or %d..%d (the TAP's TUNSETVNETHDRSZ)",
                cfg->tap_vnet_hdr, UDRV_GRO_VNET_MIN, UDRV_GRO_VNET_MAX);
        return NULL;
    }
    struct udrv_ring *r = calloc(1, sizeof *r);
    if (!r) {
        set_err(err, errlen, "out of memory for the USB ring");
        return NULL;
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->txt_evfd = r->main_evfd = -1;
    r->ctx = ctx;
    r->h = handle;
    r->cfg = *cfg;
    r->fr = *f;
    int jrc = udrv_journal_map_fd(&r->j, cfg->journal_fd, cfg->journal_nslots, cfg->journal_slot_size);
    if (jrc == UDRV_JOURNAL_MAP_FAILED) {
        set_err(err, errlen, "cannot map the TX journal (fd %d): %s", cfg->journal_fd, strerror(errno));
        free(r);
        return NULL;
    }
    if (jrc < 0) {
        set_err(err, errlen, "the TX journal (fd %d) does not match nslots=%u slot_size=%u: pass "
                "TxJournal.fd, .nslots and .slot_size", cfg->journal_fd, cfg->journal_nslots,
                cfg->journal_slot_size);
        free(r);
        return NULL;
    }
    if (udrv_tapread_init(&r->tap, cfg->tap_fd, cfg->tap_vnet_hdr,
                          cfg->tx_max_frame ? cfg->tx_max_frame : r->j.max_frame) < 0) {
        set_err(err, errlen, "tap_fd %d: %s", cfg->tap_fd, strerror(errno));
        udrv_journal_unmap(&r->j);
        free(r);
        return NULL;
    }
    r->rx = calloc(cfg->n_rx, sizeof *r->rx);
    r->tx = calloc(cfg->n_tx, sizeof *r->tx);
    r->tx_idle = calloc(cfg->n_tx, sizeof *r->tx_idle);
    r->held = calloc(cfg->n_rx, sizeof *r->held);
    int bad = !r->rx || !r->tx || !r->tx_idle || !r->held;
    for (uint32_t i = 0; !bad && i < cfg->n_rx; i++)
        bad = alloc_xfer(r, &r->rx[i], KIND_RX, f->rx_size);
    uint32_t tx_cap = udrv_tx_encoded_max(f, wire_max(r));
    for (uint32_t i = 0; !bad && i < cfg->n_tx; i++) {
        bad = alloc_xfer(r, &r->tx[i], KIND_TX, tx_cap);
        r->tx_idle[r->n_tx_idle++] = &r->tx[i];
    }
    if (!bad && cfg->ep_status)
        bad = alloc_xfer(r, &r->status, KIND_STATUS, UDRV_STATUS_MAX);
    if (bad) {
        set_err(err, errlen, "out of memory for %u+%u USB transfers", cfg->n_rx, cfg->n_tx);
        free_all(r);
        return NULL;
    }
    fetch_usb_fds(r);
    return r;
}

int udrv_ring_set_framing(struct udrv_ring *r, const struct udrv_framing *f)
{
    if (in_flight(r) || udrv_framing_check(f) < 0 || f->rx_size < 1 || f->rx_size > (1u << 20))
        return -1;
    rx_flush(r);              /* held frames point into the buffers replaced below */
    uint32_t tx_cap = udrv_tx_encoded_max(f, wire_max(r));
    /* nothing is in flight: the buffers may be replaced (their contents do not matter) */
    for (uint32_t i = 0; i < r->cfg.n_rx; i++)
        if (r->rx[i].cap < f->rx_size) {
            drop_buf(r, &r->rx[i]);
            if (set_buf(r, &r->rx[i], f->rx_size) < 0)
                return -1;
        }
    for (uint32_t i = 0; i < r->cfg.n_tx; i++)
        if (r->tx[i].cap < tx_cap) {
            drop_buf(r, &r->tx[i]);
            if (set_buf(r, &r->tx[i], tx_cap) < 0)
                return -1;
        }
    r->fr = *f;
    return 0;
}

void udrv_ring_set_tx_max_frame(struct udrv_ring *r, uint32_t n)
{
    r->cfg.tx_max_frame = n;
    r->tap.mtu_max = n ? n : r->j.max_frame;
}

int udrv_ring_start(struct udrv_ring *r)
{
    if (r->running)
        return 0;
    if (in_flight(r))
        return LIBUSB_ERROR_BUSY; /* the last stop left transfers behind: cancel again first */
    rx_flush(r);              /* nothing may stay held: every RX transfer is submitted below */
    /* A new epoch: the recovery that restarts us has dealt with the old errors. */
    r->tx_blocked = r->rx_stalled = r->status_stalled = r->no_device = 0;
    r->confirm_pending = 0;
    r->confirm_frames = r->confirm_bytes = 0;
    r->cancel_seen = 0;
    r->seg_active = 0;        /* the journal may have been rewound: cut entries from the start */
    r->err_first = r->err_count = 0;
    r->tx_busy_ms = now_ms();  /* a hang clock that starts again with the ring */
    fetch_usb_fds(r);
    r->running = 1;
    for (uint32_t i = 0; i < r->cfg.n_rx; i++) {
        int rc = submit_rx(r, &r->rx[i]);
        if (rc < 0)
            return rc;
    }
    if (r->cfg.ep_status)
        return submit_status(r);
    return 0;
}

int udrv_ring_xmit(struct udrv_ring *r, int tap_budget, struct udrv_pump_result *out)
{
    memset(out, 0, sizeof *out);
    out->tap_in = tap_to_journal(r, tap_budget, &out->flags);
    out->tx_submitted = tx_fill(r);
    out->flags |= level_flags(r);
    return (int)out->flags;
}

/* One turn of the datapath; *woken is set if wake_fd became readable while waiting. */
static int pump_once(struct udrv_ring *r, int timeout_ms, int tap_budget, int wake_fd,
                     struct udrv_pump_result *out, int *woken)
{
    memset(out, 0, sizeof *out);
    *woken = 0;
    r->st.pumps++;
    rx_flush(r);          /* frames completed inside Python's own libusb calls since the last turn */
    /* Move what is already waiting first, so fresh frames go out before we sleep. */
    out->tap_in = tap_to_journal(r, tap_budget, &out->flags);
    out->tx_submitted = tx_fill(r);
    if (timeout_ms > 0 && out->tap_in == 0 && r->completions == 0 && !r->confirm_pending &&
        !level_flags(r))
        *woken = wait_events(r, timeout_ms, tap_budget, wake_fd, -1);
    int rc = handle_events_now(r);
    rx_flush(r);          /* the pass's frames to the TAP, their transfers back to the device */
    after_events(r);
    /* Completions freed OUT transfers and journal slots: refill. */
    out->tap_in += tap_to_journal(r, tap_budget - (int)out->tap_in, &out->flags);
    out->tx_submitted += tx_fill(r);
    out->completions = r->completions;
    r->completions = 0;
    out->flags |= r->flags | level_flags(r);
    r->flags = 0;
    return rc < 0 ? rc : (int)out->flags;
}

int udrv_ring_pump(struct udrv_ring *r, int timeout_ms, int tap_budget, struct udrv_pump_result *out)
{
    int woken;
    return pump_once(r, timeout_ms, tap_budget, -1, out, &woken);
}

/* --- the TX thread ------------------------------------------------------------------------------ */

static const uint32_t python_needed = UDRV_PUMP_STATUS | UDRV_PUMP_ERROR | UDRV_PUMP_NO_DEVICE |
                                      UDRV_PUMP_DEFERRED | UDRV_PUMP_TX_STALL;

static void evfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t w = write(fd, &one, sizeof one);
    (void)w;                    /* a full counter still wakes the reader */
}

static void evfd_drain(int fd)
{
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof v);
    (void)n;
}

/* TAP -> journal -> OUT while run() lets it, asleep on the TAP or on txt_evfd otherwise. */
static void *txt_main(void *arg)
{
    struct udrv_ring *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->lock);
        while (!r->txt_go && !r->txt_quit) {
            r->txt_parked = 1;
            pthread_cond_broadcast(&r->cond);
            pthread_cond_wait(&r->cond, &r->lock);
        }
        r->txt_parked = 0;
        int quit = r->txt_quit;
        pthread_mutex_unlock(&r->lock);
        if (quit)
            return NULL;
        uint32_t fl = 0;
        uint32_t moved = tap_to_journal(r, r->txt_budget, &fl);
        uint32_t sent = tx_fill(r);
        if (fl || r->err_count) {
            pthread_mutex_lock(&r->lock);
            r->txt_flags |= fl;
            pthread_mutex_unlock(&r->lock);
            if ((fl & UDRV_PUMP_DEFERRED) || r->err_count)
                evfd_signal(r->main_evfd);  /* Python's turn: run() returns */
        }
        if (moved || sent)
            continue;
        struct pollfd fds[2] = {{r->txt_evfd, POLLIN, 0}, {r->cfg.tap_fd, POLLIN, 0}};
        int tap = udrv_journal_space(&r->j) > 0 && !r->tap.deferred_len && !r->tx_blocked;
        if (poll(fds, tap ? 2 : 1, 50) > 0 && fds[0].revents)
            evfd_drain(r->txt_evfd);
    }
}

static int txt_start(struct udrv_ring *r)
{
    if (r->txt_started)
        return 0;
    if (r->txt_evfd < 0)
        r->txt_evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->main_evfd < 0)
        r->main_evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->txt_evfd < 0 || r->main_evfd < 0)
        return -1;
    /* signals stay with the threads Python knows (its handlers run in the main thread) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    r->txt_parked = 0;
    r->txt_go = 0;
    int rc = pthread_create(&r->txt, NULL, txt_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -1;
    pthread_setname_np(r->txt, "udrv-ring-tx");   /* benches and top tell its CPU from the loop's */
    r->txt_started = 1;
    return 0;
}

static void txt_set_go(struct udrv_ring *r, int go)
{
    pthread_mutex_lock(&r->lock);
    r->txt_go = go;
    pthread_cond_broadcast(&r->cond);
    if (!go) {
        evfd_signal(r->txt_evfd);          /* out of its poll */
        while (!r->txt_parked)
            pthread_cond_wait(&r->cond, &r->lock);
    }
    pthread_mutex_unlock(&r->lock);
}

static void txt_stop(struct udrv_ring *r)
{
    if (!r->txt_started)
        return;
    pthread_mutex_lock(&r->lock);
    r->txt_quit = 1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    evfd_signal(r->txt_evfd);
    pthread_join(r->txt, NULL);
    r->txt_started = 0;
    r->txt_quit = 0;
}

void udrv_ring_set_tx_thread(struct udrv_ring *r, int on)
{
    r->txt_wanted = on;
}

void udrv_ring_set_tx_stall(struct udrv_ring *r, uint32_t ms)
{
    r->tx_stall_ms = ms;
}

void udrv_ring_restart_tx_clock(struct udrv_ring *r)
{
    r->tx_busy_ms = now_ms();
}

/* udrv_ring_run with the TX half on the TX thread: this thread waits for USB events (and
 * wake_fd), reaps, writes RX frames, confirms, and wakes the TX thread when OUT transfers or
 * journal slots came free. The TX thread is parked again before returning. */
static int run_threaded(struct udrv_ring *r, int timeout_ms, int tap_budget, int wake_fd,
                        struct udrv_pump_result *out)
{
    memset(out, 0, sizeof *out);
    if (txt_start(r) < 0) {
        r->txt_wanted = 0;                 /* no thread here: the one-thread loop does it all */
        return udrv_ring_run(r, timeout_ms, tap_budget, wake_fd, out);
    }
    evfd_drain(r->main_evfd);
    r->txt_budget = tap_budget;
    r->tx_completions = 0;
    txt_set_go(r, 1);
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    int rc = 0;
    for (;;) {
        r->st.pumps++;
        rx_flush(r);
        int left = turn_left(r, deadline, &out->flags);
        if (left < 0)
            break;
        int woken = 0;
        if (left > 0 && r->completions == 0 && !r->confirm_pending && !level_flags(r))
            woken = wait_events(r, beat_wait(r, left), 0, wake_fd, r->main_evfd);
        else
            beat_wait(r, left);
        rc = handle_events_now(r);
        rx_flush(r);
        after_events(r);
        if (r->tx_completions) {           /* transfers and slots came free: the TX thread's turn */
            r->tx_completions = 0;
            evfd_signal(r->txt_evfd);
        }
        out->completions += r->completions;
        r->completions = 0;
        out->flags |= r->flags | level_flags(r);
        r->flags = 0;
        pthread_mutex_lock(&r->lock);
        out->flags |= r->txt_flags;
        r->txt_flags = 0;
        pthread_mutex_unlock(&r->lock);
        if (woken)
            out->flags |= UDRV_PUMP_WOKEN;
        if (rc < 0 || (out->flags & python_needed) || woken || left == 0)
            break;
    }
    txt_set_go(r, 0);
    /* what the TX thread did after the last look, and what its last submissions completed */
    out->flags |= r->txt_flags | level_flags(r);
    r->txt_flags = 0;
    return rc < 0 ? rc : (int)out->flags;
}

int udrv_ring_run(struct udrv_ring *r, int timeout_ms, int tap_budget, int wake_fd,
                  struct udrv_pump_result *out)
{
    /* Pump in C until the time is up or Python has something to do: a Python round trip
     * per turn costs more than the turn itself (milliseconds in a TCG guest). */
    if (r->txt_wanted && tap_budget > 0 && r->running)
        return run_threaded(r, timeout_ms, tap_budget, wake_fd, out);
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    struct udrv_pump_result step;
    memset(out, 0, sizeof *out);
    for (;;) {
        int left = turn_left(r, deadline, &out->flags);
        if (left < 0)
            break;
        int woken;
        int rc = pump_once(r, beat_wait(r, left), tap_budget, wake_fd, &step, &woken);
        out->flags |= step.flags;
        out->completions += step.completions;
        out->tap_in += step.tap_in;
        out->tx_submitted += step.tx_submitted;
        if (rc < 0)
            return rc;
        if (woken)
            out->flags |= UDRV_PUMP_WOKEN;
        if ((out->flags & python_needed) || woken || left == 0)
            break;
    }
    return (int)out->flags;
}

/* Handle events until the cancelled transfers are back (OUT only, or all) or timeout_ms passed. */
static void wait_cancelled(struct udrv_ring *r, int timeout_ms, int out_only)
{
    uint64_t deadline = now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    while ((out_only ? r->st.tx_inflight : in_flight(r)) && now_ms() < deadline) {
        struct timeval tv = {0, 10000};
        int rc = libusb_handle_events_timeout_completed(r->ctx, &tv, NULL);
        if (rc < 0 && rc != LIBUSB_ERROR_INTERRUPTED) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL); /* don't spin on a broken context */
        }
    }
}

int udrv_ring_cancel_all_and_wait(struct udrv_ring *r, int timeout_ms)
{
    r->running = 0;
    r->cancel_seen = 0;
    for (uint32_t i = 0; i < r->cfg.n_rx; i++)
        if (r->rx[i].in_flight)
            libusb_cancel_transfer(r->rx[i].t); /* NOT_FOUND = already completing: fine */
    for (uint32_t i = 0; i < r->cfg.n_tx; i++)
        if (r->tx[i].in_flight)
            libusb_cancel_transfer(r->tx[i].t);
    if (r->status.in_flight)
        libusb_cancel_transfer(r->status.t);
    wait_cancelled(r, timeout_ms, 0);
    rx_flush(r);      /* frames received before the cancel reach the TAP (running = 0: no resubmit) */
    apply_confirm(r); /* frames that made it before the cancel are confirmed, not re-sent */
    r->seg_active = 0; /* an entry cut in part goes out whole again (duplicates, nothing lost) */
    r->rx_stalled = r->status_stalled = 0;
    r->completions = 0;
    return (int)in_flight(r);
}

int udrv_ring_recycle_tx(struct udrv_ring *r, int timeout_ms, int clear_halt)
{
    /* the errors queued so far are the ones this recovery deals with (Python raised them) */
    r->err_first = r->err_count = 0;
    r->cancel_seen = 0;
    for (uint32_t i = 0; i < r->cfg.n_tx; i++)
        if (r->tx[i].in_flight)
            libusb_cancel_transfer(r->tx[i].t); /* NOT_FOUND = already completing: fine */
    wait_cancelled(r, timeout_ms, 1);
    if (r->st.tx_inflight)
        return (int)r->st.tx_inflight;
    rx_flush(r);          /* IN completions handled above reach the TAP */
    r->tx_blocked = 0;    /* before apply_confirm: what completed OK above is confirmed */
    apply_confirm(r);     /* frames that made it before the cancel are confirmed, not re-sent */
    r->cancel_seen = 0;
    r->confirm_frames = r->confirm_bytes = 0;
    r->seg_active = 0;    /* an entry cut in part goes out whole again (duplicates, nothing lost) */
    if (r->err_count || r->no_device)
        return -1;        /* something new went wrong meanwhile (a journal out of step): full path */
    r->tx_busy_ms = now_ms();  /* the re-issued frames get the whole stall time again */
    if (clear_halt) {
        int rc = libusb_clear_halt(r->h, (unsigned char)r->cfg.ep_out);
        if (rc == LIBUSB_ERROR_NO_DEVICE) {
            r->no_device = 1;
            return -1;
        }
    }
    /* an IN transfer lost on the way (a resubmission that failed) is queued again */
    if (!r->rx_stalled)
        for (uint32_t i = 0; i < r->cfg.n_rx; i++)
            if (!r->rx[i].in_flight && submit_rx(r, &r->rx[i]) < 0)
                return -1;
    if (r->cfg.ep_status && !r->status.in_flight && !r->status_stalled && submit_status(r) < 0)
        return -1;
    return 0;
}

void udrv_ring_stats(const struct udrv_ring *r, struct udrv_ring_stats *out)
{
    *out = r->st;
    const struct udrv_tapread_stats *t = &r->tap.st;
    out->tap_frames_in = t->frames_in;
    out->tap_oversize = t->oversize;
    out->tap_read_errors = t->read_errors;
    out->tap_offload_frames = t->offload_frames;
    out->tap_bad_offload += t->bad_offload_request;   /* + what the plan refused at send time */
    out->tap_short_vnet = t->short_vnet_header;
    out->tap_deferred = t->deferred;
    out->running = (uint32_t)r->running;
    out->tx_waiting = r->st.tx_inflight > 0;
    out->tx_waiting_since_ms = tx_waiting_since(r);
    out->rx_coalesce = r->cfg.rx_coalesce;
}

int udrv_ring_healthy(const struct udrv_ring *r)
{
    return r->running && !r->no_device && !r->err_count && !r->tx_blocked &&
           r->st.rx_inflight + r->n_held == r->cfg.n_rx &&
           (!r->cfg.ep_status || r->status.in_flight);
}

int udrv_ring_next_error(struct udrv_ring *r, struct udrv_ring_error *out)
{
    if (!r->err_count)
        return 0;
    *out = r->errq[r->err_first];
    r->err_first = (r->err_first + 1) % UDRV_ERRQ;
    r->err_count--;
    return 1;
}

int udrv_ring_take_deferred(struct udrv_ring *r, uint8_t *buf, uint32_t cap)
{
    uint32_t n = r->tap.deferred_len;
    if (!n)
        return -1;
    if (n > cap)
        return -2;
    memcpy(buf, r->tap.deferred, n);
    r->tap.deferred_len = 0;
    return (int)n;
}

int udrv_ring_next_status(struct udrv_ring *r, uint8_t *buf, uint32_t cap)
{
    if (!r->stat_count)
        return -1;
    uint32_t i = r->stat_first;
    uint32_t n = r->statq_len[i] < cap ? r->statq_len[i] : cap;
    memcpy(buf, r->statq[i], n);
    r->stat_first = (r->stat_first + 1) % UDRV_STATQ;
    r->stat_count--;
    return (int)n;
}

int udrv_ring_free(struct udrv_ring *r)
{
    if (!r)
        return 0;
    if (in_flight(r))
        return -1;
    r->running = 0;
    rx_flush(r);
    free_all(r);
    return 0;
}

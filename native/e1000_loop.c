/* The e1000 ring's loop in C (see e1000_loop.h). */
#define _GNU_SOURCE
#include "e1000_loop.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* registers, from the 8254x manual */
enum { REG_RDH = 0x2810, REG_RDT = 0x2818, REG_TDH = 0x3810, REG_TDT = 0x3818, REG_END = 0x3820 };

int e1000_mmio_open(struct e1000_mmio *m, int fd, uint64_t offset, uint64_t size, int try_mmap)
{
    memset(m, 0, sizeof *m);
    if (size < REG_END) {
        errno = EINVAL;
        return -1;
    }
    m->fd = fd;
    m->offset = offset;
    m->size = size;
    if (try_mmap) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
        if (p != MAP_FAILED)
            m->bar = p;
    }
    return 0;
}

void e1000_mmio_close(struct e1000_mmio *m)
{
    if (m->bar)
        munmap((void *)m->bar, m->size);
    m->bar = NULL;
    m->fd = -1;
}

uint32_t e1000_mmio_read32(struct e1000_mmio *m, uint32_t reg)
{
    if (m->bar)
        return *(volatile uint32_t *)(m->bar + reg);
    uint32_t v;
    if (pread(m->fd, &v, 4, (off_t)(m->offset + reg)) != 4) {
        m->errors++;
        return 0xFFFFFFFFu;             /* what a removed device reads as */
    }
    return v;
}

void e1000_mmio_write32(struct e1000_mmio *m, uint32_t reg, uint32_t value)
{
    if (m->bar) {
        *(volatile uint32_t *)(m->bar + reg) = value;
        return;
    }
    if (pwrite(m->fd, &value, 4, (off_t)(m->offset + reg)) != 4)
        m->errors++;
}

/* RX descriptors harvested in one turn from which on the ring counts as backlogged */
#define BACKLOG 64

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* A turn found nothing: what Python's _idle_check does, as far as memory and two reads can.
 * Returns E1000L_* bits (0: quiet and sound). */
static int idle_check(struct e1000_ring *r, struct e1000_mmio *m, struct e1000_loop_result *res)
{
    res->idle_checks++;
    uint32_t rdh = e1000_mmio_read32(m, REG_RDH);
    if (rdh >= r->n_rx)
        return E1000L_CHECK;            /* all ones (removed?) or out of range: Python judges */
    int out = 0;
    if (rdh != r->rx_next && e1000_rx_skip_lost(r, rdh) > 0) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        e1000_mmio_write32(m, REG_RDT, r->rx_tail);
        out |= E1000L_WORK;
    }
    e1000_tx_check_unarmed(r);
    if (r->tx_clean != r->tx_next) {
        uint32_t tdh = e1000_mmio_read32(m, REG_TDH);
        if (tdh >= r->n_tx)
            return out | E1000L_CHECK;
        int n = e1000_tx_skip_lost(r);
        if (n < 0)
            return out | E1000L_EJOURNAL;
        if (n > 0)
            out |= E1000L_WORK;
    }
    return out;
}

/* Sleep up to wait_us on wake_fd and tap_fd (either < 0: not watched). Returns E1000L_WAKE when
 * wake_fd became readable, -1 on a signal (Python's handlers should run) or an error, else 0. */
static int sleep_on(int wake_fd, int tap_fd, int64_t wait_us, struct e1000_loop_result *res)
{
    struct pollfd fds[2];
    int nfds = 0;
    if (wake_fd >= 0)
        fds[nfds++] = (struct pollfd){.fd = wake_fd, .events = POLLIN};
    if (tap_fd >= 0)
        fds[nfds++] = (struct pollfd){.fd = tap_fd, .events = POLLIN};
    struct timespec ts = {wait_us / 1000000, (wait_us % 1000000) * 1000};
    res->sleeps++;
    int p = ppoll(fds, (nfds_t)nfds, &ts, NULL);
    if (p < 0)
        return -1;
    return p > 0 && wake_fd >= 0 && fds[0].revents ? E1000L_WAKE : 0;
}

int e1000_ring_run(struct e1000_ring *r, struct udrv_tapread *tr, struct e1000_mmio *m, int wake_fd,
                   uint32_t timeout_us, uint32_t poll_us, uint32_t tap_budget, uint32_t gap_us,
                   uint32_t flags, struct e1000_loop_result *res)
{
    int64_t now = now_us(), deadline = now + timeout_us;
    int out = 0;
    uint32_t used;
    for (;;) {
        int moved = 0;
        res->turns++;
        int n = e1000_rx_harvest(r, 0, NULL, 0, &used);
        if (n > 0) {
            e1000_mmio_write32(m, REG_RDT, r->rx_tail);
            res->rx += (uint64_t)n;
            moved = 1;
        }
        int c = e1000_tx_reclaim(r);
        if (c < 0)
            return out | E1000L_EJOURNAL;
        if (c > 0) {
            res->reclaimed += (uint64_t)c;
            moved = 1;
        }
        int backlog = n >= (int)BACKLOG;
        if (tr && tap_budget) {
            int64_t t = udrv_tapread_to_journal(tr, &r->journal, tap_budget);
            if (t > 0) {
                res->tap_in += (uint64_t)t;
                moved = 1;
            }
            backlog |= t >= (int64_t)tap_budget;
            if (tr->deferred_len)
                out |= E1000L_DEFERRED;
        }
        if (flags & E1000L_TX) {
            uint32_t start = r->tx_next;
            int f = e1000_tx_fill(r);
            if (f < 0)
                return out | E1000L_EJOURNAL;
            if (r->tx_next != start)
                e1000_mmio_write32(m, REG_TDT, r->tx_next);
            if (f > 0) {
                res->filled += (uint64_t)f;
                moved = 1;
            }
            if (r->python_entry)
                out |= E1000L_PYTHON_TX;
        }
        if (moved)
            out |= E1000L_WORK;
        if (m->errors)
            return out | E1000L_MMIO_ERROR;
        if (out & (E1000L_DEFERRED | E1000L_PYTHON_TX))
            return out;
        int64_t turn_start = now;
        now = now_us();
        int64_t left = deadline - now;
        if (moved) {
            /* the readers of what went to the TAP run before the next batch (a higher-priority
             * daemon would otherwise fill their socket buffers faster than they drain them) */
            if (n > 0 && (flags & E1000L_YIELD))
                sched_yield();
            if (left <= 0)
                return out;
            if (backlog)
                continue;               /* more is waiting: the next turn at once */
            /* caught up: the next turn no sooner than gap_us after this one began, so that
             * frames gather into batches (what the chip's ITR does for a kernel driver) */
            int64_t wait = turn_start + gap_us - now;
            if (wait > left)
                wait = left;
            if (wait > 0) {             /* the TAP is not watched: its frames gather meanwhile */
                int w = sleep_on(wake_fd, -1, wait, res);
                if (w)
                    return w < 0 ? out : out | w;
            }
            now = now_us();
            continue;
        }
        int chk = idle_check(r, m, res);
        out |= chk;
        if (chk & (E1000L_CHECK | E1000L_EJOURNAL) || m->errors)
            return m->errors ? out | E1000L_MMIO_ERROR : out;
        if (chk & E1000L_WORK)
            continue;
        if (left <= 0)
            return out;
        int64_t wait = left < (int64_t)poll_us ? left : (int64_t)poll_us;
        int tap_fd = tr && tap_budget && udrv_journal_space(&r->journal) > 0 ? tr->fd : -1;
        int w = sleep_on(wake_fd, tap_fd, wait, res);
        if (w)
            return w < 0 ? out : out | w;   /* a signal: Python's handlers run now */
        now = now_us();
    }
}

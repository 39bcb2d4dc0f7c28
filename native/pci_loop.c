/* The PCI ring's loop in C (see pci_loop.h). */
#define _GNU_SOURCE
#include "pci_loop.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int reg_fits(uint32_t reg, uint64_t size)
{
    return reg % 4 == 0 && (uint64_t)reg + 4 <= size;
}

int pci_mmio_open(struct pci_mmio *m, int fd, uint64_t offset, uint64_t size, int try_mmap,
                  const struct pci_ring_regs *regs)
{
    memset(m, 0, sizeof *m);
    m->fd = -1;
    if (!reg_fits(regs->rdh, size) || !reg_fits(regs->rdt, size) || !reg_fits(regs->tdh, size)
        || !reg_fits(regs->tdt, size)) {
        errno = EINVAL;
        return -1;
    }
    m->regs = *regs;
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

void pci_mmio_close(struct pci_mmio *m)
{
    if (m->bar)
        munmap((void *)m->bar, m->size);
    m->bar = NULL;
    m->fd = -1;
}

uint32_t pci_mmio_read32(struct pci_mmio *m, uint32_t reg)
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

void pci_mmio_write32(struct pci_mmio *m, uint32_t reg, uint32_t value)
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

/* A turn found nothing: what the Python engine's idle_check does, as far as memory and two reads can.
 * Returns PCIL_* bits (0: quiet and sound). */
static int idle_check(struct pci_ring *r, struct pci_mmio *m, struct pci_loop_result *res)
{
    res->idle_checks++;
    uint32_t rdh = pci_mmio_read32(m, m->regs.rdh);
    if (rdh >= r->n_rx)
        return PCIL_CHECK;            /* all ones (removed?) or out of range: Python judges */
    int out = 0;
    if (rdh != r->rx_next && pci_rx_skip_lost(r, rdh) > 0) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        pci_mmio_write32(m, m->regs.rdt, r->rx_tail);
        out |= PCIL_WORK;
    }
    pci_tx_check_unarmed(r);
    if (r->tx_clean != r->tx_next) {
        uint32_t tdh = pci_mmio_read32(m, m->regs.tdh);
        if (tdh >= r->n_tx)
            return out | PCIL_CHECK;
        int n = pci_tx_skip_lost(r);
        if (n < 0)
            return out | PCIL_EJOURNAL;
        if (n > 0)
            out |= PCIL_WORK;
    }
    return out;
}

/* Sleep up to wait_us on wake_fd and tap_fd (either < 0: not watched). Returns PCIL_WAKE when
 * wake_fd became readable, -1 on a signal (Python's handlers should run) or an error, else 0. */
static int sleep_on(int wake_fd, int tap_fd, int64_t wait_us, struct pci_loop_result *res)
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
    return p > 0 && wake_fd >= 0 && fds[0].revents ? PCIL_WAKE : 0;
}

int pci_ring_run(struct pci_ring *r, struct udrv_tapread *tr, struct pci_mmio *m, int wake_fd,
                   uint32_t timeout_us, uint32_t poll_us, uint32_t tap_budget, uint32_t gap_us,
                   uint32_t flags, struct pci_loop_result *res)
{
    int64_t now = now_us(), deadline = now + timeout_us;
    int out = 0;
    uint32_t used;
    for (;;) {
        int moved = 0;
        res->turns++;
        if (res->beat)                  /* the worker is alive and going round: its heartbeat */
            *res->beat = now * 1000;
        int n = pci_rx_harvest(r, 0, NULL, 0, &used);
        if (n > 0) {
            pci_mmio_write32(m, m->regs.rdt, r->rx_tail);
            res->rx += (uint64_t)n;
            moved = 1;
        }
        int c = pci_tx_reclaim(r);
        if (c < 0)
            return out | PCIL_EJOURNAL;
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
                out |= PCIL_DEFERRED;
        }
        if (flags & PCIL_TX) {
            uint32_t start = r->tx_next;
            int f = pci_tx_fill(r);
            if (f < 0)
                return out | PCIL_EJOURNAL;
            if (r->tx_next != start)
                pci_mmio_write32(m, m->regs.tdt, r->tx_next);
            if (f > 0) {
                res->filled += (uint64_t)f;
                moved = 1;
            }
            if (r->python_entry)
                out |= PCIL_PYTHON_TX;
        }
        if (moved)
            out |= PCIL_WORK;
        if (m->errors)
            return out | PCIL_MMIO_ERROR;
        if (out & (PCIL_DEFERRED | PCIL_PYTHON_TX))
            return out;
        int64_t turn_start = now;
        now = now_us();
        int64_t left = deadline - now;
        if (moved) {
            /* the readers of what went to the TAP run before the next batch (a higher-priority
             * daemon would otherwise fill their socket buffers faster than they drain them) */
            if (n > 0 && (flags & PCIL_YIELD))
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
        if (chk & (PCIL_CHECK | PCIL_EJOURNAL) || m->errors)
            return m->errors ? out | PCIL_MMIO_ERROR : out;
        if (chk & PCIL_WORK)
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

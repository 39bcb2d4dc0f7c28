/* The interruption probe (udrv/bench/probe.py) and its echo server (udrv/bench/echo.py), their loops in C.
 *
 * A Python loop sending and receiving a datagram every millisecond costs a large share of a
 * TCG guest's vCPU and brings its own scheduling jitter, which the probe then reports as gaps
 * on the wire; both drivers measured (the kernel's and udrv's) share that floor. In C the
 * instrument is cheap enough to stay out of what it measures. Python keeps the set-up, the
 * signals (a turn returns early on EINTR so the interpreter runs its handlers) and the report.
 */
#ifndef UDRV_PROBE_H
#define UDRV_PROBE_H

#include <stdint.h>

struct udrv_probe {
    int fd;                 /* a connected UDP socket, non-blocking */
    uint64_t interval_ns;
    uint64_t next_ns;       /* CLOCK_MONOTONIC of the next send */
    uint64_t sent;          /* probes sent; probe n carries n as 8 big-endian bytes */
    uint64_t received;      /* distinct probes answered: times[0 .. received) */
    uint64_t duplicates;    /* answers to a probe already answered */
    uint64_t overflow;      /* answers to probes beyond cap (not recorded) */
    uint64_t send_errors;
    uint32_t cap;           /* size of times[] and answered[] */
    double *times;          /* CLOCK_MONOTONIC seconds of each first answer, in arrival order */
    uint8_t *answered;      /* by probe number */
};

/* Send on schedule and record answers for up to max_ms. Returns 0 when the time is up, 1 when
 * a signal interrupted the wait (the caller lets its handlers run and calls again). */
int udrv_probe_turn(struct udrv_probe *p, int max_ms);

/* Echo every datagram on the bound UDP socket fd back to its sender for up to max_ms.
 * Returns datagrams echoed, or -1 when a signal interrupted the wait. */
int udrv_echo_turn(int fd, int max_ms);

#endif

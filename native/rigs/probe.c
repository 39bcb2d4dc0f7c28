/* See probe.h. */
#define _GNU_SOURCE
#include "probe.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void probe_send(struct udrv_probe *p)
{
    uint8_t msg[8];
    uint64_t seq = p->sent;
    for (int i = 7; i >= 0; i--, seq >>= 8)
        msg[i] = (uint8_t)seq;
    if (send(p->fd, msg, sizeof msg, MSG_DONTWAIT) == (ssize_t)sizeof msg)
        p->sent++;
    else
        p->send_errors++;     /* unreachable for now (the NIC is recovering): try the next */
}

static void probe_drain(struct udrv_probe *p)
{
    uint8_t buf[64];
    for (;;) {
        ssize_t n = recv(p->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;            /* EAGAIN, or an ICMP error reported on the socket: next time */
        }
        if (n < 8)
            continue;
        uint64_t seq = 0;
        for (int i = 0; i < 8; i++)
            seq = seq << 8 | buf[i];
        double at = (double)mono_ns() / 1e9;
        if (seq >= p->cap) {
            p->overflow++;
        } else if (p->answered[seq]) {
            p->duplicates++;  /* at-least-once: a frame re-issued after a recovery */
        } else {
            p->answered[seq] = 1;
            p->times[p->received++] = at;
        }
    }
}

int udrv_probe_turn(struct udrv_probe *p, int max_ms)
{
    uint64_t now = mono_ns();
    uint64_t end = now + (uint64_t)(max_ms > 0 ? max_ms : 0) * 1000000ull;
    if (!p->next_ns)
        p->next_ns = now;
    for (;;) {
        now = mono_ns();
        if (now >= p->next_ns) {
            probe_send(p);
            p->next_ns += p->interval_ns;
            if (p->next_ns < now)          /* fell behind (descheduled): no burst to catch up */
                p->next_ns = now + p->interval_ns;
        }
        if (now >= end)
            return 0;
        uint64_t wake = p->next_ns < end ? p->next_ns : end;
        struct timespec ts = {(time_t)((wake - now) / 1000000000ull), (long)((wake - now) % 1000000000ull)};
        struct pollfd pfd = {p->fd, POLLIN, 0};
        int rc = ppoll(&pfd, 1, &ts, NULL);
        if (rc < 0 && errno == EINTR)
            return 1;
        if (rc > 0)
            probe_drain(p);
    }
}

int udrv_echo_turn(int fd, int max_ms)
{
    uint64_t end = mono_ns() + (uint64_t)(max_ms > 0 ? max_ms : 0) * 1000000ull;
    int echoed = 0;
    uint8_t buf[2048];
    for (;;) {
        for (;;) {
            struct sockaddr_in6 from;
            socklen_t fl = sizeof from;
            ssize_t n = recvfrom(fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
            if (n < 0) {
                if (errno == EINTR)
                    return -1;
                break;
            }
            /* blocking, as a Python echo would: a full socket buffer waits, it does not drop */
            if (sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fl) == n)
                echoed++;
        }
        uint64_t now = mono_ns();
        if (now >= end)
            return echoed;
        int ms = (int)((end - now + 999999) / 1000000);
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, ms) < 0 && errno == EINTR)
            return -1;
    }
}

/* TAP -> TX journal (see tapread.h): Nic.enqueue's rules for a handles_vnet datapath, in C. */
#include "tapread.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* virtio-net header (udrv/offload.py) */
enum { VNET_F_NEEDS_CSUM = 0x01, VNET_GSO_NONE = 0, VNET_GSO_TCPV4 = 1, VNET_GSO_TCPV6 = 4 };

int udrv_tapread_init(struct udrv_tapread *t, int fd, uint32_t vnet_hdr, uint32_t mtu_max)
{
    memset(t, 0, offsetof(struct udrv_tapread, scratch));
    t->fd = fd;
    t->vnet_hdr = vnet_hdr;
    t->mtu_max = mtu_max;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

/* Byte i of a frame read across the slot (cap bytes) and the scratch buffer. */
static inline uint8_t byte_at(const uint8_t *slot, uint32_t cap, const uint8_t *scratch, uint32_t i)
{
    return i < cap ? slot[i] : scratch[i - cap];
}

static inline uint32_t u16_at(const uint8_t *slot, uint32_t cap, const uint8_t *scratch, uint32_t i)
{
    return byte_at(slot, cap, scratch, i) | (uint32_t)byte_at(slot, cap, scratch, i + 1) << 8;
}

/* What to do with a frame read with its vnet header: 1 keep the header, 0 drop it, -1 dropped
 * (counted), -2 defer to Python. */
static int judge_vnet(struct udrv_tapread *t, const uint8_t *s, uint32_t cap, uint32_t got)
{
    const uint8_t *x = t->scratch;
    uint32_t h = t->vnet_hdr, flen = got - h;
    uint8_t flags = byte_at(s, cap, x, 0), gso = byte_at(s, cap, x, 1);
    if (gso == VNET_GSO_NONE) {
        if (flen > t->mtu_max) {
            t->st.oversize++;
            return -1;
        }
        if (!(flags & VNET_F_NEEDS_CSUM))
            return 0;
        uint32_t start = u16_at(s, cap, x, 6), offset = u16_at(s, cap, x, 8);
        if (start >= flen || start + offset + 2 > flen) {
            t->st.bad_offload_request++;
            return -1;
        }
        t->st.offload_frames++;
        return 1;
    }
    if ((gso == VNET_GSO_TCPV4 || gso == VNET_GSO_TCPV6) && (flags & VNET_F_NEEDS_CSUM)) {
        uint32_t size = u16_at(s, cap, x, 4), start = u16_at(s, cap, x, 6);
        if (start + 13 > flen) {
            t->st.bad_offload_request++;
            return -1;
        }
        uint32_t doff = byte_at(s, cap, x, h + start + 12) >> 4;
        if (start + doff * 4 + size > t->mtu_max) {
            t->st.oversize++;
            return -1;
        }
        t->st.offload_frames++;
        return 1;
    }
    return -2;
}

int64_t udrv_tapread_to_journal(struct udrv_tapread *t, struct udrv_journal *j, uint32_t budget)
{
    uint32_t moved = 0, h = t->vnet_hdr;
    while (moved < budget && !t->deferred_len) {
        uint32_t cap;
        uint8_t *s = udrv_journal_reserve_read(j, &cap, h);
        if (!s) {
            t->st.journal_full++; /* leave frames in the kernel's queue */
            break;
        }
        struct iovec iov[2] = {{s, cap}, {t->scratch, sizeof t->scratch}};
        ssize_t r = readv(t->fd, iov, 2);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                t->st.read_errors++;
            break;
        }
        if (r == 0)
            break;
        uint32_t got = (uint32_t)r;
        if (!h) {
            t->st.frames_in++;
            t->st.bytes_in += got;
            if (got > t->mtu_max || got > cap) {
                t->st.oversize++;
                continue;
            }
            udrv_journal_commit(j, got);
            moved++;
            continue;
        }
        if (got < h) {
            t->st.frames_in++;
            t->st.bytes_in += got;
            t->st.short_vnet_header++;
            continue;
        }
        int verdict = judge_vnet(t, s, cap, got);
        if (verdict == -2) {
            /* Python's turn (Nic.enqueue counts it): hand over the raw bytes */
            uint32_t in_slot = got < cap ? got : cap;
            memcpy(t->deferred, s, in_slot);
            if (got > cap)
                memcpy(t->deferred + cap, t->scratch, got - cap);
            t->deferred_len = got;
            t->st.deferred++;
            break;
        }
        t->st.frames_in++;
        t->st.bytes_in += got - h;
        if (verdict < 0)
            continue;
        if (verdict == 1) {
            if (got > cap) {
                t->st.oversize++;
                continue;
            }
            udrv_journal_commit_vnet(j, got, h);
        } else {
            uint32_t flen = got - h;
            if (flen > cap) {
                t->st.oversize++;
                continue;
            }
            uint32_t in_slot = got < cap ? got : cap;
            memmove(s, s + h, in_slot - h);
            if (got > cap)
                memcpy(s + in_slot - h, t->scratch, got - cap);
            udrv_journal_commit(j, flen);
        }
        moved++;
    }
    return moved;
}

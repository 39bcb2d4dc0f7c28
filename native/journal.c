/* TX journal operations on the memory layout documented in udrv/journal.py. */
#include "journal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <math.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the journal layout is little-endian; this build assumes a little-endian CPU"
#endif

enum { OFF_MAGIC = 0, OFF_NSLOTS = 4, OFF_SLOT_SIZE = 8, OFF_READING = 12, OFF_HEAD = 16, OFF_SENT = 24,
       OFF_TAIL = 32, OFF_REISSUED = 40, OFF_DUPS = 48,
       /* the AQM: settings (target 0 = off), counters, and CoDel's state, kept in the shared
        * header so a second process (or the other datapath) carries on where one stopped */
       OFF_AQM_TARGET = 56, OFF_AQM_INTERVAL = 64, OFF_AQM_DROPS = 72, OFF_AQM_MARKS = 80,
       OFF_CODEL_FIRST_ABOVE = 88, OFF_CODEL_DROP_NEXT = 96, OFF_CODEL_COUNT = 104,
       OFF_CODEL_LASTCOUNT = 108, OFF_CODEL_DROPPING = 112, OFF_AQM_FLAGS = 116,
       OFF_AQM_JUDGED = 120 };
enum { SLOT_OFF_STAMP = 16 };
#define AQM_FLAG_ECN 0x1u

/* Index words are read with acquire and written with release ordering: a worker process
 * mapping the same memfd must never see an index before the slot bytes it covers. */
static inline uint64_t get64(const struct udrv_journal *j, int off)
{
    return __atomic_load_n((const uint64_t *)(j->mem + off), __ATOMIC_ACQUIRE);
}

static inline void set64(struct udrv_journal *j, int off, uint64_t v)
{
    __atomic_store_n((uint64_t *)(j->mem + off), v, __ATOMIC_RELEASE);
}

static inline uint32_t get32(const struct udrv_journal *j, int off)
{
    return __atomic_load_n((const uint32_t *)(j->mem + off), __ATOMIC_RELAXED);
}

static inline void set32(struct udrv_journal *j, int off, uint32_t v)
{
    __atomic_store_n((uint32_t *)(j->mem + off), v, __ATOMIC_RELAXED);
}

uint64_t udrv_journal_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint8_t *slot(const struct udrv_journal *j, uint64_t seq)
{
    return j->mem + UDRV_JOURNAL_HEADER + (seq & (j->nslots - 1)) * (uint64_t)j->slot_size;
}

static int check_layout(struct udrv_journal *j, uint32_t nslots, uint32_t slot_size)
{
    uint32_t hdr[3];
    if (nslots == 0 || (nslots & (nslots - 1)) || slot_size <= UDRV_JOURNAL_SLOT_HEADER)
        return UDRV_JOURNAL_BAD_LAYOUT;
    if (j->size < UDRV_JOURNAL_HEADER + (uint64_t)nslots * slot_size)
        return UDRV_JOURNAL_BAD_LAYOUT;
    memcpy(hdr, j->mem, sizeof hdr);
    if (hdr[0] != UDRV_JOURNAL_MAGIC || hdr[1] != nslots || hdr[2] != slot_size)
        return UDRV_JOURNAL_BAD_LAYOUT;
    j->nslots = nslots;
    j->slot_size = slot_size;
    j->max_frame = slot_size - UDRV_JOURNAL_SLOT_HEADER;
    return 0;
}

int udrv_journal_attach(struct udrv_journal *j, void *mem, uint64_t size, uint32_t nslots,
                        uint32_t slot_size)
{
    memset(j, 0, sizeof *j);
    j->mem = mem;
    j->size = size;
    return check_layout(j, nslots, slot_size);
}

int udrv_journal_map_fd(struct udrv_journal *j, int fd, uint32_t nslots, uint32_t slot_size)
{
    uint64_t size = UDRV_JOURNAL_HEADER + (uint64_t)nslots * slot_size;
    memset(j, 0, sizeof *j);
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return UDRV_JOURNAL_MAP_FAILED;
    j->mem = m;
    j->size = size;
    j->mapped = 1;
    int rc = check_layout(j, nslots, slot_size);
    if (rc < 0)
        udrv_journal_unmap(j);
    return rc;
}

void udrv_journal_unmap(struct udrv_journal *j)
{
    if (j->mapped && j->mem)
        munmap(j->mem, j->size);
    j->mem = NULL;
    j->mapped = 0;
}

uint64_t udrv_journal_head(const struct udrv_journal *j) { return get64(j, OFF_HEAD); }
uint64_t udrv_journal_sent(const struct udrv_journal *j) { return get64(j, OFF_SENT); }
uint64_t udrv_journal_tail(const struct udrv_journal *j) { return get64(j, OFF_TAIL); }
uint64_t udrv_journal_reissued(const struct udrv_journal *j) { return get64(j, OFF_REISSUED); }
uint64_t udrv_journal_duplicates(const struct udrv_journal *j) { return get64(j, OFF_DUPS); }

uint64_t udrv_journal_space(const struct udrv_journal *j)
{
    return j->nslots - (get64(j, OFF_HEAD) - get64(j, OFF_TAIL));
}

uint8_t *udrv_journal_reserve(struct udrv_journal *j, uint32_t *cap)
{
    uint64_t head = get64(j, OFF_HEAD);
    if (head - get64(j, OFF_TAIL) >= j->nslots)
        return NULL;
    *cap = j->max_frame;
    return slot(j, head) + UDRV_JOURNAL_SLOT_HEADER;
}

uint8_t *udrv_journal_reserve_read(struct udrv_journal *j, uint32_t *cap, uint32_t mark)
{
    uint8_t *p = udrv_journal_reserve(j, cap);
    if (!p || mark + 6 > *cap)
        return p;
    memset(p + mark, 0, 6);
    /* release: the zeroed mark is in memory before the word that says a read is under way */
    __atomic_store_n((uint32_t *)(j->mem + OFF_READING), (uint32_t)(get64(j, OFF_HEAD) + 1), __ATOMIC_RELEASE);
    return p;
}

static int64_t commit_flags(struct udrv_journal *j, uint32_t len, uint32_t flags)
{
    uint64_t seq = get64(j, OFF_HEAD);
    uint8_t *s = slot(j, seq);
    memcpy(s, &len, 4);
    memcpy(s + 4, &flags, 4);
    memcpy(s + 8, &seq, 8);
    uint64_t stamp = udrv_journal_now_ns();
    memcpy(s + SLOT_OFF_STAMP, &stamp, 8);
    set64(j, OFF_HEAD, seq + 1); /* release: the slot is complete before head covers it */
    return (int64_t)seq;
}

int64_t udrv_journal_commit(struct udrv_journal *j, uint32_t len)
{
    return commit_flags(j, len, 0);
}

int64_t udrv_journal_commit_vnet(struct udrv_journal *j, uint32_t len, uint32_t vlen)
{
    return commit_flags(j, len, vlen ? UDRV_JOURNAL_SLOT_VNET | vlen << UDRV_JOURNAL_VNET_LEN_SHIFT : 0);
}

int64_t udrv_journal_append(struct udrv_journal *j, const uint8_t *frame, uint32_t len)
{
    uint32_t cap;
    /* Same order of checks as TxJournal.append: full first, then size. */
    uint8_t *p = udrv_journal_reserve(j, &cap);
    if (!p)
        return UDRV_JOURNAL_FULL;
    if (len > cap)
        return UDRV_JOURNAL_TOO_BIG;
    memcpy(p, frame, len);
    return udrv_journal_commit(j, len);
}

int64_t udrv_journal_append_vnet(struct udrv_journal *j, const uint8_t *vnet, uint32_t vlen,
                                 const uint8_t *frame, uint32_t len)
{
    uint32_t cap;
    uint8_t *p = udrv_journal_reserve(j, &cap);
    if (!p)
        return UDRV_JOURNAL_FULL;
    if ((uint64_t)vlen + len > cap || vlen > 0xFF)
        return UDRV_JOURNAL_TOO_BIG;
    memcpy(p, vnet, vlen);
    memcpy(p + vlen, frame, len);
    uint32_t flags = vlen ? UDRV_JOURNAL_SLOT_VNET | vlen << UDRV_JOURNAL_VNET_LEN_SHIFT : 0;
    return commit_flags(j, vlen + len, flags);
}

/* The slot of `seq`, checked as TxJournal.entry checks it: header and frame located. */
static int read_slot(const struct udrv_journal *j, uint64_t seq, const uint8_t **vnet,
                     uint32_t *vlen, const uint8_t **frame, uint32_t *len)
{
    const uint8_t *s = slot(j, seq);
    uint32_t length, flags, hlen;
    uint64_t stored;
    memcpy(&length, s, 4);
    memcpy(&flags, s + 4, 4);
    memcpy(&stored, s + 8, 8);
    hlen = flags & UDRV_JOURNAL_SLOT_VNET ? (flags >> UDRV_JOURNAL_VNET_LEN_SHIFT) & 0xFF : 0;
    if (stored != seq || length > j->max_frame || hlen > length)
        return UDRV_JOURNAL_CORRUPT;
    *vnet = s + UDRV_JOURNAL_SLOT_HEADER;
    *vlen = hlen;
    *frame = s + UDRV_JOURNAL_SLOT_HEADER + hlen;
    *len = length - hlen;
    return 1;
}

int udrv_journal_take_unsent(struct udrv_journal *j, uint64_t *seq, const uint8_t **frame,
                             uint32_t *len)
{
    uint64_t sent = get64(j, OFF_SENT);
    if (sent >= get64(j, OFF_HEAD))
        return 0;
    set64(j, OFF_SENT, sent + 1);
    /* Python advances `sent` before it notices the corruption; so do we. */
    const uint8_t *vnet;
    uint32_t vlen;
    int rc = read_slot(j, sent, &vnet, &vlen, frame, len);
    if (rc < 0)
        return rc;
    *seq = sent;
    return 1;
}

int udrv_journal_peek_unsent(const struct udrv_journal *j, uint64_t *seq, const uint8_t **vnet,
                             uint32_t *vlen, const uint8_t **frame, uint32_t *len)
{
    uint64_t sent = get64(j, OFF_SENT);
    if (sent >= get64(j, OFF_HEAD))
        return 0;
    int rc = read_slot(j, sent, vnet, vlen, frame, len);
    if (rc < 0)
        return rc;
    *seq = sent;
    return 1;
}

int udrv_journal_mark_sent(struct udrv_journal *j, uint64_t seq)
{
    if (seq != get64(j, OFF_SENT) || seq >= get64(j, OFF_HEAD))
        return UDRV_JOURNAL_NEVER_SENT;
    set64(j, OFF_SENT, seq + 1);
    return 0;
}

int64_t udrv_journal_confirm_through(struct udrv_journal *j, uint64_t seq)
{
    uint64_t tail = get64(j, OFF_TAIL);
    if (seq < tail)
        return 0; /* already confirmed: a late or repeated completion */
    if (seq >= get64(j, OFF_SENT))
        return UDRV_JOURNAL_NEVER_SENT;
    set64(j, OFF_TAIL, seq + 1);
    return (int64_t)(seq + 1 - tail);
}

uint64_t udrv_journal_rewind(struct udrv_journal *j)
{
    uint64_t tail = get64(j, OFF_TAIL);
    uint64_t again = get64(j, OFF_SENT) - tail;
    set64(j, OFF_SENT, tail);
    set64(j, OFF_REISSUED, get64(j, OFF_REISSUED) + again);
    set64(j, OFF_DUPS, get64(j, OFF_DUPS) + again);
    return again;
}

uint64_t udrv_journal_aqm_drops(const struct udrv_journal *j) { return get64(j, OFF_AQM_DROPS); }
uint64_t udrv_journal_aqm_marks(const struct udrv_journal *j) { return get64(j, OFF_AQM_MARKS); }

int udrv_journal_mark_ce(uint8_t *f, uint32_t len)
{
    uint32_t l3 = 14;
    if (len < 14)
        return -1;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    for (int tags = 0; tags < 2; tags++) {   /* up to two VLAN tags (802.1Q, 802.1ad), as gso.c */
        if ((type != 0x8100 && type != 0x88A8) || len < l3 + 4)
            break;
        type = (uint16_t)(f[l3 + 2] << 8 | f[l3 + 3]);
        l3 += 4;
    }
    if (type == 0x0800 && len >= l3 + 20 && f[l3] >> 4 == 4) {
        uint8_t *ip = f + l3;
        if (!(ip[1] & 3))
            return 0;
        if ((ip[1] & 3) == 3)
            return 1;
        /* RFC 1624: HC' = ~(~HC + ~m + m'), m the 16-bit word that holds the TOS */
        uint32_t old = (uint32_t)(ip[0] << 8 | ip[1]);
        ip[1] |= 3;
        uint32_t sum = (uint16_t)~(ip[10] << 8 | ip[11]) + (uint16_t)~old + (uint32_t)(ip[0] << 8 | ip[1]);
        sum = (sum & 0xFFFF) + (sum >> 16);
        sum = (sum & 0xFFFF) + (sum >> 16);
        uint16_t hc = (uint16_t)~sum;
        ip[10] = (uint8_t)(hc >> 8);
        ip[11] = (uint8_t)hc;
        return 1;
    }
    if (type == 0x86DD && len >= l3 + 40 && f[l3] >> 4 == 6) {
        uint8_t *ip = f + l3;            /* traffic class: low nibble of byte 0, high of byte 1 */
        if (!(ip[1] & 0x30))
            return 0;
        ip[1] |= 0x30;
        return 1;
    }
    return -1;
}

/* CoDel's next drop time: t + interval / sqrt(count) */
static uint64_t control_law(uint64_t t, uint64_t interval, uint32_t count)
{
    return t + (uint64_t)((double)interval / sqrt((double)count));
}

int udrv_journal_aqm_drop(struct udrv_journal *j, uint64_t now)
{
    uint64_t target = get64(j, OFF_AQM_TARGET);
    if (!target)
        return 0;
    uint64_t seq = get64(j, OFF_SENT), head = get64(j, OFF_HEAD);
    if (seq >= head || seq < get64(j, OFF_AQM_JUDGED))
        return 0;                 /* nothing to judge, or re-issued / already judged: it goes */
    set64(j, OFF_AQM_JUDGED, seq + 1);
    uint64_t interval = get64(j, OFF_AQM_INTERVAL);
    uint64_t stamp;
    memcpy(&stamp, slot(j, seq) + SLOT_OFF_STAMP, 8);
    uint64_t sojourn = now > stamp ? now - stamp : 0;
    /* should_drop: above target for a whole interval, with more than this entry queued */
    int ok_to_drop = 0;
    if (sojourn < target || head - seq <= 1) {
        set64(j, OFF_CODEL_FIRST_ABOVE, 0);
    } else {
        uint64_t first = get64(j, OFF_CODEL_FIRST_ABOVE);
        if (!first)
            set64(j, OFF_CODEL_FIRST_ABOVE, now + interval);
        else
            ok_to_drop = now >= first;
    }
    uint64_t drop_next = get64(j, OFF_CODEL_DROP_NEXT);
    uint32_t count = get32(j, OFF_CODEL_COUNT);
    if (get32(j, OFF_CODEL_DROPPING)) {
        if (!ok_to_drop) {
            set32(j, OFF_CODEL_DROPPING, 0);
            return 0;
        }
        if (now < drop_next)
            return 0;
        if (count < UINT32_MAX)
            count++;                  /* saturates: sqrt(0) never comes */
        set32(j, OFF_CODEL_COUNT, count);
        set64(j, OFF_CODEL_DROP_NEXT, control_law(drop_next, interval, count));
    } else {
        if (!ok_to_drop)
            return 0;
        set32(j, OFF_CODEL_DROPPING, 1);
        /* a drop state entered soon after the last one starts near its old rate */
        uint32_t delta = count - get32(j, OFF_CODEL_LASTCOUNT);
        count = delta > 1 && (int64_t)(now - drop_next) < (int64_t)(16 * interval) ? delta : 1;
        set32(j, OFF_CODEL_COUNT, count);
        set32(j, OFF_CODEL_LASTCOUNT, count);
        set64(j, OFF_CODEL_DROP_NEXT, control_law(now, interval, count));
    }
    /* drop it, or with ECN on, mark an ECN-capable frame instead */
    if (get32(j, OFF_AQM_FLAGS) & AQM_FLAG_ECN) {
        const uint8_t *vnet, *cf;
        uint32_t vlen, len;
        if (read_slot(j, seq, &vnet, &vlen, &cf, &len) > 0 && udrv_journal_mark_ce((uint8_t *)cf, len) > 0) {
            set64(j, OFF_AQM_MARKS, get64(j, OFF_AQM_MARKS) + 1);
            return 0;
        }
    }
    set64(j, OFF_AQM_DROPS, get64(j, OFF_AQM_DROPS) + 1);
    return 1;
}

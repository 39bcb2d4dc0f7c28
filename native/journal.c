/* TX journal operations on the memory layout documented in udrv/journal.py. */
#include "journal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the journal layout is little-endian; this build assumes a little-endian CPU"
#endif

enum { OFF_MAGIC = 0, OFF_NSLOTS = 4, OFF_SLOT_SIZE = 8, OFF_HEAD = 16, OFF_SENT = 24,
       OFF_TAIL = 32, OFF_REISSUED = 40, OFF_DUPS = 48 };

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

static int64_t commit_flags(struct udrv_journal *j, uint32_t len, uint32_t flags)
{
    uint64_t seq = get64(j, OFF_HEAD);
    uint8_t *s = slot(j, seq);
    memcpy(s, &len, 4);
    memcpy(s + 4, &flags, 4);
    memcpy(s + 8, &seq, 8);
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

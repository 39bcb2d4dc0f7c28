/* The TX journal seen from C: the same fixed-slot ring in a memfd that udrv/journal.py
 * documents, operated with the same semantics as `TxJournal`.
 *
 *   header (128 bytes): magic u32 | nslots u32 | slot_size u32 | _ u32 |
 *                       head u64 @16 | sent u64 @24 | tail u64 @32 | reissued u64 @40 |
 *                       duplicates u64 @48 | the AQM's settings, counters and CoDel state @56
 *                       (offsets in journal.c and udrv/journal.py)
 *   slot i at 128 + i * slot_size: length u32 | flags u32 | seq u64 | stamp u64 | _ u64 |
 *                                  payload (length bytes)
 *     stamp: CLOCK_MONOTONIC ns when the frame was journaled (the AQM's sojourn time).
 *     flags bit 0 (UDRV_JOURNAL_SLOT_VNET): the payload starts with a virtio-net header of
 *     N = flags bits 15:8 bytes, then the frame; flags 0: the payload is the frame.
 *
 * The header is the only copy of the indices on the C side (no caching), so Python and C can
 * take turns on the same memory; Python re-reads its cached mirrors with TxJournal.sync().
 */
#ifndef UDRV_JOURNAL_H
#define UDRV_JOURNAL_H

#include <stdint.h>

#define UDRV_JOURNAL_MAGIC 0x324A4455u /* "UDJ2" */
#define UDRV_JOURNAL_HEADER 128
#define UDRV_JOURNAL_SLOT_HEADER 32
#define UDRV_JOURNAL_SLOT_VNET 0x1u       /* slot flags: payload starts with a vnet header */
#define UDRV_JOURNAL_VNET_LEN_SHIFT 8     /* ... of (flags >> 8) & 0xFF bytes */

/* Negative results of the journal operations. */
#define UDRV_JOURNAL_FULL (-1)       /* append: no free slot (TxJournal raises JournalFull) */
#define UDRV_JOURNAL_TOO_BIG (-2)    /* append: frame larger than a slot (ValueError) */
#define UDRV_JOURNAL_CORRUPT (-3)    /* take_unsent: the slot holds another seq (UdrvError) */
#define UDRV_JOURNAL_NEVER_SENT (-4) /* confirm_through: seq was never sent (UdrvError) */
#define UDRV_JOURNAL_BAD_LAYOUT (-5) /* attach/map: magic, nslots or slot_size do not match */
#define UDRV_JOURNAL_MAP_FAILED (-6) /* map_fd: mmap failed (errno tells why) */

struct udrv_journal {
    uint8_t *mem;
    uint64_t size;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t max_frame;
    uint32_t mapped; /* 1 if udrv_journal_map_fd mapped mem (unmap releases it) */
};

/* Use memory someone else mapped (Python's mmap, through ffi.from_buffer). */
int udrv_journal_attach(struct udrv_journal *j, void *mem, uint64_t size, uint32_t nslots,
                        uint32_t slot_size);
/* Map the journal's memfd a second time (what the USB ring does: no Python buffer is held,
 * so Python may close its own mapping whenever it likes). */
int udrv_journal_map_fd(struct udrv_journal *j, int fd, uint32_t nslots, uint32_t slot_size);
void udrv_journal_unmap(struct udrv_journal *j);

uint64_t udrv_journal_head(const struct udrv_journal *j);
uint64_t udrv_journal_sent(const struct udrv_journal *j);
uint64_t udrv_journal_tail(const struct udrv_journal *j);
uint64_t udrv_journal_reissued(const struct udrv_journal *j);
uint64_t udrv_journal_duplicates(const struct udrv_journal *j);
uint64_t udrv_journal_space(const struct udrv_journal *j);

/* TxJournal.append: returns the frame's seq, or UDRV_JOURNAL_FULL / UDRV_JOURNAL_TOO_BIG. */
int64_t udrv_journal_append(struct udrv_journal *j, const uint8_t *frame, uint32_t len);
/* Zero-copy append in two steps (the ring reads the TAP straight into the slot):
 * reserve returns the payload area of the slot at head (capacity in *cap), or NULL when full;
 * commit writes the slot header and publishes head. Returns the seq. */
uint8_t *udrv_journal_reserve(struct udrv_journal *j, uint32_t *cap);
/* reserve, for a read from the TAP straight into the slot: the 6 bytes at `mark` in the
 * payload (where the frame's destination MAC will land, after any virtio-net header) are
 * zeroed and the header's `reading` word (u32 @12) set to the slot's seq + 1, so that a
 * process that maps the journal after this one died in the middle of the read can tell
 * whether the read took a frame from the TAP (TxJournal.unfinished_read). */
uint8_t *udrv_journal_reserve_read(struct udrv_journal *j, uint32_t *cap, uint32_t mark);
int64_t udrv_journal_commit(struct udrv_journal *j, uint32_t len);
/* The same for a payload of len bytes whose first vlen bytes are a virtio-net header (slot flag
 * SLOT_VNET; vlen 0 = plain commit). */
int64_t udrv_journal_commit_vnet(struct udrv_journal *j, uint32_t len, uint32_t vlen);
/* TxJournal.append(frame, vnet): the frame with its virtio-net header (vlen 1..255 bytes; 0 =
 * a plain append). Same results as udrv_journal_append. */
int64_t udrv_journal_append_vnet(struct udrv_journal *j, const uint8_t *vnet, uint32_t vlen,
                                 const uint8_t *frame, uint32_t len);

/* TxJournal.take_unsent: 1 = seq, frame and len set and `sent` advanced, 0 = nothing unsent,
 * UDRV_JOURNAL_CORRUPT = `sent` advanced but the slot holds another seq (as in Python).
 * The frame is given without its vnet header (if the slot has one). */
int udrv_journal_take_unsent(struct udrv_journal *j, uint64_t *seq, const uint8_t **frame,
                             uint32_t *len);
/* TxJournal.peek_unsent: the next unsent frame and its vnet header (*vlen 0: none) without
 * advancing `sent`. 1, 0 = nothing unsent, or UDRV_JOURNAL_CORRUPT. */
int udrv_journal_peek_unsent(const struct udrv_journal *j, uint64_t *seq, const uint8_t **vnet,
                             uint32_t *vlen, const uint8_t **frame, uint32_t *len);
/* TxJournal.mark_sent: seq must be the next unsent one. 0 or UDRV_JOURNAL_NEVER_SENT. */
int udrv_journal_mark_sent(struct udrv_journal *j, uint64_t seq);
/* TxJournal.confirm_through: frames newly confirmed, or UDRV_JOURNAL_NEVER_SENT. */
int64_t udrv_journal_confirm_through(struct udrv_journal *j, uint64_t seq);
/* TxJournal.rewind: frames to be re-issued (also added to reissued and duplicates). */
uint64_t udrv_journal_rewind(struct udrv_journal *j);

/* TxJournal.aqm_drop: CoDel (RFC 8289) on the time the next unsent entry waited since it was
 * journaled, judged once per entry by the datapath as it starts that entry, before handing
 * it to the device. 1 = drop it (the caller marks it sent and lets it be confirmed in order
 * with the next one, as any frame that cannot go on the wire), 0 = send it (with ECN on, an
 * ECN-capable IP frame that CoDel would drop is marked CE in place and sent instead).
 * Re-issued entries, the last unsent entry and a journal whose AQM is off are never dropped.
 * now_ns: CLOCK_MONOTONIC, as udrv_journal_now_ns(). */
int udrv_journal_aqm_drop(struct udrv_journal *j, uint64_t now_ns);
uint64_t udrv_journal_now_ns(void);
uint64_t udrv_journal_aqm_drops(const struct udrv_journal *j);
uint64_t udrv_journal_aqm_marks(const struct udrv_journal *j);
/* Set CE in an ECN-capable IPv4/IPv6 frame (after up to two VLAN tags; the IPv4 header
 * checksum kept right): 1 = marked (or CE already), 0 = not ECN-capable, -1 = not IP. */
int udrv_journal_mark_ce(uint8_t *frame, uint32_t len);

#endif

/* The USB transfer ring: the C twin of udrv.usbnet.UsbNetEngine.
 *
 * N bulk-IN and N bulk-OUT libusb transfers stay in flight and their completions are handled
 * here, without Python per frame:
 *   RX transfer done  -> decode per framing -> write() the frame to the TAP fd -> resubmit
 *                        (rx_coalesce: TCP segments completed in one event-handling pass go out
 *                        as one GSO super-frame, native/gro.h; their transfers are resubmitted
 *                        after that write, before the ring call returns)
 *   TAP fd readable   -> read frames straight into TX journal slots (while there is space;
 *                        native/tapread.h's rules: a virtio-net header that asks for a
 *                        checksum or TCP segmentation stays with its frame)
 *                     -> finish in software (native/gso.h: checksum, one 64 KiB TCP frame
 *                        cut into MTU-sized segments) -> encode -> submit bulk OUT, up to
 *                        n_tx in flight (one transfer per wire frame)
 *   OUT transfer done -> confirm the journal through its seq (the transfer of an entry's last
 *                        segment: an entry is confirmed only once all of it went out)
 *   interrupt packet  -> copied to a small queue that Python drains (driver.on_status)
 * Errors are counted per reason and queued for Python; the ring never recovers by itself
 * (beyond clearing an RX STALL, as UsbNetEngine does): Python's guard cancels, restores,
 * rewinds the journal and restarts.
 *
 * Threading: one caller at a time. With udrv_ring_set_tx_thread(r, 1), udrv_ring_run hands the
 * TAP -> journal -> OUT half to a thread of its own for as long as it runs (the thread is parked
 * before run returns, so every other call, and Python, sees one thread). Completions run
 * inside libusb event handling, i.e. inside udrv_ring_pump / udrv_ring_run /
 * udrv_ring_cancel_all_and_wait or inside any synchronous libusb call Python
 * makes on the same context (a control transfer). Callbacks only touch the ring and the TAP;
 * every journal change happens inside pump/xmit/cancel, so Python's cached journal indices are
 * stale only while one of those calls runs (TxJournal.sync() after each).
 */
#ifndef UDRV_USB_RING_H
#define UDRV_USB_RING_H

#include <stddef.h>
#include <stdint.h>

#include "framing.h"
#include "journal.h"

/* Transfer outcomes: index of udrv_ring_stats.tx_errors and value of udrv_ring_error.status. */
#define UDRV_XS_OK 0
#define UDRV_XS_STALL 1
#define UDRV_XS_TIMEOUT 2
#define UDRV_XS_ERROR 3
#define UDRV_XS_OVERFLOW 4
#define UDRV_XS_NO_DEVICE 5
#define UDRV_XS_CANCELLED 6
#define UDRV_XS_SUBMIT_FAILED 7
#define UDRV_XS_CLEAR_HALT_FAILED 8
#define UDRV_XS_JOURNAL_CORRUPT 9
#define UDRV_NXS 10

#define UDRV_DIR_RX 0
#define UDRV_DIR_TX 1
#define UDRV_DIR_STATUS 2

/* Flags returned by pump/xmit. */
#define UDRV_PUMP_RX 0x01           /* frames went to the TAP since the last pump */
#define UDRV_PUMP_TX_DONE 0x02      /* the device confirmed TX frames since the last pump */
#define UDRV_PUMP_STATUS 0x04       /* interrupt packets wait: udrv_ring_next_status */
#define UDRV_PUMP_ERROR 0x08        /* errors wait: udrv_ring_next_error; Python must recover */
#define UDRV_PUMP_NO_DEVICE 0x10    /* the device is gone */
#define UDRV_PUMP_TAP_IN 0x20       /* frames were read from the TAP into the journal */
#define UDRV_PUMP_JOURNAL_FULL 0x40 /* the journal is full: the TAP is not read (backpressure) */
#define UDRV_PUMP_WOKEN 0x80        /* run: wake_fd became readable */
#define UDRV_PUMP_DEFERRED 0x100    /* a TAP frame only Python finishes waits: udrv_ring_take_deferred */
#define UDRV_PUMP_TX_STALL 0x200    /* run: OUT transfers wait longer than the stall time (udrv_ring_set_tx_stall) */

#define UDRV_ERRQ 16
#define UDRV_STATQ 16
#define UDRV_STATUS_MAX 64
#define UDRV_RING_MAX_XFERS 256

struct udrv_ring_config {
    uint32_t ep_in;         /* bulk IN endpoint address (0x8N) */
    uint32_t ep_out;        /* bulk OUT endpoint address */
    uint32_t ep_status;     /* interrupt IN endpoint, 0 = none */
    uint32_t status_size;   /* bytes per interrupt transfer, <= UDRV_STATUS_MAX */
    uint32_t n_rx;          /* bulk-IN transfers kept in flight */
    uint32_t n_tx;          /* at most this many bulk-OUT transfers in flight */
    uint32_t zero_packet;   /* 1: the HCD ends an OUT transfer that fills whole packets with a ZLP */
    uint32_t tx_max_frame;  /* TAP frames longer than this are dropped (MTU + 18); 0 = slot size */
    int32_t tap_fd;         /* set non-blocking by udrv_ring_new */
    int32_t journal_fd;     /* the TX journal's memfd; the ring maps it itself */
    uint32_t journal_nslots;
    uint32_t journal_slot_size;
    uint32_t tap_vnet_hdr;  /* bytes of virtio-net header on every TAP read and write (0 = none):
                               a read one that asks for TX offload work stays in the journal and
                               the ring does the work (native/gso.h), others are dropped;
                               written ones are zeroed or describe a coalesced super-frame */
    uint32_t rx_coalesce;   /* merge RX TCP segments into GSO super-frames (native/gro.h; needs
                               tap_vnet_hdr >= 10); cleared if the TAP refuses one */
    uint32_t tx_wire_max;   /* longest wire frame the ring may send (the driver's max MTU + 18):
                               sizes the OUT buffers; 0 = a journal slot */
};

struct udrv_ring_stats {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t rx_dropped[24];  /* by UDRV_DROP_* verdict */
    uint64_t tx_errors[10];   /* by UDRV_XS_* outcome */
    uint64_t status_packets;
    uint64_t status_overflow; /* interrupt packets lost because the queue was not drained */
    uint64_t tap_frames_in;   /* frames read from the TAP (including oversize ones) */
    uint64_t tap_oversize;    /* ... of which dropped as longer than tx_max_frame / a slot */
    uint64_t tap_read_errors;
    uint64_t tap_write_errors;
    uint64_t errors_lost;     /* error-queue overflow */
    uint64_t pumps;           /* datapath turns */
    uint64_t waits;           /* turns that slept in poll() for lack of work ... */
    uint64_t wait_timeouts;   /* ... and woke only because the timeout passed */
    /* RX coalescing (gro.h): segments inside super-frames, super-frames, frames left alone
     * for a wrong checksum, super-frames the TAP refused */
    uint64_t rx_coalesced, rx_super, rx_csum_bad, rx_super_refused, rx_acks_merged;
    /* TX offloads (tapread.h, gso.h): TAP frames that asked for checksum/TSO work, frames whose
     * request was malformed (dropped), frames shorter than their vnet header (dropped), frames
     * handed to Python (udrv_ring_take_deferred), wire frames cut from TCP GSO frames */
    uint64_t tap_offload_frames, tap_bad_offload, tap_short_vnet, tap_deferred, tx_segments;
    /* the TX hang clock, CLOCK_MONOTONIC ms: the last OUT transfer that completed OK, and since
     * when the OUT transfers in flight have waited (the later of that completion and the moment
     * the OUT side went from idle to busy or was started again); tx_waiting 0 = none in flight */
    uint64_t tx_done_ms, tx_waiting_since_ms;
    uint32_t tx_waiting;
    uint32_t rx_inflight;
    uint32_t tx_inflight;
    uint32_t status_inflight;
    uint32_t running;
    uint32_t rx_coalesce;     /* the switch as it is now */
};

struct udrv_ring_error {
    uint32_t dir;      /* UDRV_DIR_* */
    uint32_t status;   /* UDRV_XS_* */
    uint32_t endpoint;
    int32_t code;      /* libusb error code for submit/clear-halt failures, else 0 */
    uint64_t seq;      /* TX: journal seq of the transfer */
};

struct udrv_pump_result {
    uint32_t flags;
    uint32_t completions;  /* transfer completions handled since the last pump */
    uint32_t tap_in;       /* frames moved from the TAP into the journal */
    uint32_t tx_submitted; /* bulk-OUT transfers submitted */
};

struct udrv_ring;

/* ctx/handle: the libusb_context * and libusb_device_handle * that python-libusb1 opened (same
 * libusb in the process). Returns NULL with a message in err on bad arguments. */
struct udrv_ring *udrv_ring_new(void *ctx, void *handle, const struct udrv_ring_config *cfg,
                                const struct udrv_framing *f, char *err, size_t errlen);
/* Change the framing (a driver may pick a variant at probe). Only while nothing is in flight:
 * returns -1 otherwise. */
int udrv_ring_set_framing(struct udrv_ring *r, const struct udrv_framing *f);
void udrv_ring_set_tx_max_frame(struct udrv_ring *r, uint32_t n);
/* Submit the RX (and interrupt) transfers. 0, or a libusb error code. */
int udrv_ring_start(struct udrv_ring *r);
/* One turn: TAP -> journal -> OUT, wait up to timeout_ms for USB or TAP events, handle
 * completions, TAP -> journal -> OUT again. Returns UDRV_PUMP_* flags or a libusb error code.
 * tap_budget caps the frames read from the TAP (0 = Python feeds the journal itself). */
int udrv_ring_pump(struct udrv_ring *r, int timeout_ms, int tap_budget, struct udrv_pump_result *out);
/* Pump turns in a C loop until timeout_ms passed, Python is needed (STATUS, ERROR, NO_DEVICE)
 * or wake_fd (-1 = none; e.g. the daemon's control socket) became readable. Flags and counts
 * of all turns are summed into out. */
int udrv_ring_run(struct udrv_ring *r, int timeout_ms, int tap_budget, int wake_fd,
                  struct udrv_pump_result *out);
/* 1: udrv_ring_run moves TAP -> journal -> OUT on a thread of its own (parked whenever run
 * is not running), to use a second CPU; 0 (default): one thread does everything. */
void udrv_ring_set_tx_thread(struct udrv_ring *r, int on);
/* udrv_ring_run stores CLOCK_MONOTONIC ns into *beat (a supervisor's heartbeat word; NULL =
 * none) at every turn, and waits at most period_ms per turn so an idle loop still beats. */
void udrv_ring_set_beat(struct udrv_ring *r, int64_t *beat, int period_ms);
/* udrv_ring_run returns (UDRV_PUMP_TX_STALL) once OUT transfers have waited ms with none completing:
 * Python's TX hang detector then needs no turns of its own to watch the clock. 0 = off. */
void udrv_ring_set_tx_stall(struct udrv_ring *r, uint32_t ms);
/* The OUT transfers in flight have waited since now (Python found them waiting for a carrier,
 * which is no stall). */
void udrv_ring_restart_tx_clock(struct udrv_ring *r);
/* Only TAP -> journal -> OUT (no event handling). Returns UDRV_PUMP_* level flags. */
int udrv_ring_xmit(struct udrv_ring *r, int tap_budget, struct udrv_pump_result *out);
/* Stop: cancel every transfer and handle events until all completed or timeout_ms passed.
 * Returns the transfers still in flight (0 = none leaked). */
int udrv_ring_cancel_all_and_wait(struct udrv_ring *r, int timeout_ms);
/* Recycle the OUT side only, the ring running: cancel the OUT transfers in flight and handle
 * events until they are back (IN completions meanwhile are delivered and resubmitted as
 * always), confirm what made it (never past an entry that came back cancelled), forget the
 * entry cut in part, unblock TX; with clear_halt, CLEAR_FEATURE(HALT) on the OUT endpoint
 * (nothing is queued on it by then); IN transfers lost on the way are queued again. The IN
 * transfers are not cancelled: each cancel is a usb_kill_urb that waits for the host
 * controller (~0.2 ms apiece on dummy_hcd), and an IN side that fails heals in the ring itself
 * (a STALL: its halt cleared once the transfers are back, then resubmitted; an error:
 * resubmitted). Clears the error queue on entry (the errors this recovery deals with). Python
 * rewinds the journal after. Returns 0; the OUT transfers still in flight (> 0); or -1 when
 * something new went wrong meanwhile: the caller falls back to cancel_all_and_wait + start. */
int udrv_ring_recycle_tx(struct udrv_ring *r, int timeout_ms, int clear_halt);
void udrv_ring_stats(const struct udrv_ring *r, struct udrv_ring_stats *out);
/* 1: running, the device present, no error queued, TX not blocked, every IN transfer queued (or
 * held by the coalescer) and the interrupt transfer too: the transfers in flight can be kept
 * across a recovery from a fault outside the ring. 0: recycle them (cancel_all_and_wait). */
int udrv_ring_healthy(const struct udrv_ring *r);
/* Pop the oldest queued error: 1 = *out set, 0 = queue empty. */
int udrv_ring_next_error(struct udrv_ring *r, struct udrv_ring_error *out);
/* The TAP frame (with its virtio-net header) the ring could not finish itself (a GSO kind
 * native/gso.h does not do): copied into buf, its length returned, and the ring reads the TAP
 * again; -1 = none waits, -2 = buf too small. Python journals it (Nic.enqueue). */
int udrv_ring_take_deferred(struct udrv_ring *r, uint8_t *buf, uint32_t cap);
/* Pop the oldest interrupt packet into buf: its length, or -1 = queue empty. */
int udrv_ring_next_status(struct udrv_ring *r, uint8_t *buf, uint32_t cap);
/* Free the ring. Returns -1 (and frees nothing) while transfers are in flight: libusb still
 * owns their buffers, so freeing them would be a use-after-free; cancel first. */
int udrv_ring_free(struct udrv_ring *r);

/* Address of libusb_handle_events_timeout_completed as this module sees it: Python compares it
 * with python-libusb1's to make sure both use the same libusb (context pointers are shared). */
uintptr_t udrv_libusb_marker(void);
const char *udrv_usb_error_name(int code);

#endif

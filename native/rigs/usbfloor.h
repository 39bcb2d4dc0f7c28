/* The usbfs floor: what any userspace USB NIC driver pays per frame on this machine, with
 * nothing else in the way. Bulk OUT transfers of one frame each, `n_inflight` kept queued,
 * each resubmitted from its completion, for `seconds`; no TAP, no journal, no framing. The
 * per-frame CPU it reports (this thread's user + system time over the frames done) is the part
 * of a driver's cost that submit + reap through usbfs alone cost (benchmarks only). `control`
 * (or -1) is claimed first, as a driver of the whole function would: for CDC the kernel's
 * driver is bound there and comes back when it is released. */
#ifndef UDRV_USBFLOOR_H
#define UDRV_USBFLOOR_H

#include <stdint.h>

struct udrv_usb_floor {
    uint64_t frames;        /* OUT transfers completed */
    uint64_t errors;        /* completions with a status other than success */
    double seconds;         /* wall time of the run */
    double cpu_user;        /* this thread's CPU seconds during the run */
    double cpu_sys;
    int32_t code;           /* libusb error code when set-up failed (0 = ran) */
    char what[96];          /* which step failed */
};

int udrv_usb_floor_run(uint16_t vid, uint16_t pid, int control, int interface, int alt, uint8_t ep_out,
                       const uint8_t *frame, uint32_t frame_len, uint32_t n_inflight, double seconds,
                       struct udrv_usb_floor *out);

#endif

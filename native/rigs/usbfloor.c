/* The usbfs floor (see usbfloor.h). */
#define _GNU_SOURCE   /* RUSAGE_THREAD */
#include "usbfloor.h"

#include <libusb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

struct floor_run {
    struct udrv_usb_floor *out;
    int stopping;
    uint32_t in_flight;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void thread_cpu(double *user, double *sys)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void LIBUSB_CALL floor_done(struct libusb_transfer *t)
{
    struct floor_run *run = t->user_data;
    if (t->status == LIBUSB_TRANSFER_COMPLETED)
        run->out->frames++;
    else if (!(run->stopping && t->status == LIBUSB_TRANSFER_CANCELLED))
        run->out->errors++;          /* the cancels that end the run are no device errors */
    /* resubmitted at once, as a ring with frames waiting would */
    if (!run->stopping && t->status != LIBUSB_TRANSFER_NO_DEVICE && libusb_submit_transfer(t) == 0)
        return;
    run->in_flight--;
}

static int fail(struct udrv_usb_floor *out, int code, const char *what)
{
    out->code = code ? code : -99;
    snprintf(out->what, sizeof out->what, "%s: %s", what, code ? libusb_strerror(code) : "failed");
    return -1;
}

int udrv_usb_floor_run(uint16_t vid, uint16_t pid, int control, int interface, int alt, uint8_t ep_out,
                       const uint8_t *frame, uint32_t frame_len, uint32_t n_inflight, double seconds,
                       struct udrv_usb_floor *out)
{
    memset(out, 0, sizeof *out);
    libusb_context *ctx = NULL;
    int rc = libusb_init(&ctx);
    if (rc < 0)
        return fail(out, rc, "libusb_init");
    libusb_device_handle *h = libusb_open_device_with_vid_pid(ctx, vid, pid);
    if (!h) {
        libusb_exit(ctx);
        return fail(out, 0, "opening the device (absent, or no permission on /dev/bus/usb)");
    }
    libusb_set_auto_detach_kernel_driver(h, 1);
    struct libusb_transfer **ts = calloc(n_inflight, sizeof *ts);
    uint8_t *mapped = calloc(n_inflight, 1);     /* buffer i is usbfs memory, else malloc'd */
    struct floor_run run = {.out = out};
    int ret = -1;
    if (control >= 0 && (rc = libusb_claim_interface(h, control)) < 0) {
        fail(out, rc, "claiming the control interface");
        goto close;
    }
    if ((rc = libusb_claim_interface(h, interface)) < 0) {
        fail(out, rc, "claiming the data interface");
        goto release_control;
    }
    if ((rc = libusb_set_interface_alt_setting(h, interface, alt)) < 0) {
        fail(out, rc, "selecting the data interface's alternate setting");
        goto release;
    }
    for (uint32_t i = 0; i < n_inflight; i++) {
        /* usbfs-mapped memory, as the ring uses: no copy of the frame per submission */
        uint8_t *buf = libusb_dev_mem_alloc(h, frame_len);
        mapped[i] = buf != NULL;
        if (!buf)
            buf = malloc(frame_len);
        memcpy(buf, frame, frame_len);
        ts[i] = libusb_alloc_transfer(0);
        libusb_fill_bulk_transfer(ts[i], h, ep_out, buf, (int)frame_len, floor_done, &run, 0);
    }
    double u0, s0, u1, s1, t0 = now_s();
    thread_cpu(&u0, &s0);
    for (uint32_t i = 0; i < n_inflight; i++)
        if (libusb_submit_transfer(ts[i]) == 0)
            run.in_flight++;
    while (run.in_flight && now_s() - t0 < seconds) {
        struct timeval tv = {0, 100000};
        libusb_handle_events_timeout_completed(ctx, &tv, NULL);
    }
    out->seconds = now_s() - t0;
    thread_cpu(&u1, &s1);
    out->cpu_user = u1 - u0;
    out->cpu_sys = s1 - s0;
    run.stopping = 1;
    for (uint32_t i = 0; i < n_inflight; i++)
        libusb_cancel_transfer(ts[i]);
    double deadline = now_s() + 2.0;
    while (run.in_flight && now_s() < deadline) {
        struct timeval tv = {0, 100000};
        libusb_handle_events_timeout_completed(ctx, &tv, NULL);
    }
    ret = 0;
    if (!run.in_flight)      /* buffers of transfers that never came back stay allocated */
        for (uint32_t i = 0; i < n_inflight; i++) {
            if (mapped[i])
                libusb_dev_mem_free(h, ts[i]->buffer, frame_len);
            else
                free(ts[i]->buffer);
            libusb_free_transfer(ts[i]);
        }
release:
    libusb_release_interface(h, interface);     /* data first: the kernel's driver binds to control */
release_control:
    if (control >= 0)
        libusb_release_interface(h, control);
close:
    free(ts);
    free(mapped);
    libusb_close(h);
    libusb_exit(ctx);
    return ret;
}

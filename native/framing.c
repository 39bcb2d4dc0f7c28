/* Framing: encode_tx / decode_rx exactly as udrv/framing.py does them (same checks, same order). */
#include "framing.h"

#include <string.h>
#include <time.h>

int udrv_framing_check(const struct udrv_framing *f)
{
    if (f->shape > UDRV_SHAPE_RAW || f->n_error_bits > UDRV_MAX_ERROR_BITS)
        return -1;
    return 0;
}

uint32_t udrv_tx_encoded_max(const struct udrv_framing *f, uint32_t len)
{
    return len + (f->shape == UDRV_SHAPE_RAW ? 0 : 2) + (f->pad_rule ? 1 : 0);
}

int64_t udrv_encode_tx(const struct udrv_framing *f, const uint8_t *frame, uint32_t len,
                       uint8_t *out, uint32_t cap)
{
    uint32_t hdr = f->shape == UDRV_SHAPE_RAW ? 0 : 2;
    if (hdr && len > 0xFFFF)
        return -1; /* Python's bytes((n & 0xFF, n >> 8)) refuses this too */
    if ((uint64_t)len + hdr > cap)
        return -1;
    if (hdr) {
        out[0] = (uint8_t)(len & 0xFF);
        out[1] = (uint8_t)(len >> 8);
    }
    memcpy(out + hdr, frame, len);
    uint32_t n = len + hdr;
    /* The device would wait for a zero-length packet after an exact multiple of its packet
     * size; one more byte makes the transfer end with a short packet instead. */
    if (f->pad_rule && n % f->pad_rule == 0) {
        if (n + 1 > cap)
            return -1;
        out[n++] = 0;
    }
    return n;
}

int udrv_decode_rx(const struct udrv_framing *f, const uint8_t *buf, uint32_t n, uint32_t *start,
                   uint32_t *len)
{
    uint32_t length, avail, first;
    uint8_t status;

    if (f->shape == UDRV_SHAPE_RAW) {
        if (n == 0)
            return UDRV_DROP_ZERO_LENGTH;
        if (n < UDRV_ETH_MIN)
            return UDRV_DROP_RUNT;
        if (n > f->max_frame)
            return UDRV_DROP_OVERSIZE;
        *start = 0;
        *len = n;
        return UDRV_RX_OK;
    }
    if (f->shape == UDRV_SHAPE_HEADER2) {
        if (n < 2)
            return UDRV_DROP_TRUNCATED;
        length = (buf[0] | (buf[1] << 8)) & 0x0FFF;
        first = 2;
        avail = n - 2;
        status = 0; /* no status byte: the error bits never match */
    } else {
        if (n < 4)
            return UDRV_DROP_TRUNCATED;
        uint32_t declared = (buf[n - 4] | (buf[n - 3] << 8)) & 0x0FFF;
        status = buf[n - 2];
        if (declared == 0)
            return UDRV_DROP_ZERO_LENGTH;
        if (declared < 4)
            return UDRV_DROP_RUNT;
        length = declared - 4; /* the count includes the CRC the chip stripped */
        first = 0;
        avail = n - 4;
    }
    for (uint32_t i = 0; i < f->n_error_bits; i++)
        if (status & f->error_bits[i])
            return UDRV_DROP_ERRBIT0 + (int)i;
    if (length == 0)
        return UDRV_DROP_ZERO_LENGTH;
    if (length > f->max_frame)
        return UDRV_DROP_OVERSIZE;
    if (length > avail)
        return UDRV_DROP_LENGTH_BEYOND_TRANSFER;
    if (length < UDRV_ETH_MIN)
        return UDRV_DROP_RUNT;
    *start = first;
    *len = length;
    return UDRV_RX_OK;
}

uint64_t udrv_framing_bench(const struct udrv_framing *f, const uint8_t *frame, uint32_t len,
                            uint8_t *rx, uint32_t rx_len, uint64_t iters)
{
    uint8_t out[65536 + 3];
    struct timespec t0, t1;
    uint64_t sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t i = 0; i < iters; i++) {
        uint32_t start = 0, flen = 0;
        sink += (uint64_t)udrv_encode_tx(f, frame, len, out, sizeof out);
        sink += (uint64_t)udrv_decode_rx(f, rx, rx_len, &start, &flen) + flen;
        /* keep the compiler from hoisting the calls out of the loop */
        __asm__ volatile("" : : "r"(sink), "r"(out) : "memory");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
}

/* The Internet checksum in C, shared by RX coalescing (gro.c) and software TX offloads (gso.c). */
#ifndef UDRV_CSUM_H
#define UDRV_CSUM_H

#include <stdint.h>
#include <string.h>

/* RFC 1071 sum of p[0..len) as big-endian words plus `seed`, folded, not complemented. Summed
 * as native 64-bit words with the carries kept in a 128-bit accumulator (the ones' complement
 * sum commutes with byte order: one swap at the end): 2 instructions per 8 bytes, which is
 * what makes checking every TCP segment cheap, the more so under an emulated CPU. */
static inline uint32_t udrv_csum16(const uint8_t *p, uint32_t len, uint32_t seed)
{
    unsigned __int128 a = 0;
    for (; len >= 32; p += 32, len -= 32) {
        uint64_t w[4];
        memcpy(w, p, 32);
        a += w[0];
        a += w[1];
        a += w[2];
        a += w[3];
    }
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        a += w;
    }
    uint64_t lo = (uint64_t)a, hi = (uint64_t)(a >> 64);
    uint64_t s = lo + hi;
    s += s < lo;                        /* end-around carry */
    s = (s & 0xFFFFFFFF) + (s >> 32);   /* < 2^33 */
    if (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        s += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        s += w;
        p += 2;
        len -= 2;
    }
    if (len)
        s += *p;                        /* the high byte of a big-endian word, swapped */
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    s = ((s & 0xFF) << 8 | s >> 8) + seed;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}

#endif

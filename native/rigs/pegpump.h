/* The Pegasus device's bulk data path in C, for serving the pegasus model (udrv/models/pegasus.py)
 * as a real USB device through FunctionFS (udrv/testbed/pegasus_pump.py wraps it).
 *
 * A thread of its own (no GIL) owns the bulk endpoint files and the wire TAP:
 *   * EP 0x02 (OUT, host TX): `out_depth` AIO reads stay queued; each completed transfer is
 *     [len lo, len hi] frame [pad]; it is judged by the model's rules (_parse_tx / _transmit)
 *     and the frame written to the TAP, in the order the host sent them;
 *   * EP 0x81 (IN, host RX): frames read from the TAP pass the model's receive filter
 *     (_receive: RX enable, size, promisc / own MAC / broadcast / allmulti / multicast hash)
 *     and become [ADM8513 header] frame [CRC] [4-byte trailer: len+4, status, 0] transfers,
 *     `in_depth` of them queued; a transfer that is a multiple of the packet size gets a ZLP.
 *     Transfers Python injects (the model's own RX queue: injected garbage, loopback) go first.
 * The register state stays with the Python model; Python copies what the pump needs into a
 * `udrv_pegpump_config` whenever it may have changed. Anything the C path does not model
 * (link down, loopback, a halted or NAKing TX endpoint, unplugged) sets `tx_slow`: OUT
 * transfers are then queued for Python untouched (udrv_pegpump_deferred_*), and `py_efd`
 * becomes readable. `in_hold` stops IN submissions so Python can halt the endpoint once
 * nothing is queued.
 * When the IN queue is full the pump stops reading the TAP: the wire's queue holds (or drops)
 * the frames, where the model would count rx_lost.
 */
#ifndef UDRV_PEGPUMP_H
#define UDRV_PEGPUMP_H

#include <pthread.h>
#include <stdint.h>

#define UDRV_PEGPUMP_DEPTH_MAX 64     /* AIO requests per endpoint, at most */
#define UDRV_PEGPUMP_BUF 4096         /* one transfer buffer: a multiple of every max packet size */
#define UDRV_PEGPUMP_DEFER_SLOTS 64   /* OUT transfers waiting for Python */
#define UDRV_PEGPUMP_INJECT_SLOTS 64  /* IN transfers Python queued */

struct udrv_pegpump_config {
    uint32_t enabled;           /* the function is enabled (FunctionFS ENABLE): submit I/O */
    uint32_t tx_slow;           /* hand OUT transfers to Python instead of judging them here */
    uint32_t in_hold;           /* submit no IN transfers */
    uint32_t link_up, link_100, link_full, unplugged;
    uint32_t status_mcast_bit;  /* model option: RX status bit 0 for multicast destinations */
    uint32_t multicast_hash;    /* model option: the 64-bit hash filter is implemented */
    uint32_t adm8513;           /* model option: 2-byte length header in front of RX frames */
    uint32_t max_packet;        /* EP 0x81 max packet size at the connected speed (ZLP rule) */
    uint8_t ctl0, ctl1, ctl2;   /* EthCtrl0..2 */
    uint8_t mac[6];             /* EthID */
    uint8_t hash[8];            /* MulticastHash */
};

struct udrv_pegpump_stats {
    /* the model's counters (same names as PegasusCounters) */
    uint64_t tx_transfers, tx_frames, tx_bytes, tx_malformed, tx_extra_bytes, tx_missing_pad;
    uint64_t tx_dropped_disabled, tx_mode_mismatch;
    uint64_t rx_frames, rx_bytes, rx_transfers, rx_dropped_filter, rx_dropped_disabled;
    uint64_t rx_dropped_link, rx_dropped_size, rx_dropped_unplugged;
    /* the gadget's (FfsCounters) */
    uint64_t out_transfers, out_bytes, in_transfers, in_bytes, zlps, in_lost;
    uint64_t out_errors, in_errors, submit_errors;
    int32_t last_out_error, last_in_error;   /* errno of the last failed transfer */
    /* the wire's (PeerWire) */
    uint64_t wire_in, wire_out, wire_read_errors, wire_write_errors;
    /* handovers */
    uint64_t deferred_out, injected_in;
};

struct udrv_pegpump_io;   /* AIO slots, private */

struct udrv_pegpump {
    int ep_in, ep_out, tap_fd;
    int ctl_efd;              /* Python -> pump: config changed, injected data, stop */
    int py_efd;               /* pump -> Python: deferred OUT transfers are waiting */
    uint32_t in_depth, out_depth;
    int nice;
    volatile uint32_t stop;
    struct udrv_pegpump_stats st;
    uint32_t in_flight_in, in_flight_out;   /* written by the pump only */
    volatile uint32_t cfg_applied;          /* the configuration generation the pump works with */
    pthread_t thread;
    int started;
    pthread_mutex_t lock;     /* config, deferred and inject queues */
    struct udrv_pegpump_config cfg_shared;
    uint32_t cfg_gen;
    struct udrv_pegpump_io *io;
};

/* Allocate (fds are not owned: the caller closes them after udrv_pegpump_free). The TAP fd is
 * made non-blocking. NULL with errno on failure. */
struct udrv_pegpump *udrv_pegpump_new(int ep_in, int ep_out, int tap_fd, uint32_t in_depth,
                                      uint32_t out_depth, int nice);
int udrv_pegpump_start(struct udrv_pegpump *p);
/* Copy a new configuration and wake the pump; returns its generation (cfg_applied reaches it
 * once the pump works with it). */
uint32_t udrv_pegpump_configure(struct udrv_pegpump *p, const struct udrv_pegpump_config *cfg);
/* Queue one IN transfer (sent before TAP frames). 0, or -1 when full / too long. */
int udrv_pegpump_inject(struct udrv_pegpump *p, const uint8_t *data, uint32_t len);
/* The oldest OUT transfer waiting for Python: its length (buf set), or -1 when none. */
int64_t udrv_pegpump_deferred_peek(struct udrv_pegpump *p, uint8_t **buf);
void udrv_pegpump_deferred_pop(struct udrv_pegpump *p);
/* Stop the thread, cancel what is queued (io_destroy waits for it), free. */
void udrv_pegpump_free(struct udrv_pegpump *p);

#endif

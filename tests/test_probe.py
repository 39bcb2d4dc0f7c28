"""The 1 ms gap probe (udrv.probe) counts each probe once: a second answer to the same probe
(a frame re-issued after a recovery that the device had already sent) is a duplicate, not a
reply that hides a loss."""
from __future__ import annotations

import socket
import threading
import time

from udrv.probe import GapProbe


def test_probe_counts_a_second_answer_as_a_duplicate_not_as_a_reply():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()
    answered = [0]

    def echo_twice_every_third() -> None:
        while not stop.is_set():
            try:
                data, addr = srv.recvfrom(64)
            except socket.timeout:
                continue
            srv.sendto(data, addr)
            answered[0] += 1
            if answered[0] % 3 == 0:
                srv.sendto(data, addr)          # the same probe answered again

    t = threading.Thread(target=echo_twice_every_third, daemon=True)
    t.start()
    probe = GapProbe("127.0.0.1", srv.getsockname()[1], interval=0.002).start()
    time.sleep(0.5)
    res = probe.stop()
    stop.set()
    t.join()
    srv.close()
    assert res.sent > 50
    assert res.received <= res.sent                       # never more answers than probes
    assert res.received >= answered[0] - 2                # every probe the echo saw (bar the last in flight)
    assert res.duplicates >= answered[0] // 3 - 2 and res.duplicates > 10
    assert len(probe.times) == res.received

"""Helpers of the tests that run `udrv run` against a peer namespace: UDP echoes across the
NIC, and waiting for a condition with a deadline."""
import socket
import time


def echo_ok(peer: str, n: int = 20, timeout: float = 2.0) -> int:
    """UDP datagrams to the echo server at peer:7777 that came back (at most n, within timeout)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    got = 0
    end = time.monotonic() + timeout
    for i in range(n):
        s.sendto(b"ping%d" % i, (peer, 7777))
        try:
            if s.recv(64).startswith(b"ping"):
                got += 1
        except socket.timeout:
            pass
        if time.monotonic() > end:
            break
    s.close()
    return got


def wait_for(pred, timeout: float = 10.0, what: str = "condition", period: float = 0.1) -> None:
    """Until pred() is true (exceptions count as not yet); AssertionError naming `what` after timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(period)
    raise AssertionError(f"timed out waiting for {what}")

"""A UDP echo server for the peer namespace (the demo's and benches' liveness probe)."""
from __future__ import annotations

import argparse
import socket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7777)
    a = ap.parse_args()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", a.port))
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)


if __name__ == "__main__":
    main()

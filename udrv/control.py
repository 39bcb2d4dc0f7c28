"""The control socket's address and its client side (`udrv status`, `udrv inject`, ...).

The daemon (`--in-process`) or the supervisor listens on RUN_DIR/IFNAME.sock; a request is
one JSON object and a newline, the answer likewise.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any

from .errors import UdrvError

def run_dir() -> str:
    """Where control sockets live: UDRV_RUN_DIR (read at each call: tests and benches set it
    for the daemons they start), else /run/udrv."""
    return os.environ.get("UDRV_RUN_DIR", "/run/udrv")


def control_path(ifname: str) -> str:
    return os.path.join(run_dir(), f"{ifname}.sock")


def listen(ifname: str) -> socket.socket:
    """The control socket for IFNAME (non-blocking; a stale one from a crashed run is replaced),
    for the group to use as well as root."""
    os.makedirs(run_dir(), exist_ok=True)
    path = control_path(ifname)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    s.bind(path)
    os.chmod(path, 0o660)
    s.listen(8)
    return s


def unlisten(ifname: str, s: socket.socket) -> None:
    s.close()
    try:
        os.unlink(control_path(ifname))
    except FileNotFoundError:
        pass


def request(ifname: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side of the control socket (used by `udrv status` / `udrv inject`)."""
    path = control_path(ifname)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise UdrvError(f"no udrv daemon is running for {ifname} (no socket at {path}): "
                        "start one with `udrv run`") from None
    except PermissionError:
        raise UdrvError(f"cannot talk to {path}: run as root or as a member of the socket's group") from None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)

"""Messages between the supervisor and its children (workers, the device process).

One SOCK_SEQPACKET socketpair per child: every message is one JSON object (never pickle: the
supervisor reads what an untrusted worker writes), with file descriptors beside it over
SCM_RIGHTS. Opaque driver state (a checkpoint) travels base64-encoded inside a message and
is only ever decoded by a worker.
"""
from __future__ import annotations

import array
import json
import os
import select
import socket
import time
from typing import Any, Sequence

from .errors import UdrvError

MAX_MESSAGE = 1 << 20
MAX_FDS = 8


class ChannelClosed(UdrvError):
    """The process at the other end is gone."""


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.set_inheritable(False)
    return a, b


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._pending: list[tuple[dict[str, Any], list[int]]] = []
        self._id = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        try:
            if fds:
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                self.sock.send(data)
        except OSError as e:
            raise ChannelClosed(f"the other process is gone ({e.strerror})") from None

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and the fds that came with it; raises ChannelClosed at EOF and
        TimeoutError after `timeout` seconds."""
        if self._pending:
            return self._pending.pop(0)
        return self._recv(timeout)

    def _recv(self, timeout: float | None) -> tuple[dict[str, Any], list[int]]:
        if timeout is not None:
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                raise TimeoutError("no message in time")
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except OSError as e:
            raise ChannelClosed(f"the other process is gone ({e.strerror})") from None
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("the other process closed its end")
        try:
            msg = json.loads(data)
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise UdrvError("a malformed message arrived on a supervisor channel") from None
        if not isinstance(msg, dict):
            raise UdrvError("a message on a supervisor channel is not an object")
        return msg, list(fds)

    def has_pending(self) -> bool:
        """Messages that arrived during a call() and wait for recv()/poll() (the fd does not show them)."""
        return bool(self._pending)

    def poll(self) -> list[tuple[dict[str, Any], list[int]]]:
        """Every message waiting now (non-blocking)."""
        out, self._pending = self._pending, []
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return out
            out.append(self._recv(0))

    def call(self, msg: dict[str, Any], timeout: float, fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """Send a request and wait for the reply with the same id; other messages that arrive
        meanwhile are kept for recv()/poll()."""
        self._id += 1
        rid = self._id
        self.send({**msg, "id": rid}, fds)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {msg.get('t')!r} in {timeout:g} s")
            m, got = self._recv(left)
            if m.get("t") == "reply" and m.get("id") == rid:
                return m, got
            self._pending.append((m, got))

    def close(self) -> None:
        self.sock.close()

"""Linux native AIO (io_setup / io_submit / io_getevents) through ctypes, for FunctionFS.

Why: a synchronous read()/write() on a FunctionFS endpoint file holds that endpoint for the
whole transfer, so the device side has at most one request queued and falls a request behind
the host after every transfer. With AIO several requests wait in the UDC's queue; completions
are signalled on an eventfd (IOCB_FLAG_RESFD) that a poll() loop watches, so one thread serves
every endpoint without handing frames between Python threads.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from typing import Any

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_FLAG_RESFD = 1

# (io_setup, io_destroy, io_getevents, io_submit)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}


class _IoCb(ctypes.Structure):            # struct iocb, little-endian layout (64 bytes)
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16),
                ("aio_fildes", ctypes.c_uint32), ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32),
                ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):         # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class _Op:
    tag: Any
    iocb: _IoCb
    buf: Any                  # ctypes buffer, alive until the kernel is done with it
    read: bool
    size: int


@dataclass
class Completion:
    tag: Any
    result: int               # bytes transferred, or -errno
    data: bytes | None        # for reads that succeeded


class AioContext:
    def __init__(self, max_events: int = 256):
        nums = _SYSCALLS.get(platform.machine())
        if nums is None:
            raise OSError(errno.ENOSYS, f"no AIO syscall numbers for {platform.machine()}: add them to "
                                        "udrv.testbed.aio._SYSCALLS")
        self._setup, self._destroy, self._getevents, self._submit = nums
        self.max_events = max_events
        self._ctx = ctypes.c_ulong(0)
        if _libc.syscall(ctypes.c_long(self._setup), ctypes.c_uint(max_events), ctypes.byref(self._ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup failed: {os.strerror(e)} (raise /proc/sys/fs/aio-max-nr?)")
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ops: dict[int, _Op] = {}
        self._next = 1
        self._events = (_IoEvent * 64)()

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    def _submit_op(self, fd: int, read: bool, buf: Any, size: int, tag: Any) -> None:
        key = self._next
        self._next += 1
        cb = _IoCb()
        cb.aio_data = key
        cb.aio_lio_opcode = IOCB_CMD_PREAD if read else IOCB_CMD_PWRITE
        cb.aio_fildes = fd
        cb.aio_buf = ctypes.addressof(buf)
        cb.aio_nbytes = size
        cb.aio_flags = IOCB_FLAG_RESFD
        cb.aio_resfd = self.efd
        ptr = ctypes.pointer(cb)
        n = _libc.syscall(ctypes.c_long(self._submit), self._ctx, ctypes.c_long(1), ctypes.byref(ptr))
        if n != 1:
            e = ctypes.get_errno() if n < 0 else errno.EAGAIN
            if e == errno.EAGAIN:
                raise BlockingIOError(e, "endpoint not enabled yet")
            raise OSError(e, f"io_submit failed: {os.strerror(e)}")
        self._ops[key] = _Op(tag, cb, buf, read, size)

    def read(self, fd: int, size: int, tag: Any) -> None:
        self._submit_op(fd, True, ctypes.create_string_buffer(size), size, tag)

    def write(self, fd: int, data: bytes, tag: Any) -> None:
        # a zero-length write is a zero-length packet; the buffer still has to be a valid address
        self._submit_op(fd, False, ctypes.create_string_buffer(bytes(data), max(1, len(data))), len(data), tag)

    def reap(self) -> list[Completion]:
        """Completions available now (never blocks); call when efd is readable."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        out: list[Completion] = []
        zero = _Timespec(0, 0)
        while self._ops:
            n = _libc.syscall(ctypes.c_long(self._getevents), self._ctx, ctypes.c_long(0), ctypes.c_long(64),
                              self._events, ctypes.byref(zero))
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"io_getevents failed: {os.strerror(e)}")
            for ev in self._events[:n]:
                op = self._ops.pop(ev.data, None)
                if op is None:
                    continue
                data = op.buf.raw[:ev.res] if op.read and ev.res > 0 else None
                out.append(Completion(op.tag, ev.res, data))
            if n < 64:
                break
        return out

    def close(self) -> None:
        """io_destroy cancels what is still queued and waits for it."""
        if self._ctx.value:
            _libc.syscall(ctypes.c_long(self._destroy), self._ctx)
            self._ctx = ctypes.c_ulong(0)
        self._ops.clear()
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1

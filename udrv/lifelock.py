"""A worker's life lock: how the supervisor learns of a death before the kernel has finished it.

Each worker holds a robust, process-shared mutex (in the heartbeat page) from its start to its
end; the supervisor waits for it on a thread of its own. When the holder dies, however it dies,
the kernel marks the mutex owner-died and wakes the waiter as the holder begins to exit
(do_exit -> exit_mm -> exit_robust_list), before its address space is torn down and its files
are closed. On the shared host that is ~0.3 ms after a SIGKILL, where the pidfd becomes
readable only after the 3-7 ms an interpreter's teardown takes. From that moment the process
runs no code of its own again; what the kernel still holds for it (a usbfs file's URBs and
claims) goes when its files close, which the pidfd tells.

glibc's pthread functions through ctypes (the GIL is released while a ctypes call blocks): no C
of udrv's own, so the supervisor needs no native module. Where libc has no robust mutexes,
`available()` is False and the pidfd alone tells deaths.
"""
from __future__ import annotations

import ctypes
import errno
import threading
from typing import Callable

MUTEX_SIZE = 64                    # pthread_mutex_t is 40 bytes on x86-64, 48 on arm64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _init_attr = _libc.pthread_mutexattr_init
    _set_pshared = _libc.pthread_mutexattr_setpshared
    _set_robust = _libc.pthread_mutexattr_setrobust
    _mutex_init = _libc.pthread_mutex_init
    _lock = _libc.pthread_mutex_lock
    for _fn in (_init_attr, _set_pshared, _set_robust, _mutex_init, _lock):
        _fn.restype = ctypes.c_int
    _AVAILABLE = True
except (OSError, AttributeError):
    _AVAILABLE = False


def available() -> bool:
    return _AVAILABLE


def init(address: int) -> None:
    """A fresh, unlocked life lock at `address` (shared memory; nobody may wait on it)."""
    attr = ctypes.create_string_buffer(16)
    if _init_attr(attr) or _set_pshared(attr, _PTHREAD_PROCESS_SHARED) or _set_robust(attr, _PTHREAD_MUTEX_ROBUST):
        raise OSError("libc refused a robust process-shared mutex attribute")
    ctypes.memset(address, 0, MUTEX_SIZE)
    if _mutex_init(ctypes.c_void_p(address), attr):
        raise OSError("pthread_mutex_init failed on the heartbeat page")


def hold(address: int) -> None:
    """The worker's side: take the lock for the rest of this process's life (never released
    by hand: the kernel releases it at exit)."""
    r = _lock(ctypes.c_void_p(address))
    if r not in (0, errno.EOWNERDEAD):
        raise OSError(r, f"could not take the worker's life lock: {errno.errorcode.get(r, r)}")


class DeathWatch:
    """The supervisor's side: a thread that waits for one worker's life lock and calls
    `on_death()` (on that thread) when it comes back owner-died. A lock acquired normally
    means its holder let go of it without dying (or never held it): not a death."""

    def __init__(self, address: int, on_death: Callable[[], None]):
        self._address = address
        self._on_death = on_death
        self._thread = threading.Thread(target=self._wait, name="udrv-deathwatch", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        if _lock(ctypes.c_void_p(self._address)) == errno.EOWNERDEAD:
            self._on_death()
        # the lock stays with this (ending) thread: the slot's next owner gets a fresh one

    @property
    def waiting(self) -> bool:
        """Still waiting: the lock's memory must not be re-initialised under it."""
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

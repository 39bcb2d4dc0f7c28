"""The heartbeat page: what each worker tells the supervisor without a message.

One memfd page, created by the supervisor and mapped by every worker it starts (the fd arrives
over SCM_RIGHTS). Each worker owns one 64-byte slot of plain little-endian words:

    pid u32 @0 | _ u32 @4 | beat_ns u64 @8 | deadline_ns u64 @16 | progress_ns u64 @24

  beat_ns      CLOCK_MONOTONIC when the worker's loop last went round. The loop wakes at least
               every `BEAT_PERIOD` while it runs, so a beat older than the supervisor's
               threshold means a worker that is stopped, spinning, deadlocked or stuck in a call.
  deadline_ns  while a configuration entry point, a restore, a restart or a wait for the device
               (a model across the process boundary) runs: its deadline, else 0. The
               in-process watchdog interrupts a late one first; the supervisor waits that
               deadline out (plus a grace) before it calls the worker frozen, as nDriver's timeout
               is the entry point's own plus a guard.
  progress_ns  when the datapath last moved a frame: the start of the silence a failover ends.

Stores of aligned words are single instructions, so the supervisor reads each word whole; no
lock is needed because every word has one writer.

The page's second half holds one life lock per slot (udrv/lifelock.py, 64 bytes at
LIFE_BASE + 64 * slot): the worker holds it while it lives; the kernel releases it as the
worker begins to exit.
"""
from __future__ import annotations

import mmap
import os
import struct
import time

SLOT = 64
SLOTS = 8
LIFE_BASE = 2048
SIZE = 4096
# how often a running worker's loop goes round at least, idle or not (seconds)
BEAT_PERIOD = 0.003
_PID = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OFF_BEAT, _OFF_DEADLINE, _OFF_PROGRESS = 8, 16, 24


_this_process: "Heartbeat | None" = None


def this_process() -> "Heartbeat | None":
    """The slot this worker claimed, or None (not a supervised worker)."""
    return _this_process


class HeartbeatPage:
    def __init__(self, fd: int | None = None):
        created = fd is None
        self.fd = os.memfd_create("udrv-heartbeat", os.MFD_CLOEXEC) if fd is None else fd
        if created:
            os.ftruncate(self.fd, SIZE)
        self.mem = mmap.mmap(self.fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._q = memoryview(self.mem).cast("Q")

    def slot(self, i: int) -> "Heartbeat":
        if not 0 <= i < SLOTS:
            raise ValueError(f"heartbeat slot {i} is outside 0..{SLOTS - 1}")
        return Heartbeat(self, i)

    def clear(self, i: int) -> None:
        self.mem[i * SLOT:(i + 1) * SLOT] = bytes(SLOT)

    def life_address(self, i: int) -> int:
        """Where slot i's life lock lives in this process's memory."""
        import ctypes
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mem)) + LIFE_BASE + i * 64

    def close(self) -> None:
        self._q.release()
        self.mem.close()
        os.close(self.fd)


class Heartbeat:
    """One worker's slot: the worker writes, the supervisor reads."""

    __slots__ = ("_q", "_base", "page", "index", "_busy")

    def __init__(self, page: HeartbeatPage, index: int):
        self.page, self.index = page, index
        self._q = page._q
        self._base = index * SLOT // 8
        self._busy: dict[str, float] = {}

    # --- the worker's side ----------------------------------------------------------------
    def claim(self, pid: int) -> None:
        """The worker's slot from now on, and its life lock for the rest of its life."""
        global _this_process
        from . import lifelock
        self.page.clear(self.index)
        _PID.pack_into(self.page.mem, self.index * SLOT, pid)
        self.beat()
        if lifelock.available():
            lifelock.hold(self.page.life_address(self.index))
        _this_process = self

    @property
    def beat_address(self) -> int:
        """Where beat_ns lives in this process's memory: a loop in C stores it there itself."""
        import ctypes
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.page.mem))
        return base + self.index * SLOT + _OFF_BEAT

    def beat(self) -> None:
        self._q[self._base + 1] = time.monotonic_ns()

    def busy_until(self, deadline: float | None, what: str = "entry") -> None:
        """Something with a deadline of its own runs until `deadline` (time.monotonic seconds;
        None: done): a configuration call ("entry"), a restart, a wait for the device. They nest;
        the slot shows the latest deadline of those running."""
        if deadline is None:
            self._busy.pop(what, None)
        else:
            self._busy[what] = deadline
        self._q[self._base + 2] = int(max(self._busy.values()) * 1e9) if self._busy else 0

    def progress(self) -> None:
        """Frames moved: the loop is alive too (a long turn of real work is no freeze)."""
        now = time.monotonic_ns()
        self._q[self._base + 3] = now
        self._q[self._base + 1] = now

    # --- the supervisor's side ----------------------------------------------------------------
    @property
    def pid(self) -> int:
        return _PID.unpack_from(self.page.mem, self.index * SLOT)[0]

    @property
    def beat_ns(self) -> int:
        return self._q[self._base + 1]

    @property
    def deadline_ns(self) -> int:
        return self._q[self._base + 2]

    @property
    def progress_ns(self) -> int:
        return self._q[self._base + 3]

    def stale_for(self, now_ns: int | None = None) -> float:
        """Seconds since the last beat."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return max(0, now_ns - self.beat_ns) / 1e9

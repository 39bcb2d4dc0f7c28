"""Python functions that C calls back (a libusb completion callback, say).

An exception raised inside one is swallowed by ctypes and its work is lost (a completion that
never reaches the queue). Anything that interrupts Python asynchronously — the guard's
watchdog raises its timeout from a signal handler — asks `is_c_callback` of every frame on the
stack and waits until such a callback has returned. Transports mark their callbacks here and
need to know nothing of who interrupts them.
"""
from __future__ import annotations

from types import CodeType, FrameType
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

_CODES: set[CodeType] = set()


def c_callback(fn: F) -> F:
    """Mark fn as called from C: it must not see an asynchronous exception."""
    _CODES.add(fn.__code__)
    return fn


def inside_c_callback(frame: FrameType | None) -> bool:
    """Is any frame from `frame` outwards a marked callback?"""
    while frame is not None:
        if frame.f_code in _CODES:
            return True
        frame = frame.f_back
    return False

"""Thread names the kernel sees."""
from __future__ import annotations

PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread its name in the kernel too (top, /proc/<pid>/task/*/comm, the
    benches' CPU per thread): Python keeps thread names to itself. At most 15 bytes survive."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass                                 # not Linux or no prctl: the name is only cosmetic

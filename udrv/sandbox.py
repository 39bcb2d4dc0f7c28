"""Least privilege for a worker (SUD's point): the driver can reach only what it was handed.

The supervisor opens the device, the TAP and the shared memory as root and passes the fds; a
worker then calls `drop_privileges()`, after which it:
  * runs as an unprivileged user (`nobody` unless UDRV_WORKER_USER names another), with no
    supplementary groups and, as a consequence of leaving uid 0, no capabilities;
  * has PR_SET_NO_NEW_PRIVS set (no setuid binary gives anything back);
  * is confined by Landlock to reading and executing files outside /dev: it can open no device
    node (no /dev/bus/usb/*, /dev/vfio/*, /dev/net/tun) and write no file. The fds it was given
    keep working: Landlock judges an open, and those were opened by the supervisor.
Landlock needs Linux 5.13; on an older kernel the rest still applies and the log says so.
Python's lazy imports after the drop must find their modules readable by that user: the
worker imports what it needs before it drops (udrv/worker.py).
"""
from __future__ import annotations

import ctypes
import logging
import os
import pwd
import struct

log = logging.getLogger("udrv.sandbox")

PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
# every filesystem right each Landlock ABI version knows (1: 13 rights; 2: REFER; 3: TRUNCATE;
# 5: IOCTL_DEV)
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | (1 << 14) | (1 << 15)   # what a rule on a file may grant

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys(*args: int | bytes | None) -> int:
    r = _libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def landlock_abi() -> int:
    try:
        return _sys(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError:
        return 0


def _confine() -> bool:
    abi = landlock_abi()
    if abi <= 0:
        log.warning("event=no-landlock this kernel has no Landlock (Linux 5.13+): the worker runs unprivileged "
                    "but may open world-accessible device nodes")
        return False
    handled = _FS_BY_ABI.get(abi, _FS_BY_ABI[5])
    attr = struct.pack("<Q", handled)
    ruleset = _sys(SYS_LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    try:
        for name in os.listdir("/"):
            path = os.path.join("/", name)
            if name == "dev" or os.path.islink(path):
                continue
            _allow(ruleset, path, EXECUTE | READ_FILE | READ_DIR)
        for path in ("/dev/null", "/dev/zero", "/dev/urandom"):
            if os.path.exists(path):
                _allow(ruleset, path, READ_FILE | (WRITE_FILE if path == "/dev/null" else 0))
        _sys(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return True


def _allow(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            access &= FILE_RIGHTS
        rule = struct.pack("<Qi", access, fd)
        _sys(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0)
    finally:
        os.close(fd)


def drop_privileges(user: str | None = None) -> str:
    """Become `user` (default UDRV_WORKER_USER or nobody), confined; returns what was done. A
    process that is not root keeps its identity and is confined all the same."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    confined = _confine()
    name = user or os.environ.get("UDRV_WORKER_USER", "nobody")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise OSError(f"no user {name!r} to run the worker as: create it or set UDRV_WORKER_USER") from None
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    return f"uid={os.getuid()} gid={os.getgid()} no_new_privs=1 landlock={'on' if confined else 'off'}"

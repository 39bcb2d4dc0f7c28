"""Worker faults on a running supervised daemon, as the kernel-tier scenarios inject them.

`worker_failovers(ifname, kinds)` waits for a warm spare, then for each kind (kill, segv, stop,
...) asks the supervisor to inject it (`udrv inject worker KIND`) and waits until another worker
runs the driver and a new spare is idle again. Returns what `udrv status` said of each: the
old and new worker, the new spare, the failover record.
"""
from __future__ import annotations

import time
from typing import Any, Sequence


def _status(ifname: str) -> dict[str, Any]:
    from ..control import request
    r = request(ifname, {"cmd": "status"}, timeout=10.0)
    if not r.get("ok"):
        raise RuntimeError(f"udrv status: {r.get('error')}")
    return r["status"]


def _wait(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = pred()
        except (OSError, RuntimeError, ValueError):
            got = None
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def worker_failovers(ifname: str, kinds: Sequence[str], timeout: float = 60.0, settle: float = 1.0) -> list[dict]:
    from ..control import request
    _wait(lambda: (_status(ifname).get("spare") or {}).get("state") == "idle", timeout, "a warm spare")
    out = []
    for kind in kinds:
        st0 = _status(ifname)
        r = request(ifname, {"cmd": "inject", "entry": "worker", "kind": kind})
        if not r.get("ok"):
            raise AssertionError(f"udrv inject worker {kind}: {r.get('error')}")

        def replaced() -> dict | None:
            st = _status(ifname)
            w, sp = st.get("worker") or {}, st.get("spare") or {}
            return st if (st["failovers"] > st0["failovers"] and w.get("state") == "running"
                          and w.get("pid") != st0["worker"]["pid"] and sp.get("state") == "idle") else None
        st = _wait(replaced, timeout, f"a failover after a worker {kind} and a new spare")
        out.append({"kind": kind, "old": st0["worker"], "new": st["worker"], "spare": st["spare"],
                    "failover": st["last_failover"]})
        time.sleep(settle)
    return out


def check_failovers(failovers: list[dict], kinds: Sequence[str]) -> None:
    """What every failover of these must show (host side of the tests): detected at once, the
    device restored from the checkpoint by the spare, and a new spare each time."""
    assert [f["kind"] for f in failovers] == list(kinds), failovers
    for f in failovers:
        fo = f["failover"]
        assert fo["detected_by"] in ("life-lock", "pidfd") and fo["how"] == "restored from the checkpoint", fo
        assert fo["spare_ready"] and f["new"]["pid"] == fo["successor"] != f["old"]["pid"], f
        assert f["spare"]["pid"] not in (f["old"]["pid"], f["new"]["pid"]), f

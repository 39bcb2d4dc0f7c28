"""udrv.placement: the daemon keeps off CPUs busy with interrupt/softirq work, from /proc/stat."""
from __future__ import annotations

import os

import pytest

from udrv.placement import Priority, SoftirqAvoider, read_cpu_times


def stat(rows: dict[int, tuple[int, int, int]]) -> str:
    """/proc/stat text: per cpu (user+system ticks, irq+softirq ticks, idle ticks)."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu, (busy, sirq, idle) in rows.items():
        lines.append(f"cpu{cpu} {busy} 0 0 {idle} 0 0 {sirq} 0 0 0")
    return "\n".join(lines) + "\n"


class Recorder(SoftirqAvoider):
    def _apply(self, cpus, share):           # record instead of moving the test process
        self.applied.append(set(cpus))


def avoider(**kw) -> Recorder:
    r = Recorder(enabled=True, **kw)
    r.applied = []
    r._base = frozenset({0, 1, 2})
    return r


def test_reads_irq_plus_softirq_per_cpu():
    t = read_cpu_times("cpu  1 2 3 4 5 6 7 8\ncpu0 1 0 0 10 0 2 3 0 0 0\ncpu1 0 0 0 5 0 0 0 0\nintr 1\n")
    assert t == {0: (5, 16), 1: (0, 5)}


def test_a_cpu_busy_with_softirq_is_avoided_then_given_back():
    a = avoider()
    assert a.tick(stat({0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)})) == frozenset()   # first look: no window
    # cpu0 spent 50 % of the window in softirq
    assert a.tick(stat({0: (50, 50, 0), 1: (10, 0, 90), 2: (10, 0, 90)})) == {0}
    assert a.applied == [{1, 2}]
    # 15 %: above the release level, still avoided (no flapping)
    assert a.tick(stat({0: (135, 65, 0), 1: (20, 0, 180), 2: (20, 0, 180)})) == {0}
    assert a.applied == [{1, 2}]
    # 5 %: given back
    assert a.tick(stat({0: (230, 70, 0), 1: (30, 0, 270), 2: (30, 0, 270)})) == frozenset()
    assert a.applied == [{1, 2}, {0, 1, 2}]


def test_never_narrows_to_nothing_nor_beyond_the_given_affinity():
    a = avoider()
    a.tick(stat({0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}))
    assert a.tick(stat({0: (50, 50, 0), 1: (50, 50, 0), 2: (50, 50, 0)})) == frozenset()
    assert a.applied == []
    b = avoider()
    b._base = frozenset({0, 1})            # cpu 2 was never ours (taskset): not counted, not given
    b.tick(stat({0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}))
    assert b.tick(stat({0: (10, 0, 90), 1: (50, 50, 0), 2: (50, 50, 0)})) == {1}
    assert b.applied == [{0}]


def test_switch_off_and_single_cpu(monkeypatch):
    monkeypatch.setenv("UDRV_CPU_PLACEMENT", "0")
    assert SoftirqAvoider().enabled is False
    one = avoider()
    one.tick(stat({0: (0, 0, 0)}))
    assert one.tick(stat({0: (50, 50, 0)})) == frozenset() and one.applied == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to narrow to one")
def test_really_moves_every_thread_and_restores():
    import threading
    base = os.sched_getaffinity(0)
    cpus = sorted(base)
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    try:
        a = SoftirqAvoider(enabled=True)
        a._base = frozenset(base)
        a._apply(frozenset({cpus[1]}), {})
        a.avoided = frozenset({cpus[0]})
        assert os.sched_getaffinity(0) == {cpus[1]}
        assert os.sched_getaffinity(t.native_id) == {cpus[1]}
        a.restore()
        assert os.sched_getaffinity(0) == base and os.sched_getaffinity(t.native_id) == base
    finally:
        ev.set()
        t.join()


# --- the daemon's priority ----------------------------------------------------------------------

def test_priority_raises_every_thread_and_gives_it_back(caplog):
    import threading
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    before = os.getpriority(os.PRIO_PROCESS, 0)
    other_before = os.getpriority(os.PRIO_PROCESS, t.native_id)
    p = Priority(nice=min(before, other_before) - 2)
    try:
        changed = p.apply()
        if os.geteuid() != 0:
            assert not changed and "CAP_SYS_NICE" in caplog.text   # said once, in one sentence
            assert os.getpriority(os.PRIO_PROCESS, 0) == before
            return
        assert changed
        assert os.getpriority(os.PRIO_PROCESS, 0) == p.nice
        assert os.getpriority(os.PRIO_PROCESS, t.native_id) == p.nice
    finally:
        p.restore()
        stop.set()
        t.join()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_priority_zero_leaves_the_threads_alone():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    p = Priority(nice=0)
    assert not p.apply()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_priority_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("UDRV_NICE", "0")
    assert Priority().nice == 0
    monkeypatch.delenv("UDRV_NICE")
    assert Priority().nice == -2

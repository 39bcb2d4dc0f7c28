"""Keep the daemon's threads off the CPUs that carry the kernel's interrupt work.

A kernel driver's completions and the network stack behind them run in interrupt and softirq
context on the CPU that takes the device's interrupt (for a USB NIC: the host controller's). A
userspace driver that lands on that same CPU competes with its own device's completions, and
the other CPUs sit idle: measured in the QEMU guest (f_ecm on dummy_hcd, 2 vCPUs, TCP out through
udrv0), 116 Mbit/s on the softirq CPU, 243-257 where the scheduler put it, 473 on the other CPU.
So, as one would pin a DPDK core away from the IRQ CPUs, the daemon looks at /proc/stat now and
then and narrows its CPU affinity (every thread, the C ring's TX thread included) to the CPUs whose
irq + softirq share is low. It never narrows to nothing, gives a CPU back only once its share has
fallen well below the threshold, and does nothing on a single CPU.
`UDRV_CPU_PLACEMENT=0` in the environment turns it off (to compare).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("udrv")


def read_cpu_times(stat: str | None = None) -> dict[int, tuple[int, int]]:
    """{cpu: (irq + softirq ticks, all ticks)} from /proc/stat."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in vals[:8]]
        out[int(name[3:])] = (v[5] + v[6], sum(v))
    return out


@dataclass
class SoftirqAvoider:
    """Call tick() every second or so; it re-reads /proc/stat and sets the affinity."""
    threshold: float = 0.25          # irq + softirq share above which a CPU is the device's
    release: float = 0.10            # ... and below which it is given back
    pid: int = field(default_factory=os.getpid)
    enabled: bool = field(default_factory=lambda: os.environ.get("UDRV_CPU_PLACEMENT", "1") != "0")
    avoided: frozenset[int] = frozenset()
    _last: dict[int, tuple[int, int]] | None = None
    _base: frozenset[int] | None = None  # the affinity we were given (taskset, cpuset)

    def tick(self, stat: str | None = None) -> frozenset[int]:
        """The CPUs avoided after this look (empty: no narrowing)."""
        if not self.enabled:
            return self.avoided
        try:
            now = read_cpu_times(stat)
        except (OSError, ValueError):
            self.enabled = False         # no /proc/stat here: nothing to go by
            return self.avoided
        last, self._last = self._last, now
        if self._base is None:
            try:
                self._base = frozenset(os.sched_getaffinity(0))
            except OSError:
                self.enabled = False
                return self.avoided
        if last is None or len(now) < 2:
            return self.avoided
        share = {}
        for cpu, (busy, total) in now.items():
            if cpu not in self._base:
                continue
            b0, t0 = last.get(cpu, (busy, total))
            share[cpu] = (busy - b0) / (total - t0) if total > t0 else 0.0
        avoid = {c for c, s in share.items() if s > self.threshold}
        avoid |= {c for c in self.avoided if c in share and share[c] > self.release}
        if len(avoid) >= len(share):     # every CPU is busy with interrupts: no narrowing
            avoid = set()
        new = frozenset(avoid)
        if new != self.avoided:
            self._apply(frozenset(share) - new, share)
            self.avoided = new
        return self.avoided

    def restore(self) -> None:
        """Give every thread the affinity it started with."""
        if self.avoided and self._base:
            self._apply(self._base, {})
        self.avoided = frozenset()

    def _apply(self, cpus: frozenset[int], share: dict[int, float]) -> None:
        allowed = cpus & (self._base or cpus) or (self._base or cpus)
        moved = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), allowed)
                moved += 1
            except OSError:
                pass                     # a thread that just ended, or a cpuset that says no
        log.info("event=cpu_placement cpus=%s irq_softirq_share=%s threads=%d", ",".join(map(str, sorted(allowed))),
                 ",".join(f"{c}:{s:.2f}" for c, s in sorted(share.items())), moved)


@dataclass
class Priority:
    """The daemon's scheduling priority: a little ahead of the applications it serves.

    A kernel driver's receive work runs in softirq context, which no task preempts. A daemon at
    the applications' own priority is preempted by the reader of every frame it writes to the
    TAP (the woken reader has slept, so CFS runs it first): a context switch per frame each way
    instead of one per batch. Far ahead is as bad: the daemon then fills socket buffers that
    the reader never gets the CPU to drain. Measured in the QEMU guest (1 vCPU, e1000 through
    vfio-pci, iperf3 UDP 64 B peer -> guest, kpps the reader received; the kernel's own driver
    12.0-16.5 in the same boots): nice 0 6.2-8.3 (13k context switches in 5.7 s), -1 10.8,
    -2 10.7-11.7 (2.3k), -3 9.0, -5 6.6-7.9, -10 2.3-2.9. So -2, and the e1000 loops (C and
    Python) yield after each batch of received frames (`batch_done`). `UDRV_NICE` sets the value (0 keeps the
    applications' priority). Raising it needs CAP_SYS_NICE; without it the daemon says so once
    and runs at the priority it was given."""
    nice: int = field(default_factory=lambda: int(os.environ.get("UDRV_NICE", "-2")))
    pid: int = field(default_factory=os.getpid)
    _saved: dict[int, int] = field(default_factory=dict)

    def apply(self) -> bool:
        """Every thread of the daemon to `nice` (threads started later inherit it)."""
        if self.nice == 0:
            return False
        changed = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            t = int(tid)
            try:
                old = os.getpriority(os.PRIO_PROCESS, t)
                if old <= self.nice:
                    continue
                os.setpriority(os.PRIO_PROCESS, t, self.nice)
            except PermissionError:
                log.warning("event=priority nice=%d kept=%d: raising the daemon's priority needs CAP_SYS_NICE "
                            "(run as root, or set UDRV_NICE=0 to stop asking)", self.nice, old)
                return False
            except OSError:
                continue                 # a thread that just ended
            self._saved.setdefault(t, old)
            changed += 1
        if changed:
            log.info("event=priority nice=%d threads=%d", self.nice, changed)
        return changed > 0

    def restore(self) -> None:
        """Give every thread we changed its old nice value back (in-process daemons: tests)."""
        for t, old in self._saved.items():
            try:
                os.setpriority(os.PRIO_PROCESS, t, old)
            except OSError:
                pass                     # ended, or lowering back is refused: harmless
        self._saved.clear()

    @staticmethod
    def batch_done() -> None:
        """After a batch of frames went to the host: let their readers run before the next batch."""
        os.sched_yield()

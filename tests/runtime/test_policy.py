"""The supervisor's thresholds (udrv.failover.Policy) on a slow machine."""
from pytest import approx

from udrv.failover import Policy


def test_every_threshold_scales_with_a_raised_heartbeat_timeout_and_none_falls_below_its_default():
    d = Policy()
    assert d.stopped_check < d.heartbeat_timeout < d.blocked_timeout < d.starved_timeout
    slow = d.with_heartbeat(0.3)          # the kernel tier's TCG guest
    assert slow.heartbeat_timeout == 0.3
    assert (slow.stopped_check, slow.blocked_timeout, slow.starved_timeout) == approx((0.15, 0.9, 2.1))
    fast = d.with_heartbeat(0.002)
    assert fast.stopped_check == d.stopped_check and fast.blocked_timeout == d.blocked_timeout
    assert fast.starved_timeout == d.starved_timeout

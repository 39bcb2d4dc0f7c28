from __future__ import annotations

import os

import pytest

from rigs import Rig


@pytest.fixture
def rig() -> Rig:
    r = Rig().up()
    yield r
    r.nic.close()


@pytest.fixture(scope="session")
def watchdog():
    from udrv.guard import Watchdog
    wd = Watchdog()
    yield wd
    wd.close()


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates TAP devices and network namespaces (run as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)

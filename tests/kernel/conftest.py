"""Kernel tier: tests in this folder run commands inside a Debian kernel booted in QEMU.

Fixture `guest` (session-scoped): `guest.run(cmd, devices=GuestDevices(...), timeout=..., env=...)`
returns a GuestResult (returncode, output, console, seconds); the guest's working directory is the
repository root and the repository is on PYTHONPATH. Every test here gets the `kernel` marker.

A machine without qemu-system-x86_64 makes these tests FAIL with the reason; set
UDRV_SKIP_KERNEL_TIER=1 to skip the tier on purpose (the skip says so).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from udrv.testbed import guest as guestlib
from udrv.testbed.guest import GuestDevices, GuestImage, GuestResult

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

DEFAULT_TIMEOUT = 90.0  # one boot is ~3 s; Python in the guest runs ~17x slower than on the host


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.kernel)


def _unavailable_reason() -> str | None:
    """Why this machine cannot run the tier, or None."""
    if not shutil.which(guestlib.QEMU):
        return f"{guestlib.QEMU} not found: apt-get install qemu-system-x86"
    if not Path(guestlib.BUSYBOX).is_file():
        return f"{guestlib.BUSYBOX} not found: apt-get install busybox-static"
    return None


@dataclass
class Guest:
    image: GuestImage

    def run(self, cmd: list[str] | str, devices: GuestDevices | None = None,
            timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None, **kw) -> GuestResult:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # the guest's writes vanish with it: let it use the bytecode compiled on the host below
        # under TCG one turn of a worker's loop can take longer than the host's 12 ms heartbeat
        merged = {"PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "", "UDRV_HEARTBEAT_TIMEOUT_MS": "300",
                  **(env or {})}
        kw.setdefault("cwd", REPO)
        return guestlib.run(cmd, devices or GuestDevices(), timeout, merged, image=self.image, **kw)

    @property
    def python(self) -> str:
        """The host's real interpreter (not a pyenv shim), also first on the guest's PATH."""
        return guestlib.real_python()


@pytest.fixture(scope="session")
def guest() -> Guest:
    if os.environ.get("UDRV_SKIP_KERNEL_TIER") == "1":
        why = _unavailable_reason() or "QEMU is available here"
        pytest.skip(f"kernel tier skipped because UDRV_SKIP_KERNEL_TIER=1 ({why})")
    reason = _unavailable_reason()
    if reason:
        pytest.fail(f"kernel tier cannot run: {reason} (or set UDRV_SKIP_KERNEL_TIER=1 to skip it)")
    # compile once on the host: under TCG, compiling udrv in every guest interpreter costs seconds
    import compileall
    for d in ("udrv", "tests"):
        compileall.compile_dir(str(REPO / d), quiet=1)
    try:
        return Guest(guestlib.prepare())
    except guestlib.GuestError as e:
        pytest.fail(f"kernel tier cannot prepare the guest: {e}")

"""Smoke tests of the kernel-tier harness: each test boots the Debian kernel once in QEMU."""
from __future__ import annotations

import os

import shlex
from pathlib import Path

from udrv.testbed.guest import E1000_ID, VFIO_GET_API_VERSION, GuestDevices, vfio_bind_snippet

REPO = Path(__file__).resolve().parents[2]


def test_exit_status_and_output_come_back(guest):
    assert guest.run(["true"]).returncode == 0

    res = guest.run('echo "to-stdout $UDRV_SMOKE"; echo to-stderr >&2; pwd; uname -r; false',
                    env={"UDRV_SMOKE": "a b'c"})
    assert res.returncode == 1, res.console
    lines = res.output.splitlines()
    assert lines[:2] == ["to-stdout a b'c", "to-stderr"]
    assert lines[2] == str(REPO)  # the fixture runs commands from the repository root
    assert lines[3] == guest.image.kver
    assert 0 < res.seconds < 60


def test_e1000_binds_to_vfio_pci(guest):
    check = ("import fcntl, os\n"
             "fd = os.open('/dev/vfio/vfio', os.O_RDWR)\n"
             f"print('api', fcntl.ioctl(fd, {VFIO_GET_API_VERSION:#x}))\n")
    script = (vfio_bind_snippet(E1000_ID)
              + 'echo "bdf=$BDF group=$VFIO_GROUP driver=$(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"\n'
              + f"{shlex.quote(guest.python)} -c {shlex.quote(check)}\n")
    res = guest.run(script, GuestDevices(e1000=True))
    assert res.returncode == 0, res.output + res.console
    assert "driver=vfio-pci" in res.output
    assert "api 0" in res.output


def test_dummy_hcd_and_libcomposite_load(guest):
    res = guest.run("modprobe dummy_hcd && modprobe libcomposite && ls /sys/class/udc "
                    "&& test -d /sys/kernel/config/usb_gadget")
    assert res.returncode == 0, res.output + res.console
    assert "dummy_udc.0" in res.output.split()


def test_guest_python_imports_host_usb1(guest):
    import usb1  # a project dependency (libusb1); the guest must see the host's copy
    res = guest.run(["python3", "-c", "import os, sys, usb1; print(os.path.realpath(sys.executable)); print(usb1.__file__)"])
    assert res.returncode == 0, res.output + res.console
    executable, module = res.output.split()
    assert executable == os.path.realpath(guest.python)
    assert module == usb1.__file__

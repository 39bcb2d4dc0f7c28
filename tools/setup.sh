#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages, then udrv itself
# (editable, with the C fast path compiled by cffi and the test extras). Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
    apt-get update -qq
    # libusb: the USB transport; iperf3/iproute2: the demo and tests; qemu + busybox + kmod + cpio:
    # the kernel tier (a Debian kernel booted in QEMU); gcc + libusb headers: the C fast path
    apt-get install -y -qq --no-install-recommends \
        libusb-1.0-0 libusb-1.0-0-dev iperf3 iproute2 qemu-system-x86 busybox-static kmod cpio \
        usbutils pciutils gcc python3-dev >/dev/null
else
    echo "setup: no apt-get here: install libusb-1.0, iperf3, iproute2, qemu-system-x86, busybox (static), kmod, cpio, gcc yourself" >&2
fi
python3 -m pip install -q -e '.[test]'

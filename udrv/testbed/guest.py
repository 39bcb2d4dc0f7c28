"""Kernel-tier harness: run a command inside a Debian kernel booted in QEMU (TCG).

The guest sees the host's whole filesystem read-only over 9p with a tmpfs overlay on top (it can
write anywhere; nothing reaches the host), hence the same Python interpreter and site-packages as
the host, and the Debian kernel's modules at /usr/lib/modules/<kver> so `modprobe` works. There is
no udev: modprobe every driver you need (vfio-pci, xhci_pci, dummy_hcd, e1000, tun, ...). The
command's exit status and its stdout+stderr (interleaved) come back through a second, writable 9p
share, not the serial console. One boot + `true` + power-off takes ~2.5-3 s on an idle 2-core host.

CLI (exits with the command's status; 2 when the guest itself failed; `python3 tools/guest.py`
is the same command):
    python3 -m udrv.testbed.guest prepare [--refresh]
    python3 -m udrv.testbed.guest run [--e1000] [--e1000e] [--usb-net] [--tap IFNAME]
                               [--memory 1024M] [--smp 1] [--timeout 120] [--console] -- CMD...

Library (the benches boot their guests with it; tests/kernel/conftest.py wraps it as `guest`):
    from udrv.testbed.guest import prepare, run, GuestDevices
    image = prepare()                                   # cached: ~0.2 s once prepared
    res = run(["uname", "-r"], GuestDevices(e1000=True), timeout=60, env={}, image=image)
    res.returncode, res.output, res.console, res.seconds
    # a str command is a shell script; a list is run as is. Raises GuestTimeout (console attached)
    # when the guest does not power off in time, GuestError when it never reported a status.
    vfio_bind_snippet(E1000_ID)  # shell: binds the device to vfio-pci, sets $BDF and $VFIO_GROUP
    find_pci_bdf(), bind_vfio(bdf)  # the same from Python already running in the guest

Devices: e1000 / e1000e sit behind an emulated Intel IOMMU (q35, intel-iommu before the NIC,
intel_iommu=on); usb_net is qemu-xhci + usb-net (0525:a4a2; modprobe xhci_pci). tap_ifname is the
peer of the first NIC (e1000, then e1000e, then usb-net); the harness creates that TAP with
`ip tuntap` (and sets it up) when absent and deletes it afterwards; other NICs get a
restricted user-mode backend.

Inside the guest: cwd and environment are the caller's (os.environ overlaid with env), PATH starts
with the directory of the host's real interpreter (a pyenv shim costs seconds under TCG),
UDRV_IN_GUEST=1, UDRV_GUEST_XFER=<dir>: writable, the same path as on the host (kept when run()
gets out_dir). Mounted: proc, sysfs, devtmpfs, devpts, /dev/shm, tmpfs /run, debugfs, configfs at
/sys/kernel/config (mount functionfs yourself once a gadget function exists); lo is up; the host's
/tmp is visible (writes stay in the guest).

Cache: $UDRV_GUEST_CACHE or ~/.cache/udrv-guest, one directory per kernel version with the
unpacked package (root/, ~400 MB), vmlinux (~65 MB) and the initramfs (~3 MB). prepare() reuses the
newest kernel already prepared (offline, one kernel per machine); refresh=True (--refresh) asks
apt for linux-image-amd64's current dependency; UDRV_GUEST_KVER pins a kernel version.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# --- constants -----------------------------------------------------------------------------

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
META_PACKAGE = "linux-image-amd64"
# Top-level modules the initramfs needs; their dependencies come from modprobe --show-depends.
INITRAMFS_MODULES = ("9p", "9pnet_virtio", "virtio_pci", "overlay", "configfs")
XZ_MAGIC = b"\xfd7zXZ\x00"
E1000_ID = "8086:100e"
E1000E_ID = "8086:10d3"
USB_NET_ID = "0525:a4a2"
VFIO_GET_API_VERSION = 0x3B64

APT_TIMEOUT = 600.0       # downloading ~70 MB
UNPACK_TIMEOUT = 300.0
TOOL_TIMEOUT = 60.0       # depmod, modprobe --show-depends, ip
QEMU_GRACE = 5.0          # after the run timeout, time to let QEMU die after SIGKILL


class GuestError(RuntimeError):
    """The guest could not be prepared or did not report a result."""


class GuestTimeout(GuestError):
    """The guest did not power off within the timeout."""

    def __init__(self, message: str, console: str) -> None:
        super().__init__(message)
        self.console = console


# --- data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestImage:
    kver: str
    cache_dir: Path          # <cache>/<kver>
    vmlinux: Path            # ELF, booted through the PVH entry
    initramfs: Path          # uncompressed newc cpio
    modules_dir: Path        # host path of the unpacked lib/modules/<kver> (depmod'ed)


@dataclass
class GuestDevices:
    e1000: bool = False
    e1000e: bool = False
    usb_net: bool = False            # qemu-xhci + usb-net
    tap_ifname: str | None = None    # peer of the first NIC (e1000, then e1000e, then usb-net)
    memory: str = "1024M"
    # qboot reaches the kernel ~0.4 s sooner than SeaBIOS (falls back to SeaBIOS if absent);
    # it leaves PCI memory decoding to the OS, which pci_enable_device/vfio-pci do anyway.
    firmware: str = "qboot"          # "qboot" | "seabios"
    smp: int = 1                     # -smp 2 did not make boots faster here
    extra_qemu: tuple[str, ...] = ()

    @property
    def pci_nics(self) -> bool:
        return self.e1000 or self.e1000e


@dataclass
class GuestResult:
    returncode: int
    output: str      # the command's stdout+stderr, interleaved
    console: str     # serial console: kernel messages and init diagnostics
    seconds: float   # wall time of the QEMU process


# --- small helpers -------------------------------------------------------------------------

def _sh(args: list[str], what: str, timeout: float, hint: str = "", **kw) -> str:
    """Run a host tool; on failure raise one GuestError sentence naming what to do."""
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise GuestError(f"{what} failed: {args[0]} is not installed{'; ' + hint if hint else ''}") from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"{what} timed out after {timeout:.0f} s{'; ' + hint if hint else ''}") from None
    if cp.returncode != 0:
        detail = (cp.stderr or cp.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GuestError(f"{what} failed ({detail[0]}){': ' + hint if hint else ''}")
    return cp.stdout


def real_python() -> str:
    """The interpreter binary itself: a pyenv shim costs ~2.7 s per call under TCG. Inside a
    virtual environment keep its own bin/python (resolving the link would lose the venv's
    site-packages)."""
    if sys.prefix != sys.base_prefix:
        return os.path.abspath(sys.executable)
    return os.path.realpath(sys.executable)


def default_cache_dir() -> Path:
    env = os.environ.get("UDRV_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "udrv-guest"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Lock:
    """Exclusive flock on the cache so two pytest sessions don't unpack at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# --- prepare: kernel -------------------------------------------------------------------------

_APT_HINT = "run apt-get update, or set UDRV_GUEST_CACHE to a prepared cache"


def resolve_kernel_package() -> str:
    """linux-image-amd64 -> linux-image-6.1.0-NN-amd64 (the versioned package)."""
    out = _sh(["apt-cache", "depends", META_PACKAGE], f"apt-cache depends {META_PACKAGE}",
              TOOL_TIMEOUT, _APT_HINT)
    found = re.findall(r"Depends:\s*(linux-image-\d\S*-amd64)\b", out)
    if not found:
        raise GuestError(f"apt-cache depends {META_PACKAGE} names no linux-image-*-amd64 package: {_APT_HINT}")
    return found[0]


def _prepared_kernels(cache: Path) -> list[str]:
    """Kernel versions whose unpack + vmlinux are complete, newest first."""
    if not cache.is_dir():
        return []
    kvers = [d.name for d in cache.iterdir()
             if (d / "vmlinux").is_file() and (d / "root" / "lib" / "modules" / d.name / "modules.dep").is_file()]
    return sorted(kvers, key=_version_key, reverse=True)


def _version_key(kver: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", kver))


def _unpack_kernel(kdir: Path, package: str, kver: str) -> None:
    """apt-get download + dpkg-deb -x + depmod, into kdir/root (atomically renamed)."""
    dl = Path(tempfile.mkdtemp(prefix="download.", dir=kdir))
    try:
        _sh(["apt-get", "download", package], f"apt-get download {package}", APT_TIMEOUT, _APT_HINT, cwd=dl)
        debs = list(dl.glob("*.deb"))
        if not debs:
            raise GuestError(f"apt-get download {package} produced no .deb: {_APT_HINT}")
        staging = dl / "root"
        _sh(["dpkg-deb", "-x", str(debs[0]), str(staging)], f"dpkg-deb -x {debs[0].name}", UNPACK_TIMEOUT,
            "install dpkg, or set UDRV_GUEST_CACHE to a prepared cache")
        # The package's modules are not installed on the host: build modules.dep ourselves.
        _sh(["depmod", "-b", str(staging), kver], f"depmod -b {staging} {kver}", TOOL_TIMEOUT,
            "apt-get install kmod")
        shutil.rmtree(kdir / "root", ignore_errors=True)
        os.replace(staging, kdir / "root")
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz (Debian's CONFIG_KERNEL_XZ).

    Booting the ELF through its PVH note skips the firmware's real-mode path: ~1.5 s instead
    of ~3.4 s to a shell under TCG. Data after the xz stream (the bzImage tail) is ignored.
    """
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = dec.decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise GuestError("no xz-compressed ELF found in the bzImage: the kernel package changed format; "
                     "point UDRV_GUEST_CACHE at a prepared cache")


def _ensure_vmlinux(kdir: Path, kver: str) -> Path:
    out = kdir / "vmlinux"
    if not out.is_file():
        bz = kdir / "root" / "boot" / f"vmlinuz-{kver}"
        _atomic_write(out, extract_vmlinux(bz.read_bytes()))
    return out


# --- prepare: initramfs --------------------------------------------------------------------

# PID 1 inside the initramfs (busybox sh). Host paths come from /xfer/guest.conf at boot so the
# initramfs does not depend on where the cache or the share live.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
die() { echo "udrv-guest-init: $* failed" >/dev/console; sync; poweroff -f; }
mount -t devtmpfs devtmpfs /dev || die "mount devtmpfs"
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc || die "mount proc"
for m in $(cat /modules/order); do insmod /modules/$m.ko || die "insmod $m"; done
mkdir -p /lower /rw /newroot /xfer
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower || die "mount host root (9p)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xfer /xfer || die "mount xfer share (9p)"
. /xfer/guest.conf || die "read guest.conf"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir /rw/upper /rw/work || die "mount overlay tmpfs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || die "mount overlay"
R=/newroot
mount -t proc proc $R/proc || die "mount proc"
mount -t sysfs sysfs $R/sys || die "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || die "mount devtmpfs in root"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts || die "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "mount /dev/shm"
mount -t tmpfs -o mode=0755 tmpfs $R/run || die "mount /run"
mkdir -p "$R/usr/lib/modules/$KVER" "$R$XFER_PATH"
mount --bind "$R$MODULES_SRC" "$R/usr/lib/modules/$KVER" || die "bind modules dir"
mount --bind /xfer "$R$XFER_PATH" || die "bind xfer share"
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t configfs configfs $R/sys/kernel/config || die "mount configfs"
hostname udrv-guest
ip link set lo up
chroot $R /bin/sh "$XFER_PATH/cmd.sh" </dev/null
echo $? >/xfer/status
sync
poweroff -f
"""


def initramfs_modules(root: Path, kver: str) -> list[Path]:
    """Module files for INITRAMFS_MODULES, deduplicated, in load order."""
    seen: list[Path] = []
    for mod in INITRAMFS_MODULES:
        out = _sh(["modprobe", "-d", str(root), "-S", kver, "--show-depends", mod],
                  f"modprobe --show-depends {mod}", TOOL_TIMEOUT, "apt-get install kmod")
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in seen:
                seen.append(Path(parts[1]))
    return seen


def _cpio_entry(name: str, mode: int, ino: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc record; every record starts and ends 4-byte aligned."""
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
    rec = b"070701" + "".join(f"{v:08x}" for v in fields).encode() + namez
    rec += b"\0" * (-len(rec) % 4)
    return rec + data + b"\0" * (-len(data) % 4)


def build_cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """Written in Python so no mknod (root) is needed for /dev/console."""
    recs = [_cpio_entry(n, m, i + 1, d, r) for i, (n, m, d, r) in enumerate(entries)]
    recs.append(_cpio_entry("TRAILER!!!", 0, 0))
    return b"".join(recs)


def _initramfs_entries(mods: list[Path]) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    d, f, c = 0o040755, 0o100755, 0o020600
    ents = [(n, d, b"", (0, 0)) for n in ("bin", "dev", "proc", "sys", "modules")]
    ents.append(("dev/console", c, b"", (5, 1)))
    ents.append(("bin/busybox", f, Path(BUSYBOX).read_bytes(), (0, 0)))
    ents.append(("init", f, INIT_SCRIPT.encode(), (0, 0)))
    order = "\n".join(m.stem for m in mods) + "\n"
    ents.append(("modules/order", 0o100644, order.encode(), (0, 0)))
    ents += [(f"modules/{m.stem}.ko", 0o100644, m.read_bytes(), (0, 0)) for m in mods]
    return ents


def _drop_stale(paths, age: float = 86400.0) -> None:
    """Remove old builds, but not fresh ones: a concurrent session may be about to boot them."""
    for p in paths:
        if time.time() - p.stat().st_mtime > age:
            p.unlink(missing_ok=True)


def _ensure_initramfs(kdir: Path, kver: str) -> Path:
    """Keyed by the init script, module list and busybox, so edits rebuild it (~0.1 s).

    Left uncompressed: ~3 MB costs nothing to load, while decompressing under TCG does.
    """
    if not Path(BUSYBOX).is_file():
        raise GuestError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    mods = initramfs_modules(kdir / "root", kver)
    bb = Path(BUSYBOX).stat()
    key = hashlib.sha256(json.dumps([INIT_SCRIPT, [str(m) for m in mods], bb.st_size, bb.st_mtime]).encode())
    out = kdir / f"initramfs-{key.hexdigest()[:12]}.cpio"
    if not out.is_file():
        _drop_stale(kdir.glob("initramfs-*.cpio"))
        _atomic_write(out, build_cpio(_initramfs_entries(mods)))
    return out


def prepare(cache_dir: Path | str | None = None, refresh: bool = False) -> GuestImage:
    """Fetch, unpack and convert the Debian kernel once; afterwards ~0.1 s.

    Without refresh, the newest kernel already prepared in the cache is used (works offline,
    keeps test runs on one kernel); otherwise apt names the version to prepare.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    with _Lock(cache / ".lock"):
        kver = os.environ.get("UDRV_GUEST_KVER") or ""
        if not kver and not refresh:
            kver = next(iter(_prepared_kernels(cache)), "")
        package = f"linux-image-{kver}" if kver else resolve_kernel_package()
        kver = kver or package.removeprefix("linux-image-")
        kdir = cache / kver
        kdir.mkdir(parents=True, exist_ok=True)
        if kver not in _prepared_kernels(cache):
            _unpack_kernel(kdir, package, kver)
        vmlinux = _ensure_vmlinux(kdir, kver)
        initramfs = _ensure_initramfs(kdir, kver)
    return GuestImage(kver=kver, cache_dir=kdir, vmlinux=vmlinux, initramfs=initramfs,
                      modules_dir=kdir / "root" / "lib" / "modules" / kver)


# --- run -------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_SKIP = {"PWD", "OLDPWD", "SHLVL", "_"}


def guest_env(env: dict[str, str] | None, xfer: Path, inherit: bool = True) -> dict[str, str]:
    """Host environment + env, with PATH led by the real interpreter's directory."""
    merged = {k: v for k, v in os.environ.items() if inherit and k not in _ENV_SKIP}
    merged.update(env or {})
    path = merged.get("PATH", "")
    merged["PATH"] = ":".join([os.path.dirname(real_python()), path, "/usr/sbin:/usr/bin:/sbin:/bin"])
    merged["UDRV_IN_GUEST"] = "1"
    merged["UDRV_GUEST_XFER"] = str(xfer)
    return {k: v for k, v in merged.items() if _ENV_NAME.match(k)}


def command_script(cmd: list[str] | str, cwd: Path, env: dict[str, str], output: Path) -> str:
    """The shell script the guest runs in the chroot; a str cmd is shell, a list is exec'd as is."""
    lines = ["#!/bin/sh", f"exec >{shlex.quote(str(output))} 2>&1"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    lines.append(cmd if isinstance(cmd, str) else shlex.join(cmd))
    return "\n".join(lines) + "\n"


def _nic_args(devs: GuestDevices) -> list[str]:
    nics = [m for m, on in (("e1000", devs.e1000), ("e1000e", devs.e1000e), ("usb-net", devs.usb_net)) if on]
    if devs.tap_ifname and not nics:
        raise GuestError(f"tap_ifname={devs.tap_ifname!r} needs a NIC: set e1000, e1000e or usb_net")
    args: list[str] = []
    if devs.pci_nics:
        # The IOMMU must exist before the NICs are realized, or they are not behind it.
        args += ["-device", "intel-iommu,caching-mode=on"]
    for i, model in enumerate(nics):
        if i == 0 and devs.tap_ifname:
            args += ["-netdev", f"tap,id=net{i},ifname={devs.tap_ifname},script=no,downscript=no"]
        else:
            args += ["-netdev", f"user,id=net{i},restrict=on"]
        if model == "usb-net":
            args += ["-device", "qemu-xhci,id=xhci", "-device", f"usb-net,netdev=net{i},bus=xhci.0"]
        else:
            args += ["-device", f"{model},netdev=net{i}"]
    return args


QBOOT = "/usr/share/qemu/qboot.rom"


def _firmware_args(firmware: str) -> list[str]:
    if firmware not in ("qboot", "seabios"):
        raise GuestError(f"unknown firmware {firmware!r}: use 'qboot' or 'seabios'")
    return ["-bios", QBOOT] if firmware == "qboot" and Path(QBOOT).is_file() else []


def qemu_command(image: GuestImage, devs: GuestDevices, xfer: Path, console: Path, kernel_args: str = "") -> list[str]:
    # cryptomgr.notests: the boot-time crypto self-tests cost ~0.3 s under TCG; rodata=off skips
    # write-protecting the kernel and its W+X scan (~0.2 s). Neither matters in a throwaway VM.
    # tsc=reliable: QEMU's qemu64 vCPUs do not say constant_tsc, so with 2+ of them the kernel
    # guesses the TSCs unsynchronized and keeps time with the HPET: every clock read, in the
    # kernel and in userspace (no vDSO then), becomes an emulated device access. TCG's vCPUs
    # all read the host's TSC, so it is as reliable as on real hardware, where it is the clock.
    append = "console=ttyS0 panic=-1 quiet cryptomgr.notests rodata=off tsc=reliable"
    if devs.pci_nics:
        append += " intel_iommu=on"
    if kernel_args:
        append += " " + kernel_args
    return [
        QEMU, "-nodefaults", "-no-user-config", "-M", "q35", "-accel", "tcg,thread=multi",
        "-m", devs.memory, "-smp", str(devs.smp), "-display", "none", "-monitor", "none",
        "-serial", f"file:{console}", "-no-reboot",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs), "-append", append,
        *_firmware_args(devs.firmware),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={xfer},mount_tag=xfer,security_model=none,multidevs=remap",
        *_nic_args(devs), *devs.extra_qemu,
    ]


class _HostTap:
    """Create the TAP on the host if absent (and bring it up); remove only what we created."""

    def __init__(self, name: str | None) -> None:
        self.name, self.created = name, False

    def __enter__(self) -> "_HostTap":
        if self.name and not Path(f"/sys/class/net/{self.name}").exists():
            _sh(["ip", "tuntap", "add", "dev", self.name, "mode", "tap"], f"ip tuntap add {self.name}",
                TOOL_TIMEOUT, "run as root with /dev/net/tun available")
            self.created = True
            _sh(["ip", "link", "set", self.name, "up"], f"ip link set {self.name} up", TOOL_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.created:
            subprocess.run(["ip", "link", "del", self.name], capture_output=True, timeout=TOOL_TIMEOUT)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty: the kernel boots with 'quiet')"


def _boot(argv: list[str], timeout: float, console: Path) -> float:
    """Run QEMU to power-off; returns seconds. Raises GuestTimeout / GuestError."""
    if not shutil.which(QEMU):
        raise GuestError(f"{QEMU} not found: apt-get install qemu-system-x86")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=QEMU_GRACE)
        con = _read_text(console)
        raise GuestTimeout(f"guest did not finish within {timeout:.0f} s; console tail:\n{_tail(con)}", con) from None
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise GuestError(f"{QEMU} exited with {proc.returncode}: {qemu_out.decode(errors='replace').strip()}")
    return seconds


def run(cmd: list[str] | str, devices: GuestDevices | None = None, timeout: float = 120.0,
        env: dict[str, str] | None = None, *, cwd: str | Path | None = None, image: GuestImage | None = None,
        out_dir: str | Path | None = None, kernel_args: str = "", inherit_env: bool = True) -> GuestResult:
    """Boot the guest, run cmd in it, power off; returns the command's status and output.

    out_dir: host directory used as the writable share (kept; the guest sees it at the same
    path as $UDRV_GUEST_XFER); by default a temporary directory that is removed afterwards.
    """
    devs = devices or GuestDevices()
    image = image or prepare()
    keep = out_dir is not None
    xfer = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="udrv-guest."))
    xfer = xfer.resolve()
    xfer.mkdir(parents=True, exist_ok=True)
    try:
        for stale in ("status", "output", "console.log"):
            (xfer / stale).unlink(missing_ok=True)
        genv = guest_env(env, xfer, inherit_env)
        workdir = Path(cwd) if cwd else Path.cwd()
        (xfer / "cmd.sh").write_text(command_script(cmd, workdir.resolve(), genv, xfer / "output"))
        (xfer / "guest.conf").write_text(
            f"KVER={shlex.quote(image.kver)}\nMODULES_SRC={shlex.quote(str(image.modules_dir))}\n"
            f"XFER_PATH={shlex.quote(str(xfer))}\n")
        console = xfer / "console.log"
        argv = qemu_command(image, devs, xfer, console, kernel_args)
        with _HostTap(devs.tap_ifname):
            seconds = _boot(argv, timeout, console)
        return _collect(xfer, seconds)
    finally:
        if not keep:
            shutil.rmtree(xfer, ignore_errors=True)


def _collect(xfer: Path, seconds: float) -> GuestResult:
    con = _read_text(xfer / "console.log")
    status = _read_text(xfer / "status").strip()
    if not status.isdigit():
        raise GuestError(f"guest powered off without reporting an exit status; console tail:\n{_tail(con)}")
    return GuestResult(returncode=int(status), output=_read_text(xfer / "output"), console=con, seconds=seconds)


# --- helpers for commands that run inside the guest ---------------------------------------

def find_pci_snippet(vendor_device: str = E1000_ID, var: str = "BDF") -> str:
    """Shell: set $var to the first PCI BDF whose vendor:device matches, or exit 3."""
    ven, dev = vendor_device.split(":")
    return (f'{var}=""; for d in /sys/bus/pci/devices/*; do '
            f'if [ "$(cat $d/vendor)" = 0x{ven} ] && [ "$(cat $d/device)" = 0x{dev} ]; then '
            f'{var}=$(basename $d); break; fi; done; '
            f'[ -n "${var}" ] || {{ echo "no PCI device {vendor_device}" >&2; exit 3; }}\n')


def vfio_bind_snippet(vendor_device: str = E1000_ID) -> str:
    """Shell: bind the device to vfio-pci; sets $BDF and $VFIO_GROUP (/dev/vfio/$VFIO_GROUP)."""
    return find_pci_snippet(vendor_device) + (
        'modprobe vfio-pci || exit 4\n'
        '[ -e /sys/bus/pci/devices/$BDF/driver ] && echo $BDF > /sys/bus/pci/devices/$BDF/driver/unbind\n'
        'echo vfio-pci > /sys/bus/pci/devices/$BDF/driver_override\n'
        'echo $BDF > /sys/bus/pci/drivers_probe\n'
        'VFIO_GROUP=$(basename "$(readlink /sys/bus/pci/devices/$BDF/iommu_group)")\n'
        '[ -e /dev/vfio/$VFIO_GROUP ] || { echo "no /dev/vfio/$VFIO_GROUP for $BDF" >&2; exit 5; }\n')


def find_pci_bdf(vendor_device: str = E1000_ID) -> str:
    """Python twin of find_pci_snippet for code already running in the guest."""
    ven, dev = (int(x, 16) for x in vendor_device.split(":"))
    for d in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if int((d / "vendor").read_text(), 16) == ven and int((d / "device").read_text(), 16) == dev:
            return d.name
    raise GuestError(f"no PCI device {vendor_device}: attach it with GuestDevices(e1000=True) or e1000e=True")


def bind_vfio(bdf: str) -> int:
    """Python twin of vfio_bind_snippet (guest only); returns the IOMMU group number."""
    subprocess.run(["modprobe", "vfio-pci"], check=True, timeout=TOOL_TIMEOUT)
    dev = Path("/sys/bus/pci/devices") / bdf
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    (dev / "driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    group = int(os.path.basename(os.readlink(dev / "iommu_group")))
    if not Path(f"/dev/vfio/{group}").exists():
        raise GuestError(f"/dev/vfio/{group} did not appear for {bdf}: is intel_iommu=on and the IOMMU before the NIC?")
    return group


# --- CLI -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="guest.py", description="udrv kernel-tier QEMU guest")
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="fetch and convert the guest kernel (cached)")
    p.add_argument("--refresh", action="store_true", help="ask apt for the current kernel version")
    r = sub.add_parser("run", help="run CMD in the guest; exits with its status")
    r.add_argument("--e1000", action="store_true")
    r.add_argument("--e1000e", action="store_true")
    r.add_argument("--usb-net", action="store_true")
    r.add_argument("--tap", metavar="IFNAME")
    r.add_argument("--memory", default="1024M")
    r.add_argument("--smp", type=int, default=1, help="vCPUs (the USB benches use 2)")
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--console", action="store_true", help="print the serial console to stderr")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        if a.action == "prepare":
            img = prepare(refresh=a.refresh)
            print(json.dumps({k: str(v) for k, v in dataclasses.asdict(img).items()}, indent=1))
            return 0
        cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
        if not cmd:
            ap.error("run needs a command after --")
        devs = GuestDevices(e1000=a.e1000, e1000e=a.e1000e, usb_net=a.usb_net, tap_ifname=a.tap, memory=a.memory,
                            smp=a.smp)
        res = run(cmd, devs, timeout=a.timeout)
    except GuestError as e:
        print(f"guest.py: {e}", file=sys.stderr)
        return 2
    if a.console:
        sys.stderr.write(res.console)
    sys.stdout.write(res.output)
    print(f"[guest: exit {res.returncode}, {res.seconds:.2f} s]", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())

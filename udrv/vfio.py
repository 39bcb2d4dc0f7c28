"""PciTransport over Linux vfio-pci (a real device, or QEMU's behind an emulated IOMMU).

Open sequence (Documentation/driver-api/vfio.rst): container /dev/vfio/vfio -> group
/dev/vfio/<N> (must be viable) -> attach the group to the container -> IOMMU type1v2 (or type1)
-> device fd from the group by BDF -> region info (BAR0 = index 0, config = index 7) -> mmap
BAR0. DMA buffers are memfd pages mapped into the IOMMU with IOMMU_MAP_DMA.

All ioctls go through `_ioctl` (libc's, via ctypes: GROUP_GET_DEVICE_FD returns the new fd as
the ioctl's return value, which `fcntl.ioctl` cannot give back).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from pathlib import Path
from typing import Protocol

from .dma import PAGE, DmaMemory, DmaPool, IovaAllocator, round_up
from .errors import (DeviceBusy, DeviceGone, DeviceNotBound, DmaError, HostSetupError,
                     PermissionDeniedError, UdrvError)
from .pcibind import Sysfs, describe_nonviable, group_members, pci_info
from .pcitransport import (DmaBuffer, DmaMapping, MmioRegion, PciInfo, check_config, check_mmio,
                           update_bus_master)

# --- the ioctl layer ---------------------------------------------------------------------------
VFIO_TYPE = 0x3B                      # ';'


def _io(n: int) -> int:
    return (VFIO_TYPE << 8) | (100 + n)   # _IO(';', 100 + n): no size/direction bits


GET_API_VERSION = _io(0)
CHECK_EXTENSION = _io(1)
SET_IOMMU = _io(2)
GROUP_GET_STATUS = _io(3)
GROUP_SET_CONTAINER = _io(4)
GROUP_GET_DEVICE_FD = _io(6)
DEVICE_GET_INFO = _io(7)
DEVICE_GET_REGION_INFO = _io(8)
DEVICE_RESET = _io(11)
IOMMU_GET_INFO = _io(12)
IOMMU_MAP_DMA = _io(13)
IOMMU_UNMAP_DMA = _io(14)

API_VERSION = 0
TYPE1_IOMMU, TYPE1v2_IOMMU = 1, 3
GROUP_FLAGS_VIABLE = 1 << 0
DEVICE_FLAGS_RESET = 1 << 0
REGION_INFO_FLAG_MMAP = 1 << 2
IOMMU_INFO_PGSIZES, IOMMU_INFO_CAPS = 1 << 0, 1 << 1
IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE = 1 << 0, 1 << 1
PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX = 0, 7

# Keep the first megabyte of IOVA space unmapped so a zero or tiny descriptor address faults.
MIN_IOVA = 0x10_0000


class GroupStatus(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class DeviceInfo(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("num_regions", ctypes.c_uint32),
                ("num_irqs", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class RegionInfo(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("cap_offset", ctypes.c_uint32), ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class IommuType1Info(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("iova_pgsizes", ctypes.c_uint64),
                ("cap_offset", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class DmaMap(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("vaddr", ctypes.c_uint64),
                ("iova", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class DmaUnmap(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("iova", ctypes.c_uint64),
                ("size", ctypes.c_uint64)]


def _new(struct_type, **fields):
    return struct_type(argsz=ctypes.sizeof(struct_type), **fields)


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(2): arg is an int (passed by value), bytes (a C string), a ctypes object (passed
    by reference) or None. Returns the ioctl's return value; raises OSError on -1."""
    if arg is None or isinstance(arg, int):
        carg = ctypes.c_void_p(arg or 0)
    elif isinstance(arg, bytes):
        text = ctypes.create_string_buffer(arg)     # alive until the call returns
        carg = ctypes.byref(text)
    else:
        carg = ctypes.byref(arg)
    ret = _libc_ioctl(fd, request, carg)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


# --- the transport --------------------------------------------------------------------------------

class VfioTransport:
    """A device bound to vfio-pci, opened by `open(bdf)`: container, group and device, DMA
    mapped by this process. A supervised worker holds a `BrokeredVfioTransport` instead."""

    device_writes = None             # counts no writes: every datapath fault restores

    def __init__(self, info: PciInfo, container: int, group: int, device: int):
        self.info = info
        self._container, self._group, self._device = container, group, device
        self._closed = False
        self._bar_mm: mmap.mmap | None = None
        self._bar32: memoryview | None = None
        self._pool = DmaPool()
        self._buffers: dict[int, DmaBuffer] = {}          # iova -> buffer
        self.device_flags = 0
        self.num_regions = 0
        self.num_irqs = 0
        self.iova_pgsizes = 0
        self.iova_ranges: list[tuple[int, int]] = []
        self._iovas: IovaAllocator | None = None

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, bdf: str, *, sysfs: Sysfs | None = None, devfs: str | Path = "/dev") -> "VfioTransport":
        sysfs = sysfs or Sysfs()
        info = pci_info(bdf, sysfs)
        bdf = info.bdf
        if info.iommu_group is None:
            raise HostSetupError(f"{bdf} has no IOMMU group, so the IOMMU is off: boot with intel_iommu=on "
                                 "(or amd_iommu=on) and enable VT-d / AMD-Vi in the firmware")
        if info.driver != "vfio-pci":
            raise DeviceNotBound(f"{bdf} is bound to {info.driver or 'no driver'}, not vfio-pci: run: udrv bind {bdf}")
        vfio_dir = Path(devfs) / "vfio"
        with contextlib.ExitStack() as undo:
            container = _open_node(vfio_dir / "vfio", bdf, container=True)
            undo.callback(os.close, container)
            if _ioctl(container, GET_API_VERSION) != API_VERSION:
                raise HostSetupError("the kernel's VFIO API version is not 0: this udrv cannot drive it; update udrv")
            group = _open_node(vfio_dir / str(info.iommu_group), bdf, container=False)
            undo.callback(os.close, group)
            status = _new(GroupStatus)
            _ioctl(group, GROUP_GET_STATUS, status)
            if not status.flags & GROUP_FLAGS_VIABLE:
                raise HostSetupError(describe_nonviable(info.iommu_group, group_members(info.iommu_group, sysfs)))
            _ioctl(group, GROUP_SET_CONTAINER, ctypes.c_int(container))
            for kind in (TYPE1v2_IOMMU, TYPE1_IOMMU):
                if _ioctl(container, CHECK_EXTENSION, kind) > 0:
                    _ioctl(container, SET_IOMMU, kind)
                    break
            else:
                raise HostSetupError("VFIO offers no type1 IOMMU here: boot with intel_iommu=on (or amd_iommu=on)")
            device = _get_device_fd(group, bdf)
            undo.callback(os.close, device)
            t = cls(info, container, group, device)
            t._setup()
            undo.pop_all()
            return t

    def _setup(self) -> None:
        dinfo = _new(DeviceInfo)
        _ioctl(self._device, DEVICE_GET_INFO, dinfo)
        self.device_flags, self.num_regions, self.num_irqs = dinfo.flags, dinfo.num_regions, dinfo.num_irqs
        self._bar = self._region(PCI_BAR0_REGION_INDEX)
        self._cfg = self._region(PCI_CONFIG_REGION_INDEX)
        if self._bar.size == 0:
            raise UdrvError(f"{self.info.bdf} has no memory BAR0: it is not an e1000-class device")
        if self._bar.flags & REGION_INFO_FLAG_MMAP:
            self._bar_mm = mmap.mmap(self._device, self._bar.size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE, offset=self._bar.offset)
            # A memoryview cast to 'I' makes every access exactly one aligned 32-bit load/store.
            self._bar32 = memoryview(self._bar_mm).cast("I")
        self._iommu_info()
        if self.info.vendor == 0:
            self.info = PciInfo(bdf=self.info.bdf, vendor=self.config_read(0, 2), device=self.config_read(2, 2),
                                subsystem_vendor=self.config_read(0x2C, 2), subsystem_device=self.config_read(0x2E, 2),
                                iommu_group=self.info.iommu_group, driver="vfio-pci")

    def _region(self, index: int) -> RegionInfo:
        r = _new(RegionInfo, index=index)
        _ioctl(self._device, DEVICE_GET_REGION_INFO, r)
        return r

    def _iommu_info(self) -> None:
        info = _new(IommuType1Info)
        _ioctl(self._container, IOMMU_GET_INFO, info)
        self.iova_pgsizes = info.iova_pgsizes if info.flags & IOMMU_INFO_PGSIZES else PAGE
        ranges: list[tuple[int, int]] = []
        if info.flags & IOMMU_INFO_CAPS and info.argsz > ctypes.sizeof(IommuType1Info):
            # Second call with room for the capability chain (usable IOVA ranges).
            raw = ctypes.create_string_buffer(info.argsz)
            hdr = IommuType1Info.from_buffer(raw)
            hdr.argsz = info.argsz
            _ioctl(self._container, IOMMU_GET_INFO, hdr)
            off = hdr.cap_offset
            data = raw.raw
            while off:
                cap_id = int.from_bytes(data[off:off + 2], "little")
                nxt = int.from_bytes(data[off + 4:off + 8], "little")
                if cap_id == IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    count = int.from_bytes(data[off + 8:off + 12], "little")
                    for i in range(count):
                        base = off + 16 + 16 * i
                        ranges.append((int.from_bytes(data[base:base + 8], "little"),
                                       int.from_bytes(data[base + 8:base + 16], "little")))
                off = nxt
        if not ranges:
            ranges = [(0, 0xFEDF_FFFF)]      # below the x86 MSI window
        granule = self.iova_pgsizes & -self.iova_pgsizes or PAGE
        usable = [(max(lo, MIN_IOVA), min(hi, (1 << 48) - 1)) for lo, hi in ranges]
        self.iova_ranges = [(lo, hi) for lo, hi in usable if hi - lo + 1 >= granule]
        self._iovas = IovaAllocator.from_ranges(self.iova_ranges, granule=max(granule, PAGE))

    # --- MMIO and config --------------------------------------------------------------------------
    def _alive(self) -> None:
        if self._closed:
            raise DeviceGone("the VFIO transport is closed: open the device again")

    def read32(self, offset: int) -> int:
        self._alive()
        check_mmio(offset, self._bar.size)
        if self._bar32 is not None:
            return self._bar32[offset >> 2]
        data = os.pread(self._device, 4, self._bar.offset + offset)
        return int.from_bytes(data, "little") if len(data) == 4 else 0xFFFFFFFF

    def write32(self, offset: int, value: int) -> None:
        self._alive()
        check_mmio(offset, self._bar.size)
        if self._bar32 is not None:
            self._bar32[offset >> 2] = value & 0xFFFFFFFF
        else:
            os.pwrite(self._device, (value & 0xFFFFFFFF).to_bytes(4, "little"), self._bar.offset + offset)

    def config_read(self, offset: int, size: int) -> int:
        self._alive()
        check_config(offset, size, self._cfg.size)
        data = os.pread(self._device, size, self._cfg.offset + offset)
        if len(data) != size:
            raise DeviceGone(f"config space of {self.info.bdf} did not answer: the device is gone; re-scan and bind it again")
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._alive()
        check_config(offset, size, self._cfg.size)
        os.pwrite(self._device, value.to_bytes(size, "little"), self._cfg.offset + offset)

    def set_bus_master(self, enabled: bool) -> None:
        update_bus_master(self, enabled)

    # --- DMA ---------------------------------------------------------------------------------------
    def dma_alloc(self, size: int, align: int = PAGE) -> DmaBuffer:
        self._alive()
        assert self._iovas is not None
        mem = self._pool.alloc(size)
        with contextlib.ExitStack() as undo:
            undo.callback(self._pool.free, mem)
            iova = self._iovas.alloc(mem.size, align)
            undo.callback(self._iovas.free, iova)
            m = _new(DmaMap, flags=DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, vaddr=mem.vaddr, iova=iova, size=mem.size)
            try:
                _ioctl(self._container, IOMMU_MAP_DMA, m)
            except OSError as e:
                hint = ("raise the locked-memory limit (ulimit -l unlimited) or run as root"
                        if e.errno == errno.ENOMEM else "check dmesg for the IOMMU's reason")
                raise DmaError(f"IOMMU_MAP_DMA of {mem.size:#x} bytes at IOVA {iova:#x} failed ({e.strerror}): {hint}") from None
            undo.pop_all()
        buf = DmaBuffer(iova=iova, size=size, view=mem.view(size), vaddr=mem.vaddr, fd=mem.fd,
                        hugepage=mem.hugepage, mapped_size=mem.size, memory=mem)
        self._buffers[iova] = buf
        return buf

    def dma_free(self, buf: DmaBuffer) -> None:
        self._check_mapped(buf)
        assert self._iovas is not None
        um = _new(DmaUnmap, iova=buf.iova, size=buf.mapped_size)
        try:
            _ioctl(self._container, IOMMU_UNMAP_DMA, um)
        except OSError as e:
            raise DmaError(f"IOMMU_UNMAP_DMA at IOVA {buf.iova:#x} failed ({e.strerror}): the mapping stays "
                           "until the container is closed") from None
        if um.size != buf.mapped_size:
            raise DmaError(f"the IOMMU unmapped {um.size:#x} of {buf.mapped_size:#x} bytes at IOVA {buf.iova:#x}: "
                           "a mapping made by another process goes away only when the container is closed")
        del self._buffers[buf.iova]
        self._iovas.free(buf.iova)
        buf.view.release()
        self._pool.free(buf.memory)

    def _check_mapped(self, buf: DmaBuffer) -> None:
        if self._buffers.get(buf.iova) is not buf:
            raise DmaError(f"DMA buffer at IOVA {buf.iova:#x} is not mapped by this transport (freed twice?): "
                           "free each buffer once")

    def dma_mappings(self) -> list[DmaMapping]:
        return [DmaMapping(b.iova, b.mapped_size, b.vaddr) for b in sorted(self._buffers.values(), key=lambda b: b.iova)]

    # --- lifecycle -----------------------------------------------------------------------------------
    @property
    def reset_supported(self) -> bool:
        return bool(self.device_flags & DEVICE_FLAGS_RESET)

    def reset(self) -> bool:
        """Bus mastering off first (no DMA through stale mappings), then VFIO_DEVICE_RESET
        (FLR, PM or bus reset: the kernel picks; config space is saved and restored around it).
        Returns False when the device offers no reset."""
        self._alive()
        self.set_bus_master(False)
        if not self.reset_supported:
            return False
        try:
            _ioctl(self._device, DEVICE_RESET)
        except OSError as e:
            raise UdrvError(f"VFIO_DEVICE_RESET of {self.info.bdf} failed ({e.strerror}): "
                            "another device on the same bus/slot may block a bus reset; check dmesg") from None
        return True

    def fds(self) -> dict[str, int]:
        return {"container": self._container, "group": self._group, "device": self._device}

    def poll_fds(self) -> tuple[tuple[int, int], ...]:
        """None: the driver runs without interrupts, the daemon polls its rings."""
        return ()

    def mmio_region(self) -> MmioRegion | None:
        if self._closed:
            return None
        return MmioRegion(fd=self._device, offset=self._bar.offset, size=self._bar.size,
                          mappable=bool(self._bar.flags & REGION_INFO_FLAG_MMAP))

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError, UdrvError):
            self.set_bus_master(False)
        for buf in sorted(self._buffers.values(), key=lambda b: b.iova, reverse=True):
            with contextlib.suppress(DmaError):
                self.dma_free(buf)
        self._pool.close()
        if self._bar32 is not None:
            self._bar32.release()
            self._bar32 = None
        if self._bar_mm is not None:
            self._bar_mm.close()
            self._bar_mm = None
        self._closed = True
        for fd in (self._device, self._group, self._container):
            with contextlib.suppress(OSError):
                os.close(fd)


class DmaBroker(Protocol):
    """Who maps DMA memory for a worker: the supervisor, which holds the container."""
    def alloc(self, size: int, align: int) -> tuple[int, int, int, bool]: ...   # iova, memfd, mapped size, hugepage
    def free(self, iova: int) -> None: ...
    def release_orphans(self) -> int: ...


class BrokeredVfioTransport(VfioTransport):
    """The device as a supervised worker holds it: a dup of the supervisor's device fd (BAR0,
    config space, reset), and DMA memory that the supervisor allocates and maps into the
    IOMMU (the container and group are its own). The mappings outlive this process, so a
    device still DMAing into a dead worker's rings hits mapped pages (no DMAR fault) until the
    successor has programmed rings of its own and calls `release_orphans`."""

    def __init__(self, info: PciInfo, device: int, broker: DmaBroker):
        super().__init__(info, -1, -1, device)
        self._broker = broker

    @classmethod
    def for_worker(cls, device: int, bdf: str, broker: DmaBroker) -> "BrokeredVfioTransport":
        """Takes the fd."""
        try:
            info = pci_info(bdf)
        except UdrvError:
            info = PciInfo(bdf=bdf, vendor=0, device=0, driver="vfio-pci")
        t = cls(info, device, broker)
        try:
            t._setup()
        except BaseException:
            os.close(device)
            raise
        return t

    def _iommu_info(self) -> None:
        pass                          # IOVAs are the supervisor's to hand out

    def dma_alloc(self, size: int, align: int = PAGE) -> DmaBuffer:
        self._alive()
        iova, fd, mapped, huge = self._broker.alloc(size, align)
        mem = DmaMemory.attach(fd, mapped, huge)
        buf = DmaBuffer(iova=iova, size=size, view=mem.view(size), vaddr=mem.vaddr, fd=mem.fd, hugepage=huge,
                        mapped_size=mapped, memory=mem)
        self._buffers[iova] = buf
        return buf

    def dma_free(self, buf: DmaBuffer) -> None:
        self._check_mapped(buf)
        del self._buffers[buf.iova]
        try:
            self._broker.free(buf.iova)
        finally:
            buf.view.release()
            buf.memory.close()

    def release_orphans(self) -> int:
        return self._broker.release_orphans()


def _open_node(path: Path, bdf: str, container: bool) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if container:
            raise HostSetupError(f"{path} does not exist: load vfio-pci: modprobe vfio-pci") from None
        raise DeviceNotBound(f"{path} does not exist, so {bdf} is not bound to vfio-pci: run: udrv bind {bdf}") from None
    except PermissionError:
        raise PermissionDeniedError(f"no permission to open {path}: chown it to your user or run as root") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{path} is in use by another process (VFIO allows one user per group): "
                             f"stop that process (fuser {path}) or use its fds") from None
        raise


def _get_device_fd(group: int, bdf: str) -> int:
    try:
        return _ioctl(group, GROUP_GET_DEVICE_FD, bdf.encode() + b"\0")
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{bdf} is already open through VFIO by another process: stop it or take over its fds") from None
        if e.errno in (errno.ENODEV, errno.EINVAL):
            raise DeviceNotBound(f"VFIO does not know {bdf} in its group: run: udrv bind {bdf}") from None
        raise UdrvError(f"VFIO refused to open {bdf} ({e.strerror}): check dmesg") from None

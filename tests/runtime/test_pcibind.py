"""pcibind against a fake sysfs tree whose writes are played by a tiny fake kernel; the VFIO
transport's setup errors and ioctl layout (the real path needs a guest: see the kernel tier)."""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from udrv import pcibind, vfio
from udrv.errors import DeviceNotBound, DeviceNotFound, HostSetupError, PermissionDeniedError, UdrvError
from udrv.pcibind import Sysfs, bind, list_nics, normalize_bdf, unbind

NIC = "0000:03:00.0"
NIC2 = "0000:04:00.0"
AUDIO = "0000:04:00.1"
DISK = "0000:05:00.0"


class FakeKernel(Sysfs):
    """Plays the kernel's part for the sysfs files pcibind writes."""

    def __init__(self, root: Path, natural: dict[str, str], probe_works: bool = True):
        super().__init__(root)
        self.natural = natural            # bdf -> the driver the kernel would match without override
        self.probe_works = probe_works
        self.writes: list[tuple[str, str]] = []

    def _bind(self, bdf: str, driver: str) -> None:
        link = self.path(f"bus/pci/devices/{bdf}/driver")
        link.symlink_to(f"../../drivers/{driver}")

    def write(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        parts = rel.split("/")
        if parts[-1] == "driver_override":
            self.path(rel).write_text(value.strip() or "(null)")
        elif parts[-1] == "unbind":
            driver, bdf = parts[-2], value
            link = self.path(f"bus/pci/devices/{bdf}/driver")
            assert self.link_name(f"bus/pci/devices/{bdf}/driver") == driver, "unbind from the wrong driver"
            link.unlink()
        elif parts[-1] == "bind":
            self._bind(value, parts[-2])
        elif rel == "bus/pci/drivers_probe":
            bdf = value
            if self.link_name(f"bus/pci/devices/{bdf}/driver") or not self.probe_works:
                return
            override = self.read(f"bus/pci/devices/{bdf}/driver_override")
            want = override if override != "(null)" else self.natural.get(bdf)
            if want and self.exists(f"bus/pci/drivers/{want}"):
                self._bind(bdf, want)
        else:
            raise AssertionError(f"unexpected sysfs write {rel}")


def make_tree(root: Path, *, vfio_loaded: bool = True, iommu: bool = True) -> None:
    """Two NICs (one sharing its group with an audio function), a disk, drivers, groups."""
    devices = {
        NIC: ("0x8086", "0x100e", "0x020000", "e1000", 7),
        NIC2: ("0x8086", "0x10d3", "0x020000", "e1000e", 8),
        AUDIO: ("0x8086", "0x2668", "0x040300", "snd_hda_intel", 8),
        DISK: ("0x144d", "0xa808", "0x010802", "nvme", 9),
    }
    drivers = {"e1000", "e1000e", "snd_hda_intel", "nvme", "pcieport"} | ({"vfio-pci"} if vfio_loaded else set())
    for d in drivers:
        (root / "bus/pci/drivers" / d).mkdir(parents=True)
    (root / "bus/pci/drivers_probe").write_text("")
    (root / "kernel/iommu_groups").mkdir(parents=True)
    for bdf, (ven, dev, cls, drv, group) in devices.items():
        d = root / "bus/pci/devices" / bdf
        d.mkdir(parents=True)
        for name, val in (("vendor", ven), ("device", dev), ("class", cls),
                          ("subsystem_vendor", "0x8086"), ("subsystem_device", "0x001e"),
                          ("driver_override", "(null)")):
            (d / name).write_text(val + "\n")
        (d / "driver").symlink_to(f"../../drivers/{drv}")
        if iommu:
            g = root / "kernel/iommu_groups" / str(group) / "devices"
            g.mkdir(parents=True, exist_ok=True)
            (g / bdf).symlink_to(f"../../../../bus/pci/devices/{bdf}")
            (d / "iommu_group").symlink_to(f"../../../../kernel/iommu_groups/{group}")


@pytest.fixture
def kernel(tmp_path):
    make_tree(tmp_path / "sys")
    return FakeKernel(tmp_path / "sys", natural={NIC: "e1000", NIC2: "e1000e", AUDIO: "snd_hda_intel"})


@pytest.fixture
def state(tmp_path):
    return tmp_path / "run-udrv"


def test_normalize_bdf():
    assert normalize_bdf("03:00.0") == "0000:03:00.0"
    assert normalize_bdf("0000:0A:1f.7") == "0000:0a:1f.7"
    with pytest.raises(ValueError, match="0000:03:00.0"):
        normalize_bdf("3:0.0")


def test_list_nics_reports_driver_group_and_viability(kernel):
    nics = list_nics(kernel)
    assert [n.bdf for n in nics] == [NIC, NIC2]                 # the disk and audio device are not NICs
    e1000, e1000e = nics
    assert (e1000.info.ident, e1000.info.driver, e1000.info.iommu_group) == ("8086:100e", "e1000", 7)
    assert e1000.class_code == 0x020000
    assert e1000.group_members == ((NIC, "e1000"),)
    # A group is viable only if every member is on vfio-pci, a stub, a bridge, or nothing:
    # e1000 in group 7 is not (yet), e1000e shares group 8 with an audio function.
    assert e1000.group_viable is False
    assert e1000e.group_viable is False
    assert e1000e.group_members == ((NIC2, "e1000e"), (AUDIO, "snd_hda_intel"))


def test_bind_moves_the_device_to_vfio_and_remembers_the_driver(kernel, state):
    after = bind("03:00.0", sysfs=kernel, state_dir=state)
    assert kernel.writes == [
        (f"bus/pci/devices/{NIC}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/e1000/unbind", NIC),
        ("bus/pci/drivers_probe", NIC),
    ]
    assert after.info.driver == "vfio-pci"
    assert after.group_viable is True
    assert json.loads((state / f"{NIC}.json").read_text()) == {"bdf": NIC, "original_driver": "e1000"}


def test_bind_is_idempotent(kernel, state):
    bind(NIC, sysfs=kernel, state_dir=state)
    kernel.writes.clear()
    assert bind(NIC, sysfs=kernel, state_dir=state).info.driver == "vfio-pci"
    assert kernel.writes == []
    assert json.loads((state / f"{NIC}.json").read_text())["original_driver"] == "e1000"


def test_bind_reports_a_group_that_is_still_not_viable(kernel, state):
    after = bind(NIC2, sysfs=kernel, state_dir=state)
    assert after.info.driver == "vfio-pci"
    assert after.group_viable is False
    msg = pcibind.describe_nonviable(8, list(after.group_members))
    assert msg == ("every device in IOMMU group 8 must be bound to vfio-pci or unbound: "
                   f"bind or unbind {AUDIO} (snd_hda_intel)")


def test_unbind_restores_the_original_driver(kernel, state):
    bind(NIC, sysfs=kernel, state_dir=state)
    kernel.writes.clear()
    after = unbind(NIC, sysfs=kernel, state_dir=state)
    assert kernel.writes == [
        (f"bus/pci/devices/{NIC}/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", NIC),
        ("bus/pci/drivers/e1000/bind", NIC),
    ]
    assert after.info.driver == "e1000"
    assert kernel.read(f"bus/pci/devices/{NIC}/driver_override") == "(null)"
    assert not (state / f"{NIC}.json").exists()


def test_unbind_without_state_lets_the_kernel_choose(kernel, state):
    # Someone else put the device on vfio-pci: udrv does not know the original driver.
    kernel.write(f"bus/pci/devices/{NIC}/driver_override", "vfio-pci")
    kernel.write("bus/pci/drivers/e1000/unbind", NIC)
    kernel.write("bus/pci/drivers_probe", NIC)
    kernel.writes.clear()
    after = unbind(NIC, sysfs=kernel, state_dir=state)
    assert kernel.writes[-1] == ("bus/pci/drivers_probe", NIC)
    assert after.info.driver == "e1000"


def test_a_device_that_had_no_driver_goes_back_to_none(kernel, state):
    kernel.write("bus/pci/drivers/e1000/unbind", NIC)
    kernel.writes.clear()
    bind(NIC, sysfs=kernel, state_dir=state)
    assert ("bus/pci/drivers/e1000/unbind", NIC) not in kernel.writes
    after = unbind(NIC, sysfs=kernel, state_dir=state)
    assert after.info.driver is None
    assert ("bus/pci/drivers_probe", NIC) not in kernel.writes[-2:]


def test_failed_restore_keeps_the_state_for_a_retry(kernel, state):
    bind(NIC, sysfs=kernel, state_dir=state)
    os.rmdir(kernel.path("bus/pci/drivers/e1000"))                 # e1000 module unloaded meanwhile
    kernel.probe_works = False
    with pytest.raises(UdrvError, match=f"did not go back to e1000.*modprobe e1000 and then udrv unbind {NIC}"):
        unbind(NIC, sysfs=kernel, state_dir=state)
    assert (state / f"{NIC}.json").exists()


def test_bind_that_the_kernel_ignores_is_reported(kernel, state):
    kernel.probe_works = False
    with pytest.raises(UdrvError, match=f"did not bind to vfio-pci.*udrv unbind {NIC}"):
        bind(NIC, sysfs=kernel, state_dir=state)


def test_no_such_device(kernel, state):
    with pytest.raises(DeviceNotFound, match="no PCI device 0000:09:00.0: list network devices with `udrv list`"):
        bind("09:00.0", sysfs=kernel, state_dir=state)


def test_vfio_pci_not_loaded_changes_nothing(tmp_path, state):
    make_tree(tmp_path / "sys", vfio_loaded=False)
    k = FakeKernel(tmp_path / "sys", natural={NIC: "e1000"})
    with pytest.raises(HostSetupError, match="^the vfio-pci driver is not loaded: run modprobe vfio-pci$"):
        bind(NIC, sysfs=k, state_dir=state)
    assert k.writes == [] and not state.exists()
    assert k.link_name(f"bus/pci/devices/{NIC}/driver") == "e1000"


def test_no_iommu_groups(tmp_path, state):
    make_tree(tmp_path / "sys", iommu=False)
    k = FakeKernel(tmp_path / "sys", natural={})
    assert list_nics(k)[0].group_viable is None
    with pytest.raises(HostSetupError, match="no IOMMU groups.*intel_iommu=on"):
        bind(NIC, sysfs=k, state_dir=state)
    assert k.writes == []


def test_not_root_on_the_real_sysfs(monkeypatch, state):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionDeniedError, match="run udrv as root"):
        bind(NIC, sysfs=Sysfs("/sys"), state_dir=state)


def test_refused_sysfs_write_is_explained(tmp_path):
    s = Sysfs(tmp_path)
    with pytest.raises(UdrvError, match="the kernel refused 'x'.*check dmesg"):
        s.write("no/such/dir/file", "x")


# --- VFIO setup errors (no vfio on this host: the fake tree stands in) ------------------------------

def test_vfio_open_refuses_a_device_not_on_vfio_pci(kernel, tmp_path):
    with pytest.raises(DeviceNotBound, match=f"bound to e1000, not vfio-pci: run: udrv bind {NIC}"):
        vfio.VfioTransport.open(NIC, sysfs=kernel, devfs=tmp_path / "dev")


def test_vfio_open_without_the_vfio_module(kernel, state, tmp_path):
    bind(NIC, sysfs=kernel, state_dir=state)
    (tmp_path / "dev").mkdir()
    with pytest.raises(HostSetupError, match="load vfio-pci: modprobe vfio-pci"):
        vfio.VfioTransport.open(NIC, sysfs=kernel, devfs=tmp_path / "dev")


def test_vfio_open_without_iommu(tmp_path):
    make_tree(tmp_path / "sys", iommu=False)
    with pytest.raises(HostSetupError, match="intel_iommu=on"):
        vfio.VfioTransport.open(NIC, sysfs=Sysfs(tmp_path / "sys"), devfs=tmp_path / "dev")


def test_vfio_ioctl_numbers_and_structs_match_the_uapi():
    assert (vfio.GET_API_VERSION, vfio.CHECK_EXTENSION, vfio.SET_IOMMU) == (0x3B64, 0x3B65, 0x3B66)
    assert (vfio.GROUP_GET_STATUS, vfio.GROUP_SET_CONTAINER, vfio.GROUP_GET_DEVICE_FD) == (0x3B67, 0x3B68, 0x3B6A)
    assert (vfio.DEVICE_GET_INFO, vfio.DEVICE_GET_REGION_INFO, vfio.DEVICE_RESET) == (0x3B6B, 0x3B6C, 0x3B6F)
    assert (vfio.IOMMU_GET_INFO, vfio.IOMMU_MAP_DMA, vfio.IOMMU_UNMAP_DMA) == (0x3B70, 0x3B71, 0x3B72)
    assert [ctypes.sizeof(s) for s in (vfio.GroupStatus, vfio.RegionInfo, vfio.DmaMap, vfio.DmaUnmap)] == [8, 32, 32, 24]
    assert vfio.RegionInfo.size.offset == 16 and vfio.DmaMap.iova.offset == 16


def test_ioctl_layer_returns_values_and_raises_errno():
    import termios
    r, w = os.pipe()
    try:
        os.write(w, b"abcde")
        n = ctypes.c_int()
        assert vfio._ioctl(r, termios.FIONREAD, n) == 0 and n.value == 5
        with pytest.raises(OSError) as e:
            vfio._ioctl(r, vfio.GET_API_VERSION)
        assert e.value.errno == 25                     # ENOTTY: a pipe is no VFIO container
    finally:
        os.close(r)
        os.close(w)

"""Build the C fast path `udrv._native` with cffi (out-of-line API mode).

Conventions (so a new C file joins without touching this script):
  * every `native/*.c` is compiled into the one extension module;
  * every `native/*.cdef` holds the cffi declarations Python may call; they are read in
    name order, and for `native/NAME.cdef` the module includes `native/NAME.h` if it exists;
  * everything links against libusb-1.0 (the same shared library python-libusb1 loads).
Constants in a .cdef are best written `#define NAME ...` so the value comes from the header.

Used by setup.py (`cffi_modules=["native/build.py:ffibuilder"]`, run by `pip install -e .` /
`pip install .`; cffi writes its generated C into the setuptools build directory), or by hand:

    python3 native/build.py        # builds into native/_build/, copies the .so into udrv/
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from cffi import FFI

MODULE = "udrv._native"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_DIR = os.path.join(HERE, "_build")
_ABSOLUTE = False   # cffi's own compile() changes directory: it needs absolute paths
LIBUSB_HEADER = "libusb.h"


def _rel(path: str) -> str:
    """Paths relative to the working directory when possible (setuptools prefers them)."""
    if _ABSOLUTE:
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def c_sources() -> list[str]:
    return [_rel(p) for p in sorted(glob.glob(os.path.join(HERE, "*.c")))]


def cdef_files() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.cdef")))


def headers_for_cdefs() -> list[str]:
    out = []
    for cdef in cdef_files():
        header = cdef[:-len(".cdef")] + ".h"
        if os.path.exists(header):
            out.append(os.path.basename(header))
    return out


def libusb_flags() -> tuple[list[str], list[str], list[str]]:
    """(include dirs, library dirs, libraries) for libusb-1.0: pkg-config, else Debian's paths."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags-only-I", "libusb-1.0"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.split()
        libs = subprocess.run(["pkg-config", "--libs", "libusb-1.0"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.split()
        incs = [f[2:] for f in cflags if f.startswith("-I")]
        libdirs = [f[2:] for f in libs if f.startswith("-L")]
        names = [f[2:] for f in libs if f.startswith("-l")] or ["usb-1.0"]
        return incs, libdirs, names
    except (OSError, subprocess.SubprocessError):
        return ["/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0"], [], ["usb-1.0"]


def find_libusb_header(include_dirs: list[str]) -> str | None:
    for d in include_dirs + ["/usr/include/libusb-1.0", "/usr/local/include/libusb-1.0"]:
        p = os.path.join(d, LIBUSB_HEADER)
        if os.path.exists(p):
            return p
    return None


def make_ffibuilder() -> FFI:
    ffi = FFI()
    for path in cdef_files():
        with open(path) as f:
            ffi.cdef(f.read())
    include_dirs, library_dirs, libraries = libusb_flags()
    source = "".join(f'#include "{h}"\n' for h in headers_for_cdefs())
    ffi.set_source(
        MODULE, source,
        sources=c_sources(),
        include_dirs=[_rel(HERE)] + include_dirs,
        library_dirs=library_dirs,
        libraries=libraries + ["m"],   # sqrt: CoDel's control law (journal.c)
        depends=[_rel(p) for p in sorted(glob.glob(os.path.join(HERE, "*.h")))],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
    )
    return ffi


ffibuilder = make_ffibuilder()


def main() -> int:
    """Developer build without pip: compile in native/_build and drop the .so into udrv/."""
    global _ABSOLUTE
    _ABSOLUTE = True
    os.makedirs(BUILD_DIR, exist_ok=True)
    built = make_ffibuilder().compile(tmpdir=BUILD_DIR, verbose=True)
    dest = os.path.join(ROOT, "udrv", os.path.basename(built))
    for old in glob.glob(os.path.join(ROOT, "udrv", "_native.*.so")):
        os.unlink(old)      # another build's name (pip makes an abi3 .so) would shadow or be shadowed
    shutil.copy2(built, dest)
    print(f"built {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

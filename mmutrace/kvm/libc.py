"""libc through ctypes: ioctl, mmap, munmap, madvise.

ctypes' ``CDLL`` drops the GIL around every foreign call, so a ``KVM_RUN`` on one vCPU thread does
not stop the other vCPU threads (or the host thread) from running Python.
"""

from __future__ import annotations

import ctypes
import os

from mmutrace.errors import HostError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 4, 14, 15
_MAP_FAILED = ctypes.c_void_p(-1).value


class SyscallError(HostError):
    """A libc call failed; ``errno`` lets callers handle EINTR or EINVAL without parsing text."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what} failed: {os.strerror(err)} (errno {err})")
        self.errno = err


def _raise(what: str) -> None:
    raise SyscallError(what, ctypes.get_errno())


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array | None = None, what: str = "") -> int:
    """ioctl(2); a struct argument is passed by reference.  Raises HostError naming ``what``."""
    if isinstance(arg, (ctypes.Structure, ctypes.Array)):
        arg = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        _raise(what or f"ioctl {request:#x}")
    return ret


def mmap(length: int, prot: int, flags: int, fd: int = -1, what: str = "mmap") -> int:
    addr = _libc.mmap(None, length, prot, flags, fd, 0)
    if addr in (None, _MAP_FAILED):
        _raise(what)
    return addr


def munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        _raise("munmap")


def madvise(addr: int, length: int, advice: int, what: str = "madvise") -> None:
    if _libc.madvise(addr, length, advice) != 0:
        _raise(what)

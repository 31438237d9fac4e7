"""Host memory that backs guest memory: anonymous mappings with a numpy view.

The host builds page tables and command buffers through the numpy view (fast bulk writes);
KVM sees the same bytes through the memslot's ``userspace_addr``.
"""

from __future__ import annotations

import ctypes

import numpy as np

from mmutrace.kvm import libc

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20


class HostMemory:
    """One anonymous private mapping, 2 MiB aligned, optionally advised for transparent huge pages.

    ``u8``/``u64`` are numpy views of the whole mapping; ``hva`` is its host virtual address.
    Alignment to 2 MiB lets a 2M guest mapping be backed by one host huge page.  ``thp``: True asks
    for huge pages (MADV_HUGEPAGE), False forbids them (MADV_NOHUGEPAGE), None leaves the host's
    policy (/sys/kernel/mm/transparent_hugepage/enabled: "madvise" here, "always" in Debian's
    stock kernels, so in the nested lab's L1).
    """

    def __init__(self, size: int, *, thp: bool | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size {size} is not a positive multiple of {PAGE_SIZE}")
        self.size = size
        # Over-allocate and align the start so THP can back 2M-aligned guest ranges.
        self._map_len = size + HUGE_PAGE_SIZE
        self._map_addr = libc.mmap(self._map_len, libc.PROT_READ | libc.PROT_WRITE,
                                   libc.MAP_PRIVATE | libc.MAP_ANONYMOUS)
        self.hva = -(-self._map_addr // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        if thp is not None:
            advice, what = (libc.MADV_HUGEPAGE, "MADV_HUGEPAGE") if thp else (libc.MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
            libc.madvise(self.hva, self.size, advice, what=f"madvise({what})")
        buf = (ctypes.c_uint8 * self.size).from_address(self.hva)
        self.u8 = np.ctypeslib.as_array(buf)
        self.u64 = self.u8.view(np.uint64)

    def discard(self, offset: int, length: int) -> None:
        """madvise(MADV_DONTNEED): drop the host pages, so KVM's MMU notifier zaps their SPTEs."""
        libc.madvise(self.hva + offset, length, libc.MADV_DONTNEED, what="madvise(MADV_DONTNEED)")

    def close(self) -> None:
        if self._map_addr:
            del self.u8, self.u64
            libc.munmap(self._map_addr, self._map_len)
            self._map_addr = 0

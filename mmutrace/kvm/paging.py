"""x86-64 4-level guest page tables, built by the host in guest memory.

The guest runs at CPL3, so every level carries U/S=1 and R/W=1: the guest can read and write
everything it maps, including the page-table pages themselves (``pt_rewrite`` needs that).  A and D
start clear so the shadow MMU's walker sets them (``kvm_mmu_set_accessed_bit`` /
``kvm_mmu_set_dirty_bit``).
"""

from __future__ import annotations

import enum

import numpy as np

from mmutrace.kvm.memory import HUGE_PAGE_SIZE, PAGE_SIZE

PT_ENTRIES = 512
PT64_ADDR_MASK = 0x000F_FFFF_FFFF_F000


class Pte(enum.IntFlag):
    """Guest PTE bits (the names of arch/x86/include/asm/pgtable_types.h, without _PAGE_)."""

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PSE = 1 << 7  # a 2M leaf in a PDE
    NX = 1 << 63


#: The bits of every entry the harness writes, table or leaf.
PTE_USER_RW = Pte.PRESENT | Pte.RW | Pte.USER


def pt_index(gva: int, level: int) -> int:
    """Index into the level-``level`` table (1 = PT ... 4 = PML4) for ``gva``."""
    return (gva >> (12 + 9 * (level - 1))) & (PT_ENTRIES - 1)


class PageTablePool:
    """Page-table pages handed out from one guest-physical range of host-visible memory.

    ``u64`` is the numpy view of the memory holding the range (starting at guest physical
    ``base``); pages come back zeroed, i.e. all entries not present.
    """

    def __init__(self, u64: np.ndarray, base: int, start: int, end: int) -> None:
        self.u64, self.base, self.next, self.end = u64, base, start, end

    def alloc(self) -> int:
        if self.next + PAGE_SIZE > self.end:
            raise MemoryError(f"page-table pool exhausted at {self.end:#x}: size the pool larger")
        gpa, self.next = self.next, self.next + PAGE_SIZE
        self.table(gpa)[:] = 0
        return gpa

    def table(self, gpa: int) -> np.ndarray:
        """The 512 entries of the table page at ``gpa`` (a writable numpy view)."""
        i = (gpa - self.base) // 8
        return self.u64[i:i + PT_ENTRIES]


class AddressSpace:
    """One page-table tree (one CR3 value); ``map`` fills in identity or arbitrary mappings."""

    def __init__(self, pool: PageTablePool) -> None:
        self.pool = pool
        self.cr3 = pool.alloc()

    def _table_for(self, gva: int, level: int) -> np.ndarray:
        """The level-``level`` table covering ``gva``, allocating the missing tables above it."""
        table_gpa = self.cr3
        for upper in range(4, level, -1):
            table = self.pool.table(table_gpa)
            i = pt_index(gva, upper)
            if not int(table[i]) & Pte.PRESENT:
                table[i] = self.pool.alloc() | int(PTE_USER_RW)
            table_gpa = int(table[i]) & PT64_ADDR_MASK
        return self.pool.table(table_gpa)

    def map(self, gva: int, gpa: int, size: int, huge: bool = False) -> None:
        """Map [gva, gva+size) to [gpa, ...) with 4K PTEs, or 2M PDEs when ``huge``."""
        step = HUGE_PAGE_SIZE if huge else PAGE_SIZE
        if gva % step or gpa % step or size % step:
            raise ValueError(f"mapping {gva:#x}->{gpa:#x}+{size:#x} is not {step:#x}-aligned")
        level, leaf_bits = (2, PTE_USER_RW | Pte.PSE) if huge else (1, PTE_USER_RW)
        done = 0
        while done < size:
            va = gva + done
            first = pt_index(va, level)
            count = min(PT_ENTRIES - first, (size - done) // step)
            table = self._table_for(va, level)
            frames = gpa + done + np.arange(count, dtype=np.uint64) * np.uint64(step)
            table[first:first + count] = frames | np.uint64(int(leaf_bits))
            done += count * step

    def pte_gpa(self, gva: int, level: int = 1) -> int:
        """Guest physical address of the level-``level`` entry that maps ``gva`` (must exist)."""
        table_gpa = self.cr3
        for upper in range(4, level, -1):
            entry = int(self.pool.table(table_gpa)[pt_index(gva, upper)])
            if not entry & Pte.PRESENT:
                raise ValueError(f"{gva:#x} has no level-{upper - 1} table")
            table_gpa = entry & PT64_ADDR_MASK
        return table_gpa + 8 * pt_index(gva, level)



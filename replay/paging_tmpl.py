"""The guest page-table walker, FNAME(walk_addr_generic) of paging_tmpl.h, for PTTYPE 64.

The kernel compiles paging_tmpl.h once per guest PTE type; ``PtType`` is that table of constants
(only 64-bit/PAE-64 entries are modelled: every built-in scenario runs in long mode).  The walk is fed
the guest PTEs the trace carries (``kvm_mmu_paging_element``, one per level, in walk order) and
predicts the walker's decisions: which guest A/D bits it sets (``kvm_mmu_set_accessed_bit`` /
``kvm_mmu_set_dirty_bit``, in the order of FNAME(update_accessed_dirty_bits)) or the #PF error code
it injects (``kvm_mmu_walker_error``), plus what FNAME(fetch) needs: table gfns, per-level access,
the leaf level and gfn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from replay.role import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK
from replay.spte import PAGE_SHIFT

PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4



@dataclass(frozen=True)
class PtType:
    """The FNAME() constants of one guest PTE type."""

    name: str
    pte_size: int
    index_bits: int
    nx_shift: int | None
    accessed_mask: int
    dirty_mask: int
    present_mask: int
    writable_mask: int
    user_mask: int
    page_size_mask: int
    base_addr_mask: int


PTTYPE_64 = PtType("paging64", pte_size=8, index_bits=9, nx_shift=63, accessed_mask=1 << 5, dirty_mask=1 << 6,
                   present_mask=1 << 0, writable_mask=1 << 1, user_mask=1 << 2, page_size_mask=1 << 7,
                   base_addr_mask=((1 << 52) - 1) & ~0xFFF)


@dataclass(frozen=True)
class CpuRole:
    """The parts of the vCPU's paging state (kvm_cpu_role) the walker's checks read."""

    root_level: int = 4
    efer_nx: bool = True
    cr0_wp: bool = True
    cr4_smep: bool = False
    cr4_smap: bool = False
    #: Guest MAXPHYADDR (KVM's default CPUID gives 36 when userspace sets none).
    maxphyaddr: int = 52
    gbpages: bool = True


class GuestWalker:
    """struct guest_walker: what the walk found, indexed by level-1 like the kernel's arrays.

    A plain slotted class (one is made per guest walk; a dataclass's factories cost more than
    the walk itself).
    """

    __slots__ = ("level", "max_level", "gfn", "pte_access", "table_gfn", "ptes", "pt_access", "pte_gpa",
                 "ad_writes", "fault_error_code", "truncated", "prefetch_ptes")

    def __init__(self, level: int = 0, max_level: int = 0) -> None:
        self.level = level
        self.max_level = max_level
        self.gfn = 0
        self.pte_access = 0
        self.table_gfn = [0, 0, 0, 0, 0]
        self.ptes = [0, 0, 0, 0, 0]
        self.pt_access = [0, 0, 0, 0, 0]
        self.pte_gpa = [0, 0, 0, 0, 0]
        #: Guest A/D writes in trace order: ("kvm_mmu_set_accessed_bit" | "kvm_mmu_set_dirty_bit", gpa).
        self.ad_writes: list[tuple[str, int]] = []
        #: The #PF error code injected (kvm_mmu_walker_error), or None when the walk succeeded.
        self.fault_error_code: int | None = None
        #: The trace held fewer PTEs than the walk reads (e.g. a lost event): the walk is undecidable.
        self.truncated = False
        #: The 8-aligned group of leaf gptes FNAME(fetch) reads for FNAME(pte_prefetch) (None: unknown).
        self.prefetch_ptes: list[int | None] = []


def gpte_to_gfn_lvl(pt: PtType, gpte: int, level: int) -> int:
    """The gfn a guest PTE points at, with the low bits of a huge leaf cleared for its level."""
    mask = pt.base_addr_mask & ~((1 << (PAGE_SHIFT + (level - 1) * pt.index_bits)) - 1)
    return (gpte & mask) >> PAGE_SHIFT


def gpte_access(pt: PtType, gpte: int) -> int:
    """FNAME(gpte_access): W/U straight from the PTE, exec from P xor NX (ACC_EXEC_MASK == P)."""
    access = gpte & (pt.writable_mask | pt.user_mask | pt.present_mask)
    if pt.nx_shift is not None:
        access ^= (gpte >> pt.nx_shift) & 1
    return access


def is_rsvd_bits_set(rsvd_bits_mask: tuple[tuple[int, int], ...], pt: PtType, gpte: int, level: int) -> bool:
    """FNAME(is_rsvd_bits_set): the level's mask for a table entry or a huge leaf (bit 7)."""
    return bool(gpte & rsvd_bits_mask[level][bool(gpte & pt.page_size_mask)])


def rsvds_bits_mask(pt: PtType, role: CpuRole) -> tuple[tuple[int, int], ...]:
    """The reserved-bit masks of ``role``: the last role's are kept by identity (hashing the two
    frozen dataclasses for the lru_cache costs more than a walk's level), else looked up."""
    global _last_rsvds
    if _last_rsvds[0] is pt and _last_rsvds[1] is role:
        return _last_rsvds[2]
    masks = reset_rsvds_bits_mask(pt, role)
    _last_rsvds = (pt, role, masks)
    return masks


@functools.lru_cache(maxsize=16)
def reset_rsvds_bits_mask(pt: PtType, role: CpuRole) -> tuple[tuple[int, int], ...]:
    """Reserved bits per level, [level][huge] (__reset_rsvds_bits_mask precomputes them per MMU):
    high PA bits, NX without EFER.NX, PS where illegal, the frame bits below a huge page."""
    masks = [(0, 0)]
    for level in range(1, 6):
        rsvd = ((1 << 52) - 1) & ~((1 << role.maxphyaddr) - 1)
        if not role.efer_nx:
            rsvd |= 1 << 63
        if level >= 4 or (level == 3 and not role.gbpages):
            rsvd |= pt.page_size_mask
        huge = rsvd
        if level in (2, 3):
            huge |= ((1 << (PAGE_SHIFT + (level - 1) * pt.index_bits)) - 1) & ~0x1FFF  # above PAT bit 12
        masks.append((rsvd, huge))
    return tuple(masks)


_last_rsvds: tuple[PtType | None, CpuRole | None, tuple[tuple[int, int], ...]] = (None, None, ())


def permission_fault(role: CpuRole, pte_access: int, access: int) -> bool:
    """permission_fault() for the fault kinds a CPL3 or emulator walk can ask for (no PKU)."""
    user = bool(access & PFERR_USER_MASK)
    if access & PFERR_WRITE_MASK and not pte_access & ACC_WRITE_MASK and (user or role.cr0_wp):
        return True
    if user and not pte_access & ACC_USER_MASK:
        return True
    if access & PFERR_FETCH_MASK:
        if role.efer_nx and not pte_access & ACC_EXEC_MASK:
            return True
        if not user and role.cr4_smep and pte_access & ACC_USER_MASK:
            return True
    if not user and role.cr4_smap and pte_access & ACC_USER_MASK and not access & PFERR_FETCH_MASK:
        return True
    return False


def walk_addr_generic(pt: PtType, role: CpuRole, root_gfn: int, addr: int, access: int,
                      ptes: list[int]) -> GuestWalker:
    """FNAME(walk_addr_generic) over the traced PTEs ``ptes`` (root level first).

    ``root_gfn`` is CR3's table (the gfn of the vCPU's shadow root): the trace's PTEs only name the
    tables below it.
    """
    w = GuestWalker(level=role.root_level, max_level=role.root_level)
    write_fault = access & PFERR_WRITE_MASK
    user_fault = access & PFERR_USER_MASK
    fetch_fault = access & PFERR_FETCH_MASK
    nx_mask = 1 << pt.nx_shift if pt.nx_shift is not None else 0
    rsvd_bits_mask = rsvds_bits_mask(pt, role)
    pte_access = ~0
    errcode = 0
    level = role.root_level + 1
    it = iter(ptes)
    table_gfn = root_gfn
    pte = 0
    # The loop runs once per guest PTE of every fault: gpte_to_gfn_lvl(pte, 1), is_rsvd_bits_set,
    # the kernel's gpte_access and is_last_gpte are inlined below on these per-type constants.
    index_mask = (1 << pt.index_bits) - 1
    present_mask, page_size_mask, base_addr_mask = pt.present_mask, pt.page_size_mask, pt.base_addr_mask
    access_bits = pt.writable_mask | pt.user_mask | pt.present_mask
    nx_shift = pt.nx_shift if pt.nx_shift is not None else 64  # no NX bit: the shift reads 0
    table_ptes, table_gfns, pte_gpas, pt_accesses = w.ptes, w.table_gfn, w.pte_gpa, w.pt_access
    while True:
        pt_access = pte_access
        level -= 1
        index = (addr >> (PAGE_SHIFT + (level - 1) * pt.index_bits)) & index_mask
        if level < role.root_level:
            table_gfn = (pte & base_addr_mask) >> PAGE_SHIFT
        table_gfns[level - 1] = table_gfn
        pte_gpas[level - 1] = (table_gfn << PAGE_SHIFT) + index * pt.pte_size
        try:
            pte = next(it)
        except StopIteration:
            w.truncated = True
            return w
        pte_access = pt_access & (pte ^ nx_mask)
        if not pte & present_mask:
            return _error(w, role, errcode, write_fault, user_fault, fetch_fault)
        if pte & rsvd_bits_mask[level][bool(pte & page_size_mask)]:
            return _error(w, role, PFERR_RSVD_MASK | PFERR_PRESENT_MASK, write_fault, user_fault, fetch_fault)
        table_ptes[level - 1] = pte
        gpte = (pt_access ^ nx_mask) & ((1 << 64) - 1)
        pt_accesses[level - 1] = (gpte & access_bits) ^ ((gpte >> nx_shift) & 1)
        if level == 1 or pte & page_size_mask:
            break
    w.level = level
    accessed_dirty = pte_access & pt.accessed_mask
    w.pte_access = gpte_access(pt, (pte_access ^ nx_mask) & ((1 << 64) - 1))
    if permission_fault(role, w.pte_access, access):
        return _error(w, role, PFERR_PRESENT_MASK, write_fault, user_fault, fetch_fault)
    w.gfn = gpte_to_gfn_lvl(pt, pte, level) + ((addr & ((1 << (PAGE_SHIFT + (level - 1) * pt.index_bits)) - 1)) >> PAGE_SHIFT)
    if not write_fault:
        w.pte_access = protect_clean_gpte(pt, w.pte_access, pte)
    else:
        accessed_dirty &= pte >> 1  # fold D (bit 6) onto A (bit 5)
    if not accessed_dirty:
        update_accessed_dirty_bits(pt, w, bool(write_fault))
    return w


def protect_clean_gpte(pt: PtType, access: int, gpte: int) -> int:
    """FNAME(protect_clean_gpte): map a clean guest page read-only so the first write sets D."""
    if not gpte & pt.dirty_mask:
        access &= ~ACC_WRITE_MASK
    return access


def prefetch_invalid_gpte(pt: PtType, role: CpuRole, gpte: int) -> bool:
    """FNAME(prefetch_invalid_gpte): only present, accessed leaf gptes without reserved bits are
    prefetched (PT_HAVE_ACCESSED_DIRTY is true for PTTYPE 64)."""
    if not gpte & pt.present_mask:
        return True
    if not gpte & pt.accessed_mask:
        return True
    return is_rsvd_bits_set(rsvds_bits_mask(pt, role), pt, gpte, 1)


def update_accessed_dirty_bits(pt: PtType, w: GuestWalker, write_fault: bool) -> None:
    """FNAME(update_accessed_dirty_bits): A on every level lacking it (root first), D on the leaf."""
    for level in range(w.max_level, w.level - 1, -1):
        pte = w.ptes[level - 1]
        gpa = w.pte_gpa[level - 1]
        if not pte & pt.accessed_mask:
            w.ad_writes.append(("kvm_mmu_set_accessed_bit", gpa))
            pte |= pt.accessed_mask
        if level == w.level and write_fault and not pte & pt.dirty_mask:
            w.ad_writes.append(("kvm_mmu_set_dirty_bit", gpa))
            pte |= pt.dirty_mask
        w.ptes[level - 1] = pte


def _error(w: GuestWalker, role: CpuRole, errcode: int, write_fault: int, user_fault: int,
           fetch_fault: int) -> GuestWalker:
    errcode |= write_fault | user_fault
    if fetch_fault and (role.efer_nx or role.cr4_smep):
        errcode |= PFERR_FETCH_MASK
    w.fault_error_code = errcode
    return w

"""SPTE encodings and predicates (arch/x86/kvm/mmu/spte.h, spte.c), per flavour and kernel version.

The flavour (EPT or the non-EPT layout used by legacy shadow paging, NPT and this host's PVM backend)
is fixed at module load; the non-present value changed between 6.1 (0) and 6.12 (bit 63, TDX prep).
``make_spte`` returns the new value and whether it had to write-protect, like the kernel's; it takes
the unsync decision as a callback so that shadow_mmu.py owns ``mmu_try_to_unsync_pages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from replay.role import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK

PAGE_SHIFT = 12
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT
SHADOW_ACC_TRACK_SAVED_BITS_MASK = 0x5
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54


@dataclass(frozen=True)
class SpteFlavor:
    """The shadow_*_mask globals of one flavour (spte.c: kvm_mmu_reset_all_pte_masks / set_ept_masks)."""

    name: str
    present_mask: int
    user_mask: int
    x_mask: int
    nx_mask: int
    accessed_mask: int
    dirty_mask: int
    host_writable_mask: int
    mmu_writable_mask: int
    acc_track_mask: int


#: Legacy shadow paging, AMD NPT and PVM (kvm_mmu_reset_all_pte_masks).
NON_EPT = SpteFlavor("non-ept", present_mask=PT_PRESENT_MASK, user_mask=PT_USER_MASK, x_mask=0,
                     nx_mask=1 << 63, accessed_mask=PT_ACCESSED_MASK, dirty_mask=PT_DIRTY_MASK,
                     host_writable_mask=1 << 9, mmu_writable_mask=1 << 10, acc_track_mask=0)
#: Intel EPT with A/D bits (kvm_mmu_set_ept_masks); 6.12+ also sets bit 63 (suppress #VE) as present.
EPT = SpteFlavor("ept", present_mask=1 << 0, user_mask=1 << 0, x_mask=1 << 2, nx_mask=0,
                 accessed_mask=1 << 8, dirty_mask=1 << 9, host_writable_mask=1 << 57,
                 mmu_writable_mask=1 << 58, acc_track_mask=0x7)


def is_shadow_present_pte(spte: int) -> bool:
    """Bit 11 is KVM's own "present": MMIO, frozen and non-present values all have it clear."""
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == 1 or is_large_pte(spte)


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def spte_ad_enabled(spte: int) -> bool:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def mark_spte_for_access_track(flavor: SpteFlavor, spte: int) -> int:
    """Prefetched SPTEs start "not accessed": clear A, or save R/X and clear RWX without A/D."""
    if spte_ad_enabled(spte):
        return spte & ~flavor.accessed_mask
    saved = (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    return (spte & ~flavor.acc_track_mask) | saved


@dataclass(frozen=True)
class SpteRules:
    """Version-dependent make_spte details (see replay.versions for where each comes from)."""

    #: 6.18: A is set when ``!prefetch || synchronizing``; 6.1/6.12: when ``!prefetch``.
    accessed_when_synchronizing: bool
    #: 6.1/6.12 skip the D bit when the old SPTE was already writable (``goto out``); 6.18 sets it.
    dirty_when_old_writable: bool
    #: 6.18 skips the unsync lookup only for a writable *leaf* old SPTE; 6.1/6.12 for any writable one.
    old_writable_needs_leaf: bool


def make_spte(flavor: SpteFlavor, rules: SpteRules, *, level: int, ad_disabled: bool, pte_access: int,
              pfn: int, old_spte: int, prefetch: bool, synchronizing: bool, host_writable: bool,
              nx_huge_pages: bool, try_to_unsync: Callable[[], bool]) -> tuple[int, bool]:
    """make_spte(): the leaf SPTE for ``pfn`` with ``pte_access``; returns (spte, wrprot).

    ``try_to_unsync()`` is mmu_try_to_unsync_pages for this gfn and returns True when it refused
    (the SPTE must then be write-protected).  It is called only where the kernel calls it, because
    the call itself has side effects (kvm_unsync_page).
    """
    spte = SPTE_MMU_PRESENT_MASK | (SPTE_TDP_AD_DISABLED if ad_disabled else 0)
    spte |= flavor.present_mask
    accessed_mask = 0 if ad_disabled else flavor.accessed_mask
    dirty_mask = 0 if ad_disabled else flavor.dirty_mask
    if not prefetch or (rules.accessed_when_synchronizing and synchronizing):
        spte |= accessed_mask
    if level > 1 and pte_access & ACC_EXEC_MASK and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    spte |= flavor.x_mask if pte_access & ACC_EXEC_MASK else flavor.nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= flavor.user_mask
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= flavor.host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << PAGE_SHIFT
    wrprot = False
    if pte_access & ACC_WRITE_MASK:
        old_writable = is_writable_pte(old_spte) and (
            not rules.old_writable_needs_leaf or (is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level)))
        if old_writable:
            spte |= PT_WRITABLE_MASK | flavor.mmu_writable_mask
            if rules.dirty_when_old_writable:
                spte |= dirty_mask
        elif try_to_unsync():
            wrprot = True
        else:
            spte |= PT_WRITABLE_MASK | flavor.mmu_writable_mask | dirty_mask
    if prefetch and not (rules.accessed_when_synchronizing and synchronizing):
        spte = mark_spte_for_access_track(flavor, spte)
    return spte, wrprot


def spte_write_protect(flavor: SpteFlavor, spte: int, pt_protect: bool) -> int:
    """spte_write_protect(): clear W, and MMU-writable too when protecting for a shadowed gfn."""
    if pt_protect:
        spte &= ~flavor.mmu_writable_mask
    return spte & ~PT_WRITABLE_MASK

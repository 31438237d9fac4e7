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
#: REMOVED_SPTE (6.1) / FROZEN_SPTE (6.12+, which also has bit 63, the non-present value): 0x5a0.
#: A TDP walker skips it; an MMIO value must never match it.
REMOVED_SPTE_LOW = 0x5A0
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


# ---------------------------------------------------------------------------------------- MMIO SPTEs

#: KVM_PFN_NOSLOT (kvm_host.h): the pfn kvm_faultin_pfn reports for a gfn no memslot backs (MMIO).
KVM_PFN_NOSLOT = 1 << 63
#: The memslot generation's 19 low bits live in SPTE bits 3-10 (gen 0-7) and 52-62 (gen 8-18).
MMIO_SPTE_GEN_LOW_MASK = ((1 << 11) - 1) & ~((1 << 3) - 1)
MMIO_SPTE_GEN_HIGH_MASK = ((1 << 63) - 1) & ~((1 << 52) - 1)
MMIO_SPTE_GEN_LOW_BITS = 8
MMIO_SPTE_GEN_LOW_SHIFT = 3
MMIO_SPTE_GEN_HIGH_SHIFT = 52 - MMIO_SPTE_GEN_LOW_BITS
MMIO_SPTE_GEN_MASK = (1 << 19) - 1
#: Bits an MMIO value/mask may use: they must not overlap the generation or bit 11 (spte.h).
SPTE_MMIO_ALLOWED_MASK = (1 << 63) | (((1 << 52) - 1) & ~((1 << 12) - 1)) | 0x7
#: The MMIO value of kvm_mmu_reset_all_pte_masks: a reserved physical-address bit (51) plus
#: present, so that a guest access faults with PFERR_RSVD (only when MAXPHYADDR < 52).
MMIO_RSVD_PA_VALUE = (1 << 51) | PT_PRESENT_MASK


def is_noslot_pfn(pfn: int | None) -> bool:
    return pfn is not None and pfn == KVM_PFN_NOSLOT


@dataclass(frozen=True)
class MmioSpteMasks:
    """enable_mmio_caching and shadow_mmio_value/_mask/_access_mask, as kvm_mmu_set_mmio_spte_mask
    leaves them.  ``nonpresent_or_rsvd_mask`` (the L1TF gfn relocation) is 0 on CPUs without
    X86_BUG_L1TF: every AMD CPU, so every kvm_amd trace; a kvm_intel L1TF host would need its
    cache-address width, which no trace records."""

    enable_mmio_caching: bool
    value: int
    mask: int
    access_mask: int
    nonpresent_or_rsvd_mask: int = 0


def kvm_mmu_set_mmio_spte_mask(allow_mmio_caching: bool, mmio_value: int, mmio_mask: int, access_mask: int,
                               removed_spte: int) -> MmioSpteMasks:
    """The kernel's rules: caching is off when the module parameter says so, or when the value is 0
    (no reserved bit to fault on), leaves the allowed bits, or would match a removed SPTE."""
    if not allow_mmio_caching or mmio_mask & ~SPTE_MMIO_ALLOWED_MASK:
        mmio_value = 0
    if (mmio_value & mmio_mask) != mmio_value or (mmio_value and (removed_spte & mmio_mask) == mmio_value):
        mmio_value = 0
    return MmioSpteMasks(enable_mmio_caching=bool(mmio_value), value=mmio_value, mask=mmio_mask,
                         access_mask=access_mask)


def kvm_mmu_reset_all_pte_masks_mmio(allow_mmio_caching: bool, maxphyaddr_below_52: bool,
                                     removed_spte: int) -> MmioSpteMasks:
    """The non-EPT MMIO masks: bit 51 + present when the host has a reserved PA bit, else none."""
    mask = MMIO_RSVD_PA_VALUE if maxphyaddr_below_52 else 0
    return kvm_mmu_set_mmio_spte_mask(allow_mmio_caching, mask, mask, ACC_WRITE_MASK | ACC_USER_MASK, removed_spte)


def generation_mmio_spte_mask(gen: int) -> int:
    mask = (gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK
    return mask | ((gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK)


def make_mmio_spte(masks: MmioSpteMasks, generation: int, gfn: int, access: int) -> int:
    """make_mmio_spte(): generation bits, the MMIO value, the cached access, the gpa."""
    spte = generation_mmio_spte_mask(generation & MMIO_SPTE_GEN_MASK)
    gpa = gfn << PAGE_SHIFT
    spte |= masks.value | (access & masks.access_mask)
    spte |= gpa | masks.nonpresent_or_rsvd_mask
    return spte | ((gpa & masks.nonpresent_or_rsvd_mask) << 5)


def is_mmio_spte(masks: MmioSpteMasks, spte: int) -> bool:
    return (spte & masks.mask) == masks.value and masks.enable_mmio_caching


def get_mmio_spte_generation(spte: int) -> int:
    gen = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_SHIFT
    return gen | ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT)


def get_mmio_spte_gfn(masks: MmioSpteMasks, spte: int) -> int:
    """The kernel masks with bits 12..MAXPHYADDR-1 (shadow_nonpresent_or_rsvd_lower_gfn_mask); the
    MMIO value's reserved bit lies above MAXPHYADDR, and nothing else sits between them."""
    lower_gfn_mask = SPTE_BASE_ADDR_MASK & ~masks.value & ~masks.nonpresent_or_rsvd_mask
    gpa = spte & lower_gfn_mask
    gpa |= (spte >> 5) & masks.nonpresent_or_rsvd_mask
    return gpa >> PAGE_SHIFT


def get_mmio_spte_access(masks: MmioSpteMasks, spte: int) -> int:
    return spte & masks.access_mask


def mark_mmio_spte_access(spte: int) -> int:
    """What the mark_mmio_spte tracepoint records as ``access``: the SPTE's low 3 bits (ACC_ALL)."""
    return spte & 0x7

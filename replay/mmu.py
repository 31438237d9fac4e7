"""The common MMU (mmu.c after the RFC's split): fault entry, dispatch, memslots, quota, zap entry points.

``KvmMmu`` is one VM's ``struct kvm_arch`` MMU state plus the functions of mmu.c that stay common
after "KVM: x86/MMU: Formalize the Shadow MMU".  It reaches the two MMUs only through
``ShadowMmuApi`` (shadow_mmu_api.py) and ``TdpMmuApi`` (tdp_mmu_api.py), and chooses between them in
one visible place, ``kvm_mmu_do_page_fault``, like ``kvm_tdp_page_fault`` does.  The RFC's patch 9
is ``Split``: before it, every direct (TDP) fault also called ``make_mmu_pages_available``.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from mmutrace.errors import MmutraceError
from mmutrace.kvm.uapi import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
                               KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES)
from replay.decisions import Decision, Tracepoints
from replay.guest_memory import GuestMemory
from replay.paging_tmpl import (PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK,
                                PFERR_WRITE_MASK, CpuRole, GuestWalker)
from replay.shadow_mmu_api import ShadowMmuApi
from replay.spte import (MMIO_SPTE_GEN_MASK, REMOVED_SPTE_LOW, MmioSpteMasks, get_mmio_spte_access, get_mmio_spte_gfn,
                         get_mmio_spte_generation, is_mmio_spte, kvm_mmu_reset_all_pte_masks_mmio, make_mmio_spte,
                         mark_mmio_spte_access)
from replay.tdp_mmu_api import TdpMmuApi
from replay.versions import Split, VersionRules

KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO = 50
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
BITS_PER_LONG = 64
#: PML_LOG_NR_ENTRIES (vmx): kvm_x86_ops.cpu_dirty_log_size when kvm_intel's enable_pml is on.
PML_LOG_NR_ENTRIES = 512
LONG_MASK = (1 << BITS_PER_LONG) - 1

R_MANUAL_PROTECT = "KVM_ENABLE_CAP untraced: whether KVM_GET_DIRTY_LOG write-protects (manual protect) is unknown"
R_CLEAR_MASK = "KVM_CLEAR_DIRTY_LOG mask untraced (or longer than the recorder reads)"
R_INITIALLY_SET = "KVM_DIRTY_LOG_INITIALLY_SET harvest (huge-page write-protect and split) is not modelled"
R_PML = "dirty-log harvest with PML: the pages the PML buffer logged are untraced"

#: x86 has two memslot address spaces (normal, SMM: CONFIG_KVM_SMM, set in Debian's 6.1 and 6.12):
#: each keeps its own generation and every update steps it by 2 (kvm_swap_active_memslots).
KVM_ADDRESS_SPACE_NUM = 2

# Undecidable reasons of the MMIO path (docs/undecidable.md).
R_MEMSLOT_GEN = "memslot generation unknown: KVM_CREATE_VM is not in the trace (tracefs, or a capture started later)"
R_MEMSLOT_GEN_FAILED = "memslot generation unknown: a KVM_SET_USER_MEMORY_REGION failed part-way"
R_MMIO_SPTE_UNKNOWN = "MMIO fault on an SPTE the model lost (changed by an untraced path)"

#: Upstream defaults of the kvm module parameters this host adds; any other value makes the
#: decisions it could change undecidable (docs/undecidable.md).
NON_UPSTREAM_PARAM_DEFAULTS: dict[str, str] = {
    "eager_zap_unsync_children": "N",
    "flush_on_reuse": "N",
    "kick_only_root_holders": "N",
    "parent_ptes_recycle_threshold": "1000",
    "mmu_lock_park_kernel": "N",
    "mmu_lock_spinners": "0",
    "mmu_lock_poll_us": "0",
}


X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_CR4_LA57 = 1 << 12
X86_CR4_SMEP = 1 << 20
X86_CR4_SMAP = 1 << 21
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
CR3_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def kvm_calc_cpu_role(rules: VersionRules, cr0: int, cr4: int, efer: int) -> tuple[int, CpuRole]:
    """kvm_calc_cpu_role + kvm_init_shadow_mmu: the shadow root role word and the walker's view.

    The root role is the CPU role with level at least 3 (PAE shadow for 32-bit guests) and efer_nx
    forced on (KVM uses NX for its own purposes when TDP is off).
    """
    layout = rules.role_layout
    word = layout.set(0, "access", 7)
    if not cr0 & X86_CR0_PG:
        return layout.set(word, "direct", 1), CpuRole(root_level=0)
    wp = bool(cr0 & X86_CR0_WP)
    level = (5 if cr4 & X86_CR4_LA57 else 4) if efer & EFER_LMA else (3 if cr4 & X86_CR4_PAE else 2)
    for name, value in (("cr0_wp", wp), ("smep_andnot_wp", bool(cr4 & X86_CR4_SMEP) and not wp),
                        ("smap_andnot_wp", bool(cr4 & X86_CR4_SMAP) and not wp),
                        ("has_4_byte_gpte", not cr4 & X86_CR4_PAE), ("level", max(level, 3)), ("efer_nx", 1)):
        word = layout.set(word, name, int(value))
    cpu_role = CpuRole(root_level=level, efer_nx=bool(efer & EFER_NX), cr0_wp=wp,
                       cr4_smep=bool(cr4 & X86_CR4_SMEP), cr4_smap=bool(cr4 & X86_CR4_SMAP))
    return word, cpu_role


@dataclass
class Memslot:
    """struct kvm_memory_slot as KVM_SET_USER_MEMORY_REGION left it."""

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    #: dirty_bitmap, bit i = page base_gfn + i; None without KVM_MEM_LOG_DIRTY_PAGES.
    dirty_bitmap: int | None = None

    def hva_to_gfn_range(self, start: int, end: int) -> tuple[int, int] | None:
        """The gfns [first, last) whose hva overlaps [start, end), or None (kvm_handle_hva_range)."""
        lo = max(start, self.userspace_addr)
        hi = min(end, self.userspace_addr + (self.npages << 12))
        if lo >= hi:
            return None
        return self.base_gfn + ((lo - self.userspace_addr) >> 12), self.base_gfn + ((hi - 1 - self.userspace_addr) >> 12) + 1


@dataclass
class KvmPageFault:
    """struct kvm_page_fault: arguments, fields derived from error_code, and outputs, kept apart."""

    # arguments
    addr: int
    error_code: int
    prefetch: bool = False
    is_tdp: bool = False
    # outputs of the walk / kvm_mmu_faultin_pfn / kvm_mmu_hugepage_adjust
    gfn: int = 0
    max_level: int = 3
    req_level: int = 1
    goal_level: int = 1
    pfn: int | None = None
    map_writable: bool | None = None
    slot: Memslot | None = None
    huge_page_disallowed: bool = False
    write_fault_to_shadow_pgtable: bool = False
    #: is_page_fault_stale(): an mmu_notifier invalidation hit a memslot after the fault began.
    stale: bool = False
    #: The guest walk FNAME(page_fault) did (the engine judges its A/D writes as it completes).
    walker: GuestWalker | None = None
    #: Inputs the trace did not carry, by name -> why: decisions depending on them are undecidable.
    unknown: dict[str, str] = field(default_factory=dict)

    @property
    def write(self) -> bool:
        return bool(self.error_code & PFERR_WRITE_MASK)

    @property
    def present(self) -> bool:
        return bool(self.error_code & PFERR_PRESENT_MASK)

    @property
    def user(self) -> bool:
        return bool(self.error_code & PFERR_USER_MASK)

    @property
    def exec(self) -> bool:
        return bool(self.error_code & PFERR_FETCH_MASK)

    @property
    def rsvd(self) -> bool:
        return bool(self.error_code & PFERR_RSVD_MASK)


@dataclass(frozen=True)
class FaultIn:
    """Where a fault waits for kvm_mmu_faultin_pfn's results (traced with kvm_mmu_spte_requested)."""

    gfn: int


@dataclass(frozen=True)
class FaultInResult:
    """The inputs kvm_mmu_spte_requested carries: pfn always; the rest only from the recorder."""

    pfn: int
    map_writable: bool | None
    #: The host-side cap on the mapping level (recorder's req_level), None when untraced.
    req_level: int | None
    #: The level the kernel chose, used only to adopt it when the model cannot decide.
    recorded_level: int


@dataclass
class VcpuMmu:
    """A vCPU's ``struct kvm_mmu`` (root_mmu): roots, root role, and the guest paging state it walks with."""

    id: int
    root: Any = None  # a ShadowPage (shadow MMU) or the TDP model's root
    #: Root role word, when known (from KVM_SET_SREGS, or adopted from the first root the kernel made).
    root_role: int | None = None
    cpu_role: CpuRole = field(default_factory=CpuRole)
    #: CR3's gfn, when known: the root table of guest walks.
    root_gfn: int | None = None
    #: prev_roots: cached (pgd gfn, root) pairs for fast_pgd_switch, most recent first.
    prev_roots: list[tuple[int, Any]] = field(default_factory=list)
    #: KVM_REQ_MMU_FREE_OBSOLETE_ROOTS / unloaded root: the next run reloads.
    needs_load: bool = True
    #: CR0/CR3/CR4/EFER came from a traced KVM_SET_SREGS (else the root role is adopted).
    sregs_known: bool = False
    #: The last MMIO access (vcpu->arch.mmio_gva/gfn/access/gen): a hit emulates with no event.
    mmio_gva: int = 0
    mmio_gfn: int = 0
    mmio_access: int = 0
    #: The memslot update count when cached (stands for the generation: only equality is tested).
    mmio_gen: int = 0
    #: Why the cache's content is unknown (None: known): an access before the trace, a lost SPTE,
    #: an exit that may have cleared it.  The next access that fills it makes it known again.
    mmio_info_unknown: str | None = None

    def vcpu_cache_mmio_info(self, gva: int, gfn: int, access: int, gen: int) -> None:
        """x86.h vcpu_cache_mmio_info (the in-progress skip cannot happen: updates are atomic here)."""
        self.mmio_gva, self.mmio_access, self.mmio_gfn, self.mmio_gen = gva & ~0xFFF, access, gfn, gen
        self.mmio_info_unknown = None

    def vcpu_clear_mmio_info(self) -> None:
        """vcpu_clear_mmio_info(vcpu, MMIO_GVA_ANY): roots unloaded or synced, CR3 switched.  Only the
        gva goes: a direct root's gpa match still sees mmio_gfn."""
        self.mmio_gva = 0

    def vcpu_match_mmio_gva(self, gva: int, gen: int) -> bool:
        return self.mmio_gen == gen and bool(self.mmio_gva) and self.mmio_gva == gva & ~0xFFF

    def vcpu_match_mmio_gpa(self, gpa: int, gen: int) -> bool:
        return self.mmio_gen == gen and bool(self.mmio_gfn) and self.mmio_gfn == gpa >> 12


@dataclass
class KvmArch:
    """The MMU fields of ``struct kvm_arch`` both MMUs read."""

    rules: VersionRules
    tp: Tracepoints
    n_used_mmu_pages: int = 0
    #: None while the quota is unknown (no memslot / KVM_SET_NR_MMU_PAGES input in the trace).
    n_max_mmu_pages: int | None = None
    n_requested_mmu_pages: int = 0
    mmu_valid_gen: int = 0
    memslots: dict[int, Memslot] = field(default_factory=dict)
    #: False when the trace carries no memslot layout (imported tracefs text).
    memslots_known: bool = False
    kvm_params: dict[str, str] = field(default_factory=dict)
    nx_huge_pages: bool = False
    #: Timestamp of the event being replayed (what "before this fault" means across vCPUs).
    now_ns: int = 0
    #: pfn of the host's shared zero page (trace metadata ``zero_pfn``), None when not recorded.
    zero_pfn: int | None = None
    #: The guest PTEs and host pages the trace revealed (PTE prefetch reads them).
    guest: GuestMemory = field(default_factory=GuestMemory)
    #: kvm->mmu_invalidate_in_progress at the fault's mmu_lock section: None when the trace cannot
    #: tell (an invalidation started and its thread has not been seen since; only starts are traced).
    mmu_invalidate_in_progress: bool | None = False
    #: kvm->manual_dirty_log_protect (KVM_ENABLE_CAP's args[0]); None when the trace cannot tell
    #: (the recorder did not trace KVM_ENABLE_CAP).
    manual_dirty_log_protect: int | None = None
    #: kvm_x86_ops.cpu_dirty_log_size: PML entries (kvm_intel enable_pml), 0 without PML (AMD, PVM).
    cpu_dirty_log_size: int = 0

    def mark_page_dirty_in_slot(self, gfn: int) -> None:
        """kvm_main.c: a page of a dirty-logged slot became writable (make_spte, fast_page_fault)."""
        slot = self.gfn_to_memslot(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            slot.dirty_bitmap |= 1 << (gfn - slot.base_gfn)

    def kvm_dirty_log_manual_protect_and_init_set(self) -> bool:
        return bool((self.manual_dirty_log_protect or 0) & KVM_DIRTY_LOG_INITIALLY_SET)

    #: enable_mmio_caching and the MMIO SPTE masks (from the recorded kvm parameter).
    mmio: MmioSpteMasks = field(init=False)
    #: Address space 0's memslots->generation; None while unknown (``generation_unknown`` says why).
    memslots_generation: int | None = None
    generation_unknown: str = R_MEMSLOT_GEN
    #: Memslot updates replayed (kvm_swap_active_memslots calls): what a cached MMIO access's
    #: generation is compared by, known even when the generation itself is not.
    memslot_updates: int = 0

    def __post_init__(self) -> None:
        self.kvm_mmu_reset_all_pte_masks()

    def kvm_mmu_reset_all_pte_masks(self) -> None:
        """The MMIO part: the recorded ``mmio_caching`` is the kernel's enable_mmio_caching after its
        own rules (it writes the result back), so on means the host had a reserved PA bit for it."""
        allow = str(self.kvm_params.get("mmio_caching", "N")).upper().startswith("Y")
        self.mmio = kvm_mmu_reset_all_pte_masks_mmio(allow, maxphyaddr_below_52=allow,
                                                     removed_spte=self.rules.nonpresent_spte | REMOVED_SPTE_LOW)

    def mmio_generation_unknown(self) -> str | None:
        """Why the generation an MMIO SPTE embeds is unknown, or None."""
        return None if self.memslots_generation is not None else self.generation_unknown

    def make_mmio_spte(self, gfn: int, access: int) -> int:
        """make_mmio_spte() with this VM's generation.  While it is unknown the SPTE carries 0 there:
        check_mmio_spte then never compares it (an unknown generation stays unknown)."""
        return make_mmio_spte(self.mmio, self.memslots_generation or 0, gfn, access)

    def trace_mark_mmio_spte(self, gfn: int, spte: int, twin: str, subject: Any = None) -> None:
        """The mark_mmio_spte tracepoint (gfn, the SPTE's low bits, its generation)."""
        values = {"gfn": gfn, "access": mark_mmio_spte_access(spte), "gen": get_mmio_spte_generation(spte)}
        self.tp.emit(Decision("mark_mmio_spte", values, twin, self.mmio_generation_unknown(), subject=subject))

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self.memslots.values():
            if slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                return slot
        return None

    def gfn_to_memslot_dirty_bitmap(self, gfn: int, no_dirty_log: bool) -> Memslot | None:
        """The gfn's slot, or None when there is none or a write would have to be dirty-logged."""
        slot = self.gfn_to_memslot(gfn)
        if slot is None or (no_dirty_log and slot.flags & KVM_MEM_LOG_DIRTY_PAGES):
            return None
        return slot

    def non_default_params(self) -> dict[str, str]:
        """Non-upstream kvm parameters set to something other than their upstream behaviour."""
        return {k: v for k, v in self.kvm_params.items()
                if k in NON_UPSTREAM_PARAM_DEFAULTS and v != NON_UPSTREAM_PARAM_DEFAULTS[k]}


def bitmap_words(bitmap: int, first: int, npages: int) -> list[tuple[int, int]]:
    """(first page, word) of each non-zero 64-page word of ``bitmap`` over pages [first, first + npages)."""
    return [(offset, word) for offset in range(first, first + npages, BITS_PER_LONG)
            if (word := (bitmap >> offset) & LONG_MASK)]


def kvm_handle_noslot_fault(arch: KvmArch, vcpu: VcpuMmu, fault: KvmPageFault, access: int) -> bool:
    """kvm_faultin_pfn on a gfn without a memslot (6.1: handle_abnormal_pfn): cache the access;
    True = emulate now, with no MMIO SPTE (mmio_caching off; a gfn above MAXPHYADDR would too, which
    only a guest lied to about MAXPHYADDR makes)."""
    vcpu.vcpu_cache_mmio_info(0 if fault.is_tdp else fault.addr, fault.gfn, access & arch.mmio.access_mask,
                              arch.memslot_updates)
    return not arch.mmio.enable_mmio_caching


class KvmMmu:
    """One VM's MMU: common mmu.c code dispatching to the shadow and TDP MMUs."""

    def __init__(self, arch: KvmArch, shadow: ShadowMmuApi, tdp: TdpMmuApi | None, split: Split,
                 tdp_mmu_enabled: bool) -> None:
        self.arch = arch
        self.shadow = shadow
        self.tdp = tdp
        self.split = split
        self.tdp_mmu_enabled = tdp_mmu_enabled
        self.vcpus: dict[int, VcpuMmu] = {}

    # ---- vCPUs

    def vcpu(self, vcpu_id: int) -> VcpuMmu:
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is None:
            vcpu = self.vcpus[vcpu_id] = VcpuMmu(vcpu_id)
            vcpu.mmio_info_unknown = None if self.arch.memslots_generation is not None else R_MEMSLOT_GEN
        return vcpu

    def root_role_direct(self, vcpu: VcpuMmu) -> bool:
        """vcpu->arch.mmu->root_role.direct: TDP roots, and shadow roots of non-paging guests."""
        if self.tdp_mmu_enabled:
            return True
        role = vcpu.root_role if vcpu.root_role is not None else getattr(vcpu.root, "role", None)
        return role is not None and bool(self.arch.rules.role_layout.get(role, "direct"))

    # ---- faults

    def kvm_mmu_page_fault(self, vcpu: VcpuMmu, fault: KvmPageFault) -> Generator[FaultIn, Any, int | str]:
        """kvm_mmu_page_fault(): an RSVD fault (an MMIO SPTE hit) goes to handle_mmio_page_fault
        first; a stale generation ("invalid") continues as a normal fault."""
        ret: int | str = "invalid"
        if fault.rsvd:
            ret = self.handle_mmio_page_fault(vcpu, fault.addr, self.root_role_direct(vcpu))
        if ret == "invalid":
            ret = yield from self.kvm_mmu_do_page_fault(vcpu, fault)
        return ret

    # ---- MMIO SPTEs (mmu.c; the SPTE encoding is replay.spte's)

    def mmio_info_in_cache(self, vcpu: VcpuMmu, addr: int, direct: bool) -> bool | None:
        """None when the cache may hold an access from before the trace."""
        if vcpu.mmio_info_unknown is not None:
            return None
        gen = self.arch.memslot_updates
        return vcpu.vcpu_match_mmio_gpa(addr, gen) if direct else vcpu.vcpu_match_mmio_gva(addr, gen)

    def get_mmio_spte(self, vcpu: VcpuMmu, addr: int) -> int | None:
        """The last SPTE of a lockless walk for ``addr`` (None: the model lost its value)."""
        if self.tdp is not None and self.tdp_mmu_enabled:
            return self.tdp.kvm_tdp_mmu_get_walk(vcpu, addr)
        return self.shadow.get_walk(vcpu, addr)

    def check_mmio_spte(self, spte: int) -> bool | None:
        """The SPTE's generation against the memslots' (None: the memslots' is unknown)."""
        if self.arch.memslots_generation is None:
            return None
        return (self.arch.memslots_generation & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)

    def handle_mmio_page_fault(self, vcpu: VcpuMmu, addr: int, direct: bool) -> str:
        """A cached access emulates silently; a current MMIO SPTE emulates with the event and fills
        the cache; a stale one is "invalid" (a normal fault follows); anything else is "retry"."""
        cached = self.mmio_info_in_cache(vcpu, addr, direct)
        if cached:
            return "emulate"
        spte = self.get_mmio_spte(vcpu, addr)
        if spte is None:
            self.arch.tp.emit(Decision("handle_mmio_page_fault", {"addr": 0 if direct else addr},
                                       "handle_mmio_page_fault", R_MMIO_SPTE_UNKNOWN))
            vcpu.mmio_info_unknown = R_MMIO_SPTE_UNKNOWN  # cached or not, as the lost SPTE was MMIO or not
            return "emulate"
        if not is_mmio_spte(self.arch.mmio, spte):
            return "retry"
        gfn, access = get_mmio_spte_gfn(self.arch.mmio, spte), get_mmio_spte_access(self.arch.mmio, spte)
        valid = self.check_mmio_spte(spte)
        if valid is False:
            return "invalid"
        if direct:
            addr = 0
        reason = self.arch.generation_unknown if valid is None else vcpu.mmio_info_unknown
        self.arch.tp.emit(Decision("handle_mmio_page_fault", {"addr": addr, "gfn": gfn, "access": access},
                                   "handle_mmio_page_fault", reason))
        vcpu.vcpu_cache_mmio_info(addr, gfn, access, self.arch.memslot_updates)
        return "emulate"

    def kvm_mmu_do_page_fault(self, vcpu: VcpuMmu, fault: KvmPageFault) -> Generator[FaultIn, Any, int]:
        """The one place that picks an MMU: TDP MMU for direct roots when enabled, else the shadow MMU.

        Before RFC patch 9 (``Split.PRE``) the common direct-fault path also made MMU pages available
        for TDP MMU faults; after it only the shadow MMU's fault path does.
        """
        if fault.is_tdp and self.tdp_mmu_enabled:
            if self.tdp is None:
                raise MmutraceError("this trace has TDP MMU faults and no TDP MMU model is installed "
                                    "(replay/tdp_mmu.py); the trace's MMU is tdp_mmu=Y")
            if self.split is Split.PRE:
                self.shadow.make_mmu_pages_available(vcpu)
            return (yield from self.tdp.kvm_tdp_mmu_page_fault(vcpu, fault))
        return (yield from self.shadow.kvm_shadow_mmu_page_fault(vcpu, fault))

    # ---- vCPU paging state and roots

    def kvm_set_sregs(self, vcpu: VcpuMmu, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """__set_sregs: any change of CR0/CR3/CR4/EFER resets the MMU context (kvm_mmu_reset_context
        unloads every root); the next KVM_RUN loads a root for the new CR3 and role."""
        role, cpu_role = kvm_calc_cpu_role(self.arch.rules, cr0, cr4, efer)
        root_gfn = (cr3 & CR3_ADDR_MASK) >> 12
        if (vcpu.root_role, vcpu.root_gfn, vcpu.cpu_role) == (role, root_gfn, cpu_role) and vcpu.sregs_known:
            return
        vcpu.root_role, vcpu.root_gfn, vcpu.cpu_role, vcpu.sregs_known = role, root_gfn, cpu_role, True
        self.kvm_mmu_reset_context(vcpu)

    def kvm_mmu_reset_context(self, vcpu: VcpuMmu) -> None:
        """kvm_mmu_unload: free the current and the cached previous roots (mmu_free_root_page puts a
        TDP MMU root through kvm_tdp_mmu_put_root), and forget the cached MMIO access."""
        vcpu.vcpu_clear_mmio_info()
        if self.tdp is not None and self.tdp_mmu_enabled:
            self.tdp.kvm_tdp_mmu_put_root(vcpu)
            return
        self.shadow.kvm_mmu_free_roots(vcpu, free_prev=True)

    def kvm_mmu_reload(self, vcpu: VcpuMmu) -> None:
        """vcpu_enter_guest(): free obsolete roots on request, then kvm_mmu_load if the root is invalid."""
        self.shadow.kvm_mmu_free_obsolete_roots(vcpu)
        if vcpu.needs_load:
            self.shadow.kvm_mmu_load(vcpu)

    # ---- quota

    def kvm_mmu_change_mmu_pages(self, goal: int) -> None:
        """Shrink to ``goal`` by zapping the oldest pages, then set the maximum."""
        if self.arch.n_used_mmu_pages > goal:
            self.shadow.kvm_mmu_zap_oldest_mmu_pages(self.arch.n_used_mmu_pages - goal)
            goal = self.arch.n_used_mmu_pages
        self.arch.n_max_mmu_pages = goal

    def kvm_vm_ioctl_set_nr_mmu_pages(self, goal: int) -> None:
        if goal < KVM_MIN_ALLOC_MMU_PAGES:
            return  # -EINVAL: nothing changes
        self.kvm_mmu_change_mmu_pages(goal)
        self.arch.n_requested_mmu_pages = goal

    # ---- memslots

    def kvm_create_vm(self) -> None:
        """KVM_CREATE_VM is in the trace: address space 0's memslots start at generation 0."""
        self.arch.memslots_generation = 0
        for vcpu in self.vcpus.values():
            vcpu.mmio_info_unknown = None

    def kvm_swap_active_memslots(self) -> None:
        """Publish new memslots: the generation steps by the number of address spaces (the in-progress
        bit in between is never seen: the model applies an update at once), then
        kvm_arch_memslots_updated."""
        self.arch.memslot_updates += 1
        if self.arch.memslots_generation is not None:
            self.arch.memslots_generation += KVM_ADDRESS_SPACE_NUM
            self.kvm_mmu_invalidate_mmio_sptes(self.arch.memslots_generation)

    def kvm_mmu_invalidate_mmio_sptes(self, gen: int) -> None:
        """When the MMIO generation wraps (ignoring the address-space bit), zap every page."""
        if not gen & MMIO_SPTE_GEN_MASK & ~(KVM_ADDRESS_SPACE_NUM - 1):
            self.kvm_mmu_zap_all_fast()

    def kvm_set_memory_region(self, slot_id: int, base_gfn: int, npages: int, hva: int, flags: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, delete (npages 0), move or change flags of a slot.

        kvm_set_memslot publishes memslots once for a create or a flags change and twice for a delete
        or a move (first the old slot marked invalid: kvm_invalidate_memslot); no change, none.
        """
        old = self.arch.memslots.get(slot_id)
        self.arch.memslots_known = True
        if npages == 0:
            if old is None:
                return
            self.kvm_swap_active_memslots()  # kvm_invalidate_memslot
            self.kvm_arch_flush_shadow_memslot(old)
            del self.arch.memslots[slot_id]
            self.kvm_swap_active_memslots()  # kvm_delete_memslot
            self.kvm_arch_commit_memory_region(create_or_delete=True)
            return
        new = Memslot(slot_id, base_gfn, npages, hva, flags, self.kvm_alloc_dirty_bitmap(old, npages, flags))
        if old is not None and old.base_gfn != base_gfn:
            self.kvm_swap_active_memslots()  # kvm_invalidate_memslot
            self.kvm_arch_flush_shadow_memslot(old)  # KVM_MR_MOVE
        self.arch.memslots[slot_id] = new
        if old is None or (old.base_gfn, old.flags) != (base_gfn, flags):
            self.kvm_swap_active_memslots()
        if old is None:
            self.kvm_arch_commit_memory_region(create_or_delete=True)
        elif (old.flags ^ flags) & KVM_MEM_LOG_DIRTY_PAGES and flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.shadow.kvm_shadow_mmu_slot_remove_write_access(new, 1)

    def kvm_alloc_dirty_bitmap(self, old: Memslot | None, npages: int, flags: int) -> int | None:
        """kvm_prepare_memory_region: a logged slot keeps its bitmap, else gets a clear one (all set
        with KVM_DIRTY_LOG_INITIALLY_SET); an unlogged slot has none."""
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            return None
        if old is not None and old.dirty_bitmap is not None:
            return old.dirty_bitmap
        return (1 << npages) - 1 if self.arch.kvm_dirty_log_manual_protect_and_init_set() else 0

    # ---- dirty logging (kvm_main.c's ioctls, then mmu.c's kvm_arch_mmu_enable_log_dirty_pt_masked)

    def kvm_vm_ioctl_enable_cap_generic(self, cap: int, args0: int) -> None:
        """KVM_ENABLE_CAP on the VM fd: only KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 concerns the MMU; an
        option outside the allowed ones is -EINVAL (flags, untraced, must be 0 as well)."""
        if cap != KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return
        allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if args0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            allowed |= KVM_DIRTY_LOG_INITIALLY_SET
        if not args0 & ~allowed:
            self.arch.manual_dirty_log_protect = args0

    def logged_slot(self, slot: int) -> Memslot | None:
        """id_to_memslot of a KVM_*_DIRTY_LOG slot argument (as_id << 16 | id) with a dirty bitmap."""
        memslot = self.arch.memslots.get(slot) if slot >> 16 == 0 else None
        return memslot if memslot is not None and memslot.dirty_bitmap is not None else None

    def kvm_get_dirty_log_protect(self, slot: int) -> str | None:
        """KVM_GET_DIRTY_LOG: with manual protect only a copy; else take every non-zero word of the
        bitmap (xchg with 0) and re-protect its pages, word by word.  Returns why it cannot be decided."""
        memslot = self.logged_slot(slot)
        if memslot is None:
            return None  # -ENOENT
        if self.arch.manual_dirty_log_protect is None:
            return R_MANUAL_PROTECT
        if self.arch.manual_dirty_log_protect:
            return None
        bitmap, memslot.dirty_bitmap = memslot.dirty_bitmap, 0
        reasons = [self.kvm_arch_mmu_enable_log_dirty_pt_masked(memslot, offset, mask)
                   for offset, mask in bitmap_words(bitmap, 0, memslot.npages)]
        return next(filter(None, reasons), None)

    def kvm_clear_dirty_log_protect(self, slot: int, first_page: int, num_pages: int,
                                    masks: dict[int, int] | None) -> str | None:
        """KVM_CLEAR_DIRTY_LOG: for each word of the user's mask (``masks``: first page of the word ->
        word, zero words left out; None when the trace lacks it), clear those bits in the bitmap and
        re-protect the pages that were set in both.  Returns why it cannot be decided."""
        memslot = self.logged_slot(slot)
        if first_page & 63 or memslot is None:
            return None  # -EINVAL / -ENOENT
        npages = memslot.npages
        if first_page > npages or num_pages > npages - first_page or (
                num_pages < npages - first_page and num_pages & 63):
            return None  # -EINVAL
        if masks is None:
            return R_CLEAR_MASK
        reasons = []
        for offset in sorted(o for o in masks if first_page <= o < first_page + num_pages):
            mask = masks[offset] & (memslot.dirty_bitmap >> offset) & LONG_MASK  # atomic_long_fetch_andnot
            memslot.dirty_bitmap &= ~(masks[offset] << offset)
            if mask:
                reasons.append(self.kvm_arch_mmu_enable_log_dirty_pt_masked(memslot, offset, mask))
        return next(filter(None, reasons), None)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot: Memslot, gfn_offset: int, mask: int) -> str | None:
        """Re-enable dirty logging for the 4K pages of ``mask``: write-protect them
        (kvm_mmu_write_protect_pt_masked).  With PML the kernel clears D bits instead, of pages the
        PML buffer logged, which no trace shows: undecidable.  The rmap half of the function is the
        shadow MMU's rmap_write_protect, which has no tracepoint: the shadow model learns it from the
        next write fault's error code (engine.correct_from_error_code)."""
        if self.arch.kvm_dirty_log_manual_protect_and_init_set():
            return R_INITIALLY_SET
        if self.arch.cpu_dirty_log_size:
            return R_PML
        if self.tdp is not None and self.tdp_mmu_enabled:
            self.tdp.kvm_tdp_mmu_clear_dirty_pt_masked(slot, slot.base_gfn + gfn_offset, mask)
        return None

    def kvm_set_memory_region_failed(self) -> None:
        """The ioctl returned an error: how many times it published memslots is not in the trace."""
        self.arch.memslots_generation = None
        self.arch.generation_unknown = R_MEMSLOT_GEN_FAILED

    def kvm_arch_commit_memory_region(self, create_or_delete: bool) -> None:
        """The default quota: 2% of memslot pages, at least 64, unless userspace set one."""
        if create_or_delete and not self.arch.n_requested_mmu_pages:
            nr_pages = sum(s.npages for s in self.arch.memslots.values())
            self.kvm_mmu_change_mmu_pages(max(nr_pages // KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO,
                                              KVM_MIN_ALLOC_MMU_PAGES))

    def kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> None:
        """KVM_X86_QUIRK_SLOT_ZAP_ALL (the default): a fast zap of everything."""
        self.kvm_mmu_zap_all_fast()

    def kvm_mmu_zap_all_fast(self, trace: bool = True) -> None:
        """Flip the generation so every shadow page is obsolete, then zap the obsolete pages.

        ``trace=False``: the engine already adopted the recorded kvm_mmu_zap_all_fast (its cause was
        untraced) and asks only for what follows it.
        """
        arch = self.arch
        if trace:
            arch.tp.emit(Decision("kvm_mmu_zap_all_fast", {"mmu_valid_gen": arch.mmu_valid_gen,
                                                            "mmu_used": arch.n_used_mmu_pages},
                                  twin="kvm_mmu_zap_all_fast"))
        arch.mmu_valid_gen ^= 1
        if self.tdp is not None:
            self.tdp.kvm_tdp_mmu_invalidate_roots()
        for vcpu in self.vcpus.values():
            vcpu.needs_load = True  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        self.shadow.kvm_zap_obsolete_pages()
        if self.tdp is not None:
            self.tdp.kvm_tdp_mmu_zap_invalidated_roots()

    def kvm_unmap_gfn_range(self, start: int, end: int) -> bool:
        """MMU notifier: drop leaf SPTEs of [start, end) in both MMUs (no shadow page is zapped)."""
        flush = self.shadow.kvm_shadow_mmu_unmap_gfn_range(start, end)
        if self.tdp is not None:
            flush |= self.tdp.kvm_tdp_mmu_unmap_gfn_range(start, end)
        return flush

    def kvm_mmu_notifier_invalidate_range_start(self, start: int, end: int) -> list[tuple[int, int]]:
        """kvm_unmap_hva_range: translate the hva range through every memslot and unmap it.

        Returns the gfn ranges it hit (each moved mmu_invalidate_seq: a fault that sampled the
        sequence before is stale).
        """
        hit = []
        for slot in list(self.arch.memslots.values()):
            gfns = slot.hva_to_gfn_range(start, end)
            if gfns is not None:
                hit.append(gfns)
                self.kvm_unmap_gfn_range(*gfns)
        return hit

    def kvm_mmu_zap_all(self) -> None:
        """kvm_arch_flush_shadow_all() at VM destruction, then each vCPU's kvm_mmu_unload()."""
        self.shadow.kvm_shadow_mmu_zap_all()
        if self.tdp is not None:
            self.tdp.kvm_tdp_mmu_zap_all()
        for vcpu in self.vcpus.values():
            self.shadow.kvm_mmu_free_roots(vcpu, free_prev=True)

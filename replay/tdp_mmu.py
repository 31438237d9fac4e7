"""The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c) as a replay model behind ``TdpMmuApi``.

Every SPTE write of the kernel's TDP MMU goes through ``handle_changed_spte``, which emits
``kvm_tdp_mmu_spte_changed`` (old -> new): the model makes the same writes in the same order, so the
recorded stream of SPTE changes, page-table allocations (``kvm_mmu_get_page``), removals
(``kvm_mmu_prepare_zap_page``) and leaf installs (``kvm_mmu_set_spte``) can be judged one by one.

Inputs the model takes from the trace: the fault (``kvm_page_fault``: gpa and error code), the pfn,
its host writability and the host mapping level (``kvm_mmu_spte_requested``; writability and level
only from the bcc recorder), memslots and host unmaps.  Page-table pages are kernel allocations: their
physical address is an allocator output, learned from the first SPTE that links the page (like the
shadow model learns ``sptep`` pages); every other bit of a non-leaf SPTE is predicted.

Version differences are named fields of ``TdpRules`` (see ``TDP_RULES``), never version tests.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from replay.decisions import Decision
from replay.mmu import (FaultIn, FaultInResult, KvmArch, KvmPageFault, Memslot, VcpuMmu,
                        kvm_handle_noslot_fault)
from replay.role import ACC_ALL
from replay.spte import (NON_EPT, PAGE_SHIFT, PT_ACCESSED_MASK, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, PT_USER_MASK,
                         PT_WRITABLE_MASK, REMOVED_SPTE_LOW, SPTE_MMU_PRESENT_MASK, is_large_pte, is_last_spte,
                         is_noslot_pfn, is_shadow_present_pte, is_writable_pte, make_spte, spte_to_pfn)

if TYPE_CHECKING:
    from replay.versions import VersionRules

SPTE_ENT_PER_PAGE = 512
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
#: The lab's EPYC CPU model has no LA57, so kvm_mmu_get_tdp_level() is 4 (max_tdp_level).
TDP_ROOT_LEVEL = 4

R_HOST_LEVEL = "host mapping level untraced (tracefs: no req_level)"
R_HOST_WRITABLE = "host writability of the pfn untraced (tracefs: no map_writable)"
R_NO_ROOT = "TDP root loaded before the trace began"


@dataclass(frozen=True)
class TdpRules:
    """Where tdp_mmu.c differs between the kernels we model (see docs/tdp.md for each source)."""

    name: str
    #: Levels of tdp_mmu_zap_root's passes: 6.1 zaps at 1G then the root level; 6.10+ at 4K, 2M, 1G,
    #: root (CONFIG_KVM_PROVE_MMU would make it one pass; Debian's 6.12 does not set it).
    zap_root_levels: tuple[int, ...]
    #: A huge SPTE above the goal level: 6.1 zaps it (tdp_mmu_zap_spte_atomic) then links an empty
    #: table; 6.12 splits it in place (tdp_mmu_split_huge_page, event kvm_mmu_split_huge_page).
    split_huge_in_place: bool
    #: tdp_mmu_zap_spte_atomic reports old -> REMOVED_SPTE before the flush (6.1) or, after the
    #: flush and the final write, old -> the non-present value (6.3+).
    zap_atomic_reports_removed: bool
    #: Kernel function that allocates a vCPU's root (the decision's twin).
    alloc_root_twin: str
    #: RET_PF_* used by fast_page_fault's tracepoint.
    ret_pf_invalid: int
    ret_pf_fixed: int
    ret_pf_spurious: int
    #: fast_page_fault's error_code field width (u32 in 6.1, u64 later).
    fast_pf_error_code_mask: int
    #: kvm_tdp_mmu_clear_dirty_pt_masked walks every root (6.1: for_each_tdp_mmu_root) or only the
    #: valid ones (6.12: for_each_valid_tdp_mmu_root).
    dirty_masked_valid_roots_only: bool


TDP_RULES_6_1 = TdpRules("6.1", zap_root_levels=(PG_LEVEL_1G, TDP_ROOT_LEVEL), split_huge_in_place=False,
                         zap_atomic_reports_removed=True,
                         alloc_root_twin="kvm_tdp_mmu_get_vcpu_root_hpa", ret_pf_invalid=3, ret_pf_fixed=4,
                         ret_pf_spurious=5, fast_pf_error_code_mask=0xFFFFFFFF, dirty_masked_valid_roots_only=False)
TDP_RULES_6_12 = TdpRules("6.12", zap_root_levels=(PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, TDP_ROOT_LEVEL),
                          split_huge_in_place=True, zap_atomic_reports_removed=False,
                          alloc_root_twin="kvm_tdp_mmu_alloc_root", ret_pf_invalid=4,
                          ret_pf_fixed=5, ret_pf_spurious=6, fast_pf_error_code_mask=(1 << 64) - 1,
                          dirty_masked_valid_roots_only=True)
TDP_RULES: dict[str, TdpRules] = {"6.1": TDP_RULES_6_1, "6.12": TDP_RULES_6_12,
                                  "6.18": TdpRules(**{**TDP_RULES_6_12.__dict__, "name": "6.18"})}


def pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE(level): 4K pages one entry at ``level`` maps."""
    return 1 << (9 * (level - 1))


def spte_index(gfn: int, level: int) -> int:
    return (gfn >> (9 * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def make_nonleaf_spte(child_pfn: int | None) -> int:
    """make_nonleaf_spte() on the non-EPT flavour with A/D enabled: present, W, U, A, table address."""
    spte = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK
    return spte | ((child_pfn or 0) << PAGE_SHIFT)


class TdpPage:
    """One TDP page table (struct kvm_mmu_page): its entries and the tables its non-leaf entries link.

    ``spt`` holds entries that are not the non-present value; ``pfn`` is the table's own physical
    page, None until an SPTE linking it was seen.
    """

    __slots__ = ("gfn", "role", "level", "spt", "children", "pfn", "refcount", "invalid", "parent")

    def __init__(self, gfn: int, role: int, level: int, parent: TdpPage | None) -> None:
        self.gfn, self.role, self.level, self.parent = gfn, role, level, parent
        self.spt: dict[int, int] = {}
        self.children: dict[int, TdpPage] = {}
        self.pfn: int | None = None
        self.refcount = 0
        self.invalid = False

    def entry_gfn(self, index: int) -> int:
        return self.gfn + index * pages_per_hpage(self.level)

    def __repr__(self) -> str:
        return f"tdp_sp(gfn {self.gfn:#x} l{self.level})"


@dataclass
class TdpIter:
    """struct tdp_iter: where the walk is and the SPTE it read there."""

    page: TdpPage
    index: int
    level: int
    gfn: int
    old_spte: int


class TdpMmu:
    """One VM's TDP MMU: its roots and the tdp_mmu.c functions that change them."""

    def __init__(self, arch: KvmArch, vcpus: dict[int, VcpuMmu]) -> None:
        self.arch = arch
        self.vcpus = vcpus
        self.rules: VersionRules = arch.rules
        self.tdp_rules = TDP_RULES[arch.rules.name]
        self.layout = arch.rules.role_layout
        self.nonpresent = arch.rules.nonpresent_spte
        self.removed_spte = self.nonpresent | REMOVED_SPTE_LOW
        self.kvm_mmu_init_tdp_mmu()

    # ------------------------------------------------------------------ VM lifetime

    def kvm_mmu_init_tdp_mmu(self) -> None:
        self.roots: list[TdpPage] = []
        #: Roots invalidated and not yet zapped (kvm_tdp_mmu_zap_invalidated_roots' work list).
        self.scheduled_roots: list[TdpPage] = []
        #: Host mapping level last seen for each 2M frame (gfn >> 9), from faults outside dirty
        #: logging (while logging, req_level is capped at 4K whatever the host maps).
        self.host_level: dict[int, int] = {}

    def kvm_mmu_uninit_tdp_mmu(self) -> None:
        self.kvm_mmu_init_tdp_mmu()

    # ------------------------------------------------------------------ tracepoints

    def _emit(self, event: str, values: dict[str, Any], twin: str, subject: Any = None,
              undecidable: str | None = None) -> None:
        self.arch.tp.emit(Decision(event, values, twin, undecidable, subject=subject))

    def _sp_values(self, sp: TdpPage) -> dict[str, Any]:
        """KVM_MMU_PAGE_FIELDS of a TDP page: TDP pages never get mmu_valid_gen or root_count set
        before the event (the root's refcount is set after it)."""
        return {"gfn": sp.gfn, "role": sp.role, "mmu_valid_gen": 0, "root_count": 0, "unsync": False}

    def trace_kvm_mmu_get_page(self, sp: TdpPage, twin: str) -> None:
        self._emit("kvm_mmu_get_page", {**self._sp_values(sp), "created": True}, twin, sp)

    def trace_kvm_mmu_prepare_zap_page(self, sp: TdpPage) -> None:
        self._emit("kvm_mmu_prepare_zap_page", self._sp_values(sp), "handle_removed_pt", sp)

    def trace_kvm_tdp_mmu_spte_changed(self, gfn: int, level: int, old: int, new: int, twin: str,
                                       subject: Any = None) -> None:
        self._emit("kvm_tdp_mmu_spte_changed", {"gfn": gfn, "level": level, "old_spte": old, "new_spte": new,
                                                "as_id": 0}, twin, subject)

    # ------------------------------------------------------------------ roots

    def root_role(self) -> int:
        """kvm_calc_tdp_mmu_root_page_role(): ACC_ALL, CR0.WP, EFER.NX, direct, A/D on, 8-byte gptes."""
        set_ = self.layout.set
        word = set_(0, "level", TDP_ROOT_LEVEL)
        for name, value in (("direct", 1), ("access", ACC_ALL), ("efer_nx", 1), ("cr0_wp", 1)):
            word = set_(word, name, value)
        return word

    def kvm_tdp_mmu_alloc_root(self, vcpu: VcpuMmu) -> None:
        """Reuse a valid root with the same role (no event), else allocate one (get_page, created)."""
        role = self.root_role()
        root = next((r for r in self.roots if not r.invalid and r.role == role), None)
        if root is None:
            root = TdpPage(0, role, TDP_ROOT_LEVEL, None)
            self.trace_kvm_mmu_get_page(root, self.tdp_rules.alloc_root_twin)
            root.refcount = 1  # the TDP MMU's own reference: a vCPU's put never frees a valid root
            self.roots.append(root)
        root.refcount += 1
        vcpu.root = root
        vcpu.needs_load = False

    def kvm_tdp_mmu_put_root(self, vcpu: VcpuMmu) -> None:
        """Drop the vCPU's reference; a root at zero (only an invalid one gets there) is freed, no event."""
        root = vcpu.root
        vcpu.root = None
        vcpu.needs_load = True
        if root is not None:
            self._put(root)

    def _put(self, root: TdpPage) -> None:
        root.refcount -= 1
        if root.refcount <= 0:
            self.roots.remove(root)

    def kvm_tdp_mmu_invalidate_roots(self) -> None:
        """kvm_tdp_mmu_invalidate_all_roots(): mark every valid root invalid and scheduled to zap."""
        for root in self.roots:
            if not root.invalid:
                root.invalid = True
                self.scheduled_roots.append(root)
        for vcpu in self.vcpus.values():
            if vcpu.root is not None and vcpu.root.invalid:
                vcpu.needs_load = True  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS

    def kvm_tdp_mmu_zap_invalidated_roots(self) -> None:
        """Zap each scheduled root (shared mmu_lock), then drop the TDP MMU's own reference.  In the
        caller's thread in both lab kernels: upstream 6.1.0 used a kworker, Debian's 6.1.192 does not
        (its memslot_churn trace has the zap on the VMM's thread right after kvm_mmu_zap_all_fast)."""
        scheduled, self.scheduled_roots = self.scheduled_roots, []
        for root in scheduled:
            self.tdp_mmu_zap_root(root, shared=True)
            self._put(root)

    def kvm_tdp_mmu_zap_all(self) -> None:
        """VM teardown (kvm_mmu_zap_all): every root, exclusive mmu_lock."""
        for root in list(self.roots):
            self.tdp_mmu_zap_root(root, shared=False)

    def kvm_mmu_free_obsolete_roots(self, vcpu: VcpuMmu) -> None:
        """An invalid root is obsolete: put it, so the next entry allocates a new one."""
        if vcpu.root is not None and vcpu.root.invalid:
            self.kvm_tdp_mmu_put_root(vcpu)

    # ------------------------------------------------------------------ SPTE writes

    def handle_changed_spte(self, page: TdpPage, index: int, old: int, new: int, shared: bool, twin: str,
                            subject: Any = None) -> None:
        """The event (none when nothing changed), then, if a page table left the paging structure,
        its recursive teardown (handle_removed_pt)."""
        if old == new:
            return
        gfn, level = page.entry_gfn(index), page.level
        self.trace_kvm_tdp_mmu_spte_changed(gfn, level, old, new, twin, subject)
        if is_shadow_present_pte(old) and not is_last_spte(old, level) and (
                not is_shadow_present_pte(new) or is_last_spte(new, level)):
            child = page.children.pop(index, None)
            if child is not None:
                self.handle_removed_pt(child, shared)

    def handle_removed_pt(self, sp: TdpPage, shared: bool) -> None:
        """A table left the paging structure: its prepare_zap event, then every entry -> REMOVED.

        Shared (mmu_lock read) xchg's all 512 entries, non-present ones too; exclusive touches only
        present entries.
        """
        self.trace_kvm_mmu_prepare_zap_page(sp)
        for index in range(SPTE_ENT_PER_PAGE):
            old = sp.spt.get(index, self.nonpresent)
            if not shared and not is_shadow_present_pte(old):
                continue
            sp.spt[index] = self.removed_spte
            self.handle_changed_spte(sp, index, old, self.removed_spte, shared, "handle_removed_pt")

    def tdp_mmu_set_spte(self, it: TdpIter, new: int, shared: bool, twin: str, subject: Any = None) -> None:
        """tdp_mmu_set_spte / tdp_mmu_set_spte_atomic / tdp_mmu_iter_set_spte: write, then handle."""
        old = it.page.spt.get(it.index, self.nonpresent)
        self._write(it.page, it.index, new)
        self.handle_changed_spte(it.page, it.index, old, new, shared, twin, subject)
        it.old_spte = new

    def _write(self, page: TdpPage, index: int, value: int) -> None:
        if value == self.nonpresent:
            page.spt.pop(index, None)
        else:
            page.spt[index] = value

    def _page_of_entry(self, gfn: int, level: int) -> TdpPage | None:
        for root in self.roots:
            page = root
            while page is not None and page.level > level:
                page = page.children.get(spte_index(gfn, page.level))
            if page is not None and page.level == level:
                return page
        return None

    # ------------------------------------------------------------------ iteration

    def for_each_tdp_pte_min_level(self, root: TdpPage, min_level: int, start: int, end: int) -> Iterator[TdpIter]:
        """Pre-order over [start, end), stepping down only into present non-leaf entries above
        ``min_level``; the entry is re-read after the caller's body, as tdp_iter does."""
        def walk(page: TdpPage) -> Iterator[TdpIter]:
            span = pages_per_hpage(page.level)
            first = max(start, page.gfn)
            last = min(end, page.gfn + span * SPTE_ENT_PER_PAGE)
            for index in range(spte_index(first, page.level), spte_index(last - 1, page.level) + 1):
                it = TdpIter(page, index, page.level, page.entry_gfn(index), page.spt.get(index, self.nonpresent))
                yield it
                spte = page.spt.get(index, self.nonpresent)
                child = page.children.get(index)
                if (child is not None and page.level > min_level and is_shadow_present_pte(spte)
                        and not is_last_spte(spte, page.level)):
                    yield from walk(child)
        if start < end:
            yield from walk(root)

    # ------------------------------------------------------------------ faults

    def kvm_tdp_mmu_page_fault(self, vcpu: VcpuMmu, fault: KvmPageFault) -> Generator[FaultIn, Any, int]:
        """fast_page_fault (lockless), then kvm_faultin_pfn (the yield) and kvm_tdp_mmu_map."""
        fault.gfn = fault.addr >> PAGE_SHIFT
        rules = self.tdp_rules
        if self.page_fault_can_be_fast(fault):
            ret = self.fast_page_fault(vcpu, fault)
            if ret != rules.ret_pf_invalid:
                return ret
        inputs: FaultInResult = yield FaultIn(fault.gfn)
        if is_noslot_pfn(inputs.pfn) and kvm_handle_noslot_fault(self.arch, vcpu, fault, ACC_ALL):
            return "emulate"
        return self.kvm_tdp_mmu_map(vcpu, fault, inputs)

    @staticmethod
    def page_fault_can_be_fast(fault: KvmPageFault) -> bool:
        """A/D bits are on with NPT: only a present write fault (write protection) can be fixed fast."""
        return not fault.rsvd and fault.present and fault.write

    def _leaf_iter(self, vcpu: VcpuMmu, gfn: int) -> TdpIter | None:
        """kvm_tdp_mmu_fast_pf_get_last_sptep: the last SPTE the walk reaches for ``gfn``."""
        page = vcpu.root
        last = None
        while page is not None:
            index = spte_index(gfn, page.level)
            spte = page.spt.get(index, self.nonpresent)
            last = TdpIter(page, index, page.level, page.entry_gfn(index), spte)
            if not is_shadow_present_pte(spte) or is_last_spte(spte, page.level):
                break
            page = page.children.get(index)
        return last

    def kvm_tdp_mmu_get_walk(self, vcpu: VcpuMmu, addr: int) -> int:
        """The last SPTE of a walk for gpa ``addr`` (handle_mmio_page_fault's get_mmio_spte)."""
        it = self._leaf_iter(vcpu, addr >> PAGE_SHIFT)
        return self.nonpresent if it is None else it.old_spte

    def fast_page_fault(self, vcpu: VcpuMmu, fault: KvmPageFault) -> int:
        """Fix a write-protected but MMU-writable leaf without mmu_lock (no spte_changed event)."""
        rules = self.tdp_rules
        it = self._leaf_iter(vcpu, fault.gfn)
        spte = it.old_spte if it is not None else self.nonpresent
        ret = rules.ret_pf_invalid
        new = spte
        if it is not None and is_shadow_present_pte(spte) and is_last_spte(spte, it.level):
            if is_writable_pte(spte):
                ret = rules.ret_pf_spurious
            elif spte & NON_EPT.mmu_writable_mask and not (it.level > PG_LEVEL_4K and self._dirty_logged(fault.gfn)):
                new = spte | PT_WRITABLE_MASK
                it.page.spt[it.index] = new
                ret = rules.ret_pf_fixed
                self.arch.mark_page_dirty_in_slot(fault.gfn)  # fast_pf_fix_direct_spte
        self._emit("fast_page_fault", {"addr": fault.addr, "error_code": fault.error_code & rules.fast_pf_error_code_mask,
                                       "old_spte": spte, "new_spte": new, "ret": ret}, "fast_page_fault")
        return ret

    def _dirty_logged(self, gfn: int) -> bool:
        slot = self.arch.gfn_to_memslot(gfn)
        return slot is not None and bool(slot.flags & 1)

    def kvm_mmu_hugepage_adjust(self, fault: KvmPageFault, inputs: FaultInResult) -> str | None:
        """goal_level from the host mapping level (req_level, recorder input); None or the reason
        the level cannot be decided (then the recorded level is used)."""
        if is_noslot_pfn(inputs.pfn):
            fault.goal_level = 1  # MMIO: never a huge SPTE
            return None
        if inputs.req_level is None:
            fault.goal_level = inputs.recorded_level
            return R_HOST_LEVEL
        fault.req_level = inputs.req_level
        if not self._dirty_logged(fault.gfn):
            self.host_level[fault.gfn >> 9] = inputs.req_level
        huge_disallowed = fault.exec and self.arch.nx_huge_pages
        fault.goal_level = 1 if huge_disallowed else max(inputs.req_level, 1)
        return None

    def kvm_tdp_mmu_map(self, vcpu: VcpuMmu, fault: KvmPageFault, inputs: FaultInResult) -> int:
        """Walk from the root to goal_level, allocating and linking tables, then install the leaf."""
        level_reason = self.kvm_mmu_hugepage_adjust(fault, inputs)
        goal = fault.goal_level
        self._emit("kvm_mmu_spte_requested", {"gfn": fault.gfn, "level": goal}, "kvm_tdp_mmu_map",
                   undecidable=level_reason)
        fault.pfn = inputs.pfn if is_noslot_pfn(inputs.pfn) else inputs.pfn & ~(pages_per_hpage(goal) - 1)
        fault.map_writable = inputs.map_writable
        page = vcpu.root
        while page is not None:
            index = spte_index(fault.gfn, page.level)
            it = TdpIter(page, index, page.level, page.entry_gfn(index), page.spt.get(index, self.nonpresent))
            if it.old_spte == self.removed_spte:
                return 1  # frozen by another thread: RET_PF_RETRY
            if it.level == goal:
                return self.tdp_mmu_map_handle_target_level(vcpu, fault, it)
            if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
                page = page.children.get(index)
                continue
            if is_shadow_present_pte(it.old_spte) and not self.tdp_rules.split_huge_in_place:
                self.tdp_mmu_zap_spte_atomic(it)
            sp = self.tdp_mmu_init_child_sp(it)
            if is_shadow_present_pte(it.old_spte):
                self.tdp_mmu_split_huge_page(it, sp)
            else:
                self.tdp_mmu_link_sp(it, sp, "tdp_mmu_link_sp")
            page = sp
        return 1

    def tdp_mmu_zap_spte_atomic(self, it: TdpIter) -> None:
        """Freeze the SPTE, flush, write the non-present value: one event, whose new value is
        REMOVED_SPTE in 6.1 (reported at the freeze) and the non-present value later (reported last)."""
        reported = self.removed_spte if self.tdp_rules.zap_atomic_reports_removed else self.nonpresent
        old = it.old_spte
        self._write(it.page, it.index, self.nonpresent)
        self.handle_changed_spte(it.page, it.index, old, reported, True, "tdp_mmu_zap_spte_atomic")
        it.old_spte = self.nonpresent

    def tdp_mmu_init_child_sp(self, it: TdpIter) -> TdpPage:
        """tdp_mmu_alloc_sp + tdp_mmu_init_child_sp: the parent's role one level down (get_page)."""
        role = self.layout.set(it.page.role, "level", it.level - 1)
        sp = TdpPage(it.gfn, role, it.level - 1, it.page)
        self.trace_kvm_mmu_get_page(sp, "tdp_mmu_init_child_sp")
        return sp

    def tdp_mmu_link_sp(self, it: TdpIter, sp: TdpPage, twin: str) -> None:
        """Point the parent entry at the new table (make_nonleaf_spte, atomic)."""
        it.page.children[it.index] = sp
        self.tdp_mmu_set_spte(it, make_nonleaf_spte(sp.pfn), True, twin, subject=sp)

    def make_huge_page_split_spte(self, huge_spte: int, child_level: int, index: int) -> int:
        child = huge_spte | ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
        if child_level == PG_LEVEL_4K:
            child &= ~PT_PAGE_SIZE_MASK
            if self.arch.nx_huge_pages:
                child &= ~NON_EPT.nx_mask
        return child

    def tdp_mmu_split_huge_page(self, it: TdpIter, sp: TdpPage) -> None:
        """6.12: fill the new table with the huge page's pieces, link it, then the split event."""
        huge = it.old_spte
        for index in range(SPTE_ENT_PER_PAGE):
            sp.spt[index] = self.make_huge_page_split_spte(huge, sp.level, index)
        self.tdp_mmu_link_sp(it, sp, "tdp_mmu_split_huge_page")
        self._emit("kvm_mmu_split_huge_page", {"gfn": it.gfn, "level": it.level, "spte": huge, "ret": 0},
                   "tdp_mmu_split_huge_page")

    def tdp_mmu_map_handle_target_level(self, vcpu: VcpuMmu, fault: KvmPageFault, it: TdpIter) -> int | str:
        """make_mmio_spte (no memslot) or make_spte(ACC_ALL, host_writable = map_writable); same
        value -> SPURIOUS; then mark_mmio_spte (EMULATE) or kvm_mmu_set_spte."""
        rules = self.tdp_rules
        is_mmio = is_noslot_pfn(fault.pfn)
        if is_mmio:
            new = self.arch.make_mmio_spte(it.gfn, ACC_ALL)
            reason = self.arch.mmio_generation_unknown()  # then the recorded value is adopted
        else:
            new, _ = make_spte(NON_EPT, self.rules.spte, level=it.level, ad_disabled=False, pte_access=ACC_ALL,
                               pfn=fault.pfn, old_spte=it.old_spte, prefetch=False, synchronizing=False,
                               host_writable=bool(fault.map_writable), nx_huge_pages=self.arch.nx_huge_pages,
                               try_to_unsync=lambda: False)
            if new & PT_WRITABLE_MASK:
                self.arch.mark_page_dirty_in_slot(it.gfn)  # make_spte, for a dirty-logged slot
            reason = R_HOST_WRITABLE if fault.map_writable is None else None
        ret: int | str = rules.ret_pf_fixed
        if new == it.old_spte and not (is_mmio and reason):
            ret = rules.ret_pf_spurious
        elif reason is not None:
            self._emit("kvm_tdp_mmu_spte_changed", {"gfn": it.gfn, "level": it.level, "old_spte": it.old_spte,
                                                    "new_spte": new, "as_id": 0},
                       "tdp_mmu_map_handle_target_level", it.page, reason)
            self._write(it.page, it.index, new)
        else:
            self.tdp_mmu_set_spte(it, new, True, "tdp_mmu_map_handle_target_level")
        if is_mmio:
            self.arch.trace_mark_mmio_spte(it.gfn, new, "tdp_mmu_map_handle_target_level")
            return "emulate"
        self._emit("kvm_mmu_set_spte", {"gfn": it.gfn, "level": it.level, "spte": new, "sptep_offset": it.index * 8},
                   "tdp_mmu_map_handle_target_level", it.page, reason)
        return ret

    # ------------------------------------------------------------------ zapping

    def tdp_mmu_zap_root(self, root: TdpPage, shared: bool) -> None:
        """Zap a whole root in passes of decreasing granularity (TdpRules.zap_root_levels)."""
        for level in self.tdp_rules.zap_root_levels:
            self.__tdp_mmu_zap_root(root, shared, min(level, root.level))

    def __tdp_mmu_zap_root(self, root: TdpPage, shared: bool, zap_level: int) -> None:
        """Every present entry at exactly ``zap_level`` -> non-present (tables with their subtrees)."""
        for it in self.for_each_tdp_pte_min_level(root, zap_level, 0, 1 << 40):
            if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                continue
            self.tdp_mmu_set_spte(it, self.nonpresent, shared, "tdp_mmu_zap_root")

    def tdp_mmu_zap_leafs(self, root: TdpPage, start: int, end: int) -> bool:
        """Present leaf SPTEs in [start, end) -> non-present; tables stay."""
        flush = False
        for it in self.for_each_tdp_pte_min_level(root, PG_LEVEL_4K, start, end):
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            self.tdp_mmu_set_spte(it, self.nonpresent, False, "tdp_mmu_zap_leafs")
            flush = True
        return flush

    def kvm_tdp_mmu_unmap_gfn_range(self, start: int, end: int) -> bool:
        """MMU notifier: leaf zap on every root of the address space, valid and invalid."""
        flush = False
        for root in list(self.roots):
            flush |= self.tdp_mmu_zap_leafs(root, start, end)
        return flush

    def kvm_tdp_mmu_zap_leafs(self, start: int, end: int) -> bool:
        """kvm_zap_gfn_range: the same leaf zap, on valid roots only."""
        flush = False
        for root in [r for r in self.roots if not r.invalid]:
            flush |= self.tdp_mmu_zap_leafs(root, start, end)
        return flush

    # ------------------------------------------------------------------ dirty logging and splitting

    def kvm_tdp_mmu_wrprot_slot(self, slot: Memslot, min_level: int) -> bool:
        """wrprot_gfn_range: clear W (keep MMU-writable) on writable leaves at or above min_level."""
        changed = False
        for root in [r for r in self.roots if not r.invalid]:
            for it in self.for_each_tdp_pte_min_level(root, min_level, slot.base_gfn, slot.base_gfn + slot.npages):
                if (not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level)
                        or not is_writable_pte(it.old_spte)):
                    continue
                self.tdp_mmu_set_spte(it, it.old_spte & ~PT_WRITABLE_MASK, True, "wrprot_gfn_range")
                changed = True
        return changed

    def kvm_tdp_mmu_zap_collapsible_sptes(self, slot: Memslot) -> None:
        """Dirty logging off: zap each table at 2M/1G inside the slot that the host could map huge
        (zap_collapsible_spte_range, shared); the next faults map huge pages again."""
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        for root in [r for r in self.roots if not r.invalid]:
            for it in self.for_each_tdp_pte_min_level(root, PG_LEVEL_2M, start, end):
                if it.level > PG_LEVEL_1G or not is_shadow_present_pte(it.old_spte) or is_last_spte(it.old_spte, it.level):
                    continue
                if it.gfn < start or it.gfn >= end:
                    continue
                host = self.host_level.get(it.gfn >> 9)
                if host is None:
                    self._emit("kvm_tdp_mmu_spte_changed", {"gfn": it.gfn, "level": it.level}, "zap_collapsible_spte_range",
                               undecidable=R_HOST_LEVEL)
                    continue
                if host >= it.level:
                    self.tdp_mmu_zap_spte_atomic(it)

    def kvm_tdp_mmu_clear_dirty_slot(self, slot: Memslot) -> bool:
        """clear_dirty_gfn_range (PML only: AMD has none, so never called on the lab's kvm_amd)."""
        return False

    def kvm_tdp_mmu_clear_dirty_pt_masked(self, slot: Memslot, gfn: int, mask: int) -> None:
        """The dirty-log harvest of 64 pages from ``gfn`` with ``wrprot`` true (no PML; the PML
        variant, which clears D, is undecidable in mmu.py): on each root (TdpRules says which)."""
        roots = [r for r in self.roots if not (r.invalid and self.tdp_rules.dirty_masked_valid_roots_only)]
        for root in roots:
            self.clear_dirty_pt_masked(root, gfn, mask)

    def clear_dirty_pt_masked(self, root: TdpPage, gfn: int, mask: int) -> None:
        """The 4K leaves of the pages set in ``mask``, in gfn order from its first set bit, lose W
        where they have it."""
        first = gfn + (mask & -mask).bit_length() - 1
        for it in self.for_each_tdp_pte_min_level(root, PG_LEVEL_4K, first, gfn + 64):
            if not mask:
                break
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            if it.level > PG_LEVEL_4K or not mask >> (it.gfn - gfn) & 1:
                continue
            mask &= ~(1 << (it.gfn - gfn))
            if it.old_spte & PT_WRITABLE_MASK:
                self.tdp_mmu_set_spte(it, it.old_spte & ~PT_WRITABLE_MASK, False, "clear_dirty_pt_masked")

    def kvm_tdp_mmu_try_split_huge_pages(self, slot: Memslot, start: int, end: int, target_level: int) -> None:
        """Eager split (tdp_mmu_split_huge_pages_root): one pre-order pass over levels above
        ``target_level``; a split table is visited next, so a 1G page ends up split to the target."""
        for root in [r for r in self.roots if not r.invalid]:
            for it in self.for_each_tdp_pte_min_level(root, target_level + 1, start, end):
                if it.level > target_level and is_shadow_present_pte(it.old_spte) and is_large_pte(it.old_spte):
                    self.tdp_mmu_split_huge_page(it, self.tdp_mmu_init_child_sp(it))

    # ------------------------------------------------------------------ learning and adopting

    def learn_table_pfn(self, decision: Decision, row: dict[str, Any]) -> None:
        """A predicted link whose table pfn was unknown: take the pfn from the recorded SPTE."""
        sp = decision.subject
        if not isinstance(sp, TdpPage) or sp.pfn is not None or row.get("new_spte") is None:
            return
        sp.pfn = spte_to_pfn(row["new_spte"])
        decision.values["new_spte"] |= sp.pfn << PAGE_SHIFT
        if sp.parent is not None:
            sp.parent.spt[spte_index(sp.gfn, sp.level + 1)] = decision.values["new_spte"]

    def adopt(self, event: str, row: dict[str, Any], vcpu: VcpuMmu | None) -> None:
        """Apply a recorded outcome the model could not decide: the SPTE becomes what the kernel wrote."""
        if event == "kvm_mmu_get_page" and vcpu is not None and self.layout.get(row["role"], "level") == TDP_ROOT_LEVEL:
            self.kvm_tdp_mmu_alloc_root(vcpu)  # its own event is dropped with the adopted decision
            return
        if event != "kvm_tdp_mmu_spte_changed" or not self.roots:
            return
        gfn, level, new = row["gfn"], row["level"], row["new_spte"]
        if new == self.removed_spte:
            new = self.nonpresent  # a table being freed, or 6.1's freeze before the final write of 0
        page = self._page_of_entry(gfn, level)
        if page is None:
            return
        index = spte_index(gfn, level)
        old = page.spt.get(index, self.nonpresent)
        self._write(page, index, new)
        if is_shadow_present_pte(new) and not is_last_spte(new, level):
            child = page.children.get(index)
            if child is None or (child.pfn is not None and child.pfn != spte_to_pfn(new)):
                child = page.children[index] = TdpPage(gfn, self.layout.set(page.role, "level", level - 1),
                                                       level - 1, page)
            child.pfn = spte_to_pfn(new)
        elif is_shadow_present_pte(old) and not is_last_spte(old, level):
            page.children.pop(index, None)


__all__ = ["TDP_RULES", "TdpMmu", "TdpPage", "TdpRules"]

"""The shadow MMU (the RFC's shadow_mmu.c, with paging_tmpl.h's FNAME(page_fault)/FNAME(fetch)).

Shadow pages, their hash by (gfn, role word), the active list (new pages at the head, never moved
on reuse), quota reclaim, prepare/commit zap, write protection of shadowed guest tables,
unsync/sync, ``mmu_set_spte``/``make_spte``, roots, and the rmap leaf zaps of MMU-notifier unmaps.
Method names are the kernel's; each ``trace_*`` call is where the kernel emits the tracepoint.

Behaviour is 6.12.117 text unless ``VersionRules`` says otherwise; where the 6.18 PVM host was
checked against real traces the docstring says so (docs/model-map.md lists every twin).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Any

from replay.decisions import Decision
from replay.guest_memory import PTE_PREFETCH_NUM
from replay.mmu import (KVM_MIN_FREE_MMU_PAGES, KVM_REFILL_PAGES, FaultIn, KvmArch, KvmPageFault, Memslot,
                        VcpuMmu, kvm_handle_noslot_fault)
from replay.paging_tmpl import (PTTYPE_64, GuestWalker, gpte_access, gpte_to_gfn_lvl, prefetch_invalid_gpte,
                                 protect_clean_gpte)
from replay.role import ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK, kvm_mmu_child_role
from replay.spte import (NON_EPT, PT_WRITABLE_MASK, SPTE_MMU_PRESENT_MASK, SpteFlavor, get_mmio_spte_gfn,
                         is_mmio_spte, is_noslot_pfn, is_shadow_present_pte, make_spte, spte_to_pfn,
                         spte_write_protect)

#: An SPTE whose value the model lost (changed by an untraced path); see docs/undecidable.md.
UNKNOWN_SPTE = -1

# Undecidable reasons (keys of the JSON's undecidable_reasons; explained in docs/undecidable.md).
R_MAP_WRITABLE = "map_writable untraced (host page writability of a read fault)"
R_HOST_LEVEL = "host mapping level untraced (huge guest page)"
R_QUOTA = "quota untraced (no memslot or KVM_SET_NR_MMU_PAGES input)"
R_OLD_SPTE = "SPTE changed by an untraced path"
R_PREFETCH = "prefetched SPTE: memslot layout untraced (neighbours' gptes and host pages cannot be placed)"
R_PREFETCH_GPTE = "prefetched SPTE: neighbouring gpte unknown (not walked since its table was guest-writable)"
R_PREFETCH_PFN = "prefetched SPTE: neighbour's host page unknown (not faulted in since its last unmap)"
R_PREFETCH_INVALIDATION = "prefetched SPTE: an mmu_notifier invalidation may be in progress"
R_PARAMS = "non-default non-upstream kvm parameter"
R_SYNC_GPTE = "MMIO SPTE re-marked by sync_page: the guest PTE it read is untraced"


def prefetch_group_gpa(pte_gpa: int) -> int:
    """The first gpte of the 8-aligned group around the leaf gpte at ``pte_gpa`` (FNAME(pte_prefetch)'s)."""
    return pte_gpa & ~(PTE_PREFETCH_NUM * 8 - 1)


class ShadowPage:
    """struct kvm_mmu_page of the shadow MMU: identity, lifetime, and the SPTEs the model tracks.

    ``sptes`` holds present leaf SPTE values by index; ``children`` the shadow pages non-leaf
    SPTEs point to.  ``spt_page`` is the page of ``sptep`` the kernel reported for this page's
    SPTEs, learned from the first aligned kvm_mmu_set_spte (used to place adopted SPTEs).
    """

    __slots__ = ("gfn", "role", "level", "mmu_valid_gen", "root_count", "unsync", "unsync_children",
                 "unsync_child_bitmap", "sptes", "spte_ts", "children", "parent_ptes", "spt_page", "invalid",
                 "on_active_list", "write_flooding_count")

    def __init__(self, gfn: int, role: int, gen: int, level: int) -> None:
        self.gfn = gfn
        self.role = role
        #: role.level, decoded once (every fault reads it at each level it walks).
        self.level = level
        self.mmu_valid_gen = gen
        self.root_count = 0
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap: set[int] = set()
        self.sptes: dict[int, int] = {}
        #: When each leaf SPTE was last written (trace ns): a later fault's error code describes it.
        self.spte_ts: dict[int, int] = {}
        self.children: dict[int, ShadowPage] = {}
        self.parent_ptes: list[tuple[ShadowPage, int]] = []
        self.spt_page: int | None = None
        self.invalid = False
        self.on_active_list = True
        self.write_flooding_count = 0

    def __repr__(self) -> str:
        return f"sp(gfn {self.gfn:#x} role {self.role:#x})"


class ShadowMmu:
    """One VM's shadow MMU state and the shadow_mmu.c functions that change it."""

    def __init__(self, arch: KvmArch, vcpus: dict[int, VcpuMmu]) -> None:
        self.arch = arch
        self.rules = arch.rules
        self.layout = arch.rules.role_layout
        self.vcpus = vcpus
        self.kvm_shadow_mmu_init_vm()

    # ------------------------------------------------------------------ VM lifetime, caches, lockless

    def kvm_shadow_mmu_init_vm(self) -> None:
        """active_mmu_pages (oldest first: dict order), the hash, write tracking, rmaps."""
        self.active_mmu_pages: dict[ShadowPage, None] = {}
        self.mmu_page_hash: dict[int, list[ShadowPage]] = {}
        self.gfn_write_track: dict[int, int] = {}
        self.disallow_lpage: dict[int, int] = {}
        self.rmaps: dict[tuple[int, int], dict[tuple[ShadowPage, int], None]] = {}
        self.indirect_shadow_pages = 0
        self.by_spt_page: dict[int, ShadowPage] = {}
        #: Reason the model cannot decide, while set (every decision emitted then is undecidable).
        self.undecidable: str | None = None
        #: The level-1 page FNAME(pte_prefetch) may fill after the last fault beyond what the model
        #: predicted, and why the model stopped (an input the trace does not tell).
        self.pte_prefetch_window: tuple[ShadowPage, str] | None = None
        #: False once the model lost an SPTE (kvm_sync_page): it may map any gfn writable, so no
        #: guest table is known to be unwritten since (learn_gpte).
        self.gptes_trusted = True

    def kvm_shadow_mmu_uninit_vm(self) -> None:
        self.kvm_shadow_mmu_init_vm()

    def kvm_shadow_mmu_topup_memory_caches(self, vcpu: VcpuMmu) -> int:
        """Cache top-up never fails in the model (an -ENOMEM would show as a missing decision)."""
        return 0

    def kvm_shadow_mmu_walk_lockless_begin(self, vcpu: VcpuMmu) -> None:
        """Lockless walks make no decisions; kept so common code has the RFC's full interface."""

    def kvm_shadow_mmu_walk_lockless_end(self, vcpu: VcpuMmu) -> None:
        """See kvm_shadow_mmu_walk_lockless_begin."""

    # ------------------------------------------------------------------ tracepoints

    def _sp_values(self, sp: ShadowPage) -> dict[str, Any]:
        role = sp.role | (1 << 11 if sp.invalid else 0)
        return {"gfn": sp.gfn, "role": role, "mmu_valid_gen": sp.mmu_valid_gen, "root_count": sp.root_count,
                "unsync": sp.unsync}

    def _emit(self, event: str, values: dict[str, Any], twin: str, subject: Any = None,
              undecidable: str | None = None) -> None:
        self.arch.tp.emit(Decision(event, values, twin, undecidable or self.undecidable,
                                   subject=subject))

    def trace_kvm_mmu_get_page(self, sp: ShadowPage, created: bool) -> None:
        self._emit("kvm_mmu_get_page", {**self._sp_values(sp), "created": created}, "__kvm_mmu_get_shadow_page", sp)

    def trace_kvm_mmu_prepare_zap_page(self, sp: ShadowPage) -> None:
        self._emit("kvm_mmu_prepare_zap_page", self._sp_values(sp), "__kvm_mmu_prepare_zap_page", sp)

    def trace_kvm_mmu_unsync_page(self, sp: ShadowPage) -> None:
        self._emit("kvm_mmu_unsync_page", self._sp_values(sp), "kvm_unsync_page", sp)

    def trace_kvm_mmu_sync_page(self, sp: ShadowPage) -> None:
        self._emit("kvm_mmu_sync_page", self._sp_values(sp), "kvm_unlink_unsync_page", sp)

    def trace_kvm_mmu_set_spte(self, sp: ShadowPage, index: int, gfn: int, undecidable: str | None) -> None:
        self._emit("kvm_mmu_set_spte", {"gfn": gfn, "level": sp.level,
                                        "spte": sp.sptes[index], "sptep_offset": index * 8},
                   "mmu_set_spte", (sp, index), undecidable)

    # ------------------------------------------------------------------ obsolete pages, hash

    def is_obsolete_sp(self, sp: ShadowPage) -> bool:
        return sp.invalid or sp.mmu_valid_gen != self.arch.mmu_valid_gen

    def for_each_valid_sp(self, gfn: int) -> Iterator[ShadowPage]:
        """Valid shadow pages of ``gfn`` in hash-chain order (newest first, hlist_add_head)."""
        for sp in list(self.mmu_page_hash.get(gfn, ())):
            if not self.is_obsolete_sp(sp):
                yield sp

    def sp_has_gptes(self, sp: ShadowPage) -> bool:
        return not self.layout.get(sp.role, "direct") and not self.layout.get(sp.role, "passthrough")

    def for_each_gfn_valid_sp_with_gptes(self, gfn: int) -> Iterator[ShadowPage]:
        return (sp for sp in self.for_each_valid_sp(gfn) if self.sp_has_gptes(sp))

    # ------------------------------------------------------------------ getting a shadow page

    def kvm_mmu_get_child_sp(self, vcpu: VcpuMmu, parent: ShadowPage, index: int, gfn: int, direct: bool,
                             access: int) -> ShadowPage | None:
        """A present non-huge parent SPTE already links a child: -EEXIST (None), no event."""
        if index in parent.children:
            return None
        role = kvm_mmu_child_role(self.layout, parent.role, index, direct, access,
                                  self.rules.child_role_clears_invalid)
        return self.kvm_mmu_get_shadow_page(vcpu, gfn, role)

    def kvm_mmu_get_shadow_page(self, vcpu: VcpuMmu, gfn: int, role: int) -> ShadowPage:
        return self.__kvm_mmu_get_shadow_page(vcpu, gfn, role)

    def __kvm_mmu_get_shadow_page(self, vcpu: VcpuMmu, gfn: int, role: int) -> ShadowPage:
        sp = self.kvm_mmu_find_shadow_page(vcpu, gfn, role)
        created = sp is None
        if sp is None:
            sp = self.kvm_mmu_alloc_shadow_page(gfn, role)
        self.trace_kvm_mmu_get_page(sp, created)
        return sp

    def kvm_mmu_find_shadow_page(self, vcpu: VcpuMmu, gfn: int, role: int) -> ShadowPage | None:
        """Walk the gfn's chain: zap unsync pages of other roles when making an upper level, sync an
        unsync match (kvm_sync_page; the page stays unsync, no sync_page event)."""
        invalid_list: list[ShadowPage] = []
        found = None
        for sp in self.for_each_valid_sp(gfn):
            if not self.role_word_equal(sp.role, role):
                if self.layout.get(role, "level") > 1 and sp.unsync:
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                continue
            if not self.layout.get(sp.role, "direct") and sp.unsync:
                if self.kvm_sync_page(vcpu, sp, invalid_list) < 0:
                    break
            sp.write_flooding_count = 0
            found = sp
            break
        self.kvm_mmu_commit_zap_page(invalid_list)
        return found

    @staticmethod
    def role_word_equal(a: int, b: int) -> bool:
        """The hash key compares the whole role word (``sp->role.word != role.word``)."""
        return a == b

    def kvm_mmu_alloc_shadow_page(self, gfn: int, role: int) -> ShadowPage:
        sp = ShadowPage(gfn, role, self.arch.mmu_valid_gen, self.layout.get(role, "level"))
        self.active_mmu_pages[sp] = None  # list_add: the head is the newest end
        self.arch.n_used_mmu_pages += 1  # kvm_account_mmu_page
        self.mmu_page_hash.setdefault(gfn, []).insert(0, sp)
        if self.sp_has_gptes(sp):
            self.account_shadowed(sp)
        return sp

    # ------------------------------------------------------------------ write protection

    def account_shadowed(self, sp: ShadowPage) -> None:
        """Upper levels are write-tracked; level 1 is only write-protected (so it may go unsync)."""
        self.indirect_shadow_pages += 1
        gfn = sp.gfn
        if sp.level > 1:
            self.gfn_write_track[gfn] = self.gfn_write_track.get(gfn, 0) + 1
        self.disallow_lpage[gfn] = self.disallow_lpage.get(gfn, 0) + 1
        self.kvm_mmu_slot_gfn_write_protect(gfn)

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        self.indirect_shadow_pages -= 1
        gfn = sp.gfn
        if sp.level > 1:
            self._dec(self.gfn_write_track, gfn)
        self._dec(self.disallow_lpage, gfn)

    @staticmethod
    def _dec(counter: dict[int, int], gfn: int) -> None:
        if counter.get(gfn, 0) <= 1:
            counter.pop(gfn, None)
        else:
            counter[gfn] -= 1

    def kvm_mmu_slot_gfn_write_protect(self, gfn: int) -> bool:
        """rmap_write_protect(pt_protect) at 4K, 2M and 1G: clear W and MMU-writable (no event)."""
        flush = False
        for level in (1, 2, 3):
            for sp, index in list(self.rmaps.get((level, gfn >> (9 * (level - 1))), ())):
                old = sp.sptes[index]
                if old == UNKNOWN_SPTE:
                    continue
                new = spte_write_protect(self.flavor, old, pt_protect=True)
                if new != old:
                    sp.sptes[index] = new
                    flush = True
        return flush

    def kvm_gfn_is_write_tracked(self, gfn: int) -> bool:
        return self.gfn_write_track.get(gfn, 0) > 0

    #: PVM and legacy shadow paging use the non-EPT SPTE layout (nested EPT is not modelled).
    flavor: SpteFlavor = NON_EPT

    # ------------------------------------------------------------------ unsync

    def mmu_try_to_unsync_pages(self, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
        """True = refuse (write-protect the new SPTE).  Marks the gfn's level-1 pages unsync."""
        if self.kvm_gfn_is_write_tracked(gfn):
            return True
        for sp in self.for_each_gfn_valid_sp_with_gptes(gfn):
            if synchronizing:
                return True
            if sp.unsync:
                continue
            if prefetch:
                return True
            self.kvm_unsync_page(sp)
        return False

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        self.trace_kvm_mmu_unsync_page(sp)
        sp.unsync = True
        self.kvm_mmu_mark_parents_unsync(sp)

    def kvm_mmu_mark_parents_unsync(self, sp: ShadowPage) -> None:
        for parent, index in sp.parent_ptes:
            self.mark_unsync(parent, index)

    def mark_unsync(self, sp: ShadowPage, index: int) -> None:
        if index in sp.unsync_child_bitmap:
            return
        sp.unsync_child_bitmap.add(index)
        sp.unsync_children += 1
        if sp.unsync_children > 1:
            return
        self.kvm_mmu_mark_parents_unsync(sp)

    def clear_unsync_child_bit(self, sp: ShadowPage, index: int) -> None:
        if index in sp.unsync_child_bitmap:
            sp.unsync_child_bitmap.discard(index)
            sp.unsync_children -= 1

    # ------------------------------------------------------------------ sync

    def mmu_unsync_walk(self, parent: ShadowPage) -> list[tuple[ShadowPage, list[tuple[ShadowPage, int]]]]:
        """Unsync level-1 descendants in index order, each with its (parent, index) path; stale
        unsync_child_bitmap bits are cleared on the way as __mmu_unsync_walk does."""
        found: list[tuple[ShadowPage, list[tuple[ShadowPage, int]]]] = []
        if not parent.unsync_children:
            return found

        def walk(sp: ShadowPage, path: list[tuple[ShadowPage, int]]) -> int:
            nr_unsync_leaf = 0
            for index in sorted(sp.unsync_child_bitmap):
                child = sp.children.get(index)
                if child is None:
                    self.clear_unsync_child_bit(sp, index)
                    continue
                if child.unsync_children:
                    ret = walk(child, path + [(sp, index)])
                    if not ret:
                        self.clear_unsync_child_bit(sp, index)
                    nr_unsync_leaf += ret
                elif child.unsync:
                    nr_unsync_leaf += 1
                    found.append((child, path + [(sp, index)]))
                else:
                    self.clear_unsync_child_bit(sp, index)
            return nr_unsync_leaf

        walk(parent, [])
        return found

    def mmu_pages_clear_parents(self, path: list[tuple[ShadowPage, int]]) -> None:
        for sp, index in reversed(path):
            self.clear_unsync_child_bit(sp, index)
            if sp.unsync_children:
                break

    def mmu_sync_children(self, vcpu: VcpuMmu, parent: ShadowPage, can_yield: bool) -> int:
        """Write-protect every unsync descendant's gfn, then unlink (event) and resync each."""
        invalid_list: list[ShadowPage] = []
        while pages := self.mmu_unsync_walk(parent):
            for sp, _ in pages:
                self.kvm_mmu_slot_gfn_write_protect(sp.gfn)
            for sp, path in pages:
                self.kvm_unlink_unsync_page(sp)
                self.kvm_sync_page(vcpu, sp, invalid_list)
                self.mmu_pages_clear_parents(path)
        self.kvm_mmu_commit_zap_page(invalid_list)
        return 0

    def kvm_unlink_unsync_page(self, sp: ShadowPage) -> None:
        self.trace_kvm_mmu_sync_page(sp)
        sp.unsync = False

    def kvm_sync_page(self, vcpu: VcpuMmu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> int:
        """Re-read the page's gptes (not traced): its SPTEs become unknown to the model.  An MMIO
        SPTE whose gpte still maps the same gfn is marked again (sync_mmio_spte): an event whose
        access comes from that gpte."""
        if sp.sptes:
            self.distrust_gptes()
        for index, spte in sp.sptes.items():
            if spte != UNKNOWN_SPTE:
                if is_mmio_spte(self.arch.mmio, spte):
                    self._emit("mark_mmio_spte", {"gfn": get_mmio_spte_gfn(self.arch.mmio, spte)}, "sync_mmio_spte",
                               (sp, index), R_SYNC_GPTE)
                sp.sptes[index] = UNKNOWN_SPTE
        return 0

    def kvm_mmu_sync_roots(self, vcpu: VcpuMmu) -> None:
        """Forget the cached MMIO access (its gva may map elsewhere now), then sync unsync children."""
        root = vcpu.root
        if root is None or self.layout.get(root.role, "direct"):
            return
        vcpu.vcpu_clear_mmio_info()
        if not root.unsync and not root.unsync_children:
            return
        self.mmu_sync_children(vcpu, root, True)

    # ------------------------------------------------------------------ SPTEs

    def _rmap_key(self, sp: ShadowPage, gfn: int) -> tuple[int, int]:
        level = sp.level
        return level, gfn >> (9 * (level - 1))

    def rmap_add(self, sp: ShadowPage, index: int, gfn: int) -> None:
        self.rmaps.setdefault(self._rmap_key(sp, gfn), {})[(sp, index)] = None

    def drop_spte(self, sp: ShadowPage, index: int, gfn: int | None = None) -> None:
        """Clear a leaf SPTE and its rmap entry (gfn: the one it maps, or look it up)."""
        sp.sptes.pop(index, None)
        for key in ([self._rmap_key(sp, gfn)] if gfn is not None else list(self.rmaps)):
            entries = self.rmaps.get(key)
            if entries is not None and entries.pop((sp, index), 0) is None:
                if not entries:
                    del self.rmaps[key]
                return

    def link_shadow_page(self, parent: ShadowPage, index: int, sp: ShadowPage) -> None:
        """__link_shadow_page: replace a huge leaf if any, point the parent SPTE at sp, propagate unsync."""
        if index in parent.sptes:
            self.drop_spte(parent, index)
        parent.children[index] = sp
        sp.parent_ptes.append((parent, index))
        if sp.unsync_children or sp.unsync:
            self.mark_unsync(parent, index)

    def drop_parent_pte(self, sp: ShadowPage, parent: ShadowPage, index: int) -> None:
        sp.parent_ptes.remove((parent, index))
        del parent.children[index]

    def mmu_set_spte(self, vcpu: VcpuMmu, sp: ShadowPage, index: int, pte_access: int, gfn: int, pfn: int,
                     fault: KvmPageFault | None) -> str:
        """Install a leaf SPTE; returns "fixed", "spurious" or "write_protected" (RET_PF_* by name)."""
        level = sp.level
        host_writable = fault is None or bool(fault.map_writable)
        prefetch = fault is None or fault.prefetch
        write_fault = fault is not None and fault.write
        unknown = None
        if fault is not None and "map_writable" in fault.unknown:
            unknown = fault.unknown["map_writable"]
        old = sp.sptes.get(index, self.rules.nonpresent_spte)
        child = sp.children.get(index)
        if old == UNKNOWN_SPTE:
            unknown = R_OLD_SPTE
            old = self.rules.nonpresent_spte
            self.drop_spte(sp, index)
        elif child is not None and level > 1:
            self.drop_parent_pte(child, sp, index)
            old = self.rules.nonpresent_spte
        elif is_shadow_present_pte(old):
            if prefetch and spte_to_pfn(old) == pfn:
                return "spurious"
            if spte_to_pfn(old) != pfn:
                self.drop_spte(sp, index, gfn)
                old = self.rules.nonpresent_spte
        was_rmapped = is_shadow_present_pte(sp.sptes.get(index, self.rules.nonpresent_spte))
        if is_noslot_pfn(pfn):
            self.mark_mmio_spte(sp, index, gfn, pte_access)
            return "emulate"

        saved, self.undecidable = self.undecidable, self.undecidable or unknown
        try:
            spte, wrprot = make_spte(
                self.flavor, self.rules.spte, level=level, ad_disabled=bool(self.layout.get(sp.role, "ad_disabled")),
                pte_access=pte_access, pfn=pfn, old_spte=old, prefetch=prefetch, synchronizing=False,
                host_writable=host_writable, nx_huge_pages=self.arch.nx_huge_pages,
                try_to_unsync=lambda: self.mmu_try_to_unsync_pages(gfn, False, prefetch))
        finally:
            self.undecidable = saved
        ret = "fixed"
        if old == spte and was_rmapped:
            ret = "spurious"
        else:
            sp.sptes[index] = spte
            sp.spte_ts[index] = self.arch.now_ns
            self.guest_may_write(sp.level, gfn, spte)
            self.trace_kvm_mmu_set_spte(sp, index, gfn, unknown)
        if wrprot and write_fault:
            ret = "write_protected"
        if not was_rmapped:
            self.rmap_add(sp, index, gfn)
        return ret

    def mark_mmio_spte(self, sp: ShadowPage, index: int, gfn: int, access: int) -> None:
        """An MMIO SPTE (no rmap: it maps no page)."""
        spte = self.arch.make_mmio_spte(gfn, access)
        self.arch.trace_mark_mmio_spte(gfn, spte, "mark_mmio_spte", subject=(sp, index))
        sp.sptes[index] = spte
        sp.spte_ts[index] = self.arch.now_ns

    def shadow_walk_last(self, vcpu: VcpuMmu, addr: int) -> tuple[ShadowPage | None, int]:
        """The shadow page and index where the walk for ``addr`` ends (a leaf or a missing link)."""
        sp = vcpu.root
        if sp is None:
            return None, 0
        while True:
            index = (addr >> (12 + 9 * (sp.level - 1))) & 511
            child = sp.children.get(index)
            if child is None:
                return sp, index
            sp = child

    def get_walk(self, vcpu: VcpuMmu, addr: int) -> int | None:
        """get_walk(): the last SPTE on the way to ``addr`` (None: the model lost its value)."""
        sp, index = self.shadow_walk_last(vcpu, addr)
        spte = self.rules.nonpresent_spte if sp is None else sp.sptes.get(index, self.rules.nonpresent_spte)
        return None if spte == UNKNOWN_SPTE else spte

    # ------------------------------------------------------------------ the fault path

    def kvm_shadow_mmu_page_fault(self, vcpu: VcpuMmu, fault: KvmPageFault) -> Generator[FaultIn, Any, str]:
        """FNAME(page_fault) after the walk (the engine judges the walk itself): page-track check,
        kvm_mmu_faultin_pfn (the yield: the pfn and its writability are inputs), then under
        mmu_lock the stale check and make_mmu_pages_available in the build's order, FNAME(fetch)."""
        walker = fault.walker
        assert walker is not None, "the engine hands shadow faults their judged guest walk"
        fault.gfn = walker.gfn
        fault.max_level = walker.level
        fault.slot = self.arch.gfn_to_memslot(fault.gfn)
        if self.page_fault_handle_page_track(vcpu, fault):
            return "write_protected"
        pte_access = walker.pte_access
        if fault.write and not pte_access & ACC_WRITE_MASK and not vcpu.cpu_role.cr0_wp and not fault.user:
            pte_access = (pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
            if vcpu.cpu_role.cr4_smep:
                pte_access &= ~ACC_EXEC_MASK
        if self.rules.stale_check_before_reclaim and fault.stale:
            return "retry"
        if self.make_mmu_pages_available(vcpu) < 0:
            return "enospc"
        if fault.stale:
            return "retry"
        return (yield from self.fetch(vcpu, fault, walker, pte_access))

    def page_fault_handle_page_track(self, vcpu: VcpuMmu, fault: KvmPageFault) -> bool:
        """A present write fault on a write-tracked gfn (a shadowed upper-level table): emulate."""
        return not fault.rsvd and fault.present and fault.write and self.kvm_gfn_is_write_tracked(fault.gfn)

    def fetch(self, vcpu: VcpuMmu, fault: KvmPageFault, gw: GuestWalker,
              pte_access: int) -> Generator[FaultIn, Any, str]:
        """FNAME(fetch): indirect shadow pages down to the guest leaf level, spte_requested, direct
        pages down to goal_level, mmu_set_spte, then FNAME(pte_prefetch) of the neighbours."""
        sp = vcpu.root
        level = sp.level
        addr = fault.addr
        while True:
            index = (addr >> (12 + 9 * (level - 1))) & 511
            sp.write_flooding_count = 0
            if level == gw.level:
                break
            table_gfn = gw.table_gfn[level - 2]
            access = gw.pt_access[level - 2]
            child = self.kvm_mmu_get_child_sp(vcpu, sp, index, table_gfn, False, access)
            if child is not None:
                if child.unsync_children:
                    self.mmu_sync_children(vcpu, child, False)
                self.link_shadow_page(sp, index, child)
            else:
                child = sp.children[index]
            self.gpte_changed(gw, level - 1)
            if fault.write and table_gfn == fault.gfn:
                fault.write_fault_to_shadow_pgtable = True
            sp, level = child, level - 1

        # kvm_mmu_faultin_pfn ran before mmu_lock; its results reach the trace only here, with
        # kvm_mmu_spte_requested, so the model asks for them where it first needs them.
        fault_in = yield FaultIn(fault.gfn)
        fault.pfn = fault_in.pfn
        fault.map_writable = fault_in.map_writable
        if is_noslot_pfn(fault.pfn):
            fault.map_writable = False
            if kvm_handle_noslot_fault(self.arch, vcpu, fault, gw.pte_access):
                return "emulate"
        elif fault.map_writable is None:
            # Only the recorder reads fault->map_writable.  A write fault always gets a writable
            # pfn (else it would not reach here).  A read fault of never-written private anonymous
            # memory maps the host's shared zero page read-only, anything else writable: decidable
            # when the trace names the zero page's pfn (metadata ``zero_pfn``).
            fault.map_writable = fault.write or (self.arch.zero_pfn is not None and fault.pfn != self.arch.zero_pfn)
            if not fault.write and self.arch.zero_pfn is None:
                fault.unknown["map_writable"] = R_MAP_WRITABLE
        if fault.slot is not None and fault.map_writable and "map_writable" not in fault.unknown:
            self.arch.guest.learn_pfn(fault.slot, fault.gfn, fault.pfn)
        self.kvm_mmu_hugepage_adjust(vcpu, fault, fault_in)
        self._emit("kvm_mmu_spte_requested", {"gfn": fault.gfn, "level": fault.goal_level},
                   "kvm_mmu_hugepage_adjust", undecidable=fault.unknown.get("goal_level"))

        while True:
            index = (addr >> (12 + 9 * (level - 1))) & 511
            base_gfn = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
            if level == fault.goal_level:
                break
            self.validate_direct_spte(sp, index, gw.pte_access)
            child = self.kvm_mmu_get_child_sp(vcpu, sp, index, base_gfn, True, gw.pte_access)
            if child is not None:
                self.link_shadow_page(sp, index, child)
            else:
                child = sp.children[index]
            sp, level = child, level - 1

        ret = self.mmu_set_spte(vcpu, sp, index, pte_access, base_gfn, fault.pfn, fault)
        if ret != "spurious":
            self.pte_prefetch(vcpu, gw, sp, index)
        return ret

    # ------------------------------------------------------------------ prefetch (inputs: replay.guest_memory)

    def gpte_changed(self, gw: GuestWalker, level: int) -> None:
        """FNAME(gpte_changed) at level 1 reads the 8-aligned group of leaf gptes FNAME(pte_prefetch)
        uses.  Whether the walked gpte itself changed is not modelled: that needs a guest write
        racing with the fault."""
        if level == 1:
            gw.prefetch_ptes = self.arch.guest.kvm_vcpu_read_guest_atomic(prefetch_group_gpa(gw.pte_gpa[0]),
                                                                          PTE_PREFETCH_NUM)

    def pte_prefetch(self, vcpu: VcpuMmu, gw: GuestWalker, sp: ShadowPage, index: int) -> None:
        """FNAME(pte_prefetch): map the group's other non-present entries, in order, until the
        first that cannot be (``prefetch_gptes`` names them); where an input is unknown the model
        stops and names it (the engine then takes the kernel's further prefetches of this page as
        undecidable)."""
        if sp.level > 1 or not self.pte_prefetch_may_map(sp):
            return
        if self.layout.get(sp.role, "direct"):
            self.__direct_pte_prefetch(vcpu, sp, index)
            return
        for i, pte_access, gfn, pfn in self.prefetch_gptes(vcpu, sp, index, gw.prefetch_ptes):
            self.mmu_set_spte(vcpu, sp, i, pte_access, gfn, pfn, None)

    def pte_prefetch_may_map(self, sp: ShadowPage) -> bool:
        """Whether FNAME(pte_prefetch) can map anything after this fault: not while an mmu_notifier
        invalidation is in progress (its pages may be going); the prefetch window is set where the
        trace does not tell (no memslot layout, an invalidation that may still run)."""
        if not self.arch.memslots_known:
            self.pte_prefetch_window = (sp, R_PREFETCH)
            return False
        if self.arch.mmu_invalidate_in_progress is None:
            self.pte_prefetch_window = (sp, R_PREFETCH_INVALIDATION)
            return False
        return not self.arch.mmu_invalidate_in_progress

    def prefetch_gptes(self, vcpu: VcpuMmu, sp: ShadowPage, index: int,
                       gptes: Sequence[int | None]) -> Iterator[tuple[int, int, int, int]]:
        """FNAME(pte_prefetch)'s loop over an indirect page's group (``gptes``, read by
        gpte_changed): each neighbour it maps, in order, as (index, pte_access, gfn, pfn); the
        caller maps it before the next is looked at.  It ends at the first the kernel does not map
        or the model cannot decide (the prefetch window then says why).  Nothing is changed here,
        so the bulk path asks it whether a fault would prefetch anything (replay/bulk.py)."""
        start = index & ~(PTE_PREFETCH_NUM - 1)
        sptes = sp.sptes
        for i in range(start, start + PTE_PREFETCH_NUM):
            if i == index:
                continue
            spte = sptes.get(i)
            if spte is not None:  # spte_present(), inlined: this loop runs for every level-1 fault
                if spte == UNKNOWN_SPTE:
                    self.pte_prefetch_window = (sp, R_OLD_SPTE)
                    return
                if spte & SPTE_MMU_PRESENT_MASK:  # is_shadow_present_pte
                    continue
            target = self.prefetch_gpte(vcpu, sp, gptes[i - start])
            if target is None:
                return
            yield i, *target

    def spte_present(self, sp: ShadowPage, index: int) -> bool | None:
        """Whether sp's SPTE at index is present; None when the model lost it (UNKNOWN_SPTE)."""
        spte = sp.sptes.get(index)
        if spte == UNKNOWN_SPTE:
            return None
        return spte is not None and is_shadow_present_pte(spte)

    def prefetch_gpte(self, vcpu: VcpuMmu, sp: ShadowPage, gpte: int | None) -> tuple[int, int, int] | None:
        """FNAME(prefetch_gpte) up to its mmu_set_spte (the caller's): the (pte_access, gfn, pfn) to
        map; None where the kernel stops (an invalid gpte, no usable memslot) or where an input is
        unknown (the prefetch window is then set)."""
        if gpte is None:
            self.pte_prefetch_window = (sp, R_PREFETCH_GPTE)
            return None
        if prefetch_invalid_gpte(PTTYPE_64, vcpu.cpu_role, gpte):
            return None  # drop_spte of a non-present SPTE: nothing to drop
        gfn = gpte_to_gfn_lvl(PTTYPE_64, gpte, 1)
        pte_access = self.layout.get(sp.role, "access") & gpte_access(PTTYPE_64, gpte)
        pte_access = protect_clean_gpte(PTTYPE_64, pte_access, gpte)
        slot = self.arch.gfn_to_memslot_dirty_bitmap(gfn, bool(pte_access & ACC_WRITE_MASK))
        if slot is None:
            return None
        pfn = self.arch.guest.gfn_to_pfn_memslot_atomic(slot, gfn)
        if pfn is None:
            self.pte_prefetch_window = (sp, R_PREFETCH_PFN)
            return None
        return pte_access, gfn, pfn

    def __direct_pte_prefetch(self, vcpu: VcpuMmu, sp: ShadowPage, index: int) -> None:
        """__direct_pte_prefetch: each run of non-present SPTEs in the group (the faulting one ends
        a run) is mapped from consecutive gfns by direct_pte_prefetch_many; a failed run ends it."""
        start = None
        base = index & ~(PTE_PREFETCH_NUM - 1)
        for i in range(base, base + PTE_PREFETCH_NUM + 1):
            present = True if i in (index, base + PTE_PREFETCH_NUM) else self.spte_present(sp, i)
            if present is None:
                self.pte_prefetch_window = (sp, R_OLD_SPTE)
                return
            if not present:
                if start is None:
                    start = i
                continue
            if start is None:
                continue
            ret = self.direct_pte_prefetch_many(vcpu, sp, start, i)
            if ret is None or ret < 0:
                return
            start = None

    def direct_pte_prefetch_many(self, vcpu: VcpuMmu, sp: ShadowPage, start: int, end: int) -> int | None:
        """direct_pte_prefetch_many: map [start, end) to sp's consecutive gfns with the page's access,
        as far as gfn_to_page_many_atomic pins pages (-1: nothing pinned; None: not known how far)."""
        access = self.layout.get(sp.role, "access")
        gfn = sp.gfn + start
        slot = self.arch.gfn_to_memslot_dirty_bitmap(gfn, bool(access & ACC_WRITE_MASK))
        if slot is None:
            return -1
        pfns, complete = self.arch.guest.gfn_to_page_many_atomic(slot, gfn, end - start)
        if complete and not pfns:
            return -1
        for i, pfn in enumerate(pfns):
            self.mmu_set_spte(vcpu, sp, start + i, access, gfn + i, pfn, None)
        if not complete:
            self.pte_prefetch_window = (sp, R_PREFETCH_PFN)
            return None
        return 0

    def learn_gpte(self, gpa: int, gpte: int) -> None:
        """A guest walk read ``gpte`` at ``gpa`` (with the A/D bits it then set): remember it unless
        the guest can write the table without a trap, i.e. a writable SPTE maps it."""
        gfn = gpa >> 12
        if not self.gptes_trusted or not self.arch.memslots_known:
            return
        known = self.arch.guest.gptes.get(gfn)
        if known is not None:
            # Known gptes of this table: no writable SPTE mapped it since (guest_may_write would have
            # forgotten them), so none maps it now.
            known[gpa] = gpte
            return
        if self.gfn_mapped_writable(gfn):
            self.arch.guest.forget_gptes(gfn, gfn)
            return
        self.arch.guest.observe_gpte(gpa, gpte)

    def gfn_mapped_writable(self, gfn: int) -> bool:
        """Some SPTE (4K or huge) lets the guest write gfn, or may (MMU-writable: fast_page_fault
        can set W without mmu_lock; unknown)."""
        writable = PT_WRITABLE_MASK | self.flavor.mmu_writable_mask
        for level in (1, 2, 3):
            for sp, index in self.rmaps.get((level, gfn >> (9 * (level - 1))), ()):
                spte = sp.sptes.get(index)
                if spte == UNKNOWN_SPTE or (spte is not None and spte & writable):
                    return True
        return False

    def guest_may_write(self, level: int, gfn: int, spte: int) -> None:
        """A (possibly) writable SPTE now maps gfn (a huge one its whole frame): the guest tables
        there may change without a trap, so what the model knew of them is void."""
        if spte == UNKNOWN_SPTE or spte & (PT_WRITABLE_MASK | self.flavor.mmu_writable_mask):
            first = gfn & ~((1 << (9 * (level - 1))) - 1)
            self.arch.guest.forget_gptes(first, first + (1 << (9 * (level - 1))) - 1)

    def distrust_gptes(self) -> None:
        """The model lost an SPTE: from now on no guest table is known to be unwritten."""
        self.gptes_trusted = False
        self.arch.guest.forget_gptes()

    def validate_direct_spte(self, sp: ShadowPage, index: int, direct_access: int) -> None:
        """Drop a direct child whose access differs from the guest leaf's (its parent SPTE only)."""
        child = sp.children.get(index)
        if child is not None and self.layout.get(child.role, "access") != direct_access:
            self.drop_parent_pte(child, sp, index)

    def kvm_mmu_hugepage_adjust(self, vcpu: VcpuMmu, fault: KvmPageFault, fault_in: Any) -> None:
        """goal_level: 4K unless the guest leaf is huge, the slot is not dirty-logged, no shadowed gfn
        is inside the huge frame, and the host maps it huge (an input only the recorder has)."""
        fault.req_level = fault.goal_level = 1
        if fault.max_level == 1 or is_noslot_pfn(fault.pfn):
            return
        if fault.slot is not None and fault.slot.flags & 1:
            return
        if fault_in.req_level is None:
            fault.unknown["goal_level"] = R_HOST_LEVEL
            level = fault_in.recorded_level
        else:
            level = min(fault.max_level, fault_in.req_level)
        while level > 1 and self._lpage_disallowed(fault.gfn, level):
            level -= 1
        fault.req_level = fault.goal_level = level
        fault.pfn &= ~((1 << (9 * (level - 1))) - 1)  # the huge page's first pfn

    def _lpage_disallowed(self, gfn: int, level: int) -> bool:
        shift = 9 * (level - 1)
        base = gfn >> shift << shift
        return any(g >> shift << shift == base for g in self.disallow_lpage)

    # ------------------------------------------------------------------ roots

    def kvm_mmu_load(self, vcpu: VcpuMmu) -> int:
        """mmu_alloc_shadow_roots (reclaim first, then the root page) and kvm_mmu_sync_roots."""
        vcpu.needs_load = False
        if vcpu.root_role is None or vcpu.root_gfn is None:
            return 0  # the engine adopts the kernel's root (docs/undecidable.md)
        self.make_mmu_pages_available(vcpu)
        self.mmu_alloc_root(vcpu, vcpu.root_gfn, vcpu.root_role)
        self.kvm_mmu_sync_roots(vcpu)
        return 0

    def mmu_alloc_root(self, vcpu: VcpuMmu, gfn: int, role: int) -> ShadowPage:
        sp = self.kvm_mmu_get_shadow_page(vcpu, gfn, role)
        sp.root_count += 1
        vcpu.root = sp
        return sp

    def kvm_mmu_free_roots(self, vcpu: VcpuMmu, free_prev: bool) -> None:
        """Previous roots first, then the current one; a root whose count drops to 0 while invalid
        is prepare-zapped again (mmu_free_root_page)."""
        invalid_list: list[ShadowPage] = []
        if free_prev:
            for _, root in vcpu.prev_roots:
                self.mmu_free_root_page(root, invalid_list)
            vcpu.prev_roots = []
        if vcpu.root is not None:
            self.mmu_free_root_page(vcpu.root, invalid_list)
            vcpu.root = None
        vcpu.needs_load = True
        self.kvm_mmu_commit_zap_page(invalid_list)

    def mmu_free_root_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> None:
        sp.root_count -= 1
        if not sp.root_count and sp.invalid:
            self.kvm_mmu_prepare_zap_page(sp, invalid_list)

    def kvm_mmu_free_obsolete_roots(self, vcpu: VcpuMmu) -> None:
        if vcpu.root is not None and self.is_obsolete_sp(vcpu.root):
            invalid_list: list[ShadowPage] = []
            self.mmu_free_root_page(vcpu.root, invalid_list)
            vcpu.root = None
            vcpu.needs_load = True
            self.kvm_mmu_commit_zap_page(invalid_list)

    # ------------------------------------------------------------------ quota

    def make_mmu_pages_available(self, vcpu: VcpuMmu) -> int:
        """Reclaim down to KVM_REFILL_PAGES free when fewer than KVM_MIN_FREE_MMU_PAGES are left."""
        avail = self.kvm_mmu_available_pages()
        if avail is None or avail >= KVM_MIN_FREE_MMU_PAGES:
            return 0  # (quota unknown: a reclaim shows up as undecidable zaps, R_QUOTA)
        self.kvm_mmu_zap_oldest_mmu_pages(KVM_REFILL_PAGES - avail)
        if not self.kvm_mmu_available_pages():
            return -28  # -ENOSPC
        return 0

    def kvm_mmu_available_pages(self) -> int | None:
        """n_max - n_used, floored at 0; None while the trace has not told the quota."""
        if self.arch.n_max_mmu_pages is None:
            return None
        return max(self.arch.n_max_mmu_pages - self.arch.n_used_mmu_pages, 0)

    def kvm_mmu_zap_oldest_mmu_pages(self, nr_to_zap: int) -> int:
        """From the tail (oldest) toward the head, skipping roots in use; stop at >= nr_to_zap."""
        total = 0
        invalid_list: list[ShadowPage] = []
        restart = True
        while restart:
            restart = False
            for sp in self.active_mmu_pages_from_tail():
                if sp not in self.active_mmu_pages:
                    continue
                if sp.root_count:
                    continue
                unstable, nr = self.__kvm_mmu_prepare_zap_page(sp, invalid_list)
                total += nr
                if total >= nr_to_zap:
                    break
                if unstable:
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid_list)
        return total

    def active_mmu_pages_from_tail(self) -> list[ShadowPage]:
        """list_for_each_entry_safe_reverse over active_mmu_pages: oldest first (a snapshot)."""
        return list(self.active_mmu_pages)

    # ------------------------------------------------------------------ zapping

    def kvm_mmu_prepare_zap_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
        return self.__kvm_mmu_prepare_zap_page(sp, invalid_list)[0]

    def __kvm_mmu_prepare_zap_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> tuple[bool, int]:
        """Event, unsync children, unlink children (orphans stay hashed) and parents, unaccount;
        a root in use leaves the active list only and waits for its last user."""
        self.trace_kvm_mmu_prepare_zap_page(sp)
        nr_zapped = self.mmu_zap_unsync_children(sp, invalid_list)
        unstable = bool(nr_zapped)
        self.kvm_mmu_page_unlink_children(sp)
        self.kvm_mmu_unlink_parents(sp)
        if not sp.invalid and self.sp_has_gptes(sp):
            self.unaccount_shadowed(sp)
        if sp.unsync:
            self.kvm_unlink_unsync_page(sp)
        if not sp.root_count:
            nr_zapped += 1
            self.active_mmu_pages.pop(sp, None)
            invalid_list.append(sp)
            self.arch.n_used_mmu_pages -= 1  # kvm_unaccount_mmu_page
        else:
            self.active_mmu_pages.pop(sp, None)
            if not self.is_obsolete_sp(sp):
                for vcpu in self.vcpus.values():
                    if vcpu.root is sp:
                        vcpu.needs_load = True  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        sp.invalid = True
        return unstable, nr_zapped

    def mmu_zap_unsync_children(self, parent: ShadowPage, invalid_list: list[ShadowPage]) -> int:
        if parent.level == 1:
            return 0
        zapped = 0
        while pages := self.mmu_unsync_walk(parent):
            for sp, path in pages:
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                self.mmu_pages_clear_parents(path)
                zapped += 1
        return zapped

    def kvm_mmu_page_unlink_children(self, sp: ShadowPage) -> None:
        for index in list(sp.sptes):
            self.drop_spte(sp, index)
        for index, child in list(sp.children.items()):
            self.drop_parent_pte(child, sp, index)

    def kvm_mmu_unlink_parents(self, sp: ShadowPage) -> None:
        for parent, index in list(sp.parent_ptes):
            self.drop_parent_pte(sp, parent, index)

    def kvm_mmu_commit_zap_page(self, invalid_list: list[ShadowPage]) -> None:
        """Free the pages: out of the hash (roots in use were never put on the list)."""
        for sp in invalid_list:
            chain = self.mmu_page_hash.get(sp.gfn)
            if chain is not None and sp in chain:
                chain.remove(sp)
                if not chain:
                    del self.mmu_page_hash[sp.gfn]
            if sp.spt_page is not None:
                self.by_spt_page.pop(sp.spt_page, None)
        invalid_list.clear()

    def kvm_shadow_mmu_zap_all(self) -> None:
        """kvm_mmu_zap_all's shadow part: from the head (newest) of active_mmu_pages, restart when
        unstable."""
        invalid_list: list[ShadowPage] = []
        restart = True
        while restart:
            restart = False
            for sp in reversed(list(self.active_mmu_pages)):
                if sp not in self.active_mmu_pages or sp.invalid:
                    continue
                if self.kvm_mmu_prepare_zap_page(sp, invalid_list):
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid_list)

    def kvm_zap_obsolete_pages(self) -> None:
        """From the tail, prepare-zap obsolete pages; stop at the first current-generation page."""
        invalid_list: list[ShadowPage] = []
        restart = True
        while restart:
            restart = False
            for sp in self.active_mmu_pages_from_tail():
                if sp not in self.active_mmu_pages:
                    continue
                if not self.is_obsolete_sp(sp):
                    break
                if sp.invalid:
                    continue
                if self.kvm_mmu_prepare_zap_page(sp, invalid_list):
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid_list)

    def kvm_shadow_mmu_unmap_gfn_range(self, start: int, end: int) -> bool:
        """kvm_zap_rmap over [start, end) at every level: leaf SPTEs go, no shadow page is zapped."""
        flush = False
        rmaps = self.rmaps
        for level in (1, 2, 3):
            shift = 9 * (level - 1)
            first, last = start >> shift, (end - 1) >> shift
            if first == last:  # one rmap head per level: a 4K host unmap, the common case
                keys: Any = ((level, first),)
            elif last - first < len(rmaps):
                keys = [(level, frame) for frame in range(first, last + 1)]
            else:
                keys = [k for k in rmaps if k[0] == level and first <= k[1] <= last]
            for key in keys:
                for sp, index in rmaps.pop(key, ()):
                    sp.sptes.pop(index, None)
                    flush = True
        return flush

    def kvm_shadow_mmu_slot_remove_write_access(self, slot: Memslot, start_level: int) -> None:
        """Dirty logging on: clear W (keep MMU-writable) on every leaf SPTE of the slot."""
        for (level, frame), entries in self.rmaps.items():
            gfn = frame << (9 * (level - 1))
            if level < start_level or not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                continue
            for sp, index in entries:
                if sp.sptes[index] != UNKNOWN_SPTE:
                    sp.sptes[index] = spte_write_protect(self.flavor, sp.sptes[index], pt_protect=False)

    # ------------------------------------------------------------------ adopting recorded outcomes

    def find_sp(self, gfn: int, role: int, mask: int) -> ShadowPage | None:
        for sp in self.mmu_page_hash.get(gfn, ()):
            if (sp.role & mask) == (role & mask & ~(1 << 11)):
                return sp
        for sp in self.active_mmu_pages:
            if sp.gfn == gfn and (sp.role & mask) == (role & mask & ~(1 << 11)):
                return sp
        return None

    def adopt(self, event: str, row: dict[str, Any], vcpu: VcpuMmu | None, mask: int = 0xFFFFFFFF) -> None:
        """Apply a recorded, undecidable outcome to the model state so later decisions start right."""
        if event == "kvm_mmu_get_page":
            sp = self.find_sp(row["gfn"], row["role"], mask)
            if sp is None:
                sp = self.kvm_mmu_alloc_shadow_page(row["gfn"], row["role"] & ~(1 << 11))
            if vcpu is not None and self.layout.get(row["role"], "level") == (vcpu.cpu_role.root_level):
                if vcpu.root is not sp:
                    if vcpu.root is not None:
                        vcpu.root.root_count = max(vcpu.root.root_count - 1, 0)
                    sp.root_count += 1
                    vcpu.root = sp
                vcpu.root_role = sp.role
                vcpu.root_gfn = sp.gfn
                vcpu.needs_load = False
        elif event == "kvm_mmu_prepare_zap_page":
            sp = self.find_sp(row["gfn"], row["role"], mask)
            if sp is not None and not (sp.invalid and not (row["role"] >> 11) & 1):
                invalid_list: list[ShadowPage] = []
                saved, self.undecidable = self.undecidable, "adopted"
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                self.undecidable = saved
                self.arch.tp.drain()
                self.kvm_mmu_commit_zap_page(invalid_list)
        elif event in ("kvm_mmu_unsync_page", "kvm_mmu_sync_page"):
            sp = self.find_sp(row["gfn"], row["role"], mask)
            if sp is not None:
                if event == "kvm_mmu_unsync_page":
                    sp.unsync = True
                    self.kvm_mmu_mark_parents_unsync(sp)
                else:
                    sp.unsync = False
        elif event == "kvm_mmu_set_spte":
            sp = self.by_spt_page.get(row["sptep"] & ~0xFFF)
            if sp is None:
                self.distrust_gptes()  # an SPTE the model cannot place may map any table writable
            else:
                index = (row["sptep"] & 0xFFF) >> 3
                if index not in sp.sptes:
                    self.rmap_add(sp, index, row["gfn"])
                sp.sptes[index] = row["spte"]
                sp.spte_ts[index] = self.arch.now_ns
                self.guest_may_write(sp.level, row["gfn"], row["spte"])

    def learn_spt_page(self, sp: ShadowPage, sptep: int) -> None:
        """Remember which kernel page holds sp's SPTEs (from an aligned kvm_mmu_set_spte)."""
        if sp.spt_page is None:
            sp.spt_page = sptep & ~0xFFF
            self.by_spt_page[sp.spt_page] = sp

    def describe(self, sp: ShadowPage) -> dict[str, Any]:
        """The model's state of a shadow page, for divergence context."""
        from replay.role import PageRole

        return {"gfn": hex(sp.gfn), "role": PageRole(sp.role, self.layout).describe(), "root_count": sp.root_count,
                "unsync": sp.unsync, "unsync_children": sp.unsync_children, "invalid": sp.invalid,
                "gen": sp.mmu_valid_gen, "present_sptes": len(sp.sptes), "children": len(sp.children),
                "parents": len(sp.parent_ptes)}


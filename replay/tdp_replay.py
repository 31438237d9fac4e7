"""Feeding a TDP-MMU VM's rows to the TDP model: the episode logic TDP faults need.

A TDP fault has no guest walk: it starts at ``kvm_page_fault`` (the NPF exit), may take the lockless
``fast_page_fault`` path, then waits for ``kvm_faultin_pfn`` (``kvm_mmu_spte_requested`` carries its
results) and maps under mmu_lock.  The engine (``VmReplay``) keeps judging: this class only decides
when a fault starts and ends, feeds its inputs, and names the missing input when a recorded TDP
decision has no prediction.  The engine hands a TDP VM's rows here first (``handle``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmutrace.errors import TraceFileError
from mmutrace.kvm.uapi import KVM_MEM_LOG_DIRTY_PAGES
from replay.decisions import KIND
from replay.mmu import FaultInResult, KvmPageFault
from replay.tdp_mmu import R_NO_ROOT, TdpMmu, TdpPage

if TYPE_CHECKING:
    from replay.engine import Thread, VmReplay, Walk

R_UNMAP = "MMU-notifier zap: memslot hva layout untraced (tracefs)"
R_UNTRACED_IOCTL = "SPTE change outside any fault or traced cause (memslot or dirty-log ioctl untraced)"
R_TEARDOWN = "VM teardown (kvm_mmu_zap_all) is untraced; the model zaps from the first zap on"
R_INVALIDATION_RETRY = ("fault retried while another thread's mmu_notifier invalidation may be in progress "
                        "(only its start is traced)")
R_NO_FAULT = "TDP map without kvm_page_fault (async page fault completion or pre-fault ioctl)"

#: Rows that end a vCPU's fault episode (the guest ran again or exited).
EPISODE_END = frozenset({"kvm_entry", "kvm_exit", "kvm_pio", "kvm_mmio", "kvm_userspace_exit", "ioctl_ret"})
TDP_DECISIONS = frozenset({"kvm_tdp_mmu_spte_changed", "kvm_mmu_get_page", "kvm_mmu_prepare_zap_page",
                           "kvm_mmu_set_spte", "kvm_mmu_split_huge_page", "fast_page_fault", "mark_mmio_spte",
                           "handle_mmio_page_fault", "kvm_mmu_spte_requested"})


class TdpReplay:
    """One TDP VM's driver: installs the TDP model into the VM's common MMU."""

    def __init__(self, vm: VmReplay) -> None:
        self.vm = vm
        self.tdp = TdpMmu(vm.arch, vm.mmu.vcpus)
        vm.mmu.tdp = self.tdp
        #: Threads whose current episode saw a host unmap the model could not translate.
        self.unmapped_blind: set[int] = set()
        #: Each thread's fault in progress, as the engine's Walk: a TDP fault has no guest walk, so
        #: kvm_faultin_pfn (where mmu_invalidate_seq is sampled) starts at the NPF itself.
        self.fault_start: dict[int, Walk] = {}
        #: Threads whose fault started while another thread's invalidation may still have run.
        self.started_in_invalidation: set[int] = set()

    def handle(self, t: Thread, ev: str, row: dict[str, Any]) -> bool:
        """Take the row if it is part of TDP episode logic; False lets the engine handle it."""
        if ev == "kvm_page_fault":
            self.end_episode(t, row)
            self.start_fault(t, row)
        elif ev in EPISODE_END:
            self.end_episode(t, row)
        elif ev == "kvm_unmap_hva_range":
            self.vm.unmap(row)
            if not self.vm.arch.memslots_known:
                self.unmapped_blind.add(t.tid)
            self.vm.take_predictions(t)
        elif ev == "kvm_mmu_zap_all_fast":
            self.zap_all_fast(t, row)
        elif ev == "ioctl_set_user_memory_region":
            self.set_memory_region(t, ev, row)
        elif ev in TDP_DECISIONS:
            if ev == "kvm_mmu_spte_requested":
                self.feed(t, row)
            self.decide(t, ev, row)
        else:
            return False
        return True

    # ---- faults

    def start_fault(self, t: Thread, row: dict[str, Any]) -> None:
        vm = self.vm
        vcpu = vm.vcpu_of(t, row.get("vcpu"))
        from replay.engine import Walk  # the engine imports this module

        self.fault_start[t.tid] = Walk(row["ts_ns"], row["addr"], row["error_code"], completed_ts=row["ts_ns"])
        if vm.invalidate_in_progress() is None:
            self.started_in_invalidation.add(t.tid)
        if vcpu.root is None or vcpu.needs_load:
            self.reload(t, vcpu)
        if vcpu.root is None:
            t.context = R_NO_ROOT
            return
        fault = KvmPageFault(addr=row["addr"], error_code=row["error_code"], is_tdp=True)
        t.fault_started = True
        t.fault = vm._prime(vm.mmu.kvm_mmu_page_fault(vcpu, fault), t)

    def reload(self, t: Thread, vcpu: Any) -> None:
        """kvm_mmu_reload before entering the guest: put an obsolete root, allocate or reuse one."""
        self.tdp.kvm_mmu_free_obsolete_roots(vcpu)
        if vcpu.root is None:
            self.tdp.kvm_tdp_mmu_alloc_root(vcpu)
        self.vm.take_predictions(t)

    def feed(self, t: Thread, row: dict[str, Any]) -> None:
        """kvm_mmu_spte_requested: kvm_faultin_pfn's results resume the waiting fault."""
        vm = self.vm
        if t.fault is None or t.fault_waiting is None:
            if t.context is None:
                t.context = R_NO_FAULT
            return
        vm.flush_pending(t, row, before="kvm_mmu_spte_requested")
        inputs = FaultInResult(pfn=row["pfn"], map_writable=row.get("map_writable"), req_level=row.get("req_level"),
                               recorded_level=row["level"])
        t.fault = vm._prime(t.fault, t, inputs)

    def end_episode(self, t: Thread, row: dict[str, Any]) -> None:
        """A fault still waiting for its pfn was retried: right when a host unmap made it stale."""
        vm = self.vm
        start = self.fault_start.pop(t.tid, None)
        if t.fault is not None and t.fault_waiting is not None and start is not None:
            stale = vm.stale_since(start, start.addr >> 12)
            if stale is None or (stale is False and t.tid in self.unmapped_blind):
                t.fault_reason = R_UNMAP
            elif stale:
                t.fault = t.fault_waiting = None
            elif t.tid in self.started_in_invalidation:
                # kvm_mmu_faultin_pfn bails out (RET_PF_RETRY) while an invalidation of the gfn is
                # in progress (6.12: mmu_invalidate_retry_gfn_unsafe); another thread's had started
                # when this fault did, and only its start is traced, so it may still have run.
                t.fault_reason = R_INVALIDATION_RETRY
        vm.end_episode(t, row)
        self.unmapped_blind.discard(t.tid)
        self.started_in_invalidation.discard(t.tid)

    def set_memory_region(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        """Common code handles the slot; a dirty-logging toggle is kvm_mmu_slot_apply_flags: on, eager
        split to 4K (kvm param eager_page_split) then write-protect every leaf (no PML on AMD), unless
        KVM_DIRTY_LOG_INITIALLY_SET (every page counts as dirty: nothing to protect); off, zap the
        tables that can become huge pages again."""
        vm = self.vm
        old = vm.arch.memslots.get(row["slot_id"])
        vm.ioctl(t, ev, row)
        new = vm.arch.memslots.get(row["slot_id"])
        if old is None or new is None or not (old.flags ^ new.flags) & KVM_MEM_LOG_DIRTY_PAGES:
            return
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.tdp.kvm_tdp_mmu_zap_collapsible_sptes(new)
            vm.take_predictions(t)
            return
        if vm.arch.kvm_dirty_log_manual_protect_and_init_set():
            return
        end = new.base_gfn + new.npages
        if str(vm.arch.kvm_params.get("eager_page_split", "Y")).upper().startswith("Y"):
            self.tdp.kvm_tdp_mmu_try_split_huge_pages(new, new.base_gfn, end, 1)
        self.tdp.kvm_tdp_mmu_wrprot_slot(new, 1)
        vm.take_predictions(t)

    # ---- decisions

    def decide(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        vm = self.vm
        if ev == "kvm_mmu_get_page" and not vm.rules.role_layout.get(row["role"], "direct"):
            raise TraceFileError("this trace is from the shadow MMU (kvm_mmu_get_page of an indirect page) but its "
                                 "metadata says tdp_mmu=true: it cannot be replayed with the TDP MMU model")
        if ev == "kvm_mmu_get_page" and t.fault is None and not t.pending:
            vcpu = vm.vcpu_of(t, row.get("vcpu"))
            if vcpu.needs_load:
                self.reload(t, vcpu)
        idx = vm.find_prediction(t, ev, row)
        if idx is None and ev == "kvm_tdp_mmu_spte_changed" and self.teardown_begins(t, row):
            idx = vm.find_prediction(t, ev, row)
        if idx is None:
            reason = self.explain(t, ev, row)
            if reason is None:
                vm.result.count(KIND[ev], "missing")
                vm.divergence("missing", ev, None, {c: vm.recorded_value(c, row) for c in ("gfn", "level")}, row, t,
                              None)
                return
            vm.undecided(t, ev, row, reason)
            return
        if ev == "kvm_tdp_mmu_spte_changed":
            self.tdp.learn_table_pfn(t.pending[idx], row)
        vm.judge(t, ev, row)

    def explain(self, t: Thread, ev: str, row: dict[str, Any]) -> str | None:
        """The input a recorded decision with no prediction depended on, or None (the model missed it)."""
        if t.context is not None:
            return t.context
        if t.fault_reason is not None:
            return t.fault_reason
        if reason := self.vm.mmio_reason(t, ev, row):
            return reason
        if t.tid in self.unmapped_blind:
            return R_UNMAP
        if t.fault is None and not self.vm.arch.memslots_known and ev in (
                "kvm_tdp_mmu_spte_changed", "kvm_mmu_prepare_zap_page", "kvm_mmu_split_huge_page", "kvm_mmu_get_page"):
            return R_UNTRACED_IOCTL
        return None

    def teardown_begins(self, t: Thread, row: dict[str, Any]) -> bool:
        """A zap outside any fault that is exactly kvm_mmu_zap_all's first write: the VM is going away.

        The cause (closing the VM, or the VMM's mm exiting) has no event; the first zap names it, and
        from there every write of the teardown is predicted and judged.
        """
        if t.fault is not None or t.pending or t.tid in self.unmapped_blind or row["new_spte"] != self.tdp.nonpresent:
            return False
        first = self.first_zap_all_write()
        if first != (row["gfn"], row["level"]):
            return False
        self.tdp.kvm_tdp_mmu_zap_all()
        self.vm.take_predictions(t)
        if t.pending:
            t.pending[0].undecidable = R_TEARDOWN
        return True

    def first_zap_all_write(self) -> tuple[int, int] | None:
        """(gfn, level) of the first SPTE kvm_tdp_mmu_zap_all would write, without writing it."""
        for root in self.tdp.roots:
            for zap_level in self.tdp.tdp_rules.zap_root_levels:
                for it in self.tdp.for_each_tdp_pte_min_level(root, min(zap_level, root.level), 0, 1 << 40):
                    if it.level == min(zap_level, root.level) and it.old_spte != self.tdp.nonpresent \
                            and it.old_spte & (1 << 11):
                        return it.gfn, it.level
        return None

    def zap_all_fast(self, t: Thread, row: dict[str, Any]) -> None:
        """A fast zap the model did not predict (its memslot ioctl is untraced): adopt it, then
        invalidate and zap the TDP roots as kvm_mmu_zap_all_fast does."""
        vm = self.vm
        if vm.find_prediction(t, "kvm_mmu_zap_all_fast", row) is not None:
            vm.judge(t, "kvm_mmu_zap_all_fast", row)
            return
        vm.undecided(t, "kvm_mmu_zap_all_fast", row, R_UNTRACED_IOCTL)
        vm.arch.mmu_valid_gen ^= 1
        self.tdp.kvm_tdp_mmu_invalidate_roots()
        self.tdp.kvm_tdp_mmu_zap_invalidated_roots()
        vm.take_predictions(t)


def wrong_model_error() -> TraceFileError:
    """A TDP-MMU event in a trace whose metadata selects the shadow MMU model."""
    return TraceFileError("this trace is from the TDP MMU (kvm_tdp_mmu_spte_changed events) but its metadata says "
                          "tdp_mmu=false: it cannot be replayed with the shadow MMU model")

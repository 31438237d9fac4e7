"""The replay engine: stream a trace through the models and give every recorded decision a verdict.

Per VM one ``KvmMmu`` (common code + shadow MMU + optional TDP MMU); per vCPU thread one
``Thread`` that collects the current guest walk and the model's pending predictions.  Inputs
(walks and their guest PTEs, pfns, memslots, quota, sregs, host unmaps) go to the model; the
model's decisions are matched in order against the recorded decisions of the same thread:

- match / mismatch (same decision, fields differ) / missing (recorded, not predicted) /
  extra (predicted, not recorded);
- undecidable: the model lacks an input (named reason); the recorded outcome is then adopted into
  the model's state so that one missing input does not turn into wrong verdicts later.

On this PVM host ``kvm_page_fault``/``kvm_entry``/``kvm_exit`` never fire: a shadow fault starts at
``kvm_mmu_pagetable_walk`` and its locked section follows on the same thread.  Emulator walks
(gva_to_gpa) look the same and never reach the locked section, so a walk becomes a fault when its
thread's next shadow-MMU decision arrives before the next walk or exit (docs/replay.md).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mmutrace import schema
from mmutrace.errors import MmutraceError, TraceFileError
from mmutrace.kvm.uapi import KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION
from replay.bulk import MIN_RUN, Pace, bulk_capable, plan_batch, replay_run
from replay.decisions import COMPARED, DECISION_EVENTS, IDENTITY, KIND, Decision, Tracepoints
from replay.mmu import (BITS_PER_LONG, KVM_REFILL_PAGES, PML_LOG_NR_ENTRIES, FaultIn, FaultInResult, KvmArch, KvmMmu,
                        KvmPageFault, VcpuMmu)
from replay.paging_tmpl import PFERR_RSVD_MASK, PTTYPE_64, GuestWalker, walk_addr_generic
from replay.role import known_role_mask
from replay.shadow_mmu import R_PARAMS, R_QUOTA, UNKNOWN_SPTE, ShadowMmu, ShadowPage
from replay.spte import PT_WRITABLE_MASK, is_mmio_spte, is_shadow_present_pte
from replay.tdp_replay import TdpReplay, wrong_model_error
from replay.versions import Split, VersionRules, rules_for_release

VERDICTS = ("matched", "mismatched", "missing", "extra", "undecidable")

R_ROOT = "root load: guest CR0/CR3/CR4/EFER untraced"
R_RELOAD = "root reload for an untraced reason (KVM_SET_SREGS untraced)"
R_TEARDOWN = "VM teardown (kvm_arch_flush_shadow_all) untraced"
R_ZAP_ALL_FAST = "memslot change untraced (cause of kvm_mmu_zap_all_fast)"
R_EMULATION = "emulated write to a shadowed guest page table: instruction and bytes untraced"
R_STALE = "mmu_notifier invalidation during the fault: memslot hva layout untraced"
R_STALE_RACE = "mmu_notifier invalidation raced with the fault: only its start is traced"
R_LOST = "events lost on this CPU"
R_WALK = "guest walk incomplete in the trace (a kvm_mmu_paging_element missing)"
R_TDP = "TDP MMU decision: no TDP MMU model installed"
R_MEMSLOT_UPDATING = "MMIO decision while another thread's KVM_SET_USER_MEMORY_REGION was in flight"
R_MMIO_CACHE = "vCPU MMIO cache: an exit that may have cleared it (CR0/CR3/CR4/EFER write, INVLPG, task switch)"
#: Exits whose handling may clear the vCPU's cached MMIO access (kvm_mmu_new_pgd on a CR3 load,
#: kvm_mmu_reset_context on a CR0/CR4/EFER change, kvm_mmu_invlpg / invpcid): the exit does not
#: say whether it did, so the cache becomes unknown.  By vendor module (uapi svm.h / vmx.h codes).
MMIO_CACHE_EXITS: dict[str, frozenset[int]] = {
    "kvm_amd": frozenset({0x010, 0x013, 0x014, 0x065, 0x079, 0x07A, 0x07C, 0x07D, 0x08F, 0x090, 0x094, 0x0A2}),
    "kvm_intel": frozenset({9, 14, 28, 32, 58}),
}
#: Decisions that read the memslot generation (a TDP MMIO SPTE's spte_changed too: see mmio_reason).
MMIO_EVENTS = frozenset({"mark_mmio_spte", "handle_mmio_page_fault"})

#: Events that end a vCPU thread's current episode (the guest ran again or exited to userspace).
BOUNDARY_EVENTS = frozenset({"kvm_entry", "kvm_exit", "kvm_pio", "kvm_mmio", "kvm_userspace_exit",
                             "ioctl_ret", "kvm_page_fault"})
#: Decisions made under mmu_lock in the fault path or by ioctl/notifier work.
LOCKED_EVENTS = frozenset({"kvm_mmu_get_page", "kvm_mmu_prepare_zap_page", "kvm_mmu_unsync_page",
                           "kvm_mmu_sync_page", "kvm_mmu_spte_requested", "kvm_mmu_set_spte",
                           "kvm_mmu_zap_all_fast", "kvm_mmu_split_huge_page"})
WALK_DECISIONS = frozenset({"kvm_mmu_set_accessed_bit", "kvm_mmu_set_dirty_bit", "kvm_mmu_walker_error"})

#: Which decision kinds each non-upstream kvm parameter can change, when not at its default.
PARAM_EFFECTS: dict[str, frozenset[str]] = {
    "eager_zap_unsync_children": frozenset({"kvm_mmu_prepare_zap_page", "kvm_mmu_sync_page"}),
    "flush_on_reuse": frozenset({"kvm_mmu_sync_page", "kvm_mmu_get_page"}),
    "kick_only_root_holders": frozenset({"kvm_mmu_get_page", "kvm_mmu_prepare_zap_page"}),
    "parent_ptes_recycle_threshold": frozenset({"kvm_mmu_set_spte", "kvm_mmu_prepare_zap_page"}),
}

#: Columns the engine reads (the rest of the schema is never loaded).
READ_COLUMNS = ["ts_ns", "cpu", "seq", "tid", "vm", "vcpu", "event", "gfn", "level", "role", "root_count",
                "mmu_valid_gen", "unsync", "created", "spte", "sptep", "pfn", "addr", "end", "error_code",
                "mmu_used", "mmu_max", "map_writable", "req_level", "count", "slot_id", "slot_base_gfn",
                "slot_npages", "slot_hva", "slot_flags", "cr0", "cr3", "cr4", "efer", "ret", "old_spte",
                "new_spte", "as_id", "access", "gen", "cap", "value", "size", "ioctl", "exit_reason"]

#: Rows converted to Python at a time: a whole row group's columns as Python ints would cost more
#: memory than the model state of a large trace (~40 bytes a value); 64k rows keep it to ~60 MB.
BATCH_ROWS = 65536


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    """Verdict counters, divergences and the model's own decision stream of one replay."""

    kernel_release: str | None
    rules: VersionRules
    split: Split
    #: (kind, verdict) -> count; ``counters`` and ``by_kind`` are views of it.
    tally: dict[tuple[str, str], int] = field(default_factory=dict)
    divergences: list[dict[str, Any]] = field(default_factory=list)
    divergences_total: int = 0
    undecidable_reasons: Counter = field(default_factory=Counter)
    adopted: int = 0
    #: Inputs the engine inferred from the first decision that revealed them (docs/undecidable.md).
    inferred: dict[str, Any] = field(default_factory=dict)
    events: int = 0
    #: Rows the bulk path replayed (replay/bulk.py); not part of the verdicts or the JSON.
    bulk_events: int = 0
    max_divergences: int | None = None
    #: None when the caller did not ask for the model's event stream (it grows with the trace).
    _model_rows: list[dict[str, Any]] | None = field(default_factory=list)

    def count(self, kind: str, verdict: str, n: int = 1) -> None:
        """Add ``n`` decisions of ``kind`` with ``verdict`` (the bulk path adds a run's at once)."""
        if n:
            key = (kind, verdict)
            self.tally[key] = self.tally.get(key, 0) + n

    @property
    def by_kind(self) -> dict[str, Counter]:
        """Verdict counters per decision kind, each with its ``decisions`` total."""
        per: dict[str, Counter] = {}
        for (kind, verdict), n in self.tally.items():
            c = per.setdefault(kind, Counter())
            c[verdict] += n
            c["decisions"] += n
        return per

    @property
    def counters(self) -> Counter:
        """Verdict counters over all kinds, with the ``decisions`` total."""
        total: Counter = Counter()
        for c in self.by_kind.values():
            total.update(c)
        return total

    @property
    def diverged(self) -> bool:
        return bool(self.counters["mismatched"] or self.counters["missing"] or self.counters["extra"])

    def to_json(self) -> dict[str, Any]:
        """The one JSON object of ``mmutrace replay --json`` (docs/replay.md)."""
        keys = ("decisions",) + VERDICTS
        counters = self.counters
        return {
            **{k: int(counters[k]) for k in keys},
            "by_kind": {kind: {k: int(c[k]) for k in keys} for kind, c in sorted(self.by_kind.items())},
            "divergences": self.divergences,
            "divergences_total": self.divergences_total,
            "undecidable_reasons": dict(self.undecidable_reasons.most_common()),
            "adopted": self.adopted,
            "inferred": self.inferred,
            "events": self.events,
            "split": self.split.value,
            "kernel_release": self.kernel_release,
            "version_rules": self.rules.name,
        }

    def model_events(self) -> pa.Table:
        """The model's decisions as a trace (what the kernel would have recorded were it the model)."""
        if self._model_rows is None:
            raise MmutraceError("this replay ran with keep_model_events=False: no model events kept")
        columns: dict[str, list[Any]] = {f.name: [] for f in schema.ARROW_SCHEMA}
        for seq, row in enumerate(self._model_rows):
            for name in columns:
                columns[name].append(row.get(name))
            columns["seq"][-1] = seq
        arrays = [pa.array(columns[f.name], type=f.type) if f.name != "event"
                  else pa.array(columns["event"], pa.string()).dictionary_encode().cast(f.type)
                  for f in schema.ARROW_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=schema.ARROW_SCHEMA)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def open_for_replay(path: str | Path) -> tuple[dict[str, Any], Callable[[], Iterator[pa.RecordBatch]]]:
    """The trace's metadata and a batch iterator over the columns replay reads (row group by group)."""
    from mmutrace.storage import open_trace

    reader = open_trace(path)
    present = [c for c in READ_COLUMNS if c in reader.schema.names]

    def batches() -> Iterator[pa.RecordBatch]:
        yield from reader.iter_batches(columns=present, batch_rows=BATCH_ROWS)

    return reader.metadata, batches


def _to_pylist(column: pa.Array) -> list[Any]:
    """``column.to_pylist()``; a dictionary column (the event name) through its few distinct values,
    which is ~100x faster than Arrow's per-value conversion (the dominant cost of reading it)."""
    if pa.types.is_dictionary(column.type) and column.null_count == 0:
        names = np.asarray(column.dictionary.to_pylist(), dtype=object)
        return names[column.indices.to_numpy(zero_copy_only=False)].tolist()
    return column.to_pylist()


class Columns(dict):
    """A batch's columns as Python lists, each converted the first time a handler reads it."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        super().__init__()
        self.batch = batch

    def __missing__(self, name: str) -> list[Any]:
        if name in self.batch.schema.names:
            values = _to_pylist(self.batch.column(name))
        else:
            values = [None] * self.batch.num_rows
        self[name] = values
        return values

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name]  # an absent column reads as all-null


# --------------------------------------------------------------------------------------------
# Per-thread and per-VM state
# --------------------------------------------------------------------------------------------


@dataclass
class Walk:
    """A kvm_mmu_pagetable_walk and the guest PTEs read after it."""

    ts: int
    addr: int
    access: int
    ptes: list[int] = field(default_factory=list)
    walker: GuestWalker | None = None
    #: When the walk (and its guest A/D writes) was over: kvm_mmu_faultin_pfn starts after it.
    completed_ts: int = 0


@dataclass
class Thread:
    """A thread's episode in progress: its walk, its fault, the model's pending predictions."""

    tid: int
    vcpu: VcpuMmu | None = None
    walk: Walk | None = None
    fault: Any = None  # the suspended fault generator
    fault_waiting: FaultIn | None = None
    fault_started: bool = False
    fault_reason: str | None = None  # every prediction of this fault is undecidable for this reason
    pending: deque = field(default_factory=deque)
    #: Predictions of this episode already judged extra (a later recorded twin is then "missing").
    extras: list = field(default_factory=list)
    context: str | None = None  # why unexplained decisions on this thread are undecidable
    #: The page the last fault's prefetch may have filled beyond the model's prediction, and why.
    prefetch: tuple[ShadowPage, str] | None = None
    reclaimed_unknown_quota: bool = False
    #: Set by a write-protected fault until the thread's next exit: emulator zaps are undecidable.
    emulating: str | None = None
    last_ts: int = 0
    #: KVM_CLEAR_DIRTY_LOG's mask words recorded before its ioctl row: first page -> word.
    clear_masks: dict[int, int] = field(default_factory=dict)


class VmReplay:
    """One VM: its model and threads; consumes rows in trace order."""

    def __init__(self, vm: int, rules: VersionRules, split: Split, meta: dict[str, Any], result: ReplayResult,
                 shadow_factory: Callable[[KvmArch, dict[int, VcpuMmu]], ShadowMmu], lost_cpus: set[int],
                 role_mask: int) -> None:
        self.vm = vm
        self.result = result
        self.rules = rules
        self.tp = Tracepoints()
        self.arch = KvmArch(rules=rules, tp=self.tp, kvm_params=dict(meta.get("kvm_params") or {}))
        self.arch.nx_huge_pages = str(self.arch.kvm_params.get("nx_huge_pages", "N")).upper().startswith("Y")
        self.arch.zero_pfn = meta.get("zero_pfn")
        if "ioctl_enable_cap" in (meta.get("event_inputs") or {}):
            self.arch.manual_dirty_log_protect = 0  # traced: off until a KVM_ENABLE_CAP row says otherwise
        if str((meta.get("vendor_params") or {}).get("enable_pml", "N")).upper().startswith("Y"):
            self.arch.cpu_dirty_log_size = PML_LOG_NR_ENTRIES
        self.mmu = KvmMmu(self.arch, None, None, split, bool(meta.get("tdp_mmu")))  # type: ignore[arg-type]
        self.shadow = shadow_factory(self.arch, self.mmu.vcpus)
        self.mmu.shadow = self.shadow
        #: TDP-MMU VMs: faults start at kvm_page_fault and go to the TDP model (replay/tdp_replay.py).
        self.tdp_replay = TdpReplay(self) if self.mmu.tdp_mmu_enabled else None
        self.threads: dict[int, Thread] = {}
        self.lost_cpus = lost_cpus
        self.role_mask = role_mask
        #: (ts, gfn ranges hit; None when the memslot layout is unknown) of recent host unmaps.
        self.unmaps: deque[tuple[int, list[tuple[int, int]] | None]] = deque(maxlen=64)
        params = self.arch.non_default_params()
        self.param_kinds = frozenset().union(*(PARAM_EFFECTS.get(p, frozenset()) for p in params))
        #: Why the last stale_since() could not decide.
        self.stale_reason: str | None = None
        #: tid -> when it last started an invalidation that hit a memslot (or an unknown layout).
        self.invalidations: dict[int, int] = {}
        #: The thread inside KVM_SET_USER_MEMORY_REGION (entry traced, return not yet): the
        #: generation other threads read meanwhile may be the old one, in progress, or the new one.
        self.memslot_update_tid: int | None = None
        self.mmio_cache_exits = MMIO_CACHE_EXITS.get(meta.get("kvm_backend") or "", frozenset())

    # ---- threads and vCPUs

    def thread(self, tid: int) -> Thread:
        t = self.threads.get(tid)
        if t is None:
            t = self.threads[tid] = Thread(tid)
        return t

    def vcpu_of(self, t: Thread, vcpu_id: int | None) -> VcpuMmu:
        """The vCPU a thread runs: its vcpu id when the trace has it, else the thread id."""
        if t.vcpu is None:
            t.vcpu = self.mmu.vcpu(vcpu_id if vcpu_id is not None else t.tid)
        return t.vcpu

    # ---- the row dispatcher

    def open_walk(self, tid: int) -> Walk | None:
        """The walk a guest PTE of thread ``tid`` belongs to (None outside a walk)."""
        t = self.threads.get(tid)
        return None if t is None else t.walk

    def handle(self, ev: str, row: dict[str, Any]) -> None:
        """One event other than a guest PTE (those go straight to ``open_walk``)."""
        t = self.thread(row["tid"])
        t.last_ts = self.arch.now_ns = row["ts_ns"]
        if ev == "ioctl_ret":
            self.ioctl_ret(row)
        elif ev == "kvm_exit" and row["exit_reason"] in self.mmio_cache_exits:
            self.vcpu_of(t, row.get("vcpu")).mmio_info_unknown = R_MMIO_CACHE
        if self.tdp_replay is not None and self.tdp_replay.handle(t, ev, row):
            return
        if ev == "kvm_tdp_mmu_spte_changed" and self.tdp_replay is None:
            raise wrong_model_error()
        if row.get("mmu_max") is not None:
            self.arch.n_max_mmu_pages = row["mmu_max"]  # the recorder's quota input
        if t.vcpu is None and row.get("vcpu") is not None and not ev.startswith("ioctl_"):
            self.vcpu_of(t, row["vcpu"])
        if ev == "kvm_mmu_pagetable_walk":
            if t.walk is not None and t.walk.walker is None:
                self.complete_walk(t, row)
            self.end_episode(t, row)
            self.vcpu_of(t, row.get("vcpu"))
            t.walk = Walk(row["ts_ns"], row["addr"], row["error_code"])
            return
        if t.walk is not None and t.walk.walker is None:
            self.complete_walk(t, row)
        if ev in WALK_DECISIONS:
            if t.walk is not None:
                t.walk.completed_ts = row["ts_ns"]  # the guest A/D writes are still part of the walk
            self.judge(t, ev, row)
        elif ev in LOCKED_EVENTS:
            self.locked_decision(t, ev, row)
        elif ev == "kvm_unmap_hva_range":
            self.unmap(row)
        elif ev == "kvm_tdp_mmu_spte_changed" or ev in DECISION_EVENTS:
            self.judge(t, ev, row)
        elif ev.startswith("ioctl_"):
            self.ioctl(t, ev, row)
        elif ev in BOUNDARY_EVENTS:
            self.end_episode(t, row)
            t.emulating = None
            if ev == "kvm_page_fault" and row["error_code"] & PFERR_RSVD_MASK:
                self.mmio_page_fault(t, row)

    def mmio_page_fault(self, t: Thread, row: dict[str, Any]) -> None:
        """kvm_mmu_page_fault's RSVD branch for a shadow root: the walk that follows a stale
        generation ("invalid") is the normal fault, which the walk events start as usual."""
        vcpu = self.vcpu_of(t, row.get("vcpu"))
        self.mmu.handle_mmio_page_fault(vcpu, row["addr"], self.mmu.root_role_direct(vcpu))
        self.take_predictions(t)

    def ioctl_ret(self, row: dict[str, Any]) -> None:
        """A traced KVM_CREATE_VM starts the memslot generation; a failed memslot update loses it."""
        if row.get("ioctl") == KVM_CREATE_VM and row.get("ret", -1) >= 0:
            self.mmu.kvm_create_vm()
        elif row.get("ioctl") == KVM_SET_USER_MEMORY_REGION:
            if row["tid"] == self.memslot_update_tid:
                self.memslot_update_tid = None
            if row.get("ret"):
                self.mmu.kvm_set_memory_region_failed()

    # ---- walks and faults

    def complete_walk(self, t: Thread, row: dict[str, Any]) -> None:
        """The walk's PTEs are all in: predict its A/D writes or its error (FNAME(walk_addr_generic))."""
        walk = t.walk
        vcpu = self.vcpu_of(t, row.get("vcpu"))
        root_gfn = vcpu.root_gfn if vcpu.root_gfn is not None else (vcpu.root.gfn if vcpu.root else 0)
        walk.completed_ts = row["ts_ns"]
        walk.walker = w = walk_addr_generic(PTTYPE_64, vcpu.cpu_role, root_gfn, walk.addr, walk.access, walk.ptes)
        reason = R_WALK if w.truncated else (
            None if vcpu.root is not None or vcpu.root_gfn is not None else R_ROOT)
        for event, gpa in w.ad_writes:
            t.pending.append(Decision(event, {"addr": gpa}, "FNAME(update_accessed_dirty_bits)", reason))
        if not w.truncated and len(walk.ptes) == w.max_level:
            # The walk read the leaf table: the gpte, with the A/D bits it set when it succeeded.
            self.shadow.learn_gpte(w.pte_gpa[0], w.ptes[0] if w.fault_error_code is None else walk.ptes[-1])
        if w.fault_error_code is not None:
            t.pending.append(Decision("kvm_mmu_walker_error", {"error_code": w.fault_error_code},
                                      "FNAME(walk_addr_generic)", reason))
        elif not w.truncated:
            probe = KvmPageFault(addr=walk.addr, error_code=walk.access, gfn=w.gfn)
            if self.shadow.page_fault_handle_page_track(vcpu, probe):
                # RET_PF_WRITE_PROTECTED before mmu_lock: the instruction is emulated next, and what
                # the emulator writes (and so zaps) is not in the trace.
                t.emulating = R_EMULATION
                self.arch.guest.forget_gptes()

    def start_fault(self, t: Thread, row: dict[str, Any]) -> None:
        """The walk was a fault's: run kvm_mmu_page_fault up to its first wait for inputs."""
        walk, vcpu = t.walk, t.vcpu
        t.fault_started = True
        w = walk.walker
        if w is None or w.fault_error_code is not None or w.truncated or vcpu is None or vcpu.root is None:
            t.context = R_ROOT if vcpu is None or vcpu.root is None else R_WALK
            return
        fault = KvmPageFault(addr=walk.addr, error_code=walk.access, walker=w)
        stale = self.stale_since(walk, w.gfn)
        if stale is None:
            t.fault_reason = self.stale_reason
        fault.stale = bool(stale)
        self.correct_from_error_code(vcpu, fault, walk.ts)
        t.fault = self._prime(self.mmu.kvm_mmu_page_fault(vcpu, fault), t)

    def _prime(self, gen: Any, t: Thread, value: Any = None) -> Any:
        """Advance a fault generator to its next wait (or its end), queueing what it decided."""
        try:
            request = gen.send(value)
        except StopIteration as stop:
            self.fault_done(t, stop.value)
            self.take_predictions(t)
            return None
        t.fault_waiting = request
        self.take_predictions(t)
        return gen

    def fault_done(self, t: Thread, ret: Any) -> None:
        t.fault_waiting = None
        if ret == "write_protected":
            t.context = R_EMULATION
            self.arch.guest.forget_gptes()
        if self.shadow.pte_prefetch_window is not None:
            t.prefetch = self.shadow.pte_prefetch_window
            self.shadow.pte_prefetch_window = None

    def take_predictions(self, t: Thread) -> None:
        for d in self.tp.drain():
            if not d.undecidable:
                d.undecidable = t.fault_reason or (R_PARAMS if d.event in self.param_kinds else None)
                if self.memslot_update_tid is not None and not d.undecidable:
                    d.undecidable = self.mmio_reason(t, d.event, d.values)
            t.pending.append(d)

    def mmio_reason(self, t: Thread, ev: str, values: Any) -> str | None:
        """R_MEMSLOT_UPDATING for a decision that reads the generation during another thread's update."""
        if self.memslot_update_tid in (None, t.tid):
            return None
        if ev in MMIO_EVENTS or (ev == "kvm_tdp_mmu_spte_changed"
                                 and is_mmio_spte(self.arch.mmio, values.get("new_spte") or 0)):
            return R_MEMSLOT_UPDATING
        return None

    def correct_from_error_code(self, vcpu: VcpuMmu, fault: KvmPageFault, walk_ts: int) -> None:
        """The hardware error code is an input about the SPTE the guest used when it faulted:
        "not present" means a leaf the model holds was zapped by an untraced path (an MMU-notifier
        range the model could not place); a present write fault means it was write-protected
        (dirty logging).  Only SPTEs written before the fault's walk are corrected: another vCPU
        may have installed one since (the race multi_vcpu records)."""
        sp, index = self.shadow.shadow_walk_last(vcpu, fault.addr)
        if sp is None or index not in sp.sptes or sp.spte_ts.get(index, 0) >= walk_ts:
            return
        spte = sp.sptes[index]
        if spte != UNKNOWN_SPTE and not is_shadow_present_pte(spte):
            return  # an MMIO SPTE: its faults are RSVD faults, not about a lost leaf
        if not fault.present:
            self.shadow.drop_spte(sp, index)
            self.result.adopted += 1
        elif fault.write and spte != UNKNOWN_SPTE and spte & PT_WRITABLE_MASK:
            sp.sptes[index] = spte & ~PT_WRITABLE_MASK
            self.result.adopted += 1

    def stale_since(self, walk: Walk, gfn: int) -> bool | None:
        """is_page_fault_stale(): did an invalidation hitting a memslot move mmu_invalidate_seq
        after this fault sampled it (in kvm_mmu_faultin_pfn, after its walk)?  Only the start of an
        invalidation is traced, so: an unmap of the fault's own gfn after the walk (its own COW
        break) makes it stale; an unmap of another gfn during the fault, or of its gfn during the
        walk, may or may not (None: undecidable)."""
        if not self.unmaps or self.unmaps[-1][0] < walk.ts:
            return False
        self.stale_reason = None
        for uts, ranges in self.unmaps:
            if uts < walk.ts:
                continue
            if ranges is None:
                self.stale_reason = R_STALE
            elif any(lo <= gfn < hi for lo, hi in ranges):
                if uts >= walk.completed_ts:
                    return True
                self.stale_reason = self.stale_reason or R_STALE_RACE
            elif ranges:
                self.stale_reason = self.stale_reason or R_STALE_RACE
        return None if self.stale_reason else False

    def locked_decision(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        fault_walk = (not t.pending and t.fault is None and not t.fault_started and t.walk is not None
                      and t.walk.walker is not None and t.context is None and t.emulating is None)
        if fault_walk and ev == "kvm_mmu_prepare_zap_page" and self.arch.n_max_mmu_pages is None:
            # make_mmu_pages_available() reclaimed, with a quota the trace does not carry: adopt
            # the zaps, then the fault starts from the state they left.
            self.undecided(t, ev, row, R_QUOTA)
            t.reclaimed_unknown_quota = True
            return
        if fault_walk:
            if t.reclaimed_unknown_quota:
                # A reclaim refills to exactly KVM_REFILL_PAGES free pages (kvm_mmu_zap_oldest_mmu_pages
                # stops at the first total >= 25 - available): that reveals the quota.
                self.arch.n_max_mmu_pages = self.arch.n_used_mmu_pages + KVM_REFILL_PAGES
                self.result.inferred["n_max_mmu_pages"] = self.arch.n_max_mmu_pages
            self.start_fault(t, row)
        if ev == "kvm_mmu_spte_requested" and t.fault is not None and t.fault_waiting is not None:
            # Everything the model decided before kvm_mmu_faultin_pfn's results were needed and
            # the kernel did not record is extra; then feed the inputs.
            self.flush_pending(t, row, before="kvm_mmu_spte_requested")
            inputs = FaultInResult(pfn=row["pfn"], map_writable=row.get("map_writable"),
                                   req_level=row.get("req_level"), recorded_level=row["level"])
            self.arch.mmu_invalidate_in_progress = self.invalidate_in_progress()
            t.fault = self._prime(t.fault, t, inputs)
        if not t.pending and t.vcpu is not None and t.vcpu.needs_load and t.fault is None:
            self.mmu.kvm_mmu_reload(t.vcpu)
            self.take_predictions(t)
        self.judge(t, ev, row)

    def flush_pending(self, t: Thread, row: dict[str, Any], before: str) -> None:
        """Predictions queued ahead of the recorded ``before`` event that never came: extra."""
        while t.pending and t.pending[0].event != before:
            self.verdict_extra(t, t.pending.popleft(), row)

    def end_episode(self, t: Thread, row: dict[str, Any]) -> None:
        """The thread's episode is over: what the model still expects did not happen."""
        if t.fault is not None and t.fault_waiting is not None and not t.fault_reason and t.context is None:
            self.result.count("spte_requested", "extra")
            self.divergence("extra", "kvm_mmu_spte_requested", {"gfn": t.fault_waiting.gfn}, None, row, t,
                            "FNAME(fetch)")
        while t.pending:
            self.verdict_extra(t, t.pending.popleft(), row)
        t.walk = None
        t.extras.clear()
        t.fault = t.fault_waiting = None
        t.fault_started = False
        t.fault_reason = None
        t.context = None
        t.prefetch = None
        t.reclaimed_unknown_quota = False

    # ---- host and ioctl inputs

    def unmap(self, row: dict[str, Any]) -> None:
        """kvm_unmap_hva_range: notifier leaf zaps; whether it hit a memslot decides stale faults."""
        hit = self.mmu.kvm_mmu_notifier_invalidate_range_start(row["addr"], row["end"]) \
            if self.arch.memslots_known else None
        self.unmapped(row, hit)

    def unmapped(self, row: dict[str, Any], hit: list[tuple[int, int]] | None) -> None:
        """After a host unmap's leaf zaps (``hit``: the gfn ranges, None with no memslot layout):
        remember it for is_page_fault_stale and mmu_invalidate_in_progress; the host pages (and
        guest tables) of the range are no longer known."""
        self.unmaps.append((row["ts_ns"], hit))
        self.arch.guest.kvm_unmap_hva_range(row["addr"], row["end"])
        if hit is None:
            self.arch.guest.forget_gptes()
        for first, end in hit or ():
            self.arch.guest.forget_gptes(first, end - 1)
        if hit is None or hit:
            self.invalidations[row["tid"]] = row["ts_ns"]

    def invalidate_in_progress(self) -> bool | None:
        """kvm->mmu_invalidate_in_progress, for a fault in its mmu_lock section now: an invalidation
        ends before its thread does anything else, so it is over once that thread shows up again
        (False); one whose thread has not been seen since may still run (None: undecidable)."""
        if not self.invalidations:
            return False
        for tid, ts in list(self.invalidations.items()):
            if self.threads[tid].last_ts > ts:
                del self.invalidations[tid]
        return None if self.invalidations else False

    def forget_memslot_gptes(self, slot_id: int, base_gfn: int, npages: int) -> None:
        """A memslot change gives the gpas of the old and the new range other contents."""
        old = self.arch.memslots.get(slot_id)
        if old is not None:
            self.arch.guest.forget_gptes(old.base_gfn, old.base_gfn + old.npages - 1)
        if npages:
            self.arch.guest.forget_gptes(base_gfn, base_gfn + npages - 1)

    def ioctl(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        self.end_episode(t, row)
        if ev == "ioctl_set_user_memory_region":
            self.forget_memslot_gptes(row["slot_id"], row["slot_base_gfn"], row["slot_npages"])
            self.memslot_update_tid = t.tid
            self.mmu.kvm_set_memory_region(row["slot_id"], row["slot_base_gfn"], row["slot_npages"],
                                           row["slot_hva"], row["slot_flags"] or 0)
        elif ev == "ioctl_set_nr_mmu_pages":
            self.mmu.kvm_vm_ioctl_set_nr_mmu_pages(row["count"])
        elif ev == "ioctl_set_sregs" and row.get("cr0") is not None:
            vcpu = self.mmu.vcpu(row["vcpu"] if row.get("vcpu") is not None else t.tid)
            self.mmu.kvm_set_sregs(vcpu, row["cr0"], row["cr3"], row["cr4"], row["efer"])
        elif ev == "ioctl_enable_cap":
            self.mmu.kvm_vm_ioctl_enable_cap_generic(row["cap"], row["value"])
        elif ev == "ioctl_dirty_bitmap":
            t.clear_masks[row["addr"]] = row["value"]
        elif ev == "ioctl_get_dirty_log":
            t.context = self.mmu.kvm_get_dirty_log_protect(row["slot_id"])
        elif ev == "ioctl_clear_dirty_log":
            masks, t.clear_masks = t.clear_masks, {}
            complete = row.get("size") is not None and row["size"] * BITS_PER_LONG >= row["count"]
            t.context = self.mmu.kvm_clear_dirty_log_protect(row["slot_id"], row["addr"], row["count"],
                                                             masks if complete else None)
        self.take_predictions(t)

    # ---- judging

    def judge(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        kind = KIND[ev]
        lost = R_LOST if self.lost_cpus and row["cpu"] in self.lost_cpus else None
        pending = t.pending
        if pending and pending[0].event == ev and not lost and not pending[0].undecidable \
                and not self.compare(pending[0], row):
            # the common case: the next prediction, equal in every judged column
            self.matched(t, pending.popleft(), row)
            return
        idx = self.find_prediction(t, ev, row)
        if idx is None:
            if lost:
                self.undecided(t, ev, row, lost)
            else:
                self.unexplained(t, ev, row)
            return
        for _ in range(idx):
            t.extras.append(self.verdict_extra(t, t.pending.popleft(), row))
        d = t.pending.popleft()
        d.undecidable = d.undecidable or lost
        diff = self.compare(d, row)
        if d.undecidable:
            # The model already applied its own guess; the kernel's outcome replaces it only where
            # they differ.
            self.undecided(t, ev, row, d.undecidable, adopt=bool(diff))
            return
        if not diff:
            self.matched(t, d, row)
            return
        self.record_model(d, row)
        if ev == "kvm_mmu_set_spte" and isinstance(d.subject, tuple) and "sptep_offset" not in diff:
            self.shadow.learn_spt_page(d.subject[0], row["sptep"])
        self.result.count(kind, "mismatched")
        self.divergence("mismatch", ev, {k: d.values.get(k) for k in diff},
                        {k: self.recorded_value(k, row) for k in diff}, row, t, d.twin, d)

    def matched(self, t: Thread, d: Decision, row: dict[str, Any]) -> None:
        self.record_model(d, row)
        if d.event == "kvm_mmu_set_spte" and isinstance(d.subject, tuple):
            self.shadow.learn_spt_page(d.subject[0], row["sptep"])
        self.result.count(d.kind, "matched")

    def find_prediction(self, t: Thread, ev: str, row: dict[str, Any]) -> int | None:
        """The pending prediction this recorded event answers: same decision (identity) first,
        else the first of the same kind."""
        first_kind = None
        ident = tuple(self.recorded_value(c, row) for c in IDENTITY[ev])
        for i, d in enumerate(t.pending):
            if d.event != ev:
                continue
            if first_kind is None:
                first_kind = i
            if self.identity(d) == ident:
                return i
        if any(d is not None and d.event == ev and self.identity(d) == ident for d in t.extras):
            return None  # predicted earlier and judged extra: the kernel did it later (order)
        return first_kind

    def identity(self, d: Decision) -> tuple:
        return tuple(self.masked(c, d.values.get(c)) for c in IDENTITY[d.event])

    def masked(self, column: str, value: Any) -> Any:
        if column == "role" and value is not None:
            return value & self.role_mask
        return value

    def recorded_value(self, column: str, row: dict[str, Any]) -> Any:
        if column == "sptep_offset":
            return None if row.get("sptep") is None else row["sptep"] & 0xFFF
        return self.masked(column, row.get(column))

    def compare(self, d: Decision, row: dict[str, Any]) -> list[str]:
        """The judged columns where prediction and record differ (once per decision: kept inline,
        it is recorded_value/masked without their calls)."""
        diff = []
        values = d.values
        for column in COMPARED[d.event]:
            if column == "sptep_offset":
                recorded = row.get("sptep")
                if recorded is not None:
                    recorded &= 0xFFF
            else:
                recorded = row.get(column)
            if recorded is None:
                continue  # not in this trace (e.g. imported text without the field)
            predicted = values.get(column)
            if column == "role":
                recorded &= self.role_mask
                if predicted is not None:
                    predicted &= self.role_mask
            if predicted != recorded:
                diff.append(column)
        return diff

    def unexplained(self, t: Thread, ev: str, row: dict[str, Any]) -> None:
        """A recorded decision with no prediction: undecidable when the thread's context or the
        event's own shape names a missing input; missing otherwise."""
        reason = self.explain(t, ev, row)
        if reason is not None:
            self.undecided(t, ev, row, reason)
            self.after_adopt(t, ev, row, reason)
            return
        self.result.count(KIND[ev], "missing")
        self.divergence("missing", ev, None, {c: self.recorded_value(c, row) for c in COMPARED[ev]}, row, t, None)

    def explain(self, t: Thread, ev: str, row: dict[str, Any]) -> str | None:
        """Why this recorded decision could not be predicted, or None if the model should have."""
        if ev in self.param_kinds:
            return R_PARAMS
        if self.memslot_update_tid is not None and (reason := self.mmio_reason(t, ev, row)):
            return reason
        if ev == "kvm_tdp_mmu_spte_changed":
            return R_TDP
        if ev == "kvm_mmu_set_spte" and t.prefetch is not None:
            sp, reason = t.prefetch
            if sp.spt_page is None or sp.spt_page == row["sptep"] & ~0xFFF:
                return reason
        if t.context is not None:
            return t.context
        if t.emulating is not None:
            return t.emulating
        if t.fault_reason is not None:
            return t.fault_reason
        vcpu = t.vcpu
        level = self.rules.role_layout.get(row["role"], "level") if row.get("role") is not None else None
        if ev == "kvm_mmu_get_page" and t.walk is None:
            if vcpu is None:
                vcpu = self.vcpu_of(t, row.get("vcpu"))
            if level == vcpu.cpu_role.root_level:
                return R_ROOT if vcpu.root is None else R_RELOAD
        if ev == "kvm_mmu_zap_all_fast":
            return R_ZAP_ALL_FAST
        if ev == "kvm_mmu_prepare_zap_page" and (t.walk is None or t.walk.walker is None or not t.fault_started):
            sp = self.shadow.find_sp(row["gfn"], row["role"], self.role_mask)
            if sp is not None and sp.invalid and sp.root_count <= 1:
                return R_RELOAD
            return R_TEARDOWN
        if ev == "kvm_mmu_prepare_zap_page" and self.arch.n_max_mmu_pages is None:
            return R_QUOTA
        return None

    def after_adopt(self, t: Thread, ev: str, row: dict[str, Any], reason: str) -> None:
        """Continue the model where an inferred cause leads: a root load syncs roots; a teardown
        zaps everything that is left; a fast zap zaps the obsolete pages."""
        if reason in (R_ROOT, R_RELOAD) and ev == "kvm_mmu_get_page" and t.vcpu is not None:
            self.shadow.kvm_mmu_sync_roots(t.vcpu)
        elif reason == R_TEARDOWN:
            self.mmu.kvm_mmu_zap_all()
        elif reason == R_ZAP_ALL_FAST:
            self.mmu.kvm_mmu_zap_all_fast(trace=False)
        else:
            return
        self.take_predictions(t)

    def undecided(self, t: Thread, ev: str, row: dict[str, Any], reason: str, adopt: bool = True) -> None:
        """Count an undecidable decision and adopt the kernel's outcome (also as the model's event)."""
        self.result.count(KIND[ev], "undecidable")
        adopted = {c: row.get(c) for c in COMPARED[ev] if c != "sptep_offset"}
        self.record_model(Decision(ev, adopted, "adopted"), row)
        self.result.undecidable_reasons[reason] += 1
        if adopt:
            self.result.adopted += 1
            if self.mmu.tdp is not None:
                self.mmu.tdp.adopt(ev, row, t.vcpu)
            else:
                self.shadow.adopt(ev, row, t.vcpu, self.role_mask)
            self.tp.drain()

    def verdict_extra(self, t: Thread, d: Decision, row: dict[str, Any]) -> Decision | None:
        """Judge a prediction the kernel did not make (at ``row``, the event being handled)."""
        if d.undecidable:
            return None  # the kernel need not have made an undecidable decision: nothing to judge
        self.result.count(d.kind, "extra")
        self.record_model(d, row)
        self.divergence("extra", d.event, dict(d.values), None, row, t, d.twin, d)
        return d

    # ---- output

    def record_model(self, d: Decision, row: dict[str, Any]) -> None:
        if self.result._model_rows is None:
            return
        values = {k: v for k, v in d.values.items() if k != "sptep_offset"}
        self.result._model_rows.append({"ts_ns": row["ts_ns"], "cpu": row["cpu"], "pid": 0, "tid": row["tid"],
                                        "vm": self.vm, "vcpu": row.get("vcpu"), "event": d.event, **values})

    def divergence(self, verdict: str, ev: str, expected: Any, actual: Any, row: dict[str, Any], t: Thread,
                   twin: str | None, d: Decision | None = None) -> None:
        self.result.divergences_total += 1
        limit = self.result.max_divergences
        if limit is not None and len(self.result.divergences) >= limit:
            return
        context: dict[str, Any] = {"vm": self.vm, "tid": t.tid, "twin": twin}
        if t.walk is not None:
            context["fault"] = {"addr": hex(t.walk.addr), "error_code": hex(t.walk.access)}
            context["guest_walk"] = [hex(p) for p in t.walk.ptes]
        subject = d.subject if d is not None else None
        if isinstance(subject, tuple):
            subject = subject[0]
        if subject is None and row.get("role") is not None and row.get("gfn") is not None:
            subject = self.shadow.find_sp(row["gfn"], row["role"], self.role_mask)
        if isinstance(subject, ShadowPage):
            context["model_page"] = self.shadow.describe(subject)
        self.result.divergences.append({
            "ts_ns": row["ts_ns"], "cpu": row["cpu"], "seq": row.get("seq"), "verdict": verdict, "kind": KIND[ev], "event": ev,
            "expected": _jsonable(expected), "actual": _jsonable(actual), "context": context})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def replay_trace(path: str | Path, split: str | Split | None = None, allow_lost: bool = False,
                 assume_version: str | None = None, max_divergences: int | None = None,
                 shadow_factory: Callable[[KvmArch, dict[int, VcpuMmu]], ShadowMmu] = ShadowMmu,
                 keep_model_events: bool = True, bulk: bool = True) -> ReplayResult:
    """Replay one trace file through the models; see ReplayResult and docs/replay.md.

    ``keep_model_events=False`` keeps memory bounded by the model state (the CLI and the benchmark);
    ``ReplayResult.model_events()`` then refuses.  ``bulk=False`` replays every row per event (the
    bulk path, replay/bulk.py, only runs without the model event stream and gives the same verdicts).
    """
    meta, batches = open_for_replay(path)
    rules = rules_for_release(meta.get("kernel_release"), assume_version)
    chosen = rules.split if split is None else Split(split)
    lost = {int(cpu): int(n) for cpu, n in (meta.get("lost") or {}).items() if int(n)}
    if lost and not allow_lost:
        raise TraceFileError(f"{path}: the recording lost {sum(lost.values())} events "
                             f"(CPUs {', '.join(map(str, sorted(lost)))}); pass --allow-lost to replay anyway "
                             f"(their decisions become undecidable)")
    result = ReplayResult(meta.get("kernel_release"), rules, chosen, max_divergences=max_divergences,
                          _model_rows=[] if keep_model_events else None)
    mask = known_role_mask(meta)
    vms: dict[int, VmReplay] = {}
    pace = Pace() if bulk else None
    for batch in batches():
        result.events += batch.num_rows
        _replay_batch(batch, vms, result, rules, chosen, meta, shadow_factory, set(lost), mask, pace)
    for vm in vms.values():
        for t in vm.threads.values():
            vm.end_episode(t, {"ts_ns": t.last_ts, "cpu": 0, "tid": t.tid})
    return result


_SKIP_EVENTS = np.array(sorted({e.name for e in schema.EVENTS} - {
    "kvm_mmu_paging_element", "kvm_mmu_pagetable_walk", "kvm_unmap_hva_range"} - DECISION_EVENTS
    - BOUNDARY_EVENTS - {e.name for e in schema.EVENTS if e.group == "ioctl"}))


def _is_event_in(column: pa.Array, names: np.ndarray) -> np.ndarray:
    """Which rows' event is one of ``names`` (decided once per distinct name when dictionary-encoded)."""
    if pa.types.is_dictionary(column.type) and column.null_count == 0:
        hit = np.isin(np.asarray(column.dictionary.to_pylist(), dtype=object), names)
        return hit[column.indices.to_numpy(zero_copy_only=False)]
    return np.isin(np.asarray(column.to_pylist(), dtype=object), names)


class Row:
    """One event of a batch: ``row["gfn"]`` reads that column at this index (no per-row dict)."""

    __slots__ = ("cols", "i")

    def __init__(self, cols: dict[str, list[Any]], i: int) -> None:
        self.cols, self.i = cols, i

    def __getitem__(self, name: str) -> Any:
        return self.cols[name][self.i]

    def get(self, name: str, default: Any = None) -> Any:
        """The column's value here (None where the trace has no such column)."""
        return self.cols[name][self.i]


class _Rows:
    """A batch's kept rows, fed per event to their VM (creating it on its first row).  Only the
    span of rows being fed is converted to Python (the rows between bulk runs are a small part)."""

    def __init__(self, batch: pa.RecordBatch, vms: dict[int, VmReplay], make_vm: Callable[[Any], VmReplay]) -> None:
        self.batch = batch
        self.vms, self.make_vm = vms, make_vm
        self.vm: VmReplay | None = None

    def vm_of(self, vm_id: Any, create: bool) -> VmReplay | None:
        """The VM ``vm_id`` (a thread id where the trace has no vm)."""
        if self.vm is None or self.vm.vm != vm_id:
            vm = self.vms.get(vm_id)
            if vm is None and create:
                vm = self.vms[vm_id] = self.make_vm(vm_id)
            if vm is None:
                return None
            self.vm = vm
        return self.vm

    def vm_at(self, i: int) -> VmReplay | None:
        """The VM of batch row ``i`` if it exists already."""
        vm_id = self.batch.column("vm")[i].as_py() if "vm" in self.batch.schema.names else None
        return self.vm_of(vm_id if vm_id is not None else self.batch.column("tid")[i].as_py(), create=False)

    def replay(self, rows: list[int]) -> None:
        """Rows in order; guest PTEs (half of a shadow fault's events) go straight to their walk."""
        if not rows:
            return
        lo = rows[0]
        cols = Columns(self.batch.slice(lo, rows[-1] + 1 - lo) if lo or rows[-1] + 1 < self.batch.num_rows
                       else self.batch)
        events, vm_col, tids, ptes = cols["event"], cols["vm"], cols["tid"], cols["spte"]
        vm = self.vm
        for i in rows:
            i -= lo
            vm_id = vm_col[i]
            if vm_id is None:
                vm_id = tids[i]
            if vm is None or vm.vm != vm_id:
                vm = self.vm_of(vm_id, create=True)
            ev = events[i]
            if ev == "kvm_mmu_paging_element":
                walk = vm.open_walk(tids[i])
                if walk is not None:
                    walk.ptes.append(ptes[i])
                continue
            vm.handle(ev, Row(cols, i))
        self.vm = vm


def _replay_batch(batch: pa.RecordBatch, vms: dict[int, VmReplay], result: ReplayResult, rules: VersionRules,
                  split: Split, meta: dict[str, Any], shadow_factory: Callable, lost: set[int], mask: int,
                  pace: Pace | None) -> None:
    """The batch's rows in order: runs of steady-state episodes in bulk (replay/bulk.py) where the
    VM's state allows, every other row per event (all of them without a ``pace``: ``bulk=False``)."""
    kept = np.flatnonzero(~_is_event_in(batch.column("event"), _SKIP_EVENTS))
    rows = _Rows(batch, vms, lambda vm_id: VmReplay(vm_id, rules, split, meta, result, shadow_factory, lost, mask))
    order = kept.tolist()
    plan = plan_batch(batch, kept) if pace is not None else None
    done = 0
    for e0, e1 in plan.runs if plan is not None else ():
        while e1 - e0 >= MIN_RUN:
            first = int(plan.walks[e0])
            rows.replay(order[done:first])
            done = first
            vm = rows.vm_at(order[first])
            if vm is None or not bulk_capable(vm):
                break
            stop, e0 = replay_run(vm, plan, e0, e1, pace)
            done = int(plan.walks[stop])
    rows.replay(order[done:])

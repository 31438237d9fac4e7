"""Semantic diff of two MMU traces: fault by fault, decision by decision.

Two recordings of the same guest never agree line by line: timestamps, pids, host pfns, the
addresses of ``struct kvm`` and of shadow pages all change from run to run.  What must not change
is what the MMU *decided*: which shadow pages it created or reused, which SPTEs it installed (level,
permissions, A/D bits), what it unsynced, synced and zapped, and in which order.  So the diff

1. pairs the VMs of the two traces by order of first appearance (their ids are pointers or pids),
   and within a VM pairs vCPUs by id (events without a vCPU id get it from their thread);
2. cuts each vCPU's event stream into faults (``FaultCutter``): a fault opens at
   ``kvm_mmu_pagetable_walk`` (shadow paging; this PVM host never emits ``kvm_page_fault``), or at
   ``kvm_page_fault`` where the trace has it (TDP, VMX/SVM), and closes when the vCPU thread enters
   or leaves the guest or issues an ioctl;
3. keys each fault by (faulting address, access bits, occurrence index of that pair on the vCPU),
   so a fault only one run took does not shift the rest;
4. compares the decision events (``Role.DECISION``/``Role.BOTH`` in the schema) of common faults
   with the noise fields left out (``DEFAULT_IGNORED``; SPTE values compared with their pfn masked
   out), and aligns decisions outside faults (zap-all, zaps from ioctls, notifier work) by their order
   within a scenario phase (``Phases``: named by the marker that starts it).

docs/diff.md has the rules in full and the JSON output.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import enum
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmutrace.errors import UsageError
from mmutrace.schema import EVENTS, EVENTS_BY_NAME, Role
from replay.role import known_role_mask
from replay.spte import (EPT, NON_EPT, PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK, SPTE_BASE_ADDR_MASK,
                         SPTE_MMU_PRESENT_MASK, SpteFlavor)

#: Fields left out of the comparison by default, as ``field`` (every event) or ``event.field``.
#: Each is run-to-run noise: host addresses and host pfns change with every run.
DEFAULT_IGNORED: dict[str, str] = {
    "sp": "address of struct kvm_mmu_page: a host allocation",
    "sptep": "address of the SPTE: inside a host-allocated table page",
    "pfn": "host page frame: depends on host memory allocation",
    "slot_hva": "host virtual address of the memslot: mmap placement",
    "spte_pfn": "the pfn bits (12-51) inside spte/old_spte/new_spte: host frames of pages and tables",
    "ioctl_set_user_memory_region.slot_hva": "host virtual address of the memslot",
    "kvm_unmap_hva_range.addr": "host virtual address",
    "kvm_unmap_hva_range.end": "host virtual address",
    "kvm_age_hva.addr": "host virtual address",
    "kvm_age_hva.end": "host virtual address",
    "kvm_test_age_hva.addr": "host virtual address",
}

#: SPTE-valued columns, compared with the pfn masked out unless ``spte_pfn`` is not ignored.
SPTE_COLUMNS = ("spte", "old_spte", "new_spte")


def spte_bit_names(flavor: SpteFlavor) -> tuple[tuple[int, str], ...]:
    """(bit, name) of the SPTE bits a KVM developer reads, from the flavour's masks (replay/spte.py),
    for saying *what* differs between two SPTE values."""
    masks = (("R" if flavor.user_mask == flavor.present_mask else "P", flavor.present_mask),
             ("W", PT_WRITABLE_MASK), ("U", flavor.user_mask), ("X", flavor.x_mask), ("NX", flavor.nx_mask),
             ("A", flavor.accessed_mask), ("D", flavor.dirty_mask), ("PS", PT_PAGE_SIZE_MASK),
             ("host-W", flavor.host_writable_mask), ("mmu-W", flavor.mmu_writable_mask),
             ("present", SPTE_MMU_PRESENT_MASK))
    bits: dict[int, str] = {}
    for name, mask in masks:
        if mask:
            bits.setdefault(mask.bit_length() - 1, name)
    return tuple(sorted(bits.items()))


FAULT_START_SHADOW = "kvm_mmu_pagetable_walk"
FAULT_START_TDP = "kvm_page_fault"
#: Events that show the vCPU thread is no longer handling a fault: it re-entered or left the guest
#: (PVM emits no kvm_entry/kvm_exit, but exits to userspace show as kvm_pio/kvm_userspace_exit), or
#: is in an ioctl.  ``kvm_unmap_hva_range`` is not one: faulting in a pfn can trigger the notifier.
FAULT_CLOSERS = frozenset({"kvm_entry", "kvm_exit", "kvm_pio", "kvm_userspace_exit"}
                          | {e.name for e in EVENTS if e.group == "ioctl"})
DECISION_EVENTS = frozenset(e.name for e in EVENTS if e.role is not Role.INPUT)
#: Columns the diff reads from a trace.
READ_COLUMNS = ("ts_ns", "cpu", "seq", "tid", "vm", "vcpu", "event") + tuple(
    sorted({c for e in EVENTS for c in e.columns if c != "vcpu"})
)


class Side(enum.Enum):
    A = "a"
    B = "b"


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision event reduced to what must be equal across runs (slots: a trace has millions)."""

    ts_ns: int
    event: str
    columns: tuple[str, ...]  # the compared columns of this event (one shared tuple per event)
    values: tuple[Any, ...]

    @property
    def key(self) -> tuple:
        return (self.event, self.values)

    def describe(self) -> str:
        vals = " ".join(f"{k}={_fmt(k, v)}" for k, v in zip(self.columns, self.values) if v is not None)
        return f"{self.event} {vals}".rstrip()


@dataclass
class Fault:
    """The decisions of one fault on one vCPU, and the inputs that key it."""

    ts_ns: int
    addr: int
    access: int
    occurrence: int
    decisions: list[Decision] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.addr, self.access, self.occurrence)

    def label(self) -> str:
        return f"fault addr={self.addr:#x} access={self.access:#x} #{self.occurrence}"


@dataclass
class Lane:
    """One vCPU of one VM: ``name`` is ``vcpu N``, or ``thread N`` (Nth thread of the VM in order of
    appearance) when the trace does not say which vCPU a thread runs (tracefs on PVM)."""

    name: str
    faults: dict[tuple[int, int, int], Fault] = field(default_factory=dict)
    #: decisions outside faults, per scenario phase (``Phases``)
    outside: dict[str, list[Decision]] = field(default_factory=dict)


@dataclass
class VmEvents:
    vm: int | None
    lanes: dict[str, Lane] = field(default_factory=dict)


def lane_label(vm: int, lane: str) -> str:
    """How a lane is shown: ``vm0 vcpu 1``; VM ordinal -1 holds the events of no VM."""
    return f"{'no VM' if vm < 0 else f'vm{vm}'} {lane}"


class Lanes:
    """Names the lane of an event from its (vm, tid, vcpu): the part of a trace that is stable
    across runs (VM ids are pointers or pids and tids change: they become ordinals)."""

    def __init__(self) -> None:
        self.vms: dict[int | None, int] = {}
        self._thread_vcpu: dict[tuple[int | None, int], int] = {}
        self._threads: dict[int | None, dict[int, int]] = {}

    def learn(self, vms: Sequence[int | None], tids: Sequence[int], vcpus: Sequence[int | None]) -> None:
        """Remember which thread runs which vCPU, from the events that carry a vCPU id."""
        for vm, tid, vcpu in zip(vms, tids, vcpus):
            if vcpu is not None:
                self._thread_vcpu[(vm, tid)] = vcpu

    def lane(self, vm: int | None, tid: int, vcpu: int | None) -> tuple[int, str]:
        """(VM ordinal, lane name) of one event; the ordinal is -1 for events of no VM."""
        vm_index = -1 if vm is None else self.vms.setdefault(vm, len(self.vms))
        if vcpu is None:
            vcpu = self._thread_vcpu.get((vm, tid))
        if vcpu is not None:
            return vm_index, f"vcpu {vcpu}"
        threads = self._threads.setdefault(vm, {})
        return vm_index, f"thread {threads.setdefault(tid, len(threads))}"


@dataclass
class Difference:
    """One difference: a fault or decision on one side only, or a field whose values differ."""

    kind: str
    scope: str  # "fault" (inside a common fault), "outside" (outside faults) or "fault-set"
    vm: int  # ordinal of the VM in both runs, -1 for events of no VM
    lane: str
    ts_a: int | None
    ts_b: int | None
    a: Any
    b: Any
    where: str  # the fault label (Fault.label) or "phase NAME"
    detail: str = ""
    context: dict[str, list[str]] | None = None

    @property
    def lane_label(self) -> str:
        return lane_label(self.vm, self.lane)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DiffResult:
    a_label: str
    b_label: str
    ignored: list[str]
    vm_pairs: list[tuple[int | None, int | None]]
    faults_a: int = 0
    faults_b: int = 0
    common: int = 0
    only_a: int = 0
    only_b: int = 0
    differing: int = 0
    outside_a: int = 0
    outside_b: int = 0
    outside_differing: int = 0
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return not self.differences

    @property
    def by_kind(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.differences).most_common())

    def to_json(self, max_differences: int | None = None) -> dict[str, Any]:
        diffs = self.differences if max_differences is None else self.differences[:max_differences]
        return {
            "equivalent": self.equivalent,
            "a": self.a_label,
            "b": self.b_label,
            "ignored": self.ignored,
            "vms": [{"a": a, "b": b} for a, b in self.vm_pairs],
            "faults_a": self.faults_a,
            "faults_b": self.faults_b,
            "common": self.common,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "differing": self.differing,
            "outside_faults": {"a": self.outside_a, "b": self.outside_b, "differing": self.outside_differing},
            "by_kind": self.by_kind,
            "notes": self.notes,
            "n_differences": len(self.differences),
            "differences": [d.to_json() for d in diffs],
        }


# --------------------------------------------------------------------------------------------
# Normalising one trace
# --------------------------------------------------------------------------------------------


def resolve_ignored(ignore: Iterable[str] = (), no_ignore: Iterable[str] = ()) -> frozenset[str]:
    """The effective ignore list: the defaults, plus ``ignore``, minus ``no_ignore``.

    Raises UsageError for a name that is neither a column, ``spte_pfn`` nor ``event.column``.
    """
    known = set(READ_COLUMNS) | {"spte_pfn"}
    for name in (*ignore, *no_ignore):
        event, _, col = name.rpartition(".")
        if col not in known or (event and event not in EVENTS_BY_NAME):
            raise UsageError(f"--ignore/--no-ignore: unknown field {name!r} (a column name, spte_pfn or EVENT.COLUMN)")
    return frozenset((set(DEFAULT_IGNORED) | set(ignore)) - set(no_ignore))


def _compared_columns(ignored: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """For each decision event, the columns compared across runs."""
    return {
        name: tuple(c for c in EVENTS_BY_NAME[name].columns if c not in ignored and f"{name}.{c}" not in ignored)
        for name in DECISION_EVENTS
    }


def markers_of(metadata: dict[str, Any]) -> list[tuple[int, str]]:
    """The trace's scenario markers as (ts_ns, text), in time order."""
    return sorted((int(m["ts_ns"]), str(m.get("text", ""))) for m in metadata.get("markers") or [] if "ts_ns" in m)


class Phases:
    """Scenario phases from the trace's markers, named by marker text (``text#k`` for a repeated text)
    so that two runs' phases pair up by name even when one run has an extra marker."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        seen: Counter = Counter()
        self.starts: list[int] = []
        self.names: list[str] = ["before markers"]
        for ts, text in markers_of(metadata):
            self.starts.append(ts)
            self.names.append(text if not seen[text] else f"{text}#{seen[text]}")
            seen[text] += 1

    def at(self, ts_ns: int) -> str:
        return self.names[bisect.bisect_right(self.starts, ts_ns)]


def fault_start_event(event_names: Iterable[str]) -> str:
    """The event that opens a fault: ``kvm_page_fault`` where the trace has it (TDP, VMX/SVM), else
    the guest page-table walk (shadow paging on PVM, where ``kvm_page_fault`` never fires)."""
    return FAULT_START_TDP if FAULT_START_TDP in set(event_names) else FAULT_START_SHADOW


#: Decisions that show a fault reached its mapping step: a walk after them is a new fault.
MAPPING_EVENTS = frozenset({"kvm_mmu_spte_requested", "mark_mmio_spte", "handle_mmio_page_fault"})


class FaultCutter:
    """Cuts a vCPU's events into faults: the rule ``diff`` and ``report`` share.

    A fault opens at a start event and closes at the next ``FAULT_CLOSERS`` event of its lane.  A
    start event with the open fault's (address, access) before that fault reached its mapping step
    (``MAPPING_EVENTS``) is the same fault walking again (the walker retries after updating a guest
    A/D bit); any other start event opens a new fault (e.g. the guest touching a page again after
    an MMU notifier dropped its SPTE).
    """

    def __init__(self, start_event: str) -> None:
        self.start_event = start_event
        self.cut_events = frozenset({start_event}) | FAULT_CLOSERS | MAPPING_EVENTS
        self._open: dict[Any, tuple[int, int, bool] | None] = {}

    def feed(self, lane: Any, event: str, addr: int | None, access: int | None) -> bool:
        """Account one ``cut_events`` event of ``lane``; True when it opens a new fault."""
        current = self._open.get(lane)
        if event in MAPPING_EVENTS:
            if current is not None:
                self._open[lane] = (current[0], current[1], True)
            return False
        if event != self.start_event:
            self._open[lane] = None
            return False
        key = (addr or 0, access or 0)
        if current is not None and not current[2] and current[:2] == key:
            return False
        self._open[lane] = (*key, False)
        return True

    def is_open(self, lane: Any) -> bool:
        return self._open.get(lane) is not None


@dataclass
class Source:
    """One side of a diff: a trace's metadata and its batches (row group by row group for a file,
    so that memory grows with the decisions kept, not with the trace)."""

    label: str
    metadata: dict[str, Any]
    batches: Callable[[list[str]], Iterator[pa.RecordBatch]]  # the given columns (those that exist)

    @classmethod
    def of_table(cls, label: str, metadata: dict[str, Any], table: pa.Table) -> Source:
        def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
            yield from table.select([c for c in columns if c in table.column_names]).to_batches(CHUNK_ROWS)
        return cls(label, metadata, batches)


#: Rows per batch of an in-memory side (a file is read by row group).
CHUNK_ROWS = 1 << 16
#: Recorder input columns of decision events: compared only when both sides recorded them.
_INPUT_COLUMNS = sorted({c for k in EVENTS if k.role is not Role.INPUT for c in k.inputs})


@dataclass
class Survey:
    """What a first, cheap pass over a trace learns: its events, which thread runs which vCPU, and
    which recorder inputs of decision events it fills (tracefs captures and imports fill none)."""

    events: set[str] = field(default_factory=set)
    lanes: Lanes = field(default_factory=Lanes)
    filled: set[str] = field(default_factory=set)  # "event.column" seen non-null

    def unrecorded(self) -> set[str]:
        return {f"{k.name}.{c}" for k in EVENTS if k.name in self.events and k.role is not Role.INPUT
                for c in k.inputs} - self.filled


def survey(source: Source) -> Survey:
    """The first pass over ``source``: only the event, thread and recorder-input columns."""
    out = Survey()
    for batch in source.batches(["event", "vm", "tid", "vcpu", *_INPUT_COLUMNS]):
        table = pa.Table.from_batches([batch])
        codes, names = _event_codes(table)
        present = np.unique(codes)
        out.events |= {names[c] for c in present}
        threads = table.filter(pc.is_valid(table.column("vcpu"))).group_by(["vm", "tid"]).aggregate([("vcpu", "max")])
        out.lanes.learn(*(threads.column(c).to_pylist() for c in ("vm", "tid", "vcpu_max")))
        for code in present.tolist():
            kind = EVENTS_BY_NAME[names[code]]
            if kind.role is Role.INPUT or not kind.inputs:
                continue
            rows = table.filter(pa.array(codes == code))
            out.filled |= {f"{kind.name}.{c}" for c in kind.inputs
                           if c in rows.column_names and rows.column(c).null_count < rows.num_rows}
    return out


def collect(source: Source, known: Survey, ignored: frozenset[str], role_mask: int | None = None) -> list[VmEvents]:
    """Cut one trace into VMs, vCPU lanes, faults and outside-fault decisions.

    The batches must be ordered by (ts_ns, cpu, seq).  VMs come back in order of first appearance,
    which is how two runs' VMs are paired.  ``role_mask`` limits role words to the bits both sides know.
    """
    cutter = FaultCutter(fault_start_event(known.events))
    keep = cutter.cut_events | DECISION_EVENTS
    compared = _compared_columns(ignored)
    mask_pfn = "spte_pfn" in ignored
    phases = Phases(source.metadata)
    lanes = known.lanes
    needed = {"ts_ns", "vm", "tid", "vcpu", "event", "addr", "error_code"} | {
        c for n in known.events if n in compared for c in compared[n]}

    by_vm: dict[int, VmEvents] = {}
    open_fault: dict[tuple[int, str], Fault] = {}
    occurrences: dict[tuple[int, str], Counter] = {}
    for batch in source.batches(sorted(needed)):
        table = pa.Table.from_batches([batch])
        codes, dictionary = _event_codes(table)
        wanted = np.isin(codes, [i for i, n in enumerate(dictionary) if n in keep])
        rows, codes = table.filter(pa.array(wanted)), codes[wanted]
        cols = {c: rows.column(c).to_pylist() for c in needed if c in rows.column_names and c != "event"}
        ts, vms, tids, vcpus = cols["ts_ns"], cols["vm"], cols["tid"], cols["vcpu"]
        for i, code in enumerate(codes.tolist()):
            name = dictionary[code]
            lane_id = lanes.lane(vms[i], tids[i], vcpus[i])
            vme = by_vm.get(lane_id[0]) or by_vm.setdefault(lane_id[0], VmEvents(vms[i]))
            lane = vme.lanes.get(lane_id[1]) or vme.lanes.setdefault(lane_id[1], Lane(lane_id[1]))
            if name in cutter.cut_events:
                addr, access = cols["addr"][i] or 0, cols["error_code"][i] or 0
                if cutter.feed(lane_id, name, addr, access):
                    seen = occurrences.setdefault(lane_id, Counter())
                    fault = Fault(ts[i], addr, access, seen[(addr, access)])
                    seen[(addr, access)] += 1
                    lane.faults[fault.key] = open_fault[lane_id] = fault
                if name not in DECISION_EVENTS:
                    continue
            columns = compared[name]
            values = tuple(cols[c][i] if c in cols else None for c in columns)
            if mask_pfn and any(c in SPTE_COLUMNS for c in columns):
                values = tuple(v & ~SPTE_BASE_ADDR_MASK if c in SPTE_COLUMNS and v is not None else v
                               for c, v in zip(columns, values))
            if role_mask is not None and "role" in columns:
                values = tuple(v & role_mask if c == "role" and v is not None else v for c, v in zip(columns, values))
            decision = Decision(ts[i], name, columns, values)
            if cutter.is_open(lane_id):
                open_fault[lane_id].decisions.append(decision)
            else:
                lane.outside.setdefault(phases.at(ts[i]), []).append(decision)
    return [by_vm[i] for i in sorted(by_vm)]


def _event_codes(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    """The event column as integer codes into a list of names (no Python string per row)."""
    col = table.column("event").combine_chunks() if table.num_rows else pa.array([], pa.string())
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    return col.indices.to_numpy(zero_copy_only=False).astype(np.int64), col.dictionary.to_pylist()


def _is_input(table: pa.Table) -> np.ndarray:
    """Mask of the rows whose event is an input (``Role.INPUT``) in the catalogue."""
    codes, names = _event_codes(table)
    return np.isin(codes, [i for i, n in enumerate(names) if EVENTS_BY_NAME[n].role is Role.INPUT])


# --------------------------------------------------------------------------------------------
# Comparing two traces
# --------------------------------------------------------------------------------------------


@dataclass
class _Comparer:
    result: DiffResult
    flavor: SpteFlavor
    context_limit: int = 24

    def compare(self, vms_a: list[VmEvents], vms_b: list[VmEvents]) -> None:
        for vm_index in range(max(len(vms_a), len(vms_b))):
            a = vms_a[vm_index] if vm_index < len(vms_a) else VmEvents(None)
            b = vms_b[vm_index] if vm_index < len(vms_b) else VmEvents(None)
            for lane_a, lane_b in _pair_lanes(a.lanes, b.lanes):
                self._lane(vm_index - 1, lane_a, lane_b)  # pair 0 holds the events of no VM

    def _lane(self, vm: int, a: Lane, b: Lane) -> None:
        r = self.result
        r.faults_a += len(a.faults)
        r.faults_b += len(b.faults)
        for key in _merged_order(list(a.faults), list(b.faults)):
            fa, fb = a.faults.get(key), b.faults.get(key)
            if fa is None or fb is None:
                side, f = (Side.B, fb) if fa is None else (Side.A, fa)
                setattr(r, f"only_{side.value}", getattr(r, f"only_{side.value}") + 1)
                desc = f"{len(f.decisions)} decisions"
                r.differences.append(Difference(
                    f"fault.only_{side.value}", "fault-set", vm, a.name,
                    fa.ts_ns if fa else None, fb.ts_ns if fb else None,
                    desc if fa else None, desc if fb else None, f.label(),
                    context=self._context(fa, fb)))
                continue
            r.common += 1
            if self._sequence(vm, a.name, "fault", fa.label(), fa.decisions, fb.decisions, (fa, fb)):
                r.differing += 1
        for phase in _ordered_keys(a.outside, b.outside):
            da, db = a.outside.get(phase, []), b.outside.get(phase, [])
            r.outside_a += len(da)
            r.outside_b += len(db)
            r.outside_differing += self._sequence(vm, a.name, "outside", f"phase {phase}", da, db, None)

    def _sequence(self, vm: int, lane: str, scope: str, where: str,
                  da: Sequence[Decision], db: Sequence[Decision], faults: tuple[Fault, Fault] | None) -> int:
        """Align two decision sequences; record their differences; return how many were found."""
        before = len(self.result.differences)
        ka, kb = [d.key for d in da], [d.key for d in db]
        if ka == kb:
            return 0
        ctx = self._context(*faults) if faults else self._context_lists(da, db)
        out = self.result.differences
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes():
            if op == "equal":
                continue
            left, right = list(da[i1:i2]), list(db[j1:j2])
            while left and right and left[0].event == right[0].event:
                x, y = left.pop(0), right.pop(0)
                for name, va, vb in zip(x.columns, x.values, y.values):
                    if va != vb:
                        out.append(Difference(f"{x.event}.{name}", scope, vm, lane, x.ts_ns, y.ts_ns, va, vb,
                                              where, self._detail(name, va, vb), ctx))
            for side, rest in ((Side.A, left), (Side.B, right)):
                for d in rest:
                    a, b = (d.describe(), None) if side is Side.A else (None, d.describe())
                    out.append(Difference(f"{d.event}.only_{side.value}", scope, vm, lane,
                                          d.ts_ns if side is Side.A else None, d.ts_ns if side is Side.B else None,
                                          a, b, where, "", ctx))
        return len(out) - before

    def _detail(self, name: str, va: Any, vb: Any) -> str:
        if name in SPTE_COLUMNS and isinstance(va, int) and isinstance(vb, int):
            changed = [f"{bit_name} {va >> bit & 1}→{vb >> bit & 1}"
                       for bit, bit_name in spte_bit_names(self.flavor) if (va ^ vb) >> bit & 1]
            return ", ".join(changed) or "other bits"
        return ""

    def _context(self, fa: Fault | None, fb: Fault | None) -> dict[str, list[str]]:
        return self._context_lists(fa.decisions if fa else [], fb.decisions if fb else [])

    def _context_lists(self, da: Sequence[Decision], db: Sequence[Decision]) -> dict[str, list[str]]:
        n = self.context_limit
        return {side: [d.describe() for d in ds[:n]] + ([f"... {len(ds) - n} more"] if len(ds) > n else [])
                for side, ds in (("a", da), ("b", db))}


def _pair_lanes(a: dict[str, Lane], b: dict[str, Lane]) -> list[tuple[Lane, Lane]]:
    """Lanes paired by name (vcpu N) when both runs name them alike, else by order of appearance
    (a trace that knows vCPU ids against one that only knows threads)."""
    if set(a) & set(b) or not (a and b):
        return [(a.get(n) or Lane(n), b.get(n) or Lane(n)) for n in _ordered_keys(a, b)]
    la, lb = list(a.values()), list(b.values())
    return [(la[i] if i < len(la) else Lane(lb[i].name), lb[i] if i < len(lb) else Lane(la[i].name))
            for i in range(max(len(la), len(lb)))]


def _merged_order(a: list, b: list) -> list:
    """Keys of both runs in one order that respects each run's own (time) order."""
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        out += a[i1:i2] if op == "equal" else a[i1:i2] + [k for k in b[j1:j2] if k not in a[i1:i2]]
    return list(dict.fromkeys(out))


def _ordered_keys(a: dict, b: dict) -> list:
    """Keys of both dicts: a's in their (time) order, then those only b has."""
    return list(a) + [k for k in b if k not in a]


def spte_flavor(metadata: dict[str, Any]) -> SpteFlavor:
    """EPT for Intel with EPT on (lab traces), else the non-EPT flavour (shadow paging, NPT, PVM)."""
    ept = str((metadata.get("vendor_params") or {}).get("ept", "N")).upper() in ("Y", "1")
    return EPT if metadata.get("kvm_backend") == "kvm_intel" and ept else NON_EPT


def diff_sources(a: Source, b: Source, *, ignore: Iterable[str] = (), no_ignore: Iterable[str] = ()) -> DiffResult:
    """Diff two traces (files or replays): two passes over each; only the decisions stay in memory."""
    ignored = resolve_ignored(ignore, no_ignore)
    known_a, known_b = survey(a), survey(b)
    unrecorded = sorted(name for name in known_a.unrecorded() ^ known_b.unrecorded()
                        if name.rpartition(".")[2] not in ignored and name not in ignored)
    ignored |= set(unrecorded)
    role_mask = known_role_mask(a.metadata) & known_role_mask(b.metadata)
    role_mask = None if role_mask == 0xFFFFFFFF else role_mask
    vms_a, vms_b = collect(a, known_a, ignored, role_mask), collect(b, known_b, ignored, role_mask)
    counts = [sum(v.vm is not None for v in vms) for vms in (vms_a, vms_b)]
    vms_a, vms_b = _pair_vms(vms_a, vms_b)
    result = DiffResult(a.label, b.label, sorted(ignored), [(x.vm, y.vm) for x, y in zip(vms_a, vms_b)])
    if unrecorded:
        result.notes.append(f"not compared, recorded on one side only: {', '.join(unrecorded)}")
    if role_mask is not None:
        result.notes.append(f"role words compared under {role_mask:#x}: the bits tracefs text shows")
    releases = [side.metadata.get("kernel_release") for side in (a, b)]
    if releases[0] != releases[1]:
        result.notes.append(f"kernels differ: {releases[0]} vs {releases[1]}")
    if counts[0] != counts[1]:
        result.notes.append(f"VM counts differ: {counts[0]} vs {counts[1]}")
    _Comparer(result, spte_flavor(a.metadata)).compare(vms_a, vms_b)
    return result


def _pair_vms(a: list[VmEvents], b: list[VmEvents]) -> tuple[list[VmEvents], list[VmEvents]]:
    """Both runs' VMs, index-aligned: events of no VM with each other, the VMs by order of appearance;
    a VM one run lacks is paired with an empty one."""
    def split(vms: list[VmEvents]) -> tuple[VmEvents, list[VmEvents]]:
        return next((v for v in vms if v.vm is None), VmEvents(None)), [v for v in vms if v.vm is not None]

    (none_a, real_a), (none_b, real_b) = split(a), split(b)
    n = max(len(real_a), len(real_b))
    real_a += [VmEvents(None) for _ in range(n - len(real_a))]
    real_b += [VmEvents(None) for _ in range(n - len(real_b))]
    return [none_a, *real_a], [none_b, *real_b]


# --------------------------------------------------------------------------------------------
# Sources: recorded traces and model replays
# --------------------------------------------------------------------------------------------

#: --model values and the replay engine's ``split`` argument they mean.
MODEL_SPLITS: dict[str, str | None] = {"kernel": None, "pre": "pre", "rfc": "rfc"}


def model_split(model: str) -> str | None:
    """The replay engine's ``split`` for a --model value; UsageError for an unknown one."""
    if model not in MODEL_SPLITS:
        raise UsageError(f"--model must be one of {', '.join(MODEL_SPLITS)}, not {model!r}")
    return MODEL_SPLITS[model]


def load_trace(path: Path) -> Source:
    """A recorded trace as a diff side, read row group by row group."""
    from mmutrace.storage import open_trace

    reader = open_trace(path)

    def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        yield from reader.iter_batches(columns=[c for c in columns if c in reader.schema.names])

    return Source(str(path), dict(reader.metadata), batches)


def model_trace(path: Path, model: str, allow_lost: bool = False) -> Source:
    """The model's decisions for the trace at ``path`` under ``model``, as a diff side.

    The replay emits decisions only; the recorded inputs (walks, exits) are merged back in so that
    its decisions fall into the same faults as the recording's.
    """
    from replay.engine import replay_trace

    from mmutrace.storage import open_trace

    reader = open_trace(path)
    decisions = replay_trace(path, split=model_split(model), allow_lost=allow_lost).model_events()
    recorded = reader.read(columns=[c for c in READ_COLUMNS if c in reader.schema.names])
    return Source.of_table(f"model {model} replay of {path}", dict(reader.metadata),
                           with_inputs(decisions, recorded))


def with_inputs(decisions: pa.Table, recorded: pa.Table) -> pa.Table:
    """``decisions`` plus ``recorded``'s input events, ordered by time (inputs first on ties)."""
    columns = [c for c in recorded.column_names if c in decisions.column_names]
    if _is_input(decisions).any():
        return decisions.select(columns)
    inputs = recorded.filter(pa.array(_is_input(recorded)))
    decisions = decisions.select(columns).cast(inputs.select(columns).schema)
    merged = pa.concat_tables([inputs.select(columns), decisions])
    order = pc.sort_indices(pa.table({"ts": merged.column("ts_ns"),
                                      "i": pa.array(range(merged.num_rows))}), [("ts", "ascending"), ("i", "ascending")])
    return merged.take(order)


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------

_HEX_FIELDS = frozenset({"gfn", "role", "spte", "old_spte", "new_spte", "addr", "end", "error_code", "sp",
                         "sptep", "sptep_offset", "pfn", "slot_base_gfn", "slot_hva"})


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    return f"{value:#x}" if name in _HEX_FIELDS else str(value)


def format_value(name: str, value: Any) -> str:
    """A field value as a KVM developer reads it: hex for addresses, gfns, roles and SPTEs."""
    return "-" if value is None else _fmt(name, value)

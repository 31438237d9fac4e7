"""Bulk replay: runs of steady-state guest walks and 4K faults, judged a column at a time.

The per-event path (``engine.VmReplay.handle``) costs ~40 us of Python per guest fault.  Most of a
large trace is one shape repeated, one **episode** per guest walk:

    kvm_mmu_pagetable_walk, 4 x kvm_mmu_paging_element, kvm_mmu_set_accessed/dirty_bit*,
    then either  kvm_mmu_spte_requested, kvm_mmu_set_spte   (a fault installing a new 4K leaf SPTE
                                                              under existing shadow pages)
    or           kvm_unmap_hva_range                        (a walk that was no fault, then the host
                                                              unmap of its COW break)

and the next event is the same thread's next walk.  This module evaluates the models' rules for a
run of such episodes with numpy, not a second model:

- ``FNAME(walk_addr_generic)`` (paging_tmpl.py, unchanged) runs once per class of walks that must
  decide alike: same error code, same upper guest PTEs, same leaf PTE bits except its frame, same
  2M region.  Within a class only the leaf's index and frame vary; they enter the decisions as
  address arithmetic: the leaf ``pte_gpa`` of ``FNAME(update_accessed_dirty_bits)`` and
  ``gpte_to_gfn_lvl`` at level 1;
- ``FNAME(fetch)`` over shadow pages that already exist makes no decision before
  ``kvm_mmu_hugepage_adjust`` (a 4K guest leaf: goal_level 1, ``kvm_mmu_spte_requested``), then
  ``mmu_set_spte``: ``make_spte`` (spte.py, unchanged) runs once per class and host writability and
  the pfn is ORed in per fault (``make_spte`` uses the pfn only there when not prefetching);
- every prediction is compared with the recorded decision, as ``VmReplay.judge`` does.

- the host unmaps are ``kvm_unmap_hva_range`` as ``VmReplay.unmap`` runs it: each memslot's gfn
  range (``Memslot.hva_to_gfn_range``) computed a column at a time, then ``kvm_unmap_gfn_range``
  and ``VmReplay.unmapped``;
- what PTE prefetch prediction reads is kept per episode by the per-event path's own functions
  (``learn_gpte``, ``learn_pfn``, ``guest_may_write``, ``invalidate_in_progress``, ``fault_done``;
  see ``_apply``), and FNAME(pte_prefetch) is asked (``ShadowMmu.prefetch_gptes``) whether it
  would map a neighbour after each fault: such a fault is not bulk.

The run ends before the first episode that does not fit: a different event order, inputs that
would take another branch in the kernel (a write-tracked or shadowed gfn, a missing shadow page, a
huge or failing walk, a stale fault, a reclaim, an SPTE already present, an undecidable input), any
prediction that differs from the record; and no run starts on a VM with lost events, non-default
parameters, a TDP MMU, a replaced shadow model or a model event stream to keep.  The engine replays
that episode per event, so divergences and undecidable decisions always come from the per-event
path.  State changes (leaf SPTEs, their rmaps and timestamps, ``spt_page``, ``write_flooding_count``,
the unmaps and the engine's unmap history) are applied in trace order, so the per-event path resumes
from exactly the state it would have reached itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay.mmu import KVM_MIN_FREE_MMU_PAGES, VcpuMmu
from replay.paging_tmpl import PFERR_WRITE_MASK, PTTYPE_64, walk_addr_generic
from replay.shadow_mmu import ShadowMmu, ShadowPage, prefetch_group_gpa
from replay.spte import make_spte

if TYPE_CHECKING:
    from replay.engine import Thread, VmReplay

# Row codes of an episode.
OTHER, WALK, PTE, ACCESSED, DIRTY, REQUESTED, SET_SPTE, UNMAP = range(8)
CODE = {"kvm_mmu_pagetable_walk": WALK, "kvm_mmu_paging_element": PTE, "kvm_mmu_set_accessed_bit": ACCESSED,
        "kvm_mmu_set_dirty_bit": DIRTY, "kvm_mmu_spte_requested": REQUESTED, "kvm_mmu_set_spte": SET_SPTE,
        "kvm_unmap_hva_range": UNMAP}
KIND_OF = {ACCESSED: "accessed_bit", DIRTY: "dirty_bit"}
#: Guest PTEs of a 4-level walk ending in a 4K leaf.
LEVELS = 4
#: Guest A/D writes of such a walk at most: A on every level, D on the leaf.
MAX_AD = LEVELS + 1
#: Episodes: a shorter run costs more to set up than the per-event path takes.
MIN_RUN = 16
#: Episodes judged per attempt: at first, and at most (see Pace).
MIN_ATTEMPT = 64
MAX_ATTEMPT = 4096
#: Episodes left to the per-event path after two attempts in a row replayed fewer than MIN_RUN.
SKIP = 8 * MIN_RUN
#: A pfn this wide would reach the SPTE's high flag bits when shifted (never on x86: 40 bits).
PFN_LIMIT = 1 << 40
_U64 = np.uint64


@dataclass
class BatchPlan:
    """The state-independent part, once per batch: codes and columns of the rows the engine keeps,
    every episode's bounds and whether its rows have the shape, and the candidate runs.  Indices
    are into the kept rows."""

    code: np.ndarray
    col: dict[str, np.ndarray]
    #: The last kept row up to each one that set the quota (handle() reads every row's mmu_max;
    #: guest PTE rows are not handled), or -1.
    mmu_max_at: np.ndarray
    valid_map_writable: np.ndarray
    #: Kept index of every walk; episode e is kept rows [walks[e], walks[e + 1]).
    walks: np.ndarray
    is_fault: np.ndarray
    n_ad: np.ndarray
    #: (first episode, end episode) of each run of consecutive fitting episodes.
    runs: list[tuple[int, int]]


def _column(batch: pa.RecordBatch, name: str, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A column's values at the kept rows and where it is not null (the values under a null are
    whatever the buffer holds: every use is masked by validity)."""
    rows = slice(None) if len(kept) == batch.num_rows else kept  # usually every row is kept
    if name not in batch.schema.names:
        return np.zeros(len(kept), dtype=np.int64), np.zeros(len(kept), dtype=bool)
    col = batch.column(name)
    if pa.types.is_boolean(col.type) or not pa.types.is_integer(col.type):
        values = pc.fill_null(col, pa.scalar(False if pa.types.is_boolean(col.type) else 0, col.type))
        values = values.to_numpy(zero_copy_only=False)[rows]
    else:  # the data buffer itself, no copy and no null filling
        dtype = np.dtype(col.type.to_pandas_dtype())
        values = np.frombuffer(col.buffers()[1], dtype=dtype, count=col.offset + len(col))[col.offset:][rows]
    if not col.null_count:
        return values, np.ones(len(kept), dtype=bool)
    bits = np.unpackbits(np.frombuffer(col.buffers()[0], dtype=np.uint8), bitorder="little")
    return values, bits[col.offset:col.offset + len(col)].astype(bool)[rows]


def _spans(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, end) of every run of True at least ``min_len`` long."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_len]


def plan_batch(batch: pa.RecordBatch, kept: np.ndarray) -> BatchPlan | None:
    """Find the episodes of this batch whose rows have the bulk shape (no model state read here)."""
    events = batch.column("event")
    if not pa.types.is_dictionary(events.type) or events.null_count:
        return None
    by_name = np.array([CODE.get(n, OTHER) for n in events.dictionary.to_pylist()], dtype=np.int8)
    code = by_name[events.indices.to_numpy(zero_copy_only=False)]
    if len(kept) < len(code):
        code = code[kept]
    walks = np.flatnonzero(code == WALK)
    if len(walks) <= MIN_RUN:
        return None
    n = len(kept)
    col: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    for name in ("ts_ns", "tid", "vm", "addr", "end", "error_code", "spte", "sptep", "gfn", "level", "pfn",
                 "mmu_max", "map_writable"):
        col[name], valid[name] = _column(batch, name, kept)
    start, end = walks[:-1], walks[1:]
    length = end - start

    def count(*codes: int) -> np.ndarray:
        cum = np.concatenate(([0], np.cumsum(np.isin(code, codes))))
        return cum[end] - cum[start]

    def at(offset: np.ndarray | int, base: np.ndarray = start) -> np.ndarray:
        return np.minimum(base + offset, n - 1)

    n_ad = count(ACCESSED, DIRTY)
    ptes_ok = count(PTE) == LEVELS
    for j in range(1, LEVELS + 1):
        ptes_ok &= (code[at(j)] == PTE) & valid["spte"][at(j)]
    is_fault = ((count(REQUESTED) == 1) & (count(SET_SPTE) == 1) & (length == 1 + LEVELS + n_ad + 2)
                & (code[at(-2, end)] == REQUESTED) & (code[at(-1, end)] == SET_SPTE))
    for name in ("gfn", "level", "pfn"):
        is_fault &= valid[name][at(-2, end)]
    for name in ("gfn", "level", "spte", "sptep"):
        is_fault &= valid[name][at(-1, end)]
    is_unmap = ((count(UNMAP) == 1) & (length == 1 + LEVELS + n_ad + 1) & (code[at(-1, end)] == UNMAP)
                & valid["addr"][at(-1, end)] & valid["end"][at(-1, end)])
    # One thread of one VM from the walk through the next walk (a null vm is the thread's own).
    vm, has_vm, tid = np.where(valid["vm"], col["vm"], 0), valid["vm"], col["tid"]
    change = np.concatenate(([0], np.cumsum((vm[1:] != vm[:-1]) | (has_vm[1:] != has_vm[:-1]) | (tid[1:] != tid[:-1]))))
    ad_addr_ok = np.ones(len(start), dtype=bool)
    for j in range(MAX_AD):
        ad_addr_ok &= (j >= n_ad) | valid["addr"][at(1 + LEVELS + j)]
    fits = (ptes_ok & (n_ad <= MAX_AD) & (is_fault | is_unmap) & (change[end] == change[start])
            & valid["addr"][start] & valid["error_code"][start] & ad_addr_ok)
    runs = _spans(fits, MIN_RUN)
    if not runs:
        return None
    mmu_max_at = np.maximum.accumulate(np.where(valid["mmu_max"] & (code != PTE), np.arange(n), -1))
    return BatchPlan(code, col, mmu_max_at, valid["map_writable"], walks, is_fault, n_ad, runs)


@dataclass(frozen=True)
class WalkClass:
    """What FNAME(walk_addr_generic) decides alike for every walk of one class (None: not bulk)."""

    n_ad: int
    #: The A/D writes in order: (code, gpa; None where it is the leaf's, which varies in the class).
    ad: tuple[tuple[int, int | None], ...]
    leaf_table_gfn: int
    #: The tables FNAME(fetch) links below the root, level 2 first (gw->table_gfn[0..2]).
    table_gfns: tuple[int, ...]
    pte_access: int
    #: The bits FNAME(update_accessed_dirty_bits) set in the leaf gpte (what learn_gpte remembers).
    leaf_ad: int

    @functools.cached_property
    def row(self) -> tuple[int, ...]:
        """The class as one row of numbers, laid out as ``ClassColumns`` reads it."""
        ad = self.ad + ((OTHER, 0),) * (MAX_AD - self.n_ad)
        return (self.leaf_table_gfn, self.n_ad, *(code for code, _ in ad), *(gpa is None for _, gpa in ad),
                *(gpa or 0 for _, gpa in ad), *self.table_gfns, self.leaf_ad)


class ClassColumns:
    """The classes of a run's walks, one row per walk (``WalkClass.row``; zeros for no class)."""

    def __init__(self, classes: list[WalkClass | None], inverse: np.ndarray) -> None:
        width = 2 + 3 * MAX_AD + LEVELS
        rows = [c.row if c is not None else (0,) * width for c in classes]
        self.table = np.array(rows, dtype=_U64).reshape(-1, width)[inverse]
        self.leaf_table_gfn, self.n_ad = self.table[:, 0], self.table[:, 1].astype(np.int64)
        self.ad_code = self.table[:, 2:2 + MAX_AD].astype(np.int8)
        self.ad_is_leaf = self.table[:, 2 + MAX_AD:2 + 2 * MAX_AD] != 0
        self.ad_gpa = self.table[:, 2 + 2 * MAX_AD:2 + 3 * MAX_AD]
        self.table_gfns = self.table[:, 2 + 3 * MAX_AD:1 + 3 * MAX_AD + LEVELS]
        self.leaf_ad = self.table[:, -1]


#: Walk classes already evaluated, by (cpu role, root gfn, class key): a class's decisions depend
#: on nothing else, so they hold across runs, VMs and traces.
_CLASSES: dict[tuple, WalkClass | None] = {}
_CLASSES_MAX = 1 << 16


def bulk_capable(vm: VmReplay) -> bool:
    """A VM whose decisions the bulk rules can judge at all: the shadow MMU model itself (not a
    replacement), no lost events, default parameters, no model event stream to write."""
    return (vm.tdp_replay is None and not vm.lost_cpus and not vm.param_kinds and vm.result._model_rows is None
            and type(vm.shadow) is ShadowMmu)


def _steady(vm: VmReplay, t: Thread | None) -> bool:
    """Model and thread state in which the bulk rules are the per-event rules (else: no bulk)."""
    if vm.shadow.undecidable is not None or vm.shadow.pte_prefetch_window is not None:
        return False
    if t is None or t.vcpu is None or t.pending or t.fault is not None or t.fault_waiting is not None \
            or t.emulating is not None or (t.walk is not None and t.walk.walker is None):
        return False
    vcpu = t.vcpu
    return (vcpu.root is not None and not vcpu.needs_load and vcpu.cpu_role.root_level == LEVELS
            and vcpu.cpu_role.cr0_wp and vcpu.root.level == LEVELS)


def _walk_class(vcpu: VcpuMmu, key: tuple[int, ...], addr: int, ptes: list[int]) -> WalkClass | None:
    """Run the walker for one representative walk of a class (``key[0]`` is its error code)."""
    root_gfn = vcpu.root_gfn if vcpu.root_gfn is not None else vcpu.root.gfn
    cache_key = (vcpu.cpu_role, root_gfn, key)
    if cache_key in _CLASSES:
        return _CLASSES[cache_key]
    if len(_CLASSES) >= _CLASSES_MAX:
        _CLASSES.clear()
    w = walk_addr_generic(PTTYPE_64, vcpu.cpu_role, root_gfn, addr, key[0], ptes)
    c = None
    if not w.truncated and w.fault_error_code is None and w.level == 1:
        leaf_gpa = w.pte_gpa[0]
        ad = [(CODE[event], None if gpa == leaf_gpa else gpa) for event, gpa in w.ad_writes]
        # an upper table entry at the leaf's address would not vary with it: not a class
        if w.pte_gpa.count(leaf_gpa) == 1:
            c = WalkClass(len(ad), tuple(ad), w.table_gfn[0], tuple(w.table_gfn[:LEVELS - 1]), w.pte_access,
                          w.ptes[0] & ~ptes[-1])
    _CLASSES[cache_key] = c
    return c


def _fetch_path(vcpu: VcpuMmu, addr: int) -> tuple[ShadowPage, ...] | None:
    """The shadow pages FNAME(fetch) goes through for ``addr``, root first, when kvm_mmu_get_child_sp
    finds every link present down to a level-1 page (no decision before the leaf); else None."""
    path = [vcpu.root]
    for level in range(LEVELS, 1, -1):
        child = path[-1].children.get((addr >> (12 + 9 * (level - 1))) & 511)
        if child is None:
            return None
        path.append(child)
    return tuple(path) if path[-1].level == 1 else None


def _classes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, axis=0): the first row of each distinct key and each row's key index.  The
    rows are sorted by a 64-bit mix of their key (one column sorts much faster than six); a mix
    shared by different keys (checked) takes the exact way."""
    mix = np.zeros(len(keys), dtype=_U64)
    for j in range(keys.shape[1]):
        mix = (mix ^ keys[:, j]) * _U64(0x9E3779B97F4A7C15)
        mix ^= mix >> _U64(29)
    _, first, inverse = np.unique(mix, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not (keys[first][inverse] == keys).all():
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


@dataclass
class Pace:
    """How many episodes the next bulk attempt judges, from how far the last ones got: an attempt's
    checks cost ~0.3 ms plus ~1 us an episode, so a trace whose runs keep stopping early is judged
    in small attempts and a steady one in large ones."""

    size: int = MIN_ATTEMPT
    #: Attempts in a row that replayed fewer than MIN_RUN episodes.
    short: int = 0


def replay_run(vm: VmReplay, plan: BatchPlan, e0: int, e1: int, pace: Pace) -> tuple[int, int]:
    """Replay episodes [e0, e1) of ``plan`` (a ``bulk_capable`` VM's) in bulk as far as they fit.

    Returns the first episode not replayed and the next one worth trying in bulk after it (the
    episodes between them go per event).  After two short attempts in a row the next ``SKIP``
    episodes go per event, so a run that keeps stopping early costs at most about twice the
    per-event path, never the square of its length.
    """
    stop, resume = _attempt(vm, plan, e0, min(e1, e0 + pace.size))
    applied = stop - e0
    pace.size = min(max(4 * applied, MIN_ATTEMPT), MAX_ATTEMPT)
    pace.short = pace.short + 1 if applied < MIN_RUN else 0
    if pace.short >= 2:
        resume = max(resume, stop + SKIP)
    return stop, min(resume, e1)


def _attempt(vm: VmReplay, plan: BatchPlan, e0: int, e1: int) -> tuple[int, int]:
    """One bulk attempt over episodes [e0, e1): the first episode not replayed and the next one that
    passed the column checks after it."""
    walks, col, code = plan.walks, plan.col, plan.code
    w_at = walks[e0:e1]
    t = vm.threads.get(int(col["tid"][w_at[0]]))
    if not _steady(vm, t):
        return e0, e0 + 1
    vcpu, shadow, arch = t.vcpu, vm.shadow, vm.arch
    n = len(w_at)
    addr = col["addr"][w_at].astype(_U64)
    access = col["error_code"][w_at].astype(_U64)
    ptes = [col["spte"][w_at + j].astype(_U64) for j in range(1, LEVELS + 1)]
    leaf = ptes[-1]
    # Classes: the walk's decisions depend on the leaf PTE's frame bits below MAXPHYADDR only
    # through gpte_to_gfn_lvl, and on address bits 12-20 only through the leaf's index.
    frame = _U64(((1 << vcpu.cpu_role.maxphyaddr) - 1) & ~0xFFF)
    keys = np.stack([access, ptes[0], ptes[1], ptes[2], leaf & ~frame, addr >> _U64(21)], axis=1)
    first, inverse = _classes(keys)
    classes: list[WalkClass | None] = []
    paths: list[tuple[ShadowPage, ...] | None] = []
    region_paths: dict[int, tuple[ShadowPage, ...] | None] = {}  # by 2M region (key[-1])
    for f, key in zip(first.tolist(), keys[first].tolist()):
        c = _walk_class(vcpu, tuple(key), int(addr[f]), [int(p[f]) for p in ptes])
        classes.append(c)
        if c is not None and key[-1] not in region_paths:
            region_paths[key[-1]] = _fetch_path(vcpu, int(addr[f]))
        paths.append(region_paths[key[-1]] if c is not None else None)

    per = ClassColumns(classes, inverse)
    # FNAME(pte_prefetch) of a direct level-1 page (a guest huge page's) takes __direct_pte_prefetch.
    ok = np.array([p is not None and not shadow.layout.get(p[-1].role, "direct") for p in paths], dtype=bool)[inverse]
    # gpte_to_gfn_lvl(leaf, 1); the leaf's pte_gpa: its table and the address's level-1 index.
    gfn = (leaf & _U64(PTTYPE_64.base_addr_mask)) >> _U64(12)
    index = (addr >> _U64(12)) & _U64(511)
    leaf_gpa = (per.leaf_table_gfn << _U64(12)) + index * _U64(8)
    # The recorded A/D writes, in order, against the walker's.
    n_ad = plan.n_ad[e0:e1]
    ok &= n_ad == per.n_ad
    for j in range(MAX_AD):
        row = np.minimum(w_at + 1 + LEVELS + j, len(code) - 1)
        want_gpa = np.where(per.ad_is_leaf[:, j], leaf_gpa, per.ad_gpa[:, j])
        ok &= (j >= n_ad) | ((code[row] == per.ad_code[:, j]) & (col["addr"][row].astype(_U64) == want_gpa))
    # page_fault_handle_page_track: a write-tracked gfn makes a present write fault emulate.
    ok &= ~np.isin(gfn, np.fromiter(shadow.gfn_write_track, dtype=_U64, count=len(shadow.gfn_write_track)))

    fault = plan.is_fault[e0:e1]
    req, sset = walks[e0 + 1:e1 + 1] - 2, walks[e0 + 1:e1 + 1] - 1
    # mmu_try_to_unsync_pages finds nothing to unsync or refuse only for a gfn no shadow page has
    # (make_spte then never write-protects); FNAME(fetch) does not write to its own tables.
    shadowed = np.fromiter(shadow.mmu_page_hash, dtype=_U64, count=len(shadow.mmu_page_hash))
    fault_ok = ~np.isin(gfn, shadowed)
    for level in range(LEVELS - 1):
        fault_ok &= gfn != per.table_gfns[:, level]
    # is_page_fault_stale: no host unmap since the walk (VmReplay.stale_since's first test).
    unmap_ts = np.where(fault, 0, col["ts_ns"][sset]).astype(np.int64)
    last = np.maximum.accumulate(np.where(fault, -1, np.arange(n)))
    before = np.concatenate(([-1], last[:-1]))
    prior = vm.unmaps[-1][0] if vm.unmaps else -1
    last_unmap = np.where(before >= 0, unmap_ts[np.maximum(before, 0)], prior)
    fault_ok &= last_unmap < col["ts_ns"][w_at].astype(np.int64)
    # make_mmu_pages_available: the quota the engine holds at the fault (every handled row's
    # mmu_max; guest PTE rows are not handled) leaves enough free pages; an unknown quota reclaims nothing.
    max_at = plan.mmu_max_at[req]
    in_run = max_at >= walks[e0]
    n_max = col["mmu_max"][np.maximum(max_at, 0)].astype(np.int64)
    if arch.n_max_mmu_pages is None:
        known = in_run
    else:
        known = np.ones(n, dtype=bool)
        n_max = np.where(in_run, n_max, arch.n_max_mmu_pages)
    fault_ok &= ~known | (np.maximum(n_max - arch.n_used_mmu_pages, 0) >= KVM_MIN_FREE_MMU_PAGES)
    # FNAME(fetch)'s map_writable: recorded, else a write fault's or (with zero_pfn) not the zero page.
    pfn = col["pfn"][req].astype(_U64)
    write = (access & _U64(PFERR_WRITE_MASK)) != 0
    recorded_mw = plan.valid_map_writable[req]
    zero_pfn = arch.zero_pfn
    derived = write | ((pfn != _U64(zero_pfn)) if zero_pfn is not None else False)
    host_writable = np.where(recorded_mw, col["map_writable"][req].astype(bool), derived)
    fault_ok &= recorded_mw | write | (zero_pfn is not None)
    fault_ok &= pfn < _U64(PFN_LIMIT)
    # mmu_set_spte over a present SPTE takes other branches (the same pfn kept, write protection
    # lifted, a spurious fault): not bulk.  Only a host unmap removes an SPTE in a run, so one
    # present now and with no unmap before its fault in the run is present then (the rest: _apply).
    leaves = [p[-1] if p is not None else None for p in paths]
    present = np.array([leaves[c] is not None and i in leaves[c].sptes
                        for c, i in zip(inverse.tolist(), index.tolist())], dtype=bool)
    fault_ok &= ~(present & (before < 0))
    # kvm_mmu_spte_requested (goal_level 1) and kvm_mmu_set_spte against the record.
    flags: dict[tuple[int, bool, bool], int] = {}
    table = []
    for c, path in zip(classes, paths):
        row = [0, 0]
        if path is not None:
            ad_disabled = bool(shadow.layout.get(path[-1].role, "ad_disabled"))
            for hw in (False, True):
                fkey = (c.pte_access, ad_disabled, hw)
                if fkey not in flags:
                    flags[fkey] = make_spte(shadow.flavor, shadow.rules.spte, level=1, ad_disabled=ad_disabled,
                                            pte_access=c.pte_access, pfn=0, old_spte=shadow.rules.nonpresent_spte,
                                            prefetch=False, synchronizing=False, host_writable=hw,
                                            nx_huge_pages=arch.nx_huge_pages, try_to_unsync=lambda: False)[0]
                row[hw] = flags[fkey]
        table.append(row)
    flag_table = np.array(table, dtype=_U64)
    spte = flag_table[inverse, host_writable.astype(np.int64)] | (pfn << _U64(12))
    fault_ok &= (col["gfn"][req].astype(_U64) == gfn) & (col["level"][req] == 1)
    fault_ok &= (col["gfn"][sset].astype(_U64) == gfn) & (col["level"][sset] == 1)
    fault_ok &= col["spte"][sset].astype(_U64) == spte
    fault_ok &= (col["sptep"][sset].astype(_U64) & _U64(0xFFF)) == index * _U64(8)
    ok &= ~fault | fault_ok
    bad = np.flatnonzero(~ok)
    fits = int(bad[0]) if len(bad) else n
    walked = Walked(leaf_gpa, leaf | per.leaf_ad, pfn, host_writable)
    done = _apply(vm, t, plan, e0, fits, inverse, paths, index, gfn, spte, walked) if fits else 0
    if done < fits:
        return e0 + done, e0 + done + 1
    later = np.flatnonzero(ok[fits + 1:])
    return e0 + fits, e0 + fits + 1 + int(later[0]) if len(later) else e1


@dataclass
class Walked:
    """Per episode of an attempt, what the per-event path learns from it besides its SPTE."""

    #: The leaf gpte's gpa (w->pte_gpa[0]) and its value after the walk's A/D writes (w->ptes[0]).
    leaf_gpa: np.ndarray
    leaf_gpte: np.ndarray
    #: The fault's pfn and whether it is mapped writable (fault->map_writable).
    pfn: np.ndarray
    host_writable: np.ndarray


def _apply(vm: VmReplay, t: Thread, plan: BatchPlan, e0: int, fits: int, inverse: np.ndarray,
           paths: list[tuple[ShadowPage, ...] | None], index: np.ndarray, gfn: np.ndarray, spte: np.ndarray,
           walked: Walked) -> int:
    """The state changes of the first ``fits`` episodes in trace order, stopping before a fault whose
    leaf SPTE is present by then or whose FNAME(pte_prefetch) would map a neighbour; the tallies of
    what was applied.  Returns the number of episodes applied.

    Per episode, the per-event path's functions in its order: ``learn_gpte`` of the walk's leaf
    (VmReplay.complete_walk); for a fault, ``invalidate_in_progress`` at its kvm_mmu_spte_requested,
    ``learn_pfn`` (FNAME(fetch) after kvm_mmu_faultin_pfn), mmu_set_spte's SPTE, timestamp,
    ``guest_may_write`` and rmap_add, then ``fault_done`` (the prefetch window, if any, goes to the
    thread: its next walk closes it); for a host unmap, kvm_unmap_gfn_range of each range
    ``_unmap_hits`` found and ``VmReplay.unmapped``.  Whether pte_prefetch maps anything is asked
    of ``prefetch_gptes`` before the SPTE is installed (the faulting index is skipped there, the
    neighbours' gptes were read before it): the episode then goes per event, which learns the same
    gpte, host page and invalidation state again (each is a plain overwrite)."""
    walks, col = plan.walks, plan.col
    shadow, arch, vcpu = vm.shadow, vm.arch, t.vcpu
    first_ts = int(col["ts_ns"][walks[e0]])
    vm.end_episode(t, {"ts_ns": first_ts, "cpu": 0, "tid": t.tid})  # what the first walk's row does first
    last = walks[e0 + 1:e0 + fits + 1] - 1
    ts = col["ts_ns"][last - 1].tolist()  # kvm_mmu_spte_requested's: mmu_set_spte runs while it is handled
    fault = plan.is_fault[e0:e0 + fits]
    leaves = np.empty(len(paths), dtype=object)  # the level-1 page of each class
    leaves[:] = [p[-1] if p is not None else None for p in paths]
    unmap_rows = last[~fault]
    start, end = col["addr"][unmap_rows], col["end"][unmap_rows]
    hits = iter(zip(col["ts_ns"][unmap_rows].tolist(), start.tolist(), end.tolist(), _unmap_hits(vm, start, end)))
    rmap_add = shadow.rmap_add
    learn_gpte, guest_may_write, gpte_view = shadow.learn_gpte, shadow.guest_may_write, arch.guest.gpte_view
    pte_prefetch_may_map, prefetch_gptes = shadow.pte_prefetch_may_map, shadow.prefetch_gptes
    gfn_to_memslot, learn_pfn = arch.gfn_to_memslot, arch.guest.learn_pfn
    unmap_gfn_range, invalidate_in_progress = vm.mmu.kvm_unmap_gfn_range, vm.invalidate_in_progress
    done = fits
    for k, (is_fault, sp, i, g, value, when, gpa, gpte, pfn, writable) in enumerate(zip(
            fault.tolist(), leaves[inverse[:fits]].tolist(), index[:fits].tolist(), gfn[:fits].tolist(),
            spte[:fits].tolist(), ts, walked.leaf_gpa[:fits].tolist(), walked.leaf_gpte[:fits].tolist(),
            walked.pfn[:fits].tolist(), walked.host_writable[:fits].tolist())):
        if is_fault and i in sp.sptes:
            done = k
            break
        learn_gpte(gpa, gpte)
        if is_fault:
            t.last_ts = when
            arch.mmu_invalidate_in_progress = invalidate_in_progress() if vm.invalidations else False
            if writable and (slot := gfn_to_memslot(g)) is not None:
                learn_pfn(slot, g, pfn)
            if pte_prefetch_may_map(sp):  # FNAME(pte_prefetch) would map a neighbour: not bulk
                if next(prefetch_gptes(vcpu, sp, i, gpte_view(prefetch_group_gpa(gpa))), None) is not None:
                    done = k
                    break
            sp.sptes[i] = value
            sp.spte_ts[i] = when
            guest_may_write(1, g, value)
            rmap_add(sp, i, g)
            if shadow.pte_prefetch_window is not None:
                vm.fault_done(t, "fixed")
        else:
            unmap_ts, addr, unmap_end, hit = next(hits)
            for gfn_range in hit or ():
                unmap_gfn_range(*gfn_range)
            vm.unmapped({"ts_ns": unmap_ts, "tid": t.tid, "addr": addr, "end": unmap_end}, hit)
    if done == 0:
        return 0
    applied = np.flatnonzero(fault[:done])
    classes, first = np.unique(inverse[applied], return_index=True)
    for k, c in sorted(zip(applied[first].tolist(), classes.tolist())):  # in trace order
        path = paths[c]
        for sp in path:
            sp.write_flooding_count = 0  # FNAME(fetch) clears it on every page it goes through
        if path[-1].spt_page is None:  # learnt from the first kvm_mmu_set_spte that matched
            shadow.learn_spt_page(path[-1], int(col["sptep"][last[k]]))
    lo, hi = walks[e0], walks[e0 + done]
    codes = plan.code[lo:hi]
    for code, kind in KIND_OF.items():
        vm.result.count(kind, "matched", int(np.count_nonzero(codes == code)))
    faults = int(np.count_nonzero(plan.is_fault[e0:e0 + done]))
    vm.result.count("spte_requested", "matched", faults)
    vm.result.count("set_spte", "matched", faults)
    if plan.mmu_max_at[hi - 1] >= lo:
        vm.arch.n_max_mmu_pages = int(col["mmu_max"][plan.mmu_max_at[hi - 1]])
    t.last_ts = vm.arch.now_ns = int(col["ts_ns"][hi - 1])
    vm.result.bulk_events += int(hi - lo)
    return done


def _unmap_hits(vm: VmReplay, start: np.ndarray, end: np.ndarray) -> list[list[tuple[int, int]] | None]:
    """For each host unmap [start, end), the gfn ranges it hits: Memslot.hva_to_gfn_range of every
    memslot in kvm_mmu_notifier_invalidate_range_start's order, a column at a time (None: the
    memslot layout is unknown, as VmReplay.unmap records it)."""
    if not vm.arch.memslots_known:
        return [None] * len(start)
    start, end = start.astype(np.int64), end.astype(np.int64)  # host addresses are below 2**63
    per_slot = []
    for slot in vm.arch.memslots.values():
        lo = np.maximum(start, slot.userspace_addr)
        hi = np.minimum(end, slot.userspace_addr + (slot.npages << 12))
        first = slot.base_gfn + ((lo - slot.userspace_addr) >> 12)
        last = slot.base_gfn + ((hi - 1 - slot.userspace_addr) >> 12) + 1
        per_slot.append(list(zip((lo < hi).tolist(), first.tolist(), last.tolist())))
    return [[(a, b) for hit, a, b in row if hit] for row in zip(*per_slot)] if per_slot else [[] for _ in start]

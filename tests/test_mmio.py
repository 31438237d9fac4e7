"""MMIO SPTEs in both models, on the lab's ``mmio`` recordings (kvm_amd in L1 has ``mmio_caching=Y``).

The first access to an MMIO page installs an MMIO SPTE (``mark_mmio_spte``: the memslot generation
in its bits 3-10 and 52-62); later accesses fault with PFERR_RSVD and are emulated through
``handle_mmio_page_fault``, silently when the vCPU's MMIO cache holds the page.  The generation is
derived from the traced KVM_CREATE_VM and KVM_SET_USER_MEMORY_REGION ioctls.  This host's own
traces (``mmio_caching=N``) have no MMIO SPTE at all: tests/test_replay.py replays them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmutrace.kvm.uapi import KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION
from mmutrace.lab.inside import stamp_metadata
from mmutrace.storage import open_trace
from replay import engine
from replay.engine import MMIO_CACHE_EXITS, R_MEMSLOT_UPDATING, R_MMIO_CACHE, replay_trace
from replay.mmu import KVM_ADDRESS_SPACE_NUM, R_MEMSLOT_GEN
from replay.role import ACC_ALL
from replay.spte import (MMIO_RSVD_PA_VALUE, REMOVED_SPTE_LOW, get_mmio_spte_access, get_mmio_spte_generation,
                         get_mmio_spte_gfn, is_mmio_spte, kvm_mmu_reset_all_pte_masks_mmio, kvm_mmu_set_mmio_spte_mask,
                         make_mmio_spte)
from replay.versions import Split
from test_tdp_mmu import only_divergence, rewrite

LAB = Path(__file__).resolve().parent.parent / "examples" / "lab"
MMIO_TRACES = sorted(LAB.glob("*-bcc/mmio.parquet"))
TDP_MMIO = [p for p in MMIO_TRACES if "-tdp-" in p.parent.name]
SHADOW_MMIO = [p for p in MMIO_TRACES if "-shadow-" in p.parent.name]
#: The mmio_churn scenario: MMIO reads around a memslot create, flags change, move and delete.
CHURN_TRACES = sorted(LAB.glob("*-bcc/mmio_churn.parquet"))
MASKS = kvm_mmu_reset_all_pte_masks_mmio(True, maxphyaddr_below_52=True, removed_spte=REMOVED_SPTE_LOW)

#: trace -> (decisions, matched, undecidable): the one undecidable is the untraced VM teardown.
EXPECTED = {
    "6.1-shadow-bcc": (594, 593, 1),
    "6.12-shadow-bcc": (594, 593, 1),
    "6.1-tdp-bcc": (559, 558, 1),
    "6.12-tdp-bcc": (559, 558, 1),
}
EXPECTED_CHURN = {
    "6.1-shadow-bcc": (125, 124, 1),
    "6.1-tdp-bcc": (4235, 4234, 1),
    "6.12-shadow-bcc": (125, 124, 1),
    "6.12-tdp-bcc": (4239, 4238, 1),
}


def trace_id(path: Path) -> str:
    return path.parent.name


def recorded(path: Path, event: str) -> list[dict]:
    table = pq.read_table(path).to_pylist()
    return [r for r in table if r["event"] == event]


def mmio_spte_changes(path: Path) -> list[dict]:
    return [r for r in recorded(path, "kvm_tdp_mmu_spte_changed") if is_mmio_spte(MASKS, r["new_spte"])]


def replay_exactly(path: Path, expected: dict[str, tuple[int, int, int]]) -> dict:
    """Replay ``path``: no divergence, and exactly its (decisions, matched, undecidable)."""
    result = replay_trace(path).to_json()
    assert (result["mismatched"], result["missing"], result["extra"]) == (0, 0, 0), result["divergences"][:3]
    assert (result["decisions"], result["matched"], result["undecidable"]) == expected[trace_id(path)]
    return result


@pytest.mark.parametrize(("traces", "expected"), [(MMIO_TRACES, EXPECTED), (CHURN_TRACES, EXPECTED_CHURN)],
                         ids=["mmio", "mmio_churn"])
def test_every_lab_trace_of_the_scenario_is_committed(traces, expected):
    assert sorted(map(trace_id, traces)) == sorted(expected)


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_every_mmio_decision_is_decided_and_matched(path):
    result = replay_exactly(path, EXPECTED)
    marks, faults = len(recorded(path, "mark_mmio_spte")), len(recorded(path, "handle_mmio_page_fault"))
    assert marks == 16 and faults > 200  # one SPTE per page of the 16-page window; the rest are RSVD faults
    assert result["by_kind"]["mark_mmio_spte"]["matched"] == marks
    assert result["by_kind"]["mmio_page_fault"]["matched"] == faults
    assert result["undecidable"] < 0.01 * result["decisions"]


@pytest.mark.parametrize("path", TDP_MMIO, ids=trace_id)
def test_tdp_mmio_sptes_are_installed_by_spte_changed_and_judged(path):
    """Every MMIO SPTE the TDP MMU writes is a kvm_tdp_mmu_spte_changed with the full value."""
    changes = mmio_spte_changes(path)
    assert len(changes) == len(recorded(path, "mark_mmio_spte")) == 16
    result = replay_trace(path).to_json()
    assert result["by_kind"]["tdp_spte_changed"]["undecidable"] == 1  # the teardown's first zap only


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_make_mmio_spte_rebuilds_every_checked_spte(path):
    """check_mmio_spte reports the SPTE the fault read and the memslots' generation: the encoding
    must give back that exact value from (generation, gfn, access)."""
    checks = recorded(path, "check_mmio_spte")
    assert len(checks) == len(recorded(path, "handle_mmio_page_fault"))
    for row in checks:
        spte = row["spte"]
        assert is_mmio_spte(MASKS, spte)
        assert get_mmio_spte_generation(spte) == row["gen"] == row["kvm_gen"]
        assert make_mmio_spte(MASKS, row["gen"], get_mmio_spte_gfn(MASKS, spte), get_mmio_spte_access(MASKS, spte)) \
            == spte


@pytest.mark.parametrize("path", TDP_MMIO, ids=trace_id)
def test_tdp_mmio_spte_values_come_from_make_mmio_spte(path):
    marks = {r["gfn"]: r for r in recorded(path, "mark_mmio_spte")}
    for row in mmio_spte_changes(path):
        assert row["new_spte"] == make_mmio_spte(MASKS, marks[row["gfn"]]["gen"], row["gfn"], ACC_ALL)


def test_mmio_caching_rules():
    """kvm_mmu_set_mmio_spte_mask: on only if allowed, with a reserved bit to fault on, and never
    with a value a frozen SPTE would match."""
    assert kvm_mmu_reset_all_pte_masks_mmio(False, True, REMOVED_SPTE_LOW).enable_mmio_caching is False
    assert kvm_mmu_reset_all_pte_masks_mmio(True, False, REMOVED_SPTE_LOW).enable_mmio_caching is False
    on = kvm_mmu_reset_all_pte_masks_mmio(True, True, REMOVED_SPTE_LOW)
    assert (on.enable_mmio_caching, on.value) == (True, MMIO_RSVD_PA_VALUE)
    frozen_612 = (1 << 63) | REMOVED_SPTE_LOW
    assert not kvm_mmu_set_mmio_spte_mask(True, 1 << 63, 1 << 63, 0, frozen_612).enable_mmio_caching
    assert not kvm_mmu_set_mmio_spte_mask(True, 1 << 11, 1 << 11, 0, 0).enable_mmio_caching  # not an allowed bit
    assert not is_mmio_spte(kvm_mmu_reset_all_pte_masks_mmio(False, True, 0), 0)


@pytest.mark.parametrize("path", [SHADOW_MMIO[0], TDP_MMIO[0]], ids=trace_id)
def test_the_recorded_mmio_caching_parameter_switches_mmio_sptes(path, tmp_path):
    """The same trace said to come from an mmio_caching=N kernel: the model installs no MMIO SPTE,
    so every recorded MMIO decision is missing and the model predicts nothing in their place."""
    copy = tmp_path / "no-caching.parquet"
    shutil.copy(path, copy)
    stamp_metadata(copy, {"kvm_params": {**open_trace(path).metadata["kvm_params"], "mmio_caching": "N"}})
    result = replay_trace(copy).to_json()
    for kind, event in (("mark_mmio_spte", "mark_mmio_spte"), ("mmio_page_fault", "handle_mmio_page_fault")):
        assert result["by_kind"][kind]["missing"] == len(recorded(path, event))
    assert result["by_kind"]["set_spte"]["extra"] == 0


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_without_the_vms_creation_the_generation_is_undecidable(path, tmp_path):
    """A trace that starts after KVM_CREATE_VM (as tracefs captures do): every MMIO decision is
    undecidable, named, and nothing diverges."""
    table = pq.read_table(path)
    keep = [not (r["event"] == "ioctl_create_vm" or (r["event"] == "ioctl_ret" and r["ioctl"] == KVM_CREATE_VM))
            for r in table.select(["event", "ioctl"]).to_pylist()]
    late = tmp_path / "late.parquet"
    pq.write_table(table.filter(keep), late)
    result = replay_trace(late).to_json()
    assert (result["mismatched"], result["missing"], result["extra"]) == (0, 0, 0), result["divergences"][:3]
    mmio = [*recorded(path, "mark_mmio_spte"), *recorded(path, "handle_mmio_page_fault"), *mmio_spte_changes(path)]
    assert result["undecidable_reasons"][R_MEMSLOT_GEN] == len(mmio) == result["undecidable"] - 1  # + teardown
    assert result["by_kind"]["set_spte"]["matched"] == result["by_kind"]["set_spte"]["decisions"]


# ---- tamper tests: one changed MMIO decision, one divergence, at that event


def rewrite_one(src: Path, dst: Path, event: str, column: str, change) -> int:
    """Copy a trace with ``column`` of the first ``event`` row changed; return its ts_ns."""
    rows = pq.read_table(src).to_pylist()
    i = next(i for i, r in enumerate(rows) if r["event"] == event and (event != "kvm_tdp_mmu_spte_changed"
                                                                           or is_mmio_spte(MASKS, r["new_spte"])))
    return rewrite(src, dst, i, column, change(rows[i][column]))


@pytest.mark.parametrize("path", TDP_MMIO, ids=trace_id)
def test_flipping_a_generation_bit_of_one_mmio_spte_is_caught_there(path, tmp_path):
    dst = tmp_path / "tampered.parquet"
    ts = rewrite_one(path, dst, "kvm_tdp_mmu_spte_changed", "new_spte", lambda v: v ^ (1 << 3))
    div = only_divergence(dst)
    assert (div["ts_ns"], div["verdict"], div["kind"]) == (ts, "mismatch", "tdp_spte_changed")
    assert div["expected"]["new_spte"] ^ div["actual"]["new_spte"] == 1 << 3


@pytest.mark.parametrize("path", SHADOW_MMIO, ids=trace_id)
def test_changing_the_generation_of_one_shadow_mmio_spte_is_caught_there(path, tmp_path):
    dst = tmp_path / "tampered.parquet"
    ts = rewrite_one(path, dst, "mark_mmio_spte", "gen", lambda v: v + KVM_ADDRESS_SPACE_NUM)
    div = only_divergence(dst)
    assert (div["ts_ns"], div["verdict"], div["kind"]) == (ts, "mismatch", "mark_mmio_spte")
    assert div["actual"]["gen"] - div["expected"]["gen"] == KVM_ADDRESS_SPACE_NUM


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_changing_the_access_of_one_mmio_fault_is_caught_there(path, tmp_path):
    dst = tmp_path / "tampered.parquet"
    ts = rewrite_one(path, dst, "handle_mmio_page_fault", "access", lambda v: v ^ 2)
    div = only_divergence(dst)
    assert (div["ts_ns"], div["verdict"], div["kind"]) == (ts, "mismatch", "mmio_page_fault")


# ---- the memslot generation


def test_memslot_updates_step_the_generation_like_kvm_set_memslot():
    """Create and flags-only publish the memslots once, delete and move twice (the old slot is first
    published invalid), an unchanged region not at all; each publication adds the number of
    address spaces."""
    meta, _ = engine.open_for_replay(TDP_MMIO[0])
    rules = engine.rules_for_release(meta["kernel_release"])
    vm = engine.VmReplay(1, rules, Split.RFC, meta, engine.ReplayResult(None, rules, Split.RFC), engine.ShadowMmu,
                         set(), 0xFFFFFFFF)
    mmu, arch = vm.mmu, vm.arch
    assert arch.memslots_generation is None
    mmu.kvm_create_vm()
    steps = []
    for slot, base, npages, flags in ((0, 0, 512, 0), (1, 1 << 18, 64, 0), (1, 1 << 18, 64, 0), (1, 1 << 18, 64, 1),
                                      (1, 1 << 19, 64, 1), (1, 0, 0, 0)):
        before = arch.memslots_generation
        mmu.kvm_set_memory_region(slot, base, npages, 0x7F0000000000 + slot * (1 << 30), flags)
        steps.append((arch.memslots_generation - before) // KVM_ADDRESS_SPACE_NUM)
    assert steps == [1, 1, 0, 1, 2, 2]
    mmu.kvm_set_memory_region_failed()
    assert arch.memslots_generation is None


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_mmio_decisions_during_another_threads_memslot_update_are_undecidable(path, tmp_path):
    """While a KVM_SET_USER_MEMORY_REGION is between its entry and its return on another thread, the
    generation a vCPU reads may be the old one, in progress, or the new one: the MMIO fault in that
    window is undecidable by name, and everything else is still judged."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    update = next(r for r in rows if r["event"] == "ioctl_set_user_memory_region" and r["slot_npages"])
    i = next(i for i, r in enumerate(rows) if r["event"] == "handle_mmio_page_fault")
    fault = max(j for j in range(i) if rows[j]["event"] == "kvm_page_fault")
    start = {**update, "tid": 1 << 30, "pid": 1 << 30, "ts_ns": rows[fault]["ts_ns"]}  # the same region again
    end = {**{k: None for k in update}, "event": "ioctl_ret", "ioctl": KVM_SET_USER_MEMORY_REGION, "ret": 0,
           "tid": 1 << 30, "pid": 1 << 30, "vm": update["vm"], "cpu": 0, "seq": 0, "ts_ns": rows[i]["ts_ns"]}
    racing = tmp_path / "racing.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:fault] + [start] + rows[fault:i + 1] + [end] + rows[i + 1:],
                                        schema=table.schema), racing)
    result = replay_trace(racing).to_json()
    assert (result["mismatched"], result["missing"], result["extra"]) == (0, 0, 0), result["divergences"][:3]
    assert result["undecidable_reasons"][R_MEMSLOT_UPDATING] == 1
    assert result["by_kind"]["mmio_page_fault"]["undecidable"] == 1


@pytest.mark.parametrize("path", MMIO_TRACES, ids=trace_id)
def test_an_exit_that_may_clear_the_mmio_cache_makes_the_next_mmio_fault_undecidable(path, tmp_path):
    """A CR3 write (SVM_EXIT_WRITE_CR3) may have cleared the vCPU's cached MMIO access: the next
    MMIO fault is undecidable by name, and the access it caches makes the cache known again."""
    rows = pq.read_table(path).to_pylist()
    i = [i for i, r in enumerate(rows) if r["event"] == "handle_mmio_page_fault"][10]
    exit_row = max(j for j in range(i) if rows[j]["event"] == "kvm_exit")
    assert open_trace(path).metadata["kvm_backend"] == "kvm_amd" and 0x013 in MMIO_CACHE_EXITS["kvm_amd"]
    cr3 = tmp_path / "cr3.parquet"
    rewrite(path, cr3, exit_row, "exit_reason", 0x013)
    before, after = replay_trace(path).to_json(), replay_trace(cr3).to_json()
    assert (after["mismatched"], after["missing"], after["extra"]) == (0, 0, 0), after["divergences"][:3]
    assert after["undecidable_reasons"][R_MMIO_CACHE] == 1
    assert after["by_kind"]["mmio_page_fault"]["matched"] == before["by_kind"]["mmio_page_fault"]["matched"] - 1


# ---- the generation across memslot updates, on real traces (scenario mmio_churn)


def phases(path: Path) -> dict[str, list[dict]]:
    """Each phase's recorded rows (from its marker to the next)."""
    markers = open_trace(path).metadata["markers"]
    out: dict[str, list[dict]] = {m["text"].split(":")[1]: [] for m in markers}
    bounds = [(m["ts_ns"], m["text"].split(":")[1]) for m in markers]
    for row in pq.read_table(path).to_pylist():
        name = next((name for ts, name in reversed(bounds) if row["ts_ns"] >= ts), None)
        if name is not None:
            out[name].append(row)
    return out


@pytest.mark.parametrize("path", CHURN_TRACES, ids=trace_id)
def test_mmio_churn_replays_every_decision(path):
    result = replay_exactly(path, EXPECTED_CHURN)
    assert result["by_kind"]["mark_mmio_spte"]["matched"] == len(recorded(path, "mark_mmio_spte")) == 5 * 4
    assert result["by_kind"]["mmio_page_fault"]["matched"] == len(recorded(path, "handle_mmio_page_fault"))


@pytest.mark.parametrize("path", CHURN_TRACES, ids=trace_id)
def test_each_memslot_update_steps_the_recorded_generation_as_modelled(path):
    """The kernel's generations in the trace: 2 per publication (the guest's own slot: 2), create
    and flags once, move and delete twice; after create and flags the old MMIO SPTEs are stale
    (check_mmio_spte's generations differ) and are marked again, after move and delete (fast zap)
    they are made afresh.  The replay above matched every one of these marks."""
    by_phase = phases(path)
    gens = {name: {r["gen"] for r in rows if r["event"] == "mark_mmio_spte"} for name, rows in by_phase.items()}
    publications = {"mmio": 1, "create": 2, "flags": 3, "move": 5, "delete": 7}
    assert {name: gens[name] for name in publications} == \
        {name: {n * KVM_ADDRESS_SPACE_NUM} for name, n in publications.items()}
    for name in ("create", "flags"):
        stale = [r for r in by_phase[name] if r["event"] == "check_mmio_spte" and r["gen"] != r["kvm_gen"]]
        assert len(stale) == 4, name
    for name in ("move", "delete"):
        assert [r["event"] for r in by_phase[name]].count("kvm_mmu_zap_all_fast") == 1


@pytest.mark.parametrize("path", CHURN_TRACES, ids=trace_id)
def test_changing_the_generation_of_one_stale_remark_is_caught_there(path, tmp_path):
    """A mark made after check_mmio_spte found the old SPTE stale (the flags phase)."""
    flags_start = next(m["ts_ns"] for m in open_trace(path).metadata["markers"] if m["text"].endswith(":flags"))
    rows = pq.read_table(path).to_pylist()
    i = next(i for i, r in enumerate(rows) if r["event"] == "mark_mmio_spte" and r["ts_ns"] >= flags_start)
    dst = tmp_path / "tampered.parquet"
    rewrite(path, dst, i, "gen", rows[i]["gen"] - KVM_ADDRESS_SPACE_NUM)  # the generation before the flags change
    div = only_divergence(dst)
    assert (div["ts_ns"], div["verdict"], div["kind"]) == (rows[i]["ts_ns"], "mismatch", "mark_mmio_spte")

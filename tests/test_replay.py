"""Replay of real recordings (tests/data, made by tests/data/capture_traces.py on this PVM host).

Every committed scenario trace replays with no divergence; tampering with one recorded decision
gives a divergence at exactly that event; deliberately broken models diverge on the same traces;
bad input fails with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mmutrace import schema
from replay.engine import replay_trace
from replay.guest_memory import GuestMemory
from replay.mmu import KvmArch, VcpuMmu
from replay.shadow_mmu import ShadowMmu

DATA = Path(__file__).resolve().parent / "data"
TRACES = sorted(DATA.glob("*.parquet"))
SCENARIOS = {p.stem for p in TRACES}
#: Recorded with the bcc recorder's input probes (ioctls, struct kvm_page_fault, quota):
#: ``mmutrace record --scenario NAME --size N --seed 1 -o tests/data/bcc/NAME.parquet``
#: with N = 256 (pt_rewrite, mmu_pages_limit, dirty_log, memslot_churn, unmap_refault) and 4 (cr3_switch).
BCC_TRACES = sorted((DATA / "bcc").glob("*.parquet"))
EXAMPLES = DATA.parent.parent / "examples"
#: Every committed trace: the scenarios (tracefs and bcc), the examples and the nested lab's.
ALL_TRACES = TRACES + BCC_TRACES + sorted(EXAMPLES.glob("*.parquet")) + sorted(EXAMPLES.glob("lab/*/*.parquet"))


def test_every_scenario_has_a_committed_trace() -> None:
    from mmutrace.scenarios import SCENARIOS as BUILT_IN

    assert set(BUILT_IN) <= SCENARIOS


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_real_trace_replays_without_divergence(trace: Path) -> None:
    result = replay_trace(trace)
    data = result.to_json()
    assert data["decisions"] > 50
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]
    assert data["matched"] + data["undecidable"] == data["decisions"]
    assert sum(data["undecidable_reasons"].values()) == data["undecidable"]
    for kind, counts in data["by_kind"].items():
        assert counts["decisions"] == sum(counts[v] for v in ("matched", "mismatched", "missing", "extra",
                                                              "undecidable")), kind


@pytest.mark.parametrize("trace", BCC_TRACES, ids=lambda p: p.stem)
def test_recorder_inputs_leave_under_one_percent_undecidable(trace: Path) -> None:
    data = replay_trace(trace).to_json()
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]
    assert data["undecidable"] < 0.01 * data["decisions"], data["undecidable_reasons"]
    # with KVM_SET_SREGS and the quota traced, roots and reclaim are decided, not adopted
    assert not {r for r in data["undecidable_reasons"] if r.startswith(("root", "quota"))}
    assert not data["inferred"]


def test_pre_and_rfc_splits_agree_on_shadow_traces() -> None:
    """RFC patch 9 only moves the reclaim off the TDP fault path: shadow faults decide the same."""
    for trace in TRACES + BCC_TRACES:
        pre, rfc = replay_trace(trace, split="pre").to_json(), replay_trace(trace, split="rfc").to_json()
        assert (pre.pop("split"), rfc.pop("split")) == ("pre", "rfc")
        assert pre == rfc, trace.stem


def test_model_events_are_a_trace_of_the_model_decisions() -> None:
    result = replay_trace(DATA / "touch.parquet")
    table = result.model_events()
    assert table.schema.equals(schema.ARROW_SCHEMA)
    data = result.to_json()
    assert table.num_rows == data["matched"] + data["undecidable"]
    recorded = pq.read_table(DATA / "touch.parquet")
    counts = lambda t: {r["values"]: r["counts"] for r in pc.value_counts(t.column("event").cast(pa.string())).to_pylist()}  # noqa: E731
    model = counts(table)
    assert model["kvm_mmu_set_spte"] == counts(recorded)["kvm_mmu_set_spte"]
    assert model["kvm_mmu_get_page"] == counts(recorded)["kvm_mmu_get_page"]


# --------------------------------------------------------------------------------------------
# Tampering with one recorded decision
# --------------------------------------------------------------------------------------------


def _rows(table: pa.Table, event: str) -> list[int]:
    events = table.column("event").cast(pa.string()).to_pylist()
    return [i for i, e in enumerate(events) if e == event]


def _tampered(tmp_path: Path, source: Path, edit: Callable[[pa.Table], tuple[pa.Table, list[int]]]) -> tuple[Path, list[tuple[int, int]]]:
    """Write ``source`` edited; returns the file and the (ts_ns, seq) of the edited events."""
    table = pq.read_table(source)
    edited, rows = edit(table)
    path = tmp_path / f"tampered-{source.name}"
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)
    keys = [(table.column("ts_ns")[r].as_py(), table.column("seq")[r].as_py()) for r in rows]
    return path, keys


def _set(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column,
                            pa.array(values, type=table.schema.field(column).type))


def _divergences_at(path: Path) -> list[tuple[int, int, str, str]]:
    data = replay_trace(path).to_json()
    return [(d["ts_ns"], d["seq"], d["verdict"], d["kind"]) for d in data["divergences"]]


def test_flip_created_on_one_get_page(tmp_path: Path) -> None:
    def edit(table: pa.Table) -> tuple[pa.Table, list[int]]:
        row = _rows(table, "kvm_mmu_get_page")[2]  # the l2 page of the first fault (decidable)
        return _set(table, "created", row, not table.column("created")[row].as_py()), [row]

    path, [key] = _tampered(tmp_path, DATA / "touch.parquet", edit)
    assert _divergences_at(path) == [(*key, "mismatch", "get_page")]


def test_clear_the_writable_bit_of_one_set_spte(tmp_path: Path) -> None:
    def edit(table: pa.Table) -> tuple[pa.Table, list[int]]:
        spte = table.column("spte").to_pylist()
        row = next(r for r in _rows(table, "kvm_mmu_set_spte") if spte[r] & 2)
        return _set(table, "spte", row, spte[row] & ~2), [row]

    path, [key] = _tampered(tmp_path, DATA / "touch.parquet", edit)
    assert _divergences_at(path) == [(*key, "mismatch", "set_spte")]


def test_shift_one_gfn(tmp_path: Path) -> None:
    def edit(table: pa.Table) -> tuple[pa.Table, list[int]]:
        row = _rows(table, "kvm_mmu_set_spte")[40]
        return _set(table, "gfn", row, table.column("gfn")[row].as_py() + 1), [row]

    path, [key] = _tampered(tmp_path, DATA / "touch.parquet", edit)
    assert _divergences_at(path) == [(*key, "mismatch", "set_spte")]


def test_delete_one_prepare_zap(tmp_path: Path) -> None:
    """The model still zaps the page; it is judged extra at the next recorded event it handles."""
    table = pq.read_table(DATA / "mmu_pages_limit.parquet")
    zaps = _rows(table, "kvm_mmu_prepare_zap_page")
    victim = zaps[len(zaps) // 2]  # a reclaim zap after the quota became known
    after = victim + 1

    def edit(t: pa.Table) -> tuple[pa.Table, list[int]]:
        keep = pa.array([i != victim for i in range(t.num_rows)])
        return t.filter(keep), [after]

    path, [key] = _tampered(tmp_path, DATA / "mmu_pages_limit.parquet", edit)
    assert _divergences_at(path) == [(*key, "extra", "prepare_zap")]


def _prefetched_set_sptes(table: pa.Table) -> list[int]:
    """Rows of the kvm_mmu_set_spte events FNAME(pte_prefetch) made: after a fault's
    kvm_mmu_spte_requested, for another gfn than the fault's (a one-vCPU trace)."""
    events = table.column("event").cast(pa.string()).to_pylist()
    gfns = table.column("gfn").to_pylist()
    rows, fault_gfn = [], None
    for i, event in enumerate(events):
        if event == "kvm_mmu_spte_requested":
            fault_gfn = gfns[i]
        elif event == "kvm_mmu_pagetable_walk":
            fault_gfn = None
        elif event == "kvm_mmu_set_spte" and fault_gfn is not None and gfns[i] != fault_gfn:
            rows.append(i)
    return rows


@pytest.mark.parametrize(("trace", "expected"), [
    (DATA / "bcc" / "memslot_churn.parquet", 226),  # this host, 6.18
    (DATA.parent.parent / "examples" / "lab" / "6.12-shadow-bcc" / "memslot_churn.parquet", 454),  # upstream SVM
], ids=["6.18-pvm", "6.12-lab"])
def test_prefetched_sptes_are_decided(trace: Path, expected: int) -> None:
    """memslot_churn re-reads pages whose gptes already have A set: the kernel prefetches their
    neighbours, and the gptes of earlier walks plus the pfns of earlier faults decide every one."""
    prefetched = len(_prefetched_set_sptes(pq.read_table(trace)))
    data = replay_trace(trace).to_json()
    set_spte = data["by_kind"]["set_spte"]
    assert prefetched == expected
    assert set_spte["matched"] == set_spte["decisions"] == data["by_kind"]["spte_requested"]["decisions"] + prefetched
    assert not [r for r in data["undecidable_reasons"] if r.startswith("prefetched")]


def test_lab_unmap_refault_on_4k_memory_is_all_decided() -> None:
    """examples/lab/6.1-shadow-bcc/unmap_refault.parquet: L1's THP policy is "always"; the scenario
    asks for 4K memory, so MADV_DONTNEED no longer splits a 2M page (whose 2M unmap hid which host
    pages survived: 448 undecidable prefetches before)."""
    data = replay_trace(DATA.parent.parent / "examples" / "lab" / "6.1-shadow-bcc" / "unmap_refault.parquet").to_json()
    assert (data["decisions"], data["matched"], data["undecidable"]) == (5183, 5182, 1)
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0)
    assert data["undecidable_reasons"] == {"VM teardown (kvm_arch_flush_shadow_all) untraced": 1}


def test_change_one_prefetched_spte(tmp_path: Path) -> None:
    def edit(table: pa.Table) -> tuple[pa.Table, list[int]]:
        rows = _prefetched_set_sptes(table)
        row = rows[len(rows) // 2]
        return _set(table, "spte", row, table.column("spte")[row].as_py() ^ 2), [row]  # flip W

    path, [key] = _tampered(tmp_path, DATA / "bcc" / "memslot_churn.parquet", edit)
    assert _divergences_at(path) == [(*key, "mismatch", "set_spte")]


def test_swap_two_zaps(tmp_path: Path) -> None:
    table = pq.read_table(DATA / "mmu_pages_limit.parquet")
    zaps = _rows(table, "kvm_mmu_prepare_zap_page")
    a, b = zaps[len(zaps) // 2], zaps[len(zaps) // 2 + 1]
    assert b == a + 1

    def edit(t: pa.Table) -> tuple[pa.Table, list[int]]:
        for column in ("gfn", "role", "root_count", "unsync", "mmu_valid_gen"):
            va, vb = t.column(column)[a].as_py(), t.column(column)[b].as_py()
            t = _set(_set(t, column, a, vb), column, b, va)
        return t, [a, b]

    path, keys = _tampered(tmp_path, DATA / "mmu_pages_limit.parquet", edit)
    found = _divergences_at(path)
    assert [(ts, seq) for ts, seq, _, _ in found] == keys
    assert {kind for *_, kind in found} == {"prepare_zap"}


# --------------------------------------------------------------------------------------------
# The bulk path (replay/bulk.py) against the per-event path
# --------------------------------------------------------------------------------------------


def _both_paths(trace: Path, split: str | None = None) -> tuple[dict, dict, int]:
    """The JSON of a bulk and of a per-event replay, and how many rows the bulk path replayed."""
    bulk = replay_trace(trace, split=split, keep_model_events=False)
    per_event = replay_trace(trace, split=split, keep_model_events=False, bulk=False)
    assert per_event.bulk_events == 0
    return bulk.to_json(), per_event.to_json(), bulk.bulk_events


@pytest.mark.parametrize("trace", ALL_TRACES, ids=lambda p: str(p.relative_to(DATA.parent.parent)))
def test_bulk_and_per_event_replay_give_identical_verdicts(trace: Path) -> None:
    for split in ("pre", "rfc"):
        bulk, per_event, _ = _both_paths(trace, split)
        assert bulk == per_event, split


def test_bulk_path_replays_the_steady_state_of_a_touch_trace() -> None:
    """All but the VM set-up, the guest's first faults (they create the shadow pages) and its exit."""
    bulk, per_event, bulk_events = _both_paths(EXAMPLES / "touch-seed1.parquet")
    assert bulk == per_event
    assert bulk_events > 0.95 * bulk["events"]


def _tamper_in_a_bulk_run(table: pa.Table) -> tuple[pa.Table, list[int]]:
    """Clear the writable bit of the write fault's SPTE halfway through the trace."""
    spte = table.column("spte").to_pylist()
    sets = [r for r in _rows(table, "kvm_mmu_set_spte") if spte[r] & 2]
    row = sets[len(sets) // 2]
    return _set(table, "spte", row, spte[row] & ~2), [row]


def _drop_an_unmap_in_a_bulk_run(table: pa.Table) -> tuple[pa.Table, list[int]]:
    """Delete the host unmap (COW break) halfway through: the refault then finds its SPTE still
    present (the error code corrects it, the per-event rules' adoption)."""
    unmaps = _rows(table, "kvm_unmap_hva_range")
    victim = unmaps[len(unmaps) // 2]
    return table.filter(pa.array([i != victim for i in range(table.num_rows)])), []


@pytest.mark.parametrize("edit", [_tamper_in_a_bulk_run, _drop_an_unmap_in_a_bulk_run], ids=lambda f: f.__name__)
def test_bulk_path_falls_back_where_an_episode_does_not_fit(tmp_path: Path, edit: Callable) -> None:
    path, keys = _tampered(tmp_path, EXAMPLES / "touch-seed1.parquet", edit)
    bulk, per_event, bulk_events = _both_paths(path)
    assert bulk == per_event
    assert bulk_events > 0.9 * bulk["events"]
    assert [(d["ts_ns"], d["seq"], d["verdict"], d["kind"]) for d in bulk["divergences"]] == \
        [(*key, "mismatch", "set_spte") for key in keys]


# --------------------------------------------------------------------------------------------
# Models broken on purpose
# --------------------------------------------------------------------------------------------


class RoleMatchIgnoringAccess(ShadowMmu):
    @staticmethod
    def role_word_equal(a: int, b: int) -> bool:
        return (a & ~(7 << 8)) == (b & ~(7 << 8))


class QuotaOffByOne(ShadowMmu):
    def kvm_mmu_available_pages(self) -> int | None:
        avail = super().kvm_mmu_available_pages()
        return None if avail is None else avail - 1


class LruReversed(ShadowMmu):
    def active_mmu_pages_from_tail(self) -> list:
        return list(reversed(self.active_mmu_pages))


@pytest.mark.parametrize(("model", "trace", "kind"), [
    (RoleMatchIgnoringAccess, "alias", "get_page"),
    (QuotaOffByOne, "mmu_pages_limit", "prepare_zap"),
    (LruReversed, "mmu_pages_limit", "prepare_zap"),
    (LruReversed, "memslot_churn", "prepare_zap"),
])
def test_broken_models_diverge_on_real_traces(model: type[ShadowMmu], trace: str, kind: str) -> None:
    assert not replay_trace(DATA / f"{trace}.parquet").diverged
    data = replay_trace(DATA / f"{trace}.parquet", shadow_factory=model).to_json()
    assert data["by_kind"][kind]["mismatched"] + data["by_kind"][kind]["missing"] + data["by_kind"][kind]["extra"] > 0


class GuestMemoryKeepingUnmappedPages(GuestMemory):
    def kvm_unmap_hva_range(self, start: int, end: int) -> None:
        pass


class UnmapsKeepHostPages(ShadowMmu):
    def __init__(self, arch: KvmArch, vcpus: dict[int, VcpuMmu]) -> None:
        super().__init__(arch, vcpus)
        arch.guest = GuestMemoryKeepingUnmappedPages()


def test_prefetch_needs_host_pages_forgotten_at_unmap() -> None:
    """unmap_refault: after MADV_DONTNEED the kernel's atomic lookup of a discarded neighbour fails
    (the prefetch stops there); a model that still took the page as present prefetches it."""
    trace = DATA / "bcc" / "unmap_refault.parquet"
    assert not replay_trace(trace).diverged
    data = replay_trace(trace, shadow_factory=UnmapsKeepHostPages).to_json()
    assert data["by_kind"]["set_spte"]["extra"] == 112
    assert data["mismatched"] + data["missing"] == 0


# --------------------------------------------------------------------------------------------
# The command line and bad input
# --------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "replay", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_json_is_one_object_and_exit_status_follows_divergence(tmp_path: Path) -> None:
    ok = _cli(str(DATA / "pt_rewrite.parquet"), "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    for key in ("decisions", "matched", "mismatched", "missing", "extra", "undecidable", "by_kind", "divergences",
                "undecidable_reasons", "adopted", "split", "kernel_release", "version_rules"):
        assert key in data
    assert data["by_kind"]["unsync_page"]["matched"] == 1 and data["by_kind"]["sync_page"]["matched"] == 1

    def edit(table: pa.Table) -> tuple[pa.Table, list[int]]:
        rows = _rows(table, "kvm_mmu_set_spte")[10:13]
        for r in rows:
            table = _set(table, "spte", r, table.column("spte")[r].as_py() ^ 4)
        return table, rows

    path, _ = _tampered(tmp_path, DATA / "touch.parquet", edit)
    bad = _cli(str(path), "--json", "--max-divergences", "2")
    assert bad.returncode == 1
    data = json.loads(bad.stdout)
    assert data["mismatched"] == 3 and len(data["divergences"]) == 2
    human = _cli(str(path))
    assert human.returncode == 1 and "mismatch set_spte" in human.stdout and "mmu_set_spte" in human.stdout


def _with_metadata(tmp_path: Path, name: str, **changes) -> Path:
    table = pq.read_table(DATA / "touch.parquet")
    meta = json.loads(table.schema.metadata[schema.METADATA_KEY])
    meta.update(changes)
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: json.dumps(meta).encode()}), path)
    return path


def test_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    text = tmp_path / "not-a-trace.parquet"
    text.write_text("hello\n")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    cases = {
        str(text): "not a Parquet file",
        str(plain): "not an mmutrace trace",
        str(_with_metadata(tmp_path, "future", schema_version=99)): "schema_version 99",
    }
    unknown = _with_metadata(tmp_path, "unknown-kernel", kernel_release="5.15.0-91-generic")
    cases[str(unknown)] = "--assume-version"
    cases[str(_with_metadata(tmp_path, "lost", lost={"0": 7, "1": 0}, lost_total=7))] = "--allow-lost"
    for path, needle in cases.items():
        proc = _cli(path)
        assert proc.returncode == 2, (path, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert _cli(str(unknown), "--assume-version", "6.18").returncode == 0
    assert _cli(str(DATA / "touch.parquet"), "--split", "sideways").returncode == 2


def test_allow_lost_makes_that_cpus_decisions_undecidable(tmp_path: Path) -> None:
    path = _with_metadata(tmp_path, "lost", lost={"0": 7, "1": 0}, lost_total=7)
    data = replay_trace(path, allow_lost=True).to_json()
    cpus = pq.read_table(DATA / "touch.parquet").column("cpu").to_pylist()
    assert data["undecidable_reasons"].get("events lost on this CPU", 0) > 0
    assert data["mismatched"] + data["missing"] + data["extra"] == 0
    if 1 not in cpus:
        assert data["matched"] == 0


def test_plain_tracefs_text_imported_replays(tmp_path: Path) -> None:
    """tests/data/pt_rewrite.tracefs.txt.gz: a tracefs instance's trace_pipe text of
    ``pt_rewrite --size 64 --seed 1`` (Capture with text_path); no input probes, role words partly
    known, no kernel release in the text."""
    trace = tmp_path / "imported.parquet"
    imported = subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "import",
                               str(DATA / "pt_rewrite.tracefs.txt.gz"), "-o", str(trace)],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    refused = _cli(str(trace))
    assert refused.returncode == 2 and "--assume-version" in refused.stderr
    data = replay_trace(trace, assume_version="6.18").to_json()
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]
    assert data["matched"] > 200
    assert data["by_kind"]["unsync_page"]["matched"] == data["by_kind"]["sync_page"]["matched"] == 1
    assert "map_writable untraced (host page writability of a read fault)" in data["undecidable_reasons"]


def test_non_default_host_parameters_make_their_decisions_undecidable(tmp_path: Path) -> None:
    """This host's kvm has parameters upstream lacks; a value the model does not know never matches."""
    meta = json.loads(pq.read_table(DATA / "touch.parquet").schema.metadata[schema.METADATA_KEY])
    params = {**meta["kvm_params"], "eager_zap_unsync_children": "Y", "parent_ptes_recycle_threshold": "8"}
    data = replay_trace(_with_metadata(tmp_path, "params", kvm_params=params)).to_json()
    for kind in ("prepare_zap", "set_spte"):
        counts = data["by_kind"][kind]
        assert counts["undecidable"] == counts["decisions"] > 0
    assert data["by_kind"]["get_page"]["matched"] > 0  # kinds they cannot change are still judged
    assert data["undecidable_reasons"]["non-default non-upstream kvm parameter"] > 0


LAB_SHADOW = sorted((DATA.parent.parent / "examples" / "lab").glob("*-shadow-*/*.parquet"))


@pytest.mark.parametrize("trace", LAB_SHADOW, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_upstream_svm_shadow_mmu_lab_traces_replay_without_divergence(trace: Path) -> None:
    """The nested lab's kvm_amd npt=0 recordings (Debian 6.1 and 6.12 in L1): the same shadow model,
    only the version switches differ (non-present SPTE 0 on 6.1, RET_PF numbering, make_spte rules)."""
    data = replay_trace(trace).to_json()
    assert data["version_rules"] == trace.parent.name.split("-")[0]
    assert data["decisions"] > 100
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]

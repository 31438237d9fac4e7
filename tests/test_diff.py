"""`mmutrace diff` on real recordings: same scenario and seed are equivalent, other seeds/sizes are not,
and a tampered copy of a real trace differs exactly where it was tampered with (and only there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from mmutrace.cli import app
from mmutrace.diff import FaultCutter
from mmutrace.errors import MmutraceError
from mmutrace.storage import TraceWriter, open_trace

MMUTRACE = str(Path(sys.executable).with_name("mmutrace"))
SPTE_PFN_MASK = ((1 << 52) - 1) & ~0xFFF


def mmutrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MMUTRACE, *args], capture_output=True, text=True, timeout=300)


def record(path: Path, scenario: str, seed: int, size: int, *options: str) -> Path:
    proc = mmutrace("record", "--scenario", scenario, "--seed", str(seed), "--size", str(size), "-o", str(path),
                    *options)
    assert proc.returncode == 0, proc.stderr
    return path


def diff_json(*args: str | Path) -> tuple[int, dict]:
    """``mmutrace diff ARGS --json`` in this process: its exit status and its JSON object."""
    result = CliRunner().invoke(app, ["diff", *map(str, args), "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """touch recorded with the bcc recorder: seed 1 twice, seed 2, and seed 1 at a larger size."""
    d = tmp_path_factory.mktemp("runs")
    return {name: record(d / f"{name}.parquet", "touch", seed, size)
            for name, seed, size in (("s1", 1, 64), ("s1-again", 1, 64), ("s2", 2, 64), ("s1-big", 1, 96))}


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` whose table went through ``change(columns: dict[str, list]) -> None``."""
    reader = open_trace(src)
    table = reader.read()
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    change(cols)
    out = pa.table({name: pa.array(values, table.schema.field(name).type) if name != "event" else values
                    for name, values in cols.items()})
    meta = {k: v for k, v in reader.metadata.items() if k not in ("schema_version", "complete")}
    with TraceWriter(dst, meta) as writer:
        writer.write_batch(out)
    return dst


def rows_of(cols: dict[str, list], event: str, pred=lambda i: True) -> list[int]:
    return [i for i, e in enumerate(cols["event"]) if e == event and pred(i)]


def marker_ts(path: Path, text: str) -> int:
    return next(m["ts_ns"] for m in open_trace(path).metadata["markers"] if m["text"] == text)


@pytest.mark.bcc
def test_same_scenario_and_seed_is_equivalent(runs: dict[str, Path]) -> None:
    code, out = diff_json(runs["s1"], runs["s1-again"])
    walks = open_trace(runs["s1"]).event_counts()["kvm_mmu_pagetable_walk"]
    assert code == 0 and out["equivalent"] is True
    # touch has one vCPU and never retries a walk: every walk is a fault of its own.
    assert out["faults_a"] == out["faults_b"] == out["common"] == walks
    assert (out["only_a"], out["only_b"], out["differing"], out["differences"]) == (0, 0, 0, [])


@pytest.mark.bcc
def test_other_seed_differs_only_in_the_random_phase(runs: dict[str, Path]) -> None:
    code, out = diff_json(runs["s1"], runs["s2"])
    assert code == 1 and out["equivalent"] is False
    assert out["common"] + out["only_a"] == out["faults_a"]
    assert out["common"] + out["only_b"] == out["faults_b"]
    assert out["only_a"] > 0 and out["only_b"] > 0 and len(out["differences"]) == out["n_differences"]
    # The seed only shuffles the 'random' phase; seq_read and seq_write are the same in both runs.
    ts_a = set(open_trace(runs["s1"]).read(columns=["ts_ns"]).column(0).to_pylist())
    ts_b = set(open_trace(runs["s2"]).read(columns=["ts_ns"]).column(0).to_pylist())
    random_a, random_b = marker_ts(runs["s1"], "touch:random"), marker_ts(runs["s2"], "touch:random")
    for d in out["differences"]:
        assert d["ts_a"] is None or (d["ts_a"] in ts_a and d["ts_a"] >= random_a), d
        assert d["ts_b"] is None or (d["ts_b"] in ts_b and d["ts_b"] >= random_b), d


@pytest.mark.bcc
def test_other_size_differs(runs: dict[str, Path]) -> None:
    code, out = diff_json(runs["s1"], runs["s1-big"])
    assert code == 1 and not out["equivalent"]
    # 96 pages: seq_read and seq_write cover 48 pages instead of 32, so B has at least 2*16 more faults.
    assert out["faults_b"] - out["faults_a"] >= 32 and out["only_b"] >= 32


@pytest.mark.bcc
def test_bcc_and_tracefs_recordings_are_equivalent_on_what_both_record(runs: dict[str, Path], tmp_path: Path) -> None:
    """tracefs text lacks the recorder's inputs and the role bits the print format hides: those are
    left out (and said), everything else must match."""
    text = record(tmp_path / "tracefs.parquet", "touch", 1, 64, "--backend", "tracefs")
    code, out = diff_json(runs["s1"], text)
    assert code == 0 and out["equivalent"] and out["faults_a"] == out["faults_b"] > 0
    assert "role words compared under 0x11fff: the bits tracefs text shows" in out["notes"]
    assert any(n.startswith("not compared, recorded on one side only: ") and "kvm_mmu_spte_requested.addr" in n
               for n in out["notes"])


@pytest.mark.bcc
def test_run_to_run_noise_is_ignored_unless_asked(runs: dict[str, Path], tmp_path: Path) -> None:
    """Other host pfns (also inside SPTEs), SP/SPTE addresses, VM id, pids and timing: still equivalent."""
    def noise(cols: dict[str, list]) -> None:
        for name in ("spte", "old_spte", "new_spte"):
            cols[name] = [None if v is None else v ^ (0x1234 << 12) for v in cols[name]]
        for name in ("pfn", "sp", "sptep"):
            cols[name] = [None if v is None else v + 0x1000 for v in cols[name]]
        cols["vm"] = [None if v is None else v ^ 0xFF00 for v in cols["vm"]]
        cols["pid"] = [p + 7 for p in cols["pid"]]
        cols["tid"] = [t + 7 for t in cols["tid"]]
        cols["ts_ns"] = [t + 12345 for t in cols["ts_ns"]]

    noisy = rewrite(runs["s1"], tmp_path / "noisy.parquet", noise)
    code, out = diff_json(runs["s1"], noisy)
    assert code == 0 and out["equivalent"]
    sptes = open_trace(runs["s1"]).event_counts()["kvm_mmu_set_spte"]
    code, out = diff_json(runs["s1"], noisy, "--no-ignore", "spte_pfn")
    assert code == 1 and out["by_kind"] == {"kvm_mmu_set_spte.spte": sptes}
    d = out["differences"][0]
    assert d["a"] ^ d["b"] == 0x1234 << 12 and d["detail"] == "other bits"


@pytest.mark.bcc
def test_flipped_created_is_one_difference_at_that_event(runs: dict[str, Path], tmp_path: Path) -> None:
    row = {}

    def flip(cols: dict[str, list]) -> None:
        row["i"] = rows_of(cols, "kvm_mmu_get_page", lambda i: cols["created"][i])[-1]
        row["ts"] = cols["ts_ns"][row["i"]]
        cols["created"][row["i"]] = False

    code, out = diff_json(runs["s1"], rewrite(runs["s1"], tmp_path / "flip.parquet", flip))
    assert code == 1 and out["differing"] == 1 and out["by_kind"] == {"kvm_mmu_get_page.created": 1}
    (d,) = out["differences"]
    assert (d["ts_a"], d["ts_b"], d["a"], d["b"], d["scope"]) == (row["ts"], row["ts"], True, False, "fault")


@pytest.mark.bcc
def test_cleared_writable_bit_names_the_bit(runs: dict[str, Path], tmp_path: Path) -> None:
    row = {}

    def wrprot(cols: dict[str, list]) -> None:
        row["i"] = rows_of(cols, "kvm_mmu_set_spte", lambda i: cols["spte"][i] & 2)[0]
        cols["spte"][row["i"]] &= ~2

    code, out = diff_json(runs["s1"], rewrite(runs["s1"], tmp_path / "wrprot.parquet", wrprot))
    assert code == 1 and out["by_kind"] == {"kvm_mmu_set_spte.spte": 1}
    (d,) = out["differences"]
    assert d["detail"] == "W 1→0" and d["a"] ^ d["b"] == 2


@pytest.mark.bcc
def test_deleted_zap_is_missing_on_that_side(runs: dict[str, Path], tmp_path: Path) -> None:
    row = {}

    def delete(cols: dict[str, list]) -> None:
        i = rows_of(cols, "kvm_mmu_prepare_zap_page")[0]
        row["ts"] = cols["ts_ns"][i]
        for values in cols.values():
            del values[i]

    code, out = diff_json(runs["s1"], rewrite(runs["s1"], tmp_path / "nozap.parquet", delete))
    assert code == 1 and out["by_kind"] == {"kvm_mmu_prepare_zap_page.only_a": 1}
    assert (out["differences"][0]["ts_a"], out["differences"][0]["ts_b"]) == (row["ts"], None)


@pytest.mark.bcc
def test_swapped_zap_order_is_seen(runs: dict[str, Path], tmp_path: Path) -> None:
    def swap(cols: dict[str, list]) -> None:
        i, j = rows_of(cols, "kvm_mmu_prepare_zap_page")[:2]
        for name in ("gfn", "role", "root_count", "unsync", "mmu_valid_gen"):
            cols[name][i], cols[name][j] = cols[name][j], cols[name][i]

    code, out = diff_json(runs["s1"], rewrite(runs["s1"], tmp_path / "swap.parquet", swap))
    assert code == 1 and set(out["by_kind"]) <= {"kvm_mmu_prepare_zap_page.gfn", "kvm_mmu_prepare_zap_page.role",
                                                 "kvm_mmu_prepare_zap_page.only_a", "kvm_mmu_prepare_zap_page.only_b"}


@pytest.mark.bcc
def test_human_output_and_exit_status(runs: dict[str, Path]) -> None:
    same = mmutrace("diff", str(runs["s1"]), str(runs["s1-again"]))
    other = CliRunner().invoke(app, ["diff", str(runs["s1"]), str(runs["s2"]), "--show", "1"])
    assert same.returncode == 0 and "equivalent" in same.stdout
    assert other.exit_code == 1 and "#0 " in other.stdout and "#1 " not in other.stdout and "more" in other.stdout


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_trace_against_its_replay_differs_only_by_what_replay_could_not_decide() -> None:
    """The model makes every decidable decision the kernel made: the only decisions the trace may have
    and the replay lack are the undecidable ones (adopted from the kernel, not the model's own)."""
    for trace in (EXAMPLES / "mmu_pages_limit.parquet", EXAMPLES / "pt_rewrite.parquet"):
        code, out = diff_json(trace, "--model", "kernel")
        replay = json.loads(CliRunner().invoke(app, ["replay", str(trace), "--json"]).stdout)
        assert replay["mismatched"] == replay["missing"] == replay["extra"] == 0
        assert out["faults_a"] == out["faults_b"] == out["common"] > 0 and out["differing"] == 0
        assert all(kind.endswith(".only_a") for kind in out["by_kind"])
        assert sum(out["by_kind"].values()) <= replay["undecidable"] and code == int(bool(out["by_kind"]))


def test_split_pre_and_rfc_agree_on_a_shadow_mmu_trace() -> None:
    """On the shadow MMU both dispatchers reclaim on every fault: the two replays are equivalent."""
    code, out = diff_json(EXAMPLES / "mmu_pages_limit.parquet", "--model", "pre", "--model", "rfc")
    assert code == 0 and out["equivalent"] and out["faults_a"] == out["faults_b"] > 0
    assert out["outside_faults"]["a"] == out["outside_faults"]["b"] > 0


def test_fault_cutter_tells_a_walk_retry_from_a_refault() -> None:
    """Same (address, access) again: a retry before the mapping step, a new fault after it."""
    cut = FaultCutter("kvm_mmu_pagetable_walk")
    walk = ("kvm_mmu_pagetable_walk", 0x1000, 4)
    steps = [(walk, True), (walk, False),                       # walker retry after an A/D update
             (("kvm_mmu_spte_requested", None, None), False), (walk, True),   # refault after mapping
             (("kvm_mmu_pagetable_walk", 0x2000, 4), True),    # another address
             (("kvm_pio", None, None), False), (("kvm_mmu_pagetable_walk", 0x2000, 4), True)]  # after an exit
    assert [cut.feed("lane", *event) for event, _ in steps] == [opens for _, opens in steps]
    assert cut.is_open("lane") and not cut.is_open("other lane")


def test_json_list_can_be_capped_with_exact_counts() -> None:
    a, b = EXAMPLES / "touch-seed1.parquet", EXAMPLES / "touch-seed2.parquet"
    _, full = diff_json(a, b)
    code, capped = diff_json(a, b, "--max-differences", "3")
    assert code == 1 and capped["differences"] == full["differences"][:3]
    assert {k: v for k, v in capped.items() if k != "differences"} == {k: v for k, v in full.items() if k != "differences"}
    assert full["n_differences"] == len(full["differences"]) == sum(full["by_kind"].values())
    assert full["only_a"] == full["by_kind"]["fault.only_a"] and full["only_b"] == full["by_kind"]["fault.only_b"]


def test_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    not_a_trace = tmp_path / "x.parquet"
    not_a_trace.write_text("not parquet")
    for args in (("diff", str(tmp_path / "missing.parquet"), str(not_a_trace)),
                 ("diff", str(not_a_trace), "--ignore", "no_such_field", str(not_a_trace))):
        proc = mmutrace(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mmutrace: "), proc.stderr
    for args, message in (((str(not_a_trace), str(not_a_trace)), "not a Parquet file"),
                          ((str(not_a_trace),), "give a second trace, --model once"),
                          ((str(not_a_trace), str(not_a_trace), "--model", "rfc"), "not both"),
                          ((str(not_a_trace), "--model", "post"), "--model must be one of")):
        result = CliRunner().invoke(app, ["diff", *args])
        assert isinstance(result.exception, MmutraceError) and result.exception.exit_code == 2, result.output
        assert message in str(result.exception)

"""tracefs: format files, the event list, and a real Capture of a real KVM guest."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
import pytest

from mmutrace import tracefs
from mmutrace.errors import UsageError
from mmutrace.schema import ARROW_SCHEMA, EVENTS_BY_NAME

FORMAT_TEXT = """name: kvm_userspace_exit
ID: 88
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:__u32 reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;
\tfield:u64 * sptep;\toffset:16;\tsize:8;\tsigned:0;

print fmt: "reason %s (%d)", REC->errno < 0 ? "x" : __print_symbolic(REC->reason, { 0, "KVM_EXIT_" "UNKNOWN" }, \
{ 0x040 + 14, "PF excp" }, { -1, "invalid_guest_state" }), REC->reason
"""


def test_parse_format_fields_and_symbols() -> None:
    fmt = tracefs.parse_format(FORMAT_TEXT)
    assert (fmt.name, fmt.id) == ("kvm_userspace_exit", 88)
    assert fmt.field("errno") == tracefs.FormatField("errno", "int", 12, 4, True)
    assert fmt.field("sptep") == tracefs.FormatField("sptep", "u64 *", 16, 8, False)
    assert fmt.symbols() == {"KVM_EXIT_UNKNOWN": 0, "PF excp": 0x4E, "invalid_guest_state": -1}


def test_parse_format_rejects_other_text() -> None:
    with pytest.raises(UsageError):
        tracefs.parse_format("hello\n")


@pytest.mark.kvm
def test_live_formats_have_the_catalogue_fields() -> None:
    """Every catalogue field name of every kvm/kvmmmu event present here is a field of its format."""
    present = tracefs.available_events()
    for group, event in tracefs.schema_events():
        if event not in present[group]:
            continue
        fmt = tracefs.read_format(group, event)
        names = {f.name for f in fmt.fields}
        missing = {name for name, _ in EVENTS_BY_NAME[event].tracefs} - names
        assert not missing, f"{group}:{event} lacks {missing}"


@pytest.mark.kvm
def test_capture_of_touch_scenario(tmp_path: Path) -> None:
    from mmutrace.markers import Markers
    from mmutrace.scenarios import run_scenario

    text = tmp_path / "touch.trace"
    with tracefs.Capture(tgid=os.getpid(), text_path=text) as cap:
        result = run_scenario("touch", seed=0, markers=Markers(sinks=[cap.marker_path]))
        instance = cap.instance
        assert instance.is_dir()
        assert (instance / "trace_clock").read_text().split("[")[1].startswith(tracefs.TRACE_CLOCK)
    assert not instance.exists(), "the instance must be removed on exit"
    table = cap.table()
    assert table.schema.equals(ARROW_SCHEMA)
    assert table.num_rows > 0 and text.stat().st_size > 0
    # only this process's rows, sorted
    assert pc.all(pc.equal(table["pid"], os.getpid())).as_py()
    keys = list(zip(table["ts_ns"].to_pylist(), table["cpu"].to_pylist(), table["seq"].to_pylist()))
    assert keys == sorted(keys)
    # the phase markers are returned in order, with the scenario's texts, and are not event rows
    assert [t for _, t in cap.markers()] == [t for _, t in result.markers]
    assert "tracing_mark_write" not in set(table["event"].to_pylist())
    for (ts_cap, _), (ts_py, _) in zip(cap.markers(), result.markers):
        # same clock: the tracefs copy is stamped just after, at µs resolution (text truncates ns)
        assert -1000 < ts_cap - ts_py < 500_000_000
    # every touched page faulted through the shadow MMU: one set_spte per 4K page at least
    counts = {e: n for e, n in zip(*[c.to_pylist() for c in table.group_by("event").aggregate(
        [("ts_ns", "count")]).select(["event", "ts_ns_count"]).columns])}
    assert counts["kvm_mmu_set_spte"] >= result.pages_touched
    assert counts["kvm_mmu_get_page"] > 0
    assert cap.lost == 0
    assert cap.parsed().stats.unparsed_total == 0


@pytest.mark.kvm
def test_capture_removes_instance_on_error() -> None:
    with pytest.raises(RuntimeError):
        with tracefs.Capture(tgid=os.getpid()) as cap:
            raise RuntimeError("boom")
    assert not cap.instance.exists()
    cap.cleanup()


@pytest.mark.kvm
def test_capture_rejects_unknown_event() -> None:
    with pytest.raises(UsageError, match="kvm_nonsense"):
        with tracefs.Capture(events=("kvm_nonsense",)):
            pass


@pytest.mark.kvm
def test_capture_reports_every_lost_event() -> None:
    """A 4 KiB ring buffer overflows during `touch`; rows + reported loss equal what a large
    buffer sees (kvmmmu events of a seeded scenario are deterministic), so no loss is hidden."""
    from mmutrace.markers import Markers
    from mmutrace.scenarios import run_scenario

    counts = []
    for buffer_kb in (tracefs.DEFAULT_BUFFER_KB, 4):
        with tracefs.Capture(groups=("kvmmmu",), tgid=os.getpid(), buffer_kb=buffer_kb) as cap:
            run_scenario("touch", seed=0, markers=Markers(sinks=[]))
        counts.append((cap.table().num_rows, cap.lost, cap.kernel_lost, cap.parsed().lost_by_cpu))
        cap.cleanup()
    (full_rows, full_lost, _, _), (rows, lost, kernel_lost, text_lost) = counts
    assert full_lost == 0 and lost > 0
    assert rows + lost == full_rows
    assert sum(kernel_lost.values()) == lost and text_lost == {c: n for c, n in kernel_lost.items() if n}

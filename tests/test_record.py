"""`mmutrace record` end to end on real KVM: each built-in scenario recorded by the bcc recorder while
an independent tracefs capture of the same run is taken, then compared event by event; metadata;
interrupted and killed recordings; bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmutrace import ftrace_text, hostinfo, schema, spool, storage, tracefs
from mmutrace.errors import HostError
from probes import btf
from mmutrace.record import Backend, RecordOptions, RecordResult, ScenarioSpec, is_kvm_process, record
from mmutrace.scenarios import SCENARIOS
from replay.engine import replay_trace
from test_probes import frame

MMUTRACE = [str(Path(sys.executable).parent / "mmutrace")]


@dataclass
class Recorded:
    """One recording: the bcc trace, and the tracefs text of the same run parsed by the importer."""

    result: RecordResult
    bcc: pd.DataFrame
    tracefs: pd.DataFrame
    tracefs_lost: int
    metadata: dict


def _record_with_tracefs(out: Path, opts: RecordOptions, pids: Callable[[RecordResult], list[int]]) -> Recorded:
    """Record ``opts`` with bcc while a tracefs capture takes the same run.

    The text's rows of ``pids`` are kept, including those whose tgid the text prints as
    ``(-------)``: tracefs learns a task's tgid only when the task is scheduled, so a freshly
    cloned vCPU thread's first events carry none (seen: the first eight ``kvm_unmap_hva_range`` of
    multi_vcpu's vCPU threads on a busy machine; the parser then falls back to the tid).  Such a
    row belongs to a process when its tid shows up with that process's tgid elsewhere in the text.
    """
    with tracefs.Capture() as capture:
        result = record(opts)
    keep = pids(result)
    text = frame(ftrace_text.parse_file(capture.text_path).table)
    tids = set(text.tid[text.pid.isin(keep)])
    no_tgid = (text.pid == text.tid) & text.tid.isin(tids) & ~text.pid.isin(keep)
    owner = {tid: pid for tid, pid in zip(text.tid, text.pid) if pid in keep}
    text.loc[no_tgid, "pid"] = text.tid[no_tgid].map(owner)
    parsed = text[text.pid.isin(keep)].reset_index(drop=True)
    lost = capture.lost
    capture.cleanup()
    return Recorded(result, frame(pq.read_table(opts.output)), parsed, lost,
                    storage.open_trace(opts.output).metadata)


@pytest.fixture(scope="module")
def every_scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorded, dict[str, int]]:
    """One recording of a shell running every built-in scenario in turn; scenario name -> its pid."""
    out = tmp_path_factory.mktemp("record")
    reports = {name: out / f"{name}.json" for name in sorted(SCENARIOS)}
    script = "; ".join(f"{sys.executable} -m mmutrace.scenarios run {name} --seed 1 --json > {path}"
                       for name, path in reports.items())

    def pids(_: RecordResult) -> list[int]:
        return [json.loads(path.read_text())["pid"] for path in reports.values()]

    run = _record_with_tracefs(out, RecordOptions(output=out / "all.parquet", command=["sh", "-c", script]), pids)
    return run, dict(zip(reports, pids(run.result)))


@pytest.fixture(scope="module")
def touch(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """``--scenario touch`` (the scenario's own metadata and markers)."""
    out = tmp_path_factory.mktemp("touch") / "touch.parquet"
    return _record_with_tracefs(out, RecordOptions(output=out, scenario=ScenarioSpec("touch", seed=1)),
                                lambda result: [result.scenario["pid"]])


def _printed_fields(df: pd.DataFrame, kind: schema.EventKind) -> pd.DataFrame:
    """One event kind's rows as the text shows them: thread and printed fields, in a canonical order.

    Rows are compared as a multiset per thread, not by time: tracefs text keeps microseconds, so a
    thread that changes CPU within one microsecond has no recoverable order in it.
    """
    columns = ["tid", *dict.fromkeys(column for _, column in kind.tracefs)]
    rows = df.loc[df.event == kind.name, columns].copy()
    if "role" in rows:  # the text prints only some role bits
        rows["role"] = rows["role"] & ftrace_text.ROLE_KNOWN_MASK
    return rows.sort_values(columns, ignore_index=True)


@pytest.mark.bcc
def test_every_scenario_ran_and_nothing_was_lost(every_scenario) -> None:
    run, pids = every_scenario
    assert run.result.child_status == 0 and run.result.stop_reason == "command exited"
    assert run.result.lost == 0 and run.tracefs_lost == 0
    faults = run.bcc[run.bcc.event == "kvm_mmu_spte_requested"]
    assert set(pids.values()) <= set(faults.pid)


@pytest.mark.bcc
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bcc_equals_tracefs_of_the_same_run(every_scenario, name: str) -> None:
    run, pids = every_scenario
    bcc, text = run.bcc[run.bcc.pid == pids[name]], run.tracefs[run.tracefs.pid == pids[name]]
    assert len(text) > 0
    for kind in schema.EVENTS:
        if kind.group == "ioctl":
            continue
        ours, theirs = _printed_fields(bcc, kind), _printed_fields(text, kind)
        assert len(ours) == len(theirs), f"{kind.name}: bcc {len(ours)} rows, tracefs {len(theirs)}"
        pd.testing.assert_frame_equal(ours, theirs, check_dtype=False, obj=f"{name}: {kind.name}")


@pytest.mark.bcc
def test_hit_counts_equal_recorded_events(touch: Recorded) -> None:
    run = touch
    counts = run.bcc.event.value_counts()
    assert {e: n for e, n in run.result.hits.items() if n} == counts.to_dict()
    assert run.metadata["event_hits"] == run.result.hits


@pytest.mark.bcc
def test_metadata_is_filled(touch: Recorded) -> None:
    run = touch
    meta = run.metadata
    assert meta["recorder"] == "bcc" and meta["origin"] == "host" and meta["complete"] is True
    assert set(meta) <= set(schema.METADATA_KEYS)
    assert meta["kernel_release"] == os.uname().release
    host = hostinfo.host_metadata()
    assert {k: meta[k] for k in ("kvm_backend", "kvm_params", "vendor_params", "tdp_mmu")} == \
        {k: host[k] for k in ("kvm_backend", "kvm_params", "vendor_params", "tdp_mmu")}
    assert "raw_tracepoint:kvm_mmu_spte_requested" in meta["probes"]
    assert "tracepoint:syscalls:sys_enter_ioctl" in meta["probes"]
    assert meta["event_inputs"]["kvm_mmu_spte_requested"] == list(schema.event_kind("kvm_mmu_spte_requested").inputs)
    assert meta["lost_total"] == 0 and set(meta["lost"]) == {str(c) for c in range(os.cpu_count())}
    assert meta["scenario"]["name"] == "touch" and meta["scenario"]["seed"] == 1
    assert meta["scenario"]["size"] == SCENARIOS["touch"].default_size
    texts = [m["text"] for m in meta["markers"]]
    assert texts[0] == "touch:start" and texts[-1] == "touch:end" and "touch:seq_write" in texts
    assert meta["start_ns"] < run.bcc.ts_ns.min() <= run.bcc.ts_ns.max() < meta["stop_ns"]
    # markers and events share CLOCK_MONOTONIC: every fault lies between start and end markers
    ts = {m["text"]: m["ts_ns"] for m in meta["markers"]}
    faults = run.bcc[run.bcc.event == "kvm_mmu_spte_requested"]
    assert (faults.ts_ns > ts["touch:start"]).all() and (faults.ts_ns < ts["touch:end"]).all()


@pytest.mark.bcc
def test_rows_are_ordered_and_attributed(every_scenario) -> None:
    run, pids = every_scenario
    table = pq.read_table(run.result.path, columns=["ts_ns", "cpu", "seq"])
    keys = np.stack([table.column(c).to_numpy().astype(np.uint64) for c in ("ts_ns", "cpu", "seq")], axis=1)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    assert (order == np.arange(len(keys))).all()
    multi = run.bcc[run.bcc.pid == pids["multi_vcpu"]]
    faults = multi[multi.event == "kvm_mmu_spte_requested"]
    assert sorted(faults.vcpu.unique()) == [0, 1]
    assert faults.vm.nunique() == 1
    # one vCPU per thread
    assert (faults.groupby("tid").vcpu.nunique() == 1).all()


@pytest.mark.bcc
def test_dirty_log_inputs_are_what_the_scenario_passed(tmp_path: Path) -> None:
    """KVM_ENABLE_CAP and each KVM_CLEAR_DIRTY_LOG with its mask, exactly as the scenario issued
    them: the mask's words come right before their ioctl, on its thread."""
    out = tmp_path / "dirty_log.parquet"
    result = record(RecordOptions(output=out, scenario=ScenarioSpec("dirty_log", seed=1, size=300)))
    details = storage.open_trace(out).metadata["scenario"]["details"]
    rows = frame(pq.read_table(out))
    rows = rows[rows.pid == result.scenario["pid"]]
    vm = rows[rows.event == "ioctl_get_dirty_log"].vm.unique()
    cap = rows[rows.event == "ioctl_enable_cap"]
    assert cap[["cap", "value"]].values.tolist() == [details["enable_cap"]] == [[168, 1]]
    assert cap.vm.tolist() == list(vm)
    # 300 pages: two calls per round, [0, 128) then [128, 300) (its last word is partly past the slot)
    clears = details["clears"]
    assert [(c["first_page"], c["num_pages"]) for c in clears] == [(0, 128), (128, 172)] * 3
    ioctls = rows[rows.event.isin(["ioctl_dirty_bitmap", "ioctl_clear_dirty_log"])]
    got, words = [], []
    for row in ioctls.itertuples():
        if row.event == "ioctl_dirty_bitmap":
            assert (row.slot_id, row.tid, row.vm) == (1, result.scenario["pid"], vm[0])
            words.append((int(row.addr), int(row.value)))
            continue
        assert [page for page, _ in words] == list(range(row.addr, row.addr + row.count, 64))
        got.append({"slot": row.slot_id, "first_page": row.addr, "num_pages": row.count, "words": row.size,
                    "bitmap": [word for _, word in words]})
        words = []
    want = [{k: v for k, v in c.items() if k != "phase"} | {"words": len(c["bitmap"])} for c in clears]
    assert got == want
    assert [len(c["bitmap"]) for c in clears] == [2, 3] * 3 and all(any(c["bitmap"]) for c in clears)


@pytest.mark.kvm
def test_tracefs_backend_writes_the_same_events(touch: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "tracefs.parquet"
    result = record(RecordOptions(output=out, scenario=ScenarioSpec("touch", seed=1), backend=Backend.TRACEFS))
    trace = storage.open_trace(out)
    assert trace.metadata["recorder"] == "tracefs" and result.lost == 0
    assert all(inputs == [] for inputs in trace.metadata["event_inputs"].values())
    assert [m["text"] for m in trace.metadata["markers"]] == [m["text"] for m in touch.metadata["markers"]]
    # same scenario, same seed: the same kvm/kvmmmu events as the bcc recording
    bcc_counts = {e: n for e, n in storage.open_trace(touch.result.path).event_counts().items()
                  if not e.startswith("ioctl_")}
    assert trace.event_counts() == bcc_counts
    # The text lacks fault->map_writable; the host's zero pfn in the metadata decides read faults.
    assert trace.metadata["zero_pfn"] == hostinfo.zero_pfn() is not None
    verdict = replay_trace(out).to_json()
    assert (verdict["mismatched"], verdict["missing"], verdict["extra"]) == (0, 0, 0)
    assert "map_writable untraced (host page writability of a read fault)" not in verdict["undecidable_reasons"]


@pytest.mark.bcc
def test_pid_duration_and_event_selection(tmp_path: Path) -> None:
    """-p on a running VMM, for --duration, only the --events asked for."""
    vmm = subprocess.Popen([sys.executable, "-m", "mmutrace.scenarios", "run", "touch", "--size", "300000"],
                           stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: is_kvm_process(vmm.pid))
        chosen = ["kvm_mmu_spte_requested", "kvm_mmu_set_spte"]
        out = tmp_path / "pid.parquet"
        result = record(RecordOptions(output=out, pid=vmm.pid, duration=1.0, events=chosen))
    finally:
        os.killpg(vmm.pid, signal.SIGKILL)
        vmm.wait()
    trace = storage.open_trace(out)
    assert result.stop_reason == "duration" and trace.metadata["pid"] == vmm.pid
    assert set(trace.event_counts()) == set(chosen)
    assert set(trace.metadata["event_inputs"]) == set(chosen)
    raw = {p for p in trace.metadata["probes"] if p.startswith("raw_tracepoint:")}
    # kvm_mmu_get_page's probe learns the direct-map base that set_spte's sptep needs
    assert raw == {f"raw_tracepoint:{e}" for e in ["kvm_entry", "kvm_mmu_get_page", *chosen]}
    assert (pq.read_table(out, columns=["pid"]).column("pid").to_numpy() == vmm.pid).all()


# --------------------------------------------------------------------------------------------
# The CLI: stopping, crashing, killing, bad input
# --------------------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


#: A command that keeps a guest faulting until it is stopped: small touch runs, one after another.
GUEST_LOOP = ["--", "sh", "-c",
              f"while :; do {sys.executable} -m mmutrace.scenarios run touch --size 4096 --seed 0 >/dev/null; done"]


def _start(out: Path) -> subprocess.Popen:
    """``mmutrace record`` of GUEST_LOOP, once it has flushed its first segment.  Its output goes to
    files: a pipe would stay open in the traced command when the recorder is killed."""
    log = out.with_suffix(".log").open("w")
    proc = subprocess.Popen(MMUTRACE + ["record", "-o", str(out), *GUEST_LOOP], stdout=log, stderr=log, text=True)
    _wait_for(lambda: any(storage.partial_dir(out).glob("seg-*.parquet")))
    return proc


@pytest.mark.bcc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_a_complete_file(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "stopped.parquet"
    proc = _start(out)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0, out.with_suffix(".log").read_text()
    trace = storage.open_trace(out)
    assert trace.metadata["complete"] is True and trace.metadata["stop_reason"] == "interrupted"
    assert trace.num_rows > 0 and not storage.partial_dir(out).exists()
    assert trace.event_counts()["kvm_mmu_spte_requested"] > 0


@pytest.mark.bcc
def test_killed_recording_is_repaired_up_to_its_last_flush(tmp_path: Path) -> None:
    out = tmp_path / "killed.parquet"
    proc = _start(out)
    # The recorder's children are the spool converter and the traced command (its own session).
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    command = next(c for c in children if Path(f"/proc/{c}/cmdline").read_bytes().startswith(b"sh\0"))
    proc.kill()
    proc.wait()
    os.killpg(command, signal.SIGKILL)  # the traced command outlives its recorder: end it
    partial = storage.partial_dir(out)
    # What reached disk: the converter's segments and the raw chunks it had not converted yet
    # (whole records only: the chunk being written may end mid-record), each row once.
    flushed = {(c, s) for p in partial.glob("seg-*.parquet")
               for c, s in zip(*pq.read_table(p, columns=["cpu", "seq"]).to_pydict().values())}
    for chunk in partial.glob("spool-*.bin"):
        records = spool.chunk_records(chunk)
        flushed |= set(zip(records["cpu"].tolist(), records["seq"].tolist()))
    repaired = spool.repair(out)
    trace = storage.open_trace(repaired)
    assert trace.metadata["complete"] is False and trace.metadata["stop_reason"] == "killed"
    assert trace.num_rows == len(flushed) > 0
    keys = trace.read(columns=["cpu", "seq"]).to_pydict()
    assert set(zip(keys["cpu"], keys["seq"])) == flushed


@pytest.mark.bcc
def test_crashing_command_still_finalizes(tmp_path: Path) -> None:
    out = tmp_path / "crash.parquet"
    script = f"{sys.executable} -m mmutrace.scenarios run touch --size 64 --seed 0 >/dev/null; exit 3"
    proc = subprocess.run(MMUTRACE + ["record", "-o", str(out), "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "exited with status 3" in proc.stderr
    trace = storage.open_trace(out)
    assert trace.metadata["complete"] is True and trace.metadata["child_status"] == 3
    rows = frame(pq.read_table(out))
    # the guest ran in a child of the traced shell: followed through fork
    assert (rows.event == "kvm_mmu_spte_requested").sum() >= 64
    assert trace.metadata["command"] == ["sh", "-c", script]


def _cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run ``mmutrace ARGS`` in this process: exit status and stderr."""
    from mmutrace.cli import main

    monkeypatch.setattr(sys, "argv", ["mmutrace", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.kvm
@pytest.mark.parametrize("args, message", [
    (["--events", "kvm_mmu_get_pag"], "did you mean kvm_mmu_get_page"),
    (["-p", "1"], "process 1 is not a KVM process"),
    (["-p", "999999999"], "no process with pid 999999999"),
    (["--scenario", "no_such"], "unknown scenario 'no_such'"),
    (["--backend", "perf"], "--backend must be bcc or tracefs"),
    (["--scenario", "touch", "--duration", "-1"], "--duration must be positive"),
    (["--scenario", "touch", "-p", "1"], "at most one target"),
    (["--seed", "3"], "--seed and --size go with --scenario"),
    (["--", "no-such-command-xyz"], "command not found: no-such-command-xyz"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path: Path, capsys, monkeypatch, args: list[str], message: str) -> None:
    code, err = _cli(["record", "-o", str(tmp_path / "bad.parquet"), *args], capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_ebpf_prints_the_program_with_this_kernels_offsets(capsys, monkeypatch) -> None:
    from mmutrace.cli import main

    monkeypatch.setattr(sys, "argv", ["mmutrace", "record", "--ebpf", "--events", "kvm_mmu_spte_requested", "-p", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    offset = btf.vmlinux().member("kvm_page_fault.gfn").offset
    assert f"#define OFF_kvm_page_fault__gfn {offset}\n" in out and "#define FILTER 1\n" in out
    assert "RAW_TRACEPOINT_PROBE(kvm_mmu_spte_requested)" in out


def _no_bcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc raises ImportError


def _no_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "bcc_kernel_source", lambda release=None: None)


def _no_tracefs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> Path:
        raise HostError("tracefs is not mounted at /sys/kernel/tracing and mounting it needs root")

    monkeypatch.setattr(tracefs, "ensure_mounted", refuse)


@pytest.mark.kvm
@pytest.mark.parametrize("lack, message", [
    (_no_bcc, "bcc is not importable"),
    (_no_headers, "no kernel headers for bcc"),
    (_no_tracefs, "tracefs is not mounted"),
])
def test_missing_host_feature_is_one_line_and_no_file(tmp_path: Path, capsys, monkeypatch, lack, message) -> None:
    """What this host has cannot be removed for a test; the detection is replaced instead."""
    lack(monkeypatch)
    code, err = _cli(["record", "--scenario", "touch", "-o", str(tmp_path / "t.parquet")], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.kvm
def test_unwritable_or_existing_output_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    existing = tmp_path / "exists.parquet"
    existing.write_bytes(b"x")
    for out, message in ((existing, "exists (use --force"), (tmp_path / "no" / "dir.parquet", "does not exist")):
        code, err = _cli(["record", "--scenario", "touch", "-o", str(out)], capsys, monkeypatch)
        assert code == 2 and message in err, err
    assert existing.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.parquet"]


@pytest.mark.kvm
def test_not_root_is_refused(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *MMUTRACE, "record",
                           "--scenario", "touch", "-o", str(tmp_path / "t.parquet")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "recording needs root" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []

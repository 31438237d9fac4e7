"""A fresh recording on this host replays with no divergence (needs real KVM and tracefs; bcc)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmutrace.record import RecordOptions, ScenarioSpec, record
from replay.engine import replay_trace
from test_replay import _prefetched_set_sptes

_SPEC = importlib.util.spec_from_file_location("capture_traces", Path(__file__).parent / "data" / "capture_traces.py")


@pytest.mark.kvm
@pytest.mark.parametrize(("scenario", "size"), [("touch", 512), ("pt_rewrite", 64), ("mmu_pages_limit", 256)])
def test_fresh_tracefs_capture_replays_clean(tmp_path: Path, scenario: str, size: int) -> None:
    capture = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(capture)
    trace = capture.capture(scenario, size, tmp_path)
    data = replay_trace(trace).to_json()
    assert data["decisions"] > 100
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]


@pytest.mark.bcc
def test_fresh_bcc_memslot_churn_decides_its_prefetches(tmp_path: Path) -> None:
    """After each fast zap the guest re-reads pages whose gptes have A set, so the kernel prefetches
    their neighbours (13% of the decisions); the recorder's inputs decide them all."""
    out = tmp_path / "memslot_churn.parquet"
    result = record(RecordOptions(output=out, scenario=ScenarioSpec("memslot_churn", seed=2)))
    assert result.lost == 0
    data = replay_trace(out).to_json()
    assert (data["mismatched"], data["missing"], data["extra"]) == (0, 0, 0), data["divergences"][:3]
    assert data["undecidable"] < 0.01 * data["decisions"], data["undecidable_reasons"]
    assert len(_prefetched_set_sptes(pq.read_table(out))) > 0.1 * data["decisions"]
    assert data["by_kind"]["set_spte"]["matched"] == data["by_kind"]["set_spte"]["decisions"]

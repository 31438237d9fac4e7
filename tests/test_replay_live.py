"""A fresh recording on this host replays with no divergence (needs real KVM and tracefs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from replay.engine import replay_trace

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

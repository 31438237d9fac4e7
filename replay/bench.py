"""`mmutrace bench replay`: replay speed against just reading the same Parquet file, and peak memory.

Each measurement runs in its own interpreter (so peak RSS is that job's alone) on one core: just
reading the columns replay reads, row group by row group (Arrow); reading them and converting every
value to Python (the floor of a per-event Python replay); the replay itself (no model event stream
kept, so memory is the model's state plus one row group), with its bulk path; and the same replay
per event (``--no-bulk``), the baseline the bulk path is measured against (same verdicts).  Times
are wall and CPU (user+sys of the child); on a shared machine CPU time is the fair figure.

    mmutrace record --scenario touch --size 350000 -o big.parquet    # ~5.3M events (bcc recorder)
    mmutrace bench replay big.parquet
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmutrace.errors import UsageError

MIN_EVENTS = 5_000_000
#: The measuring children, in the order they run: read-only floors, the replay, its per-event baseline.
JOBS = ("arrow", "read", "replay", "per_event")


@dataclass
class JobFigures:
    """One child's measurement."""

    events: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    verdicts: dict[str, Any]

    @property
    def events_per_cpu_s(self) -> float:
        return self.events / self.cpu_s if self.cpu_s else float("inf")


def _arrow_job(path: str) -> tuple[int, dict[str, Any]]:
    """Just read the file: every row group of the columns replay uses, as Arrow data."""
    from replay.engine import open_for_replay

    _, batches = open_for_replay(path)
    return sum(batch.num_rows for batch in batches()), {}


def _read_job(path: str) -> tuple[int, dict[str, Any]]:
    """Read and convert to Python values every column replay reads (its own floor), nothing else,
    the way replay converts them."""
    from replay.engine import _to_pylist, open_for_replay

    _, batches = open_for_replay(path)
    events = 0
    for batch in batches():
        for column in batch.columns:
            _to_pylist(column)
        events += batch.num_rows
    return events, {}


def _replay(path: str, bulk: bool) -> tuple[int, dict[str, Any]]:
    from replay.engine import replay_trace

    result = replay_trace(path, keep_model_events=False, max_divergences=10, bulk=bulk)
    data = result.to_json()
    verdicts = {k: data[k] for k in ("decisions", "matched", "mismatched", "missing", "extra", "undecidable")}
    return data["events"], {**verdicts, "bulk_events": result.bulk_events}


def _replay_job(path: str) -> tuple[int, dict[str, Any]]:
    """The replay as ``mmutrace replay`` runs it: steady-state runs in bulk (replay/bulk.py)."""
    return _replay(path, bulk=True)


def _per_event_job(path: str) -> tuple[int, dict[str, Any]]:
    """The baseline: every event through the per-event path (``mmutrace replay --no-bulk``)."""
    return _replay(path, bulk=False)


def _child(job: str, path: str, repeat: int = 1) -> None:
    """Entry point of a measuring child: prints its figures as one JSON line.

    ``repeat`` runs the job that many times over the file (each replay with a fresh model) so that a
    small trace, such as a nested-lab TDP recording, still takes long enough to time."""
    run = {"arrow": _arrow_job, "read": _read_job, "replay": _replay_job, "per_event": _per_event_job}[job]
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    import replay.engine  # noqa: F401  (imported before the clock starts: on a small lab trace it would dominate)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        events, verdicts = run(path)
    events *= repeat
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = JobFigures(events, round(wall, 3), round(cpu, 3), round(peak_kb / 1024, 1), verdicts)
    print(json.dumps(asdict(figures)))


def _measure(job: str, path: Path, repeat: int) -> JobFigures:
    code = f"from replay.bench import _child; _child({job!r}, {str(path)!r}, {repeat})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"bench {job} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return JobFigures(**json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_replay(path: Path, min_events: int = MIN_EVENTS, repeat: int = 1) -> dict[str, Any]:
    """Read-only and replay figures for ``path`` (each job over it ``repeat`` times) and their ratio
    (replay speed / read speed)."""
    from mmutrace.storage import open_trace

    events = open_trace(path).num_rows
    if events < min_events:
        raise UsageError(f"{path} has {events:,} events; the benchmark needs at least {min_events:,} "
                         f"(mmutrace record --scenario touch --size 350000 -o big.parquet)")
    if repeat < 1:
        raise UsageError(f"--repeat must be at least 1, not {repeat}")
    jobs = {job: _measure(job, path, repeat) for job in JOBS}
    replay = jobs["replay"]
    return {
        "trace": str(path), "events": events, "repeat": repeat,
        **{job: {**asdict(f), "events_per_cpu_s": round(f.events_per_cpu_s)} for job, f in jobs.items()},
        "replay_vs_arrow_read": round(replay.events_per_cpu_s / jobs["arrow"].events_per_cpu_s, 4),
        "replay_vs_python_read": round(replay.events_per_cpu_s / jobs["read"].events_per_cpu_s, 4),
        "replay_vs_per_event": round(replay.events_per_cpu_s / jobs["per_event"].events_per_cpu_s, 2),
        "bulk_share": round(replay.verdicts["bulk_events"] / replay.events, 4),
        "same_verdicts": {k: v for k, v in replay.verdicts.items() if k != "bulk_events"}
        == {k: v for k, v in jobs["per_event"].verdicts.items() if k != "bulk_events"},
    }

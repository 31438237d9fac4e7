"""`mmutrace report` on the real recordings in examples/: its numbers are info's and diff's, trace strings
are escaped, what was downsampled is said, and bad input is one line with a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mmutrace import report as report_module
from mmutrace.cli import app
from mmutrace.errors import MmutraceError
from mmutrace.storage import TraceWriter, open_trace

MMUTRACE = str(Path(sys.executable).with_name("mmutrace"))
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.parquet"))
#: TDP traces of 6.1 kernels from the nested lab (faults opened by kvm_page_fault; 6.1 role layout)
LAB = sorted((Path(__file__).resolve().parent.parent / "examples" / "lab").glob("*/*.parquet"))
HOSTILE = "<script>document.body.setAttribute('data-pwned','1')</script>"


def page_data(html: str) -> dict:
    """The numbers the page shows, from its #mmutrace-data block."""
    return json.loads(re.search(r'<script type="application/json" id="mmutrace-data">(.*?)</script>', html, re.S)[1])


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, MmutraceError):
        return result.exception.exit_code, str(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout


def with_metadata(src: Path, dst: Path, drop_events: tuple[str, ...] = (), **metadata: object) -> Path:
    """A copy of the real trace ``src`` with metadata keys replaced and some events left out."""
    reader = open_trace(src)
    table = reader.read()
    if drop_events:
        keep = [e not in drop_events for e in table.column("event").to_pylist()]
        table = table.filter(keep)
    meta = {k: v for k, v in reader.metadata.items() if k not in ("schema_version", "complete")} | metadata
    with TraceWriter(dst, meta) as writer:
        writer.write_batch(table)
    return dst


REPLAY_KEYS = ("decisions", "matched", "mismatched", "missing", "extra", "undecidable", "by_kind")


@pytest.mark.parametrize("trace", EXAMPLES + LAB, ids=[f"{p.parent.name}/{p.stem}" for p in EXAMPLES + LAB])
def test_report_numbers_equal_info_replay_and_diff(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    code, _ = invoke("report", trace, "--replay", "-o", out)
    assert code == 0
    data = page_data(out.read_text())
    code, info = invoke("info", trace, "--json")
    info = json.loads(info)
    assert (data["events"], data["lost"], data["by_event"], data["span_ns"]) == \
        (info["events"], info["lost"], info["by_event"], info["span_ns"])
    assert info["metadata"]["kernel_release"].startswith(data["role_layout"] + ".")
    code, replay = invoke("replay", trace, "--json")
    replay = json.loads(replay)
    assert {k: data["replay"][k] for k in REPLAY_KEYS} == {k: replay[k] for k in REPLAY_KEYS}
    assert data["replay"]["divergences"] == len(replay["divergences"])
    # Faults are cut by the rule diff uses: the trace against itself has as many common faults.
    code, diff = invoke("diff", trace, trace, "--json")
    assert code == 0 and json.loads(diff)["faults_a"] == data["faults"]
    assert data["downsampled"] == [] and "Nothing was downsampled" in out.read_text()


def test_quota_reclaim_is_told_from_other_zaps(tmp_path: Path) -> None:
    """mmu_pages_limit sets the quota to 64 pages and runs into it: most zaps are evictions inside a
    fault; touch never comes near its quota (the kernel's own counters say so): none of its are."""
    limit_trace, touch_trace = (next(p for p in EXAMPLES if p.stem == s) for s in ("mmu_pages_limit", "touch-seed1"))
    limit = report_module.build_report(limit_trace, tmp_path / "a.html")
    counters = open_trace(touch_trace).read(columns=["mmu_used", "mmu_max"])
    headroom = min(m - u for u, m in zip(*(counters.column(c).to_pylist() for c in ("mmu_used", "mmu_max")))
                   if u is not None and m is not None)
    assert headroom > report_module.KVM_REFILL_PAGES
    assert report_module.build_report(touch_trace, tmp_path / "b.html")["quota_reclaim_zaps"] == 0
    zaps = limit["by_event"]["kvm_mmu_prepare_zap_page"]
    assert zaps // 2 < limit["quota_reclaim_zaps"] <= zaps


def test_divergences_link_to_their_context(tmp_path: Path) -> None:
    """A real trace with one get_page's 'created' flipped: the replay diverges there, the page says so."""
    reader = open_trace(EXAMPLES[0])
    table = reader.read()
    created = table.column("created").to_pylist()
    events = table.column("event").to_pylist()
    i = [k for k, e in enumerate(events) if e == "kvm_mmu_get_page" and created[k]][-1]
    created[i] = False
    tampered = tmp_path / "tampered.parquet"
    meta = {k: v for k, v in reader.metadata.items() if k not in ("schema_version", "complete")}
    with TraceWriter(tampered, meta) as writer:
        writer.write_batch(table.set_column(table.schema.get_field_index("created"), "created",
                                            pa.array(created, pa.bool_())))
    out = tmp_path / "r.html"
    assert invoke("report", tampered, "--replay", "-o", out)[0] == 0
    html = out.read_text()
    code, replay = invoke("replay", tampered, "--json")
    divergences = json.loads(replay)["divergences"]
    assert code != 0 and divergences and page_data(html)["replay"]["divergences"] == len(divergences)
    assert divergences[0]["ts_ns"] == table.column("ts_ns")[i].as_py()
    for n in range(len(divergences)):
        assert f'<a href="#div-{n}">context</a>' in html and f'<details id="div-{n}">' in html


def test_trace_strings_are_escaped(tmp_path: Path) -> None:
    src = tmp_path / "hostile.parquet"
    with_metadata(EXAMPLES[0], src, markers=[{"ts_ns": open_trace(EXAMPLES[0]).read(columns=["ts_ns"])[0][5].as_py(),
                                              "text": HOSTILE}],
                  scenario={"name": "<b>touch</b>", "seed": 1}, command=["sh", "-c", "<img src=x onerror=alert(1)>"])
    out = tmp_path / "r.html"
    assert invoke("report", src, "-o", out)[0] == 0
    html = out.read_text()
    assert HOSTILE not in html and "<b>touch</b>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.body.setAttribute(&#x27;data-pwned&#x27;,&#x27;1&#x27;)&lt;/script&gt;" in html
    assert "name=&lt;b&gt;touch&lt;/b&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_lost_events_are_loud(tmp_path: Path) -> None:
    src = with_metadata(EXAMPLES[0], tmp_path / "lost.parquet", lost={"0": 3, "1": 4}, lost_total=7)
    out = tmp_path / "r.html"
    assert invoke("report", src, "-o", out)[0] == 0
    html = out.read_text()
    assert page_data(html)["lost"] == 7 and "id='lost-banner'>⚠ 7 events were LOST" in html


def test_downsampling_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "PLOT_POINTS", 100)
    monkeypatch.setattr(report_module, "TABLE_ROWS", 3)
    out = tmp_path / "r.html"
    data = report_module.build_report(EXAMPLES[0], out)
    faults = data["faults"]
    assert f"timeline 'fault': 1 point in {-(-faults // 100)} of {faults:,}" in data["downsampled"]
    assert f"pages table: showing the 3 most active of {data['shadow_pages']:,} shadow pages" in data["downsampled"]
    assert "Downsampled: timeline &#x27;fault&#x27;" in out.read_text()


def test_diff_section_has_the_diff_numbers(tmp_path: Path) -> None:
    a, b = (next(p for p in EXAMPLES if p.stem == s) for s in ("touch-seed1", "touch-seed2"))
    out = tmp_path / "d.html"
    code, text = invoke("diff", a, b, "--json", "--html", out)
    diff = json.loads(text)
    data = page_data(out.read_text())["diff"]
    assert code == 1 and data == {k: diff[k] for k in data}
    assert data["only_a"] == diff["only_a"] > 0
    assert out.read_text().count('<details id="diff-') == diff["n_differences"]


def test_traces_of_different_kernels_are_diffed_with_their_decoding_said(tmp_path: Path) -> None:
    old = with_metadata(EXAMPLES[0], tmp_path / "old.parquet", kernel_release="6.1.0-27-amd64")
    out = tmp_path / "r.html"
    assert invoke("report", EXAMPLES[0], "--diff", old, "-o", out)[0] == 0
    html = out.read_text()
    assert "Kernels differ: A is 6.18" in html and "B is 6.1.0-27-amd64 (role words with the 6.1 layout" in html


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    no_faults = with_metadata(EXAMPLES[0], tmp_path / "nofaults.parquet", drop_events=("kvm_mmu_pagetable_walk",))
    table = pq.read_table(EXAMPLES[0])
    meta = json.loads(table.schema.metadata[b"mmutrace"]) | {"schema_version": 99}
    future = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata({b"mmutrace": json.dumps(meta).encode()}), future)
    cases = [
        ((no_faults, "-o", tmp_path / "a.html"), "has no faults"),
        ((future, "-o", tmp_path / "b.html"), "schema_version 99"),
        ((EXAMPLES[0], "-o", tmp_path / "missing" / "c.html"), "does not exist"),
        ((EXAMPLES[0], "-o", tmp_path), "is a directory"),
    ]
    for args, message in cases:
        code, text = invoke("report", *args)
        assert code == 2 and message in text and "\n" not in text, (args, text)
    assert not list(tmp_path.glob("*.html"))
    proc = subprocess.run([MMUTRACE, "report", str(no_faults), "-o", str(tmp_path / "a.html")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

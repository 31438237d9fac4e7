"""The report in a real browser: headless Debian chromium opens it from a file with the network cut
off; it renders without script errors, every plot has drawn data, a hostile marker stays text.

The page records script errors itself (window.onerror and console.error write into #js-errors), so
``--dump-dom`` after the scripts ran shows them.  The screenshot is kept under artifacts/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

from mmutrace.report import build_report
from mmutrace.storage import open_trace
from test_report import EXAMPLES, HOSTILE, with_metadata

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def chromium(page: Path, profile: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    """Headless chromium on ``page`` with no network: a dead proxy for everything but file://."""
    return subprocess.run(
        [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", "--proxy-server=socks5://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--virtual-time-budget=15000", "--window-size=1400,4000", *args, page.as_uri() + fragment],
        capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_report_renders_offline_with_data_and_no_errors(tmp_path: Path) -> None:
    seed1 = next(p for p in EXAMPLES if p.stem == "touch-seed1")
    markers = open_trace(seed1).metadata["markers"]
    a = with_metadata(seed1, tmp_path / "a.parquet",
                      markers=[*markers, {"ts_ns": markers[0]["ts_ns"] + 1, "text": HOSTILE}])
    b = next(p for p in EXAMPLES if p.stem == "touch-seed2")
    page = tmp_path / "report.html"
    build_report(a, page, diff_with=b)
    html = page.read_text().replace(get_plotlyjs(), "")  # plotly.js holds URL strings it never loads here
    assert not re.search(r'(src|href)="(https?:)?//', html), "the page must not reference the network"

    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = dom.stdout
    assert 'data-rendered="yes"' in body
    errors = re.findall(r'<pre class="js-error">(.*?)</pre>', body, re.S)
    assert errors == [] and '<div id="js-errors" data-count="0" hidden' in body, errors
    plots = re.findall(r'<div class="plot js-plotly-plot" id="(plot-[a-z]+)">', body)
    assert plots == ["plot-timeline", "plot-rates", "plot-structure", "plot-churn"]
    for chunk in body.split('<div class="plot js-plotly-plot"')[1:]:
        chunk = chunk.split('<div class="plot js-plotly-plot"')[0]
        assert 'class="main-svg"' in chunk
        # drawn data: scatter points, line paths or bars, not just empty axes
        assert re.search(r'class="(point|js-line|bars)', chunk), chunk[:300]
    body_tag = re.search(r"<body[^>]*>", body)[0]
    assert "data-rendered" in body_tag and "data-pwned" not in body_tag  # the marker's script never ran
    assert "&lt;script&gt;document.body.setAttribute" in body

    # A "context" link (#diff-N) opens that difference's side-by-side context.
    linked = chromium(page, tmp_path / "profile4", "--dump-dom", fragment="#diff-1").stdout
    assert '<details id="diff-1" open="">' in linked and '<details id="diff-0">' in linked

    # The error hook itself works: the same page with one failing script reports it.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>noSuchFunction();</script></body>"))
    body = chromium(broken, tmp_path / "profile3", "--dump-dom").stdout
    assert '<div id="js-errors" data-count="1"' in body and "noSuchFunction" in body

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    proc = chromium(page, tmp_path / "profile2", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

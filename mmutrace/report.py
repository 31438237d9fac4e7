"""`mmutrace report`: one self-contained HTML page of a run, its replay and a diff.

The page must open anywhere a reviewer double-clicks it: plotly's JavaScript is inlined, there are no
external resources, and the sorting/filtering of tables is a few lines of inline JS.  Traces of any
length go through one streaming pass (row group by row group) that aggregates into fixed time bins
(exact counts) and keeps per-event points only up to ``PLOT_POINTS`` per series (a uniform stride
beyond that, said on the page), so the page size is bounded whatever the trace length.

Every string that comes from a trace (scenario names, markers, command lines, metadata values) goes
through ``html.escape`` or, inside the page's JSON, has ``<``, ``>`` and ``&`` escaped: a marker
``<script>`` shows as text.  The numbers tests compare with ``info``/``replay --json`` are in the
``#mmutrace-data`` JSON block.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pyarrow as pa
import pyarrow.compute as pc
from plotly.offline import get_plotlyjs

from mmutrace.diff import (MAPPING_EVENTS, DiffResult, FaultCutter, Lanes, fault_start_event, format_value, lane_label,
                           markers_of, spte_flavor)
from mmutrace.errors import MmutraceError, UsageError
from mmutrace.schema import EVENTS
from replay.role import ROLE_LAYOUT_6_1, ROLE_LAYOUT_6_18, PageRole, RoleLayout
from replay.versions import rules_for_release

#: Points kept per scatter series; beyond it a uniform stride (said on the page).
PLOT_POINTS = 4000
#: Time bins of the rate and structure plots.
N_BINS = 400
#: Rows shown in the pages table and the divergence/difference tables before truncation (said).
TABLE_ROWS = 2000
LARGEST_TABLES = 25
#: KVM_REFILL_PAGES (mmu.c): make_mmu_pages_available() zaps up to this many pages' worth.
KVM_REFILL_PAGES = 25

_CATALOGUE = {e.name: i for i, e in enumerate(EVENTS)}
_GET_PAGE, _ZAP, _ZAP_ALL = "kvm_mmu_get_page", "kvm_mmu_prepare_zap_page", "kvm_mmu_zap_all_fast"
_SYNC, _UNSYNC, _SET_SPTE = "kvm_mmu_sync_page", "kvm_mmu_unsync_page", "kvm_mmu_set_spte"
_PAGE_EVENTS = (_GET_PAGE, _ZAP, _SYNC, _UNSYNC)
_SCAN_COLUMNS = ["ts_ns", "vm", "tid", "vcpu", "event", "addr", "error_code", "gfn", "role", "created",
                 "sptep", "level", "mmu_used", "mmu_max"]
#: role fields the structure plot splits by: the same bits in every layout (replay/role.py)
_LEVEL, _DIRECT, _INVALID = (ROLE_LAYOUT_6_1.fields[f] for f in ("level", "direct", "invalid"))


def _role_field(words: np.ndarray, shift_width: tuple[int, int]) -> np.ndarray:
    shift, width = shift_width
    return (words >> shift) & ((1 << width) - 1)


# --------------------------------------------------------------------------------------------
# One streaming pass over the trace
# --------------------------------------------------------------------------------------------


@dataclass
class _Points:
    """Timestamps and lanes of one kind of timeline point, collected per batch."""

    ts: list[np.ndarray] = field(default_factory=list)
    lane: list[np.ndarray] = field(default_factory=list)

    def add(self, ts: np.ndarray, lane: np.ndarray) -> None:
        if len(ts):
            self.ts.append(ts)
            self.lane.append(lane)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.ts:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return np.concatenate(self.ts), np.concatenate(self.lane)


class TraceScan:
    """Everything the page shows about the trace itself, aggregated in one pass (``add`` per batch)."""

    def __init__(self, t0: int, width: int, n_bins: int, start_event: str) -> None:
        self.t0, self.width, self.n_bins, self.start_event = t0, width, n_bins, start_event  # width: ns per bin
        self.lanes: dict[tuple[int, str], int] = {}  # (VM ordinal, lane name) -> timeline row
        self.event_bins = np.zeros((len(EVENTS), n_bins), np.int64)
        self.fault_bins = np.zeros(n_bins, np.int64)
        self.live_delta = np.zeros((10, n_bins), np.int64)  # (level - 1) * 2 + direct
        self.quota_used = np.full(n_bins, np.nan)
        self.quota_max = np.full(n_bins, np.nan)
        self.points = {k: _Points() for k in ("fault", "sp created", "zap (quota reclaim)", "zap", "zap_all_fast")}
        self.reclaim_bins = np.zeros(n_bins, np.int64)
        self._before_fetch: dict[int, bool] = {}  # lane -> its open fault has not looked up a page yet
        self.page_parts: list[pd.DataFrame] = []
        self.spte_parts: list[pd.DataFrame] = []
        self.faults = 0
        self._cutter = FaultCutter(start_event)
        self._cut_codes = np.array(sorted(_CATALOGUE[e] for e in self._cutter.cut_events if e in _CATALOGUE))
        self._names = [e.name for e in EVENTS]
        self._lane_names = Lanes()

    def lane_labels(self) -> dict[int, str]:
        return {i: lane_label(vm, name) for (vm, name), i in self.lanes.items()}

    def bin_seconds(self) -> np.ndarray:
        return (np.arange(self.n_bins) + 0.5) * self.width / 1e9

    # -- per batch

    def add(self, batch: pa.RecordBatch) -> None:
        events = batch.column("event")
        remap = np.array([_CATALOGUE[n] for n in events.dictionary.to_pylist()], np.int64)
        codes = remap[events.indices.to_numpy(zero_copy_only=False)]
        ts = batch.column("ts_ns").to_numpy()
        bins = np.minimum((ts - self.t0) // self.width, self.n_bins - 1).astype(np.int64)
        self.event_bins += np.bincount(codes * self.n_bins + bins,
                                       minlength=len(EVENTS) * self.n_bins).reshape(len(EVENTS), self.n_bins)
        col = {name: batch.column(name) for name in batch.schema.names}
        is_ = {name: codes == _CATALOGUE[name] for name in (*_PAGE_EVENTS, _ZAP_ALL, _SET_SPTE)}
        self._timeline(ts, bins, codes, col, is_)
        self._structure(ts, bins, col, is_)

    def _lanes_of(self, rows: np.ndarray, col: dict[str, pa.Array]) -> np.ndarray:
        """Plot row (lane) of each row in ``rows``; the vCPU comes from the thread when a row has none."""
        vms, tids, vcpus = (col[c].take(pa.array(rows)).to_pylist() for c in ("vm", "tid", "vcpu"))
        self._lane_names.learn(vms, tids, vcpus)
        return np.array([self.lanes.setdefault(self._lane_names.lane(vm, tid, vcpu), len(self.lanes))
                         for vm, tid, vcpu in zip(vms, tids, vcpus)], np.int64)

    def _timeline(self, ts: np.ndarray, bins: np.ndarray, codes: np.ndarray, col: dict[str, pa.Array],
                  is_: dict[str, np.ndarray]) -> None:
        created = _bools(col["created"])
        cut = np.isin(codes, self._cut_codes)
        rows = np.flatnonzero(cut | is_[_GET_PAGE] | is_[_ZAP] | is_[_ZAP_ALL])
        lanes = self._lanes_of(rows, col)
        addrs = col["addr"].take(pa.array(rows)).to_pylist()
        access = col["error_code"].take(pa.array(rows)).to_pylist()
        used, quota = (col[c].take(pa.array(rows)).to_pylist() for c in ("mmu_used", "mmu_max"))
        kind = np.full(len(rows), "", dtype=object)
        for k, (r, lane, a, e) in enumerate(zip(rows.tolist(), lanes.tolist(), addrs, access)):
            name = self._names[codes[r]]
            if name in self._cutter.cut_events:
                if self._cutter.feed(lane, name, a, e):
                    kind[k] = "fault"
                    self._before_fetch[lane] = True
                if name in MAPPING_EVENTS:
                    self._before_fetch[lane] = False
            elif name == _GET_PAGE:
                self._before_fetch[lane] = False
                kind[k] = "sp created" if created[r] else ""
            elif name == _ZAP:
                kind[k] = "zap (quota reclaim)" if self._reclaims(lane, used[k], quota[k]) else "zap"
            else:
                kind[k] = "zap_all_fast"
        for name in self.points:
            chosen = kind == name
            self.points[name].add(ts[rows[chosen]], lanes[chosen])
        self.faults += int((kind == "fault").sum())
        self.fault_bins += np.bincount(bins[rows[kind == "fault"]], minlength=self.n_bins)
        self.reclaim_bins += np.bincount(bins[rows[kind == "zap (quota reclaim)"]], minlength=self.n_bins)

    def _reclaims(self, lane: int, used: int | None, quota: int | None) -> bool:
        """Whether a prepare_zap is make_mmu_pages_available() evicting: it runs in a fault before the
        fault's first shadow-page lookup, and zaps only while fewer than KVM_REFILL_PAGES are free
        (which rules out zaps of emulated page-table writes, where the recorder read the counters)."""
        in_reclaim_window = self._cutter.is_open(lane) and self._before_fetch.get(lane, False)
        return in_reclaim_window and (used is None or quota is None or quota - used <= KVM_REFILL_PAGES)

    def _structure(self, ts: np.ndarray, bins: np.ndarray, col: dict[str, pa.Array],
                   is_: dict[str, np.ndarray]) -> None:
        role = _ints(col["role"])
        created = _bools(col["created"])
        level = np.clip(_role_field(role, _LEVEL), 1, 5) - 1
        series = level * 2 + _role_field(role, _DIRECT)
        born = is_[_GET_PAGE] & created
        # A root still in use is prepare-zapped twice (again when its last user drops it, then with
        # role.invalid set): only the first zap takes the page out of the live count.
        died = is_[_ZAP] & (_role_field(role, _INVALID) == 0)
        for mask, sign in ((born, 1), (died, -1)):
            self.live_delta += sign * np.bincount(series[mask] * self.n_bins + bins[mask],
                                                  minlength=10 * self.n_bins).reshape(10, self.n_bins)
        used_valid = col["mmu_used"].is_valid().to_numpy(zero_copy_only=False)
        if used_valid.any():
            r = np.flatnonzero(used_valid)
            last = len(r) - 1 - np.unique(bins[r][::-1], return_index=True)[1]
            self.quota_used[bins[r][last]] = _ints(col["mmu_used"])[r][last]
            self.quota_max[bins[r][last]] = _ints(col["mmu_max"])[r][last]
        page_rows = np.flatnonzero(np.logical_or.reduce([is_[e] for e in _PAGE_EVENTS]))
        if len(page_rows):
            names = np.array(_PAGE_EVENTS + ("reused",))
            which = np.select([is_[e][page_rows] for e in _PAGE_EVENTS], range(4), 4)
            which[(which == 0) & ~created[page_rows]] = 4
            df = pd.DataFrame({"gfn": _ints(col["gfn"])[page_rows], "role": role[page_rows],
                               "what": names[which], "ts": ts[page_rows]})
            self.page_parts.append(df.groupby(["gfn", "role", "what"]).agg(n=("ts", "size"), first=("ts", "min"),
                                                                            last=("ts", "max")))
        spte_rows = np.flatnonzero(is_[_SET_SPTE] & col["sptep"].is_valid().to_numpy(zero_copy_only=False))
        if len(spte_rows):
            sptep = pc.fill_null(col["sptep"], 0).to_numpy(zero_copy_only=False)  # kernel addresses: keep u64
            self.spte_parts.append(pd.DataFrame({"sptep": sptep[spte_rows],
                                                 "level": _ints(col["level"])[spte_rows],
                                                 "gfn": _ints(col["gfn"])[spte_rows]}).drop_duplicates("sptep"))

    # -- results

    def pages(self) -> pd.DataFrame:
        """One row per shadow page identity (gfn, role): created, reused, zapped, unsync, sync, times."""
        if not self.page_parts:
            return pd.DataFrame(columns=["gfn", "role", "created", "reused", "zapped", "unsync", "sync",
                                         "first", "last"])
        agg = pd.concat(self.page_parts).groupby(level=[0, 1, 2]).agg(n=("n", "sum"), first=("first", "min"),
                                                                       last=("last", "max"))
        counts = agg["n"].unstack("what", fill_value=0)
        times = agg[["first", "last"]].groupby(level=[0, 1]).agg({"first": "min", "last": "max"})
        names = {_GET_PAGE: "created", "reused": "reused", _ZAP: "zapped", _UNSYNC: "unsync", _SYNC: "sync"}
        counts = counts.rename(columns=names).reindex(columns=list(names.values()), fill_value=0)
        out = counts.join(times).reset_index()
        out["activity"] = out[list(names.values())].sum(axis=1)
        return out.sort_values(["activity", "first"], ascending=[False, True])

    def largest_tables(self) -> pd.DataFrame:
        """Shadow tables (the host page holding the SPTEs) by how many distinct SPTEs were set in them."""
        if not self.spte_parts:
            return pd.DataFrame(columns=["table", "level", "sptes", "gfn_min", "gfn_max"])
        df = pd.concat(self.spte_parts).drop_duplicates("sptep")
        df["table"] = df["sptep"].to_numpy() >> 12
        out = df.groupby("table").agg(level=("level", "max"), sptes=("sptep", "size"), gfn_min=("gfn", "min"),
                                      gfn_max=("gfn", "max")).reset_index()
        return out.sort_values("sptes", ascending=False).head(LARGEST_TABLES)


def _ints(array: pa.Array) -> np.ndarray:
    return pc.fill_null(array, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False) \
        if not pa.types.is_uint64(array.type) else pc.fill_null(array, 0).to_numpy(zero_copy_only=False).view(np.int64)


def _bools(array: pa.Array) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)


def scan_trace(reader: Any, by_event: dict[str, int]) -> TraceScan:
    """Stream ``reader``'s row groups once into a ``TraceScan``."""
    first = next(reader.iter_batches(columns=["ts_ns"], batch_rows=1), None)
    t0 = int(first.column(0)[0].as_py()) if first is not None and first.num_rows else 0
    span = max(int(reader.span_ns), 1)
    # The time axis starts at the first event or the first marker, whichever is earlier.
    markers = markers_of(dict(reader.metadata))
    if markers and markers[0][0] < t0:
        span, t0 = span + t0 - markers[0][0], markers[0][0]
    n_bins = int(min(N_BINS, max(1, sum(by_event.values()) // 4)))
    scan = TraceScan(t0, math.ceil((span + 1) / n_bins), n_bins, fault_start_event(by_event))
    columns = [c for c in _SCAN_COLUMNS if c in reader.schema.names]
    for batch in reader.iter_batches(columns=columns):
        for name in set(_SCAN_COLUMNS) - set(columns):
            batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.int64()))
        scan.add(batch)
    return scan


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------

esc = html.escape


def _json_for_html(value: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>', '&' or line separators can end the element."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class _Html(str):
    """Markup built here (already escaped): table cells, links."""


def _td(value: Any, sort: Any = None) -> _Html:
    """One table cell; ``sort`` (a number or string) is what the column sorts by instead of the text."""
    sort_attr = f' data-sort="{esc(str(sort))}"' if sort is not None else ""
    return _Html(f"<td{sort_attr}>{value if isinstance(value, _Html) else esc(str(value))}</td>")


def _table(table_id: str, headers: list[str], rows: list[list[_Html]], note: str = "") -> str:
    """A sortable (click a header), filterable (type in the box) table of ``_td`` cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return _Html(f'<div class="tablebox"><input class="filter" type="search" placeholder="filter rows…" '
                 f'data-table="{table_id}"> <span class="count" id="{table_id}-count">{len(rows)} rows</span>'
                 f'{note_html}<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
                 f"<tbody>\n{body}\n</tbody></table></div>")


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, _Html) else esc(_text(v))}</td></tr>"
                   for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _ns(ts: int | None, t0: int) -> str:
    return "—" if ts is None else f"{(ts - t0) / 1e9:.6f} s"


@dataclass
class _Figure:
    div_id: str
    figure: go.Figure

    def html(self) -> str:
        return f'<div class="plot" id="{self.div_id}"></div>'

    def script(self) -> str:
        fig = _json_for_html(pio.to_json(self.figure, validate=False))
        return (f"mmutracePlot({json.dumps(self.div_id)}, {fig});")


def _mark_phases(fig: go.Figure, markers: list[tuple[int, str]], t0: int) -> None:
    """Scenario phase markers as labelled vertical lines (text escaped: plotly renders some HTML)."""
    for ts, text in markers:
        x = (ts - t0) / 1e9
        fig.add_vline(x=x, line_width=1, line_dash="dot", line_color="#888")
        fig.add_annotation(x=x, y=1, yref="paper", text=esc(text), showarrow=False, textangle=-90,
                           xanchor="right", yanchor="top", font={"size": 9, "color": "#555"})


def _layout(fig: go.Figure, title: str, height: int = 360, **kw: Any) -> go.Figure:
    fig.update_layout(title=title, height=height, margin={"l": 60, "r": 20, "t": 40, "b": 60},
                      template="plotly_white", legend={"orientation": "h", "y": -0.28}, **kw)
    return fig


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """The page being built: sections in order, figures, notes on what was downsampled, test data."""

    title: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, heading, html)
    figures: list[_Figure] = field(default_factory=list)
    downsampled: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    banners: list[str] = field(default_factory=list)

    def figure(self, div_id: str, fig: go.Figure) -> str:
        self.figures.append(_Figure(div_id, fig))
        return self.figures[-1].html()

    def render(self) -> str:
        nav = " · ".join(f'<a href="#{sid}">{esc(h)}</a>' for sid, h, _ in self.sections)
        body = "\n".join(f'<section id="{sid}"><h2>{esc(h)}</h2>\n{content}\n</section>'
                         for sid, h, content in self.sections)
        banners = "".join(self.banners)
        down = ("<p class='note'>Downsampled: " + "; ".join(esc(d) for d in self.downsampled) + "</p>"
                if self.downsampled else "<p class='note'>Nothing was downsampled: every event is shown.</p>")
        plots = "\n".join(f.script() for f in self.figures)
        return _PAGE.format(title=esc(self.title), plotlyjs=get_plotlyjs(), css=_CSS, banners=banners, nav=nav,
                            downsampled=down, body=body, data=_json_for_html(self.data), js=_JS, plots=plots)


def _run_section(report: Report, reader: Any, metadata: dict[str, Any], by_event: dict[str, int],
                 scan: TraceScan, lost: int) -> None:
    scen = metadata.get("scenario") or {}
    markers = markers_of(metadata)
    pairs: list[tuple[str, Any]] = [
        ("trace", str(reader.path)),
        ("host kernel", metadata.get("kernel_release")),
        ("decoding", decoding_note(metadata)),
        ("KVM backend", metadata.get("kvm_backend")),
        ("tdp_mmu", metadata.get("tdp_mmu")),
        ("recorder", metadata.get("recorder")),
        ("origin", metadata.get("origin")),
        ("schema version", metadata.get("schema_version")),
        ("complete", metadata.get("complete")),
        ("start", metadata.get("start_time")),
        ("scenario", " ".join(f"{k}={v}" for k, v in scen.items()) if isinstance(scen, dict) else scen),
        ("command", " ".join(map(str, metadata.get("command") or [])) or None),
        ("events", f"{sum(by_event.values()):,}"),
        ("span", f"{reader.span_ns / 1e9:.6f} s"),
        ("faults", f"{scan.faults:,} (each opened by {scan.start_event}; docs/diff.md)"),
        ("lost events", f"{lost:,}"),
    ]
    params = [("kvm." + k, v) for k, v in sorted((metadata.get("kvm_params") or {}).items())]
    params += [(f"{metadata.get('kvm_backend') or 'vendor'}." + k, v)
               for k, v in sorted((metadata.get("vendor_params") or {}).items())]
    counts = [[_td(name), _td(f"{n:,}", n)] for name, n in by_event.items()]
    marker_rows = [[_td(_ns(ts, scan.t0), ts), _td(text)] for ts, text in markers]
    probes = metadata.get("probes") or []
    report.sections.append(("run", "The run", (
        _kv_table(pairs)
        + "<h3>Events</h3>" + _table("events", ["event", "count"], counts)
        + "<h3>Scenario markers</h3>" + (_table("markers", ["time", "marker"], marker_rows) if markers else
                                         "<p>No markers.</p>")
        + f"<details><summary>KVM parameters ({len(params)})</summary>"
        + (_kv_table(params) if params else "<p>Not recorded.</p>") + "</details>"
        + f"<details><summary>Probes ({len(probes)})</summary>"
        + ("<ul class='probes'>" + "".join(f"<li>{esc(str(p))}</li>" for p in probes) + "</ul>" if probes
           else "<p>Not recorded.</p>") + "</details>")))


def _downsample(report: Report, name: str, ts: np.ndarray, lane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ts) <= PLOT_POINTS:
        return ts, lane
    stride = math.ceil(len(ts) / PLOT_POINTS)
    report.downsampled.append(f"timeline '{name}': 1 point in {stride} of {len(ts):,}")
    return ts[::stride], lane[::stride]


def _timeline_section(report: Report, scan: TraceScan, markers: list[tuple[int, str]]) -> None:
    labels = scan.lane_labels()
    fig = go.Figure()
    symbols = {"fault": "circle", "sp created": "triangle-up", "zap (quota reclaim)": "x", "zap": "x-thin-open",
               "zap_all_fast": "star"}
    for kind, pts in scan.points.items():
        ts, lane = pts.arrays()
        if not len(ts):
            continue
        ts, lane = _downsample(report, kind, ts, lane)
        fig.add_trace(go.Scatter(x=(ts - scan.t0) / 1e9, y=[labels[x] for x in lane.tolist()], mode="markers",
                                 name=kind, marker={"symbol": symbols[kind], "size": 5, "opacity": 0.6}))
    _mark_phases(fig, markers, scan.t0)
    _layout(fig, "Faults, shadow-page creations and zaps per vCPU", height=200 + 40 * len(labels),
            xaxis_title="seconds")
    x = scan.bin_seconds()
    rates = go.Figure()
    per_s = 1e9 / scan.width
    series = {"faults": scan.fault_bins}
    series.update({name: scan.event_bins[_CATALOGUE[name]] for name in
                   (_GET_PAGE, _SET_SPTE, _ZAP, _UNSYNC, _SYNC, _ZAP_ALL)})
    for name, counts in series.items():
        if counts.any():
            rates.add_trace(go.Scatter(x=x, y=counts * per_s, mode="lines", name=name))
    _mark_phases(rates, markers, scan.t0)
    _layout(rates, f"Rates (events/s, bins of {scan.width / 1e6:.3f} ms)", xaxis_title="seconds",
            yaxis_title="events/s")
    report.sections.append(("timeline", "Timeline", report.figure("plot-timeline", fig)
                            + report.figure("plot-rates", rates)))


def _structure_section(report: Report, scan: TraceScan, markers: list[tuple[int, str]]) -> None:
    x = scan.bin_seconds()
    live = np.cumsum(scan.live_delta, axis=1)
    fig = go.Figure()
    for s in range(10):
        if scan.live_delta[s].any():
            fig.add_trace(go.Scatter(x=x, y=live[s], mode="lines", stackgroup="live",
                                     name=f"L{s // 2 + 1} {'direct' if s % 2 else 'indirect'}"))
    for name, values in (("mmu_used (kernel)", scan.quota_used), ("mmu_max (quota)", scan.quota_max)):
        if not np.isnan(values).all():
            fig.add_trace(go.Scatter(x=x, y=pd.Series(values).ffill().to_numpy(), mode="lines", name=name,
                                     line={"dash": "dash", "width": 2}))
    _mark_phases(fig, markers, scan.t0)
    _layout(fig, "Shadow pages alive by level and role (created − zapped), and the page quota",
            xaxis_title="seconds", yaxis_title="pages")
    churn = go.Figure()
    zaps = scan.event_bins[_CATALOGUE[_ZAP]]
    for name, counts in (("quota reclaim (zaps in a fault before its first lookup)", scan.reclaim_bins),
                         ("other prepare_zap", zaps - scan.reclaim_bins),
                         *((name, scan.event_bins[_CATALOGUE[name]]) for name in (_UNSYNC, _SYNC, _ZAP_ALL))):
        if counts.any():
            churn.add_trace(go.Bar(x=x, y=counts, name=name))
    _mark_phases(churn, markers, scan.t0)
    _layout(churn, "Zaps (evictions and invalidations), unsync and sync per bin", barmode="group",
            xaxis_title="seconds", yaxis_title="events per bin")

    pages = scan.pages()
    layout = role_layout(report.data["kernel_release"])
    note = ""
    if len(pages) > TABLE_ROWS:
        note = f"showing the {TABLE_ROWS:,} most active of {len(pages):,} shadow pages"
        report.downsampled.append(f"pages table: {note}")
    rows = [[_td(f"{int(p.gfn):#x}", int(p.gfn)), _td(f"{int(p.role):#x}", int(p.role)),
             _td(PageRole(int(p.role), layout).describe()),
             *(_td(int(getattr(p, c)), int(getattr(p, c))) for c in ("created", "reused", "zapped", "unsync", "sync")),
             _td(_ns(int(p.first), scan.t0), int(p.first)), _td(_ns(int(p.last), scan.t0), int(p.last))]
            for p in pages.head(TABLE_ROWS).itertuples()]
    tables = scan.largest_tables()
    trows = [[_td(f"{int(t.table) << 12:#x}", int(t.table)), _td(int(t.level), int(t.level)),
              _td(int(t.sptes), int(t.sptes)), _td(f"{int(t.gfn_min):#x}–{int(t.gfn_max):#x}", int(t.gfn_min))]
             for t in tables.itertuples()]
    report.data["shadow_pages"] = int(len(pages))
    report.data["quota_reclaim_zaps"] = int(scan.reclaim_bins.sum())
    report.sections.append(("structure", "Shadow page structure", (
        report.figure("plot-structure", fig) + report.figure("plot-churn", churn)
        + "<h3>Shadow pages (gfn, role)</h3>"
        + _table("pages", ["gfn", "role", "decoded role", "created", "reused", "zapped", "unsync", "sync", "first",
                           "last"], rows, note)
        + f"<h3>Largest tables (top {LARGEST_TABLES} by distinct SPTEs set)</h3>"
        + (_table("tables", ["table (host page of sptep)", "level", "SPTEs set", "gfns"], trows) if trows else
           "<p>No kvm_mmu_set_spte events with sptep.</p>"))))


def role_layout(kernel_release: str | None) -> RoleLayout:
    """The role-word layout of the recorded kernel (replay/versions.py); an unknown kernel is decoded
    with the newest layout, and the page's header says so (decoding_note)."""
    try:
        return rules_for_release(kernel_release).role_layout
    except MmutraceError:
        return ROLE_LAYOUT_6_18


def decoding_note(metadata: dict[str, Any]) -> str:
    release = metadata.get("kernel_release")
    layout = role_layout(release)
    try:
        rules_for_release(release)
        known = ""
    except MmutraceError:
        known = f" (kernel {release} unknown: newest layout assumed)"
    return f"role words with the {layout.name} layout{known}; SPTEs as the {spte_flavor(metadata).name} flavor"


def _replay_section(report: Report, result: dict[str, Any], t0: int) -> None:
    counters = {k: result.get(k) for k in ("decisions", "matched", "mismatched", "missing", "extra", "undecidable")}
    report.data["replay"] = {**counters, "by_kind": result.get("by_kind", {}),
                             "divergences": len(result.get("divergences", []))}
    decidable = (counters["decisions"] or 0) - (counters["undecidable"] or 0)
    agree = f"{100 * (counters['matched'] or 0) / decidable:.3f} %" if decidable else "—"
    kinds = result.get("by_kind") or {}
    fig = go.Figure()
    names = list(kinds)
    for verdict in ("matched", "mismatched", "missing", "extra", "undecidable"):
        fig.add_trace(go.Bar(x=names, y=[kinds[k].get(verdict, 0) for k in names], name=verdict))
    _layout(fig, "Replay verdicts per decision kind", barmode="stack")
    rows = []
    for k, c in kinds.items():
        dec = c.get("decisions", 0) - c.get("undecidable", 0)
        pct = 100 * c.get("matched", 0) / dec if dec else None
        rows.append([_td(k), *(_td(c.get(v, 0), c.get(v, 0)) for v in
                               ("decisions", "matched", "mismatched", "missing", "extra", "undecidable")),
                     _td("—" if pct is None else f"{pct:.3f} %", -1 if pct is None else pct)])
    divs = result.get("divergences") or []
    shown = divs[:TABLE_ROWS]
    if len(divs) > len(shown):
        report.downsampled.append(f"divergences: first {len(shown):,} of {len(divs):,}")
    drows, details = [], []
    for i, d in enumerate(shown):
        drows.append([_td(_ns(d.get("ts_ns"), t0), d.get("ts_ns")), _td(d.get("verdict", "")), _td(d.get("kind", "")),
                      _td(d.get("event", "")), _td(_text(d.get("expected"))), _td(_text(d.get("actual"))),
                      _td(_Html(f'<a href="#div-{i}">context</a>'))])
        details.append(f'<details id="div-{i}"><summary>#{i} {esc(str(d.get("verdict")))} '
                       f'{esc(str(d.get("kind")))} at {esc(_ns(d.get("ts_ns"), t0))}</summary>'
                       f'<pre>{esc(json.dumps(d.get("context"), indent=2, default=str))}</pre></details>')
    reasons = result.get("undecidable_reasons") or {}
    report.sections.append(("replay", "Replay verdicts", (
        _kv_table([*counters.items(), ("agreement (decidable)", agree), ("split", result.get("split")),
                   ("adopted after undecidable", result.get("adopted"))])
        + report.figure("plot-replay", fig)
        + _table("replay-kinds", ["kind", "decisions", "matched", "mismatched", "missing", "extra", "undecidable",
                                  "agreement"], rows)
        + "<h3>Undecidable reasons</h3>" + (_kv_table(list(reasons.items())) if reasons else "<p>None.</p>")
        + f"<h3>Divergences ({len(divs):,})</h3>"
        + (_table("divergences", ["time", "verdict", "kind", "event", "expected (kernel)", "actual (model)", ""],
                  drows) + "<div class='contexts'>" + "".join(details) + "</div>" if divs else
           "<p class='ok'>None: the model made every decidable decision the kernel made.</p>"))))


def _diff_section(report: Report, diff: DiffResult) -> None:
    summary = diff.to_json(max_differences=0)
    report.data["diff"] = {k: summary[k] for k in ("equivalent", "faults_a", "faults_b", "common", "only_a",
                                                    "only_b", "differing", "by_kind", "n_differences")}
    shown = diff.differences[:TABLE_ROWS]
    if len(diff.differences) > len(shown):
        report.downsampled.append(f"differences: first {len(shown):,} of {len(diff.differences):,}")
    rows, details = [], []
    for i, d in enumerate(shown):
        field_name = d.kind.rpartition(".")[2]
        rows.append([_td(d.kind), _td(d.where), _td(d.lane_label),
                     _td("—" if d.ts_a is None else d.ts_a, d.ts_a), _td("—" if d.ts_b is None else d.ts_b, d.ts_b),
                     _td(format_value(field_name, d.a)),
                     _td(format_value(field_name, d.b)), _td(d.detail),
                     _td(_Html(f'<a href="#diff-{i}">context</a>') if d.context else "")])
        if d.context:
            cols = "".join(f"<div><h4>{esc(side.upper())}: {esc(label)}</h4><pre>{esc(chr(10).join(lines))}</pre></div>"
                           for (side, lines), label in zip(d.context.items(), (diff.a_label, diff.b_label)))
            details.append(f'<details id="diff-{i}"><summary>#{i} {esc(d.kind)} — {esc(d.where)}</summary>'
                           f'<div class="sidebyside">{cols}</div></details>')
    verdict = ("<p class='ok'>Equivalent: same faults, same decisions.</p>" if diff.equivalent else
               f"<p class='bad'>Different: {len(diff.differences):,} differences.</p>")
    kinds = [[_td(k), _td(n, n)] for k, n in diff.by_kind.items()]
    report.sections.append(("diff", "Diff", (
        verdict
        + _kv_table([("A", diff.a_label), ("B", diff.b_label), ("faults A", diff.faults_a), ("faults B", diff.faults_b),
                     ("common", diff.common), ("only in A", diff.only_a), ("only in B", diff.only_b),
                     ("differing", diff.differing), ("decisions outside faults A/B",
                                                     f"{diff.outside_a} / {diff.outside_b}"),
                     ("ignored fields", ", ".join(diff.ignored)), *(("note", n) for n in diff.notes)])
        + ("<h3>Differences per kind</h3>" + _table("diff-kinds", ["kind", "count"], kinds) if kinds else "")
        + ("<h3>Differences, side by side</h3>"
           + _table("differences", ["kind", "where", "lane", "ts A (ns)", "ts B (ns)", "A", "B", "bits", ""], rows)
           + "<div class='contexts'>" + "".join(details) + "</div>" if rows else ""))))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def check_output_path(output: Path) -> None:
    """Refuse an output the page cannot be written to, before any work."""
    if output.is_dir():
        raise UsageError(f"output {output} is a directory")
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"output directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable")


def build_report(trace: Path, output: Path, *, replay: bool = False, model: str = "kernel", allow_lost: bool = False,
                 diff_with: Path | None = None, diff: DiffResult | None = None) -> dict[str, Any]:
    """Write the report of ``trace`` to ``output``; returns the numbers put in the page's data block.

    ``replay`` adds the replay verdicts under ``model`` (see diff.MODEL_SPLITS); ``diff_with`` adds a
    diff against another trace; ``diff`` adds an already computed diff.
    """
    from mmutrace.storage import open_trace

    check_output_path(output)
    reader = open_trace(trace)
    metadata = dict(reader.metadata)
    by_event = reader.event_counts()
    scan = scan_trace(reader, by_event)
    if not scan.faults:
        raise MmutraceError(f"{trace}: the trace has no faults (no {scan.start_event} events on a vCPU): "
                            "nothing to report")
    lost = int(reader.lost_total)
    markers = markers_of(metadata)
    report = Report(f"mmutrace report: {trace.name}")
    report.data.update({"events": sum(by_event.values()), "lost": lost, "by_event": by_event,
                        "span_ns": int(reader.span_ns), "faults": scan.faults, "vcpus": len(scan.lanes),
                        "kernel_release": metadata.get("kernel_release"),
                        "role_layout": role_layout(metadata.get("kernel_release")).name})
    if lost:
        report.banners.append(f"<div class='banner bad' id='lost-banner'>⚠ {lost:,} events were LOST while "
                              "recording: counts, timelines and verdicts after the first loss are incomplete.</div>")
    if metadata.get("complete") is False:
        report.banners.append("<div class='banner bad'>⚠ The recording is incomplete (repaired or interrupted).</div>")
    _run_section(report, reader, metadata, by_event, scan, lost)
    _timeline_section(report, scan, markers)
    _structure_section(report, scan, markers)
    if replay:
        from replay.engine import replay_trace

        from mmutrace.diff import model_split

        result = replay_trace(trace, split=model_split(model), allow_lost=allow_lost, keep_model_events=False).to_json()
        _replay_section(report, result, scan.t0)
    if diff_with is not None:
        from mmutrace.diff import diff_sources, load_trace

        a, b = load_trace(trace), load_trace(diff_with)
        diff = diff_sources(a, b)
        ma, mb = a.metadata, b.metadata
        if ma.get("kernel_release") != mb.get("kernel_release"):
            report.banners.append(f"<div class='banner'>Kernels differ: A is {esc(str(ma.get('kernel_release')))} "
                                  f"({esc(decoding_note(ma))}), B is {esc(str(mb.get('kernel_release')))} "
                                  f"({esc(decoding_note(mb))}).</div>")
    if diff is not None:
        _diff_section(report, diff)
    report.data["downsampled"] = report.downsampled
    page = report.render()
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None
    report.data["bytes"] = len(page.encode())
    return report.data


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 3em;color:#222}
header h1{font-size:1.4em;margin:.6em 0 .2em}
nav{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd;z-index:5}
section{margin-top:1.5em}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#f4f4f4;position:sticky;top:2.2em}
table.sortable th[data-dir=asc]::after{content:" ▲"}table.sortable th[data-dir=desc]::after{content:" ▼"}
table.kv th{background:#f8f8f8;font-weight:600}
.tablebox{max-height:32em;overflow:auto;margin-bottom:1em}
.banner{padding:.6em 1em;margin:.6em 0;border-radius:4px;background:#fff3cd;font-weight:600}
.banner.bad{background:#f8d7da;color:#721c24;font-size:1.15em}
.ok{color:#155724;font-weight:600}.bad{color:#721c24;font-weight:600}
.note{color:#666;font-size:.9em}
.sidebyside{display:flex;gap:1em}.sidebyside>div{flex:1;min-width:0}
pre{background:#f8f8f8;padding:.5em;overflow:auto;max-height:24em}
.plot{min-height:300px}
#js-errors{background:#f8d7da}
"""

_JS = r"""
function mmutraceSort(table, col, th) {
  var dir = th.getAttribute('data-dir') === 'asc' ? 'desc' : 'asc';
  table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
  th.setAttribute('data-dir', dir);
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  function key(r) { var c = r.cells[col]; if (!c) return ''; var s = c.getAttribute('data-sort');
    return s === null ? c.textContent : s; }
  rows.sort(function (a, b) {
    var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y), r;
    if (!isNaN(nx) && !isNaN(ny) && String(nx) === x.trim() && String(ny) === y.trim()) r = nx - ny;
    else r = x.localeCompare(y);
    return dir === 'asc' ? r : -r;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () { mmutraceSort(t, i, th); });
  });
});
document.querySelectorAll('input.filter').forEach(function (input) {
  input.addEventListener('input', function () {
    var id = input.getAttribute('data-table'), t = document.getElementById(id), q = input.value.toLowerCase(), n = 0;
    Array.prototype.forEach.call(t.tBodies[0].rows, function (r) {
      var show = r.textContent.toLowerCase().indexOf(q) >= 0; r.style.display = show ? '' : 'none'; if (show) n++;
    });
    document.getElementById(id + '-count').textContent = n + ' rows';
  });
});
function mmutraceOpenTarget() {  // a "context" link opens the <details> it points to
  var el = location.hash && document.getElementById(location.hash.slice(1));
  if (el && el.tagName === 'DETAILS') el.open = true;
}
window.addEventListener('hashchange', mmutraceOpenTarget);
mmutraceOpenTarget();
function mmutracePlot(id, fig) {
  Plotly.newPlot(id, fig.data, fig.layout, {responsive: true, displaylogo: false});
}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<script>
window.mmutraceErrors = [];
function mmutraceShow() {{
  var box = document.getElementById('js-errors'), n = window.mmutraceErrors.length;
  if (!box) return;
  for (var i = box.getElementsByTagName('pre').length; i < n; i++) {{
    var p = document.createElement('pre'); p.className = 'js-error'; p.textContent = window.mmutraceErrors[i];
    box.appendChild(p);
  }}
  box.setAttribute('data-count', n); box.hidden = n === 0;
}}
function mmutraceError(text) {{ window.mmutraceErrors.push(String(text)); mmutraceShow(); }}
window.onerror = function (msg, src, line) {{ mmutraceError(msg + ' (' + src + ':' + line + ')'); }};
(function () {{ var orig = console.error; console.error = function () {{
  mmutraceError(Array.prototype.join.call(arguments, ' ')); return orig.apply(console, arguments); }}; }})();
</script>
<style>{css}</style>
<script>{plotlyjs}</script>
</head><body>
<div id="js-errors" data-count="0" hidden></div>
<header><h1>{title}</h1>{banners}</header>
<nav>{nav}</nav>
{downsampled}
{body}
<script type="application/json" id="mmutrace-data">{data}</script>
<script>{js}
{plots}
mmutraceShow();
document.body.setAttribute('data-rendered', 'yes');
</script>
</body></html>
"""

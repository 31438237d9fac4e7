"""`mmutrace info FILE`: what a trace holds (schema, metadata, events per kind, losses, time span).

The JSON form is the stable one for scripts and tests: one object with ``events``, ``lost``,
``by_event``, ``span_ns``, ``metadata`` (and the file's ``bytes`` and ``row_groups``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mmutrace import storage


def trace_summary(reader: storage.TraceReader) -> dict[str, Any]:
    """The facts ``info`` shows, as one JSON-able object."""
    size = reader.path.stat().st_size
    return {
        "path": str(reader.path),
        "schema_version": reader.metadata["schema_version"],
        "events": reader.num_rows,
        "lost": reader.lost_total,
        "by_event": reader.event_counts(),
        "span_ns": reader.span_ns,
        "row_groups": reader.num_row_groups,
        "bytes": size,
        "bytes_per_event": round(size / reader.num_rows, 3) if reader.num_rows else None,
        "metadata": reader.metadata,
    }


def _print_summary(summary: dict[str, Any], console: Console) -> None:
    meta = summary["metadata"]
    console.print(f"[bold]{summary['path']}[/]: mmutrace trace, schema version {summary['schema_version']}")
    per_event = f", {summary['bytes_per_event']} bytes/event" if summary["events"] else ""
    console.print(
        f"  {summary['events']:,} events in {summary['row_groups']} row groups, "
        f"{summary['bytes']:,} bytes{per_event}"
    )
    console.print(f"  span {summary['span_ns'] / 1e9:.6f} s ({summary['span_ns']:,} ns)")
    if meta.get("complete"):
        console.print(f"  complete (stopped by {meta['stop_reason']})" if "stop_reason" in meta else "  complete")
    else:
        console.print(f"  [bold yellow]INCOMPLETE[/] ({meta.get('stop_reason', 'not closed cleanly')})")
    if summary["lost"]:
        per_cpu = ", ".join(f"cpu{cpu}: {n:,}" for cpu, n in sorted((meta.get("lost") or {}).items()) if int(n))
        console.print(f"  [bold red]LOST {summary['lost']:,} EVENTS[/] ({per_cpu}): the trace has gaps")
    else:
        console.print("  lost 0 events")
    reorder = meta.get("reorder") or {}
    if reorder.get("late_rows"):
        console.print(
            f"  [yellow]{reorder['late_rows']:,} events arrived later than the "
            f"{reorder['window_ns'] / 1e6:g} ms reorder window[/] (placed in order at close)"
        )

    counts = Table(title="events by kind", title_justify="left", box=None, padding=(0, 2))
    counts.add_column("event")
    counts.add_column("count", justify="right")
    for name, n in summary["by_event"].items():
        counts.add_row(name, f"{n:,}")
    console.print(counts)

    shown = {"schema_version", "complete", "stop_reason", "lost", "lost_total", "reorder"}
    rest = Table(title="metadata", title_justify="left", box=None, padding=(0, 2))
    rest.add_column("key")
    rest.add_column("value", overflow="fold")
    for key, value in sorted(meta.items()):
        if key not in shown:
            rest.add_row(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    console.print(rest)


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        file: Path = typer.Argument(..., help="A trace file written by record/import/lab."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    ) -> None:
        """Show a trace's schema, metadata, events per kind, lost events and time span."""
        summary = trace_summary(storage.open_trace(file))
        if as_json:
            print(json.dumps(summary, sort_keys=True))
        else:
            _print_summary(summary, Console(highlight=False, soft_wrap=True))

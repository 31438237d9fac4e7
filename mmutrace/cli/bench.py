"""`mmutrace bench`: benchmarks (never timed tests); each prints ratios against a baseline measured in
the same invocation.

Examples:
    mmutrace bench record                  # touch, 100000 pages (~1.5M events): none / tracefs / bcc
    mmutrace bench record --size 200000 --seed 3
    mmutrace bench replay big.parquet      # replay vs reading the same file (>= 5M events)
"""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(help="Benchmarks: ratios against a baseline measured in the same run.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@bench_app.command("record")
def record_bench(
    size: int = typer.Option(100_000, help="touch scenario size in pages (about 15 events per page)"),
    seed: int = typer.Option(0, help="scenario seed"),
    buffer_mb: int = typer.Option(512, help="per-CPU tracefs buffer, large enough to hold the whole run"),
    repeat: int = typer.Option(3, help="run each configuration this many times, interleaved; keep the fastest"),
) -> None:
    """Guest faults/s untraced, under tracefs and under the bcc recorder; events kept, lost; bytes/event."""
    from rich.console import Console
    from rich.table import Table

    from mmutrace.bench_record import SCENARIO, TABLE_HEADER, bench_record, table_rows

    runs, faults = bench_record(size, seed, buffer_mb, repeat)
    table = Table(title=f"mmutrace bench record: {SCENARIO} --size {size} --seed {seed}, {faults:,} guest faults, "
                        f"fastest of {repeat}")
    for column in TABLE_HEADER:
        table.add_column(column, justify="left" if column == "tracing" else "right")
    for row in table_rows(runs, faults):
        table.add_row(*row)
    Console(width=max(Console().width, 160)).print(table)


@bench_app.command("replay")
def replay_bench(
    trace: Path = typer.Argument(..., help="a trace of at least --min-events events, e.g. "
                                 "`mmutrace record --scenario touch --size 350000 -o big.parquet`"),
    min_events: int = typer.Option(5_000_000, help="refuse smaller traces (0 for a lab TDP trace)"),
    repeat: int = typer.Option(1, help="run each job this many times over the trace (small traces)"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as one JSON object"),
) -> None:
    """Replay events/s on one core against just reading the same Parquet file; peak RSS of each."""
    import json

    from rich.console import Console
    from rich.table import Table

    from replay.bench import bench_replay

    figures = bench_replay(trace, min_events, repeat)
    if as_json:
        typer.echo(json.dumps(figures))
        return
    times = f" x {repeat}" if repeat > 1 else ""
    table = Table(title=f"mmutrace bench replay: {trace} ({figures['events']:,} events{times}, one core)")
    for column in ("job", "CPU s", "wall s", "events/CPU s", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "job" else "right")
    for job, label in (("arrow", "read (Arrow)"), ("read", "read + to Python"), ("replay", "replay"),
                       ("per_event", "replay --no-bulk")):
        f = figures[job]
        table.add_row(label, f"{f['cpu_s']:.2f}", f"{f['wall_s']:.2f}", f"{f['events_per_cpu_s']:,}",
                      f"{f['peak_rss_mb']:.0f}")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(f"replay speed / read speed: {figures['replay_vs_arrow_read']} (Arrow), "
                  f"{figures['replay_vs_python_read']} (to Python); {figures['replay_vs_per_event']}x the per-event "
                  f"replay, {100 * figures['bulk_share']:.1f}% of the rows in bulk, same verdicts: "
                  f"{figures['same_verdicts']}; replay verdicts {figures['replay']['verdicts']}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")

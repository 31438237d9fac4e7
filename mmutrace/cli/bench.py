"""`mmutrace bench`: benchmarks (never timed tests); each prints ratios against a baseline measured in
the same invocation.

Examples:
    mmutrace bench record                  # touch, 100000 pages (~1.5M events): none / tracefs / bcc
    mmutrace bench record --size 200000 --seed 3
"""

from __future__ import annotations

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
    Console(width=max(Console().width, 130)).print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")

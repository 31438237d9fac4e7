"""`mmutrace report`: a self-contained HTML page of one trace, optionally with its replay and a diff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmutrace.diff import MODEL_SPLITS, model_split

EPILOG = """Examples:

  mmutrace report trace.parquet -o trace.html
  mmutrace report trace.parquet --replay -o trace.html          # with the replay verdicts
  mmutrace report run1.parquet --diff run2.parquet -o diff.html  # with a fault-by-fault diff
"""


def register(app: typer.Typer) -> None:
    @app.command("report", epilog=EPILOG)
    def report(
        trace: Annotated[Path, typer.Argument(help="recorded trace (Parquet)")],
        output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write")],
        replay: Annotated[bool, typer.Option("--replay", help="replay the trace and show the verdicts")] = False,
        model: Annotated[str, typer.Option(
            "--model", help=f"model split for --replay ({'|'.join(MODEL_SPLITS)})")] = "kernel",
        diff: Annotated[Optional[Path], typer.Option("--diff", help="add a diff against this trace")] = None,
        allow_lost: Annotated[bool, typer.Option("--allow-lost", help="replay a trace with lost events")] = False,
    ) -> None:
        """Write one self-contained HTML page (opens offline): run, timeline, shadow pages, replay, diff."""
        from mmutrace.report import build_report

        model_split(model)
        data = build_report(trace, output, replay=replay, model=model, allow_lost=allow_lost, diff_with=diff)
        down = f"; downsampled: {'; '.join(data['downsampled'])}" if data["downsampled"] else ""
        typer.echo(f"{output}: {data['bytes'] / 1e6:.1f} MB, {data['events']:,} events, {data['faults']:,} faults{down}",
                   err=True)

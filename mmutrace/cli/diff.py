"""`mmutrace diff`: two traces (or a trace and its replay) compared fault by fault; exit 0/1/2 like diff(1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmutrace.diff import (DEFAULT_IGNORED, MODEL_SPLITS, DiffResult, Source, diff_sources, format_value,
                           load_trace, model_split, model_trace, resolve_ignored)
from mmutrace.errors import UsageError

EPILOG = """Examples:

  mmutrace diff run1.parquet run2.parquet            # two recordings of one scenario and seed
  mmutrace diff trace.parquet --model rfc            # the recording against the model with the RFC's split
  mmutrace diff trace.parquet --model pre --model rfc   # two replays of one trace
  mmutrace diff a.parquet b.parquet --json | jq .by_kind
  mmutrace diff a.parquet b.parquet --html diff.html --no-ignore pfn
"""


def _sources(a: Path, b: Path | None, models: list[str], allow_lost: bool) -> tuple[Source, Source]:
    """Both sides, from the arguments' three forms."""
    if b is not None and models:
        raise UsageError("give a second trace or --model, not both")
    if b is not None:
        return load_trace(a), load_trace(b)
    if len(models) == 1:
        return load_trace(a), model_trace(a, models[0], allow_lost)
    if len(models) == 2:
        return model_trace(a, models[0], allow_lost), model_trace(a, models[1], allow_lost)
    raise UsageError("give a second trace, --model once (trace vs model) or --model twice (model vs model)")


def print_human(result: DiffResult, console: Console, shown: int) -> None:
    """Summary, counts per kind and the first ``shown`` differences with their context, side by side."""
    verdict = "[green]equivalent[/]" if result.equivalent else f"[red]{len(result.differences)} differences[/]"
    console.print(f"[bold]A[/] {result.a_label}\n[bold]B[/] {result.b_label}\n→ {verdict}")
    summary = Table(show_header=True, header_style="bold")
    for col in ("", "A", "B"):
        summary.add_column(col, justify="right" if col else "left")
    summary.add_row("faults", str(result.faults_a), str(result.faults_b))
    summary.add_row("only in", f"[red]{result.only_a}[/]" if result.only_a else "0",
                    f"[red]{result.only_b}[/]" if result.only_b else "0")
    summary.add_row("common", str(result.common), str(result.common))
    summary.add_row("common with differences", str(result.differing), str(result.differing))
    summary.add_row("decisions outside faults", str(result.outside_a), str(result.outside_b))
    console.print(summary)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", markup=True, highlight=False)
    if result.by_kind:
        kinds = Table("kind", "count", header_style="bold")
        for kind, n in result.by_kind.items():
            kinds.add_row(kind, str(n))
        console.print(kinds)
    for i, d in enumerate(result.differences[:shown]):
        field = d.kind.rpartition(".")[2]
        console.rule(f"[bold]#{i}[/] {d.kind} — {d.lane_label} — {d.where}", style="red")
        console.print(f"A ({'—' if d.ts_a is None else d.ts_a} ns): [red]{format_value(field, d.a)}[/]   "
                      f"B ({'—' if d.ts_b is None else d.ts_b} ns): [green]{format_value(field, d.b)}[/]"
                      + (f"   {d.detail}" if d.detail else ""), highlight=False)
        if d.context:
            ctx = Table(show_header=True, header_style="bold", expand=True)
            ctx.add_column("A")
            ctx.add_column("B")
            a, b = d.context["a"], d.context["b"]
            for k in range(max(len(a), len(b))):
                ctx.add_row(a[k] if k < len(a) else "", b[k] if k < len(b) else "")
            console.print(ctx)
    if len(result.differences) > shown:
        console.print(f"… {len(result.differences) - shown} more (--show N, --json or --html for all)")


def register(app: typer.Typer) -> None:
    @app.command("diff", epilog=EPILOG)
    def diff(
        a: Annotated[Path, typer.Argument(help="recorded trace (Parquet)")],
        b: Annotated[Optional[Path], typer.Argument(help="second recorded trace; omit with --model")] = None,
        model: Annotated[list[str], typer.Option(
            "--model", "-m", help=f"replay A under this model split ({'|'.join(MODEL_SPLITS)}; 'kernel' follows "
            "the recorded kernel) and use it as B; twice: compare the two replays")] = [],  # noqa: B006
        as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
        html: Annotated[Optional[Path], typer.Option("--html", help="also write the HTML report of A with the diff")] = None,
        ignore: Annotated[list[str], typer.Option(
            "--ignore", help="also ignore FIELD or EVENT.FIELD (repeatable)")] = [],  # noqa: B006
        no_ignore: Annotated[list[str], typer.Option(
            "--no-ignore", help=f"compare a field ignored by default: {', '.join(DEFAULT_IGNORED)}")] = [],  # noqa: B006
        show: Annotated[int, typer.Option("--show", help="differences printed with context (human output)")] = 10,
        max_differences: Annotated[Optional[int], typer.Option(
            "--max-differences", help="cap the JSON list (the counts stay exact)")] = None,
        allow_lost: Annotated[bool, typer.Option("--allow-lost", help="replay traces with lost events")] = False,
    ) -> None:
        """Compare the MMU decisions of two traces fault by fault (exit 0 equivalent, 1 different, 2 error).

        Faults are paired per VM (by order of appearance) and vCPU by (address, access, occurrence);
        run-to-run noise (host pfns and addresses, timing, pids) is ignored; docs/diff.md has the rules.
        """
        if html is not None:
            from mmutrace.report import check_output_path

            check_output_path(html)
        if len(model) > 2:
            raise UsageError("--model at most twice")
        resolve_ignored(ignore, no_ignore)  # bad arguments fail before any trace is read
        for m in model:
            model_split(m)
        result = diff_sources(*_sources(a, b, model, allow_lost), ignore=ignore, no_ignore=no_ignore)
        if html is not None:
            from mmutrace.report import build_report

            build_report(a, html, diff=result)
        if as_json:
            print(json.dumps(result.to_json(max_differences), default=str))
        else:
            console = Console(highlight=False)
            if console.is_terminal and len(result.differences) > 3 and show > 3:
                with console.pager(styles=True):
                    print_human(result, console, show)
            else:
                print_human(result, console, show)
        raise typer.Exit(0 if result.equivalent else 1)

"""`mmutrace replay TRACE.parquet`: replay a trace through the MMU models and judge every decision.

Examples:
    mmutrace replay out/touch.parquet                     # agreement per kind, first divergences
    mmutrace replay out/touch.parquet --json | jq .matched
    mmutrace replay lab/tdp.parquet --split pre           # the common fault path before RFC patch 9
    mmutrace replay old.parquet --assume-version 6.12     # a kernel whose layouts replay does not know
    mmutrace replay big.parquet --no-bulk                 # every event through the per-event path

Exit status: 0 when no decidable decision diverged, 1 when one did, 2 on bad input.  The JSON object
is documented in docs/replay.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mmutrace.diff import format_value
from replay.engine import ReplayResult, replay_trace

#: How many divergences the human output shows (``--max-divergences`` caps the JSON list too).
SHOWN_DIVERGENCES = 10


def _values(values: dict[str, Any] | None) -> str:
    """A decision's fields as `mmutrace diff` shows them (hex for gfns, roles, SPTEs, addresses)."""
    if not values:
        return "-"
    return ", ".join(f"{k} {format_value(k, v)}" for k, v in values.items())


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "-"


def print_result(result: ReplayResult, console: Console) -> None:
    """Agreement per decision kind and overall (over decidable decisions), then the first divergences."""
    data = result.to_json()
    console.print(f"kernel {data['kernel_release']} (rules {data['version_rules']}), split {data['split']}, "
                  f"{data['events']:,} events")
    table = Table("decision kind", "decisions", "matched", "mismatched", "missing", "extra", "undecidable",
                  "agreement")
    rows = list(data["by_kind"].items()) + [("all", data)]
    for kind, c in rows:
        decidable = c["matched"] + c["mismatched"] + c["missing"] + c["extra"]
        table.add_row(kind, *(f"{c[k]:,}" for k in ("decisions", "matched", "mismatched", "missing", "extra",
                                                      "undecidable")), _percent(c["matched"], decidable))
    console.print(table)
    if data["undecidable_reasons"]:
        console.print("undecidable (input the trace lacks -> count; docs/undecidable.md):")
        for reason, n in data["undecidable_reasons"].items():
            console.print(f"  {n:>8,}  {reason}")
    if data["inferred"]:
        console.print(f"inferred inputs: {data['inferred']}")
    for d in data["divergences"][:SHOWN_DIVERGENCES]:
        ctx = d["context"]
        console.print(f"[bold red]{d['verdict']}[/] {d['kind']} at ts {d['ts_ns']} (thread {ctx.get('tid')}, "
                      f"kernel twin {ctx.get('twin')})")
        console.print(f"    model:  {_values(d['expected'])}")
        console.print(f"    kernel: {_values(d['actual'])}")
        if "fault" in ctx:
            console.print(f"    fault {ctx['fault']}, guest walk {ctx.get('guest_walk')}")
        if "model_page" in ctx:
            console.print(f"    model page {ctx['model_page']}")
    hidden = data["divergences_total"] - min(len(data["divergences"]), SHOWN_DIVERGENCES)
    if hidden > 0:
        console.print(f"... {hidden:,} more divergences (--json lists them)")
    verdict = "[bold red]DIVERGED[/]" if result.diverged else "[bold green]all decidable decisions match[/]"
    console.print(verdict)


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def replay(
        trace: Path = typer.Argument(..., help="Trace file (.parquet) from record, import or the lab."),
        split: Optional[str] = typer.Option(None, "--split", help="pre|rfc: common fault path before or after "
                                            "RFC patch 9 (default: the recorded kernel's)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (docs/replay.md)."),
        max_divergences: Optional[int] = typer.Option(None, "--max-divergences", min=0,
                                                      help="List at most N divergences."),
        allow_lost: bool = typer.Option(False, "--allow-lost", help="Replay a trace with lost events; decisions "
                                        "on the CPUs that lost events become undecidable."),
        assume_version: Optional[str] = typer.Option(None, "--assume-version",
                                                     help="Rules to use for an unknown kernel: 6.1|6.12|6.18."),
        no_bulk: bool = typer.Option(False, "--no-bulk", help="Replay every event through the per-event path "
                                     "(no bulk runs of steady-state faults; same verdicts, slower)."),
    ) -> None:
        """Replay TRACE through the shadow (and TDP) MMU models and judge every recorded decision."""
        if split not in (None, "pre", "rfc"):
            from mmutrace.errors import UsageError

            raise UsageError(f"--split must be pre or rfc, not {split!r}")
        result = replay_trace(trace, split=split, allow_lost=allow_lost, assume_version=assume_version,
                              max_divergences=max_divergences, keep_model_events=False, bulk=not no_bulk)
        if as_json:
            out: dict[str, Any] = result.to_json()
            typer.echo(json.dumps(out))
        else:
            print_result(result, Console(highlight=False, width=max(Console().width, 120)))
        raise typer.Exit(1 if result.diverged else 0)

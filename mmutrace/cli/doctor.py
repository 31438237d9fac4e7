"""`mmutrace doctor`: check the host for recording and replay; exit 0 only when recording can work.

Examples:
    mmutrace doctor            # the table, one row per requirement, each with its fix
    mmutrace doctor --json     # one object: {"ok", "checks": [...], "host": {...}}
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from mmutrace.doctor import Report, Status, run_checks

_STYLE = {Status.OK: "green", Status.MISSING: "bold red", Status.WARNING: "yellow"}


def _print_report(report: Report, console: Console) -> None:
    table = Table(box=None, padding=(0, 2), title="mmutrace doctor", title_justify="left")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status.value}[/]", check.detail, check.fix)
    console.print(table)
    if report.recording_works:
        console.print("[green]recording can work on this host[/]")
    else:
        missing = ", ".join(c.name for c in report.checks if c.required and c.status is Status.MISSING)
        console.print(f"[bold red]recording cannot work here[/]: fix {missing}")


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (checks and host facts)."),
    ) -> None:
        """Check root, /dev/kvm, the KVM module and its parameters, tracefs and its kvm/kvmmmu events, bcc, BTF."""
        report = run_checks()
        if as_json:
            print(json.dumps(report.as_json(), sort_keys=True))
        else:
            _print_report(report, Console(highlight=False))
        raise typer.Exit(0 if report.recording_works else 1)

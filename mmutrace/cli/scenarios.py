"""`mmutrace scenarios list|run`: the built-in KVM guests (mmutrace.scenarios).

Examples:
    mmutrace scenarios list
    mmutrace scenarios run touch --size 100000          # ~150k shadow-MMU faults
    mmutrace scenarios run mmu_pages_limit --seed 3 --json
"""

from __future__ import annotations

from typing import Callable, Optional

import typer

from mmutrace.errors import UsageError
from mmutrace.scenarios import SCENARIOS, ScenarioResult, run_scenario

scenarios_app = typer.Typer(help="Run small deterministic KVM guests that each drive one MMU behaviour.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@scenarios_app.command("list")
def list_scenarios() -> None:
    """Name, default size and the MMU behaviour of every scenario."""
    width = max(map(len, SCENARIOS))
    unit_width = max(len(s.size_unit) for s in SCENARIOS.values())
    for s in SCENARIOS.values():
        typer.echo(f"{s.name:<{width}}  {s.default_size:>6} {s.size_unit:<{unit_width}}  {s.doc}")


def summary(result: ScenarioResult) -> str:
    return (f"{result.name}: seed {result.seed}, size {result.size}, {result.pages_touched} pages touched, "
            f"{result.guest_exits} guest exits, {result.wall_s:.3f} s")


def integer(option: str) -> Callable[[str], int]:
    """A parser for an integer option whose bad value is one UsageError line, not click's usage box."""

    def parse(text: str | int) -> int:
        if isinstance(text, int):  # typer also passes the default through the parser
            return text
        try:
            return int(text, 0)
        except ValueError:
            raise UsageError(f"{option} must be an integer, got {text!r}") from None

    return parse


@scenarios_app.command("run", epilog="Examples: mmutrace scenarios run touch --size 100000 (about 150k faults);  "
                                     "mmutrace scenarios run mmu_pages_limit --seed 3 --json")
def run(
    name: str = typer.Argument(..., help="scenario name (see `mmutrace scenarios list`)"),
    seed: int = typer.Option(0, parser=integer("--seed"), help="seed of the access sequence (same seed, same accesses)"),
    size: Optional[int] = typer.Option(None, parser=integer("--size"),
                                       help="scenario size; its unit is in `scenarios list`"),
    json_: bool = typer.Option(False, "--json", help="print one JSON object instead of the summary"),
) -> None:
    """Run one scenario in a fresh VM, writing phase markers to trace_marker."""
    result = run_scenario(name, seed=seed, size=size)
    typer.echo(result.to_json() if json_ else summary(result))


def register(app: typer.Typer) -> None:
    app.add_typer(scenarios_app, name="scenarios")

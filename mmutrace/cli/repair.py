"""`mmutrace repair`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("repair")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'repair' is not implemented yet")

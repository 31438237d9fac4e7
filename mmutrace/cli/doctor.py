"""`mmutrace doctor`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'doctor' is not implemented yet")

"""`mmutrace lab`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("lab")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'lab' is not implemented yet")

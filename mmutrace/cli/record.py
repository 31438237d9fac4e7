"""`mmutrace record`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("record")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'record' is not implemented yet")

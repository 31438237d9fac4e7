"""`mmutrace replay`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'replay' is not implemented yet")

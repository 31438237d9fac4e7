"""`mmutrace report`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("report")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'report' is not implemented yet")

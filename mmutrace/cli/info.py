"""`mmutrace info`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("info")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'info' is not implemented yet")

"""`mmutrace diff`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("diff")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'diff' is not implemented yet")

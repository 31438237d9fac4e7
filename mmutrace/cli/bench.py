"""`mmutrace bench`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'bench' is not implemented yet")

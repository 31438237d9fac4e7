"""`mmutrace import`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("import")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'import' is not implemented yet")

"""`mmutrace scenarios`: placeholder until its issue lands."""

import typer

from mmutrace.errors import MmutraceError


def register(app: typer.Typer) -> None:
    @app.command("scenarios")
    def _placeholder() -> None:
        """Not implemented yet."""
        raise MmutraceError("'scenarios' is not implemented yet")

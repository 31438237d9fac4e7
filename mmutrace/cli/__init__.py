"""The ``mmutrace`` command line: one module per command, joined here (typer's one-file-per-command).

Each command module exposes ``register(app)``.  ``main`` turns an ``MmutraceError`` into one line on
stderr and its exit status (2, or the error's own), so bad input never shows a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from mmutrace.errors import MmutraceError

COMMAND_MODULES = (
    "doctor",
    "scenarios",
    "record",
    "info",
    "import_",
    "repair",
    "replay",
    "diff",
    "report",
    "bench",
    "lab",
)

app = typer.Typer(
    name="mmutrace",
    help="Record KVM x86 MMU events with eBPF and replay them through models of the shadow and TDP MMUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit: the single way commands report user-facing failures."""
    print(f"mmutrace: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    try:
        app()
    except MmutraceError as exc:
        fail(str(exc), exc.exit_code)
    except PermissionError as exc:
        # Any check that was not written with a given permission in mind still ends in one line.
        fail(f"permission denied: {exc.filename or exc} (most commands need root)")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()
        raise SystemExit(1)

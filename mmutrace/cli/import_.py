"""`mmutrace import FILE -o OUT.parquet`: an ftrace text capture (trace, trace_pipe, trace-cmd report;
gzipped or not) as a trace file.  The text has no recorder inputs: those columns stay null.

Examples:
    mmutrace import trace.txt -o run.parquet                    # kernel guessed from the print formats
    mmutrace import report.txt.gz -o run.parquet --kernel 6.1   # RET_PF numbering of 6.1
    mmutrace import noisy.txt -o run.parquet --max-unparsed 0.05
"""

from __future__ import annotations

from pathlib import Path

import typer

from mmutrace.errors import UsageError
from mmutrace.ftrace_text import MAX_UNPARSED_FRACTION, import_file


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        file: Path = typer.Argument(..., help="ftrace text: trace / trace_pipe output or trace-cmd report, .gz ok."),
        output: Path = typer.Option(..., "--output", "-o", help="The trace file to write (.parquet)."),
        kernel: str = typer.Option(None, help="Kernel release that printed the text (e.g. 6.1, 6.12.117); "
                                   "default: guessed from the print formats seen."),
        max_unparsed: float = typer.Option(MAX_UNPARSED_FRACTION, help="Fail when more than this fraction of "
                                           "the event lines does not parse."),
        force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT."),
    ) -> None:
        """Convert ftrace text of kvm/kvmmmu events into the Parquet trace format."""
        if not 0 <= max_unparsed <= 1:
            raise UsageError(f"--max-unparsed must be between 0 and 1, not {max_unparsed}")
        meta = import_file(file, output, kernel=kernel, max_unparsed=max_unparsed, force=force)
        src = meta["import_source"]
        unparsed = sum(src["unparsed"].values())
        print(f"{output}: {src['events']:,} events from {src['lines']:,} lines ({src['format']}), "
              f"{unparsed:,} unparsed, {sum(src['skipped'].values()):,} of other events skipped, "
              f"kernel {meta.get('kernel_release') or 'unknown'}")

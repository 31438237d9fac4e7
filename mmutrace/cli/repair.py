"""`mmutrace repair PATH`: recover what a killed recorder had flushed into a valid trace.

PATH is the trace path the recorder was writing or its ``.NAME.parquet.partial`` directory.  The
result is marked ``complete: false`` with a ``repair`` note in its metadata (see docs/schema.md).
"""

from __future__ import annotations

from pathlib import Path

import typer

from mmutrace import spool, storage


def register(app: typer.Typer) -> None:
    @app.command("repair")
    def repair(
        path: Path = typer.Argument(..., help="The unfinished trace (or its .NAME.parquet.partial directory)."),
    ) -> None:
        """Merge an interrupted recording's flushed segments and spool into a valid (incomplete) trace."""
        final = spool.repair(path)
        reader = storage.open_trace(final)
        note = reader.metadata.get("repair")
        if note is None:
            print(f"{final}: already finalized; removed its leftover segments")
            return
        skipped = f", skipped unreadable {', '.join(note['skipped'])}" if note["skipped"] else ""
        complete = "true" if reader.metadata["complete"] else "false"
        print(f"{final}: recovered {reader.num_rows:,} events from {note['segments']} segments{skipped} (complete: {complete})")

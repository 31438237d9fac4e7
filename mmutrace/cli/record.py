"""`mmutrace record`: record a KVM process's MMU events into one Parquet trace (mmutrace.record).

Examples:
    mmutrace record --scenario touch --size 100000 -o touch.parquet   # a built-in guest
    mmutrace record -p 4242 --duration 10 -o vm.parquet                # a running VMM
    mmutrace record -o run.parquet -- ./my-vmm --mem 1G                # a command, while it runs
    mmutrace record --scenario touch --backend tracefs -o base.parquet # tracefs, no inputs
    mmutrace record --ebpf --events kvm_mmu_spte_requested            # print the BPF C and exit
    mmutrace record --events kvm_mmu_get_page,kvm_mmu_prepare_zap_page -p 4242 -o zaps.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("record", context_settings={"allow_interspersed_args": False})
    def record_command(
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="trace file to write (.parquet)"),
        pid: Optional[int] = typer.Option(None, "--pid", "-p", help="record this running KVM process (and its VMs)"),
        scenario: Optional[str] = typer.Option(None, help="run and record this built-in scenario"),
        seed: int = typer.Option(0, help="scenario seed"),
        size: Optional[int] = typer.Option(None, help="scenario size (unit: see `mmutrace scenarios list`)"),
        duration: Optional[float] = typer.Option(None, help="stop after this many seconds"),
        events: Optional[str] = typer.Option(None, help="comma-separated event names (default: all)"),
        backend: str = typer.Option("bcc", help="bcc (probes with fault/memslot inputs) or tracefs"),
        force: bool = typer.Option(False, "--force", help="overwrite the output"),
        ebpf: bool = typer.Option(False, "--ebpf", hidden=True, help="print the BPF program (with this kernel's offsets) and exit"),
        command: Optional[List[str]] = typer.Argument(None, help="-- COMMAND ARGS: record while it runs"),
    ) -> None:
        """Record KVM MMU events of a process, a command or a built-in scenario into a Parquet trace.

        Without a target, every process's KVM events are recorded until Ctrl-C or --duration.
        Ctrl-C and SIGTERM stop the recording and leave a complete, valid file.
        """
        from mmutrace.errors import UsageError
        from mmutrace.record import COMMAND_EXITED, Backend, RecordOptions, ScenarioSpec, parse_events, record

        try:
            chosen = Backend(backend)
        except ValueError:
            raise UsageError(f"--backend must be bcc or tracefs, got {backend!r}") from None
        if ebpf:
            from probes.loader import program_text

            typer.echo(program_text(parse_events(events), filtered=bool(pid or scenario or command)))
            return
        if output is None:
            raise UsageError("give the trace file to write: -o FILE.parquet")
        if scenario is None and (seed or size is not None):
            raise UsageError("--seed and --size go with --scenario")
        opts = RecordOptions(
            output=output, pid=pid, command=command or None,
            scenario=ScenarioSpec(scenario, seed, size) if scenario else None,
            duration=duration, events=parse_events(events), backend=chosen, force=force)
        result = record(opts, status=sys.stderr.isatty())
        typer.echo(f"{result.path}: {result.events:,} events, {result.lost:,} lost, "
                   f"recorder CPU {result.cpu_s:.2f} s")
        if result.stop_reason == COMMAND_EXITED and result.child_status:
            typer.echo(f"mmutrace: the traced command exited with status {result.child_status}; "
                       f"the trace holds its events up to then", err=True)
            raise typer.Exit(result.child_status if result.child_status > 0 else 128 - result.child_status)

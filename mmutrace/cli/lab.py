"""`mmutrace lab setup|status|run`: real upstream KVM (TDP or SVM shadow MMU) in a nested QEMU-TCG guest.

Examples:
    mmutrace lab setup
    mmutrace lab run --kernel 6.1 --mmu tdp --scenario touch -o out/lab-6.1-tdp
    mmutrace lab run --kernel 6.12 --mmu shadow --backend tracefs -o out/lab-6.12-shadow
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mmutrace.errors import HostError, UsageError
from mmutrace.lab import setup as lab_setup
from mmutrace.lab.kernels import resolve_kernel
from mmutrace.lab.run import DEFAULT_CPU, LabConfig, run_lab

lab_app = typer.Typer(help="Record real TDP-MMU and SVM shadow-MMU traces in a nested QEMU-TCG guest.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

MMUS = ("tdp", "shadow")
BACKENDS = ("bcc", "tracefs")


@lab_app.command("setup")
def setup() -> None:
    """Install what the lab needs (QEMU, busybox, the 6.1 and 6.12 kernels and headers, virtme-ng)."""
    missing = lab_setup.install(echo=typer.echo)
    status()
    if missing:
        raise HostError(f"lab still lacks: {missing[0].check}")


@lab_app.command("status")
def status() -> None:
    """Show each lab requirement and how to fix it (the same checks `mmutrace doctor` reports)."""
    for check, ok, fix in lab_setup.lab_status():
        typer.echo(f"{'ok ' if ok else 'MISSING'}  {check}" + ("" if ok else f"  -> {fix}"))


@lab_app.command("run")
def run(
    kernel: str = typer.Option(..., help="L1 kernel: 6.1, 6.12 or a path to a bzImage"),
    mmu: str = typer.Option(..., help="tdp (kvm_amd npt=1) or shadow (npt=0: upstream SVM shadow MMU)"),
    scenario: Optional[List[str]] = typer.Option(None, help="scenario to record (repeat; default: all built-in)"),
    backend: str = typer.Option("bcc", help="recorder backend inside L1: bcc, or tracefs"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for one NAME.parquet per scenario"),
    timeout: float = typer.Option(1800.0, help="seconds for the whole boot and all scenarios"),
    cpu: str = typer.Option(DEFAULT_CPU, help="QEMU -cpu model for L1 (needs svm, and npt for --mmu tdp)"),
) -> None:
    """Boot KERNEL under QEMU TCG and record scenarios with the recorder inside L1."""
    from mmutrace.scenarios import SCENARIOS, get_scenario

    if mmu not in MMUS:
        raise UsageError(f"unknown --mmu {mmu!r}: use tdp or shadow")
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend {backend!r}: use bcc or tracefs")
    names = [get_scenario(n).name for n in scenario] if scenario else list(SCENARIOS)
    cfg = LabConfig(kernel=resolve_kernel(kernel), mmu=mmu, scenarios=names, backend=backend, out=output,
                    timeout_s=timeout, cpu=cpu)
    result = run_lab(cfg, echo=typer.echo)
    typer.echo(f"lab: {len(result.traces)} trace(s) in {cfg.out} (L1 boot {result.boot_s:.1f} s, "
               f"total {result.total_s:.1f} s, backend {result.backend})")


def register(app: typer.Typer) -> None:
    app.add_typer(lab_app, name="lab")

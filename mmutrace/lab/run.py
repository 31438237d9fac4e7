"""`mmutrace lab run`: boot an L1 kernel under QEMU TCG with virtme-ng and collect one trace per scenario.

virtme-ng shares this host's root filesystem with L1, so L1 runs this very venv's `mmutrace`; the
output directory is passed read-write.  L1 writes into a staging directory inside it; the host
checks each file (a readable trace that says it came from the lab) and only then moves it into the
output directory (the copy-out), so the output never holds a half-written or foreign file.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from mmutrace.errors import HostError, TraceFileError, UsageError
from mmutrace.lab.inside import PROTOCOL_PREFIX
from mmutrace.lab.kernels import KernelImage, ensure_bcc_headers
from mmutrace.lab.setup import QEMU, vng_path
from mmutrace.schema import METADATA_KEY

#: QEMU CPU model: an AMD EPYC with SVM and nested paging; TCG emulates both (with a few warnings).
DEFAULT_CPU = "EPYC,+svm,+npt"
DEFAULT_MEMORY = "2G"
CONSOLE_TAIL = 25


@dataclass
class LabConfig:
    """One `lab run`: which kernel and MMU, which scenarios, where the traces go."""

    kernel: KernelImage
    mmu: str  # "tdp" | "shadow"
    scenarios: list[str]
    backend: str = "bcc"
    out: Path = Path("lab-out")
    timeout_s: float = 1800.0
    cpu: str = DEFAULT_CPU
    memory: str = DEFAULT_MEMORY


@dataclass
class LabResult:
    """What came back: traces moved into the output directory, scenario failures, timings."""

    release: str = ""
    backend: str = ""
    traces: dict[str, Path] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    #: Scenarios L1 reported recorded, in order (their files are in the staging directory).
    completed: list[str] = field(default_factory=list)
    boot_s: float = 0.0
    total_s: float = 0.0


def check_cpu_model(cpu: str, mmu: str) -> None:
    """Refuse a CPU model that cannot work before spending a boot on it (L1 re-checks what it got)."""
    flags = set(cpu.split(",")[1:])
    if flags & {"-svm", "svm=off"}:
        raise UsageError(f"CPU model {cpu!r} has SVM disabled: kvm_amd cannot load in L1")
    if mmu == "tdp" and flags & {"-npt", "npt=off"}:
        raise UsageError(f"--mmu tdp needs nested paging, but CPU model {cpu!r} disables NPT")


def vng_command(cfg: LabConfig, staging: Path, vng: Path) -> list[str]:
    """The virtme-ng command line: TCG (--disable-kvm), one vCPU, the output dir shared read-write;
    --verbose puts L1's kernel log on the console, so a failed boot can show its tail."""
    inside = [sys.executable, "-m", "mmutrace.lab.inside", "--mmu", cfg.mmu, "--backend", cfg.backend,
              "--staging", str(staging),
              "--lab-json", json.dumps({"qemu_cpu": cfg.cpu, "kernel_image": str(cfg.kernel.image),
                                        "l1_memory": cfg.memory})]
    for name in cfg.scenarios:
        inside += ["--scenario", name]
    return [str(vng), "-r", str(cfg.kernel.image), "--verbose", "--disable-kvm", "--cpus", "1", "--memory", cfg.memory,
            "--rwdir", str(cfg.out), "--cwd", str(cfg.out), f"--qemu-opts=-cpu {cfg.cpu}",
            "--exec", shlex.join(inside)]


def verify_trace(path: Path) -> dict:
    """The lab metadata of a trace L1 wrote; TraceFileError if it is not a readable lab trace."""
    try:
        meta = pq.read_schema(path).metadata or {}
        doc = json.loads(meta[METADATA_KEY])
    except (OSError, KeyError, ValueError) as exc:
        raise TraceFileError(f"{path.name} from L1 is not a readable trace: {exc}") from None
    if doc.get("origin") != "nested-lab":
        raise TraceFileError(f"{path.name} from L1 does not say origin=nested-lab")
    return doc


def run_lab(cfg: LabConfig, echo: Callable[[str], None] = print) -> LabResult:
    """Boot L1, run the scenarios there, move the verified traces into ``cfg.out``.

    Raises HostError when the lab cannot run or L1 does not come up (with the console tail), and when
    any scenario failed (after copying out the ones that worked).
    """
    vng = vng_path()
    if vng is None:
        raise HostError("virtme-ng is not installed (vng/virtme-run not found); run 'mmutrace lab setup'")
    if shutil.which(QEMU) is None:
        raise HostError(f"{QEMU} is not installed (Debian qemu-system-x86); run 'mmutrace lab setup'")
    check_cpu_model(cfg.cpu, cfg.mmu)
    if cfg.backend == "bcc":
        ensure_bcc_headers(cfg.kernel)
    cfg.out = cfg.out.resolve()
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {cfg.out}: {exc.strerror}") from None
    staging = cfg.out / f".lab-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    result = LabResult()
    echo(f"lab: booting {cfg.kernel.release} under QEMU TCG (-cpu {cfg.cpu}), mmu={cfg.mmu}, "
         f"timeout {cfg.timeout_s:.0f} s")
    env = dict(os.environ, PATH=f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.monotonic()
    try:
        console = _run_guest(vng_command(cfg, staging, vng), env, cfg, start, result, echo)
    finally:
        # Scenarios that finished are kept even when a later one timed out or L1 died.
        result.total_s = time.monotonic() - start
        _copy_out(staging, cfg.out, result, echo)
        shutil.rmtree(staging, ignore_errors=True)
    if not result.release:
        tail = "\n".join(console)
        raise HostError(f"L1 guest did not come up (kernel {cfg.kernel.release}); console tail:\n{tail}")
    if result.failures:
        name, why = next(iter(result.failures.items()))
        raise HostError(f"{len(result.failures)} scenario(s) failed inside L1; {name}: {why}")
    return result


def _run_guest(cmd: list[str], env: dict, cfg: LabConfig, start: float, result: LabResult,
               echo: Callable[[str], None]) -> deque[str]:
    """Run vng, relaying protocol lines as progress; kill the whole QEMU process group on timeout."""
    console: deque[str] = deque(maxlen=CONSOLE_TAIL)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=cfg.out, start_new_session=True)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so `finally` kills QEMU on SIGTERM too
    try:
        while True:
            left = cfg.timeout_s - (time.monotonic() - start)
            if left <= 0:
                tail = "\n".join(console)
                raise HostError(f"lab run timed out after {cfg.timeout_s:.0f} s (kernel {cfg.kernel.release}); "
                                f"console tail:\n{tail}")
            if not sel.select(timeout=min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line.startswith(PROTOCOL_PREFIX):
                    _on_protocol(json.loads(line[len(PROTOCOL_PREFIX):]), start, result, echo)
                elif line.strip() and "TCG doesn't support requested feature" not in line:
                    console.append(line)
        proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sel.close()
    return console


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _on_protocol(msg: dict, start: float, result: LabResult, echo: Callable[[str], None]) -> None:
    elapsed = time.monotonic() - start
    kind = msg["kind"]
    if kind == "fatal":
        raise HostError(f"inside L1: {msg['message']}")
    if kind == "ready":
        result.release, result.backend, result.boot_s = msg["release"], msg["backend"], elapsed
        fallback = f" (fallback: {msg['fallback']})" if msg.get("fallback") else ""
        echo(f"lab: L1 up after {elapsed:.1f} s: {msg['release']}, npt={msg['npt']}, tdp_mmu={msg['tdp_mmu']}, "
             f"backend {msg['backend']}{fallback}")
    elif kind == "scenario":
        state = msg["state"]
        if state == "start":
            echo(f"lab: [{elapsed:6.1f} s] scenario {msg['name']} ...")
        elif state == "ok":
            result.completed.append(msg["name"])
            echo(f"lab: [{elapsed:6.1f} s] scenario {msg['name']}: {msg['events']} events")
        else:
            result.failures[msg["name"]] = msg["message"]
            echo(f"lab: [{elapsed:6.1f} s] scenario {msg['name']} FAILED: {msg['message']}")


def _copy_out(staging: Path, out: Path, result: LabResult, echo: Callable[[str], None]) -> None:
    """Move the traces of scenarios L1 reported finished into ``out`` (a killed one is dropped)."""
    for name in result.completed:
        path = staging / f"{name}.parquet"
        verify_trace(path)
        dest = out / path.name
        os.replace(path, dest)
        result.traces[path.stem] = dest
        echo(f"lab: copied out {dest}")

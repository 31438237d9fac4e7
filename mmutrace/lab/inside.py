"""The program `mmutrace lab run` executes inside the L1 guest (as root, on the shared root filesystem).

It selects the MMU by reloading kvm_amd (npt=1: TDP MMU; npt=0: the upstream SVM shadow MMU), records
each scenario with the project's own recorder, stamps the lab facts into each file's metadata and
reports to the host through one JSON line per step on stdout (prefix ``PROTOCOL_PREFIX``): the host
only sees L1's console, so this is the whole channel besides the shared output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmutrace import tracefs
from mmutrace.errors import HostError, MmutraceError
from mmutrace.lab.kernels import HEADER_CACHE
from mmutrace.schema import METADATA_KEY

PROTOCOL_PREFIX = "@@mmutrace-lab "
VENDOR_MODULE = "kvm_amd"


def report(kind: str, **fields: Any) -> None:
    """One protocol line for the host (flushed at once: the host shows progress as it comes)."""
    print(PROTOCOL_PREFIX + json.dumps({"kind": kind, **fields}), flush=True)


def module_params(module: str) -> dict[str, str]:
    """Every /sys/module/MODULE/parameters/* value, as strings (what the metadata records)."""
    params = Path("/sys/module") / module / "parameters"
    values = {}
    for p in sorted(params.iterdir()) if params.is_dir() else []:
        try:
            values[p.name] = p.read_text().strip()
        except OSError:  # some parameters are write-only
            continue
    return values


def load_vendor_module(npt: bool) -> dict[str, str]:
    """Reload kvm_amd with ``npt``; return its parameters.  HostError when SVM or NPT is not there."""
    if Path("/sys/module", VENDOR_MODULE).exists():
        subprocess.run(["rmmod", VENDOR_MODULE], capture_output=True, text=True, check=False)
    proc = subprocess.run(["modprobe", VENDOR_MODULE, f"npt={int(npt)}"], capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "modprobe failed"
        raise HostError(f"cannot load {VENDOR_MODULE} in L1 (does the QEMU CPU model expose SVM?): {why}")
    params = module_params(VENDOR_MODULE)
    if npt and params.get("npt") != "Y":
        raise HostError(f"--mmu tdp needs nested paging, but {VENDOR_MODULE} loaded with npt={params.get('npt')}: "
                        "the QEMU CPU model has no NPT (use e.g. -cpu EPYC,+svm,+npt)")
    if not Path("/dev/kvm").exists():
        raise HostError(f"{VENDOR_MODULE} loaded but L1 has no /dev/kvm")
    return params


def stamp_metadata(path: Path, facts: dict[str, Any]) -> int:
    """Merge ``facts`` into the trace's metadata document (rewriting the file row group by row group).

    Returns the number of events.  The recorder knows the host it ran on; only the lab knows that
    this host was an L1 guest, which MMU it selected and why a backend was substituted.
    """
    src = pq.ParquetFile(path)
    kv = dict(src.schema_arrow.metadata or {})
    doc = json.loads(kv.get(METADATA_KEY, b"{}"))
    doc.update(facts)
    kv[METADATA_KEY] = json.dumps(doc).encode()
    schema = src.schema_arrow.with_metadata(kv)
    tmp = path.with_suffix(".stamping")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as out:
        for i in range(src.num_row_groups):
            out.write_table(src.read_row_group(i).replace_schema_metadata(kv))
    os.replace(tmp, path)
    return src.metadata.num_rows


def record_scenario(name: str, backend: str, out: Path) -> None:
    """Record one scenario with the project's recorder, in this process (L1's Python starts slowly)."""
    from mmutrace.record import Backend, RecordOptions, ScenarioSpec, record

    result = record(RecordOptions(output=out, scenario=ScenarioSpec(name), backend=Backend(backend), force=True))
    if result.child_status:
        raise MmutraceError(f"scenario {name} exited with status {result.child_status} inside L1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmutrace.lab.inside")
    ap.add_argument("--mmu", choices=("tdp", "shadow"), required=True)
    ap.add_argument("--backend", choices=("bcc", "tracefs"), required=True)
    ap.add_argument("--staging", type=Path, required=True)
    ap.add_argument("--scenario", action="append", required=True)
    ap.add_argument("--lab-json", default="{}", help="host-side facts to add to the metadata (QEMU CPU, image)")
    args = ap.parse_args(argv)
    try:
        tracefs.ensure_mounted()
        vendor = load_vendor_module(npt=args.mmu == "tdp")
    except MmutraceError as exc:
        report("fatal", message=str(exc))
        return 2
    release = platform.release()
    kvm = module_params("kvm")
    backend, fallback = args.backend, None
    headers = HEADER_CACHE / f"headers-{release}"
    if backend == "bcc" and not (headers / ".complete").exists():
        backend, fallback = "tracefs", f"no kernel headers for {release} (bcc needs them; mmutrace lab setup)"
    os.environ["BCC_KERNEL_SOURCE"] = str(headers)
    report("ready", release=release, mmu=args.mmu, npt=vendor.get("npt"), tdp_mmu=kvm.get("tdp_mmu"),
           backend=backend, fallback=fallback)
    lab = {**json.loads(args.lab_json), "mmu": args.mmu, "backend_requested": args.backend, "backend": backend,
           "backend_fallback": fallback}
    facts = {"origin": "nested-lab", "kernel_release": release, "kvm_backend": VENDOR_MODULE, "kvm_params": kvm,
             "vendor_params": vendor, "tdp_mmu": args.mmu == "tdp", "lab": lab}
    args.staging.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.scenario:
        out = args.staging / f"{name}.parquet"
        report("scenario", name=name, state="start")
        try:
            record_scenario(name, backend, out)
            events = stamp_metadata(out, facts)
        except (MmutraceError, OSError) as exc:
            failed += 1
            report("scenario", name=name, state="failed", message=str(exc))
            continue
        report("scenario", name=name, state="ok", events=events, file=out.name)
    report("done", failed=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`mmutrace lab`: kernel resolution, readiness checks, metadata stamping, bad input, and a real boot.

The boot test needs QEMU, the Debian kernels and virtme-ng (``mmutrace lab setup``); without them it
skips and says which is missing.  It boots 6.1 under QEMU TCG: one to two minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmutrace.errors import UsageError
from mmutrace.lab import lab_status
from mmutrace.lab.inside import stamp_metadata
from mmutrace.lab.kernels import KNOWN_KERNELS, read_bzimage_release, resolve_kernel
from mmutrace.lab.run import check_cpu_model
from mmutrace.schema import METADATA_KEY

MMUTRACE = [str(Path(sys.prefix) / "bin" / "mmutrace")]


def lab_unavailable() -> str | None:
    """Why the lab cannot boot here, or None (the reason is printed with the skip)."""
    missing = [check for check, ok, _fix in lab_status() if not ok and "6.12" not in check]
    return f"lab not installed: {missing[0]} (mmutrace lab setup)" if missing else None


needs_lab = pytest.mark.skipif(lab_unavailable() is not None, reason=str(lab_unavailable()))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*MMUTRACE, *args], capture_output=True, text=True, timeout=timeout)


def meta(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


# ---- kernels


def test_known_kernel_release_comes_from_the_image_header():
    image = Path("/boot") / f"vmlinuz-{KNOWN_KERNELS['6.1']}"
    if not image.exists():
        pytest.skip(f"{image} not installed (mmutrace lab setup)")
    release, banner = read_bzimage_release(image)
    assert release == "6.1.0-56-amd64"
    assert banner.startswith("6.1.0-56-amd64 (debian-kernel@lists.debian.org)")
    assert resolve_kernel("6.1").release == release


def test_unknown_kernel_name_is_refused():
    with pytest.raises(UsageError, match=r"unknown kernel '5\.9': use 6\.1 or 6\.12 or a path"):
        resolve_kernel("5.9")


def test_non_bootable_image_is_refused(tmp_path):
    fake = tmp_path / "vmlinuz-fake"
    fake.write_bytes(b"\0" * 4096)
    with pytest.raises(UsageError, match="is not a bootable x86 kernel image"):
        resolve_kernel(str(fake))


def test_cpu_model_without_npt_is_refused_for_tdp_before_booting():
    with pytest.raises(UsageError, match="--mmu tdp needs nested paging"):
        check_cpu_model("EPYC,+svm,-npt", "tdp")
    with pytest.raises(UsageError, match="SVM disabled"):
        check_cpu_model("EPYC,-svm", "shadow")
    check_cpu_model("EPYC,+svm,-npt", "shadow")  # the shadow MMU needs no NPT


@pytest.mark.parametrize("args, message", [
    (("--kernel", "5.9", "--mmu", "tdp"), "mmutrace: unknown kernel '5.9'"),
    (("--kernel", "/etc/hostname", "--mmu", "tdp"), "mmutrace: /etc/hostname is not a bootable x86 kernel image"),
    (("--kernel", "6.1", "--mmu", "ept"), "mmutrace: unknown --mmu 'ept': use tdp or shadow"),
    (("--kernel", "6.1", "--mmu", "tdp", "--backend", "perf"), "mmutrace: unknown --backend 'perf'"),
    (("--kernel", "6.1", "--mmu", "tdp", "--scenario", "nope"), "mmutrace: unknown scenario 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run_cli("lab", "run", *args, "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


# ---- readiness and metadata


def test_lab_status_names_a_fix_for_each_missing_requirement():
    status = lab_status()
    checks = [check for check, _ok, _fix in status]
    assert any(c.startswith("qemu-system-x86_64") for c in checks)
    assert sum("kernel 6.1:" in c for c in checks) == 3 and sum("kernel 6.12:" in c for c in checks) == 3
    assert any(c.startswith("virtme-ng") for c in checks)
    for check, ok, fix in status:
        assert (fix == "") == ok, check


def test_stamp_metadata_merges_facts_and_keeps_every_row(tmp_path, examples_dir):
    src = examples_dir / "pt_rewrite.parquet"
    path = tmp_path / "t.parquet"
    shutil.copy(src, path)
    before = pq.read_table(src)
    rows = stamp_metadata(path, {"origin": "nested-lab", "lab": {"mmu": "tdp"}})
    after = pq.read_table(path)
    assert rows == before.num_rows
    assert after.to_pydict() == before.to_pydict()
    doc = meta(path)
    assert doc["origin"] == "nested-lab" and doc["lab"] == {"mmu": "tdp"}
    assert doc["kernel_release"] == meta(src)["kernel_release"]


# ---- real boots (QEMU TCG)


@needs_lab
def test_lab_run_records_a_scenario_inside_l1(tmp_path):
    """Boot 6.1, TDP MMU, record pt_rewrite with the tracefs backend inside L1; replay it."""
    out = tmp_path / "lab"
    proc = run_cli("lab", "run", "--kernel", "6.1", "--mmu", "tdp", "--backend", "tracefs", "--scenario",
                   "pt_rewrite", "-o", str(out), "--timeout", "170", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "lab: L1 up after" in proc.stdout and "scenario pt_rewrite:" in proc.stdout
    trace = out / "pt_rewrite.parquet"
    assert sorted(p.name for p in out.iterdir()) == ["pt_rewrite.parquet"]
    doc = meta(trace)
    assert doc["origin"] == "nested-lab"
    assert doc["kernel_release"] == "6.1.0-56-amd64"
    assert doc["kvm_backend"] == "kvm_amd" and doc["vendor_params"]["npt"] == "Y"
    assert doc["tdp_mmu"] is True and doc["kvm_params"]["tdp_mmu"] == "Y"
    assert doc["lab"]["mmu"] == "tdp" and doc["lab"]["backend"] == "tracefs"
    replay = run_cli("replay", str(trace), "--json")
    result = json.loads(replay.stdout)
    assert replay.returncode == 0
    assert result["mismatched"] == result["missing"] == result["extra"] == 0
    assert result["by_kind"]["get_page"]["matched"] >= 4  # the root and the tables of the first fault


@needs_lab
def test_a_kernel_that_does_not_boot_times_out_with_the_console_tail(tmp_path):
    """A file with a bzImage header but no kernel: QEMU gets nowhere; the timeout ends it, says so
    in one line and shows what the console printed."""
    image = bytearray(65536)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")
    image[0x1000:0x1019] = b"6.1.0-56-amd64 (fake) #1\0"
    fake = tmp_path / "vmlinuz-fake"
    fake.write_bytes(bytes(image))
    proc = run_cli("lab", "run", "--kernel", str(fake), "--mmu", "tdp", "--backend", "tracefs", "--scenario",
                   "pt_rewrite", "-o", str(tmp_path / "lab"), "--timeout", "30", timeout=60)
    assert proc.returncode == 2
    first, *tail = proc.stderr.splitlines()
    assert first == "mmutrace: lab run timed out after 30 s (kernel 6.1.0-56-amd64); console tail:"
    assert tail and "Traceback" not in proc.stderr
    assert not (tmp_path / "lab" / "pt_rewrite.parquet").exists()

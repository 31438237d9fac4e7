"""`mmutrace doctor` and hostinfo on this host: every fact is compared with what /sys says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmutrace import doctor, hostinfo
from mmutrace.schema import EVENTS


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "doctor", *args],
                          capture_output=True, text=True, timeout=300)


def sys_param(module: str, name: str) -> str:
    return Path(f"/sys/module/{module}/parameters/{name}").read_text().strip()


@pytest.fixture(scope="module")
def report() -> dict:
    proc = run_doctor("--json")
    assert proc.stdout.count("\n") == 1, "--json prints one object on one line"
    return {"rc": proc.returncode, **json.loads(proc.stdout)}


@pytest.mark.kvm
def test_doctor_json_on_this_host(report: dict) -> None:
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("root", "/dev/kvm", "tracefs", "kvm events", "kvmmmu events", "kernel BTF"):
        assert status[name] == "ok", name
    host = report["host"]
    vendor = next(m for m in hostinfo.KVM_VENDOR_MODULES if Path(f"/sys/module/{m}").is_dir())
    assert host["kvm_backend"] == vendor
    assert host["kvm_params"]["tdp_mmu"] == sys_param("kvm", "tdp_mmu")
    assert host["tdp_mmu"] is (sys_param("kvm", "tdp_mmu") == "Y")
    assert host["kvm_params"] == {p.name: p.read_text().strip() for p in Path("/sys/module/kvm/parameters").iterdir()}
    assert set(host["vendor_params"]) == {p.name for p in Path(f"/sys/module/{vendor}/parameters").iterdir()}
    assert host["kernel_release"] == os.uname().release
    assert status["kvm.tdp_mmu"] == "ok"


@pytest.mark.bcc
def test_doctor_exits_0_when_recording_works(report: dict) -> None:
    assert report["ok"] is True and report["rc"] == 0
    assert {c["name"]: c["status"] for c in report["checks"]}["bcc compiles and loads"] == "ok"


@pytest.mark.kvm
def test_non_upstream_parameters_are_flagged(report: dict) -> None:
    flagged = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "warning"}
    kvm = hostinfo.module_params("kvm")
    non_upstream = sorted(set(kvm) - hostinfo.UPSTREAM_KVM_PARAMS)
    for name in non_upstream:
        assert f"{name}={kvm[name]}" in flagged["kvm non-upstream parameters"]
    assert report["host"]["non_upstream_params"][: len(non_upstream)] == [f"kvm.{n}" for n in non_upstream]
    if report["host"]["kvm_backend"] in hostinfo.NON_UPSTREAM_VENDOR_MODULES:
        assert "KVM vendor module" in flagged


@pytest.mark.kvm
def test_events_rows_compare_with_the_catalogue() -> None:
    rows = {c.name: c for c in doctor.check_events()}
    present = set(os.listdir("/sys/kernel/tracing/events/kvmmmu"))
    wanted = {e.name for e in EVENTS if e.group == "kvmmmu"}
    row = rows["kvmmmu events"]
    assert (row.status is doctor.Status.OK) == wanted.issubset(present)
    assert str(len(wanted)) in row.detail


def test_text_table_and_exit_code_agree() -> None:
    proc = run_doctor()
    assert "root" in proc.stdout and "tracefs" in proc.stdout
    works = "recording can work on this host" in proc.stdout
    assert proc.returncode == (0 if works else 1)


def test_report_fails_when_a_required_check_is_missing() -> None:
    ok = doctor.Check("root", doctor.Status.OK, "")
    missing = doctor.Check("bcc importable", doctor.Status.MISSING, "", "apt-get install python3-bpfcc")
    warning = doctor.Check("kvm non-upstream parameters", doctor.Status.WARNING, "", required=False)
    assert doctor.Report([ok, warning], {}).recording_works
    assert not doctor.Report([ok, missing], {}).recording_works
    assert doctor.Report([ok, missing], {}).as_json()["checks"][1] == {
        "name": "bcc importable", "status": "missing", "detail": "", "fix": "apt-get install python3-bpfcc",
        "required": True}


def test_bcc_kernel_source_prefers_the_build_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "HEADER_CACHE", tmp_path)
    release = "0.0.0-none"
    assert hostinfo.bcc_kernel_source(release) is None
    (tmp_path / f"headers-{release}" / "include").mkdir(parents=True)
    assert hostinfo.bcc_kernel_source(release) == tmp_path / f"headers-{release}"


def test_param_bool() -> None:
    assert [hostinfo.param_bool(v) for v in ("Y", "N", "1", "0", "200", None)] == [True, False, True, False, None, None]


def _reachable_by_others(path: Path) -> bool:
    """Whether a user with no rights on ``path`` can still read it (the checkout and the venv)."""
    dirs = [path, *path.parents] if path.is_dir() else list(path.parents)
    return all(os.stat(d).st_mode & 0o005 == 0o005 for d in dirs)


def _run_unprivileged(code: str, *args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    """Run Python ``code`` as nobody (uid 65534), optionally with ``path_prefix`` first on PATH."""
    import mmutrace

    for path in (Path(mmutrace.__file__).parent, Path(sys.executable)):
        if not _reachable_by_others(path):
            pytest.skip(f"{path} is not readable by an unprivileged user")
    env = dict(os.environ)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          user=65534, cwd="/", env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_vng_lookup_skips_path_entries_the_user_cannot_search(tmp_path: Path) -> None:
    """CI's PATH has /root/.pyenv/bin: for nobody, stat() there raises EACCES, which must read as
    "no vng here" (it ended doctor in a traceback once)."""
    private = tmp_path / "private"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)
    code = ("from pathlib import Path; import mmutrace.lab.setup as s; "
            "s.venv_bin = lambda: Path('/nonexistent'); print(s.vng_path())")
    proc = _run_unprivileged(code, path_prefix=private / "bin")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.strip() in ("None", *(str(Path(d) / "vng") for d in os.environ.get("PATH", "").split(os.pathsep)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_doctor_as_an_unprivileged_user_says_what_is_missing() -> None:
    proc = _run_unprivileged("from mmutrace.cli import main; main()", "doctor", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    status = {c["name"]: c["status"] for c in json.loads(proc.stdout)["checks"]}
    assert status["root"] == "missing" and status["tracefs"] == "missing"
    assert status["bcc compiles and loads"] == "missing"


def test_lab_readiness_rows_follow_lab_status(report: dict) -> None:
    """The lab's rows are lab_status() itself, optional: a host without the lab can still record."""
    from mmutrace.lab.setup import lab_status

    rows = [c for c in report["checks"] if c["name"].startswith("lab: ")]
    assert [(r["name"][len("lab: "):], r["status"] == "ok") for r in rows] == [(n, ok) for n, ok, _ in lab_status()]
    assert not any(r["required"] for r in rows)


#: /proc/kpageflags bit KPF_ZERO_PAGE (include/uapi/linux/kernel-page-flags.h).
KPF_ZERO_PAGE = 24


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: pagemap and kpageflags hide pfns from other users")
def test_zero_pfn_is_the_page_the_kernel_flags_as_the_zero_page() -> None:
    """Checked against an independent source: the kernel's own page flags for that pfn."""
    pfn = hostinfo.zero_pfn()
    assert pfn is not None and pfn > 0
    with open("/proc/kpageflags", "rb") as flags:
        flags.seek(pfn * 8)
        assert int.from_bytes(flags.read(8), "little") >> KPF_ZERO_PAGE & 1 == 1
    assert hostinfo.host_metadata()["zero_pfn"] == pfn


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_zero_pfn_is_none_where_pagemap_hides_pfns() -> None:
    proc = _run_unprivileged("from mmutrace.hostinfo import zero_pfn; print(zero_pfn())")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "None\n", "")

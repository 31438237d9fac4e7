"""Shared test gates: real-KVM tests skip with the reason printed when the host lacks something.

Use the markers (``@pytest.mark.kvm``, ``@pytest.mark.bcc``, ``@pytest.mark.browser``); the hook below
turns a missing requirement into a skip whose reason names it, so nothing passes silently.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest


@functools.cache
def kvm_unavailable() -> str | None:
    """Why real KVM guests cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    from mmutrace import tracefs

    try:
        tracefs.ensure_mounted()
    except Exception as exc:  # noqa: BLE001 - the reason is what we report
        return f"tracefs unavailable: {exc}"
    return None


@functools.cache
def bcc_unavailable() -> str | None:
    """Why bcc programs cannot be compiled and attached here, or None."""
    if reason := kvm_unavailable():
        return reason
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (Debian python3-bpfcc; run ./run.sh setup)"
    return None


@functools.cache
def browser_unavailable() -> str | None:
    return None if shutil.which("chromium") else "no chromium (Debian package chromium; run ./run.sh setup)"


_GATES = {"kvm": kvm_unavailable, "bcc": bcc_unavailable, "browser": browser_unavailable}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, gate in _GATES.items():
        if item.get_closest_marker(name) and (reason := gate()):
            pytest.skip(f"{name}: {reason}")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"

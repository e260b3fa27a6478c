"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission on /dev/kvm"
    return None


@pytest.fixture(scope="session")
def guests() -> Path:
    """The built test guests (guests/build); skips where /dev/kvm or the toolchain is missing."""
    reason = _kvm_usable()
    if reason:
        pytest.skip(reason)
    from kvmpy.testing.guests import build_guests

    try:
        return build_guests()
    except Exception as error:  # no gcc/make: say so
        pytest.skip(f"cannot build the test guests: {error}")

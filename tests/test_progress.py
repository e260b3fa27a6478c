"""Progress of the long first-time steps: shown on a terminal, silent for scripts and tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.lab import progress


def test_steps_and_downloads_say_nothing_off_a_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with progress.step("building"), progress.download("pkg", tmp_path, 10):
        (tmp_path / "pkg.deb").write_bytes(bytes(10))
    assert capsys.readouterr().err == ""


def test_a_step_says_when_it_starts_and_how_long_it_took(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "shown", lambda: True)
    with progress.step("building the guest initramfs"):
        assert capsys.readouterr().err == "kvmpy: building the guest initramfs ...\n"
    assert capsys.readouterr().err.startswith("kvmpy: building the guest initramfs: done in ")


def test_a_download_bar_counts_the_bytes_arriving(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(progress, "shown", lambda: True)
    (tmp_path / "old.deb").write_bytes(bytes(500))  # there before: not this download's
    (tmp_path / "busybox").mkdir()  # an unpacked tree beside the files: not counted
    (tmp_path / "busybox" / "big").write_bytes(bytes(9000))
    with progress.download("linux-image", tmp_path, 4096):
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / "linux-image.deb").write_bytes(bytes(4096))
    err = capsys.readouterr().err
    assert "linux-image" in err and "4.10k/4.10k" in err, err


def test_the_archive_says_how_large_a_package_is() -> None:
    size = progress.package_size("busybox-static")
    assert size is None or size > 100_000  # None where apt has no lists (a bare container)
    assert progress.package_size("kvmpy-no-such-package") is None

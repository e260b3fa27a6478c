"""Configuration parsing and validation: one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.vmm.config import DiskConfig, SerialConfig, SerialMode, VmConfig, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256M", 256 << 20), ("1G", 1 << 30), ("4096", 4096), ("64k", 64 << 10), ("2GiB", 2 << 30)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1M", "1.5G", "12X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        parse_size(text)


def test_serial_parse() -> None:
    assert SerialConfig.parse("stdio").mode is SerialMode.STDIO
    assert SerialConfig.parse("file:/tmp/x").path == Path("/tmp/x")
    with pytest.raises(ConfigError):
        SerialConfig.parse("tcp:1234")


def test_disk_parse() -> None:
    assert DiskConfig.parse("a.img") == DiskConfig(Path("a.img"))
    disk = DiskConfig.parse("a.img,readonly=on,direct=on,id=boot")
    assert disk == DiskConfig(Path("a.img"), read_only=True, id="boot", direct=True)
    for bad in ("", ",direct=on", "a.img,direct=yes", "a.img,cache=none"):
        with pytest.raises(ConfigError, match="invalid --disk"):
            DiskConfig.parse(bad)


def test_validate(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x7fELF")
    VmConfig(kernel=kernel).validate(1 << 30)
    with pytest.raises(ConfigError, match="does not exist"):
        VmConfig(kernel=tmp_path / "missing").validate()
    with pytest.raises(ConfigError, match="not a regular file"):
        VmConfig(kernel=tmp_path).validate()
    with pytest.raises(ConfigError, match="too small"):
        VmConfig(kernel=kernel, memory=1 << 20).validate()
    with pytest.raises(ConfigError, match="more than this host has"):
        VmConfig(kernel=kernel, memory=2 << 30).validate(1 << 30)
    with pytest.raises(ConfigError, match="--cpus"):
        VmConfig(kernel=kernel, cpus=0).validate()

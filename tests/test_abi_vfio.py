"""The VFIO ctypes mirrors match the installed <linux/vfio.h>, as the C compiler lays it out."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpy.abi import vfio

HEADER = Path("/usr/include/linux/vfio.h")
NUMBERS = [name for name in vfio.__all__ if name.startswith("VFIO_") and isinstance(getattr(vfio, name), int)]


def _compile_and_run(tmp_path: Path, body: str) -> dict[str, int]:
    if shutil.which("gcc") is None or not HEADER.exists():
        pytest.skip("gcc or the kernel UAPI headers (linux-libc-dev) are missing")
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\n"
        f"int main(void) {{\n{body}\nreturn 0;\n}}\n"
    )
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}


def test_struct_sizes_and_offsets_match_the_compiler(tmp_path: Path) -> None:
    lines = []
    for cls in vfio.STRUCTS:
        name = cls.__name__
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    measured = _compile_and_run(tmp_path, "\n".join(lines))
    for cls in vfio.STRUCTS:
        assert ctypes.sizeof(cls) == measured[cls.__name__], cls.__name__
        for field, _ in cls._fields_:
            assert getattr(cls, field).offset == measured[f"{cls.__name__}.{field}"], (cls.__name__, field)


def test_ioctl_numbers_and_flags_match_the_header(tmp_path: Path) -> None:
    body = "\n".join(f'printf("{name} %lld\\n", (long long)({name}));' for name in NUMBERS)
    measured = _compile_and_run(tmp_path, body)
    for name in NUMBERS:
        assert getattr(vfio, name) == measured[name], name
    assert len(NUMBERS) > 40


def test_irq_set_buffer_carries_the_eventfds() -> None:
    buffer = vfio.make_irq_set_eventfds(vfio.VFIO_PCI_MSIX_IRQ_INDEX, 2, [7, -1, 9])
    header = vfio.vfio_irq_set.from_buffer_copy(buffer.raw[: ctypes.sizeof(vfio.vfio_irq_set)])
    assert header.argsz == len(buffer.raw) == 20 + 12
    assert (header.index, header.start, header.count) == (2, 2, 3)
    assert header.flags == vfio.VFIO_IRQ_SET_DATA_EVENTFD | vfio.VFIO_IRQ_SET_ACTION_TRIGGER
    tail = (ctypes.c_int32 * 3).from_buffer_copy(buffer.raw[20:])
    assert list(tail) == [7, -1, 9]

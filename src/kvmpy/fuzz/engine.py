"""The fuzzing process for one target: atheris (libFuzzer) driving :func:`harness.execute`.

Run by the runner as ``python -m kvmpy.fuzz.engine TARGET [libFuzzer flags...]``,
one process per target, because libFuzzer ends its process when it is done
(and on a crash, after writing the input to the artifact directory). kvmpy's
modules are instrumented as the target imports them, so libFuzzer's coverage
counts edges in kvmpy's code only, not in the harness, the test fakes or the
standard library. atheris's ``exclude`` takes exact module names (it does not
exclude a package's submodules), so :func:`uninstrumented` lists every module
of ``kvmpy.fuzz`` and ``kvmpy.testing`` by name: instrumented, the harness's
own loops (the well-behaved driver, the input reader) cost most of an input
and gave libFuzzer edges to chase that are not kvmpy's.
Modules a target imports only when it first runs (a device's module imported in the method
that builds it, or kvmpy's own lazy imports behind a restore) would be imported after the
instrumentation ends and never be instrumented, so :func:`load_instrumented` runs the target's
seeds once inside it. Every :data:`REPORT_EVERY` inputs a line tells the runner how many inputs hit
an already-known issue.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import CodeType, ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmpy.fuzz.harness import Target

REPORT_EVERY = 1 << 14
REPORT_PREFIX = "kvmpy-fuzz:"
#: The packages that are the harness, not the code under test: never instrumented.
HARNESS_PACKAGES = ("fuzz", "testing")


def uninstrumented() -> list[str]:
    """The name of every module of the harness packages, found from the files (importing
    them to ask would load them before the instrumentation starts)."""
    kvmpy = Path(__file__).resolve().parents[1]
    names = []
    for package in HARNESS_PACKAGES:
        for path in sorted((kvmpy / package).rglob("*.py")):
            parts = path.relative_to(kvmpy).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(("kvmpy", *parts)))
    return names


def load_instrumented(name: str) -> Target:
    """Target ``name`` with every kvmpy module it uses instrumented, including those it imports
    lazily: its seeds run once while the import hook is in place."""
    import atheris

    with atheris.instrument_imports(include=["kvmpy"], exclude=uninstrumented()):
        from kvmpy.fuzz.harness import execute
        from kvmpy.fuzz.registry import load

        target = load(name)
        for seed in target.seeds():
            execute(target, seed)
    return target


def not_instrumented() -> list[str]:
    """The loaded kvmpy modules outside the harness whose functions atheris did not instrument
    (a module without functions of its own cannot tell and is left out)."""
    harness = tuple(f"kvmpy.{package}" for package in HARNESS_PACKAGES)
    missing = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("kvmpy.") or name.startswith(harness):
            continue
        codes = [code for code in _own_code(module) if code.co_filename == getattr(module, "__file__", None)]
        if codes and not any(_INSTRUMENTED in code.co_consts for code in codes):
            missing.append(name)
    return missing


#: The constant atheris adds to every code object it instruments.
_INSTRUMENTED = "__ATHERIS_INSTRUMENTED__"


def _own_code(module: ModuleType) -> list[CodeType]:
    """The code of the module's functions and of its classes' methods."""
    codes = []
    for value in vars(module).values():
        members = vars(value).values() if isinstance(value, type) else (value,)
        for member in members:
            code = getattr(member, "__code__", None)
            if isinstance(code, CodeType):
                codes.append(code)
    return codes


def main(argv: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # a guest error logs a warning: millions of them are noise

    name, flags = argv[1], argv[2:]
    target = load_instrumented(name)
    from kvmpy.fuzz.harness import Counters, execute

    counters = Counters()

    def one_input(data: bytes) -> None:
        execute(target, data, counters)
        if counters.inputs % REPORT_EVERY == 0:
            print(f"{REPORT_PREFIX} inputs {counters.inputs} known {counters.known}", file=sys.stderr)

    atheris.Setup([argv[0], *flags], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

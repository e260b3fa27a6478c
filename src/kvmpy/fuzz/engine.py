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
Every :data:`REPORT_EVERY` inputs a line tells the runner how many inputs hit
an already-known issue.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # a guest error logs a warning: millions of them are noise

    name, flags = argv[1], argv[2:]
    with atheris.instrument_imports(include=["kvmpy"], exclude=uninstrumented()):
        from kvmpy.fuzz.registry import load

        target = load(name)
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

"""The fuzzing process for one target: atheris (libFuzzer) driving :func:`harness.execute`.

Run by the runner as ``python -m kvmpy.fuzz.engine TARGET [libFuzzer flags...]``,
one process per target, because libFuzzer ends its process when it is done
(and on a crash, after writing the input to the artifact directory). kvmpy's
modules are instrumented as the target imports them, so libFuzzer's coverage
counts edges in kvmpy's code only, not in the harness or the standard library.
Every :data:`REPORT_EVERY` inputs a line tells the runner how many inputs hit
an already-known issue.
"""

from __future__ import annotations

import sys

REPORT_EVERY = 1 << 14
REPORT_PREFIX = "kvmpy-fuzz:"


def main(argv: list[str]) -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # a guest error logs a warning: millions of them are noise

    name, flags = argv[1], argv[2:]
    with atheris.instrument_imports(include=["kvmpy"], exclude=["kvmpy.fuzz"]):
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

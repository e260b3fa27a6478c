"""Inputs per second of fuzz targets on a fixed corpus, without the fuzzer, optionally profiled.

    python tools/fuzz_speed.py [--corpus DIR] [--rounds N] [--plain] [--profile] TARGET...

Each target runs every file of its corpus (``DIR/TARGET``, by default the committed seeds under
``fuzz/corpus``) once untimed, then ``N`` times through :func:`kvmpy.fuzz.harness.execute`, the function the
engine calls, with kvmpy's modules instrumented by atheris as the engine instruments them
(``--plain``: not instrumented), and the rate is printed. libFuzzer's own work and its choice
of inputs are left out, so a campaign runs slower than this; the ratio between two versions of
a target is what it is for. With ``--profile`` the twenty most expensive functions by
cumulative time follow (cProfile, which slows everything down).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import time
from pathlib import Path

from kvmpy.fuzz.engine import load_instrumented
from kvmpy.fuzz.harness import Target, execute
from kvmpy.fuzz.runner import default_root


def load(name: str, plain: bool) -> Target:
    """Target ``name``, its kvmpy modules instrumented as the engine does unless ``plain``."""
    from kvmpy.fuzz import registry

    return registry.load(name) if plain else load_instrumented(name)


def measure(name: str, corpus: Path, rounds: int, plain: bool, profile: bool) -> None:
    """Print ``name``'s inputs per second over ``rounds`` passes of its corpus."""
    from kvmpy.fuzz.registry import release

    inputs = [p.read_bytes() for p in sorted((corpus / name).iterdir()) if p.is_file()]
    target = load(name, plain)
    profiler = cProfile.Profile() if profile else None
    try:
        for data in inputs:  # untimed: the modules the target imports lazily are instrumented now
            execute(target, data)
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        for _ in range(rounds):
            for data in inputs:
                execute(target, data)
        if profiler is not None:
            profiler.disable()
        elapsed = time.perf_counter() - start
    finally:
        release(target)
    count = rounds * len(inputs)
    print(f"{name}: {count} inputs in {elapsed:.2f} s, {count / elapsed:,.0f} inputs/s", flush=True)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--corpus", type=Path, default=default_root() / "corpus")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--plain", action="store_true", help="without atheris's instrumentation")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # as the engine does: guest errors log a line each
    for name in args.targets:
        measure(name, args.corpus, args.rounds, args.plain, args.profile)


if __name__ == "__main__":
    main()

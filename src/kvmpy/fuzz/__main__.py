"""``python -m kvmpy.fuzz``: run targets with a budget, replay crashes, write the seed corpora.

    python -m kvmpy.fuzz list [--invariants]
    python -m kvmpy.fuzz run [TARGET...] (--seconds S | --runs N) [--root DIR]
    python -m kvmpy.fuzz replay TARGET FILE...
    python -m kvmpy.fuzz seeds [TARGET...]

``run`` exits 1 if any target crashed (the inputs are under ROOT/crashes/TARGET/),
``replay`` exits 1 if any file still crashes its target.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import traceback
from pathlib import Path

from kvmpy.fuzz import TARGETS


def _targets(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"kvmpy.fuzz: no target {', '.join(unknown)}; there are: {', '.join(TARGETS)}")
    return names or list(TARGETS)


def _run(args: argparse.Namespace) -> int:
    from kvmpy.fuzz.runner import format_table, run_target

    if args.seconds is None and args.runs is None:
        raise SystemExit("kvmpy.fuzz run: give a budget, --seconds S or --runs N (per target)")
    outcomes = []
    for name in _targets(args.targets):
        outcome = run_target(name, args.root, seconds=args.seconds, runs=args.runs, quiet=not args.verbose)
        outcomes.append(outcome)
        status = "CRASH" if outcome.crashed else "ok"
        print(f"{name}: {status}, {outcome.inputs:,} inputs, cov {outcome.edges}, {outcome.seconds:.0f} s",
              flush=True)  # fmt: skip
    print(format_table(outcomes))
    return 1 if any(o.crashed for o in outcomes) else 0


def _replay(args: argparse.Namespace) -> int:
    from kvmpy.fuzz.harness import execute
    from kvmpy.fuzz.registry import load

    target = load(args.target)
    failed = 0
    for path in args.files:
        try:
            execute(target, path.read_bytes())
        except Exception:
            failed += 1
            print(f"{path}: CRASH", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _seeds(args: argparse.Namespace) -> int:
    from kvmpy.fuzz.registry import load

    for name in _targets(args.targets):
        directory = args.root / "corpus" / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        seeds = load(name).seeds()
        for seed in seeds:
            (directory / f"seed-{hashlib.sha1(seed).hexdigest()[:12]}").write_bytes(seed)
        print(f"{name}: {len(seeds)} seeds, {sum(map(len, seeds)):,} bytes in {directory}")
    return 0


def _list(invariants: bool) -> int:
    from kvmpy.fuzz.registry import load

    for name in TARGETS:
        if not invariants:
            print(name)
            continue
        target = load(name)
        print(f"- **{name}** (`{type(target).__module__}`):")
        for line in target.invariants:
            print(f"  - {line}")
        for issue in target.known:
            where = f"{issue.error.__name__} from {issue.function} in {issue.file}"
            print(f"  - known, counted: {where} (`{issue.test}`)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvmpy.fuzz.runner import default_root

    parser = argparse.ArgumentParser(prog="python -m kvmpy.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--root", type=Path, default=default_root(), help="corpus, work and crash directories"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the targets")
    listing.add_argument("--invariants", action="store_true", help="each target's invariants, as Markdown")
    run = commands.add_parser("run", help="fuzz targets with a budget each")
    run.add_argument("targets", nargs="*")
    run.add_argument("--seconds", type=int, help="wall-clock budget per target")
    run.add_argument("--runs", type=int, help="inputs per target")
    run.add_argument("--verbose", action="store_true", help="show libFuzzer's output of every target")
    replay = commands.add_parser("replay", help="run saved inputs through a target without the fuzzer")
    replay.add_argument("target", choices=list(TARGETS))
    replay.add_argument("files", nargs="+", type=Path)
    seeds = commands.add_parser("seeds", help="write the seed corpora from kvmpy's own code")
    seeds.add_argument("targets", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.invariants)
    handlers = {"run": _run, "replay": _replay, "seeds": _seeds}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

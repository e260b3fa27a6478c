"""Run targets under the engine with a budget each, and say what happened.

For each target the runner starts one engine process (``python -m
kvmpy.fuzz.engine``) with libFuzzer's flags: the budget (``-max_total_time``
or ``-runs``), a timeout per input, an RSS limit, the working corpus (which
grows, not committed) after the committed seeds, and an artifact directory
where libFuzzer saves a crashing input. It then reads libFuzzer's final
statistics: inputs run, edges covered, features, corpus size. A crash is
any non-zero exit; its input is kept under ``crashes/<target>/`` and
``python -m kvmpy.fuzz replay`` reproduces it without the fuzzer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmpy.fuzz.engine import REPORT_PREFIX

#: Seconds one input may run before libFuzzer calls it a hang.
TIMEOUT_PER_INPUT = 10
#: The engine process's RSS limit (libFuzzer kills it and saves the input past this).
RSS_LIMIT_MB = 2048


def default_root() -> Path:
    """The repository's ``fuzz/`` directory (kvmpy is installed editable from the repository)."""
    return Path(__file__).resolve().parents[3] / "fuzz"


@dataclass
class Outcome:
    """What one engine run reported."""

    target: str
    inputs: int = 0
    edges: int = 0
    features: int = 0
    corpus: int = 0
    known: int = 0
    seconds: float = 0.0
    exit_status: int = 0
    crashes: list[Path] = field(default_factory=list)
    log: Path | None = None

    @property
    def crashed(self) -> bool:
        return self.exit_status != 0 or bool(self.crashes)


_DONE = re.compile(r"#(\d+)\s+(?:DONE|INITED|NEW|REDUCE|pulse)\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_KNOWN = re.compile(re.escape(REPORT_PREFIX) + r" inputs (\d+) known (\d+)")


def parse_log(text: str, outcome: Outcome) -> None:
    """Fill ``outcome`` from libFuzzer's output (the last status line and the final stats)."""
    for match in _DONE.finditer(text):
        outcome.inputs = max(outcome.inputs, int(match[1]))
        outcome.edges, outcome.features, outcome.corpus = int(match[2]), int(match[3]), int(match[4])
    for match in _EXECUTED.finditer(text):
        outcome.inputs = max(outcome.inputs, int(match[1]))
    for match in _KNOWN.finditer(text):
        outcome.known = int(match[2])


def run_target(
    target: str,
    root: Path,
    *,
    seconds: int | None = None,
    runs: int | None = None,
    python: str = sys.executable,
    quiet: bool = True,
) -> Outcome:
    """Fuzz ``target`` for ``seconds`` or ``runs`` inputs; the working corpus persists under ``root``."""
    seeds = root / "corpus" / target
    work = root / "work" / target
    crashes = root / "crashes" / target
    logs = root / "work" / "logs"
    for directory in (work, crashes, logs):
        directory.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    from kvmpy.fuzz.registry import load, release

    instance = load(target)
    max_len = instance.max_len
    release(instance)
    flags = [
        f"-timeout={TIMEOUT_PER_INPUT}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={max_len}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        flags.append(f"-max_total_time={seconds}")
    if runs is not None:
        flags.append(f"-runs={runs}")
    corpora = [str(work)] + ([str(seeds)] if seeds.is_dir() else [])
    command = [python, "-m", "kvmpy.fuzz.engine", target, *flags, *corpora]
    log = logs / f"{target}.log"
    outcome = Outcome(target, log=log)
    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"kvmpy-fuzz-{target}-"))  # the targets' image files
    env = _environment()
    env["TMPDIR"] = str(scratch)
    try:
        with log.open("w") as handle:
            process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # libFuzzer ends the engine without Python's atexit
    outcome.seconds = time.monotonic() - start
    outcome.exit_status = process.returncode
    text = log.read_text(errors="replace")
    parse_log(text, outcome)
    outcome.crashes = sorted(set(crashes.iterdir()) - before)
    if not quiet or outcome.crashed:
        tail = "\n".join(text.splitlines()[-40:])
        print(f"--- {target}: last lines of {log}\n{tail}", file=sys.stderr)
    return outcome


def _environment() -> dict[str, str]:
    """The engine's environment: this kvmpy first on the path, whichever checkout runs it."""
    env = dict(os.environ)
    source = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    return env


def format_table(outcomes: list[Outcome]) -> str:
    """A Markdown table of the outcomes (the format docs/security.md keeps)."""
    lines = [
        "| target | inputs | edges (cov) | features (ft) | corpus | known issues hit | crashes | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        crashes = ", ".join(p.name for p in o.crashes) or (f"exit {o.exit_status}" if o.crashed else "0")
        lines.append(
            f"| {o.target} | {o.inputs:,} | {o.edges} | {o.features} | {o.corpus} | {o.known:,} "
            f"| {crashes} | {o.seconds:.0f} |"
        )
    return "\n".join(lines)


__all__ = ["Outcome", "default_root", "format_table", "parse_log", "run_target"]

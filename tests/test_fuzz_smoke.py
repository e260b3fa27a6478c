"""A short fuzz of every target, so a change that breaks a parser's invariants fails CI.

Each target runs for a few seconds under atheris from its committed seeds (the whole smoke takes
about a minute and a half); the long campaign is docs/security.md's. Without atheris (it is the
``fuzz`` extra, which scripts/setup installs) the fuzzing part skips, and the seeds still replay.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.fuzz import TARGETS
from kvmpy.fuzz.harness import execute
from kvmpy.fuzz.registry import load, release
from kvmpy.fuzz.runner import default_root, run_target

SECONDS = int(os.environ.get("KVMPY_FUZZ_SMOKE_SECONDS", "3"))
CORPUS = default_root() / "corpus"


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_has_seeds_that_pass(name: str) -> None:
    """The committed seeds exist, are what the target's own seeds() makes, and pass its checks."""
    target = load(name)
    seeds = target.seeds()
    committed = sorted(p.read_bytes() for p in (CORPUS / name).glob("seed-*"))
    assert seeds and committed == sorted(seeds), (
        f"fuzz/corpus/{name} is stale: python -m kvmpy.fuzz seeds {name}"
    )
    try:
        for seed in seeds:
            assert len(seed) <= target.max_len
            execute(target, seed)
    finally:
        release(target)


def test_every_target_lists_its_invariants(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m kvmpy.fuzz list --invariants`` (docs/security.md's list) covers every target;
    it stopped at snapshot, which had no ``known`` tuple."""
    from kvmpy.fuzz.__main__ import main

    assert main(["list", "--invariants"]) == 0
    listed = capsys.readouterr().out
    assert all(f"- **{name}**" in listed for name in TARGETS)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris (the fuzz extra) is not installed"
)
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_smoke(name: str, tmp_path: Path) -> None:
    root = tmp_path / "fuzz"
    root.mkdir()
    (root / "corpus").symlink_to(CORPUS)
    outcome = run_target(name, root, seconds=SECONDS, python=sys.executable)
    log = outcome.log.read_text(errors="replace")[-4000:] if outcome.log else ""
    assert not outcome.crashed, f"{name} crashed; replay with python -m kvmpy.fuzz replay {name} FILE\n{log}"
    assert outcome.inputs > 0 and outcome.edges > 0, log


#: Loads every target as the engine does, in a fresh interpreter (kvmpy is already imported,
#: uninstrumented, in this one), and prints the modules atheris did not instrument.
_INSTRUMENTATION_CHECK = """
import logging
logging.disable(logging.CRITICAL)
from kvmpy.fuzz import TARGETS
from kvmpy.fuzz.engine import load_instrumented, not_instrumented
from kvmpy.fuzz.harness import execute
from kvmpy.fuzz.registry import release
for name in TARGETS:
    target = load_instrumented(name)
    for seed in target.seeds():
        execute(target, seed)
    release(target)
print(",".join(not_instrumented()))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris (the fuzz extra) is not installed"
)
def test_every_module_a_target_runs_is_instrumented() -> None:
    """libFuzzer only sees coverage in instrumented modules: one a target imported lazily, after
    the instrumentation ended (virtio-rng's, -console's and -net's devices did), was fuzzed blind."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    result = subprocess.run(
        [sys.executable, "-c", _INSTRUMENTATION_CHECK], capture_output=True, text=True, env=env, check=True
    )
    missing = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert missing == "", f"modules the fuzzer gets no coverage from: {missing}"

"""`.ci/run` fails the build on a skipped test unless its reason is in .ci/allowed-skips.txt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check_skips.py"


def _check(log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(log)], capture_output=True, text=True)


def test_only_listed_skip_reasons_pass(tmp_path):
    log = tmp_path / "skips.jsonl"
    allowed = [{"test": "tests/test_a.py::test_kernel", "reason": "needs a CUDA device"},
               {"test": "tests/test_bagel.py::test_generator_matches_the_reference_fixture",
                "reason": "cross-check: the shared fixture is not present at /x/shared/fixtures/bagel-tiny"}]
    log.write_text("".join(json.dumps(s) + "\n" for s in allowed))
    result = _check(log)
    assert result.returncode == 0, result.stderr
    assert "2 skip(s), 2 allowed" in result.stderr
    with log.open("a") as f:  # a reason nobody listed: an optional package missing, a silent skip
        f.write(json.dumps({"test": "tests/test_b.py::test_ray", "reason": "could not import 'ray'"}) + "\n")
    result = _check(log)
    assert result.returncode == 1
    assert "skipped without an allowed reason: tests/test_b.py::test_ray: could not import 'ray'" in result.stderr
    assert _check(tmp_path / "no-log").returncode == 0  # nothing skipped, nothing logged


def test_a_clone_without_shared_skips_only_the_cross_check_and_passes(tmp_path):
    """The cross-check run as CI runs it, with the shared folder pointed at a missing path: it
    skips, the skip is logged by tests/conftest.py, and the allow-list accepts it."""
    log = tmp_path / "skips.jsonl"
    env = {**os.environ, "TAPESTRY_BAGEL_TINY": str(tmp_path / "no-shared" / "bagel-tiny"),
           "TAPESTRY_SKIP_LOG": str(log)}
    test = "tests/test_bagel.py::test_generator_matches_the_reference_fixture"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout + run.stderr
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["test"] == test and entry["reason"].startswith("cross-check: the shared fixture is not present")
    assert _check(log).returncode == 0

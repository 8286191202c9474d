"""The code-repair reward's test runner: runs exactly a task's own unittest modules, reports
each test's outcome.

``CodeRepairEnv.reward`` ships this file's source into the sandbox (with the task's tests,
restored as shipped) and runs it as::

    python3 -I -B -X pycache_prefix=/tmp/mopd-pyc RUNNER CHECK_DIR MODULE...

It imports only the standard library, and only before the working directory is on
``sys.path``; ``-I`` keeps the working directory (and ``PYTHON*`` variables, user site
directories) out of the interpreter's start, so nothing the model planted (``unittest.py``,
``sitecustomize.py``, ``tests/test_zz.py``, a ``conftest.py``, an ini file) is imported by
the runner itself; ``pycache_prefix`` points bytecode lookups at the call's fresh ``/tmp``,
so a planted ``__pycache__`` cannot stand in for the restored sources.

What it runs: the named modules (``tests.test_binary``), each loaded by name with unittest's
loader, nothing discovered. Their output goes to ``/dev/null`` (so it can neither crowd the
report out of the sandbox's output limit nor fake it); the report is one line on the
original stdout, ``KEY {"passed": [...], "failed": [...]}`` with test ids
(``module.Class.method``), where ``KEY`` is a random token the runner read from
``CHECK_DIR/key`` and deleted before importing anything of the task. A run that ends
early (``os._exit``, a crash, a time limit) prints no report. ``verdict`` (used on the
host) reads the report.

What it does not stop, as ``envs.agentic.code_repair`` says: code under test that detects
the run and special-cases it (it runs in this process and can reach anything here).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import unittest

__all__ = ["verdict"]


class _Outcomes(unittest.TestResult):
    """Every test's outcome by id: only a success passes (skips, expected failures and
    failed subtests do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.passed: list[str] = []
        self.failed: list[str] = []

    def addSuccess(self, test):
        if test.id() not in self.failed:
            self.passed.append(test.id())

    def _fail(self, test, *_):
        self.failed.append(test.id())
        if test.id() in self.passed:
            self.passed.remove(test.id())

    addFailure = addError = addSkip = addExpectedFailure = addUnexpectedSuccess = _fail

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._fail(test)


def _main(check_dir: str, modules: list[str]) -> None:
    with open(os.path.join(check_dir, "key")) as f:
        key = f.read().strip()
    shutil.rmtree(check_dir, ignore_errors=True)
    report = os.dup(1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    sys.path.insert(0, os.getcwd())  # the task's packages, as `-t .` would put them
    outcomes = _Outcomes()
    for module in modules:
        try:
            suite = unittest.defaultTestLoader.loadTestsFromName(module)
        except BaseException:  # a module that cannot be imported fails as a whole
            outcomes.failed.append(module)
            continue
        try:
            suite.run(outcomes)
        except BaseException:
            outcomes.failed.append(module)
    line = json.dumps({"passed": outcomes.passed, "failed": outcomes.failed})
    os.write(report, f"{key} {line}\n".encode())
    os._exit(0)


def verdict(output: str, key: str, modules: list[str]) -> tuple[bool, str]:
    """(passed, why) from the runner's output: passed iff its report is there, no test
    failed, and every module contributed passing tests and nothing else ran."""
    reports = [ln[len(key) + 1 :] for ln in output.splitlines() if ln.startswith(key + " ")]
    if not reports:
        return False, "the test run printed no report (it ended early, or overran a limit)"
    try:
        report = json.loads(reports[-1])
        passed, failed = list(report["passed"]), list(report["failed"])
    except (ValueError, KeyError, TypeError):
        return False, "the test run's report is malformed"
    if failed:
        return False, f"{len(failed)} test(s) failed or did not run: {failed[:5]}"
    empty = [m for m in modules if not any(t.startswith(m + ".") for t in passed)]
    if empty:
        return False, f"module(s) {empty} ran no test"
    stray = [t for t in passed if not any(t.startswith(m + ".") for m in modules)]
    if stray:
        return False, f"tests outside the task's modules ran: {stray[:5]}"
    return True, f"{len(passed)} tests passed"


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2:])

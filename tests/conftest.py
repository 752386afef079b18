"""Test-session settings: the helper modules beside the tests on the path, and no silent skips.

A skipped test checks nothing, and a skip can hide a broken import as a green run, so the session fails when any
test skips, except those marked `gpu` (which need a CUDA device and skip without one). Set VITLAB_ALLOW_SKIPS=1 to
allow skips on a machine that lacks something on purpose.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, official.py, datasets.py, checkpoints.py

_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _unexpected_skips.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == 0 and not os.environ.get("VITLAB_ALLOW_SKIPS"):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips and not os.environ.get("VITLAB_ALLOW_SKIPS"):
        terminalreporter.section("skipped tests fail the session (only `gpu` tests may skip)", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)

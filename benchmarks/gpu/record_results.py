"""pytest plugin: appends each benchmark's figures to a JSON Lines file as soon as its test ends.

pytest-benchmark writes ``--benchmark-json`` only when the session finishes; ``check.sh`` stops a
phase that overruns its time limit, and a run stopped in the middle of a benchmark writes nothing
(pytest-benchmark fails on the unfinished one). This file keeps every finished test's figures.
Each line has the fields of an entry of pytest-benchmark's ``benchmarks`` list that
``benchmarks/report.py`` reads (``name``, ``fullname``, ``group``, ``extra_info``) and the test's outcome.

Enable with ``-p record_results`` (``benchmarks/gpu`` on ``PYTHONPATH``) and
``EMBER_RECORD_JSONL=PATH``.
"""

from __future__ import annotations

import json
import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("EMBER_RECORD_JSONL")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if report.when != "call" or not path or fixture is None or not fixture.extra_info:
        return
    entry = {
        "name": fixture.name,
        "fullname": fixture.fullname,
        "group": fixture.group,
        "extra_info": fixture.extra_info,
        "outcome": report.outcome,
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")

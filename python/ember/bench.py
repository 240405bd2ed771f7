"""``ember bench``: runs a benchmark suite of Ember's source tree and prints its comparison table.

The suites, their list and the table's formatter (``benchmarks/report.py``) live in the
repository's ``benchmarks/``, not in the wheel: the suites need the test dependencies
(pytest-benchmark, transformers, datasets) and write gigabytes of scratch data. This module
only finds that directory, runs pytest on the suite's files there and hands the JSON to
``report.py``, loaded from the same directory.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

SMALL_ENV = "EMBER_BENCH_SMALL"
REPORT = "report.py"


def installed_source_roots() -> list[Path]:
    """Source trees the installed package may come from: the tree around ``ember/`` itself
    (an editable install or a checkout on ``sys.path``) and the directory pip installed from."""
    import ember

    roots = [Path(ember.__file__).resolve().parents[2]]  # <root>/python/ember/__init__.py
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        direct = distribution("ember-llm").read_text("direct_url.json")
    except (PackageNotFoundError, OSError):
        direct = None
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            roots.append(Path(unquote(urlparse(url).path)))
    return roots


def find_benchmarks_dir(cwd: Path | None = None, roots: Iterable[Path] | None = None) -> Path:
    """``benchmarks/`` of the current directory, else of the source tree Ember was installed from."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    searched = [cwd, *(installed_source_roots() if roots is None else roots)]
    for root in searched:
        candidate = root / "benchmarks"
        if (candidate / REPORT).is_file() and (candidate / "conftest.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"no benchmarks/ directory with Ember's suites in {', '.join(dict.fromkeys(str(r) for r in searched))}. "
        "The benchmark suites are not shipped in the wheel: run `ember bench` from a checkout of Ember's "
        "repository (the directory that holds benchmarks/), with the test extras installed (pip install -e '.[test]')"
    )


def load_report(bench_dir: Path) -> ModuleType:
    """``bench_dir/report.py`` as a module: the suites' list and the table's formatter."""
    path = Path(bench_dir) / REPORT
    spec = importlib.util.spec_from_file_location("ember_benchmarks_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_pytest(files: Sequence[Path], json_path: Path, *, small: bool, cwd: Path, extra_args: Sequence[str] = ()) -> int:
    """Runs the benchmark files in one pytest session with ``--benchmark-json``; returns its exit code.

    ``--benchmark-disable`` is not passed even for small sizes: pytest-benchmark writes no JSON then.
    """
    env = dict(os.environ)
    if small:
        env[SMALL_ENV] = "1"
    cmd = [
        sys.executable, "-m", "pytest", *map(str, files),
        "-p", "no:cacheprovider", "--benchmark-quiet", f"--benchmark-json={json_path}", *extra_args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode


def run_bench(suite: str, *, small: bool = False, json_path: str | Path | None = None, pytest_args: Sequence[str] = ()) -> int:
    """``ember bench``: runs ``suite`` (or ``"all"``), prints the table, writes both JSON files."""
    bench_dir = find_benchmarks_dir()
    report = load_report(bench_dir)
    files = report.suite_files(suite, bench_dir)  # names the suites when ``suite`` is not one
    if json_path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = bench_dir.parent / ".benchmarks" / f"ember-bench-{suite}-{stamp}.json"
    json_path = Path(json_path).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # a stale file must not pass for this run's
    code = run_pytest(files, json_path, small=small, cwd=bench_dir.parent, extra_args=pytest_args)
    if not json_path.is_file():
        print(f"ember bench: pytest exited with {code} and wrote no {json_path}", file=sys.stderr)
        return code or 1
    table, table_path = report.report_run(json_path, suite=suite, small=small)
    print()
    print(f"Ember benchmarks: suite {suite}{' (small sizes)' if small else ''}")
    print(table)
    print(f"pytest-benchmark JSON: {json_path}\ntable rows: {table_path}")
    if code:
        print(f"ember bench: pytest exited with {code}; the table holds what finished", file=sys.stderr)
    return code

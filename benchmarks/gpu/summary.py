"""The GPU check's closing summary: how each phase ended, the kernel tests' counts, and one
comparison table of the benchmarks (``benchmarks/report.py``'s, the table ``ember bench`` prints).
Writes it all to RESULTS_DIR/summary.json too.

Usage: python3 benchmarks/gpu/summary.py RESULTS_DIR

Each benchmark phase leaves ``NAME.json`` (pytest-benchmark, written when its session ends) and
``NAME.jsonl`` (one line per finished test, see record_results.py); the JSON is read when it
exists, else the lines, so a phase stopped by its time limit still shows what it measured.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

BENCH_PHASES = ("kernels-norm-rope", "kernels-ce", "e2e")

# The table's formatter beside the suites; standard library only, so it loads even where Ember does not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402


def read_phases(res: Path) -> list[dict]:
    path = res / "phases.tsv"
    if not path.is_file():
        return []
    phases = []
    for line in path.read_text().splitlines():
        name, rc, seconds, limit, *note = line.split("\t")
        status = {"0": "ok", "124": "TIMED OUT", "137": "KILLED (timeout)", "skip": "skipped", "budget": "NOT RUN (budget)"}.get(rc, f"FAILED (exit {rc})")
        phases.append({"phase": name, "status": status, "rc": rc, "seconds": int(seconds), "limit_s": int(limit), "note": "\t".join(note)})
    return phases


def read_tests(res: Path) -> dict | None:
    path = res / "tests-junit.xml"
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def read_benchmarks(res: Path) -> tuple[list[dict], dict[str, str]]:
    entries, sources = [], {}
    for name in BENCH_PHASES:
        full, partial = res / f"{name}.json", res / f"{name}.jsonl"
        try:
            entries += json.loads(full.read_text())["benchmarks"]
            sources[name] = full.name
            continue
        except (OSError, ValueError, KeyError):
            pass
        if partial.is_file():
            entries += [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
            sources[name] = f"{partial.name} (partial: the session did not finish)"
        else:
            sources[name] = "no results"
    return entries, sources


def main(res: Path) -> int:
    env = json.loads((res / "env.json").read_text()) if (res / "env.json").is_file() else {}
    phases, tests = read_phases(res), read_tests(res)
    entries, sources = read_benchmarks(res)
    rows = report.rows_from_benchmarks(entries)

    print("=" * 100)
    print(
        f"Ember GPU check: {env.get('device', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), "
        f"triton {env.get('triton', '?')}, ember {env.get('ember', '?')}, liger-kernel {env.get('liger-kernel') or 'not installed'}"
    )
    print(f"results: {res}")
    print()
    print(f"{'phase':<20} {'status':<20} {'seconds':>8} {'limit s':>8}  note")
    for p in phases:
        print(f"{p['phase']:<20} {p['status']:<20} {p['seconds']:>8} {p['limit_s']:>8}  {p['note']}")
    if tests is not None:
        print()
        print(
            f"kernel tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped, {tests['seconds']} s"
        )
        for name in tests["failed"][:15]:
            print(f"  FAILED {name}")
    print()
    for name, source in sources.items():
        print(f"{name}: {source}")
    print()
    print(report.format_table(rows) if rows else "no benchmark figures were recorded")
    (res / "summary.json").write_text(
        json.dumps({"env": env, "phases": phases, "tests": tests, "sources": sources, "rows": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))

"""Fixtures and reporting for the data-loader benchmarks (see benchmarks/README.md).

Sizes come from ``EMBER_BENCH_SMALL``: unset (or ``0``) runs the full-size
suite, ``1`` a smoke version with small data that exercises every code path.
All data is written under one pytest temp directory, read once so that it is
page-cached before anything is timed, and deleted at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ember.data import open_dataset
from loader_bench_common import (
    BYTES_PER_TOKEN,
    BYTES_READ_PER_TOKEN,
    BYTES_WRITTEN_PER_TOKEN,
    SEQ_LEN,
    BATCH,
    SIZES,
    SMALL,
    VOCAB,
    TokenShard,
    check_raw_writer,
    cpu_snapshot,
    raw_ember_bytes,
    read_through,
    write_shard,
)


@pytest.fixture(autouse=True)
def _wait_for_quiet_machine():
    """With EMBER_BENCH_WAIT_IDLE=<seconds>, waits (at most that long) before each test until
    other processes use under 0.25 cores, so that a shared machine does not skew the figures."""
    limit = float(os.environ.get("EMBER_BENCH_WAIT_IDLE", "0") or 0)
    deadline = time.monotonic() + limit
    while limit > 0 and time.monotonic() < deadline:
        a = cpu_snapshot()
        time.sleep(1.0)
        b = cpu_snapshot()
        other = (b["busy"] - a["busy"]) - (b["own_ticks"] - a["own_ticks"])
        if other / (b["t"] - a["t"]) < 0.25:
            break
    yield


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ember-loader-bench")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def token_shard(bench_dir) -> TokenShard:
    """One uint16 shard of random tokens in documents of 500-8,000 tokens, page-cached."""
    n = SIZES.throughput_tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, n, dtype=np.uint16)
    ends = np.cumsum(rng.integers(500, 8000, n // 500 + 1))
    ends = np.append(ends[ends < n], n)
    path = write_shard(bench_dir / "tokens.ember", tokens, ends)
    read_through(path)
    shard = TokenShard(path, n)
    # The np.memmap baselines read the shard's token array directly; check they see what ember sees.
    ds = open_dataset(path)
    assert ds.num_tokens == n
    assert np.array_equal(shard.memmap()[: ends[0]], ds[0])
    del ds
    return shard


@pytest.fixture(scope="session")
def doc_shard_factory(bench_dir):
    """``make(num_docs)``: a single shard of ``num_docs`` documents of 10-30 tokens, page-cached."""
    made: dict[int, Path] = {}

    def make(num_docs: int) -> Path:
        if num_docs not in made:
            rng = np.random.default_rng(num_docs)
            ends = np.cumsum(rng.integers(10, 31, num_docs))
            tokens = rng.integers(0, VOCAB, int(ends[-1]), dtype=np.uint16)
            path = write_shard(bench_dir / f"docs-{num_docs}.ember", tokens, ends)
            del tokens
            read_through(path)
            made[num_docs] = path
        return made[num_docs]

    return make


@pytest.fixture(scope="session")
def file_dir_factory(bench_dir):
    """``make(num_files)``: a directory of ``num_files`` shards of 1-2 documents of 10-30 tokens."""
    made: dict[int, Path] = {}
    check_raw_writer(bench_dir)

    def make(num_files: int) -> Path:
        if num_files not in made:
            d = bench_dir / f"files-{num_files}"
            d.mkdir()
            rng = np.random.default_rng(num_files)
            lens = rng.integers(10, 31, 2 * num_files)
            tokens = rng.integers(0, VOCAB, int(lens.sum()), dtype=np.uint16)
            pos = 0
            for i in range(num_files):
                docs = []
                for j in range(1 + i % 2):
                    n = int(lens[2 * i + j])
                    docs.append(tokens[pos : pos + n])
                    pos += n
                (d / f"shard-{i:06d}.ember").write_bytes(raw_ember_bytes(docs))
            read_through(d)
            made[num_files] = d
        return made[num_files]

    return make


# -- results and the summary table -----------------------------------------


@dataclass
class Report:
    throughput: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> extra_info (shared dict)
    consumer: dict[str, dict[str, Any]] = field(default_factory=dict)
    startup: dict[str, dict[str, Any]] = field(default_factory=dict)
    ceiling_key: str = "d_numpy_ceiling"

    def fill_ratios(self) -> None:
        ceiling = self.throughput.get(self.ceiling_key, {}).get("tokens_per_s")
        for info in self.throughput.values():
            if ceiling and info.get("tokens_per_s"):
                info["ratio_to_ceiling"] = round(info["tokens_per_s"] / ceiling, 3)


REPORT_KEY = pytest.StashKey[Report]()


def pytest_configure(config):
    config.stash[REPORT_KEY] = Report()


@pytest.fixture(scope="session")
def report(pytestconfig) -> Report:
    return pytestconfig.stash[REPORT_KEY]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark writes its JSON: ratios need the ceiling, which may run in any order.
    rep = session.config.stash.get(REPORT_KEY, None)
    if rep is not None:
        rep.fill_ratios()
    yield


def _fmt_mb(kb: float) -> str:
    return f"{kb / 1024:+.1f}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rep = config.stash.get(REPORT_KEY, None)
    if rep is None or not (rep.throughput or rep.consumer or rep.startup):
        return
    rep.fill_ratios()
    tr = terminalreporter
    mode = "SMOKE sizes (EMBER_BENCH_SMALL=1)" if SMALL else "full sizes"
    tr.section(f"Ember loader benchmark summary ({mode})")
    tr.write_line(
        f"seq_len {SEQ_LEN}, batch {BATCH}, uint16 -> int64, vocab {VOCAB}, page-cached data; "
        f"byte model: {BYTES_PER_TOKEN} B per token ({BYTES_READ_PER_TOKEN} B read + {BYTES_WRITTEN_PER_TOKEN} B written)"
    )
    if rep.throughput:
        tr.write_line("")
        tr.write_line(
            f"{'throughput':<50} {'Mtok/s':>9} {'GB/s read':>10} {'GB/s r+w':>9} {'x ceiling':>10} {'rounds':>7} "
            f"{'own CPU':>8} {'other CPU':>10}"
        )
        for _key, info in sorted(rep.throughput.items()):
            ratio = info.get("ratio_to_ceiling")
            tr.write_line(
                f"{info['label']:<50} {info['tokens_per_s'] / 1e6:>9.1f} {info['gb_per_s_read']:>10.2f} "
                f"{info['gb_per_s_model']:>9.2f} {'-' if ratio is None else f'{ratio:.2f}':>10} {info['rounds_measured']:>7} "
                f"{info['own_cpu_cores']:>8.2f} {info['other_cpu_cores']:>10.2f}"
            )
        tr.write_line(
            "  Mtok/s from the median round; GB/s read = 2 B/token; GB/s r+w = 10 B/token; own CPU = cores used by this "
            "process and its children (DataLoader workers) while measuring; other CPU = cores used by everything else"
        )
        noisy = [i["label"] for i in rep.throughput.values() if i["other_cpu_cores"] > 0.2]
        if noisy:
            tr.write_line(f"  WARNING: other processes used > 0.2 cores during: {'; '.join(noisy)} -- those figures are depressed")
    for info in rep.consumer.values():
        tr.write_line("")
        tr.write_line(
            f"{info['label']}: time inside next() per batch, median {info['median_us']:.1f} us, "
            f"p90 {info['p90_us']:.1f} us, p99 {info['p99_us']:.1f} us, max {info['max_us']:.1f} us "
            f"(thread CPU median {info['cpu_median_us']:.1f} us; {info['batches']} batches after "
            f"~{info['work_ms']:.1f} ms of work each; target < {info['target_us']} us: "
            f"median {'met' if info['median_us'] < info['target_us'] else 'MISSED'}, "
            f"p90 {'met' if info['p90_us'] < info['target_us'] else 'MISSED'}; other processes used "
            f"{info['other_cpu_cores']:.2f} cores meanwhile)"
        )
    if rep.startup:
        tr.write_line("")
        tr.write_line(
            f"{'start-up (shuffle=True)':<26} {'files':>8} {'docs':>10} {'tokens':>11} {'ctor ms':>9} {'1st batch ms':>13} "
            f"{'RSS MB':>8} {'anon MB':>8} {'file MB':>8} {'RSS@N MB':>9} {'Mtok/s':>8}"
        )
        for info in rep.startup.values():
            tr.write_line(
                f"{info['label']:<26} {info['num_files']:>8} {info['num_docs']:>10} {info['num_tokens']:>11} "
                f"{info['ctor_s'] * 1e3:>9.1f} {info['first_batch_s'] * 1e3:>13.1f} "
                f"{_fmt_mb(info['rss_first_kb']):>8} {_fmt_mb(info['anon_first_kb']):>8} {_fmt_mb(info['file_first_kb']):>8} "
                f"{_fmt_mb(info['rss_after_kb']):>9} {info['tokens_per_s'] / 1e6:>8.1f}"
            )
        tr.write_line(
            "  ctor = TokenLoader(...) returns; 1st batch = constructor until the first batch (median of rounds); "
            "RSS/anon/file = growth of VmRSS/RssAnon/RssFile at the first batch in a fresh process; "
            "RSS@N = VmRSS growth after the steady-state batches; Mtok/s = steady-state rate in that process"
        )

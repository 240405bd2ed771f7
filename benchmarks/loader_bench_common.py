"""Sizes, the byte model and data writers shared by the loader benchmarks (see README.md)."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.data import ShardWriter

SMALL = os.environ.get("EMBER_BENCH_SMALL", "0") not in ("", "0")

SEQ_LEN = 2048
BATCH = 8
VOCAB = 32000
# Byte model, per delivered token (one position of input_ids; labels are the
# same window shifted by one): 2 bytes of uint16 read from the shard, 8 bytes
# of int64 written.
BYTES_READ_PER_TOKEN = 2
BYTES_WRITTEN_PER_TOKEN = 8
BYTES_PER_TOKEN = BYTES_READ_PER_TOKEN + BYTES_WRITTEN_PER_TOKEN

EMBER_HEADER_LEN = 64  # docs/formats.md: tokens start at byte 64 of an Ember shard


@dataclass(frozen=True)
class Sizes:
    throughput_tokens: int  # tokens in the shard that (a)-(d) read
    batches_per_round: int
    rounds: int
    warmup_rounds: int
    consumer_rounds: int
    doc_scales: tuple[int, ...]  # documents per single-shard dataset, for (f)
    file_scales: tuple[int, ...]  # shard files per directory, for (f)
    startup_rounds: int
    rss_batches: int  # batches read after the first one in the RSS subprocess
    rss_seconds: float  # ... or until this much time has passed


FULL = Sizes(
    throughput_tokens=1 << 27,  # 134M tokens, 256 MiB: far more than the 32 MiB L3
    batches_per_round=1000,
    rounds=15,
    warmup_rounds=2,
    consumer_rounds=400,
    doc_scales=(10**5, 10**7),
    file_scales=(1_000, 100_000),
    startup_rounds=3,
    rss_batches=200,
    rss_seconds=2.0,
)
SMOKE = Sizes(
    throughput_tokens=1 << 21,  # 2M tokens, 4 MiB
    batches_per_round=20,
    rounds=2,
    warmup_rounds=1,
    consumer_rounds=20,
    doc_scales=(10**4, 10**5),
    file_scales=(100, 1_000),
    startup_rounds=1,
    rss_batches=10,
    rss_seconds=0.5,
)
SIZES = SMOKE if SMALL else FULL


def tokens_per_batch() -> int:
    return SEQ_LEN * BATCH


# -- data -------------------------------------------------------------------


def read_through(path: Path) -> int:
    """Reads a file, or every file of a directory, once so it sits in the page cache."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                n += len(chunk)
    return n


def write_shard(path: Path, tokens: np.ndarray, doc_ends: np.ndarray) -> Path:
    """One Ember shard through the public ShardWriter, documents ``tokens[prev:end]``."""
    prev = 0
    with ShardWriter(path, VOCAB) as w:
        for end in doc_ends.tolist():
            w.add_document(tokens[prev:end])
            prev = end
    return path


def raw_ember_bytes(docs: list[np.ndarray], vocab: int = VOCAB) -> bytes:
    """The bytes ShardWriter writes for ``docs`` (uint16 vocabulary), built directly.

    Used only for the 100,000-file directory: ShardWriter fsyncs every shard,
    which makes 100,000 tiny files slow to create. ``check_raw_writer`` proves
    the bytes identical to ShardWriter's before any directory is built.
    """
    toks = np.concatenate(docs).astype("<u2")
    offsets = np.zeros(len(docs) + 1, dtype="<u8")
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    header = b"EMBERTOK" + struct.pack("<IIQQQ", 1, 1, vocab, len(docs), len(toks)) + bytes(24)
    body = toks.tobytes()
    pad = -(EMBER_HEADER_LEN + len(body)) % 8
    return header + body + bytes(pad) + offsets.tobytes()


def check_raw_writer(tmp: Path) -> None:
    rng = np.random.default_rng(123)
    for ndocs in (1, 2, 3):
        docs = [rng.integers(0, VOCAB, int(rng.integers(1, 40)), dtype=np.uint16) for _ in range(ndocs)]
        p = tmp / f"check-{ndocs}.ember"
        with ShardWriter(p, VOCAB) as w:
            for d in docs:
                w.add_document(d)
        if p.read_bytes() != raw_ember_bytes(docs):
            raise AssertionError("benchmarks/conftest.py: raw_ember_bytes no longer matches ShardWriter's output")
        p.unlink()


@dataclass
class TokenShard:
    path: Path
    num_tokens: int

    def memmap(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint16, mode="r", offset=EMBER_HEADER_LEN, shape=(self.num_tokens,))


# -- how busy the machine was ---------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int | str) -> list[str]:
    out: list[str] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids = f.read().split()
        except OSError:
            continue
        for k in kids:
            out.append(k)
            out.extend(_descendants(k))
    return out


def cpu_snapshot() -> dict:
    """Machine-wide and own CPU counters, for :func:`load_between`."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    me = os.getpid()
    kids = sum(_proc_cpu_s(p) for p in _descendants(me))
    return {
        "t": time.perf_counter(),
        # user nice system irq softirq (idle, iowait excluded), clock ticks
        "busy": (v[0] + v[1] + v[2] + v[5] + v[6]) / _TICK,
        "steal": (v[7] if len(v) > 7 else 0) / _TICK,
        "own_ticks": _proc_cpu_s(me) + kids,
        "own_precise": time.process_time() + kids,
    }


MIN_LOAD_WINDOW_S = 0.2 if SMALL else 1.0


def load_between(before: dict, after: dict) -> dict:
    """CPU cores used by this process (threads and child processes) and by everything else
    between two snapshots.

    ``other_cpu_cores`` well above 0 means the figures are depressed by someone else's work
    on the 2-core machine. /proc/stat counts 10 ms ticks, so a window shorter than
    ``MIN_LOAD_WINDOW_S`` is extended by idling (see :func:`finish_load_window`).
    """
    wall = max(after["t"] - before["t"], 1e-9)
    return {
        "own_cpu_cores": (after["own_precise"] - before["own_precise"]) / wall,
        "load_window_s": wall,
    }


def finish_load_window(before: dict, measured: dict) -> dict:
    """Idles until the window is ``MIN_LOAD_WINDOW_S`` long, then adds ``other_cpu_cores``."""
    left = MIN_LOAD_WINDOW_S - (time.perf_counter() - before["t"])
    if left > 0:
        time.sleep(left)
    after = cpu_snapshot()
    wall = after["t"] - before["t"]
    other = (after["busy"] - before["busy"]) - (after["own_ticks"] - before["own_ticks"])
    return {
        **measured,
        "other_cpu_cores": max(0.0, other) / wall,
        "steal_cores": (after["steal"] - before["steal"]) / wall,
        "loadavg_1m": os.getloadavg()[0],
    }

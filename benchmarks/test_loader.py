"""Data-loader benchmarks: TokenLoader against common alternatives and a copy ceiling.

Run (see benchmarks/README.md)::

    pytest benchmarks/test_loader.py --benchmark-json=/tmp/loader_bench.json   # full size, a few minutes
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_loader.py --benchmark-disable    # smoke, < 60 s

(a)-(d) tokens/s at seq_len 2048, batch 8 from one page-cached uint16 shard,
(a'') with and without the vocabulary check, in alternating rounds;
(e) the consumer thread's cost per batch; (f) start-up time and memory against
the number of documents and of shard files. Every figure lands in
``benchmark.extra_info`` and in a table printed at the end of the session.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info

from loader_bench_common import (  # benchmarks/ is on sys.path when pytest collects it
    BATCH,
    BYTES_PER_TOKEN,
    BYTES_READ_PER_TOKEN,
    EMBER_HEADER_LEN,
    SEQ_LEN,
    SIZES,
    SMALL,
    VOCAB,
    TokenShard,
    cpu_snapshot,
    finish_load_window,
    load_between,
    tokens_per_batch,
)
from ember.data import ShardFormatError, TokenLoader, open_dataset

pytestmark = [] if SMALL else [pytest.mark.slow]

L = SEQ_LEN
B = BATCH


# -- helpers -----------------------------------------------------------------


def touch_pages(a: np.ndarray) -> None:
    """Faults in every page of a mapping once (the data is page-cached; this sets up page tables)."""
    step = max(1, 4096 // a.itemsize)
    int(a[::step].max())


def throughput_info(label: str, times: list[float], cpu: list[float], load: dict, **extra) -> dict:
    """The figures of ``times`` (seconds per round of ``SIZES.batches_per_round`` batches, the
    measured rounds only) and ``cpu`` (this process's CPU seconds in each): tokens/s from the
    median round."""
    med = statistics.median(times)
    tokens = SIZES.batches_per_round * tokens_per_batch()
    tps = tokens / med
    return dict(
        label=label,
        seq_len=L,
        batch_size=B,
        batches_per_round=SIZES.batches_per_round,
        tokens_per_round=tokens,
        rounds_measured=len(times),
        round_s_median=med,
        tokens_per_s=tps,
        tokens_per_s_best=tokens / min(times),
        gb_per_s_read=tps * BYTES_READ_PER_TOKEN / 1e9,
        gb_per_s_model=tps * BYTES_PER_TOKEN / 1e9,
        bytes_per_token_model=BYTES_PER_TOKEN,
        # CPU of this process (threads included, DataLoader worker processes not) per wall second.
        process_cpu_per_wall=sum(cpu) / sum(times),
        dataset_tokens=SIZES.throughput_tokens,
        **load,
        **extra,
    )


def measure_throughput(benchmark, report, key: str, label: str, next_batch: Callable[[], object], **extra) -> dict:
    """Times rounds of ``SIZES.batches_per_round`` calls of ``next_batch`` with ``benchmark.pedantic``.

    Each round also times itself, so the figures exist under ``--benchmark-disable`` too.
    tokens/s comes from the median round.
    """
    nb = SIZES.batches_per_round
    times: list[float] = []
    cpu: list[float] = []

    def one_round():
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(nb):
            next_batch()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)

    snap = cpu_snapshot()
    benchmark.pedantic(one_round, rounds=SIZES.rounds, warmup_rounds=SIZES.warmup_rounds, iterations=1)
    load = finish_load_window(snap, load_between(snap, cpu_snapshot()))
    info = benchmark.extra_info
    info.update(throughput_info(label, times[-SIZES.rounds :], cpu[-SIZES.rounds :], load, **extra))
    report.throughput[key] = info
    report.fill_ratios()
    return info


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.shape == (B, L) and y.shape == (B, L)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB


# -- (d) the ceiling ----------------------------------------------------------


@pytest.mark.benchmark(group="throughput")
def test_d_numpy_ceiling(benchmark, report, token_shard: TokenShard):
    """One core, NumPy: widen random (L+1)-token windows into one preallocated int64 (B, L+1) buffer."""
    data = token_shard.memmap()
    touch_pages(data)
    out = np.empty((B, L + 1), dtype=np.int64)
    rng = np.random.default_rng(1)
    hi = len(data) - (L + 1)
    offsets: list[int] = []

    def next_batch():
        if not offsets:
            offsets.extend(rng.integers(0, hi, 64 * B).tolist())
        for b in range(B):
            o = offsets.pop()
            out[b] = data[o : o + L + 1]
        return out

    measure_throughput(benchmark, report, "d_numpy_ceiling", "(d) NumPy widening copy, 1 core (ceiling)", next_batch)
    check_batch(torch.from_numpy(out[:, :-1]), torch.from_numpy(out[:, 1:]))


@pytest.mark.benchmark(group="throughput")
def test_d_numpy_block_reference(benchmark, report, token_shard: TokenShard):
    """Not a baseline: one contiguous B*(L+1)-token block per batch, one NumPy call. The gap to (d)
    is NumPy's per-window overhead; this is close to what one core's memory system allows."""
    data = token_shard.memmap()
    touch_pages(data)
    n = B * (L + 1)
    out = np.empty((B, L + 1), dtype=np.int64)
    flat = out.reshape(-1)
    rng = np.random.default_rng(4)
    offsets: list[int] = []

    def next_batch():
        if not offsets:
            offsets.extend(rng.integers(0, len(data) - n, 512).tolist())
        o = offsets.pop()
        flat[:] = data[o : o + n]
        return out

    measure_throughput(benchmark, report, "d_numpy_block", "(d') NumPy widening copy, 1 block/batch, 1 core", next_batch)


# -- (a) TokenLoader ------------------------------------------------------------


def _warm_token_loader(it, token_shard: TokenShard) -> dict:
    """One epoch of batches: every page of the shard gets mapped once, as in a long run."""
    batches = max(1, (token_shard.num_tokens - 1) // L // B)
    batch = None
    for _ in range(batches):
        batch = next(it)
    return batch


def _check_token_loader_batch(batch: dict, token_shard: TokenShard) -> None:
    x, y = batch["input_ids"], batch["labels"]
    check_batch(x, y)
    # Row 0 is the window of sample k for some k: tokens k*L .. k*L+L.
    data = token_shard.memmap()
    starts = np.asarray(data[: (len(data) - 1) // L * L : L])
    row = x[0].numpy()
    for k in np.flatnonzero(starts == row[0]):
        if np.array_equal(data[k * L : k * L + L], row) and data[k * L + L] == int(y[0, -1]):
            return
    raise AssertionError("a TokenLoader row is not a seq_len-strided window of the shard")


@pytest.mark.benchmark(group="throughput")
def test_a_token_loader(benchmark, report, token_shard: TokenShard):
    """TokenLoader, shuffle=True, default num_threads and prefetch."""
    loader = TokenLoader(token_shard.path, L, B, shuffle=True, seed=0)
    it = iter(loader)
    batch = _warm_token_loader(it, token_shard)
    _check_token_loader_batch(batch, token_shard)
    measure_throughput(
        benchmark, report, "a_token_loader", "(a) TokenLoader (defaults: 2 threads, prefetch 8)", lambda: next(it), num_threads=2, prefetch=8
    )
    loader.close()
    del it, loader, batch
    gc.collect()


@pytest.mark.benchmark(group="throughput-tokenloader-settings")
@pytest.mark.parametrize(("num_threads", "prefetch"), [(1, 4), (4, 4), (2, 16)])
def test_a_token_loader_settings(benchmark, report, token_shard: TokenShard, num_threads: int, prefetch: int):
    """The same as (a) with other num_threads / prefetch, to see what limits the loader."""
    loader = TokenLoader(token_shard.path, L, B, shuffle=True, seed=0, num_threads=num_threads, prefetch=prefetch)
    it = iter(loader)
    _warm_token_loader(it, token_shard)
    key = f"a_token_loader_t{num_threads}_p{prefetch}"
    label = f"(a') TokenLoader {num_threads} thread{'s' if num_threads > 1 else ''}, prefetch {prefetch}"
    measure_throughput(benchmark, report, key, label, lambda: next(it), num_threads=num_threads, prefetch=prefetch)
    loader.close()
    del it, loader
    gc.collect()


VOCAB_CHECK_VARIANTS = {
    "off": ("(a'') TokenLoader, vocab_size unset (same rounds)", None),
    "off_again": ("(a'') TokenLoader, vocab_size unset, a 2nd loader", None),
    "on": (f"(a'') TokenLoader, vocab_size={VOCAB} checked", VOCAB),
}


@pytest.mark.benchmark(group="throughput-vocab-check")
def test_a_token_loader_vocab_check(benchmark, report, token_shard: TokenShard):
    """(a) with ``vocab_size`` (every id checked while Rust fills the batch) against (a)
    without, in rounds that rotate over the loaders so that all see the same machine. A
    second unchecked loader gives the noise floor: how far two identical loaders differ.
    Besides tokens/s it reports the process's CPU time per batch, which other processes
    on a shared machine disturb less than wall time. Rounds are short, so it takes 4x as many."""
    control = TokenLoader(token_shard.path, L, B, shuffle=True, seed=0, vocab_size=VOCAB // 2)
    with pytest.raises(ShardFormatError, match="outside the vocabulary"):  # the check is on: half the ids fail it
        next(control)
    control.close()
    its = {key: iter(TokenLoader(token_shard.path, L, B, shuffle=True, seed=0, vocab_size=v)) for key, (_, v) in VOCAB_CHECK_VARIANTS.items()}
    for it in its.values():
        _check_token_loader_batch(_warm_token_loader(it, token_shard), token_shard)
    keys = list(its)
    nb, rounds = SIZES.batches_per_round, 4 * SIZES.rounds
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}

    def one_round():
        # Rotate which goes first, so that none always follows the same other.
        first = len(times[keys[0]]) % len(keys)
        for key in keys[first:] + keys[:first]:
            it = its[key]
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(nb):
                next(it)
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)

    snap = cpu_snapshot()
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=SIZES.warmup_rounds, iterations=1)
    load = finish_load_window(snap, load_between(snap, cpu_snapshot()))
    infos = {}
    for key, (label, vocab_size) in VOCAB_CHECK_VARIANTS.items():
        t, c = times[key][-rounds:], cpu[key][-rounds:]
        infos[key] = throughput_info(label, t, c, load, vocab_size=vocab_size, cpu_us_per_batch=statistics.median(c) / nb * 1e6)
        report.throughput[f"a_token_loader_vocab_{key}"] = infos[key]
    report.fill_ratios()
    off = infos["off"]
    extra = dict(label="(a'') TokenLoader, vocab_size check on / off", other_cpu_cores=load["other_cpu_cores"])
    for key in keys:
        extra[f"tokens_per_s_{key}"] = infos[key]["tokens_per_s"]
        extra[f"cpu_us_per_batch_{key}"] = infos[key]["cpu_us_per_batch"]
    for key in ("on", "off_again"):
        extra[f"{key}_over_off"] = infos[key]["tokens_per_s"] / off["tokens_per_s"]
        extra[f"cpu_{key}_over_off"] = infos[key]["cpu_us_per_batch"] / off["cpu_us_per_batch"]
    benchmark.extra_info.update(extra)
    for it in its.values():
        it.close()
    del its, control
    gc.collect()


# -- (b) np.memmap + torch DataLoader ----------------------------------------------


class WindowDataset(Dataset):
    """Map-style: item i is the (L+1)-token window at offset i, widened to int64 and split."""

    def __init__(self, path: str, num_tokens: int):
        self.path = path
        self.num_tokens = num_tokens
        self.data: np.memmap | None = None  # opened in each worker, never pickled

    def open(self) -> np.memmap:
        if self.data is None:
            self.data = np.memmap(self.path, dtype=np.uint16, mode="r", offset=EMBER_HEADER_LEN, shape=(self.num_tokens,))
        return self.data

    def __len__(self) -> int:
        return self.num_tokens - (L + 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.open()[i : i + L + 1].astype(np.int64))
        return {"input_ids": w[:-1], "labels": w[1:]}


def _worker_init(_worker_id: int) -> None:
    touch_pages(get_worker_info().dataset.open())


@pytest.mark.benchmark(group="throughput")
def test_b_memmap_dataloader(benchmark, report, token_shard: TokenShard):
    """torch DataLoader, 2 worker processes, random windows (RandomSampler with replacement), default collate."""
    ds = WindowDataset(str(token_shard.path), token_shard.num_tokens)
    sampler = RandomSampler(ds, replacement=True, num_samples=1 << 62, generator=torch.Generator().manual_seed(2))
    dl = DataLoader(ds, batch_size=B, sampler=sampler, num_workers=2, persistent_workers=True, worker_init_fn=_worker_init, pin_memory=False)
    it = iter(dl)
    batch = next(it)
    check_batch(batch["input_ids"], batch["labels"])
    measure_throughput(
        benchmark, report, "b_memmap_dataloader", "(b) np.memmap + DataLoader, 2 workers", lambda: next(it), num_workers=2, prefetch_factor=2
    )
    del it, dl
    gc.collect()


# -- (c) nanoGPT's get_batch ------------------------------------------------------


@pytest.mark.benchmark(group="throughput")
@pytest.mark.parametrize("memmap_per_batch", [True, False], ids=["memmap-per-batch", "memmap-once"])
def test_c_nanogpt(benchmark, report, token_shard: TokenShard, memmap_per_batch: bool):
    """nanoGPT's train.py get_batch, in process. nanoGPT re-creates the np.memmap on every
    call (to dodge a memory leak); the memmap-once variant opens it once and pre-faults it."""
    torch.manual_seed(3)
    path, n = token_shard.path, token_shard.num_tokens
    once = token_shard.memmap()
    touch_pages(once)

    def get_batch():
        data = np.memmap(path, dtype=np.uint16, mode="r", offset=EMBER_HEADER_LEN, shape=(n,)) if memmap_per_batch else once
        ix = torch.randint(len(data) - L, (B,))
        x = torch.stack([torch.from_numpy((data[i : i + L]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + L]).astype(np.int64)) for i in ix])
        return x, y

    check_batch(*get_batch())
    key = "c_nanogpt" if memmap_per_batch else "c_nanogpt_memmap_once"
    label = "(c) nanoGPT get_batch (memmap per batch)" if memmap_per_batch else "(c') nanoGPT get_batch, memmap opened once"
    measure_throughput(benchmark, report, key, label, get_batch)


# -- (e) consumer-thread cost ------------------------------------------------------


def _calibrated_work(target_s: float = 0.003) -> tuple[Callable[[], None], float]:
    """A single-threaded torch matmul loop that takes about ``target_s``."""
    a = torch.randn(384, 384)
    for _ in range(3):
        a @ a
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    per = (time.perf_counter() - t) / 10
    reps = max(1, round(target_s / per))

    def work():
        for _ in range(reps):
            a @ a

    t = time.perf_counter()
    work()
    return work, time.perf_counter() - t


@pytest.mark.benchmark(group="consumer")
def test_e_consumer_cost(benchmark, report, token_shard: TokenShard):
    """Time spent inside next(it) when the training step (~3 ms of matmul) leaves the loader time to keep up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the step uses one core; the loader's threads get the other
    try:
        work, work_s = _calibrated_work()
        loader = TokenLoader(token_shard.path, L, B, shuffle=True, seed=0)
        it = iter(loader)
        _warm_token_loader(it, token_shard)
        wall: list[int] = []
        cpu: list[int] = []

        def consume():
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            batch = next(it)
            wall.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
            return batch

        snap = cpu_snapshot()
        batch = benchmark.pedantic(consume, setup=work, rounds=SIZES.consumer_rounds, warmup_rounds=10, iterations=1)
        load = finish_load_window(snap, load_between(snap, cpu_snapshot()))
        check_batch(batch["input_ids"], batch["labels"])
        loader.close()
        del it, loader, batch
        gc.collect()
    finally:
        torch.set_num_threads(threads)
    w = np.asarray(wall[-SIZES.consumer_rounds :]) / 1e3
    c = np.asarray(cpu[-SIZES.consumer_rounds :]) / 1e3
    info = benchmark.extra_info
    info.update(
        label="(e) TokenLoader consumer cost",
        work_ms=work_s * 1e3,
        batches=len(w),
        median_us=float(np.median(w)),
        p90_us=float(np.percentile(w, 90)),
        p99_us=float(np.percentile(w, 99)),
        max_us=float(w.max()),
        mean_us=float(w.mean()),
        cpu_median_us=float(np.median(c)),
        frac_over_target=float((w >= 20).mean()),
        target_us=20,
        **load,
    )
    report.consumer["e"] = info


# -- (f) start-up time and memory ----------------------------------------------------

RSS_SCRIPT = r"""
import json, sys, time
import torch
from ember.data import ShardFormatError, TokenLoader, open_dataset

def mem():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0])
    return out

path, seq_len, batch, max_batches, max_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
torch.empty(seq_len * batch, dtype=torch.int64).fill_(0)  # the allocator's first arena is not the loader's
m0 = mem()
t0 = time.perf_counter()
loader = TokenLoader(path, seq_len, batch, shuffle=True, seed=0)
t1 = time.perf_counter()
it = iter(loader)
b = next(it)
t2 = time.perf_counter()
m1 = mem()
n = 0
t3 = time.perf_counter()
while n < max_batches and time.perf_counter() - t3 < max_s:
    b = next(it)
    n += 1
t4 = time.perf_counter()
m2 = mem()
assert b["input_ids"].shape == (batch, seq_len)
print(json.dumps({"ctor_s": t1 - t0, "first_batch_s": t2 - t0, "m0": m0, "m1": m1, "m2": m2,
                  "batches": n, "tokens_per_s": n * seq_len * batch / max(t4 - t3, 1e-9)}))
"""


def _startup_once(path) -> tuple[float, float]:
    t0 = time.perf_counter()
    loader = TokenLoader(path, L, B, shuffle=True, seed=0)
    t1 = time.perf_counter()
    batch = next(iter(loader))
    t2 = time.perf_counter()
    assert batch["input_ids"].shape == (B, L)
    loader.close()
    return t1 - t0, t2 - t0


def _measure_startup(benchmark, report, key: str, label: str, path, num_files: int, num_docs: int) -> None:
    ctor: list[float] = []
    first: list[float] = []

    def one():
        c, f = _startup_once(path)
        ctor.append(c)
        first.append(f)

    benchmark.pedantic(
        one, teardown=gc.collect, rounds=SIZES.startup_rounds, warmup_rounds=1 if not SMALL else 0, iterations=1
    )
    ctor_m, first_m = ctor[-SIZES.startup_rounds :], first[-SIZES.startup_rounds :]
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), str(L), str(B), str(SIZES.rss_batches), str(SIZES.rss_seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    m0, m1, m2 = r["m0"], r["m1"], r["m2"]
    num_tokens = open_dataset(path).num_tokens
    info = benchmark.extra_info
    info.update(
        label=label,
        num_files=num_files,
        num_docs=num_docs,
        num_tokens=num_tokens,
        ctor_s=statistics.median(ctor_m),
        first_batch_s=statistics.median(first_m),
        first_batch_s_all=first_m,
        ctor_s_fresh_process=r["ctor_s"],
        first_batch_s_fresh_process=r["first_batch_s"],
        rss_first_kb=m1["VmRSS"] - m0["VmRSS"],
        anon_first_kb=m1["RssAnon"] - m0["RssAnon"],
        file_first_kb=m1["RssFile"] - m0["RssFile"],
        rss_after_kb=m2["VmRSS"] - m0["VmRSS"],
        anon_after_kb=m2["RssAnon"] - m0["RssAnon"],
        hwm_growth_kb=m2["VmHWM"] - m0["VmRSS"],
        steady_batches=r["batches"],
        tokens_per_s=r["tokens_per_s"],
    )
    report.startup[key] = info


@pytest.mark.benchmark(group="startup")
@pytest.mark.parametrize("num_docs", SIZES.doc_scales, ids=lambda n: f"docs{n:.0e}".replace("+0", ""))
def test_f_startup_docs(benchmark, report, doc_shard_factory, num_docs: int):
    """One shard of ``num_docs`` documents of 10-30 tokens."""
    path = doc_shard_factory(num_docs)
    _measure_startup(benchmark, report, f"docs-{num_docs}", f"1 shard, {num_docs:,} docs", path, 1, num_docs)


@pytest.mark.benchmark(group="startup")
@pytest.mark.parametrize("num_files", SIZES.file_scales, ids=lambda n: f"files{n}")
def test_f_startup_files(benchmark, report, file_dir_factory, num_files: int):
    """A directory of ``num_files`` shards of 1-2 documents of 10-30 tokens each."""
    d = file_dir_factory(num_files)
    num_docs = sum(1 + i % 2 for i in range(num_files))
    _measure_startup(benchmark, report, f"files-{num_files}", f"dir of {num_files:,} shards", d, num_files, num_docs)

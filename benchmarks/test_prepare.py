"""``ember prepare`` against the tokenizer's own ceiling and the usual ``datasets`` pipeline.

Run (figures and what limits them: docs/prepare.md, "Performance")::

    pytest benchmarks/test_prepare.py --benchmark-json=/tmp/prepare_bench.json   # full size, ~5 minutes idle
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_prepare.py --benchmark-disable    # smoke, < 60 s

One corpus, one tokenizer, three ways to turn it into token ids:

(a) ceiling: ``Tokenizer.encode_batch(texts)`` over the texts already in memory, on
    the library's own thread pool (every core). (a') the same with
    ``encode_batch_fast`` (no character offsets), which is what ``ember prepare`` calls.
(a'') Ember's native byte-level BPE (``ember._native.BpeEncoder``, what ``ember
    prepare`` uses for this tokenizer) over the texts in memory, one thread per core:
    the ceiling of ``ember prepare``'s own pipeline.
(b) ``ember.data.prepare``: read the JSONL file, tokenize, write shards + manifest.
(c) Hugging Face ``datasets``: ``load_dataset("json")``, ``map(batched=True,
    num_proc=2)`` with the tokenizer behind ``transformers``' fast-tokenizer class,
    then nanoGPT's write of one uint16 array (plus document lengths), in a fresh process.

Byte model: MB/s = UTF-8 bytes of document text / wall time (the JSONL file is
larger, by its quoting). All three must give the same tokens; the test asserts it.
The corpus is the standard library's source repeated (full: ~63 MB), one document
per file; the tokenizer a byte-level BPE with a 32,000 vocabulary trained here,
adding <s> ... </s> around each document through its post-processor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pytest

from ember.data import open_dataset, prepare
from ember.data.corpus import stdlib_texts

SMALL = os.environ.get("EMBER_BENCH_SMALL", "0") not in ("", "0")


@dataclass(frozen=True)
class Sizes:
    corpus_bytes: int  # document text in the corpus (the stdlib repeated as needed)
    train_bytes: int  # text the BPE is trained on
    rounds: int
    datasets_rounds: int


FULL = Sizes(corpus_bytes=60 << 20, train_bytes=8 << 20, rounds=3, datasets_rounds=2)
SMOKE = Sizes(corpus_bytes=2 << 20, train_bytes=1 << 20, rounds=1, datasets_rounds=1)
SIZES = SMOKE if SMALL else FULL
VOCAB = 32_000
NUM_PROC = 2  # datasets' map: one process per core of the 2-core machine the figures come from
TARGET_CEILING_RATIO = 0.9
TARGET_DATASETS_SPEEDUP = 2.0

pytestmark = [] if SMALL else [pytest.mark.slow]


@dataclass
class Corpus:
    path: Path  # JSONL, one {"text": ...} per line
    texts: list[str]
    text_bytes: int


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ember-prepare-bench")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(work_dir) -> Corpus:
    stdlib = [t for t in stdlib_texts() if t.strip()]
    texts: list[str] = []
    size = 0
    while size < SIZES.corpus_bytes:
        for t in stdlib:
            texts.append(t)
            size += len(t.encode())
            if size >= SIZES.corpus_bytes:
                break
    path = work_dir / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    path.read_bytes()  # page-cached before anything is timed
    return Corpus(path, texts, size)


@pytest.fixture(scope="module")
def tokenizer_dir(work_dir, corpus) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    sample, size = [], 0
    for t in corpus.texts:
        sample.append(t)
        size += len(t)
        if size >= SIZES.train_bytes:
            break
    tok.train_from_iterator(sample, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    d = work_dir / "bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_dir) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's own ids for the corpus, flattened, and each document's length (untimed)."""
    from tokenizers import Tokenizer

    ids = [e.ids for e in Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode_batch(corpus.texts)]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths


# -- the report -------------------------------------------------------------------------------

RESULTS: dict[str, dict] = {}
LABELS = {
    "a_ceiling": "(a) ceiling: Tokenizer.encode_batch, in memory",
    "a_ceiling_fast": "(a') ceiling: Tokenizer.encode_batch_fast, in memory",
    "a_native": "(a'') Ember native BPE, in memory, 1 thread/core",
    "b_ember": "(b) ember prepare (JSONL -> shards)",
    "c_datasets": f"(c) datasets load_dataset+map(num_proc={NUM_PROC})+np",
}


def _cpu() -> tuple[float, float]:
    """(CPU seconds of this process and its waited-for children, busy CPU seconds of the machine)."""
    t = os.times()
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq
    return t.user + t.system + t.children_user + t.children_system, busy


def wait_for_quiet_machine() -> None:
    """With EMBER_BENCH_WAIT_IDLE=<seconds>, waits (at most that long) before a round until
    other processes use under 0.25 cores (conftest.py does the same before each test; rounds
    here are long enough for a neighbour to start in between)."""
    limit = float(os.environ.get("EMBER_BENCH_WAIT_IDLE", "0") or 0)
    deadline = time.monotonic() + limit
    while limit > 0 and time.monotonic() < deadline:
        (own0, busy0), t0 = _cpu(), time.perf_counter()
        time.sleep(1.0)
        (own1, busy1), t1 = _cpu(), time.perf_counter()
        if ((busy1 - busy0) - (own1 - own0)) / (t1 - t0) < 0.25:
            return


class Rounds:
    """Wall time, own CPU and everybody else's CPU of each timed round."""

    def __init__(self):
        self.seconds: list[float] = []
        self.own: list[float] = []
        self.other: list[float] = []

    def time(self, fn, *args, **kwargs):
        (own0, busy0), t0 = _cpu(), time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t0
        own1, busy1 = _cpu()
        self.add(wall, own1 - own0, busy1 - busy0)
        return result

    def add(self, wall: float, own: float, busy: float) -> None:
        self.seconds.append(wall)
        self.own.append(own / wall)
        self.other.append(max(0.0, busy - own) / wall)


def record(benchmark, key: str, rounds: Rounds, corpus: Corpus, **extra) -> dict:
    i = int(np.argsort(rounds.seconds)[len(rounds.seconds) // 2])  # the median round
    median = rounds.seconds[i]
    info = {
        "label": LABELS[key],
        "mb_per_s": corpus.text_bytes / median / 1e6,
        "seconds": median,
        "rounds": len(rounds.seconds),
        "own_cpu_cores": rounds.own[i],
        "other_cpu_cores": rounds.other[i],
        "text_bytes": corpus.text_bytes,
        "documents": len(corpus.texts),
        **extra,
    }
    benchmark.extra_info.update(info)
    RESULTS[key] = info
    return info


class _SummaryPlugin:
    """Prints the summary table at the end of the session (registered by the fixture below,
    since hooks cannot live in a test module and benchmarks/conftest.py is the loader's)."""

    def pytest_terminal_summary(self, terminalreporter):
        if RESULTS:
            write_summary(terminalreporter)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    if not request.config.pluginmanager.has_plugin("ember-prepare-summary"):
        request.config.pluginmanager.register(_SummaryPlugin(), "ember-prepare-summary")
    yield


def write_summary(tr) -> None:
    mode = "SMOKE sizes (EMBER_BENCH_SMALL=1)" if SMALL else "full sizes"
    tr.section(f"ember prepare benchmark summary ({mode})")
    some = next(iter(RESULTS.values()))
    tr.write_line(
        f"{some['documents']:,} documents, {some['text_bytes'] / 1e6:,.1f} MB of text (the stdlib repeated), "
        f"byte-level BPE vocab {VOCAB:,}, {os.cpu_count()} cores; MB/s = text bytes / wall time (median round)"
    )
    header = ("method", "MB/s", "s", "own CPU", "CPU s/MB", "other CPU", "vs (a)", "vs (a')", "vs (a'')", "rounds")
    tr.write_line(
        f"{header[0]:<56} {header[1]:>7} {header[2]:>7} {header[3]:>8} {header[4]:>9} {header[5]:>10} {header[6]:>7} "
        f"{header[7]:>8} {header[8]:>8} {header[9]:>7}"
    )
    for key in sorted(RESULTS):
        info = RESULTS[key]
        ratios = [
            f"{info['mb_per_s'] / RESULTS[c]['mb_per_s']:.2f}" if c in RESULTS else "-" for c in ("a_ceiling", "a_ceiling_fast", "a_native")
        ]
        cpu_per_mb = info["own_cpu_cores"] * info["seconds"] / (info["text_bytes"] / 1e6)
        tr.write_line(
            f"{info['label']:<56} {info['mb_per_s']:>7.2f} {info['seconds']:>7.2f} {info['own_cpu_cores']:>8.2f} "
            f"{cpu_per_mb:>9.3f} {info['other_cpu_cores']:>10.2f} {ratios[0]:>7} {ratios[1]:>8} {ratios[2]:>8} {info['rounds']:>7}"
        )
    tr.write_line(
        "  own CPU = cores used by the method (its process and child processes); CPU s/MB = its CPU time per MB of text; "
        "other CPU = cores used by everything else meanwhile"
    )
    noisy = [i["label"] for i in RESULTS.values() if i["other_cpu_cores"] > 0.2]
    if noisy:
        tr.write_line(f"  WARNING: other processes used > 0.2 cores during: {'; '.join(noisy)} -- those figures are depressed")
    if {"b_ember", "a_ceiling", "c_datasets"} <= set(RESULTS):
        e, a, c = RESULTS["b_ember"], RESULTS["a_ceiling"], RESULTS["c_datasets"]
        r_a, r_c = e["mb_per_s"] / a["mb_per_s"], e["mb_per_s"] / c["mb_per_s"]
        tr.write_line(
            f"targets: ember >= {TARGET_CEILING_RATIO:.0%} of (a): {r_a:.0%} {'met' if r_a >= TARGET_CEILING_RATIO else 'MISSED'}; "
            f"ember >= {TARGET_DATASETS_SPEEDUP:.0f}x (c): {r_c:.2f}x {'met' if r_c >= TARGET_DATASETS_SPEEDUP else 'MISSED'}"
            + ("  (smoke sizes: not meaningful)" if SMALL else "")
        )
    if {"b_ember", "a_native"} <= set(RESULTS):
        r = RESULTS["b_ember"]["mb_per_s"] / RESULTS["a_native"]["mb_per_s"]
        tr.write_line(f"ember prepare runs at {r:.0%} of its own encoder over the same texts in memory (a'')")
    tr.write_line(f"tokens: {', '.join(sorted(RESULTS))} gave the same token stream as the tokenizer (asserted)")


# -- (a) the tokenizer's own ceiling ----------------------------------------------------------


@pytest.mark.parametrize("method", ["encode_batch", "encode_batch_fast"])
def test_ceiling_tokenizer_in_memory(benchmark, corpus, tokenizer_dir, reference, method):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    encode = getattr(tok, method)
    encode(corpus.texts[:50])  # thread pool started
    rounds, out = Rounds(), {}

    def one_round():
        out["encodings"] = rounds.time(encode, corpus.texts)

    def setup():
        out.clear()  # the previous round's encodings (several GB at full size) go first
        wait_for_quiet_machine()

    benchmark.pedantic(one_round, setup=setup, rounds=SIZES.rounds, iterations=1)
    ids = [e.ids for e in out["encodings"]]
    flat, lengths = reference
    assert np.array_equal(np.fromiter(map(len, ids), np.int64, len(ids)), lengths)
    assert np.array_equal(np.fromiter(chain.from_iterable(ids), np.int64, len(flat)), flat)
    record(benchmark, "a_ceiling" if method == "encode_batch" else "a_ceiling_fast", rounds, corpus)


def test_native_encoder_in_memory(benchmark, corpus, tokenizer_dir, reference):
    from concurrent.futures import ThreadPoolExecutor

    from ember.data.encoders import HFEncoder

    encoder = HFEncoder(str(tokenizer_dir))
    assert encoder.engine == "native", encoder.engine_note
    workers = os.cpu_count() or 1
    chunks = [corpus.texts[i::workers] for i in range(workers)]  # as even as the documents allow
    rounds, out = Rounds(), {}

    def encode_all():
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(encoder.encode_batch, chunks))

    def one_round():
        out["parts"] = rounds.time(encode_all)

    def setup():
        out.clear()
        wait_for_quiet_machine()

    benchmark.pedantic(one_round, setup=setup, rounds=SIZES.rounds, iterations=1)
    flat, lengths = reference
    got_lengths = np.empty(len(corpus.texts), np.int64)
    pieces: list = [None] * len(corpus.texts)
    for i, (tokens, lens) in enumerate(out["parts"]):
        got_lengths[i::workers] = lens
        for j, piece in zip(range(i, len(corpus.texts), workers), np.split(tokens, np.cumsum(lens)[:-1])):
            pieces[j] = piece
    assert np.array_equal(got_lengths, lengths)
    assert np.array_equal(np.concatenate(pieces), flat)
    record(benchmark, "a_native", rounds, corpus, workers=workers)


# -- (b) ember prepare ------------------------------------------------------------------------


def test_ember_prepare(benchmark, corpus, tokenizer_dir, reference, work_dir):
    out = work_dir / "ember-out"
    rounds, manifests = Rounds(), []

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        wait_for_quiet_machine()

    def one_round():
        manifests.append(rounds.time(prepare, corpus.path, out, tokenizer=tokenizer_dir, progress=False))

    benchmark.pedantic(one_round, setup=setup, rounds=SIZES.rounds, iterations=1)
    ds = open_dataset(out / "train")
    flat, lengths = reference
    assert np.array_equal(np.array([len(ds[i]) for i in range(len(ds))], np.int64), lengths)
    assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64), flat)
    m = manifests[-1]
    assert m["totals"]["text_bytes"] == corpus.text_bytes and m["totals"]["tokens"] == len(flat)
    record(benchmark, "b_ember", rounds, corpus, workers=os.cpu_count(), tokens=int(len(flat)))


# -- (c) Hugging Face datasets ----------------------------------------------------------------

DATASETS_PIPELINE = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    corpus, tokenizer_file, work, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token="<s>", eos_token="</s>")

    def process(batch):
        ids = tok(batch["text"])["input_ids"]
        return {"ids": ids, "len": [len(x) for x in ids]}

    def cpu():
        t = os.times()
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return t.user + t.system + t.children_user + t.children_system, (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")

    (own0, busy0), t0 = cpu(), time.perf_counter()
    ds = load_dataset("json", data_files=corpus, split="train", cache_dir=os.path.join(work, "hf-cache"))
    tokenized = ds.map(process, batched=True, num_proc=num_proc, remove_columns=["text"])
    # nanoGPT's write: one uint16 memmap filled in contiguous chunks, plus the document lengths.
    lengths = np.asarray(tokenized["len"], dtype=np.int64)
    arr = np.memmap(os.path.join(work, "tokens.bin"), dtype=np.uint16, mode="w+", shape=(int(lengths.sum()),))
    idx, chunks = 0, 16
    for i in range(chunks):
        part = tokenized.shard(num_shards=chunks, index=i, contiguous=True).with_format("numpy")
        block = np.concatenate(part["ids"]) if len(part) else np.empty(0, np.uint16)
        arr[idx : idx + len(block)] = block
        idx += len(block)
    arr.flush()
    np.save(os.path.join(work, "lengths.npy"), lengths)
    wall = time.perf_counter() - t0
    own1, busy1 = cpu()
    print(json.dumps({"seconds": wall, "own": own1 - own0, "busy": busy1 - busy0}))
    """
)


def test_datasets_pipeline(benchmark, corpus, tokenizer_dir, reference, work_dir):
    pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    rounds = Rounds()
    work = work_dir / "datasets-out"

    def setup():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        wait_for_quiet_machine()

    def one_round():
        # A fresh process, timed from inside (imports excluded), as a user's script runs it.
        cmd = [sys.executable, "-c", DATASETS_PIPELINE, str(corpus.path), str(tokenizer_dir / "tokenizer.json"), str(work), str(NUM_PROC)]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        assert done.returncode == 0, done.stderr[-4000:]
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.add(timing["seconds"], timing["own"], timing["busy"])

    benchmark.pedantic(one_round, setup=setup, rounds=SIZES.datasets_rounds, iterations=1)
    flat, lengths = reference
    assert np.array_equal(np.load(work / "lengths.npy"), lengths)
    assert np.array_equal(np.memmap(work / "tokens.bin", dtype=np.uint16, mode="r").astype(np.int64), flat)
    record(benchmark, "c_datasets", rounds, corpus, num_proc=NUM_PROC)

"""``ember demo``: the data path end to end on the built-in corpus."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ember.data.corpus import stdlib_texts
from ember.data.loader import TokenLoader
from ember.data.shards import ShardWriter, open_dataset
from ember.data.tokenizer import ByteTokenizer

SHARD_TOKENS = 8 << 20


def write_stdlib_shards(out_dir: Path, corpus_mb: float) -> Path:
    """Tokenizes standard-library source with the byte tokenizer into shards under ``out_dir``."""
    tok = ByteTokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    index = 0
    writer = ShardWriter(out_dir / f"shard-{index:05d}.tok", tok.vocab_size)
    for text in stdlib_texts(max_bytes=int(corpus_mb * 1e6)):
        writer.add_document(tok.encode(text))
        if writer.num_tokens >= SHARD_TOKENS:
            writer.close()
            index += 1
            writer = ShardWriter(out_dir / f"shard-{index:05d}.tok", tok.vocab_size)
    if writer.num_docs:
        writer.close()
    else:
        writer.abort()
    return out_dir


def run_demo(out_dir: str | None, seq_len: int, batch_size: int, steps: int, corpus_mb: float) -> None:
    tmp = None if out_dir else tempfile.TemporaryDirectory(prefix="ember-demo-")
    root = Path(out_dir or tmp.name)
    try:
        t0 = time.perf_counter()
        write_stdlib_shards(root, corpus_mb)
        ds = open_dataset(root)
        print(f"wrote {len(ds.shards)} shards, {len(ds):,} documents, {ds.num_tokens:,} tokens to {root} in {time.perf_counter() - t0:.1f} s")

        loader = TokenLoader(root, seq_len=seq_len, batch_size=batch_size, seed=0, position_ids=True)
        it = iter(loader)
        first = next(it)
        t1 = time.perf_counter()
        for _ in range(steps - 1):
            next(it)
        dt = time.perf_counter() - t1
        tokens = (steps - 1) * batch_size * seq_len
        print(f"read {steps} batches of {batch_size}x{seq_len}: {tokens / dt / 1e6:,.1f} M tokens/s")
        print(f"loader state after {steps} batches: {loader.state_dict()}")
        sample = ByteTokenizer().decode(first["input_ids"][0, :240].tolist())
        print("first sample of batch 0:\n" + "-" * 60 + f"\n{sample}\n" + "-" * 60)
    finally:
        if tmp is not None:
            tmp.cleanup()

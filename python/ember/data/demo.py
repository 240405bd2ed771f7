"""``ember demo``: the data path end to end on the built-in corpus."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ember.data.builtin import stdlib_shards
from ember.data.loader import TokenLoader
from ember.data.shards import open_dataset
from ember.data.tokenizer import ByteTokenizer


def run_demo(out_dir: str | None, seq_len: int, batch_size: int, steps: int) -> None:
    tmp = None if out_dir else tempfile.TemporaryDirectory(prefix="ember-demo-")
    root = Path(out_dir or tmp.name)
    try:
        t0 = time.perf_counter()
        train_dir, _ = stdlib_shards(root)
        ds = open_dataset(train_dir)
        print(f"{len(ds.shards)} shards, {len(ds):,} documents, {ds.num_tokens:,} tokens in {train_dir} ({time.perf_counter() - t0:.1f} s)")

        loader = TokenLoader(train_dir, seq_len=seq_len, batch_size=batch_size, seed=0, position_ids=True)
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

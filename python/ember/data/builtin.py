"""Built-in corpora, tokenized on first use into a cache directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ember.data.corpus import stdlib_texts
from ember.data.shards import ShardWriter
from ember.data.tokenizer import ByteTokenizer

STDLIB = "builtin:stdlib"
SHARD_TOKENS = 16 << 20
VALIDATION_EVERY = 50  # one document in 50 goes to the validation split


def stdlib_shards(cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Train and validation shard directories of the standard-library corpus under
    the byte tokenizer, built once per Python version and reused after."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(cache_dir) / f"stdlib-byte-{version}"
    if (root / "manifest.json").is_file():
        return root / "train", root / "validation"
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "validation").mkdir()
    tok = ByteTokenizer()
    counts = {"train": [0, 0], "validation": [0, 0]}
    writers: dict[str, ShardWriter] = {}
    index = {"train": 0, "validation": 0}
    for i, text in enumerate(stdlib_texts()):
        split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        if split not in writers:
            writers[split] = ShardWriter(tmp / split / f"{index[split]:05d}.tok", tok.vocab_size)
        w = writers[split]
        ids = tok.encode(text)
        w.add_document(ids)
        counts[split][0] += 1
        counts[split][1] += len(ids)
        if w.num_tokens >= SHARD_TOKENS:
            w.close()
            del writers[split]
            index[split] += 1
    for w in writers.values():
        w.close()
    manifest = {"corpus": "python-stdlib", "tokenizer": "byte", "vocab_size": tok.vocab_size, "documents": {k: v[0] for k, v in counts.items()}, "tokens": {k: v[1] for k, v in counts.items()}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "train", root / "validation"

"""Built-in corpora, tokenized on first use into a cache directory."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ember.data.prepare import MANIFEST, prepare
from ember.data.readers import STDLIB

SHARD_TOKENS = 16 << 20
VALIDATION_FRACTION = 0.02  # one document in 50 goes to the validation split


def stdlib_shards(cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Train and validation shard directories of the standard-library corpus under
    the byte tokenizer, built once per Python version (by ``ember prepare``'s
    pipeline) and reused after."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(cache_dir) / f"stdlib-byte-{version}"
    if (root / MANIFEST).is_file():
        return root / "train", root / "validation"
    # Built beside its final name and renamed into place whole, so that processes
    # sharing the cache never see a partial corpus.
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepare([STDLIB], tmp, tokenizer="byte", shard_tokens=SHARD_TOKENS, validation_fraction=VALIDATION_FRACTION,
                workers=1, progress=False)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            # Another process finished first: use theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "train", root / "validation"
